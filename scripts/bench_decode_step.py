"""Decode-step time of the model on a GPU against its byte floor, per attention method.

Random weights of a LLaMA shape (no checkpoint): ``--shape smollm2`` (SmolLM2-135M) or
``llama3-8b`` (LLaMA-3.1-8B; ``--layers N`` keeps the first N layers so that a large cache
fits beside the weights). For each ``--points BATCHxCONTEXT`` the KV cache is filled with a
planted, peaked distribution, written layer by layer and chunk by chunk through
``PagedKVCache.write_prefill`` (pages, INT4 K and Quest metadata consistent):

- ordinary keys are N(0, 1) per coordinate, whose logits against the model's queries have a
  standard deviation near sigma_q = 0.02 * sqrt(hidden) (random N(0, 0.02) projections of
  unit-RMS hidden states);
- a fraction ``--planted`` of the tokens (1% by default) get keys ``--lift / sigma_q`` times
  larger: their logits spread over about +-lift, so each head's largest few planted tokens
  carry most of its softmax mass, as in peaked real heads. The attended fraction (tokens
  attended over tokens cached, sparse layers) is measured and reported, not assumed.

Each method's jitted step (the cache donated and threaded from step to step) is compiled ahead
of time (compile seconds and XLA's temporary bytes reported), then timed as ``--steps`` steps
dispatched back to back and waited for once (device-bound: the host dispatches the next step
while the device runs this one), less one step timed alone the same way: the difference over
steps - 1 drops the dispatch of the first step and the final wait, which every such measurement
pays once (``benchlib.per_call_device_seconds``). The floor is the bytes the method must read
at the copy bandwidth measured in the same run: the weights once (the LM head included, the
embedding gather not) plus, per layer, every cached K and V (dense layers) or the page
metadata, the INT4 keys of its candidates and the K/V of the tokens it kept (sparse layers).
With ``--profile`` three more steps run under the JAX profiler: device busy time per step
(kernels only), device span (first kernel start to last kernel end of a step: their difference
is launch gaps), the longest kernels, and any kernel that moves a weight-sized copy.

``--devices N`` splits the KV heads (with their query heads and weights) over N local devices
(``twilight_jax.sharding``), the cache too: each device reads its heads' share of the cache
and of the per-head weights, plus the whole of the replicated ones (embedding, LM head,
norms), and the layers' outputs are summed over the devices (two all-reduces per layer). The
floor is then one device's bytes at one device's bandwidth; the memory columns are device
0's. Run the same command with ``--devices 1``, 2 and 4 for the scaling (docs/multihost.md).

The Quest methods run once per ``--quest-metadata`` form (int8 codes and a float32 scale per
page and KV head: 2 * D + 4 bytes; native: the cache dtype, 2 * D * 2 bytes), native first:
the cache is built with native metadata and quantized once before the first int8 run (what a
prefill in int8 writes), then kept up to date by the decode steps.

    python scripts/bench_decode_step.py --quest-metadata native int8 --methods quest \
        twilight/quest --shape llama3-8b --layers 16 --points 64x32768 --out /tmp/meta
    python scripts/bench_decode_step.py --shape llama3-8b --layers 16 \\
        --points 8x32768 32x32768 4x131072 --profile --out docs/results/decode-step
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

import benchlib
from models.config import LlamaConfig
from models.llama import LlamaForCausalLM
from twilight_jax import PagedKVCache, SparsityConfig
from twilight_jax.sharding import cache_specs, check_heads, head_mesh

SHAPES = {
    "smollm2": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    "llama3-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        tie_word_embeddings=False,
    ),
}
METHODS = ("dense", "quest", "twilight/quest", "twilight/all")
QUEST_METHODS = ("quest", "twilight/quest")  # the methods that read Quest's page metadata
PAGE = 16
# Steps each method appends before its timed ones, and room for them in the cache.
_WARMUP = 2
_PROFILE_STEPS = 3


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the usage first)
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None):
    ap = _Parser(
        prog="bench_decode_step.py",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2", help="model shape")
    ap.add_argument("--layers", type=int, help="keep the first N layers (default: all)")
    ap.add_argument(
        "--devices",
        type=int,
        default=1,
        help="split the KV heads (cache and weights by head) over this many local devices",
    )
    ap.add_argument(
        "--points",
        nargs="+",
        default=["64x4096", "1x4096"],
        help="BATCHxCONTEXT points; CONTEXT is the cache's max_seq_len (tokens per sequence)",
    )
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help=f"of {METHODS}")
    ap.add_argument("--budget", type=int, default=8192, help="B0 of Quest (capped at CONTEXT)")
    ap.add_argument("--top-p", type=float, default=0.85, help="p of the Twilight methods")
    ap.add_argument("--max-budget", type=int, default=2048, help="selection capacity")
    ap.add_argument("--dense-layers", type=int, default=1, help="first N layers stay dense")
    ap.add_argument("--planted", type=float, default=0.01, help="fraction of planted keys")
    ap.add_argument("--lift", type=float, default=5.0, help="logit scale of planted keys")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per method")
    ap.add_argument(
        "--copy-tbps",
        type=float,
        help="copy bandwidth for the floors, TB/s (default: measured on a GPU; no floors on CPU)",
    )
    ap.add_argument("--profile", action="store_true", help="trace 3 steps per method")
    ap.add_argument("--out", default="docs/results/decode-step", help="output path stem")
    ap.add_argument("--dump-hlo", help="write each step's optimized HLO (gzipped) to this folder")
    ap.add_argument(
        "--quest-metadata",
        nargs="+",
        choices=("int8", "native"),
        default=["int8"],
        help="forms of Quest's page metadata to run the Quest methods with, each a row "
        "(default: int8, the cache's default)",
    )
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    n_layers = SHAPES[args.shape]["num_hidden_layers"]
    if args.layers is not None and not 1 <= args.layers <= n_layers:
        ap.error(f"--layers must be in [1, {n_layers}] for --shape {args.shape}, got {args.layers}")
    shape = SHAPES[args.shape]
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    if args.devices < 1 or heads % args.devices or kv_heads % args.devices:
        ap.error(
            f"--devices must divide the KV heads ({kv_heads}) and query heads ({heads}) of "
            f"--shape {args.shape}, got {args.devices}"
        )
    if args.devices > len(jax.devices()):
        ap.error(
            f"--devices {args.devices}: this process has {len(jax.devices())} "
            f"{jax.default_backend()} device(s)"
        )
    points = []
    for p in args.points:
        try:
            b, t = (int(x) for x in p.lower().split("x"))
        except ValueError:
            ap.error(f"--points entries must look like 8x32768 (BATCHxCONTEXT), got {p!r}")
        if b < 1 or t < 256 or t % PAGE:
            ap.error(f"--points {p}: batch must be >= 1, context >= 256 and a multiple of {PAGE}")
        points.append((b, t))
    args.points = points
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        ap.error(f"--methods must be among {METHODS}, got {bad[0]!r}")
    if not 0.0 < args.top_p <= 1.0:
        ap.error(f"--top-p must be in (0, 1], got {args.top_p}")
    for name in ("budget", "max_budget", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.budget % PAGE:
        ap.error(f"--budget must be a multiple of the page size {PAGE}, got {args.budget}")
    if args.dense_layers < 0:
        ap.error(f"--dense-layers must be >= 0, got {args.dense_layers}")
    if not 0.0 <= args.planted < 1.0:
        ap.error(f"--planted must be in [0, 1), got {args.planted}")
    if args.copy_tbps is not None and args.copy_tbps <= 0:
        ap.error(f"--copy-tbps must be > 0, got {args.copy_tbps}")
    return args


def method_config(name: str, context: int, args) -> SparsityConfig:
    b0 = min(args.budget, context)
    common = dict(page_size=PAGE, dense_layers=args.dense_layers)
    if name == "dense":
        return SparsityConfig(selector="dense", **common)
    if name == "quest":  # the base selector alone: B0 tokens attended, none forced
        return SparsityConfig(
            selector="quest",
            budget=b0,
            top_p=None,
            max_budget=b0,
            sink_tokens=0,
            recent_tokens=0,
            **common,
        )
    selector = "quest" if name == "twilight/quest" else "all"
    return SparsityConfig(
        selector=selector, budget=b0, top_p=args.top_p, max_budget=args.max_budget, **common
    )


def _device_bytes(x) -> int:
    """Bytes of an array on one device: its shard (all of it when replicated or unsplit)."""
    return x.addressable_shards[0].data.nbytes


def weight_bytes(model: LlamaForCausalLM) -> int:
    """Bytes a decode step reads of the weights on one device: its share of each weight (all
    of a replicated one) but the embedding table, which it gathers B rows of (unless the head
    is tied to it)."""
    state = nnx.state(model)
    total = sum(_device_bytes(x) for x in jax.tree.leaves(state))
    if model.lm_head is not None:
        total -= _device_bytes(model.embed_tokens.embedding[...])
    return total


def floor_bytes(name, cfg, config, lengths, kept_tokens, n_dense, quest_metadata="int8") -> int:
    """Bytes of the cache one step of the method must read (see the module docstring).

    lengths [B] tokens cached per sequence; kept_tokens: tokens attended summed over the
    sparse layers, sequences and KV heads (measured); quest_metadata: the form of the page
    metadata Quest reads."""
    hkv, d, L = config.num_kv_heads, config.head_dim, config.num_layers
    if name == "dense":
        n_dense = L
    tokens = int(np.sum(lengths)) * hkv  # (sequence, KV head) token rows of one layer
    kv_row = 2 * d * 2  # bf16 K and V of one token of one head
    total = n_dense * tokens * kv_row
    n_sparse = L - n_dense
    if n_sparse == 0:
        return total
    pages = int(np.sum(-(-np.asarray(lengths) // PAGE))) * hkv
    # min and max per page and head: bf16, or int8 codes and a float32 scale
    meta = pages * (2 * d * 2 if quest_metadata == "native" else 2 * d + 4)
    cand = int(np.sum(np.minimum(lengths, cfg.budget))) * hkv
    int4_row = d // 2 + 8  # nibbles + float32 scale and zero
    if name == "quest":
        per_layer = meta + cand * kv_row
        return total + n_sparse * per_layer
    if name == "twilight/quest":
        per_layer = meta + cand * int4_row
    else:  # twilight/all: every token is a candidate
        per_layer = tokens * int4_row
    return total + n_sparse * per_layer + int(kept_tokens) * kv_row


@partial(jax.jit, static_argnums=(5, 6), donate_argnums=(0,))
def _write_planted(cache, key, layer, c0, lengths, chunk, scales):
    """Writes tokens [c0, c0 + chunk) of one layer with planted keys (see module docstring)."""
    plant_frac, plant_scale = scales
    b, hkv, d = cache.batch, cache.num_kv_heads, cache.head_dim
    kk, kv, kp = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, layer), c0), 3)
    k = jax.random.normal(kk, (b, chunk, hkv, d), jnp.float32)
    planted = jax.random.uniform(kp, (b, chunk, hkv, 1)) < plant_frac
    k = jnp.where(planted, k * plant_scale, k)
    v = jax.random.normal(kv, (b, chunk, hkv, d), jnp.float32)
    count = jnp.clip(lengths - c0, 0, chunk)
    start = jnp.full((b,), c0, jnp.int32)
    dt = cache.k_pages.dtype
    return cache.write_prefill(layer, k.astype(dt), v.astype(dt), start, count)


def empty_cache(config, dtype, batch, context, mesh):
    """An empty cache, created split over the mesh when there is one (no whole copy on one
    device first: the largest points fill most of a device with their share alone)."""

    def make():
        return PagedKVCache.create(
            config.num_layers,
            batch,
            config.num_kv_heads,
            config.head_dim,
            max_seq_len=context,
            page_size=PAGE,
            dtype=dtype,
            quest_metadata="native",
        )

    if mesh is None:
        return make()
    specs = cache_specs(jax.eval_shape(make))
    return jax.jit(make, out_shardings=jax.tree.map(lambda s: NamedSharding(mesh, s), specs))()


def planted_cache(config, dtype, batch, context, lengths, args, key, mesh=None):
    cache = empty_cache(config, dtype, batch, context, mesh)
    sigma_q = 0.02 * math.sqrt(config.hidden_size)
    scales = (float(args.planted), float(args.lift / sigma_q))
    chunk = min(context, max(PAGE, (1 << 22) // max(batch, 1) // PAGE * PAGE))
    ln = jnp.asarray(lengths, jnp.int32)
    for layer in range(config.num_layers):
        for c0 in range(0, context, chunk):
            cache = _write_planted(
                cache, key, jnp.int32(layer), jnp.int32(c0), ln, min(chunk, context), scales
            )
    return cache.with_lengths(ln)


def weight_copies(kernels) -> list[tuple[str, float]]:
    """Kernels of the profile that look like a copy of a weight (copy / dynamic-slice
    fusions), with their time: the layer loop must hand weights to the matmuls in place."""
    return [
        (name, us)
        for name, us, _ in kernels
        if ("dynamic_slice" in name or "copy" in name) and us > 5.0
    ]


def _note(row) -> str:
    """Warnings for a row: weight copies in the profile, and logits that are all zero or not
    finite (random weights give about 1 per logit: such a sum means the step ran on a
    corrupted state, and its time is not the method's)."""
    notes = ["WEIGHT COPIES"] if row.get("weight_copies") else []
    total = row["logits_sum"]
    if not math.isfinite(total) or total == 0:
        notes.append("LOGITS ZERO OR NON-FINITE")
    return "; ".join(notes)


def run_method(jm, cache, tokens, name, cfg, args, tag):
    """Compile, time and (optionally) profile one method; returns (row, cache, info)."""
    t0 = time.perf_counter()
    compiled = jm.lower_decode_step(tokens, cache, cfg).compile()
    compile_s = time.perf_counter() - t0

    def step(cache):  # the compiled program itself: no argument checks on the timed path
        return compiled(jm.weights, tokens, cache, None, None)

    mem = benchlib.compiled_memory(compiled)
    if args.dump_hlo:
        import gzip
        import os

        os.makedirs(args.dump_hlo, exist_ok=True)
        with gzip.open(os.path.join(args.dump_hlo, f"{tag}.hlo.txt.gz"), "wt") as f:
            f.write(compiled.as_text())
    for _ in range(_WARMUP):
        logits, cache, info = step(cache)
    jax.block_until_ready(logits)
    state = {"cache": cache}

    def launches(n):  # n steps back to back, waited for once
        t0 = time.perf_counter()
        for _ in range(n):
            lg, state["cache"], state["info"] = step(state["cache"])
        jax.block_until_ready((lg, state["cache"]))
        state["logits"] = lg
        return time.perf_counter() - t0

    if args.steps > 1:
        step_s = benchlib.per_call_device_seconds(launches, 1, repeats=1, extra=args.steps - 1)
    else:
        step_s = launches(1)
    cache, info = state["cache"], state["info"]
    step_ms = step_s * 1e3
    row = {"compile_s": compile_s, "step_ms": step_ms, "temp_bytes": mem.get("temp_bytes")}
    # A fingerprint of the last timed step's logits: the same steps run in the same order
    # whatever the XLA flags, so runs that differ only in runtime flags must print the same
    # value (gpu_suite step "xlaflags").
    row["logits_sum"] = float(jnp.sum(jnp.abs(state["logits"].astype(jnp.float32))))
    if args.profile:
        state = {"cache": cache}

        def one_step():
            lg, state["cache"], _ = step(state["cache"])
            jax.block_until_ready(lg)

        trace = benchlib.profile(one_step, f"/tmp/decode_trace/{tag}", runs=_PROFILE_STEPS)
        cache = state["cache"]
        prof = benchlib.kernel_breakdown(trace, runs=_PROFILE_STEPS, top=40)
        seg = benchlib.step_times(trace, _PROFILE_STEPS)
        row["busy_ms"] = seg.get("busy_us", 0) / 1e3
        row["span_ms"] = seg.get("span_us", 0) / 1e3
        row["kernels"] = prof["kernels"]
        row["weight_copies"] = weight_copies(prof["kernels"])
    return row, cache, info


def main(argv=None):
    args = parse_args(argv)
    hf = dict(SHAPES[args.shape])
    if args.layers:
        hf["num_hidden_layers"] = args.layers
    config = LlamaConfig.from_hf(hf)
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    if args.copy_tbps is not None:
        bw = {"peak": args.copy_tbps * 1e12}
    else:
        bw = benchlib.measure_copy_bandwidth() if on_gpu else {"peak": 0.0}
    print(f"copy bandwidth {bw['peak'] / 1e12:.2f} TB/s", flush=True)
    t0 = time.perf_counter()
    model = LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0))
    mesh = None
    if args.devices > 1:
        mesh = head_mesh(args.devices)
        check_heads(mesh, config.num_heads, config.num_kv_heads)
        model.shard(mesh)
    jm = model.jit()
    wbytes = weight_bytes(model)
    per = f" per device ({args.devices} devices)" if mesh is not None else ""
    print(
        f"random weights: {wbytes / 1e9:.2f} GB read per step{per} "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    table = benchlib.Table(
        [
            "method",
            "quest_metadata",
            "batch",
            "context",
            "step_ms",
            "floor_ms",
            "x_floor",
            "vs_dense",
            "busy_ms",
            "span_ms",
            "attended",
            "cache_GB",
            "temp_GB",
            "peak_GB",
            "compile_s",
            "logits_sum",
            "note",
        ]
    )
    details = {}
    n_dense = min(args.dense_layers, config.num_layers)
    # (method, Quest metadata form): the Quest methods once per form, native ones first (an
    # int8 cache cannot go back); the others, which read no metadata, once, with the first.
    forms = sorted(set(args.quest_metadata), key=("native", "int8").index)
    runs = [
        (name, form)
        for form in forms
        for name in args.methods
        if name in QUEST_METHODS or form == forms[0]
    ]
    for batch, context in args.points:
        # Room for the warm-up, timed and profiled steps of every run.
        room = len(runs) * (_WARMUP + 1 + args.steps + _PROFILE_STEPS) + PAGE
        lengths = np.full((batch,), context - room, np.int32)
        if lengths.min() < PAGE:
            raise SystemExit(f"context {context} leaves no room for {room} decode steps")
        try:
            cache = planted_cache(
                config, dtype, batch, context, lengths, args, jax.random.key(1), mesh
            )
        except Exception as e:  # noqa: BLE001 (one failed point must not lose the others)
            print(f"FAILED building the cache for {batch}x{context}: {e!r}"[:400], flush=True)
            table.add(method="-", batch=batch, context=context, note=f"cache {type(e).__name__}")
            continue
        tokens = jnp.ones((batch,), jnp.int32)
        dense_ms = None
        for name, form in runs:
            cfg = method_config(name, context, args)
            # The int8 codes and scales made from a split cache are split the same way.
            cache = jm.place_cache(cache.with_quest_metadata(form))
            tag = f"{name.replace('/', '_')}_{form}_{batch}x{context}"
            form_shown = form if name in QUEST_METHODS else ""
            cache_bytes = sum(_device_bytes(x) for x in jax.tree.leaves(cache))  # one device's
            try:
                lens_now = np.asarray(cache.lengths)
                row, cache, info = run_method(jm, cache, tokens, name, cfg, args, tag)
            except Exception as e:  # noqa: BLE001
                print(f"FAILED {name} {form} {batch}x{context}: {e!r}"[:600], flush=True)
                table.add(
                    method=name,
                    quest_metadata=form_shown,
                    batch=batch,
                    context=context,
                    note=type(e).__name__,
                )
                continue
            counts = np.asarray(info.counts, np.int64)  # [L, B, Hs]
            sparse = counts[n_dense:] if name != "dense" else counts[:0]
            kept = int(sparse.sum())
            if sparse.size and cfg.gqa == "per_head":
                kept //= config.num_heads // config.num_kv_heads
            attended = (
                float(sparse.mean() / lens_now.mean()) if sparse.size and name != "dense" else 1.0
            )
            # The KV heads are split evenly: each device reads 1 / devices of the cache bytes.
            cache_floor = floor_bytes(name, cfg, config, lens_now, kept, n_dense, form)
            fb = wbytes + cache_floor // args.devices
            floor_ms = fb / bw["peak"] * 1e3 if bw["peak"] else 0.0
            if name == "dense":
                dense_ms = row["step_ms"]
            stats = jax.devices()[0].memory_stats() or {}
            table.add(
                method=name,
                quest_metadata=form_shown,
                batch=batch,
                context=context,
                step_ms=row["step_ms"],
                floor_ms=floor_ms,
                x_floor=row["step_ms"] / floor_ms if floor_ms else None,
                vs_dense=dense_ms / row["step_ms"] if dense_ms else None,
                busy_ms=row.get("busy_ms"),
                span_ms=row.get("span_ms"),
                attended=attended,
                cache_GB=cache_bytes / 1e9,
                temp_GB=None if row["temp_bytes"] is None else row["temp_bytes"] / 1e9,
                peak_GB=stats.get("peak_bytes_in_use", 0) / 1e9 or None,
                compile_s=row["compile_s"],
                logits_sum=row["logits_sum"],
                note=_note(row),
            )
            details[f"{name} | {form_shown} | {batch}x{context}"] = {
                "floor_bytes": fb,
                "kernels": row.get("kernels"),
                "weight_copies": row.get("weight_copies"),
            }
            for kname, us, calls in row.get("kernels") or []:
                print(f"      {us:9.1f} us  {calls:5.0f}x  {kname[:100]}", flush=True)
            save(table, details, args, config, bw, wbytes)  # each row: a cut-off run keeps it
        del cache
    save(table, details, args, config, bw, wbytes)
    print("\n" + table.text())


def save(table, details, args, config, bw, wbytes):
    meta = benchlib.device_meta()
    meta["command"] = "python scripts/bench_decode_step.py " + " ".join(args.argv)
    meta["shape"] = f"{args.shape}, {config.num_layers} layers, random weights"
    meta["devices"] = args.devices
    meta["copy_TBps"] = round(bw["peak"] / 1e12, 3)
    meta["weight_GB"] = round(wbytes / 1e9, 3)
    skip = ("points", "out", "methods", "argv", "dump_hlo")
    meta["settings"] = {k: v for k, v in vars(args).items() if k not in skip}
    table.save(args.out, meta)
    with open(args.out + "_kernels.json", "w") as f:
        json.dump(details, f, indent=1)


if __name__ == "__main__":
    main()

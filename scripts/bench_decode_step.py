"""Model decode-step time on a GPU with random weights of a given LLaMA shape (no checkpoint).

Default shape: SmolLM2-135M (30 layers, 9 q / 3 KV heads, head_dim 64, hidden 576). The KV
cache is filled with random post-RoPE K/V of --context tokens per sequence through
`PagedKVCache.from_dense` (pages, INT4 K and Quest metadata consistent). Each method's jitted
decode step (cache donated) runs --steps times; the median step time is reported next to the
floor of reading every layer's K and V once plus the weights once at the copy bandwidth. A step
far above that floor means bytes are moved that need not be (e.g. per-layer cache copies).
With --profile, 3 more steps per method run under the JAX profiler: device busy time per step
(gaps between kernels excluded) and the longest kernels.

    python scripts/bench_decode_step.py --batch 64 --context 4096 --out docs/results/decode_step
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchlib  # noqa: E402

from models.config import LlamaConfig  # noqa: E402
from models.llama import LlamaForCausalLM  # noqa: E402
from twilight_jax import PagedKVCache, SparsityConfig  # noqa: E402

SMOLLM2 = dict(
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
    bos_token_id=1,
    eos_token_id=2,
)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 1])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=7, help="timed steps per method")
    ap.add_argument("--unroll", action="store_true", help="also time scan_unroll=True")
    ap.add_argument("--out", default="docs/results/decode_step")
    ap.add_argument(
        "--devices",
        type=int,
        default=1,
        help="split KV heads and weights over this many local devices (twilight_jax.sharding)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also trace 3 steps per method: device busy time and the longest kernels",
    )
    args = ap.parse_args()
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")

    config = LlamaConfig.from_hf(SMOLLM2)
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    bw = benchlib.measure_copy_bandwidth() if jax.default_backend() == "gpu" else {"peak": 0}
    methods = {
        "dense": SparsityConfig(selector="dense"),
        "twilight/all p=0.95": SparsityConfig(selector="all", top_p=0.95, max_budget=512),
        "quest B0=1024": SparsityConfig(selector="quest", budget=1024, max_budget=1024),
        "twilight/quest B0=1024 p=0.95": SparsityConfig(
            selector="quest", budget=1024, top_p=0.95, max_budget=512
        ),
    }
    table = benchlib.Table(
        [
            "method",
            "unroll",
            "batch",
            "context",
            "step_ms",
            "busy_ms",
            "floor_ms",
            "compile_s",
            "note",
        ]
    )
    profiles = {}
    c = config
    weight_bytes = 2 * (
        c.vocab_size * c.hidden_size
        + c.num_layers
        * (
            c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
            + c.num_heads * c.head_dim * c.hidden_size
            + 3 * c.hidden_size * c.intermediate_size
        )
    )
    for unroll in [1, True] if args.unroll else [1]:
        model = LlamaForCausalLM(config, dtype=dtype, scan_unroll=unroll)
        if args.devices != 1:
            from twilight_jax.sharding import head_mesh

            model.shard(head_mesh(args.devices))
        jm = model.jit()
        for batch in args.batches:
            t = args.context
            key = jax.random.key(batch)
            shape = (c.num_layers, batch, t, c.num_kv_heads, c.head_dim)
            kv_bytes = 2 * 2 * batch * t * c.num_layers * c.num_kv_heads * c.head_dim
            floor = (kv_bytes + weight_bytes) / bw["peak"] * 1e3 if bw["peak"] else 0.0
            for name, cfg in methods.items():
                try:
                    k = jax.random.normal(key, shape, dtype)
                    v = jax.random.normal(jax.random.fold_in(key, 1), shape, dtype)
                    lengths = jnp.full((batch,), t - 8, jnp.int32)
                    cache = jm.place_cache(PagedKVCache.from_dense(k, v, lengths, page_size=16))
                    del k, v
                    tokens = jnp.ones((batch,), jnp.int32)
                    t0 = time.perf_counter()
                    logits, cache, _ = jm.decode_step(tokens, cache, cfg)  # compile
                    jax.block_until_ready(logits)
                    compile_s = time.perf_counter() - t0
                    times = []
                    for _ in range(args.steps):
                        t0 = time.perf_counter()
                        logits, cache, _ = jm.decode_step(tokens, cache, cfg)
                        jax.block_until_ready(logits)
                        times.append(time.perf_counter() - t0)
                    busy = None
                    if args.profile:
                        state = {"cache": cache}

                        def one_step():
                            lg, state["cache"], _ = jm.decode_step(tokens, state["cache"], cfg)
                            jax.block_until_ready(lg)

                        tag = f"{name.replace('/', '_').replace(' ', '_')}_b{batch}_u{unroll}"
                        trace = benchlib.profile(one_step, f"{args.out}_trace/{tag}")
                        cache = state["cache"]
                        prof = benchlib.kernel_breakdown(trace, runs=3)
                        profiles[f"{name} | batch {batch} | unroll {unroll}"] = prof
                        busy = prof["busy_us"] / 1e3
                        print(f"    {name}: device busy {busy:.3f} ms/step", flush=True)
                        for kname, us, calls in prof["kernels"]:
                            print(f"      {us:9.1f} us  {calls:5.0f}x  {kname[:90]}", flush=True)
                    table.add(
                        method=name,
                        unroll=str(unroll),
                        batch=batch,
                        context=t,
                        step_ms=statistics.median(times) * 1e3,
                        busy_ms=busy,
                        floor_ms=floor,
                        compile_s=compile_s,
                    )
                    del cache
                except Exception as e:
                    print(f"FAILED {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    table.add(
                        method=name,
                        unroll=str(unroll),
                        batch=batch,
                        context=t,
                        note=f"FAILED {type(e).__name__}",
                    )
    meta = benchlib.device_meta()
    meta["command"] = "python scripts/bench_decode_step.py " + " ".join(sys.argv[1:])
    meta["weights"] = "random, SmolLM2-135M shapes"
    table.save(args.out, meta)
    if profiles:
        with open(args.out + "_profile.json", "w") as f:
            json.dump(profiles, f, indent=1)
    print("\n" + table.text())


if __name__ == "__main__":
    main()

"""Times the Twilight decode-attention op against dense baselines on a GPU.

LLaMA-3.1-8B attention shapes (32 q heads, 8 KV heads, head_dim 128, bf16, page 16) on planted
attention distributions: in every (sequence, KV group) a fraction `--planted` of the tokens
(default 1.5%) have keys aligned with the group's shared query direction, lifting their logits
by about `--lift` (default 7) over unit-variance noise, so that p = 0.85 keeps about 1-3% of
the tokens, as in peaked real heads. Methods, each through `twilight_jax.decode_attention`
(one layer, jitted): dense (ours), Quest at B0, Twilight over Quest (B0, p), Twilight over
all (p); and the dense baselines on contiguous K/V: jax cuDNN `dot_product_attention` and,
where torch with CUDA is importable (``--no-torch`` skips it), torch SDPA with its flash and
cuDNN backends, timed with CUDA events. ``vs_best_dense`` divides the fastest dense time of
the same (batch, context), ours included, by each method's. For the sparse methods, the
time of each stage (select, estimate, threshold, attend) is measured on its own with the
previous stage's real outputs, and the average attended tokens per (sequence, KV head) is
reported. The Quest methods run once per ``--quest-metadata`` form (int8 codes with a scale per
page, or the cache dtype), on the same cache (its metadata quantized for int8).

    python scripts/bench_attention.py --out docs/results/attention
    python scripts/bench_attention.py --quest-metadata native int8 --out /tmp/attn-meta
"""

from __future__ import annotations

import argparse
import sys
import traceback
from functools import partial

import jax
import jax.numpy as jnp

import benchlib
from pallas_kernels.attention import sparse_decode_attention
from twilight_jax import PagedKVCache, SparsityConfig, decode_attention, pruner, selectors

HQ, HKV, D, S = 32, 8, 128, 16
G = HQ // HKV
DT = jnp.bfloat16


def _planted_kv(batch, ctx, planted, ksel, kk, kv, alpha, direction):
    """K with planted tokens and V, both [B, ctx, Hkv, D] in DT."""
    is_planted = jax.random.uniform(ksel, (batch, ctx, HKV)) < planted
    k = jax.random.normal(kk, (batch, ctx, HKV, D), jnp.float32)
    k = k + jnp.where(
        is_planted[..., None], alpha[:, None, :, None] * direction[:, None, :, :], 0.0
    )
    v = jax.random.normal(kv, (batch, ctx, HKV, D), DT)
    return k.astype(DT), v


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _planted_cache(batch, ctx, planted, lift, key):
    """q and the one-layer cache, built in one program: the dense K/V and the float32 K are
    temporaries XLA frees inside it, and the pages are written into the fresh pool in place.
    (Built eagerly, the zero pool, the written pool and the dense K/V were alive together:
    118.5 GiB at batch 64 / 128K, and the allocator, fragmented, could no longer give the
    timed programs a 16 GiB buffer.)"""
    kq, kn, ksel, kk, kv = jax.random.split(key, 5)
    shared = jax.random.normal(kq, (batch, HKV, 1, D), jnp.float32)
    q = shared + 0.5 * jax.random.normal(kn, (batch, HKV, G, D), jnp.float32)
    q = q.reshape(batch, HQ, D)
    direction = shared[:, :, 0] / jnp.linalg.norm(shared[:, :, 0], axis=-1, keepdims=True)
    # logit = q.k / sqrt(D); q . direction ~ |shared| ~ sqrt(D), so alpha ~ lift keeps the lift.
    alpha = lift * jnp.sqrt(D) / jnp.linalg.norm(shared[:, :, 0], axis=-1)  # [B, Hkv]
    k, v = _planted_kv(batch, ctx, planted, ksel, kk, kv, alpha, direction)
    lengths = jnp.full((batch,), ctx, jnp.int32)
    cache = PagedKVCache.from_dense(k, v, lengths, page_size=S, quest_metadata="native")
    return q.astype(DT), cache


def planted_problem(key, batch, ctx, planted, lift):
    """q [B, Hq, D] and a one-layer cache whose attention is peaked on planted tokens (native
    Quest metadata: ``with_quest_metadata("int8")`` gives the int8 form of the same cache)."""
    return _planted_cache(batch, ctx, float(planted), float(lift), key)


def method_configs(ctx, budget, p, max_budget):
    """The benchmarked methods' SparsityConfigs: dense, Quest at B0 (no pruning, no forced
    tokens), Twilight over Quest at B0 and Twilight over all, p and max_budget for both."""
    b0 = min(budget, ctx)
    return {
        "dense": SparsityConfig(selector="dense", page_size=S),
        "quest": SparsityConfig(
            selector="quest",
            budget=b0,
            top_p=None,
            max_budget=b0,
            page_size=S,
            sink_tokens=0,
            recent_tokens=0,
        ),
        "twilight/quest": SparsityConfig(
            selector="quest", budget=b0, top_p=p, max_budget=max_budget, page_size=S
        ),
        "twilight/all": SparsityConfig(
            selector="all", budget=ctx, top_p=p, max_budget=max_budget, page_size=S
        ),
    }


def device_memory() -> str:
    """Bytes in use / peak on the first device, for the log (empty where unsupported)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_in_use" not in stats:
        return ""
    gib = 1 << 30
    return (
        f"device memory in use {stats['bytes_in_use'] / gib:.1f} GiB, "
        f"peak {stats.get('peak_bytes_in_use', 0) / gib:.1f} GiB, "
        f"limit {stats.get('bytes_limit', 0) / gib:.1f} GiB"
    )


def _timed(fn, rotating, fixed, flush_bytes=0):
    """benchlib.time_fn, or direct calls where its timed program fails (see run)."""
    try:
        return benchlib.time_fn(fn, rotating, fixed, flush_bytes=flush_bytes)
    except Exception as e:
        print(
            f"  stage program timing failed ({type(e).__name__}); timing direct calls", flush=True
        )
        return benchlib.time_calls(fn, (*rotating[0], *fixed))


def stage_times(q, cache, cfg, top_p, flush_bytes=0):
    """Seconds of each stage of decode_attention, each fed the previous stage's outputs.

    Candidates is a plain dataclass (not a pytree), so it crosses jit boundaries as its arrays.
    """
    layer = 0
    backend = "auto"
    bs = None

    def select(q, cache):
        c = selectors.select_candidates(q, cache, cfg, layer, backend)
        return c.blocks, c.count, c.valid

    def cand_of(blocks, count, valid):
        return selectors.Candidates(blocks, count, valid, bs)

    bs = selectors.select_candidates(q, cache, cfg, layer, backend).block_size
    blocks, count, valid = jax.jit(select)(q, cache)
    cand = cand_of(blocks, count, valid)
    t = {"select": _timed(select, [(q,)], (cache,), flush_bytes)}
    rows = HKV if cfg.gqa == "group_union" else HQ
    if top_p is not None:

        def estimate(q, cache, blocks, count, valid):
            c = cand_of(blocks, count, valid)
            return pruner.estimate_scores(q, cache, layer, c, cfg.estimate_bits, backend)

        logits = jax.jit(estimate)(q, cache, blocks, count, valid)
        t["estimate"] = _timed(estimate, [(q,)], (cache, blocks, count, valid), flush_bytes)
        p = jnp.full((q.shape[0],), top_p, jnp.float32)

        def threshold(logits, blocks, count, valid, p):
            return pruner.prune(logits, cand_of(blocks, count, valid), p, cfg, backend)

        kept_pos, kept_count, _, _ = jax.jit(threshold)(logits, blocks, count, valid, p)
        t["threshold"] = _timed(threshold, [(logits,)], (blocks, count, valid, p), flush_bytes)
        kept_ok = jnp.arange(kept_pos.shape[-1]) < kept_count[..., None]
    else:
        kept_pos = jnp.repeat(cand.positions, rows // HKV, axis=1)
        kept_ok, kept_count = cand.valid, None
    token_pos, counts = pruner.add_forced_tokens(
        kept_pos, kept_ok, cache.lengths, cfg.sink_tokens, cfg.recent_tokens, kept_count=kept_count
    )

    def attend(q, cache, token_pos, counts):
        view = cache.layer_view(layer)
        return sparse_decode_attention(
            q,
            view.k_pages,
            view.v_pages,
            view.page_table,
            token_pos,
            counts,
            backend=backend,
        )

    t["attend"] = _timed(attend, [(q,)], (cache, token_pos, counts), flush_bytes)
    return t, float(jnp.mean(counts))


def run(args):
    peak = benchlib.measure_copy_bandwidth()["peak"]
    print(f"copy bandwidth {peak / 1e12:.2f} TB/s", flush=True)
    table = benchlib.Table(
        [
            "method",
            "quest_metadata",
            "batch",
            "ctx",
            "total_us",
            "vs_cudnn",
            "vs_best_dense",
            "attended",
            "select_us",
            "estimate_us",
            "threshold_us",
            "attend_us",
            "note",
        ]
    )
    key = jax.random.key(0)
    flush = args.flush_l2_mb << 20
    for batch in args.batches:
        for ctx in args.contexts:
            # The cuDNN baseline first, on its own contiguous K/V, freed before the paged
            # cache is built: at batch 64 / 128K both together crowd the device.
            cudnn_t = None
            try:
                kd = jax.random.normal(key, (batch, ctx, HKV, D), DT)
                vd = jax.random.normal(jax.random.fold_in(key, 1), (batch, ctx, HKV, D), DT)
                cudnn_t = benchlib.time_fn(
                    lambda q, k, v: jax.nn.dot_product_attention(
                        q[:, None], k, v, implementation="cudnn"
                    )[:, 0],
                    [(jax.random.normal(key, (batch, HQ, D), DT),)],
                    (kd, vd),
                    label=f"jax cuDNN batch {batch} ctx {ctx}",
                    flush_bytes=flush,
                )
                table.add(
                    method="jax cuDNN dense",
                    batch=batch,
                    ctx=ctx,
                    total_us=cudnn_t * 1e6,
                    vs_cudnn=1.0,
                    attended=ctx,
                )
                del kd, vd
            except Exception as e:
                print(f"FAILED cudnn: {e}", flush=True)
                kd = vd = None  # noqa: F841 (frees them before the cache is built)
            dense_times = [cudnn_t] if cudnn_t else []
            for name, t in benchlib.torch_sdpa_times(batch, HQ, HKV, ctx, D) if args.torch else ():
                dense_times.append(t)
                table.add(
                    method=name,
                    batch=batch,
                    ctx=ctx,
                    total_us=t * 1e6,
                    vs_cudnn=(cudnn_t / t) if cudnn_t else "",
                    attended=ctx,
                )
            try:
                q, cache = planted_problem(
                    jax.random.fold_in(key, batch * 7 + ctx), batch, ctx, args.planted, args.lift
                )
            except Exception as e:
                print(f"FAILED building batch {batch} ctx {ctx}: {e}", flush=True)
                table.add(method="setup", batch=batch, ctx=ctx, note=f"FAILED {type(e).__name__}")
                continue
            b0 = min(args.budget, ctx)
            configs = method_configs(ctx, args.budget, args.p, args.max_budget)
            if ctx > args.all_max_ctx:
                del configs["twilight/all"]
            labels = {
                "dense": "dense (ours)",
                "quest": f"quest B0={b0}",
                "twilight/quest": f"twilight/quest B0={b0} p={args.p}",
                "twilight/all": f"twilight/all p={args.p}",
            }
            # Quest reads the page metadata: one run per form; the others read none of it.
            methods = {}
            for k, cfg in configs.items():
                forms = args.quest_metadata if cfg.selector == "quest" else [None]
                for form in forms:
                    name = labels[k] if len(forms) == 1 else f"{labels[k]} [{form}]"
                    methods[name] = (cfg, cfg.top_p, form)
            caches = {None: cache}
            for form in args.quest_metadata:
                caches[form] = cache.with_quest_metadata(form)  # shares the pages
            for name, (cfg, top_p, form) in methods.items():
                cache = caches[form]
                print(f"[{name} batch {batch} ctx {ctx}] {device_memory()}", flush=True)
                try:

                    def op(q, cache, cfg=cfg):
                        return decode_attention(q, cache, cfg)[0]

                    note = ""
                    try:
                        total = benchlib.time_fn(
                            op,
                            [(q,)],
                            (cache,),
                            label=f"{name} batch {batch} ctx {ctx}",
                            flush_bytes=flush,
                        )
                    except Exception as e:
                        # At batch 64 / 128K the timed program asks for a ~49 GiB buffer its
                        # memory analysis does not show; time plain calls instead.
                        print(
                            f"[{name} batch {batch} ctx {ctx}] program timing failed "
                            f"({type(e).__name__}: {str(e)[:200]}); timing direct calls",
                            flush=True,
                        )
                        total = benchlib.time_calls(op, (q, cache))
                        note = "direct calls (timed program out of memory)"
                    row = dict(
                        method=name,
                        quest_metadata=form or "",
                        batch=batch,
                        ctx=ctx,
                        total_us=total * 1e6,
                        vs_cudnn=(cudnn_t / total) if cudnn_t else "",
                        note=note,
                    )
                    if cfg.selector == "dense":
                        row["attended"] = ctx
                        dense_times.append(total)
                    if dense_times:  # every dense time comes before the sparse methods'
                        row["vs_best_dense"] = min(dense_times) / total
                    if cfg.selector != "dense":
                        try:
                            st, attended = stage_times(q, cache, cfg, top_p, flush)
                            row["attended"] = attended
                            row.update({f"{k}_us": v * 1e6 for k, v in st.items()})
                        except Exception as e:  # keep the total even if a stage fails
                            row["note"] = f"{note} stages FAILED {type(e).__name__}: {str(e)[:80]}"
                            traceback.print_exc(limit=4)
                    table.add(**row)
                except Exception as e:
                    # The whole message: an allocation failure names the buffer and its size.
                    print(
                        f"FAILED {name} batch {batch} ctx {ctx}: {type(e).__name__}: "
                        f"{str(e)[:3000]}\n  {device_memory()}",
                        flush=True,
                    )
                    traceback.print_exc(limit=4)
                    table.add(method=name, batch=batch, ctx=ctx, note=f"FAILED {type(e).__name__}")
            del q, cache, caches
            table.save(args.out, {"partial": "written after each (batch, context)"})
    meta = benchlib.device_meta()
    meta.update(
        copy_TBps=round(peak / 1e12, 3),
        planted=args.planted,
        lift=args.lift,
        p=args.p,
        budget=args.budget,
        max_budget=args.max_budget,
        flush_l2_mb=args.flush_l2_mb,
        quest_metadata=args.quest_metadata,
        command="python scripts/bench_attention.py " + " ".join(sys.argv[1:]),
    )
    table.save(args.out, meta)
    print("\n" + table.text())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--budget", type=int, default=8192, help="B0 for Quest")
    ap.add_argument("--max-budget", type=int, default=4096, help="selection capacity")
    ap.add_argument("--p", type=float, default=0.85)
    ap.add_argument("--no-torch", dest="torch", action="store_false", help="no torch SDPA rows")
    ap.add_argument("--planted", type=float, default=0.015)
    ap.add_argument("--lift", type=float, default=7.0)
    ap.add_argument(
        "--all-max-ctx",
        type=int,
        default=131072,
        help="skip Twilight over all above this context (its top-p rows hold every token; "
        "above TopPGpuConfig.max_cols = 32768 they take the compacting top-p kernel)",
    )
    ap.add_argument(
        "--quest-metadata",
        nargs="+",
        choices=("int8", "native"),
        default=["int8"],
        help="forms of Quest's page metadata to time the Quest methods with, each a row "
        "(default: int8, the cache's default)",
    )
    ap.add_argument(
        "--flush-l2-mb",
        type=int,
        default=0,
        help="read a buffer of this many MB after every timed jax call and subtract that "
        "read's time (benchlib.time_fn): no call finds the last one's data in the L2 cache, "
        "as in a decode step where the other layers run in between. The torch rows are not "
        "flushed (dense reads that outgrow the L2 several times over)",
    )
    ap.add_argument("--out", default="docs/results/attention")
    args = ap.parse_args()
    if jax.default_backend() != "gpu":
        sys.exit(f"bench_attention.py needs a GPU (backend is {jax.default_backend()!r})")
    run(args)


if __name__ == "__main__":
    main()

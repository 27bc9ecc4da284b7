"""Times the decode-path Pallas kernels at LLaMA-3.1-8B attention shapes on a GPU.

32 query heads, 8 KV heads, head_dim 128, bf16, page size 16; batch 1, 16, 64 and context 8K,
32K, 128K. (The cache's decode append is timed inside the model step: scripts/bench_decode_step.py.)
For each kernel: time per call, the bytes it must move (each input read once, each
output written once), achieved TB/s and the fraction of the copy bandwidth measured in the same
run. Dense decode is compared with jax cuDNN `dot_product_attention` and, where torch is
importable, torch SDPA, on the same shapes.

    python scripts/bench_kernels.py --out docs/results/kernels
"""

from __future__ import annotations

import argparse
import math
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import benchlib
from pallas_kernels import attention, quest, spgemv, topk, topp

HQ, HKV, D, S = 32, 8, 128, 16
G = HQ // HKV
DT = jnp.bfloat16
MIN_POOL_BYTES = 1 << 30  # the page pool is at least this large so repeated calls miss L2
N_ROT = 4  # input sets rotated through inside one timed program


# Variants timed with --sweep. The defaults were tuned at batch 64 (docs/results/
# kernels-sweep*-h200.md); these ask what small batches (4-8 sequences: 32-64 (sequence, KV
# head) rows) want: larger tiles and fewer, longer-looping programs.
SPGEMV_SWEEP = [
    spgemv.SpGEMVGpuConfig(num_stages=1),
    spgemv.SpGEMVGpuConfig(num_stages=3),
    spgemv.SpGEMVGpuConfig(tokens_per_chunk=64, target_programs=8192),
    spgemv.SpGEMVGpuConfig(tokens_per_chunk=256),
    spgemv.SpGEMVGpuConfig(tokens_per_chunk=256, num_warps=8),
    spgemv.SpGEMVGpuConfig(target_programs=2048),
    spgemv.SpGEMVGpuConfig(target_programs=16384),
]
QUEST_SWEEP = [
    quest.QuestGpuConfig(pages_per_block=32),
    quest.QuestGpuConfig(pages_per_block=128, num_warps=8),
    # Pallas Mosaic GPU: page rows by TMA (pallas_kernels/quest_mgpu.py), opt-in.
    quest.QuestGpuConfig(pages_per_block=64, lowering="mosaic"),
]
ATTN_SWEEP = [
    attention.AttentionGpuConfig(block_tokens=128, num_warps=8, num_stages=3, target_programs=2048),
]
TOPP_SWEEP = [
    topp.TopPGpuConfig(compact_min_rows=1),  # the compacting kernel at any row count
    topp.TopPGpuConfig(compact_min_rows=1 << 30),  # the row-resident pair
    # The compacting kernel compacting again after 0 (never), 1 and 4 bisection steps
    # (the default: 2).
    *(topp.TopPGpuConfig(compact_min_rows=1, narrow_after=k) for k in (0, 1, 4)),
]


def make_pool(key, batch, ctx):
    """A random paged cache big enough for batch x ctx tokens and at least MIN_POOL_BYTES."""
    pages_per_seq = ctx // S
    need = batch * pages_per_seq
    page_bytes = HKV * S * D * 2 * 2
    pool = max(need, math.ceil(MIN_POOL_BYTES / page_bytes)) + 1
    ks = jax.random.split(key, 6)
    k_pages = jax.random.normal(ks[0], (HKV, pool, S, D), DT)
    v_pages = jax.random.normal(ks[1], (HKV, pool, S, D), DT)
    k_int4 = jax.random.randint(ks[2], (HKV, pool, S, D // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    k_scale = jax.random.uniform(ks[3], (HKV, pool, S), jnp.float32, 0.01, 0.1)
    k_zero = -8 * k_scale
    k_min = jnp.minimum(k_pages.min(axis=2), 0).astype(DT)
    k_max = jnp.maximum(k_pages.max(axis=2), 0).astype(DT)
    k_min_q, k_max_q, k_mm_scale = quest.quantize_page_bounds(k_min, k_max)
    tables = []
    for r in range(N_ROT):
        perm = jax.random.permutation(jax.random.fold_in(ks[4], r), pool - 1)[:need] + 1
        tables.append(perm.reshape(batch, pages_per_seq).astype(jnp.int32))
    pool_arrays = dict(
        k_pages=k_pages,
        v_pages=v_pages,
        k_int4=k_int4,
        k_scale=k_scale,
        k_zero=k_zero,
        k_min=k_min,
        k_max=k_max,
        k_min_q=k_min_q,
        k_max_q=k_max_q,
        k_mm_scale=k_mm_scale,
    )
    return pool_arrays, tables


def queries(key, batch):
    return [jax.random.normal(jax.random.fold_in(key, r), (batch, HQ, D), DT) for r in range(N_ROT)]


def bench_config(batch, ctx, args, key, peak, record, attempt):
    """Runs every kernel benchmark for one (batch, context) and records the rows."""
    pool, tables = make_pool(jax.random.fold_in(key, batch * 1000 + ctx), batch, ctx)
    qs = queries(key, batch)
    lengths = jnp.full((batch,), ctx, jnp.int32)
    pps = ctx // S
    kv_bytes = 2 * batch * HKV * ctx * D * 2
    q_bytes = 2 * batch * HQ * D * 2  # q in, out back

    # Dense paged decode attention.
    def dense(config=None, name="dense_paged_attention"):
        t = benchlib.time_fn(
            lambda q, pt, kp, vp: attention.paged_decode_attention(
                q, kp, vp, pt, lengths, backend="pallas", config=config
            ),
            list(zip(qs, tables)),
            (pool["k_pages"], pool["v_pages"]),
        )
        record(name, batch, ctx, f"{ctx} tok", t, kv_bytes + q_bytes, str(config or ""))

    attempt("dense_paged_attention", dense)
    if args.sweep:
        for cfg in ATTN_SWEEP:
            attempt("dense_sweep", lambda cfg=cfg: dense(cfg, "dense_sweep"))

    # jax cuDNN dense attention on contiguous [B, T, Hkv, D].
    def cudnn():
        kd = jax.random.normal(key, (batch, ctx, HKV, D), DT)
        vd = jax.random.normal(jax.random.fold_in(key, 1), (batch, ctx, HKV, D), DT)

        def f(q, k, v):
            return jax.nn.dot_product_attention(q[:, None], k, v, implementation="cudnn")[:, 0]

        t = benchlib.time_fn(f, [(q,) for q in qs], (kd, vd))
        record(
            "jax_cudnn_dense",
            batch,
            ctx,
            f"{ctx} tok",
            t,
            kv_bytes + q_bytes,
            "contiguous K/V",
        )
        del kd, vd

    attempt("jax_cudnn_dense", cudnn)

    if args.torch:

        def torch_sdpa():
            for name, t in benchlib.torch_sdpa_times(batch, HQ, HKV, ctx, D):
                record("torch_sdpa_dense", batch, ctx, f"{ctx} tok", t, kv_bytes + q_bytes, name)

        attempt("torch_sdpa_dense", torch_sdpa)

    # Sparse decode attention over token lists of a few lengths.
    for n_tok in sorted({min(8192, ctx), 512}):

        def sparse(n_tok=n_tok, config=None, name="sparse_attention"):
            rng = np.random.default_rng(n_tok)
            pos = np.sort(
                np.stack([rng.choice(ctx, n_tok, replace=False) for _ in range(batch * HKV)]),
                axis=-1,
            )
            pos = jnp.asarray(pos.reshape(batch, HKV, n_tok), jnp.int32)
            counts = jnp.full((batch, HKV), n_tok, jnp.int32)
            t = benchlib.time_fn(
                lambda q, pt, kp, vp: attention.sparse_decode_attention(
                    q, kp, vp, pt, pos, counts, backend="pallas", config=config
                ),
                list(zip(qs, tables)),
                (pool["k_pages"], pool["v_pages"]),
            )
            nbytes = 2 * batch * HKV * n_tok * D * 2 + q_bytes + pos.size * 4
            record(name, batch, ctx, f"{n_tok} tok", t, nbytes, str(config or ""))

        attempt("sparse_attention", sparse)
        if args.sweep:
            for cfg in ATTN_SWEEP:
                attempt(
                    "sparse_sweep",
                    lambda cfg=cfg, n_tok=n_tok: sparse(n_tok, cfg, "sparse_sweep"),
                )

    # Block SpGEMV over B0 = min(8192, ctx) candidate tokens (whole pages).
    b0 = min(8192, ctx)
    n_cand = b0 // S
    rng = np.random.default_rng(1)
    cand = np.sort(
        np.stack([rng.choice(pps, n_cand, replace=False) for _ in range(batch * HKV)]),
        axis=-1,
    )
    cand = jnp.asarray(cand.reshape(batch, HKV, n_cand), jnp.int32)
    cand_count = jnp.full((batch, HKV), n_cand, jnp.int32)

    def spg(config=None, name="block_spgemv"):
        t = benchlib.time_fn(
            lambda q, pt, k4, sc, zr: spgemv.block_spgemv(
                q,
                k4,
                sc,
                zr,
                pt,
                lengths,
                cand,
                cand_count,
                block_size=S,
                backend="pallas",
                config=config,
            ),
            list(zip(qs, tables)),
            (pool["k_int4"], pool["k_scale"], pool["k_zero"]),
        )
        nbytes = (
            batch * HKV * b0 * (D // 2 + 8)
            + cand.size * 4
            + batch * HQ * D * 2
            + batch * HQ * b0 * 4
        )
        record(name, batch, ctx, f"{b0} cand", t, nbytes, str(config or ""))

    attempt("block_spgemv", spg)

    # Top-p over the B0 estimated logits, GQA groups of G heads, union selection.
    def tp(config=None, name="topp_select_grouped"):
        # Peaked rows like real heads: 1.5% of the columns planted 8 above unit noise, so
        # p = 0.85 keeps about 1-3% of the candidates (no saturation at capacity 2048).
        def planted(r):
            k1, k2 = jax.random.split(jax.random.fold_in(key, r))
            noise = jax.random.normal(k1, (batch * HKV, G, b0), jnp.float32)
            heavy = jax.random.uniform(k2, (batch * HKV, 1, b0)) < 0.015
            return (noise + 8.0 * heavy,)

        logit_sets = [planted(r) for r in range(N_ROT)]
        valid = jnp.ones((batch * HKV, b0), bool)
        p = jnp.full((batch * HKV,), 0.85, jnp.float32)
        cap = 2048
        t = benchlib.time_fn(
            lambda lg, v, pp: topp.topp_select_grouped(
                lg, v, pp, cap, backend="pallas", config=config
            ),
            logit_sets,
            (valid, p),
        )
        read_once = batch * HQ * b0 * 4 + batch * HKV * b0
        nbytes = read_once + batch * HKV * (cap * 4 + 8)
        record(
            name,
            batch,
            ctx,
            f"{b0} x G{G}",
            t,
            nbytes,
            f"read-once floor {read_once / peak * 1e6:.1f} us {config or ''}",
        )

    attempt("topp_select_grouped", tp)
    if args.sweep:
        for cfg in SPGEMV_SWEEP:
            attempt("block_spgemv_sweep", lambda cfg=cfg: spg(cfg, "block_spgemv_sweep"))
        for cfg in TOPP_SWEEP:
            attempt("topp_sweep", lambda cfg=cfg: tp(cfg, "topp_sweep"))

    # Quest page scores over every page of the context: bf16 min / max (2 * D * 2 bytes a page
    # and KV head), or int8 codes and a float32 scale (2 * D + 4).
    def qs_scores(config=None, name="quest_page_scores", int8=False):
        if int8:
            meta = (pool["k_min_q"], pool["k_max_q"], pool["k_mm_scale"])
            meta_bytes = 2 * D + 4
        else:
            meta = (pool["k_min"], pool["k_max"], None)
            meta_bytes = 2 * D * 2
        t = benchlib.time_fn(
            lambda q, pt, kmin, kmax, scale: quest.quest_page_scores(
                q, kmin, kmax, pt, lengths, scale=scale, backend="pallas", config=config
            ),
            list(zip(qs, tables)),
            meta,
        )
        nbytes = (
            batch * HKV * pps * meta_bytes
            + batch * pps * 4
            + batch * HQ * D * 2
            + batch * HQ * pps * 4
        )
        record(name, batch, ctx, f"{pps} pages", t, nbytes, str(config or ""))

    # Quest's page top-k: the B0 / S best of each (sequence, KV head) row of page scores.
    def page_topk():
        k = b0 // S
        rows = batch * HKV
        score_sets = [
            (jax.random.normal(jax.random.fold_in(key, 7 + i), (rows, pps), jnp.float32),)
            for i in range(N_ROT)
        ]
        t = benchlib.time_fn(lambda x: topk.topk_ids(x, k, backend="pallas"), score_sets, ())
        record("topk_ids", batch, ctx, f"{rows} x {pps} pages, k {k}", t, rows * (pps + k) * 4, "")

    attempt("topk_ids", page_topk)
    attempt("quest_page_scores", qs_scores)
    attempt("quest_page_scores_int8", lambda: qs_scores(name="quest_page_scores_int8", int8=True))
    if args.sweep:
        for cfg in QUEST_SWEEP:
            attempt("quest_sweep", lambda cfg=cfg: qs_scores(cfg, "quest_sweep"))
            attempt("quest_sweep_int8", lambda cfg=cfg: qs_scores(cfg, "quest_sweep_int8", True))


def run(args):
    bw = benchlib.measure_copy_bandwidth()
    peak = bw["peak"]
    print(
        "measured copy bandwidth (TB/s): "
        + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in bw.items()),
        flush=True,
    )
    table = benchlib.Table(
        ["kernel", "batch", "ctx", "work", "time_us", "MB", "TB/s", "%peak", "note"]
    )

    def record(kernel, batch, ctx, work, seconds, nbytes, note=""):
        table.add(
            kernel=kernel,
            batch=batch,
            ctx=ctx,
            work=work,
            time_us=seconds * 1e6,
            MB=nbytes / 1e6,
            **{"TB/s": nbytes / seconds / 1e12, "%peak": 100 * nbytes / seconds / peak},
            note=note,
        )

    def attempt(name, fn):
        if args.kernels and not any(name.startswith(k) for k in args.kernels):
            return
        try:
            fn()
        except Exception as e:  # a failing case is reported, the rest still run
            print(f"FAILED {name}: {type(e).__name__}: {str(e)[:400]}", flush=True)
            traceback.print_exc(limit=3)
            table.add(kernel=name, note=f"FAILED {type(e).__name__}")

    key = jax.random.key(0)
    for batch in args.batches:
        for ctx in args.contexts:
            bench_config(batch, ctx, args, key, peak, record, attempt)
    meta = benchlib.device_meta()
    meta.update({f"copy_TBps_{k}": round(v / 1e12, 3) for k, v in bw.items()})
    meta["command"] = "python scripts/bench_kernels.py " + " ".join(sys.argv[1:])
    table.save(args.out, meta)
    print("\n" + table.text())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--no-torch", dest="torch", action="store_false")
    ap.add_argument("--sweep", action="store_true", help="also time config variants")
    ap.add_argument(
        "--kernels",
        nargs="+",
        default=[],
        help="only the kernels whose row names start with one of these (e.g. block_spgemv)",
    )
    ap.add_argument("--out", default="docs/results/kernels")
    args = ap.parse_args()
    if jax.default_backend() != "gpu":
        sys.exit(
            f"bench_kernels.py needs a GPU (jax.default_backend() is {jax.default_backend()!r})"
        )
    run(args)


if __name__ == "__main__":
    main()

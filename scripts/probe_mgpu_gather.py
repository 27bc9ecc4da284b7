"""Probe (GPU): how fast Pallas Mosaic GPU moves the SpGEMV's candidate pages by TMA.

The Triton SpGEMV gathers each candidate token's INT4 row (64 bytes at head_dim 128) with
per-thread vector loads and is bound by instruction issue, not bytes (docs/kernels.md): 129.6 us
for its 371 MB at batch 64 / 32K, 67% of the copy bandwidth. In the paged INT4 pool
[Hkv, P, S, D/2] one page of one KV head is a contiguous S x D/2 = 1 KB block, so a Mosaic GPU
kernel could move each candidate page with one TMA copy instead (the Quest kernel's TMAs moved
128-256 bytes each and were bound by their count, 2.5 TB/s). Before a whole kernel is built, this
measures the gather alone: programs of `--pages` candidate pages each (grid B x Hkv x C/pages)
copy their pages by TMA into shared memory and wait on one barrier; each writes its last page
back out, which the script checks against XLA's gather. A second variant also loads every page
into registers and unpacks and sums its nibbles (the work a SpGEMV does before its dots),
checked against XLA's sums; a third (`gather_dot`) runs a SpGEMV's whole data path: 16 token
rows a page by TMA, 64 tokens at a time into registers, each of the 8 nibble blocks to bf16
and through a WGMMA with the q columns of that block (the G heads padded to N = 64), summed
over the heads per token and checked against XLA. The Triton SpGEMV at the same point runs
beside them, in the same process, with the same device timing (benchlib.time_fn).

    python scripts/probe_mgpu_gather.py --batches 64 8 --pages 32 64
    python scripts/probe_mgpu_gather.py --check   # lowering only, no GPU needed

Bytes: the candidate pages' INT4 rows (B x Hkv x C x 1 KB); the Triton row adds its scales,
zeros and logits as it reads and writes them.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

import benchlib
from pallas_kernels import spgemv

HKV, G, D, S = 8, 4, 128, 16
_GRID = ("b", "g", "t")
_OUT_KW = "out_type" if "out_type" in inspect.signature(plgpu.kernel).parameters else "out_shape"


def _kernel(phys_hbm, k_hbm, o_hbm, *sums_hbm, pages):
    """phys_hbm [B, Hkv, C] int32 physical page of each candidate; k_hbm [Hkv, P, W] uint32,
    a page's rows as W = S * D / 8 words (one 1 KB TMA each); o_hbm [B, Hkv, C / pages, W]:
    each program's last page, copied back out so the result can be checked; with unpack,
    sums_hbm [B, Hkv, C] float32: each page's sum of nibbles, from registers."""
    page_words = k_hbm.shape[-1]
    scratch = [
        plgpu.SMEM((pages,), jnp.int32),
        plgpu.SMEM((pages, page_words), jnp.uint32),
        plgpu.Barrier(num_arrivals=1),
        plgpu.Barrier(num_arrivals=pages),
    ]
    if sums_hbm:
        scratch.append(plgpu.SMEM((pages,), jnp.float32))
    pl.run_scoped(functools.partial(_tile, phys_hbm, k_hbm, o_hbm, sums_hbm, pages), *scratch)


def _tile(phys_hbm, k_hbm, o_hbm, sums_hbm, pages, ids, rows, ids_bar, rows_bar, *sums):
    b, g, t = (jax.lax.axis_index(n) for n in _GRID)
    tile = pl.ds(t * pages, pages)
    plgpu.copy_gmem_to_smem(phys_hbm.at[b, g, tile], ids, ids_bar)
    plgpu.barrier_wait(ids_bar)
    for i in range(pages):  # every page's copy in flight before one wait
        plgpu.copy_gmem_to_smem(k_hbm.at[g, pl.ds(ids[i], 1)], rows.at[pl.ds(i, 1)], rows_bar)
    plgpu.barrier_wait(rows_bar)
    if sums_hbm:
        # The unpack a SpGEMV would do before its dots: every nibble of 64 pages at a time
        # from shared memory into registers (WGMMA layout, rows = pages; optimized=False: rows
        # filled by TMA without a swizzle), summed per page.
        for r in range(pages // 64):
            w = plgpu.load(
                rows.at[pl.ds(r * 64, 64)], (), layout=plgpu.Layout.WGMMA, optimized=False
            )
            # Division and remainder by powers of two: Pallas Mosaic GPU (jax 0.10.1) lowers
            # neither shift on arrays (the compiler turns these into shifts and masks).
            nibbles = [((w // 16**k) % 16).astype(jnp.float32) for k in range(8)]
            total = nibbles[0]
            for n in nibbles[1:]:
                total = total + n
            sums[0][pl.ds(r * 64, 64)] = jnp.sum(total, axis=1)
    # The copies are asynchronous side effects: nothing can drop them. One page goes back out
    # (0.1-1% of the bytes) so a wrong gather shows.
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(rows.at[pl.ds(pages - 1, 1)], o_hbm.at[b, g, pl.ds(t, 1)])
    if sums_hbm:
        plgpu.copy_smem_to_gmem(sums[0], sums_hbm[0].at[b, g, tile])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("pages", "unpack"))
def gather_pages(phys, k_int4, *, pages, unpack=False):
    """phys [B, Hkv, C] int32, k_int4 [Hkv, P, S, D/2] uint8 -> [B, Hkv, C / pages, S * D/2]
    uint8: the last page of each program's tile (the pages themselves land in shared memory);
    with unpack, also [B, Hkv, C] float32, each candidate page's sum of nibbles."""
    batch, hkv, num_cand = phys.shape
    if num_cand % pages or (unpack and pages % 64):
        raise ValueError(
            f"--pages must divide C={num_cand} (and be a multiple of 64 with --unpack), got {pages}"
        )
    # Free in XLA: a page's rows are contiguous, viewed as 4-byte words (a TMA box holds at
    # most 256 elements a dimension: 1 KB is 256 words).
    words = k_int4.reshape(hkv, k_int4.shape[1], -1, 4)
    words = jax.lax.bitcast_convert_type(words, jnp.uint32)
    tiles = num_cand // pages
    out_types = [jax.ShapeDtypeStruct((batch, hkv, tiles, words.shape[-1]), jnp.uint32)]
    if unpack:
        out_types.append(jax.ShapeDtypeStruct((batch, hkv, num_cand), jnp.float32))
    outs = plgpu.kernel(
        functools.partial(_kernel, pages=pages),
        **{_OUT_KW: out_types},
        grid=(batch, hkv, tiles),
        grid_names=_GRID,
        compiler_params=plgpu.CompilerParams(),
    )(phys, words)
    last = jax.lax.bitcast_convert_type(outs[0], jnp.uint8).reshape(batch, hkv, tiles, -1)
    return (last, outs[1]) if unpack else last


# The nibble blocks of a token row's 16 words: byte k of word w holds dims 4w + k (low
# nibble) and 64 + 4w + k (high nibble); block 2k + half is [tokens, 16] over w.
_BLOCKS = [(k, half) for k in range(4) for half in (0, 1)]
_HEADS_PAD = 64  # the dot's N: the G query heads padded to WGMMA's 128-byte swizzled tile


def _dot_kernel(phys_hbm, k_hbm, qb_hbm, o_hbm, *, pages):
    """phys_hbm [B, Hkv, C] int32; k_hbm [Hkv, P * S, 16] uint32 (a token's 64 bytes as 16
    words); qb_hbm [B, Hkv, 8, 16, 64] bf16, the q columns of each nibble block, heads padded
    to 64; o_hbm [B, Hkv, C * S] float32: each token's logits summed over the heads."""
    tokens = pages * S
    tiled = (plgpu.TilingTransform((8, 16)), plgpu.SwizzleTransform(32))
    pl.run_scoped(
        functools.partial(_dot_tile, phys_hbm, k_hbm, qb_hbm, o_hbm, pages),
        plgpu.SMEM((pages,), jnp.int32),
        plgpu.SMEM((tokens, 16), jnp.uint32),
        plgpu.SMEM((8, 16, _HEADS_PAD), jnp.bfloat16, transforms=tiled),
        plgpu.SMEM((tokens,), jnp.float32),
        plgpu.Barrier(num_arrivals=1 + len(_BLOCKS)),
        plgpu.Barrier(num_arrivals=pages),
    )


def _dot_tile(phys_hbm, k_hbm, qb_hbm, o_hbm, pages, ids, rows, qb, sums, head_bar, rows_bar):
    b, g, t = (jax.lax.axis_index(n) for n in _GRID)
    tokens = pages * S
    plgpu.copy_gmem_to_smem(phys_hbm.at[b, g, pl.ds(t * pages, pages)], ids, head_bar)
    for j in range(len(_BLOCKS)):  # one copy a block: a tiled [8, 16, 64] copy has too
        plgpu.copy_gmem_to_smem(qb_hbm.at[b, g, j], qb.at[j], head_bar)  # many strides
    plgpu.barrier_wait(head_bar)
    for i in range(pages):  # a page is S token rows of 16 words: one 1 KB copy
        src = k_hbm.at[g, pl.ds(ids[i] * S, S)]
        plgpu.copy_gmem_to_smem(src, rows.at[pl.ds(i * S, S)], rows_bar)
    plgpu.barrier_wait(rows_bar)
    for c in range(tokens // 64):
        words = plgpu.load(
            rows.at[pl.ds(c * 64, 64)], (), layout=plgpu.Layout.WGMMA, optimized=False
        )

        def dots(acc_ref, words=words):
            for j, (k, half) in enumerate(_BLOCKS):
                # Division and remainder, not shifts (see the gather's unpack).
                nib = (words // 2 ** (8 * k + 4 * half)) % 16
                plgpu.wgmma(acc_ref, nib.astype(jnp.bfloat16), qb.at[j])
            return acc_ref[...]

        acc = pl.run_scoped(dots, plgpu.ACC((64, _HEADS_PAD), jnp.float32))
        sums[pl.ds(c * 64, 64)] = jnp.sum(acc, axis=1)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(sums, o_hbm.at[b, g, pl.ds(t * tokens, tokens)])
    plgpu.wait_smem_to_gmem(0)


def q_blocks(q):
    """q [B, Hkv * G, D] -> [B, Hkv, 8, 16, 64] bf16: per nibble block (see _BLOCKS) its 16 q
    columns as rows, the G heads as the first columns of 64."""
    batch = q.shape[0]
    qg = q.reshape(batch, HKV, G, D).astype(jnp.bfloat16)
    w = np.arange(16)
    cols = np.stack([half * (D // 2) + 4 * w + k for k, half in _BLOCKS])  # [8, 16]
    qb = jnp.transpose(qg[:, :, :, cols], (0, 1, 3, 4, 2))  # [B, Hkv, 8, 16, G]
    return jnp.pad(qb, ((0, 0), (0, 0), (0, 0), (0, 0), (0, _HEADS_PAD - G)))


@functools.partial(jax.jit, static_argnames=("pages",))
def gather_dot(phys, k_int4, q, *, pages):
    """The gather, the unpack and the tensor-core dots of a SpGEMV: [B, Hkv, C * S] float32,
    each candidate token's q . nibbles summed over the group's heads (no scale, zero or mask:
    what it measures is the data path)."""
    batch, hkv, num_cand = phys.shape
    if num_cand % pages or (pages * S) % 64:
        raise ValueError(f"--pages must divide C={num_cand} and hold 64 tokens, got {pages}")
    words = k_int4.reshape(hkv, k_int4.shape[1] * S, D // 8, 4)  # free: 16 words a token
    words = jax.lax.bitcast_convert_type(words, jnp.uint32)
    return plgpu.kernel(
        functools.partial(_dot_kernel, pages=pages),
        **{_OUT_KW: jax.ShapeDtypeStruct((batch, hkv, num_cand * S), jnp.float32)},
        grid=(batch, hkv, num_cand // pages),
        grid_names=_GRID,
        compiler_params=plgpu.CompilerParams(),
    )(phys, words, q_blocks(q))


def problem(key, batch, ctx, num_cand):
    """Random INT4 pool, page tables and candidate pages (a Quest-like choice per KV head)."""
    pages_per_seq = ctx // S
    num_pages = batch * pages_per_seq + 1
    k1, k2, k3, k4 = jax.random.split(key, 4)
    k_int4 = jax.random.randint(k1, (HKV, num_pages, S, D // 2), 0, 256, jnp.int32).astype(
        jnp.uint8
    )
    table = jax.random.permutation(k2, num_pages - 1)[: batch * pages_per_seq] + 1
    table = table.reshape(batch, pages_per_seq).astype(jnp.int32)
    scores = jax.random.uniform(k3, (batch, HKV, pages_per_seq))
    cand = jnp.sort(jax.lax.top_k(scores, num_cand)[1], axis=-1).astype(jnp.int32)
    phys = jnp.take_along_axis(table[:, None, :], cand, axis=2)
    q = jax.random.normal(k4, (batch, HKV * G, D), jnp.bfloat16)
    scale = jnp.ones((HKV, num_pages, S), jnp.float32)
    lengths = jnp.full((batch,), ctx, jnp.int32)
    return q, k_int4, scale, table, lengths, cand, phys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 8])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--budget", type=int, default=8192, help="candidate tokens (B0)")
    ap.add_argument("--pages", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--check", action="store_true", help="lower for CUDA only (no GPU needed)")
    ap.add_argument(
        "--no-unpack",
        action="store_true",
        help="skip the variant that also unpacks every nibble into registers",
    )
    args = ap.parse_args(argv)
    num_cand = args.budget // S
    if args.check:
        for pages in args.pages:
            shapes = jax.eval_shape(
                lambda k: problem(k, 2, 4096, 256), jax.random.key(0)
            )  # small: lowering only
            phys, k_int4 = shapes[6], shapes[1]
            for unpack in (False, True) if pages % 64 == 0 else (False,):
                fn = functools.partial(gather_pages, pages=pages, unpack=unpack)
                exp = jax.export.export(jax.jit(fn), platforms=["cuda"])(phys, k_int4)
                assert "mosaic_gpu" in exp.mlir_module()
                print(f"pages={pages} unpack={unpack}: lowers for CUDA")
            fn = functools.partial(gather_dot, pages=pages)
            exp = jax.export.export(jax.jit(fn), platforms=["cuda"])(phys, k_int4, shapes[0])
            assert "mosaic_gpu" in exp.mlir_module()
            print(f"pages={pages} dots: lowers for CUDA")
        return 0
    bw = benchlib.measure_copy_bandwidth()["peak"]
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    for batch in args.batches:
        q, k_int4, scale, table, lengths, cand, phys = problem(
            jax.random.key(batch), batch, args.context, num_cand
        )
        page_bytes = batch * HKV * num_cand * S * D // 2
        # The right answers: each candidate page's sum of nibbles, and the last candidate page
        # of every tile, from XLA.
        pages_bytes = k_int4[jnp.arange(HKV)[None, :, None], phys]  # [B, Hkv, C, S, D/2]
        want_sums = np.asarray(
            ((pages_bytes & 15) + (pages_bytes >> 4)).astype(jnp.float32).sum((-1, -2))
        )
        for pages in args.pages:
            want = np.asarray(pages_bytes[:, :, pages - 1 :: pages]).reshape(
                batch, HKV, -1, S * D // 2
            )
            unpacks = (False,) if args.no_unpack or pages % 64 else (False, True)
            for unpack in unpacks:
                fn = functools.partial(gather_pages, pages=pages, unpack=unpack)
                try:
                    out = fn(phys, k_int4)
                    last, sums = out if unpack else (out, None)
                    ok = np.array_equal(np.asarray(last), want)
                    if unpack:
                        ok = ok and np.array_equal(np.asarray(sums), want_sums)
                    t = benchlib.time_fn(lambda p, k, fn=fn: fn(p, k), [(phys,)], (k_int4,))
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"batch {batch} pages {pages} unpack {unpack}: FAILED {e!r}"[:600])
                    continue
                what = "gather + unpack" if unpack else "gather"
                print(
                    f"batch {batch} Mosaic TMA {what}, {pages} pages a program: "
                    f"{t * 1e6:8.1f} us {page_bytes / t / 1e12:5.2f} TB/s "
                    f"({page_bytes / t / bw:4.0%} of copy) {'correct' if ok else 'WRONG'}",
                    flush=True,
                )
            # The whole data path of a SpGEMV: gather, unpack, tensor-core dots (bf16 q and
            # nibbles are exact; float32 sums in another order than XLA's).
            qsum = q.astype(jnp.float32).reshape(batch, HKV, G, D).sum(2)
            nib = jnp.concatenate([pages_bytes & 15, pages_bytes >> 4], axis=-1)
            want_dots = np.asarray(
                jnp.einsum("bgcsd,bgd->bgcs", nib.astype(jnp.float32), qsum)
            ).reshape(batch, HKV, -1)
            fn = functools.partial(gather_dot, pages=pages)
            try:
                got = np.asarray(fn(phys, k_int4, q))
                ok = np.allclose(got, want_dots, rtol=1e-5, atol=1e-3)
                t = benchlib.time_fn(
                    lambda q, p, k, fn=fn: fn(p, k, q), [(q,), (q * -1,)], (phys, k_int4)
                )
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"batch {batch} pages {pages} dots: FAILED {e!r}"[:600])
                continue
            print(
                f"batch {batch} Mosaic TMA gather + unpack + WGMMA, {pages} pages a program: "
                f"{t * 1e6:8.1f} us {page_bytes / t / 1e12:5.2f} TB/s "
                f"({page_bytes / t / bw:4.0%} of copy) {'correct' if ok else 'WRONG'}",
                flush=True,
            )
        zero = jnp.zeros_like(scale)
        t = benchlib.time_fn(
            lambda q, k, s, z, pt, ln, c: spgemv.block_spgemv(
                q, k, s, z, pt, ln, c, None, block_size=S, backend="pallas"
            ),
            [(q,), (q * -1,)],
            (k_int4, scale, zero, table, lengths, cand),
        )
        print(
            f"batch {batch} Triton SpGEMV (unpack, dots, logits):      {t * 1e6:8.1f} us "
            f"{page_bytes / t / 1e12:5.2f} TB/s of INT4 rows",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Quest page scores on Hopper GPUs in Pallas Mosaic GPU (semantics: pallas_kernels.quest).

Why a second GPU kernel: the Triton one gathers each page's min/max rows with masked vector
loads, and is bound by their latency (docs/kernels.md).
Here every row moves by TMA, a bulk copy at a dynamic offset that the issuing thread does not
wait on, so a program puts all its pages' rows in flight at once and waits on one barrier.

Grid (B, Hkv, tiles of ``pages_per_block`` pages), one warpgroup per program:

1. TMA the tile's page-table entries and per-page factors into shared memory (one barrier);
2. if the tile's first page is live, TMA each page's min and max rows ([1, D] at the physical
   page read from shared memory) into a [T, D] buffer each, all on one barrier, and wait;
3. in registers (WGMMA layout, T rows), score = sum_d relu(q_d) * max_d + min(q_d, 0) * min_d
   per query head of the group, times the page factor; stage [G, T] in shared memory and TMA
   it out. A tile past the last live page skips step 2 and writes -inf.

The page factor [B, Hkv, max_pages] comes from XLA outside the kernel: the page's INT8 scale
(1 for float metadata) where the logical page is live, -inf where it is not (one float a page,
the size of the output), so the kernel needs neither the lengths nor a 4-byte gather, which
TMA cannot do (a copy here moves a multiple of 128 bytes).

Slower than the Triton kernel (docs/kernels.md): its per-row copies alone take longer than
the whole Triton kernel, whose scores run on the tensor cores, and its own elementwise scoring
on the CUDA cores does not overlap them.

Requirements (checked): head_dim a multiple of 32 whose row of metadata is a multiple of 128
bytes (a copy moves a byte per thread of the warpgroup at a time); pages_per_block a multiple
of 64 (the WGMMA register layout's row tile). The kernel runs only on a GPU: Mosaic GPU has no
CPU interpreter for it (jax's GPU interpreter runs one block without block specs or barriers),
so on a CPU only its lowering is checked (``jax.export`` for "cuda").
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

_ROW_TILE = 64  # rows of the WGMMA register layout
# Pallas Mosaic GPU copies move a multiple of one byte per thread of the warpgroup.
_COPY_BYTES = 128
_GRID_NAMES = ("b", "g", "t")
# plgpu.kernel's output-type argument: out_shape in jax 0.10, out_type (keyword only) in 0.11.
_OUT_KW = "out_type" if "out_type" in inspect.signature(plgpu.kernel).parameters else "out_shape"


def check_pages_per_block(pages_per_block: int) -> None:
    if pages_per_block % _ROW_TILE:
        raise ValueError(
            f"QuestGpuConfig.pages_per_block must be a multiple of {_ROW_TILE} with "
            f"lowering='mosaic', got {pages_per_block}"
        )


def check_shapes(head_dim: int, itemsize: int) -> None:
    """ValueError unless the Mosaic GPU kernel can score metadata rows of these shapes."""
    if head_dim % 32 or (head_dim * itemsize) % _COPY_BYTES:
        raise ValueError(
            f"the Mosaic GPU Quest kernel needs head_dim a multiple of 32 with a metadata row of "
            f"a multiple of {_COPY_BYTES} bytes, got head_dim {head_dim} of {itemsize}-byte "
            "elements (use QuestGpuConfig(lowering='triton'))"
        )


def _kernel(
    pt_hbm,  # [B, MP] int32, MP = max_pages padded to a multiple of T
    fac_hbm,  # [B, Hkv, MP] f32: page scale where live, -inf where not
    q_hbm,  # [B, Hkv, G, D] f32
    mn_hbm,  # [Hkv, P, D] metadata (int8 codes or float)
    mx_hbm,  # [Hkv, P, D]
    o_hbm,  # [B, Hkv, G, MP] f32
    *,
    pages: int,
    group: int,
):
    d = q_hbm.shape[-1]
    pl.run_scoped(
        functools.partial(_tile, pt_hbm, fac_hbm, q_hbm, mn_hbm, mx_hbm, o_hbm, pages, group),
        plgpu.SMEM((pages,), jnp.int32),  # page-table entries of the tile
        plgpu.SMEM((pages,), jnp.float32),  # page factors
        plgpu.SMEM((group, d), jnp.float32),  # the group's queries
        plgpu.SMEM((pages, d), mn_hbm.dtype),  # min rows
        plgpu.SMEM((pages, d), mn_hbm.dtype),  # max rows
        plgpu.SMEM((group, pages), jnp.float32),  # scores, staged for the TMA out
        plgpu.Barrier(num_arrivals=3),
        plgpu.Barrier(num_arrivals=2 * pages),
    )


def _tile(
    pt_hbm, fac_hbm, q_hbm, mn_hbm, mx_hbm, o_hbm, pages, group,
    pt, fac, q, mins, maxs, out, head_bar, rows_bar,
):  # fmt: skip
    b, g, t = (jax.lax.axis_index(n) for n in _GRID_NAMES)
    tile = pl.ds(t * pages, pages)
    rows = plgpu.Layout.WGMMA
    per_page = rows.reduce(1)  # a [T] vector along the rows of a [T, D] tile
    per_dim = rows.reduce(0)  # a [D] vector along its columns

    plgpu.copy_gmem_to_smem(pt_hbm.at[b, tile], pt, head_bar)
    plgpu.copy_gmem_to_smem(fac_hbm.at[b, g, tile], fac, head_bar)
    plgpu.copy_gmem_to_smem(q_hbm.at[b, g], q, head_bar)
    plgpu.barrier_wait(head_bar)
    # Live pages come first in a sequence's page table: a dead first page means a dead tile.
    live = fac[0] > -jnp.inf

    @pl.when(live)
    def _score():
        for i in range(pages):
            page = pl.ds(pt[i], 1)
            plgpu.copy_gmem_to_smem(mn_hbm.at[g, page], mins.at[pl.ds(i, 1)], rows_bar)
            plgpu.copy_gmem_to_smem(mx_hbm.at[g, page], maxs.at[pl.ds(i, 1)], rows_bar)
        plgpu.barrier_wait(rows_bar)
        # optimized=False: a row-major [T, D] buffer filled row by row by TMA has no
        # swizzle, so the bank-conflict-free transfer plan does not apply.
        mn = plgpu.load(mins, (), layout=rows, optimized=False).astype(jnp.float32)
        mx = plgpu.load(maxs, (), layout=rows, optimized=False).astype(jnp.float32)
        factor = plgpu.load(fac, (), layout=per_page)
        for h in range(group):
            qh = plgpu.load(q, (h,), layout=per_dim)
            pos = jax.lax.broadcast_in_dim(jnp.maximum(qh, 0.0), mn.shape, (1,))
            neg = jax.lax.broadcast_in_dim(jnp.minimum(qh, 0.0), mn.shape, (1,))
            score = jnp.sum(pos * mx + neg * mn, axis=1)
            # Dead pages inside a live tile: their factor is -inf.
            out[h, :] = jnp.where(factor > -jnp.inf, score * factor, factor)

    @pl.when(jnp.logical_not(live))
    def _dead():
        dead = plgpu.load(fac, (), layout=per_page)  # all -inf
        for h in range(group):
            out[h, :] = dead

    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out, o_hbm.at[b, g, :, tile])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("pages_per_block",))
def quest_page_scores_mgpu(
    q, k_min, k_max, page_table, live_pages, scale=None, *, pages_per_block: int
):
    """Mosaic GPU page scores; arguments and result as `quest_page_scores` (checked by the
    caller; the kernel's own limits here), but with live_pages [B] int32, the logical pages of
    each sequence that hold tokens, in place of lengths and page_size."""
    batch, hq, d = q.shape
    hkv, _, _ = k_min.shape
    max_pages = page_table.shape[1]
    group = hq // hkv
    check_pages_per_block(pages_per_block)
    check_shapes(d, np.dtype(k_min.dtype).itemsize)
    if batch == 0 or max_pages == 0:
        return jnp.zeros((batch, hq, max_pages), jnp.float32)
    t = pages_per_block
    padded = pl.cdiv(max_pages, t) * t
    pt = jnp.pad(page_table, ((0, 0), (0, padded - max_pages)))
    live = jnp.arange(padded) < jnp.minimum(live_pages, max_pages)[:, None]
    if scale is None:
        factor = jnp.ones((batch, hkv, padded), jnp.float32)
    else:
        factor = scale[:, pt].transpose(1, 0, 2)  # [B, Hkv, MP]
    factor = jnp.where(live[:, None, :], factor, -jnp.inf)
    # plgpu.kernel, not pl.pallas_call: jax 0.11 lowers Mosaic GPU kernels only through it.
    out = plgpu.kernel(
        functools.partial(_kernel, pages=t, group=group),
        **{_OUT_KW: jax.ShapeDtypeStruct((batch, hkv, group, padded), jnp.float32)},
        grid=(batch, hkv, padded // t),
        grid_names=_GRID_NAMES,
        compiler_params=plgpu.CompilerParams(),
    )(
        pt,
        factor,
        q.astype(jnp.float32).reshape(batch, hkv, group, d),
        k_min,
        k_max,
    )
    return out[..., :max_pages].reshape(batch, hq, max_pages)

"""Top-p on TPU: one Pallas Mosaic kernel for thresholds and selections.

Semantics: pallas_kernels.topp. A block of rows per grid step, each row viewed as [N/128, 128]
tiles (N padded to a multiple of 128). Mosaic has no cumsum or vector scatter, so prefix sums
are triangular matmuls and compaction counts, for each output slot s, the columns whose
inclusive prefix is <= s (a one-hot matmul picks each slot's 128-column tile).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _common
from pallas_kernels import topp_common as tc
from pallas_kernels.topp_common import TopPTpuConfig

DEFAULT_CONFIG = TopPTpuConfig()
_LANES = 128


def _tile_prefix(mask):
    """Inclusive running count of a bool [NC, 128] tile stack in row-major column order.

    Returns (within [NC, 128] f32 count inside each 128-column tile, offset [NC, 1] f32 count of
    all earlier tiles). Mosaic has no cumsum, so both are matmuls against triangular 0/1
    matrices; every operand is an integer <= 128, exact in bf16, so no matmul precision can
    round them, and the f32 accumulation is exact below 2**24.
    """
    nc = mask.shape[0]
    i = jax.lax.broadcasted_iota(jnp.int32, (_LANES, _LANES), 0)
    k = jax.lax.broadcasted_iota(jnp.int32, (_LANES, _LANES), 1)
    upper = (i <= k).astype(jnp.float32)
    within = jnp.dot(mask.astype(jnp.float32), upper, preferred_element_type=jnp.float32)
    a = jax.lax.broadcasted_iota(jnp.int32, (nc, nc), 0)
    b = jax.lax.broadcasted_iota(jnp.int32, (nc, nc), 1)
    strictly_lower = (b < a).astype(jnp.float32)
    offset = jnp.dot(strictly_lower, within[:, _LANES - 1 :], preferred_element_type=jnp.float32)
    return within, offset


def _tpu_compact(final, cap_p):
    """final bool [NC, 128] -> (indices i32 [1, cap_p] of kept columns in order, 0 past count).

    Slot s holds the column j with prefix(j) == s + 1, i.e. #{j : prefix(j) <= s}. Its tile is
    k_s = #{tiles whose last prefix <= s} (all their columns precede it); a one-hot matmul
    brings tile k_s's 128 within-tile counts to slot s, where they are counted against s.
    """
    nc = final.shape[0]
    within, offset = _tile_prefix(final)
    tile_end = within[:, _LANES - 1 :] + offset  # [NC, 1]
    slot = jax.lax.broadcasted_iota(jnp.int32, (1, cap_p), 1).astype(jnp.float32)
    tile_of_slot = jnp.sum((tile_end <= slot).astype(jnp.float32), axis=0, keepdims=True)
    tile_id = jax.lax.broadcasted_iota(jnp.int32, (nc, cap_p), 0).astype(jnp.float32)
    pick = (tile_id == tile_of_slot).astype(jnp.float32)  # [NC, cap_p]
    picked_within = jnp.dot(within.T, pick, preferred_element_type=jnp.float32)  # [128, cap_p]
    picked_offset = jnp.sum(pick * offset, axis=0, keepdims=True)  # [1, cap_p]
    in_tile = jnp.sum(
        (picked_within + picked_offset <= slot).astype(jnp.float32), axis=0, keepdims=True
    )
    column = _LANES * tile_of_slot + in_tile
    count = jnp.sum(final.astype(jnp.float32), keepdims=True)
    return jnp.where(slot < count, column, 0.0).astype(jnp.int32)


def _tpu_kernel(
    p_ref,  # [R] f32, scalar-prefetched into SMEM
    x_ref,  # [RB, G, NC, 128] f32 logits, padded with -inf
    valid_ref,  # [RB, NC, 128] i32 (0/1), padded with 0
    *out_refs,
    # select: indices [RB, 1, cap_p] i32, count [RB, 1, 1] i32, saturated [RB, 1, 1] i32,
    #         mass [RB, G, 1, 1] f32
    # threshold only: threshold, count, mass, each [RB, G, 1, 1]
    # (per-head scalars keep the [G, 1, 1] shape of keepdims reductions: no relayout)
    capacity: int | None,
    config: TopPTpuConfig,
):
    block_rows = x_ref.shape[0]
    num_cols = x_ref.shape[2] * x_ref.shape[3]  # padded N: still bounds the valid count
    axes = (1, 2)
    first_row = pl.program_id(0) * block_rows

    def one_row(r, carry):
        x = x_ref[r]  # [G, NC, 128]
        valid = valid_ref[r] != 0  # [NC, 128]
        p = p_ref[first_row + r]
        w, hi = tc.weights(x, valid[None], axes)
        t = tc.head_thresholds(w, hi, p, axes, config.iters, num_cols)  # [G, 1, 1]
        kept = w >= t
        if capacity is None:
            threshold_ref, count_ref, mass_ref = out_refs
            threshold_ref[r] = t
            count_ref[r] = jnp.sum(kept.astype(jnp.int32), axis=axes, keepdims=True)
            mass_ref[r] = jnp.sum(jnp.where(kept, w, 0.0), axis=axes, keepdims=True)
            return carry

        indices_ref, count_ref, saturated_ref, mass_ref = out_refs
        union = jnp.max(kept.astype(jnp.int32), axis=0) > 0  # [NC, 128]
        priority = jnp.where(union, jnp.max(w, axis=0), -1.0)
        n_union = jnp.sum(union.astype(jnp.int32), keepdims=True)  # [1, 1]

        def prefix(mask):
            within, offset = _tile_prefix(mask)
            return (within + offset).astype(jnp.int32)

        limited = tc.limit_to_capacity(
            union, priority, capacity, (0, 1), config.capacity_iters, prefix
        )
        saturated = n_union > capacity
        final = jnp.where(saturated, limited, union)
        indices_ref[r] = _tpu_compact(final, indices_ref.shape[-1])
        count_ref[r] = jnp.sum(final.astype(jnp.int32), keepdims=True)
        saturated_ref[r] = saturated.astype(jnp.int32)
        mass_ref[r] = tc.kept_mass(w, final[None], axes)
        return carry

    jax.lax.fori_loop(0, block_rows, one_row, 0)


def _call(logits, valid, p, capacity, config, interpret):
    """logits [R, G, N] f32, valid [R, N] bool, p [R] or scalar -> per-row outputs (see kernel)."""
    if valid is None:  # every column (the kernel takes the mask as lanes of int32 anyway)
        valid = jnp.ones((logits.shape[0], logits.shape[2]), bool)
    r, g, n = logits.shape
    p = tc.p_rows(p, r)
    nc = pl.cdiv(n, _LANES)
    pad = nc * _LANES - n
    # Free reshapes when N is a multiple of 128; otherwise one padding copy.
    x = jnp.pad(logits, ((0, 0), (0, 0), (0, pad)), constant_values=-jnp.inf)
    x = x.reshape(r, g, nc, _LANES)
    v = jnp.pad(valid, ((0, 0), (0, pad))).astype(jnp.int32).reshape(r, nc, _LANES)
    rb = config.block_rows if r % config.block_rows == 0 else 1

    def rows(*tail):
        return lambda i, p_smem: (i, *tail)

    if capacity is None:
        out_shape = [
            jax.ShapeDtypeStruct((r, g, 1, 1), jnp.float32),
            jax.ShapeDtypeStruct((r, g, 1, 1), jnp.int32),
            jax.ShapeDtypeStruct((r, g, 1, 1), jnp.float32),
        ]
        out_specs = [pl.BlockSpec((rb, g, 1, 1), rows(0, 0, 0))] * 3
    else:
        cap_p = pl.cdiv(capacity, _LANES) * _LANES
        out_shape = [
            jax.ShapeDtypeStruct((r, 1, cap_p), jnp.int32),
            jax.ShapeDtypeStruct((r, 1, 1), jnp.int32),
            jax.ShapeDtypeStruct((r, 1, 1), jnp.int32),
            jax.ShapeDtypeStruct((r, g, 1, 1), jnp.float32),
        ]
        out_specs = [
            pl.BlockSpec((rb, 1, cap_p), rows(0, 0)),
            pl.BlockSpec((rb, 1, 1), rows(0, 0)),
            pl.BlockSpec((rb, 1, 1), rows(0, 0)),
            pl.BlockSpec((rb, g, 1, 1), rows(0, 0, 0)),
        ]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(r // rb,),
        in_specs=[
            pl.BlockSpec((rb, g, nc, _LANES), rows(0, 0, 0)),
            pl.BlockSpec((rb, nc, _LANES), rows(0, 0)),
        ],
        out_specs=out_specs,
    )
    kernel = functools.partial(_tpu_kernel, capacity=capacity, config=config)
    outs = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=_common.tpu_interpret(interpret),
        name="topp_select_tpu" if capacity is not None else "topp_threshold_tpu",
    )(p, x, v)
    if capacity is None:
        return tuple(o[..., 0, 0] for o in outs)
    indices, count, saturated, mass = outs
    return indices[:, 0, :capacity], count[:, 0, 0], saturated[:, 0, 0], mass[..., 0, 0]


# --------------------------------------------------------------------------------------------
# The TPU implementations of the public entries (arguments checked by pallas_kernels.topp)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def topp_threshold_tpu(logits, valid, p, *, config=DEFAULT_CONFIG, interpret=False):
    """Pallas TPU ``topp_threshold``. logits [R, N] f32, valid [R, N] bool, p [R] or scalar."""
    t, count, mass = _call(logits[:, None, :], valid, p, None, config, interpret)
    return t[:, 0], count[:, 0], mass[:, 0]


@functools.partial(jax.jit, static_argnames=("capacity", "config", "interpret", "block_size"))
def topp_select_grouped_tpu(
    logits,
    valid,
    p,
    capacity,
    *,
    config=DEFAULT_CONFIG,
    interpret=False,
    blocks=None,
    block_size=1,
):
    """Pallas TPU ``topp_select_grouped``. logits [R, G, N] f32, valid [R, N] bool, p [R];
    blocks None or [R, C] int32 (columns mapped to positions by XLA after the kernel)."""
    indices, count, saturated, mass = _call(logits, valid, p, capacity, config, interpret)
    if blocks is not None:
        indices = tc.columns_to_positions(indices, count, blocks, block_size)
    return indices, count, saturated != 0, mass


def topp_select_tpu(logits, valid, p, capacity, *, config=DEFAULT_CONFIG, interpret=False):
    """Pallas TPU ``topp_select``: ``topp_select_grouped_tpu`` with G = 1."""
    out = topp_select_grouped_tpu(
        logits[:, None, :], valid, p, capacity, config=config, interpret=interpret
    )
    return out[:3]

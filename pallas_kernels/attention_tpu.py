"""Decode attention on TPU: Pallas Mosaic (semantics: pallas_kernels.attention).

Grid (batch, Hi), one program walks its whole list with a double-buffered loop of manual DMAs
from HBM into VMEM: whole pages for dense attention (page ids from the scalar-prefetched page
table), single rows for sparse attention (positions DMA'd into SMEM one tile at a time). DMAs
past the count are skipped and their rows masked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _common

# Finite start for the running max: a tile whose tokens are all masked then gives
# exp(-inf - finite) = 0 instead of exp(-inf - -inf) = NaN.
_INIT_MAX = -1e30


def _tpu_kernel(
    pt_ref,  # SMEM [batch * max_pages] page table, flattened
    count_ref,  # SMEM [batch * Hi] (dense: [batch]) tokens per list row
    q_ref,  # VMEM [R, D] query rows of this list row
    k_hbm,  # HBM [Hkv, num_pages, page_size, D]
    v_hbm,  # HBM [Hkv, num_pages, page_size, D]
    *refs,  # sparse: pos_hbm [B, Hi, capacity]; o_ref [R, D]; scratch (see wrapper)
    sparse: bool,
    rows_per_kv: int,
    max_pages: int,
    capacity: int,
    tile: int,
    qk_scale: float,
):
    if sparse:
        pos_hbm, o_ref, k_buf, v_buf, k_sem, v_sem, pos_buf, pos_sem = refs
    else:
        o_ref, k_buf, v_buf, k_sem, v_sem = refs
    b, i = pl.program_id(0), pl.program_id(1)
    num_rows = pl.num_programs(1)
    # Truncating lax.div / lax.rem on non-negative ints: jnp's floor division lowers through
    # sign(), which Mosaic lowers per TPU generation.
    kv_head = lax.div(i, rows_per_kv)
    page_size = k_hbm.shape[2]
    count = jnp.minimum(count_ref[b * num_rows + i] if sparse else count_ref[b], capacity)
    num_tiles = lax.div(count + (tile - 1), tile)

    def page_of(pos):
        pos = jnp.clip(pos, 0, max_pages * page_size - 1)
        page = jnp.clip(pt_ref[b * max_pages + lax.div(pos, page_size)], 0, k_hbm.shape[1] - 1)
        return page, lax.rem(pos, page_size)

    # A tile is filled by chunks of DMAs: whole pages (dense) or single rows (sparse, since
    # listed tokens are scattered). Only chunks holding tokens before the count are copied.
    chunk = 1 if sparse else page_size

    def live_chunks(t):
        return jnp.minimum(tile // chunk, lax.div(count - t * tile + (chunk - 1), chunk))

    def copies(n, slot, pos):
        page, offset = page_of(pos)
        src = pl.ds(offset, 1) if sparse else pl.ds(0, page_size)
        dst = pl.ds(n * chunk, chunk)
        return (
            pltpu.make_async_copy(
                k_hbm.at[kv_head, page, src], k_buf.at[slot, dst], k_sem.at[slot]
            ),
            pltpu.make_async_copy(
                v_hbm.at[kv_head, page, src], v_buf.at[slot, dst], v_sem.at[slot]
            ),
        )

    def start_tile(t, slot):
        if sparse:
            positions = pltpu.make_async_copy(
                pos_hbm.at[b, i, pl.ds(t * tile, tile)], pos_buf.at[slot], pos_sem.at[slot]
            )
            positions.start()
            positions.wait()

        @pl.loop(0, live_chunks(t))
        def _(n):
            pos = pos_buf[slot, n] if sparse else t * tile + n * page_size
            for copy in copies(n, slot, pos):
                copy.start()

    def wait_tile(t, slot):
        # A wait needs only the semaphore and the byte count, which every chunk shares.
        @pl.loop(0, live_chunks(t))
        def _(n):
            for copy in copies(n, slot, 0):
                copy.wait()

    @pl.when(num_tiles > 0)
    def _():
        start_tile(0, 0)

    q = q_ref[...]

    def body(t, carry):
        acc, m, den = carry
        slot = lax.rem(t, 2)

        @pl.when(t + 1 < num_tiles)
        def _():
            start_tile(t + 1, 1 - slot)

        wait_tile(t, slot)
        k = k_buf[slot]  # [tile, D]
        v = v_buf[slot]
        s = lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )  # [R, tile]
        s = s * qk_scale
        valid = t * tile + lax.broadcasted_iota(jnp.int32, s.shape, 1) < count
        s = jnp.where(valid, s, -jnp.inf)
        # Rows past the count were never copied: zero them so stale bits never reach the dot.
        v_valid = t * tile + lax.broadcasted_iota(jnp.int32, v.shape, 0) < count
        v = jnp.where(v_valid, v, jnp.zeros_like(v))
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new)
        den = den * corr + jnp.sum(p, axis=1, keepdims=True)
        pv = lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        return acc * corr + pv, m_new, den

    r, head_dim = q_ref.shape
    init = (
        jnp.zeros((r, head_dim), jnp.float32),
        jnp.full((r, 1), _INIT_MAX, jnp.float32),
        jnp.zeros((r, 1), jnp.float32),
    )
    acc, _, den = lax.fori_loop(0, num_tiles, body, init)
    o_ref[...] = (acc / jnp.where(den > 0, den, 1.0)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("sparse", "scale", "config", "interpret"))
def decode_attention_tpu(
    q, k_pages, v_pages, page_table, counts, token_pos, *, sparse, scale, config, interpret
):
    """The TPU kernel over list rows, arguments as ``attention_gpu.decode_attention_gpu``."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    max_pages = page_table.shape[1]
    rows = token_pos.shape[1] if sparse else num_kv_heads
    per_row = num_q_heads // rows
    if sparse:
        capacity = token_pos.shape[2]
        tile = config.sparse_tile(capacity)
        # Whole tiles of positions are DMA'd; pad the list so the last one stays in bounds.
        pad = -token_pos.shape[2] % tile
        if pad:
            token_pos = jnp.pad(token_pos, ((0, 0), (0, 0), (0, pad)))
    else:
        capacity = max_pages * page_size
        tile = config.dense_pages_per_tile(page_size) * page_size

    qg = q.astype(k_pages.dtype).reshape(batch, rows, per_row, head_dim)
    q_spec = pl.BlockSpec((None, None, per_row, head_dim), lambda b, i, *_: (b, i, 0, 0))
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    in_specs = [q_spec, hbm, hbm]
    args = [qg, k_pages, v_pages]
    scratch = [
        pltpu.VMEM((2, tile, head_dim), k_pages.dtype),
        pltpu.VMEM((2, tile, head_dim), k_pages.dtype),
        pltpu.SemaphoreType.DMA((2,)),
        pltpu.SemaphoreType.DMA((2,)),
    ]
    if sparse:
        in_specs.append(hbm)
        args.append(token_pos)
        scratch += [pltpu.SMEM((2, tile), jnp.int32), pltpu.SemaphoreType.DMA((2,))]

    kernel = functools.partial(
        _tpu_kernel,
        sparse=sparse,
        rows_per_kv=rows // num_kv_heads,
        max_pages=max_pages,
        capacity=capacity,
        tile=tile,
        qk_scale=scale,
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, rows),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((None, None, per_row, head_dim), lambda b, i, *_: (b, i, 0, 0)),
            scratch_shapes=scratch,
        ),
        out_shape=jax.ShapeDtypeStruct((batch, rows, per_row, head_dim), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=_common.tpu_interpret(interpret),
        name="sparse_decode_attention_tpu" if sparse else "paged_decode_attention_tpu",
    )(page_table.reshape(-1), counts.reshape(-1), *args)
    return out.reshape(batch, num_q_heads, head_dim)

"""Block SpGEMV on TPU: the Pallas Mosaic kernel (semantics: pallas_kernels.spgemv).

Grid (B, Hkv, C), one candidate block per step, the page fetched by a scalar-prefetched
physical page id in the index map.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _common


def _tpu_kernel(
    count_ref,  # SMEM [B * Hkv] int32: cand_count
    lengths_ref,  # SMEM [B] int32
    start_ref,  # SMEM [B * Hkv * C] int32: first position of each candidate block
    phys_ref,  # SMEM [B * Hkv * C] int32: physical page holding it (used by the index maps)
    q_lo_ref,  # [G, D/2] f32: first half of q for the heads of (b, g)
    q_hi_ref,  # [G, D/2] f32: second half
    k_ref,  # [S, D/2] uint8: the page holding candidate block c
    ks_ref,  # [1, S] f32
    kz_ref,  # [1, S] f32
    o_ref,  # [G, bs] f32
    *,
    block_size: int,
    num_cand: int,
    attn_scale: float,
):
    del phys_ref
    b, g, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_kv_heads = pl.num_programs(1)
    page_size = k_ref.shape[0]
    row = b * num_kv_heads + g

    @pl.when(c >= count_ref[row])
    def _empty():
        o_ref[...] = jnp.full(o_ref.shape, -jnp.inf, jnp.float32)

    @pl.when(c < count_ref[row])
    def _compute():
        hp = jax.lax.Precision.HIGHEST
        nt = (((1,), (1,)), ((), ()))  # contract the last dims: q [G, K] . n [S, K] -> [G, S]
        packed = k_ref[...].astype(jnp.int32)
        lo = (packed & 15).astype(jnp.float32)
        hi = (packed >> 4).astype(jnp.float32)
        q_lo = q_lo_ref[...]
        q_hi = q_hi_ref[...]
        qn = jax.lax.dot_general(q_lo, lo, nt, precision=hp, preferred_element_type=jnp.float32)
        qn += jax.lax.dot_general(q_hi, hi, nt, precision=hp, preferred_element_type=jnp.float32)
        q_sum = jnp.sum(q_lo, axis=1, keepdims=True) + jnp.sum(q_hi, axis=1, keepdims=True)
        logits = attn_scale * (ks_ref[...] * qn + kz_ref[...] * q_sum)  # [G, S]
        start = start_ref[row * num_cand + c]
        if block_size < page_size:
            # The block is slots [slot0, slot0 + bs) of the page. Selecting them with a 0/1
            # matrix avoids a dynamic lane slice; at HIGHEST precision it is exact.
            slot0 = jnp.maximum(start, 0) % page_size
            shape = (page_size, block_size)
            sel = jax.lax.broadcasted_iota(jnp.int32, shape, 0) == (
                slot0 + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
            )
            logits = jnp.dot(logits, sel.astype(jnp.float32), precision=hp)  # [G, bs]
        pos = start + jax.lax.broadcasted_iota(jnp.int32, (1, block_size), 1)
        ok = (pos >= 0) & (pos < lengths_ref[b])
        o_ref[...] = jnp.where(ok, logits, -jnp.inf)


def launch(
    q,
    k_int4,
    k_scale,
    k_zero,
    page_table,
    lengths,
    cand_blocks,
    cand_count,
    *,
    block_size: int,
    attn_scale: float,
    interpret: bool,
):
    """The Mosaic kernel; arguments as `block_spgemv` (checked by pallas_kernels.spgemv),
    attn_scale the logit scale. Result as `block_spgemv`.

    Grid (B, Hkv, C): one candidate block per step. The index map fetches the page holding
    the block by its scalar-prefetched physical id; for block_size < page_size the whole page
    is fetched and the block's slots selected in VMEM (simple, not bandwidth-optimal). Steps
    past cand_count keep the previous page index, so the pipeline issues no copy for them.
    The per-entry start positions and page ids are scalar-prefetched into SMEM (8 bytes per
    candidate entry of the whole batch), which limits C * B * Hkv: fine for page-level
    candidates, too much for token-level candidates at serving batch sizes.
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, half = k_int4.shape
    max_pages = page_table.shape[1]
    num_cand = cand_blocks.shape[2]
    group = num_q_heads // num_kv_heads

    start = cand_blocks * block_size  # [B, Hkv, C]; negative blocks stay negative (invalid)
    lpage = jnp.clip(start // page_size, 0, max_pages - 1)
    phys = jnp.take_along_axis(page_table[:, None, :], lpage.reshape(batch, 1, -1), axis=2)
    phys = jnp.clip(phys.reshape(batch, num_kv_heads, num_cand), 0, num_pages - 1)
    count = jnp.clip(cand_count, 0, num_cand).reshape(-1)

    def page_map(b, g, c, count_ref, lengths_ref, start_ref, phys_ref):
        row = b * num_kv_heads + g
        c_eff = jnp.maximum(jnp.minimum(c, count_ref[row] - 1), 0)
        return g, phys_ref[row * num_cand + c_eff], 0, 0

    def q_map(b, g, c, *_):
        return b, g, 0, 0

    qf = q.astype(jnp.float32).reshape(batch, num_kv_heads, group, head_dim)
    kernel = functools.partial(
        _tpu_kernel,
        block_size=block_size,
        num_cand=num_cand,
        attn_scale=attn_scale,
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(batch, num_kv_heads, num_cand),
            in_specs=[
                pl.BlockSpec((None, None, group, half), q_map),
                pl.BlockSpec((None, None, group, half), q_map),
                pl.BlockSpec((None, None, page_size, half), page_map),
                pl.BlockSpec((None, None, 1, page_size), page_map),
                pl.BlockSpec((None, None, 1, page_size), page_map),
            ],
            out_specs=pl.BlockSpec(
                (None, None, None, group, block_size), lambda b, g, c, *_: (b, g, c, 0, 0)
            ),
        ),
        out_shape=jax.ShapeDtypeStruct(
            (batch, num_kv_heads, num_cand, group, block_size), jnp.float32
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=_common.tpu_interpret(interpret),
        name="block_spgemv_tpu",
    )(
        count,
        lengths,
        start.reshape(-1),
        phys.reshape(-1),
        qf[..., :half],
        qf[..., half:],
        k_int4,
        k_scale.reshape(num_kv_heads, num_pages, 1, page_size),
        k_zero.reshape(num_kv_heads, num_pages, 1, page_size),
    )
    # [B, Hkv, C, G, bs] -> [B, Hkv, G, C, bs]: a copy of the output, the price of keeping the
    # output block's last two dims equal to full dims (Mosaic tiling) with bs < 128.
    out = out.transpose(0, 1, 3, 2, 4)
    return out.reshape(batch, num_q_heads, num_cand * block_size)

"""Decode attention on GPU: Pallas Triton flash-decoding (semantics: pallas_kernels.attention).

Grid (batch, Hi, splits): the count of each list row is cut into ``splits`` equal ranges
(rounded to whole tiles), so short and long lists both spread over many programs. Each program
runs an online softmax over its range in tiles of ``block_tokens`` rows gathered through the
page table with masked loads, and writes a partial (acc, max, sum); a jnp step merges the
splits. The query rows are padded to 16, Triton's smallest dot, inside the kernel (masked
loads of q, masked stores of the partials): only the real rows travel. With one split a row
(few tokens a row, many rows) the program writes the normalized output itself and no merge
runs after the kernel.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

_LOG2E = math.log2(math.e)
# Finite start for the running max: a tile whose tokens are all masked then gives
# exp2(-inf - finite) = 0 instead of exp2(-inf - -inf) = NaN.
_INIT_MAX = -1e30
# Triton's smallest dot operand dimension.
_MIN_DOT_ROWS = 16


def _gpu_kernel(
    count_ref,  # [1] tokens in this list row (dense: lengths[b])
    q_ref,  # [B, Hi, R, D] query rows (whole array; R per list row, padded to Rp on load)
    pt_ref,  # [max_pages] page table of sequence b
    k_ref,  # [num_pages * page_size, D] K rows of this KV head
    v_ref,  # [num_pages * page_size, D] V rows of this KV head
    *refs,  # sparse: pos_ref [capacity]; then (whole arrays) o_ref [B, Hi, S, R, D],
    # m_ref [B, Hi, S, R], den_ref [B, Hi, S, R]; one split: o_ref [B, Hi, R, D] alone
    rp: int,
    sparse: bool,
    num_splits: int,
    block_tokens: int,
    page_size: int,
    capacity: int,
    qk_scale_log2: float,
    precision,
):
    if sparse:
        pos_ref, *refs = refs
    o_ref, *stat_refs = refs
    head_dim = q_ref.shape[-1]
    b, i, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q_rows = jnp.arange(rp, dtype=jnp.int32)
    row_ok = q_rows < q_ref.shape[2]
    max_tokens = pt_ref.shape[0] * page_size
    num_pages = k_ref.shape[0] // page_size

    count = jnp.minimum(count_ref[0], capacity)
    per_split = pl.cdiv(pl.cdiv(count, num_splits), block_tokens) * block_tokens
    start = split * per_split
    end = jnp.minimum(start + per_split, count)
    num_tiles = pl.cdiv(jnp.maximum(end - start, 0), block_tokens)

    cols = jnp.arange(head_dim, dtype=jnp.int32)[None, :]
    # Rows past R load 0: their logits are 0 and their partials are never stored.
    q = plt.load(q_ref.at[b, i, q_rows[:, None], cols], mask=row_ok[:, None], other=0)
    q = q.astype(k_ref.dtype)

    def body(t, carry):
        acc, m, den = carry
        idx = start + t * block_tokens + jnp.arange(block_tokens, dtype=jnp.int32)
        valid = idx < end
        if sparse:
            pos = plt.load(pos_ref.at[jnp.minimum(idx, capacity - 1)], mask=valid, other=0)
        else:
            pos = idx
        pos = jnp.clip(pos, 0, max_tokens - 1)
        # Truncating division: pos >= 0, and it is cheaper than floor division.
        page = jnp.clip(pt_ref[lax.div(pos, page_size)], 0, num_pages - 1)
        rows = page * page_size + lax.rem(pos, page_size)
        # Masked loads: no bandwidth past the count, and zeros (not garbage) feed the dots.
        k = plt.load(k_ref.at[rows[:, None], cols], mask=valid[:, None], other=0)
        v = plt.load(v_ref.at[rows[:, None], cols], mask=valid[:, None], other=0)
        # Base-2 logits: exp2 is a single MUFU instruction.
        s = (
            lax.dot_general(
                q,
                k,
                (((1,), (1,)), ((), ())),
                precision=precision,
                preferred_element_type=jnp.float32,
            )
            * qk_scale_log2
        )  # [Rp, T]
        s = jnp.where(valid[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        corr = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        den = den * corr + jnp.sum(p, axis=1)
        acc = acc * corr[:, None] + lax.dot_general(
            p.astype(v.dtype),
            v,
            (((1,), (0,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )
        return acc, m_new, den

    init = (
        jnp.zeros((rp, head_dim), jnp.float32),
        jnp.full((rp,), _INIT_MAX, jnp.float32),
        jnp.zeros((rp,), jnp.float32),
    )
    acc, m, den = lax.fori_loop(0, num_tiles, body, init)
    if num_splits == 1:
        # The whole list in this program: the output itself, as _combine_splits would give it
        # (an empty list: zeros), with no partials and no merge after the kernel.
        out = acc / jnp.where(den > 0, den, 1.0)[:, None]
        plt.store(
            o_ref.at[b, i, q_rows[:, None], cols], out.astype(o_ref.dtype), mask=row_ok[:, None]
        )
        return
    m_ref, den_ref = stat_refs
    plt.store(o_ref.at[b, i, split, q_rows[:, None], cols], acc, mask=row_ok[:, None])
    plt.store(m_ref.at[b, i, split, q_rows], m, mask=row_ok)
    plt.store(den_ref.at[b, i, split, q_rows], den, mask=row_ok)


def _combine_splits(acc, m, den):
    """Merges per-split partials: acc [B, Hi, S, R, D], m/den [B, Hi, S, R] (base-2 max)."""
    w = jnp.exp2(m - jnp.max(m, axis=2, keepdims=True))  # empty splits: den = 0, acc = 0
    total = jnp.sum(w * den, axis=2)
    out = jnp.sum(w[..., None] * acc, axis=2)
    return out / jnp.where(total > 0, total, 1.0)[..., None]


@functools.partial(jax.jit, static_argnames=("sparse", "scale", "config", "interpret"))
def decode_attention_gpu(
    q, k_pages, v_pages, page_table, counts, token_pos, *, sparse, scale, config, interpret
):
    """The GPU kernel over list rows: counts [B * Hi] (dense: lengths [B]) and, when sparse,
    token_pos [B, Hi, capacity]; scale is the logit scale (a float). Arguments checked by
    pallas_kernels.attention."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    rows = token_pos.shape[1] if sparse else num_kv_heads
    per_row = num_q_heads // rows
    rows_per_kv = rows // num_kv_heads
    capacity = token_pos.shape[2] if sparse else page_table.shape[1] * page_size
    splits = config.num_splits(batch, rows, capacity)
    rp = max(_MIN_DOT_ROWS, pl.next_power_of_2(per_row))

    qg = q.reshape(batch, rows, per_row, head_dim)  # free; cast in the kernel
    # Free reshapes: pages are contiguous, so row page*page_size + slot addresses a token.
    k_rows = k_pages.reshape(num_kv_heads, num_pages * page_size, head_dim)
    v_rows = v_pages.reshape(num_kv_heads, num_pages * page_size, head_dim)
    counts = counts.reshape(-1)  # [B * Hi] (dense: [B])

    kv_spec = pl.BlockSpec(
        (None, num_pages * page_size, head_dim), lambda b, i, s: (i // rows_per_kv, 0, 0)
    )
    in_specs = [
        pl.BlockSpec((1,), (lambda b, i, s: (b * rows + i,)) if sparse else (lambda b, i, s: (b,))),
        pl.no_block_spec,
        pl.BlockSpec((None, page_table.shape[1]), lambda b, i, s: (b, 0)),
        kv_spec,
        kv_spec,
    ]
    args = [counts, qg, page_table, k_rows, v_rows]
    if sparse:
        in_specs.append(pl.BlockSpec((None, None, capacity), lambda b, i, s: (b, i, 0)))
        args.append(token_pos)

    precision = lax.Precision.HIGHEST if k_pages.dtype == jnp.float32 else None
    kernel = functools.partial(
        _gpu_kernel,
        rp=rp,
        sparse=sparse,
        num_splits=splits,
        block_tokens=config.block_tokens,
        page_size=page_size,
        capacity=capacity,
        qk_scale_log2=scale * _LOG2E,
        precision=precision,
    )
    if splits == 1:  # the kernel writes the output (see _gpu_kernel)
        out_shape = [jax.ShapeDtypeStruct((batch, rows, per_row, head_dim), q.dtype)]
    else:
        out_shape = [
            jax.ShapeDtypeStruct((batch, rows, splits, per_row, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, rows, splits, per_row), jnp.float32),
            jax.ShapeDtypeStruct((batch, rows, splits, per_row), jnp.float32),
        ]
    outs = pl.pallas_call(
        kernel,
        grid=(batch, rows, splits),
        in_specs=in_specs,
        out_specs=[pl.no_block_spec] * len(out_shape),
        out_shape=out_shape,
        compiler_params=plt.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="sparse_decode_attention" if sparse else "paged_decode_attention",
    )(*args)
    out = outs[0] if splits == 1 else _combine_splits(*outs)
    return out.reshape(batch, num_q_heads, head_dim).astype(q.dtype)

"""Exact decode attention over the paged K/V cache: dense (all tokens) and sparse (listed tokens).

Both ops are one computation: for each row i of a list table, exact softmax attention of the
R query heads that row serves over a list of logical token positions of sequence b. Dense
attention is the list ``0 .. lengths[b]-1`` for every KV head; sparse attention takes the list
from ``token_pos[b, i, :counts[b, i]]``. A list row serves all G = Hq // Hkv query heads of its
KV group (Hi = Hkv: each K/V row is read once and used by the whole group) or a single query
head (Hi = Hq: per-head lists). Query head ``h`` reads KV head ``h // G``.

Layouts (docs/kernel_api.md):
  q          [batch, num_q_heads, head_dim]                    float32 / bfloat16
  k_pages    [num_kv_heads, num_pages, page_size, head_dim]    bfloat16 / float32
  v_pages    [num_kv_heads, num_pages, page_size, head_dim]    same dtype as k_pages
  page_table [batch, max_pages] int32: logical page -> physical page (0 = null page)
  lengths    [batch] int32 (dense)
  token_pos  [batch, Hi, capacity] int32 logical positions, counts [batch, Hi] int32 (sparse)
  out        [batch, num_q_heads, head_dim] in q.dtype

Out-of-range values never address memory outside the arrays, on every backend alike: counts
(and lengths) are clamped to the capacity, positions into [0, max_pages * page_size), page-table
entries into [0, num_pages). Entries past the count are never used.

GPU (Pallas Triton): flash-decoding. Grid (batch, Hi, splits): the count of each list row is cut
into ``splits`` equal ranges (rounded to whole tiles), so short and long lists both spread over
many programs. Each program runs an online softmax over its range in tiles of ``block_tokens``
rows gathered through the page table with masked loads, and writes a partial (acc, max, sum); a
jnp step merges the splits. The query rows are padded to 16, Triton's smallest dot.

TPU (Pallas Mosaic): grid (batch, Hi), one program walks its whole list with a double-buffered
loop of manual DMAs from HBM into VMEM: whole pages for dense attention (page ids from the
scalar-prefetched page table), single rows for sparse attention (positions DMA'd into SMEM one
tile at a time). DMAs past the count are skipped and their rows masked.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (
    check_dim,
    check_dtype,
    check_rank,
    resolve_backend,
    tpu_interpret,
)

_LOG2E = math.log2(math.e)
# Finite start for the running max: a tile whose tokens are all masked then gives
# exp2(-inf - finite) = 0 instead of exp2(-inf - -inf) = NaN.
_INIT_MAX = -1e30
_Q_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_KV_DTYPES = (jnp.bfloat16, jnp.float32, jnp.float16)
# Triton's smallest dot operand dimension.
_MIN_DOT_ROWS = 16


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GpuAttentionConfig:
    """Tiling of the GPU kernels. Hashable: passed as a static argument.

    Defaults are reasoned, not measured (no GPU was available when they were set); sweep
    block_tokens in {32, 64, 128}, num_warps in {4, 8}, num_stages in {2, 3, 4} and
    target_programs in {512, 1024, 2048} on the target.

    block_tokens: K/V rows per online-softmax step (a power of two >= 16).
    target_programs: splits are chosen so that batch * Hi * splits reaches about this many
      programs (a few waves over an H200's 132 SMs).
    max_splits: upper bound on splits (each split costs a partial of Rp x head_dim floats).
    """

    block_tokens: int = 64
    target_programs: int = 1024
    max_splits: int = 32
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        bt = self.block_tokens
        if bt < 16 or bt & (bt - 1):
            raise ValueError(f"block_tokens must be a power of two >= 16, got {bt}")
        if self.max_splits < 1:
            raise ValueError(f"max_splits must be >= 1, got {self.max_splits}")
        if self.target_programs < 1:
            raise ValueError(f"target_programs must be >= 1, got {self.target_programs}")

    def num_splits(self, batch: int, rows: int, capacity: int) -> int:
        """Splits per list row, from static shapes only (no retrace when counts change)."""
        wanted = _next_pow2(pl.cdiv(self.target_programs, max(1, batch * rows)))
        tiles = pl.cdiv(max(1, capacity), self.block_tokens)
        return max(1, min(wanted, self.max_splits, tiles))


# Defaults from the H200 sweep (docs/kernels.md, batch 64, 32K context, bf16, GQA 4): the
# dense loop gains from a third pipeline stage (2077 -> 2004 us), the gather-heavy sparse
# loop from shorter tiles (8192-token lists 564 -> 539 us, 512-token lists 86 -> 66 us).
DENSE_GPU_CONFIG = GpuAttentionConfig(block_tokens=64, num_warps=4, num_stages=3)
SPARSE_GPU_CONFIG = GpuAttentionConfig(block_tokens=32, num_warps=4, num_stages=2)


@dataclasses.dataclass(frozen=True)
class TpuAttentionConfig:
    """Tiling of the TPU kernels. Hashable: passed as a static argument.

    block_tokens: K/V rows per step (dense: rounded to whole pages, at least one page; sparse:
      rows DMA'd one by one, a multiple of 16 so bf16 tiles stay whole).
    """

    block_tokens: int = 128

    def __post_init__(self):
        bt = self.block_tokens
        if bt < 16 or bt % 16:
            raise ValueError(f"block_tokens must be a positive multiple of 16, got {bt}")

    def dense_pages_per_tile(self, page_size: int) -> int:
        return max(1, self.block_tokens // page_size)

    def sparse_tile(self, capacity: int) -> int:
        return min(self.block_tokens, 16 * pl.cdiv(capacity, 16))


# ---------------------------------------------------------------------------------------------
# Validation (static shapes and dtypes only; runs before any tracing of a kernel)
# ---------------------------------------------------------------------------------------------


def _check_cache(q, k_pages, v_pages, page_table) -> tuple[int, int, int, int]:
    check_rank("q", q, 3, "[batch, num_q_heads, head_dim]")
    check_rank("k_pages", k_pages, 4, "[num_kv_heads, num_pages, page_size, head_dim]")
    check_rank("page_table", page_table, 2, "[batch, max_pages]")
    if tuple(v_pages.shape) != tuple(k_pages.shape):
        raise ValueError(
            f"v_pages must have the shape of k_pages {tuple(k_pages.shape)}, "
            f"got {tuple(v_pages.shape)}"
        )
    check_dtype("q", q, _Q_DTYPES)
    check_dtype("k_pages", k_pages, _KV_DTYPES)
    if np.dtype(v_pages.dtype) != np.dtype(k_pages.dtype):
        raise ValueError(
            f"v_pages must have the dtype of k_pages ({np.dtype(k_pages.dtype)}), "
            f"got {np.dtype(v_pages.dtype)}"
        )
    check_dtype("page_table", page_table, (jnp.int32,))
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[0]
    check_dim("k_pages", k_pages, 3, head_dim, "head_dim, as in q")
    check_dim("page_table", page_table, 0, batch, "batch, as in q")
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"q num_q_heads={num_q_heads} must be a multiple of k_pages num_kv_heads={num_kv_heads}"
        )
    return batch, num_q_heads, num_kv_heads, head_dim


def _check_dense(q, k_pages, v_pages, page_table, lengths, scale) -> None:
    batch, *_ = _check_cache(q, k_pages, v_pages, page_table)
    check_rank("lengths", lengths, 1, "[batch]")
    check_dim("lengths", lengths, 0, batch, "batch, as in q")
    check_dtype("lengths", lengths, (jnp.int32,))
    _check_scale(scale)


def _check_sparse(q, k_pages, v_pages, page_table, token_pos, counts, scale) -> None:
    batch, num_q_heads, num_kv_heads, _ = _check_cache(q, k_pages, v_pages, page_table)
    check_rank("token_pos", token_pos, 3, "[batch, Hi, capacity]")
    check_dim("token_pos", token_pos, 0, batch, "batch, as in q")
    rows = token_pos.shape[1]
    if rows not in (num_kv_heads, num_q_heads):
        raise ValueError(
            f"token_pos dimension 1 (Hi) must be num_kv_heads={num_kv_heads} or "
            f"num_q_heads={num_q_heads}, got {rows}"
        )
    if token_pos.shape[2] < 1:
        raise ValueError(f"token_pos capacity must be >= 1, got shape {tuple(token_pos.shape)}")
    check_dtype("token_pos", token_pos, (jnp.int32,))
    check_rank("counts", counts, 2, "[batch, Hi]")
    if tuple(counts.shape) != (batch, rows):
        raise ValueError(
            f"counts must have shape {(batch, rows)} (batch, Hi of token_pos), "
            f"got {tuple(counts.shape)}"
        )
    check_dtype("counts", counts, (jnp.int32,))
    _check_scale(scale)


def _check_scale(scale) -> None:
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a Python number or None, got {type(scale).__name__}")


def _check_gpu_shapes(q) -> None:
    head_dim = q.shape[2]
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(
            f"q head_dim={head_dim} must be a power of two >= 16 for the GPU (Triton) kernel"
        )


def _scale_or_default(scale, head_dim: int) -> float:
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)


# ---------------------------------------------------------------------------------------------
# Reference (float32 jnp)
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("scale",))
def sparse_decode_attention_reference(
    q, k_pages, v_pages, page_table, token_pos, counts, *, scale=None
):
    """Exact attention over listed tokens, gathered into dense K/V, in float32.

    Shapes as in :func:`sparse_decode_attention`. Returns [batch, num_q_heads, head_dim] in
    q.dtype.
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    rows, capacity = token_pos.shape[1:]
    per_row = num_q_heads // rows
    kv_head = jnp.arange(rows) // (rows // num_kv_heads)  # [Hi]
    pos = jnp.clip(token_pos, 0, page_table.shape[1] * page_size - 1)
    page = jnp.take_along_axis(page_table, (pos // page_size).reshape(batch, -1), axis=1)
    page = jnp.clip(page.reshape(pos.shape), 0, k_pages.shape[1] - 1)
    listed = (jnp.arange(capacity) < counts[..., None])[..., None]  # [B, Hi, cap, 1]
    # Unlisted rows may hold anything (even NaN): zero them so 0 * garbage never happens.
    slot = pos % page_size
    k = jnp.where(listed, k_pages[kv_head[None, :, None], page, slot].astype(jnp.float32), 0.0)
    v = jnp.where(listed, v_pages[kv_head[None, :, None], page, slot].astype(jnp.float32), 0.0)
    qg = q.astype(jnp.float32).reshape(batch, rows, per_row, head_dim)
    logits = jnp.einsum("birj,bicj->birc", qg, k) * _scale_or_default(scale, head_dim)
    valid = jnp.swapaxes(listed, 2, 3)  # [B, Hi, 1, cap]
    m = jnp.max(jnp.where(valid, logits, -jnp.inf), axis=-1, keepdims=True)
    w = jnp.where(valid, jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = jnp.sum(w, axis=-1, keepdims=True)
    out = jnp.einsum("birc,bicj->birj", w / jnp.where(denom > 0, denom, 1.0), v)
    return out.reshape(batch, num_q_heads, head_dim).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("scale",))
def paged_decode_attention_reference(q, k_pages, v_pages, page_table, lengths, *, scale=None):
    """Dense reference: the sparse reference over positions 0 .. lengths[b]-1 of every KV head."""
    batch = q.shape[0]
    num_kv_heads, _, page_size, _ = k_pages.shape
    capacity = page_table.shape[1] * page_size
    token_pos = jnp.broadcast_to(
        jnp.arange(capacity, dtype=jnp.int32), (batch, num_kv_heads, capacity)
    )
    counts = jnp.broadcast_to(lengths[:, None], (batch, num_kv_heads))
    return sparse_decode_attention_reference(
        q, k_pages, v_pages, page_table, token_pos, counts, scale=scale
    )


# ---------------------------------------------------------------------------------------------
# GPU: Pallas Triton, flash-decoding over (batch, list row, split)
# ---------------------------------------------------------------------------------------------


def _gpu_kernel(
    count_ref,  # [1] tokens in this list row (dense: lengths[b])
    q_ref,  # [Rp, D] query rows of this list row, zero padded to Rp
    pt_ref,  # [max_pages] page table of sequence b
    k_ref,  # [num_pages * page_size, D] K rows of this KV head
    v_ref,  # [num_pages * page_size, D] V rows of this KV head
    *refs,  # sparse: pos_ref [capacity]; then o_ref [Rp, D], m_ref [Rp], den_ref [Rp]
    sparse: bool,
    num_splits: int,
    block_tokens: int,
    page_size: int,
    capacity: int,
    qk_scale_log2: float,
    precision,
):
    from jax.experimental.pallas import triton as plt

    if sparse:
        pos_ref, o_ref, m_ref, den_ref = refs
    else:
        o_ref, m_ref, den_ref = refs
    rp, head_dim = q_ref.shape
    max_tokens = pt_ref.shape[0] * page_size
    num_pages = k_ref.shape[0] // page_size

    count = jnp.minimum(count_ref[0], capacity)
    per_split = pl.cdiv(pl.cdiv(count, num_splits), block_tokens) * block_tokens
    start = pl.program_id(2) * per_split
    end = jnp.minimum(start + per_split, count)
    num_tiles = pl.cdiv(jnp.maximum(end - start, 0), block_tokens)

    q = q_ref[...]
    cols = jnp.arange(head_dim, dtype=jnp.int32)[None, :]

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
    o_ref[...] = acc
    m_ref[...] = m
    den_ref[...] = den


def _combine_splits(acc, m, den, rows_used: int):
    """Merges per-split partials: acc [B, Hi, S, Rp, D], m/den [B, Hi, S, Rp] (base-2 max)."""
    acc, m, den = acc[..., :rows_used, :], m[..., :rows_used], den[..., :rows_used]
    w = jnp.exp2(m - jnp.max(m, axis=2, keepdims=True))  # empty splits: den = 0, acc = 0
    total = jnp.sum(w * den, axis=2)
    out = jnp.sum(w[..., None] * acc, axis=2)
    return out / jnp.where(total > 0, total, 1.0)[..., None]


@functools.partial(jax.jit, static_argnames=("sparse", "scale", "config", "interpret"))
def _decode_attention_gpu(
    q, k_pages, v_pages, page_table, counts, token_pos, *, sparse, scale, config, interpret
):
    from jax.experimental.pallas import triton as plt

    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    rows = token_pos.shape[1] if sparse else num_kv_heads
    per_row = num_q_heads // rows
    rows_per_kv = rows // num_kv_heads
    capacity = token_pos.shape[2] if sparse else page_table.shape[1] * page_size
    splits = config.num_splits(batch, rows, capacity)
    rp = max(_MIN_DOT_ROWS, _next_pow2(per_row))

    qg = q.astype(k_pages.dtype).reshape(batch, rows, per_row, head_dim)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rp - per_row), (0, 0)))
    # Free reshapes: pages are contiguous, so row page*page_size + slot addresses a token.
    k_rows = k_pages.reshape(num_kv_heads, num_pages * page_size, head_dim)
    v_rows = v_pages.reshape(num_kv_heads, num_pages * page_size, head_dim)
    counts = counts.reshape(-1)  # [B * Hi] (dense: [B])

    kv_spec = pl.BlockSpec(
        (None, num_pages * page_size, head_dim), lambda b, i, s: (i // rows_per_kv, 0, 0)
    )
    in_specs = [
        pl.BlockSpec((1,), (lambda b, i, s: (b * rows + i,)) if sparse else (lambda b, i, s: (b,))),
        pl.BlockSpec((None, None, rp, head_dim), lambda b, i, s: (b, i, 0, 0)),
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
        sparse=sparse,
        num_splits=splits,
        block_tokens=config.block_tokens,
        page_size=page_size,
        capacity=capacity,
        qk_scale_log2=_scale_or_default(scale, head_dim) * _LOG2E,
        precision=precision,
    )
    acc, m, den = pl.pallas_call(
        kernel,
        grid=(batch, rows, splits),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, None, rp, head_dim), lambda b, i, s: (b, i, s, 0, 0)),
            pl.BlockSpec((None, None, None, rp), lambda b, i, s: (b, i, s, 0)),
            pl.BlockSpec((None, None, None, rp), lambda b, i, s: (b, i, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, rows, splits, rp, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, rows, splits, rp), jnp.float32),
            jax.ShapeDtypeStruct((batch, rows, splits, rp), jnp.float32),
        ],
        compiler_params=plt.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="sparse_decode_attention" if sparse else "paged_decode_attention",
    )(*args)
    out = _combine_splits(acc, m, den, per_row)
    return out.reshape(batch, num_q_heads, head_dim).astype(q.dtype)


def paged_decode_attention_gpu(
    q, k_pages, v_pages, page_table, lengths, *, scale=None, config=None, interpret=False
):
    """Dense paged decode attention, Pallas Triton kernel. Arguments as in the public entry."""
    _check_dense(q, k_pages, v_pages, page_table, lengths, scale)
    _check_gpu_shapes(q)
    return _decode_attention_gpu(
        q,
        k_pages,
        v_pages,
        page_table,
        lengths,
        None,
        sparse=False,
        scale=scale,
        config=config or DENSE_GPU_CONFIG,
        interpret=interpret,
    )


def sparse_decode_attention_gpu(
    q, k_pages, v_pages, page_table, token_pos, counts, *, scale=None, config=None, interpret=False
):
    """Sparse decode attention, Pallas Triton kernel. Arguments as in the public entry."""
    _check_sparse(q, k_pages, v_pages, page_table, token_pos, counts, scale)
    _check_gpu_shapes(q)
    return _decode_attention_gpu(
        q,
        k_pages,
        v_pages,
        page_table,
        counts,
        token_pos,
        sparse=True,
        scale=scale,
        config=config or SPARSE_GPU_CONFIG,
        interpret=interpret,
    )


# ---------------------------------------------------------------------------------------------
# TPU: Pallas Mosaic, one program per (batch, list row), double-buffered manual DMAs
# ---------------------------------------------------------------------------------------------


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
    from jax.experimental.pallas import tpu as pltpu

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
def _decode_attention_tpu(
    q, k_pages, v_pages, page_table, counts, token_pos, *, sparse, scale, config, interpret
):
    from jax.experimental.pallas import tpu as pltpu

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
        qk_scale=_scale_or_default(scale, head_dim),
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
        interpret=tpu_interpret(interpret),
        name="sparse_decode_attention_tpu" if sparse else "paged_decode_attention_tpu",
    )(page_table.reshape(-1), counts.reshape(-1), *args)
    return out.reshape(batch, num_q_heads, head_dim)


def paged_decode_attention_tpu(
    q, k_pages, v_pages, page_table, lengths, *, scale=None, config=None, interpret=False
):
    """Dense paged decode attention, Pallas Mosaic TPU kernel. Arguments as in the public entry."""
    _check_dense(q, k_pages, v_pages, page_table, lengths, scale)
    return _decode_attention_tpu(
        q,
        k_pages,
        v_pages,
        page_table,
        lengths,
        None,
        sparse=False,
        scale=scale,
        config=config or TpuAttentionConfig(),
        interpret=interpret,
    )


def sparse_decode_attention_tpu(
    q, k_pages, v_pages, page_table, token_pos, counts, *, scale=None, config=None, interpret=False
):
    """Sparse decode attention, Pallas Mosaic TPU kernel. Arguments as in the public entry."""
    _check_sparse(q, k_pages, v_pages, page_table, token_pos, counts, scale)
    return _decode_attention_tpu(
        q,
        k_pages,
        v_pages,
        page_table,
        counts,
        token_pos,
        sparse=True,
        scale=scale,
        config=config or TpuAttentionConfig(),
        interpret=interpret,
    )


# ---------------------------------------------------------------------------------------------
# Public entries
# ---------------------------------------------------------------------------------------------


def _check_config(config, impl: str) -> None:
    want = {"gpu": GpuAttentionConfig, "tpu": TpuAttentionConfig}.get(impl)
    if config is not None and want is not None and not isinstance(config, want):
        raise ValueError(
            f"config must be a {want.__name__} or None for the {impl} kernel, "
            f"got {type(config).__name__}"
        )


def paged_decode_attention(
    q, k_pages, v_pages, page_table, lengths, *, scale=None, backend="auto", config=None
):
    """Exact decode attention of each sequence over all of its cached tokens.

    Args:
      q: [batch, num_q_heads, head_dim] float32 / bfloat16, post-RoPE.
      k_pages, v_pages: [num_kv_heads, num_pages, page_size, head_dim] bfloat16 (or float32).
      page_table: [batch, max_pages] int32, logical page -> physical page.
      lengths: [batch] int32, tokens 0 .. lengths[b]-1 are attended (0 gives zeros).
      scale: logit scale, a Python number; default 1 / sqrt(head_dim).
      backend: "auto" | "pallas" | "pallas_gpu" | "pallas_tpu" | "reference".
      config: GpuAttentionConfig / TpuAttentionConfig for the Pallas kernel (default tiles);
        ignored by the reference.

    Returns:
      [batch, num_q_heads, head_dim] in q.dtype. Softmax and accumulation in float32; a
      bfloat16 cache is read as is and q is cast to its dtype for the dots.
    """
    _check_dense(q, k_pages, v_pages, page_table, lengths, scale)
    impl, interpret = resolve_backend(backend)
    _check_config(config, impl)
    args = (q, k_pages, v_pages, page_table, lengths)
    if impl == "reference":
        return paged_decode_attention_reference(*args, scale=scale)
    kernel = paged_decode_attention_gpu if impl == "gpu" else paged_decode_attention_tpu
    return kernel(*args, scale=scale, config=config, interpret=interpret)


def sparse_decode_attention(
    q, k_pages, v_pages, page_table, token_pos, counts, *, scale=None, backend="auto", config=None
):
    """Exact decode attention over a list of token positions per (sequence, list row).

    Args:
      q: [batch, num_q_heads, head_dim] float32 / bfloat16, post-RoPE.
      k_pages, v_pages: [num_kv_heads, num_pages, page_size, head_dim] bfloat16 (or float32).
      page_table: [batch, max_pages] int32, logical page -> physical page.
      token_pos: [batch, Hi, capacity] int32 logical positions. Hi = num_kv_heads: one list per
        KV group, shared by its G query heads (K/V rows read once per group); Hi =
        num_q_heads: one list per query head. Entries at or past counts are ignored.
      counts: [batch, Hi] int32, listed tokens per row (0 gives zeros). Duplicated positions
        count twice: callers pass unique positions.
      scale: logit scale, a Python number; default 1 / sqrt(head_dim).
      backend: "auto" | "pallas" | "pallas_gpu" | "pallas_tpu" | "reference".
      config: GpuAttentionConfig / TpuAttentionConfig for the Pallas kernel (default tiles);
        ignored by the reference.

    Returns:
      [batch, num_q_heads, head_dim] in q.dtype. Softmax and accumulation in float32; a
      bfloat16 cache is read as is and q is cast to its dtype for the dots.
    """
    _check_sparse(q, k_pages, v_pages, page_table, token_pos, counts, scale)
    impl, interpret = resolve_backend(backend)
    _check_config(config, impl)
    args = (q, k_pages, v_pages, page_table, token_pos, counts)
    if impl == "reference":
        return sparse_decode_attention_reference(*args, scale=scale)
    kernel = sparse_decode_attention_gpu if impl == "gpu" else sparse_decode_attention_tpu
    return kernel(*args, scale=scale, config=config, interpret=interpret)

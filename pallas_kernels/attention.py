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

Kernels: attention_gpu (Pallas Triton, flash-decoding over (batch, list row, split)) and
attention_tpu (Pallas Mosaic, one program per (batch, list row) with double-buffered DMAs).
This module holds their configs (one table of tuned defaults), the argument checks, the
references and the public entries.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import _common, attention_gpu, attention_tpu
from pallas_kernels._common import check_dim, check_dtype, check_rank

_Q_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_KV_DTYPES = (jnp.bfloat16, jnp.float32, jnp.float16)

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

# Tuned defaults, one config per kernel (H200, batch 64, 32K context, bf16, 32 query / 8 KV
# heads, head_dim 128, page 16; the alternatives and their times: docs/results/
# kernels-sweep-h200.md, kernels-sweep2-h200.md):
#   GPU dense  (DENSE_GPU_CONFIG): 64-token tiles, 3 stages: 2004 us.
#   GPU sparse (SPARSE_GPU_CONFIG, the class defaults): 32-token tiles, 2 stages: 539 us for
#       8192-token lists, 66 us for 512-token lists.
#   Both: 4 warps, 1024 target programs, at most 32 splits.
#   TPU block_tokens 128: not measured.


@dataclasses.dataclass(frozen=True)
class AttentionGpuConfig:
    """Tiling of the GPU kernels. Hashable: passed as a static argument.

    block_tokens: K/V rows per online-softmax step (a power of two >= 16).
    target_programs: splits are chosen so that batch * Hi * splits reaches about this many
      programs (a few waves over an H200's 132 SMs).
    max_splits: upper bound on splits (each split costs a partial of Rp x head_dim floats).
    num_warps, num_stages: Triton launch parameters; num_stages pipelines the tile loop.
    """

    block_tokens: int = 32
    target_programs: int = 1024
    max_splits: int = 32
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        _common.check_pow2("AttentionGpuConfig", "block_tokens", self.block_tokens, 16)
        _common.check_pow2("AttentionGpuConfig", "num_warps", self.num_warps)
        for name in ("target_programs", "max_splits", "num_stages"):
            _common.check_positive("AttentionGpuConfig", name, getattr(self, name))

    def num_splits(self, batch: int, rows: int, capacity: int) -> int:
        """Splits per list row, from static shapes only (no retrace when counts change)."""
        wanted = pl.next_power_of_2(pl.cdiv(self.target_programs, max(1, batch * rows)))
        tiles = pl.cdiv(max(1, capacity), self.block_tokens)
        return max(1, min(wanted, self.max_splits, tiles))


DENSE_GPU_CONFIG = AttentionGpuConfig(block_tokens=64, num_stages=3)
SPARSE_GPU_CONFIG = AttentionGpuConfig()


@dataclasses.dataclass(frozen=True)
class AttentionTpuConfig:
    """Tiling of the TPU kernels. Hashable: passed as a static argument.

    block_tokens: K/V rows per step (dense: rounded to whole pages, at least one page; sparse:
      rows DMA'd one by one, a multiple of 16 so bf16 tiles stay whole).
    """

    block_tokens: int = 128

    def __post_init__(self):
        bt = self.block_tokens
        if isinstance(bt, bool) or not isinstance(bt, int) or bt < 16 or bt % 16:
            raise ValueError(
                f"AttentionTpuConfig.block_tokens must be a positive multiple of 16, got {bt!r}"
            )

    def dense_pages_per_tile(self, page_size: int) -> int:
        return max(1, self.block_tokens // page_size)

    def sparse_tile(self, capacity: int) -> int:
        return min(self.block_tokens, 16 * pl.cdiv(capacity, 16))


DEFAULT_TPU_CONFIG = AttentionTpuConfig()


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
    if head_dim < 16 or not _common.is_pow2(head_dim):
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
# The kernels with the public signatures: checks, default config, then attention_gpu /
# attention_tpu
# ---------------------------------------------------------------------------------------------


def paged_decode_attention_gpu(
    q, k_pages, v_pages, page_table, lengths, *, scale=None, config=None, interpret=False
):
    """Dense paged decode attention, Pallas Triton kernel. Arguments as in the public entry."""
    _check_dense(q, k_pages, v_pages, page_table, lengths, scale)
    _check_gpu_shapes(q)
    return attention_gpu.decode_attention_gpu(
        q,
        k_pages,
        v_pages,
        page_table,
        lengths,
        None,
        sparse=False,
        scale=_scale_or_default(scale, q.shape[2]),
        config=config or DENSE_GPU_CONFIG,
        interpret=interpret,
    )


def sparse_decode_attention_gpu(
    q, k_pages, v_pages, page_table, token_pos, counts, *, scale=None, config=None, interpret=False
):
    """Sparse decode attention, Pallas Triton kernel. Arguments as in the public entry."""
    _check_sparse(q, k_pages, v_pages, page_table, token_pos, counts, scale)
    _check_gpu_shapes(q)
    return attention_gpu.decode_attention_gpu(
        q,
        k_pages,
        v_pages,
        page_table,
        counts,
        token_pos,
        sparse=True,
        scale=_scale_or_default(scale, q.shape[2]),
        config=config or SPARSE_GPU_CONFIG,
        interpret=interpret,
    )


def paged_decode_attention_tpu(
    q, k_pages, v_pages, page_table, lengths, *, scale=None, config=None, interpret=False
):
    """Dense paged decode attention, Pallas Mosaic TPU kernel. Arguments as in the public entry."""
    _check_dense(q, k_pages, v_pages, page_table, lengths, scale)
    return attention_tpu.decode_attention_tpu(
        q,
        k_pages,
        v_pages,
        page_table,
        lengths,
        None,
        sparse=False,
        scale=_scale_or_default(scale, q.shape[2]),
        config=config or DEFAULT_TPU_CONFIG,
        interpret=interpret,
    )


def sparse_decode_attention_tpu(
    q, k_pages, v_pages, page_table, token_pos, counts, *, scale=None, config=None, interpret=False
):
    """Sparse decode attention, Pallas Mosaic TPU kernel. Arguments as in the public entry."""
    _check_sparse(q, k_pages, v_pages, page_table, token_pos, counts, scale)
    return attention_tpu.decode_attention_tpu(
        q,
        k_pages,
        v_pages,
        page_table,
        counts,
        token_pos,
        sparse=True,
        scale=_scale_or_default(scale, q.shape[2]),
        config=config or DEFAULT_TPU_CONFIG,
        interpret=interpret,
    )


# ---------------------------------------------------------------------------------------------
# Public entries
# ---------------------------------------------------------------------------------------------


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
      backend: "auto" | "pallas" | "pallas_gpu" | "pallas_tpu" | "reference"
        (docs/kernel_api.md).
      config: AttentionGpuConfig or AttentionTpuConfig for the kernel that runs; None: the
        tuned defaults (DENSE_GPU_CONFIG / SPARSE_GPU_CONFIG, AttentionTpuConfig()).

    Returns:
      [batch, num_q_heads, head_dim] in q.dtype. Softmax and accumulation in float32; a
      bfloat16 cache is read as is and q is cast to its dtype for the dots.
    """
    _check_dense(q, k_pages, v_pages, page_table, lengths, scale)
    return _common.implementation(
        backend,
        config,
        reference=paged_decode_attention_reference,
        gpu=(paged_decode_attention_gpu, DENSE_GPU_CONFIG),
        tpu=(paged_decode_attention_tpu, DEFAULT_TPU_CONFIG),
    )(q, k_pages, v_pages, page_table, lengths, scale=scale)


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
      backend: "auto" | "pallas" | "pallas_gpu" | "pallas_tpu" | "reference"
        (docs/kernel_api.md).
      config: AttentionGpuConfig or AttentionTpuConfig for the kernel that runs; None: the
        tuned defaults (DENSE_GPU_CONFIG / SPARSE_GPU_CONFIG, AttentionTpuConfig()).

    Returns:
      [batch, num_q_heads, head_dim] in q.dtype. Softmax and accumulation in float32; a
      bfloat16 cache is read as is and q is cast to its dtype for the dots.
    """
    _check_sparse(q, k_pages, v_pages, page_table, token_pos, counts, scale)
    return _common.implementation(
        backend,
        config,
        reference=sparse_decode_attention_reference,
        gpu=(sparse_decode_attention_gpu, SPARSE_GPU_CONFIG),
        tpu=(sparse_decode_attention_tpu, DEFAULT_TPU_CONFIG),
    )(q, k_pages, v_pages, page_table, token_pos, counts, scale=scale)

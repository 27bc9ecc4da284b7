"""Block SpGEMV: estimated attention logits over candidate blocks from the INT4 K cache.

For each (sequence b, KV head g) the selector proposes up to C candidate blocks
(``cand_blocks[b, g, :cand_count[b, g]]``, logical block ids; a block is ``block_size``
consecutive positions, ``block_size`` divides ``page_size``). For every position of every
candidate block and every query head h of the group we estimate

    logit[b, h, c * block_size + i] = scale * q[b, h] . dequant(K_int4 at position p)
    p = cand_blocks[b, g, c] * block_size + i

with ``dequant(n) = k_scale * n + k_zero`` per token (docs/kernel_api.md, "INT4 nibble
order"). Entries past the count and positions outside ``[0, lengths[b])`` give ``-inf``.

Both kernels use the identity ``q . (s * n + z) = s * (q . n) + z * sum(q)``: the dot runs on
the raw nibbles (small integers, exact in bf16) and the per-token scale and zero are applied
to the [heads, tokens] result instead of to the [tokens, head_dim] rows.

Kernels: spgemv_gpu (Pallas Triton: a (sequence, KV head, split) grid looping over tiles of
candidate blocks, each tile's INT4 rows gathered once for all G query heads) and spgemv_tpu
(Pallas Mosaic: one candidate block per grid step). This module holds their configs (one table
of tuned defaults), the argument checks, the reference and the public entry.

Layouts (docs/kernel_api.md): q ``[B, Hq, D]``; k_int4 ``[Hkv, P, S, D // 2]`` uint8;
k_scale, k_zero ``[Hkv, P, S]`` float32; page_table ``[B, max_pages]``; lengths ``[B]``;
cand_blocks ``[B, Hkv, C]``; cand_count ``[B, Hkv]`` (all int32), or None for the count that
follows the lengths (``min(ceil(lengths[b] / block_size), C)``). Output ``[B, Hq, C * bs]``
float32.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import _common, spgemv_gpu, spgemv_tpu

_INDEX_DTYPES = (np.int32,)


# Tuned defaults (H200, batch 64, 32K context, 8192 candidate tokens = 512 pages of 16 per
# (sequence, KV head), head_dim 128, bf16 q; the alternatives and their times: docs/results/
# kernels-sweep{,2,3,4,6,8}-h200.*):
#   GPU tokens_per_chunk 128, target_programs 4096, max_splits 64, num_warps 4, next tile's
#       lookups carried in the loop, 4-byte words.
#   GPU num_stages 3: faster than 1 and 2 at batch 8, 32 and 64, each config timed twice in
#       rotation (docs/results/session-2026-12-04e/spgemv-configs.md).
#   TPU: no knobs (one candidate block per grid step); not measured.


@dataclasses.dataclass(frozen=True)
class SpGEMVGpuConfig:
    """Tuning knobs of the GPU kernel.

    tokens_per_chunk: candidate tokens (output columns) per loop step, the tile; a power of
      two >= 16 (Triton's dot needs every dim >= 16). 128 tokens is 8 KB of INT4 rows per
      step, about the bytes of one K+V step of the sparse attention kernel. Capped at the
      (power-of-two rounded) candidate capacity for small problems.
    target_programs: splits per (sequence, KV head) are chosen from static shapes so that
      batch * Hkv * splits reaches about this many programs (a few per SM on an H200).
    max_splits: upper bound on the splits.
    num_warps, num_stages: Triton launch parameters; num_stages pipelines the tile loop.
    """

    tokens_per_chunk: int = 128
    target_programs: int = 4096
    max_splits: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        _common.check_pow2("SpGEMVGpuConfig", "tokens_per_chunk", self.tokens_per_chunk, 16)
        _common.check_pow2("SpGEMVGpuConfig", "num_warps", self.num_warps)
        for name in ("num_stages", "target_programs", "max_splits"):
            _common.check_positive("SpGEMVGpuConfig", name, getattr(self, name))

    def num_splits(self, rows: int, tiles: int) -> int:
        """Splits per (sequence, KV head) row from static shapes (no retrace as counts change).

        rows: batch * Hkv; tiles: tiles of the candidate capacity.
        """
        wanted = pl.next_power_of_2(pl.cdiv(self.target_programs, max(1, rows)))
        return max(1, min(wanted, self.max_splits, tiles))


@dataclasses.dataclass(frozen=True)
class SpGEMVTpuConfig:
    """The TPU kernel has no tuning knobs: one candidate block per grid step (see
    ``block_spgemv_tpu``). The class completes the op's config convention: ``config=`` of
    ``block_spgemv`` takes either kind."""


DEFAULT_GPU_CONFIG = SpGEMVGpuConfig()
DEFAULT_TPU_CONFIG = SpGEMVTpuConfig()


# --------------------------------------------------------------------------------------------
# Validation


def _check_args(
    q, k_int4, k_scale, k_zero, page_table, lengths, cand_blocks, cand_count, block_size, scale
) -> None:
    """Static shape/dtype checks; raises ValueError naming the argument."""
    _common.check_rank("q", q, 3, "[batch, num_q_heads, head_dim]")
    _common.check_dtype("q", q, (jnp.float32, jnp.bfloat16))
    _common.check_rank("k_int4", k_int4, 4, "[num_kv_heads, num_pages, page_size, head_dim // 2]")
    _common.check_dtype("k_int4", k_int4, (np.uint8,))
    batch, num_q_heads, head_dim = np.shape(q)
    num_kv_heads, num_pages, page_size, half = np.shape(k_int4)
    if head_dim % 2:
        raise ValueError(f"q head_dim must be even (two INT4 nibbles per byte), got {head_dim}")
    _common.check_dim("k_int4", k_int4, 3, head_dim // 2, "head_dim // 2 of q")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"q num_q_heads={num_q_heads} must be a multiple of k_int4 num_kv_heads={num_kv_heads}"
        )
    for name, x in (("k_scale", k_scale), ("k_zero", k_zero)):
        _common.check_rank(name, x, 3, "[num_kv_heads, num_pages, page_size]")
        _common.check_dtype(name, x, (np.float32,))
        for axis, n, what in (
            (0, num_kv_heads, "num_kv_heads"),
            (1, num_pages, "num_pages"),
            (2, page_size, "page_size"),
        ):
            _common.check_dim(name, x, axis, n, what + " of k_int4")
    _common.check_rank("page_table", page_table, 2, "[batch, max_pages]")
    _common.check_dtype("page_table", page_table, _INDEX_DTYPES)
    _common.check_dim("page_table", page_table, 0, batch, "batch of q")
    _common.check_rank("lengths", lengths, 1, "[batch]")
    _common.check_dtype("lengths", lengths, _INDEX_DTYPES)
    _common.check_dim("lengths", lengths, 0, batch, "batch of q")
    _common.check_rank("cand_blocks", cand_blocks, 3, "[batch, num_kv_heads, num_candidates]")
    _common.check_dtype("cand_blocks", cand_blocks, _INDEX_DTYPES)
    _common.check_dim("cand_blocks", cand_blocks, 0, batch, "batch of q")
    _common.check_dim("cand_blocks", cand_blocks, 1, num_kv_heads, "num_kv_heads of k_int4")
    if cand_count is not None:
        _common.check_rank("cand_count", cand_count, 2, "[batch, num_kv_heads]")
        _common.check_dtype("cand_count", cand_count, _INDEX_DTYPES)
        _common.check_dim("cand_count", cand_count, 0, batch, "batch of q")
        _common.check_dim("cand_count", cand_count, 1, num_kv_heads, "num_kv_heads of k_int4")
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool):
        raise ValueError(f"block_size must be a static int, got {block_size!r}")
    if block_size <= 0 or page_size % block_size:
        raise ValueError(
            f"block_size={block_size} must be a positive divisor of page_size={page_size}"
        )
    if scale is not None and not isinstance(scale, (int, float, np.floating, np.integer)):
        raise ValueError(f"scale must be a Python number or None, got {type(scale).__name__}")


def _check_gpu_args(head_dim: int, block_size: int) -> None:
    """Extra limits of the Triton kernel: every in-kernel array dim is a power of two."""
    half = head_dim // 2
    if not _common.is_pow2(half) or half < 16:
        raise ValueError(
            f"q head_dim={head_dim}: the GPU kernel needs head_dim // 2 a power of two >= 16"
        )
    if not _common.is_pow2(block_size):
        raise ValueError(f"block_size={block_size}: the GPU kernel needs a power of two")


def _attn_scale(scale, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def counts_from_lengths(lengths, block_size: int, num_cand: int, num_kv_heads: int):
    """The count ``cand_count=None`` stands for: min(ceil(lengths[b] / block_size), C) for
    every KV head, [B, Hkv] int32 (lengths below 0 count 0)."""
    count = jnp.minimum(-(-jnp.maximum(lengths, 0) // block_size), num_cand).astype(jnp.int32)
    return jnp.broadcast_to(count[:, None], (lengths.shape[0], num_kv_heads))


# --------------------------------------------------------------------------------------------
# Reference


def block_spgemv_reference(
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
    scale: float | None = None,
):
    """Plain-jnp float32 estimate; same arguments and result as `block_spgemv`."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_int4.shape[0]
    page_size = k_int4.shape[2]
    max_pages = page_table.shape[1]
    group = num_q_heads // num_kv_heads
    num_cand = cand_blocks.shape[2]
    pos = cand_blocks[..., None] * block_size + jnp.arange(block_size)  # [B, Hkv, C, bs]
    pos = pos.reshape(batch, num_kv_heads, num_cand * block_size)
    lpage = jnp.clip(pos // page_size, 0, max_pages - 1)
    phys = jnp.take_along_axis(page_table[:, None, :], lpage, axis=2)  # [B, Hkv, N]
    head = jnp.arange(num_kv_heads)[None, :, None]
    slot = pos % page_size
    packed = k_int4[head, phys, slot]  # [B, Hkv, N, D/2]
    nibbles = jnp.concatenate([packed & 15, packed >> 4], axis=-1).astype(jnp.float32)
    k_hat = k_scale[head, phys, slot][..., None] * nibbles + k_zero[head, phys, slot][..., None]
    qg = q.astype(jnp.float32).reshape(batch, num_kv_heads, group, head_dim)
    logits = jnp.einsum("bkgd,bknd->bkgn", qg, k_hat, precision=jax.lax.Precision.HIGHEST)
    logits = logits * _attn_scale(scale, head_dim)
    if cand_count is None:
        cand_count = counts_from_lengths(lengths, block_size, num_cand, num_kv_heads)
    entry = jnp.arange(num_cand * block_size) // block_size
    valid = (entry < cand_count[:, :, None]) & (pos >= 0) & (pos < lengths[:, None, None])
    logits = jnp.where(valid[:, :, None, :], logits, -jnp.inf)
    return logits.reshape(batch, num_q_heads, num_cand * block_size)


# --------------------------------------------------------------------------------------------
# The kernels with the public signatures (checks and defaults, then spgemv_gpu / spgemv_tpu)


def block_spgemv_gpu(
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
    scale: float | None = None,
    config: SpGEMVGpuConfig = DEFAULT_GPU_CONFIG,
    interpret: bool = False,
):
    """Pallas Triton kernel; arguments and result as `block_spgemv` (checked by the caller,
    but for the Triton kernel's own limits, checked here)."""
    _check_gpu_args(q.shape[2], block_size)
    return spgemv_gpu.launch(
        q,
        k_int4,
        k_scale,
        k_zero,
        page_table,
        lengths,
        cand_blocks,
        cand_count,
        block_size=block_size,
        attn_scale=_attn_scale(scale, q.shape[2]),
        config=config,
        interpret=interpret,
    )


def block_spgemv_tpu(
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
    scale: float | None = None,
    config: SpGEMVTpuConfig = DEFAULT_TPU_CONFIG,
    interpret: bool = False,
):
    """Pallas Mosaic TPU kernel; arguments and result as `block_spgemv` (checked by the caller).
    config has no knobs (see SpGEMVTpuConfig)."""
    del config
    if cand_count is None:  # the TPU kernel prefetches the counts to SMEM
        num_cand, num_kv_heads = cand_blocks.shape[2], k_int4.shape[0]
        cand_count = counts_from_lengths(lengths, block_size, num_cand, num_kv_heads)
    return spgemv_tpu.launch(
        q,
        k_int4,
        k_scale,
        k_zero,
        page_table,
        lengths,
        cand_blocks,
        cand_count,
        block_size=block_size,
        attn_scale=_attn_scale(scale, q.shape[2]),
        interpret=interpret,
    )


# --------------------------------------------------------------------------------------------
# Public entry


def block_spgemv(
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
    scale: float | None = None,
    backend: str = "auto",
    config: SpGEMVGpuConfig | SpGEMVTpuConfig | None = None,
):
    """Estimated logits of the candidate blocks from the INT4 K cache (Twilight's SpGEMV).

    Args:
      q: [batch, num_q_heads, head_dim] float32 or bfloat16, post-RoPE queries.
      k_int4: [num_kv_heads, num_pages, page_size, head_dim // 2] uint8; byte j of a row holds
        element j (low nibble) and element j + head_dim // 2 (high nibble).
      k_scale, k_zero: [num_kv_heads, num_pages, page_size] float32; K ~ scale * nibble + zero.
      page_table: [batch, max_pages] int32, logical page -> physical page.
      lengths: [batch] int32, tokens in the cache per sequence.
      cand_blocks: [batch, num_kv_heads, C] int32 logical block ids (block = block_size
        consecutive positions); entry c is used for c < cand_count[b, g].
      cand_count: [batch, num_kv_heads] int32 valid entries (clamped to [0, C]); None: the
        count follows the lengths, min(ceil(lengths[b] / block_size), C) for every KV head,
        which is what a list with the blocks below the length first needs (Quest's pages in
        ascending order, every page); the GPU kernel computes it from the lengths it reads
        anyway, so no XLA op has to.
      block_size: static; divides page_size (page_size for Quest pages, 1 for tokens).
      scale: static logit scale, default 1 / sqrt(head_dim).
      backend: "auto" | "pallas" | "pallas_gpu" | "pallas_tpu" | "reference"
        (docs/kernel_api.md).
      config: SpGEMVGpuConfig or SpGEMVTpuConfig for the kernel that runs; None: the
        defaults.

    Returns:
      [batch, num_q_heads, C * block_size] float32. Column c * block_size + i holds the logit
      of position p = cand_blocks[b, g, c] * block_size + i for query head h (g = h // G);
      -inf where c >= cand_count[b, g] or p is outside [0, lengths[b]).
    """
    _check_args(
        q, k_int4, k_scale, k_zero, page_table, lengths, cand_blocks, cand_count, block_size, scale
    )
    run = _common.implementation(
        backend,
        config,
        reference=_reference_jit,
        gpu=(_gpu_jit, DEFAULT_GPU_CONFIG),
        tpu=(_tpu_jit, DEFAULT_TPU_CONFIG),
    )
    batch, num_q_heads, _ = q.shape
    if cand_blocks.shape[2] == 0:
        return jnp.zeros((batch, num_q_heads, 0), jnp.float32)
    args = (q, k_int4, k_scale, k_zero, page_table, lengths, cand_blocks, cand_count)
    return run(*args, block_size=int(block_size), scale=scale)


_reference_jit = jax.jit(block_spgemv_reference, static_argnames=("block_size", "scale"))
_gpu_jit = jax.jit(block_spgemv_gpu, static_argnames=("block_size", "scale", "config", "interpret"))
_tpu_jit = jax.jit(block_spgemv_tpu, static_argnames=("block_size", "scale", "config", "interpret"))

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
to the [heads, tokens] result instead of to the [tokens, head_dim] rows. The GPU kernel turns
a nibble into the bf16 value 128 + n with bit operations only and folds the offset into the
zero term (see _unpack_nibbles).

GPU kernel (Triton): grid (B, Hkv, splits). A program loops over its share of the tiles of
candidate blocks holding entries below cand_count (the trip count follows the count, so work
is proportional to it); per tile it gathers the page ids of the blocks, then the packed rows
of all their tokens in one masked vector gather, as [T, D / (2 W)] words of W bytes (the cache
bitcast to uint32 in the wrapper, W = 4, or to uint16 / uint8 where head_dim is too small for
Triton's dot: Triton emits one load per gathered element, so wider words mean fewer loads),
multiplies them by the G query rows of the KV head (padded to 16 for the MMA, loaded once per
program, their columns permuted to match the nibble order inside the words), so the INT4 bytes
are read once for the whole group, and stores the tile's logits. The cand -> page-table
lookups of the next tile are issued in the current step (carried in the loop), so a tile's row
gather does not wait behind two dependent loads. Then the program writes -inf over its share of
the tiles past the count.
TPU kernel (Mosaic): grid (B, Hkv, C), one candidate block per step, the page fetched by a
scalar-prefetched physical page id in the index map.

Layouts (docs/kernel_api.md): q ``[B, Hq, D]``; k_int4 ``[Hkv, P, S, D // 2]`` uint8;
k_scale, k_zero ``[Hkv, P, S]`` float32; page_table ``[B, max_pages]``; lengths ``[B]``;
cand_blocks ``[B, Hkv, C]``; cand_count ``[B, Hkv]`` (all int32). Output ``[B, Hq, C * bs]``
float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt

from pallas_kernels import _common

_INDEX_DTYPES = (np.int32,)
# Gather word width in bytes -> the unsigned dtype the packed rows are bitcast to.
_WORD_DTYPES = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
_MAX_WORD_BYTES = 4


# Tuned defaults (H200, batch 64, 32K context, 8192 candidate tokens = 512 pages of 16 per
# (sequence, KV head), head_dim 128, bf16 q; docs/results/kernels-sweep{2,3,4,6,8}-h200.*):
#   GPU tokens_per_chunk 128, target_programs 4096, max_splits 64, num_warps 4, num_stages 2,
#       next tile's lookups carried in the loop, 4-byte words: 227-236 us (sweeps 4, 6, 8).
#       Around it: 3 stages 228, 1 stage 233, 8192 programs 229, 1024 programs 248-256,
#       64-token tiles 294, no carried lookup 258-261, page-run gathers 242-247 us. Earlier
#       one-tile-per-program runs (sweeps 2, 3): 1-, 2- and 4-byte words 238, 252, 248 us; tiles
#       computed token-major ([T, Gp], the nibbles as the MMA's M operand) 266-337 us.
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
    num_stages: int = 2

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


def _word_bytes(head_dim: int) -> int:
    """Gather word width of the GPU kernel: the largest w <= 4 with head_dim // (2 * w) >= 16
    (the dots contract over that many words; Triton's dot needs >= 16). head_dim // 2 is a power
    of two >= 16 on the GPU path, so w = 1 always qualifies."""
    w = _MAX_WORD_BYTES
    while w > 1 and head_dim // (2 * w) < 16:
        w //= 2
    return w


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
    entry = jnp.arange(num_cand * block_size) // block_size
    valid = (entry < cand_count[:, :, None]) & (pos >= 0) & (pos < lengths[:, None, None])
    logits = jnp.where(valid[:, :, None, :], logits, -jnp.inf)
    return logits.reshape(batch, num_q_heads, num_cand * block_size)


# --------------------------------------------------------------------------------------------
# GPU (Pallas Triton)


# bf16 bit pattern 0x4300 is 128.0 and its 7 mantissa bits count in units of 1, so
# (0x4300 | n) is exactly 128 + n for a nibble n: an unpack with two integer ops and a free
# bitcast, no int->float conversion instructions (those run at a fraction of ALU rate).
_BF16_128 = 0x4300
_NIBBLE_OFFSET = 128.0


def _unpack_nibbles(words, word_bytes: int):
    """words [T, Dw] uint(8 * word_bytes) -> [(lo_k, hi_k) for k < word_bytes], [T, Dw] bf16.

    Dw = D / (2 * word_bytes). Byte k of word w is byte word_bytes * w + k of the packed row
    (little-endian), so lo_k holds elements {word_bytes * w + k} and hi_k elements
    {D/2 + word_bytes * w + k}, as 128 + nibble. Columns are not reordered here: the caller
    gathers the matching q columns instead (see _q_columns).
    """
    out = []
    for k in range(word_bytes):
        pair = []
        for shift in (8 * k, 8 * k + 4):
            x = words >> shift if shift else words
            if shift + 4 < 8 * word_bytes:  # the top nibble needs no mask
                x = x & 15
            x = x.astype(jnp.uint16) | _BF16_128
            pair.append(jax.lax.bitcast_convert_type(x, jnp.bfloat16))
        out.append(tuple(pair))
    return out


def _q_columns(half: int, word_bytes: int):
    """q column index vectors [(lo_k, hi_k) for k < word_bytes], each [D / (2 * word_bytes)],
    matching the nibble blocks of _unpack_nibbles."""
    w = jnp.arange(half // word_bytes) * word_bytes
    return [(w + k, w + k + half) for k in range(word_bytes)]


def _q_terms(q_half, split_f32: bool):
    """q_half [Gp, D/2] in q's dtype -> bf16 terms whose sum is q_half (to ~2^-17 for f32).

    bf16 q is one exact term. f32 q is split as hi + lo (lo carries the next 8 mantissa
    bits): two tensor-core dots instead of an IEEE f32 dot on CUDA cores.
    """
    hi = q_half.astype(jnp.bfloat16)
    if not split_f32:
        return [hi]
    return [hi, (q_half.astype(jnp.float32) - hi.astype(jnp.float32)).astype(jnp.bfloat16)]


def _add_all(xs):
    return functools.reduce(operator.add, xs)


def _dot_nt(a, b):
    """a [M, K] . b [N, K]^T with float32 accumulation (pl.dot is gone in jax >= 0.11)."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _gpu_kernel(
    cand_count_ref,  # [B, Hkv] int32 (whole array)
    lengths_ref,  # [B] int32 (whole array)
    page_table_ref,  # [max_pages] int32: row b
    cand_ref,  # [C] int32: candidate blocks of (b, g)
    q_ref,  # [G, D] q dtype: the query heads of KV head g
    k_ref,  # [P * S, Dw] uint(8 W): all INT4 rows of KV head g, Dw = D / (2 W) words
    ks_ref,  # [P * S] f32
    kz_ref,  # [P * S] f32
    o_ref,  # [G, C * bs] f32: the logits row block of (b, g)
    *,
    group: int,
    group_pad: int,
    block_size: int,
    page_size: int,
    tile_blocks: int,
    num_cand: int,
    num_splits: int,
    num_pages: int,
    attn_scale: float,
    split_f32: bool,
    word_bytes: int,
):
    b, g, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bs, cb = block_size, tile_blocks
    tokens = cb * bs
    half = q_ref.shape[1] // 2
    max_pages = page_table_ref.shape[0]
    num_tiles = pl.cdiv(num_cand, cb)  # static: tiles of the C * bs output columns
    count = jnp.clip(cand_count_ref[b, g], 0, num_cand)
    length = lengths_ref[b]

    # Tiles holding an entry below the count are split evenly over the splits (the trip
    # count follows the count, not the capacity); the remaining tiles only get -inf, split
    # the same way. Splits cover contiguous, tile-aligned ranges.
    live = jax.lax.div(count + cb - 1, cb)
    per_split = jax.lax.div(live + num_splits - 1, num_splits)
    first = s * per_split
    num_live = jnp.clip(live - first, 0, per_split)
    dead = num_tiles - live
    per_split_dead = jax.lax.div(dead + num_splits - 1, num_splits)
    first_dead = live + s * per_split_dead
    num_dead = jnp.clip(num_tiles - first_dead, 0, per_split_dead)

    # The logits tile is [Gp, T]; these place a per-head or per-token vector along its axes.
    def per_head(v):
        return v[:, None]

    def per_token(v):
        return v[None, :]

    # Triton's dot needs every dim >= 16, so the G query heads are padded to group_pad; padded
    # heads are masked on load and store. Every ref access indexes each dim with an index
    # array (not a slice): the interpreter supports masked gathers/scatters only in that form,
    # and Triton still sees unit-stride columns.
    heads = jnp.arange(group_pad)
    tok = jnp.arange(tokens)
    tile_shape = (group_pad, tokens)
    head_mask = jnp.broadcast_to(per_head(heads < group), tile_shape)

    def store(tile, logits):
        col = tile * tokens + tok
        mask = head_mask
        if num_cand % cb:  # the last tile overhangs the C * bs columns
            mask = mask & per_token(col < num_cand * bs)
        plt.store(o_ref.at[per_head(heads), per_token(col)], logits, mask=mask)

    def rows_of(tile):
        """Cache row of every token of a tile, -1 where the logit is -inf."""
        # Per-token indices (bs is a power of two: shifts and masks) rather than a [cb, bs]
        # grid reshaped to [T]: a reshape can cost Triton a layout shuffle.
        entry = tile * cb + jax.lax.div(tok, bs)
        in_count = entry < count
        blk = plt.load(cand_ref.at[jnp.minimum(entry, num_cand - 1)], mask=in_count, other=0)
        ok = in_count & (blk >= 0)
        # Invalid entries point at block 0 so every address below stays in bounds.
        pos = jnp.where(ok, blk, 0) * bs + jax.lax.rem(tok, bs)
        lpage = jnp.minimum(jax.lax.div(pos, page_size), max_pages - 1)
        phys = jnp.clip(page_table_ref[lpage], 0, num_pages - 1)
        rows = phys * page_size + jax.lax.rem(pos, page_size)
        return jnp.where(ok & (pos < length), rows, -1)

    # Loop invariants: the G query rows (one read per program) split into bf16 terms. The
    # nibble blocks of a word tile are strided columns of the row (see _unpack_nibbles), so
    # q is gathered in the same order, 2 W blocks of [Gp, Dw]: q is read once per program,
    # the cache once per tile, so permuting q is the cheap side.
    word = jnp.arange(half // word_bytes)[None, :]
    q_idx, q_mask = heads[:, None], (heads < group)[:, None]
    q_terms = []  # (bf16 term [Gp, Dw], index of its nibble block)
    for i, col in enumerate(c for pair in _q_columns(half, word_bytes) for c in pair):
        q_cols = plt.load(q_ref.at[q_idx, col[None, :]], mask=q_mask, other=0)  # [Gp, Dw]
        q_terms += [(t, i) for t in _q_terms(q_cols, split_f32)]
    # dot = q . (128 + n) summed over both halves; q_sum from the same bf16 terms so the
    # offset cancels exactly: s * (q . n) + z * sum(q) = s * dot + (z - 128 s) * sum(q).
    q_sum = _add_all([jnp.sum(t.astype(jnp.float32), axis=1) for t, _ in q_terms])  # [Gp]

    def logits_of(rows):
        tok_ok = rows >= 0
        safe = jnp.maximum(rows, 0)
        # One gather of the packed rows serves all G heads; masked rows are not read.
        words = plt.load(k_ref.at[safe[:, None], word], mask=tok_ok[:, None], other=0)
        k_s = plt.load(ks_ref.at[safe], mask=tok_ok, other=0.0)  # [T]
        k_z = plt.load(kz_ref.at[safe], mask=tok_ok, other=0.0)
        # 2 W blocks of [T, Dw] bf16 (128 + nibble), in the order of _q_columns' pairs.
        nibbles = [n for pair in _unpack_nibbles(words, word_bytes) for n in pair]
        dot = _add_all([_dot_nt(t, nibbles[i]) for t, i in q_terms])  # [Gp, K] . [T, K]^T
        zero_term = per_token(k_z - _NIBBLE_OFFSET * k_s) * per_head(q_sum)
        logits = attn_scale * (per_token(k_s) * dot + zero_term)
        return jnp.where(per_token(tok_ok), logits, -jnp.inf)

    # The cand -> page table lookups of tile t + 1 are issued in step t, so the row gather of
    # each step does not wait behind two dependent loads. The lookup past the last live tile
    # is harmless: its entries are past the count, so nothing is read.
    def live_body(t, rows):
        nxt = rows_of(first + t + 1)
        store(first + t, logits_of(rows))
        return nxt

    jax.lax.fori_loop(0, num_live, live_body, rows_of(first))

    def dead_body(t, carry):
        store(first_dead + t, jnp.full(tile_shape, -jnp.inf, jnp.float32))
        return carry

    jax.lax.fori_loop(0, num_dead, dead_body, jnp.int32(0))


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
    """Pallas Triton kernel; arguments and result as `block_spgemv` (checked by the caller).

    Grid (B, Hkv, splits); each split loops over its share of the candidate tiles, then writes
    -inf over its share of the tiles past cand_count.
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, half = k_int4.shape
    max_pages = page_table.shape[1]
    num_cand = cand_blocks.shape[2]
    group = num_q_heads // num_kv_heads
    _check_gpu_args(head_dim, block_size)
    tokens = min(config.tokens_per_chunk, max(16, pl.next_power_of_2(num_cand * block_size)))
    tokens = max(tokens, block_size)
    cb = tokens // block_size
    splits = config.num_splits(batch * num_kv_heads, pl.cdiv(num_cand, cb))
    group_pad = max(16, pl.next_power_of_2(group))
    word_bytes = _word_bytes(head_dim)
    words_per_row = half // word_bytes
    # Free in XLA: a row's D/2 bytes viewed as Dw little-endian words (byte k of word w is
    # byte W w + k), so the kernel gathers W times fewer elements.
    k_words = k_int4.reshape(num_kv_heads, num_pages * page_size, words_per_row, word_bytes)
    if word_bytes == 1:
        k_words = k_words[..., 0]
    else:
        k_words = jax.lax.bitcast_convert_type(k_words, _WORD_DTYPES[word_bytes])

    kernel = functools.partial(
        _gpu_kernel,
        group=group,
        group_pad=group_pad,
        block_size=block_size,
        page_size=page_size,
        tile_blocks=cb,
        num_cand=num_cand,
        num_splits=splits,
        num_pages=num_pages,
        attn_scale=_attn_scale(scale, head_dim),
        split_f32=q.dtype == jnp.float32,
        word_bytes=word_bytes,
    )

    out = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, splits),
        in_specs=[
            pl.BlockSpec((batch, num_kv_heads), lambda b, g, s: (0, 0)),
            pl.BlockSpec((batch,), lambda b, g, s: (0,)),
            pl.BlockSpec((None, max_pages), lambda b, g, s: (b, 0)),
            pl.BlockSpec((None, None, num_cand), lambda b, g, s: (b, g, 0)),
            pl.BlockSpec((None, None, group, head_dim), lambda b, g, s: (b, g, 0, 0)),
            pl.BlockSpec((None, num_pages * page_size, words_per_row), lambda b, g, s: (g, 0, 0)),
            pl.BlockSpec((None, num_pages * page_size), lambda b, g, s: (g, 0)),
            pl.BlockSpec((None, num_pages * page_size), lambda b, g, s: (g, 0)),
        ],
        out_specs=pl.BlockSpec(
            (None, None, group, num_cand * block_size), lambda b, g, s: (b, g, 0, 0)
        ),
        out_shape=jax.ShapeDtypeStruct(
            (batch, num_kv_heads, group, num_cand * block_size), jnp.float32
        ),
        compiler_params=plt.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="block_spgemv_gpu",
    )(
        cand_count,
        lengths,
        page_table,
        cand_blocks,
        q.reshape(batch, num_kv_heads, group, head_dim),
        k_words,
        k_scale.reshape(num_kv_heads, num_pages * page_size),
        k_zero.reshape(num_kv_heads, num_pages * page_size),
    )
    return out.reshape(batch, num_q_heads, num_cand * block_size)


# --------------------------------------------------------------------------------------------
# TPU (Pallas Mosaic)


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

    Grid (B, Hkv, C): one candidate block per step. The index map fetches the page holding
    the block by its scalar-prefetched physical id; for block_size < page_size the whole page
    is fetched and the block's slots selected in VMEM (simple, not bandwidth-optimal). Steps
    past cand_count keep the previous page index, so the pipeline issues no copy for them.
    The per-entry start positions and page ids are scalar-prefetched into SMEM (8 bytes per
    candidate entry of the whole batch), which limits C * B * Hkv: fine for page-level
    candidates, too much for token-level candidates at serving batch sizes.
    """
    del config  # no knobs
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
        attn_scale=_attn_scale(scale, head_dim),
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
      cand_count: [batch, num_kv_heads] int32 valid entries (clamped to [0, C]).
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

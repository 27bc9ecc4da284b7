"""Quest page metadata: per page and KV head, elementwise min and max of K, and page scores.

For a query q the upper bound of q . k over the keys k of a page is

    score = sum_d max(q_d * min_d, q_d * max_d)      (float32)

computed per query head h against the page metadata of its KV head h // G. Since max >= min,
max(q*min, q*max) = relu(q) * max + min(q, 0) * min exactly (one product is q*max or q*min,
the other is a multiplication by 0), which is how both kernels evaluate it: two multiply-adds
per element, and the signs of q are split once per program instead of once per page.

Layouts (docs/kernel_api.md, head-major): k_min, k_max [Hkv, P, D] in the dtype of k_pages
[Hkv, P, S, D]; page_table [B, max_pages] int32 (0 = null page); lengths [B] int32. Position pos
of sequence b lives on physical page page_table[b, pos // S], slot pos % S. Metadata writes to
physical page 0 are skipped (padding entries point there and must not race). Min and max are
exact in any dtype, so every implementation gives bitwise-equal metadata.

Ops:
- quest_refresh: recompute min/max of every page holding tokens [0, lengths[b]) (bulk, prefill).
- quest_update_decode: fold one new key per sequence into its page (slot 0 starts the page).
- quest_page_scores: [B, Hq, max_pages] scores; -inf from page ceil(lengths[b] / S) on.

GPU (Triton): programs gather min/max rows through the page table with masked vector loads and
scatter results with masked stores into the aliased metadata. A head_dim or page size that is
not a power of two (Triton's block rule) is padded in-kernel and masked. quest_page_scores runs a
grid (sequence, KV head, split): each program loops over its share of the tiles of live pages
(the trip count follows lengths[b]) and then writes -inf over its share of the tiles past the
last page; each min/max row is read once and used for all G query heads of the group, so the op
moves 2 * D * itemsize bytes per page and KV head and is bandwidth bound.

TPU (Mosaic): a one-page block of k_min ([1, D] out of a [P, D] plane) is not a legal Mosaic
block, so metadata rows move by DMA (memory_space ANY) at the page-table's physical ids; K
pages ([S, D], full trailing dims) come through block specs with scalar-prefetched page ids.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt

from pallas_kernels import _common

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16)
_INDEX_DTYPES = (np.int32,)
DEFAULT_PAGE_SIZE = 16


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class QuestGpuConfig:
    """Triton knobs (every in-kernel dim must be a power of two).

    pages_per_block: page scores, pages per loop step of a program (the tile). 32 pages x 128
      dims x 2 arrays is 16 KB of bf16 per step, about one K+V step of the sparse attention
      kernel, whose loop structure this follows.
    target_programs, max_splits: page scores, the page tiles of a (sequence, KV head) are
      split so that batch * Hkv * splits reaches about target_programs programs (a few per SM
      on an H200), at most max_splits; each program loops over its tiles so Triton can
      pipeline the page-table -> min/max gathers across steps (num_stages). Setting both to
      2**30 with num_stages = 1 gives one tile per program (the default).
    tokens_per_block: refresh, K tokens one program reduces (pages = tokens // page_size).
    seqs_per_block: decode update, sequences one program handles.
    num_warps, num_stages: Triton launch parameters of all three kernels (only page scores
      has a loop for num_stages to pipeline).

    Scores defaults from four H200 sweeps at batch 64 / 2048 pages (docs/results/
    kernels-sweep*-h200): one 32-page tile per program (target_programs = max_splits = 2**30,
    num_stages = 1) took 234-239 us against 256-277 us for 1024-2048 looping programs with 2-3
    stages, also with the next tile's page-table lookup carried in the loop (245-263 us; that
    variant was removed).
    """

    pages_per_block: int = 32
    tokens_per_block: int = 64
    seqs_per_block: int = 16
    target_programs: int = 2**30
    max_splits: int = 2**30
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        for name in ("pages_per_block", "tokens_per_block", "seqs_per_block", "num_warps"):
            v = getattr(self, name)
            if not _is_pow2(v):
                raise ValueError(f"{name} must be a power of two, got {v}")
        for name in ("target_programs", "max_splits", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def num_splits(self, rows: int, tiles: int) -> int:
        """Page-score splits per (sequence, KV head) row, from static shapes only.

        rows: batch * Hkv; tiles: page tiles of the page table's width.
        """
        wanted = pl.next_power_of_2(pl.cdiv(self.target_programs, max(1, rows)))
        return max(1, min(wanted, self.max_splits, tiles))


@dataclasses.dataclass(frozen=True)
class QuestTpuConfig:
    """Mosaic knobs.

    pages_per_block: page scores, pages per grid step; a multiple of 128 because the pages are
      the lanes of the output block (shorter page tables use one block of all pages).
    """

    pages_per_block: int = 128

    def __post_init__(self):
        if self.pages_per_block <= 0 or self.pages_per_block % 128:
            raise ValueError(
                f"pages_per_block must be a positive multiple of 128, got {self.pages_per_block}"
            )


DEFAULT_GPU_CONFIG = QuestGpuConfig()
DEFAULT_TPU_CONFIG = QuestTpuConfig()


# --------------------------------------------------------------------------------------------
# Validation (shapes, dtypes and static ints only: runs on tracers, before any kernel)


def _check_meta(k_min, k_max) -> tuple[int, int, int]:
    """k_min / k_max [Hkv, P, D]; returns (Hkv, P, D)."""
    _common.check_rank("k_min", k_min, 3, "[num_kv_heads, num_pages, head_dim]")
    _common.check_dtype("k_min", k_min, _FLOAT_DTYPES)
    _common.check_rank("k_max", k_max, 3, "[num_kv_heads, num_pages, head_dim]")
    if tuple(np.shape(k_max)) != tuple(np.shape(k_min)) or k_max.dtype != k_min.dtype:
        raise ValueError(
            f"k_max must match k_min (shape {tuple(np.shape(k_min))}, dtype {k_min.dtype}), "
            f"got shape {tuple(np.shape(k_max))}, dtype {k_max.dtype}"
        )
    return tuple(np.shape(k_min))


def _check_table(page_table, batch: int, batch_of: str) -> None:
    _common.check_rank("page_table", page_table, 2, "[batch, max_pages]")
    _common.check_dtype("page_table", page_table, _INDEX_DTYPES)
    _common.check_dim("page_table", page_table, 0, batch, "batch of " + batch_of)


def _check_per_seq(name: str, a, batch: int, batch_of: str) -> None:
    _common.check_rank(name, a, 1, "[batch]")
    _common.check_dtype(name, a, _INDEX_DTYPES)
    _common.check_dim(name, a, 0, batch, "batch of " + batch_of)


def _check_page_size(page_size) -> None:
    if not isinstance(page_size, (int, np.integer)) or isinstance(page_size, bool):
        raise ValueError(f"page_size must be a static int, got {page_size!r}")
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")


def _check_refresh_args(k_min, k_max, k_pages, page_table, lengths) -> None:
    hkv, num_pages, d = _check_meta(k_min, k_max)
    _common.check_rank("k_pages", k_pages, 4, "[num_kv_heads, num_pages, page_size, head_dim]")
    if k_pages.dtype != k_min.dtype:
        raise ValueError(f"k_pages dtype must be k_min's ({k_min.dtype}), got {k_pages.dtype}")
    for axis, n, what in (
        (0, hkv, "num_kv_heads"),
        (1, num_pages, "num_pages"),
        (3, d, "head_dim"),
    ):
        _common.check_dim("k_pages", k_pages, axis, n, what + " of k_min")
    _check_table(page_table, np.shape(lengths)[0] if np.ndim(lengths) else -1, "lengths")
    _check_per_seq("lengths", lengths, np.shape(page_table)[0], "page_table")


def _check_update_args(k_min, k_max, k_new, page_table, positions, page_size) -> None:
    hkv, _, d = _check_meta(k_min, k_max)
    _common.check_rank("k_new", k_new, 3, "[batch, num_kv_heads, head_dim]")
    _common.check_dtype("k_new", k_new, _FLOAT_DTYPES)
    _common.check_dim("k_new", k_new, 1, hkv, "num_kv_heads of k_min")
    _common.check_dim("k_new", k_new, 2, d, "head_dim of k_min")
    batch = np.shape(k_new)[0]
    _check_table(page_table, batch, "k_new")
    _check_per_seq("positions", positions, batch, "k_new")
    _check_page_size(page_size)


def _check_scores_args(q, k_min, k_max, page_table, lengths, page_size) -> None:
    hkv, _, d = _check_meta(k_min, k_max)
    _common.check_rank("q", q, 3, "[batch, num_q_heads, head_dim]")
    _common.check_dtype("q", q, _FLOAT_DTYPES)
    _common.check_dim("q", q, 2, d, "head_dim of k_min")
    hq = np.shape(q)[1]
    if hq == 0 or hq % hkv:
        raise ValueError(f"q num_q_heads={hq} must be a positive multiple of num_kv_heads={hkv}")
    batch = np.shape(q)[0]
    _check_table(page_table, batch, "q")
    _check_per_seq("lengths", lengths, batch, "q")
    _check_page_size(page_size)


# --------------------------------------------------------------------------------------------
# References (float32 jnp; min/max stay in the metadata dtype, where they are exact)


def _num_pages(lengths, page_size: int):
    return (jnp.maximum(lengths, 0) + page_size - 1) // page_size


@jax.jit
def quest_refresh_reference(k_min, k_max, k_pages, page_table, lengths):
    """Arguments and result as `quest_refresh`."""
    num_pages, page_size = k_pages.shape[1], k_pages.shape[2]
    max_pages = page_table.shape[1]
    k = k_pages[:, page_table]  # [Hkv, B, max_pages, S, D]
    pos = jnp.arange(max_pages)[:, None] * page_size + jnp.arange(page_size)  # [max_pages, S]
    live = (pos[None] < lengths[:, None, None])[None, :, :, :, None]
    inf = jnp.asarray(jnp.inf, k.dtype)
    new_min = jnp.where(live, k, inf).min(axis=3)  # [Hkv, B, max_pages, D]
    new_max = jnp.where(live, k, -inf).max(axis=3)
    lpage = jnp.arange(max_pages)[None, :]
    ok = (lpage < _num_pages(lengths, page_size)[:, None]) & (page_table != 0)
    dest = jnp.where(ok, page_table, num_pages)  # out of range: dropped
    return (
        k_min.at[:, dest].set(new_min, mode="drop"),
        k_max.at[:, dest].set(new_max, mode="drop"),
    )


@functools.partial(jax.jit, static_argnames=("page_size",))
def quest_update_decode_reference(
    k_min, k_max, k_new, page_table, positions, *, page_size: int = DEFAULT_PAGE_SIZE
):
    """Arguments and result as `quest_update_decode`."""
    num_pages = k_min.shape[1]
    batch, max_pages = page_table.shape
    k = k_new.astype(k_min.dtype)  # [B, Hkv, D]
    lpage = positions // page_size
    phys = page_table[jnp.arange(batch), jnp.clip(lpage, 0, max_pages - 1)]
    ok = (positions >= 0) & (lpage < max_pages) & (phys != 0)
    dest = jnp.where(ok, phys, num_pages)
    fresh = (positions % page_size == 0)[:, None, None]
    old_min = k_min[:, jnp.clip(dest, 0, num_pages - 1)].transpose(1, 0, 2)  # [B, Hkv, D]
    old_max = k_max[:, jnp.clip(dest, 0, num_pages - 1)].transpose(1, 0, 2)
    new_min = jnp.where(fresh, k, jnp.minimum(old_min, k))
    new_max = jnp.where(fresh, k, jnp.maximum(old_max, k))
    return (
        k_min.at[:, dest].set(new_min.transpose(1, 0, 2), mode="drop"),
        k_max.at[:, dest].set(new_max.transpose(1, 0, 2), mode="drop"),
    )


@functools.partial(jax.jit, static_argnames=("page_size",))
def quest_page_scores_reference(
    q, k_min, k_max, page_table, lengths, *, page_size: int = DEFAULT_PAGE_SIZE
):
    """Arguments and result as `quest_page_scores`."""
    batch, hq, d = q.shape
    hkv = k_min.shape[0]
    max_pages = page_table.shape[1]
    qg = q.astype(jnp.float32).reshape(batch, hkv, hq // hkv, 1, d)
    mn = k_min[:, page_table].astype(jnp.float32).transpose(1, 0, 2, 3)[:, :, None]
    mx = k_max[:, page_table].astype(jnp.float32).transpose(1, 0, 2, 3)[:, :, None]
    s = jnp.maximum(qg * mn, qg * mx).sum(axis=-1)  # [B, Hkv, G, max_pages]
    live = jnp.arange(max_pages) < _num_pages(lengths, page_size)[:, None]
    s = jnp.where(live[:, None, None, :], s, -jnp.inf)
    return s.reshape(batch, hq, max_pages)


# --------------------------------------------------------------------------------------------
# GPU (Pallas Triton)


def _gpu_params(config: QuestGpuConfig):
    return plt.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def _padded_iota(n: int):
    """iota over n padded to a power of two (Triton block dims must be) and the mask of the
    real entries, None when n needs no padding."""
    padded = pl.next_power_of_2(n)
    i = jnp.arange(padded)
    return i, (i < n if padded != n else None)


def _and(mask, extra):
    return mask if extra is None else mask & extra


def _expand(mask, axes):
    return None if mask is None else jnp.expand_dims(mask, axes)


def _refresh_gpu_kernel(
    k_ref,  # [Hkv, P, S, D] (whole array)
    pt_ref,  # [B, max_pages] int32
    len_ref,  # [B] int32
    mn_in_ref,  # aliased with mn_ref (not read)
    mx_in_ref,  # aliased with mx_ref
    mn_ref,  # [Hkv, P, D]
    mx_ref,  # [Hkv, P, D]
    *,
    pages_per_block: int,
):
    del mn_in_ref, mx_in_ref
    h, b, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    page_size, d = k_ref.shape[2], k_ref.shape[3]
    max_pages = pt_ref.shape[1]
    length = len_ref[b]
    lpage = c * pages_per_block + jnp.arange(pages_per_block)
    want = (lpage * page_size < length) & (lpage < max_pages)
    phys = plt.load(pt_ref.at[b, lpage], mask=want, other=0)
    ok = want & (phys != 0)

    # [pages, S, D] gather; every dim indexed by an array (what masked loads support).
    slot, slot_ok = _padded_iota(page_size)
    col, col_ok = _padded_iota(d)
    p3, s3, c3 = phys[:, None, None], slot[None, :, None], col[None, None, :]
    live = ok[:, None, None] & (lpage[:, None, None] * page_size + s3 < length)
    live = _and(live, _expand(slot_ok, (0, 2)))
    mask = _and(live, _expand(col_ok, (0, 1)))
    k = plt.load(k_ref.at[h, p3, s3, c3], mask=mask, other=0).astype(jnp.float32)
    new_min = jnp.where(live, k, jnp.inf).min(axis=1)  # [pages, D]
    new_max = jnp.where(live, k, -jnp.inf).max(axis=1)
    p2, c2, ok2 = phys[:, None], col[None, :], _and(ok[:, None], _expand(col_ok, 0))
    plt.store(mn_ref.at[h, p2, c2], new_min.astype(mn_ref.dtype), mask=ok2)
    plt.store(mx_ref.at[h, p2, c2], new_max.astype(mx_ref.dtype), mask=ok2)


@functools.partial(jax.jit, static_argnames=("interpret", "config"))
def quest_refresh_gpu(
    k_min,
    k_max,
    k_pages,
    page_table,
    lengths,
    *,
    interpret: bool = False,
    config: QuestGpuConfig = DEFAULT_GPU_CONFIG,
):
    """Pallas Triton refresh; arguments and result as `quest_refresh` (checked by the caller).

    Grid (Hkv, B, chunks of tokens_per_block // S pages); min/max are updated in place.
    """
    hkv, _, page_size, d = k_pages.shape
    batch, max_pages = page_table.shape
    if batch == 0 or max_pages == 0:
        return k_min, k_max
    pages = max(1, config.tokens_per_block // pl.next_power_of_2(page_size))
    pages = min(pages, pl.next_power_of_2(max_pages))
    return pl.pallas_call(
        functools.partial(_refresh_gpu_kernel, pages_per_block=pages),
        grid=(hkv, batch, pl.cdiv(max_pages, pages)),
        in_specs=[pl.no_block_spec] * 5,
        out_specs=[pl.no_block_spec] * 2,
        out_shape=[jax.ShapeDtypeStruct(k_min.shape, k_min.dtype)] * 2,
        input_output_aliases={3: 0, 4: 1},
        compiler_params=_gpu_params(config),
        interpret=interpret,
        name="quest_refresh_gpu",
    )(k_pages, page_table, lengths, k_min, k_max)


def _update_gpu_kernel(
    k_ref,  # [B, Hkv, D] (whole array)
    pos_ref,  # [B] int32
    pt_ref,  # [B, max_pages] int32
    mn_in_ref,  # aliased with mn_ref (read through mn_ref)
    mx_in_ref,  # aliased with mx_ref
    mn_ref,  # [Hkv, P, D]
    mx_ref,  # [Hkv, P, D]
    *,
    seqs_per_block: int,
    page_size: int,
):
    del mn_in_ref, mx_in_ref
    h = pl.program_id(0)
    batch, max_pages = pt_ref.shape
    d = k_ref.shape[2]
    b = pl.program_id(1) * seqs_per_block + jnp.arange(seqs_per_block)
    in_range = b < batch
    pos = plt.load(pos_ref.at[b], mask=in_range, other=-1)
    pos0 = jnp.maximum(pos, 0)
    lpage = jax.lax.div(pos0, page_size)
    want = in_range & (pos >= 0) & (lpage < max_pages)
    phys = plt.load(pt_ref.at[b, lpage], mask=want, other=0)
    ok = want & (phys != 0)
    fresh = (jax.lax.rem(pos0, page_size) == 0)[:, None]

    col, col_ok = _padded_iota(d)
    b2, p2, c2 = b[:, None], phys[:, None], col[None, :]
    ok2 = _and(ok[:, None], _expand(col_ok, 0))
    # Round to the metadata dtype first (as the reference does), then compare in f32: exact.
    k = plt.load(k_ref.at[b2, h, c2], mask=ok2, other=0)
    k = k.astype(mn_ref.dtype).astype(jnp.float32)
    old = ok2 & ~fresh  # a page's first token does not read the stale row
    old_min = plt.load(mn_ref.at[h, p2, c2], mask=old, other=0).astype(jnp.float32)
    old_max = plt.load(mx_ref.at[h, p2, c2], mask=old, other=0).astype(jnp.float32)
    new_min = jnp.where(fresh, k, jnp.minimum(old_min, k))
    new_max = jnp.where(fresh, k, jnp.maximum(old_max, k))
    plt.store(mn_ref.at[h, p2, c2], new_min.astype(mn_ref.dtype), mask=ok2)
    plt.store(mx_ref.at[h, p2, c2], new_max.astype(mx_ref.dtype), mask=ok2)


@functools.partial(jax.jit, static_argnames=("page_size", "interpret", "config"))
def quest_update_decode_gpu(
    k_min,
    k_max,
    k_new,
    page_table,
    positions,
    *,
    page_size: int = DEFAULT_PAGE_SIZE,
    interpret: bool = False,
    config: QuestGpuConfig = DEFAULT_GPU_CONFIG,
):
    """Pallas Triton update; arguments and result as `quest_update_decode` (checked by the
    caller). Grid (Hkv, blocks of sequences); min/max are updated in place."""
    batch, hkv, d = k_new.shape
    if batch == 0:
        return k_min, k_max
    seqs = min(config.seqs_per_block, pl.next_power_of_2(batch))
    return pl.pallas_call(
        functools.partial(_update_gpu_kernel, seqs_per_block=seqs, page_size=page_size),
        grid=(hkv, pl.cdiv(batch, seqs)),
        in_specs=[pl.no_block_spec] * 5,
        out_specs=[pl.no_block_spec] * 2,
        out_shape=[jax.ShapeDtypeStruct(k_min.shape, k_min.dtype)] * 2,
        input_output_aliases={3: 0, 4: 1},
        compiler_params=_gpu_params(config),
        interpret=interpret,
        name="quest_update_decode_gpu",
    )(k_new, positions, page_table, k_min, k_max)


def _scores_gpu_kernel(
    q_ref,  # [B, Hq, D] (whole array)
    mn_ref,  # [Hkv, P, D]
    mx_ref,  # [Hkv, P, D]
    pt_ref,  # [B, max_pages] int32
    len_ref,  # [B] int32
    o_ref,  # [B, Hq, max_pages] f32
    *,
    group: int,
    pages_per_block: int,
    page_size: int,
    num_splits: int,
):
    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    max_pages = pt_ref.shape[1]
    d = q_ref.shape[2]
    ppb = pages_per_block
    num_tiles = pl.cdiv(max_pages, ppb)  # static
    live_pages = jnp.minimum(
        jax.lax.div(jnp.maximum(len_ref[b], 0) + page_size - 1, page_size), max_pages
    )
    # Tiles holding a live page are split evenly over the splits (the trip count follows the
    # length, not the page table's width); the remaining tiles only get -inf, split the same
    # way. Splits cover contiguous, tile-aligned ranges.
    live = jax.lax.div(live_pages + ppb - 1, ppb)
    per_split = jax.lax.div(live + num_splits - 1, num_splits)
    first = s * per_split
    num_live = jnp.clip(live - first, 0, per_split)
    per_split_dead = jax.lax.div(num_tiles - live + num_splits - 1, num_splits)
    first_dead = live + s * per_split_dead
    num_dead = jnp.clip(num_tiles - first_dead, 0, per_split_dead)

    pages = jnp.arange(ppb)
    col, col_ok = _padded_iota(d)
    # Loop invariants: each query head's positive and negative parts, [1, D] f32.
    q_parts = []
    for g in range(group):
        if col_ok is None:
            qh = q_ref[b, h * group + g, :]
        else:  # padded columns load 0: no contribution
            qh = plt.load(q_ref.at[b, h * group + g, col], mask=col_ok, other=0)
        qh = qh.astype(jnp.float32)[None, :]
        q_parts.append((jnp.maximum(qh, 0.0), jnp.minimum(qh, 0.0)))

    def store(lpage, g, scores):
        mask = lpage < max_pages if max_pages % ppb else None  # last tile overhangs the table
        plt.store(o_ref.at[b, h * group + g, lpage], scores, mask=mask)

    def live_body(t, carry):
        lpage = (first + t) * ppb + pages
        ok = lpage < live_pages
        phys = plt.load(pt_ref.at[b, lpage], mask=ok, other=0)
        p2, c2 = phys[:, None], col[None, :]
        ok2 = _and(ok[:, None], _expand(col_ok, 0))
        # One read of the group's min/max rows serves its G query heads.
        mn = plt.load(mn_ref.at[h, p2, c2], mask=ok2, other=0).astype(jnp.float32)
        mx = plt.load(mx_ref.at[h, p2, c2], mask=ok2, other=0).astype(jnp.float32)
        for g, (q_pos, q_neg) in enumerate(q_parts):
            score = jnp.sum(q_pos * mx + q_neg * mn, axis=1)
            store(lpage, g, jnp.where(ok, score, -jnp.inf))
        return carry

    def dead_body(t, carry):
        lpage = (first_dead + t) * ppb + pages
        for g in range(group):
            store(lpage, g, jnp.full((ppb,), -jnp.inf, jnp.float32))
        return carry

    jax.lax.fori_loop(0, num_live, live_body, jnp.int32(0))
    jax.lax.fori_loop(0, num_dead, dead_body, jnp.int32(0))


@functools.partial(jax.jit, static_argnames=("page_size", "interpret", "config"))
def quest_page_scores_gpu(
    q,
    k_min,
    k_max,
    page_table,
    lengths,
    *,
    page_size: int = DEFAULT_PAGE_SIZE,
    interpret: bool = False,
    config: QuestGpuConfig = DEFAULT_GPU_CONFIG,
):
    """Pallas Triton page scores; arguments and result as `quest_page_scores` (checked by the
    caller). Grid (B, Hkv, splits); each split loops over its share of the tiles of
    pages_per_block live pages, then writes -inf over its share of the tiles past the
    sequence's last page."""
    batch, hq, d = q.shape
    hkv = k_min.shape[0]
    max_pages = page_table.shape[1]
    if batch == 0 or max_pages == 0:
        return jnp.zeros((batch, hq, max_pages), jnp.float32)
    pages = min(config.pages_per_block, pl.next_power_of_2(max_pages))
    splits = config.num_splits(batch * hkv, pl.cdiv(max_pages, pages))
    return pl.pallas_call(
        functools.partial(
            _scores_gpu_kernel,
            group=hq // hkv,
            pages_per_block=pages,
            page_size=page_size,
            num_splits=splits,
        ),
        grid=(batch, hkv, splits),
        in_specs=[pl.no_block_spec] * 5,
        out_specs=pl.no_block_spec,
        out_shape=jax.ShapeDtypeStruct((batch, hq, max_pages), jnp.float32),
        compiler_params=_gpu_params(config),
        interpret=interpret,
        name="quest_page_scores_gpu",
    )(q, k_min, k_max, page_table, lengths)


# --------------------------------------------------------------------------------------------
# TPU (Pallas Mosaic)


def _tpu_interpret(interpret: bool):
    return _common.tpu_interpret(interpret)


def _copy(src, dst, sem):
    """Blocking DMA (the next step of the kernel reads what it brought)."""
    cp = pltpu.make_async_copy(src, dst, sem)
    cp.start()
    cp.wait()


def _refresh_page(b, j, pt_ref, len_ref, *, page_size: int, max_pages: int):
    """Physical page of logical page j of sequence b, or 0 when it holds no token."""
    live = j * page_size < len_ref[b]
    return jnp.where(live, pt_ref[b * max_pages + j], 0)


def _refresh_tpu_kernel(
    pt_ref,  # SMEM [B * max_pages] int32
    len_ref,  # SMEM [B] int32
    k_ref,  # [Hkv, S, D]: logical page j of sequence b (the null page when it is empty)
    mn_in_hbm,  # ANY, aliased with mn_hbm (not read)
    mx_in_hbm,  # ANY, aliased with mx_hbm
    mn_hbm,  # ANY [Hkv, P, D]
    mx_hbm,  # ANY [Hkv, P, D]
    mn_buf,  # VMEM [Hkv, 1, D]
    mx_buf,  # VMEM [Hkv, 1, D]
    sem,
    *,
    page_size: int,
    max_pages: int,
):
    del mn_in_hbm, mx_in_hbm
    b, j = pl.program_id(0), pl.program_id(1)
    page = _refresh_page(b, j, pt_ref, len_ref, page_size=page_size, max_pages=max_pages)

    @pl.when(page != 0)
    def _():
        k = k_ref[...].astype(jnp.float32)
        tok = j * page_size + jax.lax.broadcasted_iota(jnp.int32, (1, page_size, 1), 1)
        live = tok < len_ref[b]
        mn_buf[...] = jnp.where(live, k, jnp.inf).min(axis=1, keepdims=True).astype(mn_buf.dtype)
        mx_buf[...] = jnp.where(live, k, -jnp.inf).max(axis=1, keepdims=True).astype(mx_buf.dtype)
        _copy(mn_buf, mn_hbm.at[:, pl.ds(page, 1), :], sem)
        _copy(mx_buf, mx_hbm.at[:, pl.ds(page, 1), :], sem)


@functools.partial(jax.jit, static_argnames=("interpret",))
def quest_refresh_tpu(k_min, k_max, k_pages, page_table, lengths, *, interpret: bool = False):
    """Pallas Mosaic TPU refresh; arguments and result as `quest_refresh`.

    Grid (B, max_pages): a step brings one K page of all heads in by block spec and writes its
    min/max rows by DMA. Steps past a sequence's length map to the null page (no new copy,
    since the block index repeats) and write nothing.
    """
    hkv, _, page_size, d = k_pages.shape
    batch, max_pages = page_table.shape
    if batch == 0 or max_pages == 0:
        return k_min, k_max
    page_map = functools.partial(_refresh_page, page_size=page_size, max_pages=max_pages)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        functools.partial(_refresh_tpu_kernel, page_size=page_size, max_pages=max_pages),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, max_pages),
            in_specs=[
                pl.BlockSpec(
                    (hkv, None, page_size, d), lambda b, j, *refs: (0, page_map(b, j, *refs), 0, 0)
                ),
                any_spec,
                any_spec,
            ],
            out_specs=[any_spec, any_spec],
            scratch_shapes=[
                pltpu.VMEM((hkv, 1, d), k_min.dtype),
                pltpu.VMEM((hkv, 1, d), k_min.dtype),
                pltpu.SemaphoreType.DMA,
            ],
        ),
        out_shape=[jax.ShapeDtypeStruct(k_min.shape, k_min.dtype)] * 2,
        input_output_aliases={3: 0, 4: 1},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=_tpu_interpret(interpret),
        name="quest_refresh_tpu",
    )(page_table.reshape(-1), lengths, k_pages, k_min, k_max)


def _update_tpu_kernel(
    pos_ref,  # SMEM [B] int32
    pt_ref,  # SMEM [B * max_pages] int32
    k_ref,  # [Hkv, 1, D] metadata dtype: the new key of sequence b
    mn_in_hbm,  # ANY, aliased with mn_hbm (read through it)
    mx_in_hbm,  # ANY, aliased with mx_hbm
    mn_hbm,  # ANY [Hkv, P, D]
    mx_hbm,  # ANY [Hkv, P, D]
    mn_buf,  # VMEM [Hkv, 1, D]
    mx_buf,  # VMEM [Hkv, 1, D]
    sem,
    *,
    page_size: int,
    max_pages: int,
):
    del mn_in_hbm, mx_in_hbm
    b = pl.program_id(0)
    pos = pos_ref[b]
    pos0 = jnp.maximum(pos, 0)
    lpage = jax.lax.div(pos0, page_size)
    fresh = jax.lax.rem(pos0, page_size) == 0
    want = (pos >= 0) & (lpage < max_pages)
    page = jnp.where(want, pt_ref[b * max_pages + jnp.minimum(lpage, max_pages - 1)], 0)

    @pl.when(page != 0)
    def _():
        k = k_ref[...].astype(jnp.float32)
        rows_mn = mn_hbm.at[:, pl.ds(page, 1), :]
        rows_mx = mx_hbm.at[:, pl.ds(page, 1), :]

        @pl.when(fresh)
        def _fresh():
            mn_buf[...] = k_ref[...]
            mx_buf[...] = k_ref[...]

        @pl.when(jnp.logical_not(fresh))
        def _fold():
            _copy(rows_mn, mn_buf, sem)
            _copy(rows_mx, mx_buf, sem)
            mn_buf[...] = jnp.minimum(mn_buf[...].astype(jnp.float32), k).astype(mn_buf.dtype)
            mx_buf[...] = jnp.maximum(mx_buf[...].astype(jnp.float32), k).astype(mx_buf.dtype)

        _copy(mn_buf, rows_mn, sem)
        _copy(mx_buf, rows_mx, sem)


@functools.partial(jax.jit, static_argnames=("page_size", "interpret"))
def quest_update_decode_tpu(
    k_min,
    k_max,
    k_new,
    page_table,
    positions,
    *,
    page_size: int = DEFAULT_PAGE_SIZE,
    interpret: bool = False,
):
    """Pallas Mosaic TPU update; arguments and result as `quest_update_decode`.

    Grid (B,): a step reads the page's [Hkv, 1, D] min/max rows by DMA, folds the new key in
    and writes them back.
    """
    batch, hkv, d = k_new.shape
    max_pages = page_table.shape[1]
    if batch == 0:
        return k_min, k_max
    # [B, Hkv, 1, D]: the key of one sequence is then a block with full trailing dims, in
    # the same [Hkv, 1, D] shape as the metadata rows it is folded into.
    k = k_new.astype(k_min.dtype).reshape(batch, hkv, 1, d)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        functools.partial(_update_tpu_kernel, page_size=page_size, max_pages=max_pages),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch,),
            in_specs=[
                pl.BlockSpec((None, hkv, 1, d), lambda b, *_: (b, 0, 0, 0)),
                any_spec,
                any_spec,
            ],
            out_specs=[any_spec, any_spec],
            scratch_shapes=[
                pltpu.VMEM((hkv, 1, d), k_min.dtype),
                pltpu.VMEM((hkv, 1, d), k_min.dtype),
                pltpu.SemaphoreType.DMA,
            ],
        ),
        out_shape=[jax.ShapeDtypeStruct(k_min.shape, k_min.dtype)] * 2,
        input_output_aliases={3: 0, 4: 1},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=_tpu_interpret(interpret),
        name="quest_update_decode_tpu",
    )(positions, page_table.reshape(-1), k, k_min, k_max)


def _scores_tpu_kernel(
    pt_ref,  # SMEM [B * max_pages] int32
    len_ref,  # SMEM [B] int32
    q_ref,  # [G, D] f32 or bf16: the query heads of KV head h
    mn_hbm,  # ANY [Hkv, P, D]
    mx_hbm,  # ANY [Hkv, P, D]
    o_ref,  # [G, PB] f32
    mn_buf,  # VMEM [PB, D]
    mx_buf,  # VMEM [PB, D]
    sem,
    *,
    page_size: int,
    max_pages: int,
):
    b, h, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    pages = mn_buf.shape[0]
    first = c * pages
    # lax.div (truncating) on a non-negative value: jnp's floor division lowers through sign,
    # which Mosaic only lowers for a known TPU generation.
    live = jax.lax.div(jnp.maximum(len_ref[b], 0) + page_size - 1, page_size)
    live_pages = jnp.minimum(live, max_pages)
    # Rows past the live pages are not fetched; whatever the buffer holds there only reaches
    # output lanes that are masked to -inf below.
    n = jnp.clip(live_pages - first, 0, pages)

    def row_copies(i):
        page = pt_ref[b * max_pages + first + i]
        dst = pl.ds(i, 1)
        return (
            pltpu.make_async_copy(mn_hbm.at[h, pl.ds(page, 1), :], mn_buf.at[dst, :], sem),
            pltpu.make_async_copy(mx_hbm.at[h, pl.ds(page, 1), :], mx_buf.at[dst, :], sem),
        )

    def start(i, carry):
        for cp in row_copies(i):
            cp.start()
        return carry

    def wait(i, carry):
        for cp in row_copies(i):
            cp.wait()
        return carry

    # All row DMAs of the chunk are in flight together, then drained.
    jax.lax.fori_loop(0, n, start, 0)
    jax.lax.fori_loop(0, n, wait, 0)

    q = q_ref[...]
    both_bf16 = q.dtype == jnp.bfloat16 and mn_buf.dtype == jnp.bfloat16
    # bf16 x bf16 products are exact in the f32 accumulator; f32 operands need HIGHEST.
    dt, prec = (jnp.bfloat16, None) if both_bf16 else (jnp.float32, jax.lax.Precision.HIGHEST)
    zero = jnp.zeros((), q.dtype)
    nt = (((1,), (1,)), ((), ()))  # [G, D] x [PB, D] -> [G, PB]

    def dot(a, m):
        return jax.lax.dot_general(
            a.astype(dt), m.astype(dt), nt, precision=prec, preferred_element_type=jnp.float32
        )

    s = dot(jnp.maximum(q, zero), mx_buf[...]) + dot(jnp.minimum(q, zero), mn_buf[...])
    lane = first + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    o_ref[...] = jnp.where(lane < live_pages, s, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("page_size", "interpret", "config"))
def quest_page_scores_tpu(
    q,
    k_min,
    k_max,
    page_table,
    lengths,
    *,
    page_size: int = DEFAULT_PAGE_SIZE,
    interpret: bool = False,
    config: QuestTpuConfig = DEFAULT_TPU_CONFIG,
):
    """Pallas Mosaic TPU page scores; arguments and result as `quest_page_scores`.

    Grid (B, Hkv, chunks of pages): a step DMAs the chunk's min/max rows (one row per page,
    at the scalar-prefetched physical id) into VMEM and scores all G heads with two MXU dots.
    The output leaves as [B, Hkv, G, max_pages] (G is then a full block dim) and is reshaped.
    """
    batch, hq, d = q.shape
    hkv = k_min.shape[0]
    max_pages = page_table.shape[1]
    group = hq // hkv
    if batch == 0 or max_pages == 0:
        return jnp.zeros((batch, hq, max_pages), jnp.float32)
    pages = max_pages if max_pages <= config.pages_per_block else config.pages_per_block
    # Pad the page table so the chunk overhanging max_pages reads in-bounds SMEM entries.
    padded = pl.cdiv(max_pages, pages) * pages
    table = jnp.pad(page_table, ((0, 0), (0, padded - max_pages))).reshape(-1)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    out = pl.pallas_call(
        functools.partial(_scores_tpu_kernel, page_size=page_size, max_pages=padded),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, hkv, pl.cdiv(max_pages, pages)),
            in_specs=[
                pl.BlockSpec((None, None, group, d), lambda b, h, c, *_: (b, h, 0, 0)),
                any_spec,
                any_spec,
            ],
            out_specs=pl.BlockSpec((None, None, group, pages), lambda b, h, c, *_: (b, h, 0, c)),
            scratch_shapes=[
                pltpu.VMEM((pages, d), k_min.dtype),
                pltpu.VMEM((pages, d), k_min.dtype),
                pltpu.SemaphoreType.DMA,
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((batch, hkv, group, max_pages), jnp.float32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=_tpu_interpret(interpret),
        name="quest_page_scores_tpu",
    )(table, lengths, q.reshape(batch, hkv, group, d), k_min, k_max)
    return out.reshape(batch, hq, max_pages)


# --------------------------------------------------------------------------------------------
# Public entries


def quest_refresh(k_min, k_max, k_pages, page_table, lengths, *, backend: str = "auto"):
    """Recomputes the Quest min/max of every page holding tokens [0, lengths[b]).

    Args:
      k_min, k_max: [num_kv_heads, num_pages, head_dim], dtype of k_pages.
      k_pages: [num_kv_heads, num_pages, page_size, head_dim] float32 or bfloat16.
      page_table: [batch, max_pages] int32, logical page -> physical page (0 = null page).
      lengths: [batch] int32 tokens in the cache per sequence.
      backend: "auto" | "pallas" | "pallas_gpu" | "pallas_tpu" | "reference"
        (pallas_kernels._common.resolve_backend).

    Returns:
      (k_min, k_max): for logical page j < ceil(lengths[b] / page_size) of every sequence, the
      elementwise min/max over its slots s with j * page_size + s < lengths[b], written at
      physical page page_table[b, j] (page 0 skipped); other pages unchanged. The Pallas
      kernels alias k_min/k_max: donate them under jit to update in place.
    """
    _check_refresh_args(k_min, k_max, k_pages, page_table, lengths)
    impl, interpret = _common.resolve_backend(backend)
    args = (k_min, k_max, k_pages, page_table, lengths)
    if impl == "reference":
        return quest_refresh_reference(*args)
    if impl == "gpu":
        return quest_refresh_gpu(*args, interpret=interpret)
    return quest_refresh_tpu(*args, interpret=interpret)


def quest_update_decode(
    k_min,
    k_max,
    k_new,
    page_table,
    positions,
    *,
    page_size: int = DEFAULT_PAGE_SIZE,
    backend: str = "auto",
):
    """Folds one new key per sequence into the Quest min/max of its page.

    Args:
      k_min, k_max: [num_kv_heads, num_pages, head_dim] float32 or bfloat16.
      k_new: [batch, num_kv_heads, head_dim] float32 or bfloat16 (rounded to k_min's dtype).
      page_table: [batch, max_pages] int32.
      positions: [batch] int32 position of the new key; < 0 skips sequence b.
      page_size: static, tokens per page of the cache the metadata describes.
      backend: as in `quest_refresh`.

    Returns:
      (k_min, k_max): at physical page page_table[b, pos // page_size], min = max = k when
      pos % page_size == 0 (a fresh page), else min(k_min, k) and max(k_max, k). Positions
      past the page table and physical page 0 are skipped.
    """
    _check_update_args(k_min, k_max, k_new, page_table, positions, page_size)
    impl, interpret = _common.resolve_backend(backend)
    args = (k_min, k_max, k_new, page_table, positions)
    if impl == "reference":
        return quest_update_decode_reference(*args, page_size=page_size)
    if impl == "gpu":
        return quest_update_decode_gpu(*args, page_size=page_size, interpret=interpret)
    return quest_update_decode_tpu(*args, page_size=page_size, interpret=interpret)


def quest_page_scores(
    q,
    k_min,
    k_max,
    page_table,
    lengths,
    *,
    page_size: int = DEFAULT_PAGE_SIZE,
    backend: str = "auto",
    config: QuestGpuConfig | None = None,
):
    """Quest upper-bound scores of every logical page for every query head.

    Args:
      q: [batch, num_q_heads, head_dim] float32 or bfloat16, post-RoPE queries; query head h
        uses KV head h // (num_q_heads // num_kv_heads).
      k_min, k_max: [num_kv_heads, num_pages, head_dim] float32 or bfloat16.
      page_table: [batch, max_pages] int32.
      lengths: [batch] int32 tokens in the cache per sequence.
      page_size: static, tokens per page.
      backend: as in `quest_refresh`.
      config: QuestGpuConfig for the GPU kernel (benchmark sweeps); default
        DEFAULT_GPU_CONFIG.

    Returns:
      [batch, num_q_heads, max_pages] float32: sum_d max(q_d * min_d, q_d * max_d) over the
      metadata of physical page page_table[b, j]; -inf for j >= ceil(lengths[b] / page_size).
    """
    _check_scores_args(q, k_min, k_max, page_table, lengths, page_size)
    if config is not None and not isinstance(config, QuestGpuConfig):
        raise ValueError(f"config must be a QuestGpuConfig or None, got {type(config).__name__}")
    impl, interpret = _common.resolve_backend(backend)
    args = (q, k_min, k_max, page_table, lengths)
    if impl == "reference":
        return quest_page_scores_reference(*args, page_size=page_size)
    if impl == "gpu":
        return quest_page_scores_gpu(
            *args,
            page_size=page_size,
            interpret=interpret,
            config=config or DEFAULT_GPU_CONFIG,
        )
    return quest_page_scores_tpu(*args, page_size=page_size, interpret=interpret)

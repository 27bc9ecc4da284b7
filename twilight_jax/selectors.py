"""Base selectors: the conservative candidate set of at most B0 tokens per row.

A selection is a list of logical blocks per (sequence, KV head) (``block_size`` consecutive
positions each: Quest and "all" use pages, token-level selectors use 1) plus a validity mask
per row. Rows are KV heads for gqa="group_union" and query heads for gqa="per_head"; in the
per-head case the G heads of a group share one block list (their own lists concatenated) and
each head's mask covers its own segment, so block_spgemv still reads the INT4 K once per group.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.quest import quest_page_scores
from pallas_kernels.spgemv import counts_from_lengths
from pallas_kernels.topk import topk_ids
from twilight_jax.cache import PagedKVCache, gather_tokens
from twilight_jax.config import SparsityConfig


@dataclasses.dataclass(frozen=True)
class Candidates:
    """blocks: [B, Hkv, C] int32 logical block ids; count: [B, Hkv] int32 entries block_spgemv
    reads; valid: [B, rows, C * block_size] bool candidate tokens of each row (position below
    the length included); block_size: static. by_count (static): valid is exactly "entry
    below count and position below the length", the columns block_spgemv gives -inf outside,
    so its estimates carry the mask themselves. count_follows_lengths (static): count is
    min(ceil(length / block_size), C) for every KV head (the blocks below the length listed
    first), which block_spgemv derives itself from the lengths (cand_count=None), so the count
    is built only where something else reads it."""

    blocks: jax.Array
    count: jax.Array
    valid: jax.Array
    block_size: int
    by_count: bool = False
    count_follows_lengths: bool = False

    def num_tokens(self, lengths) -> jax.Array:
        """[B, rows] int32 candidate tokens of each row: valid.sum(-1). For by_count candidates
        from the blocks, the count and the lengths ([B, Hkv, C] work: a block's valid tokens
        are those of its positions below the length) rather than from the [B, rows, C *
        block_size] mask, so the mask need not be built where nothing else reads it."""
        if not self.by_count:
            return self.valid.sum(-1).astype(jnp.int32)
        b, hkv, c = self.blocks.shape
        listed = jnp.arange(c) < self.count[..., None]
        below = jnp.clip(lengths[:, None, None] - self.blocks * self.block_size, 0, self.block_size)
        tokens = jnp.sum(jnp.where(listed, below, 0), axis=-1, dtype=jnp.int32)  # [B, Hkv]
        return jnp.repeat(tokens, self.valid.shape[1] // hkv, axis=1)

    @property
    def positions(self) -> jax.Array:
        """[B, Hkv, C * block_size] int32 logical position of every column."""
        b, hkv, c = self.blocks.shape
        pos = self.blocks[..., None] * self.block_size + jnp.arange(self.block_size)
        return pos.reshape(b, hkv, c * self.block_size).astype(jnp.int32)


def _rows(sparsity: SparsityConfig, hkv: int, g: int) -> int:
    return hkv if sparsity.gqa == "group_union" else hkv * g


def _group_sum(x, sparsity: SparsityConfig, hkv: int):
    """[B, Hq, M] per query head -> per row: summed over the KV group (group_union)."""
    if sparsity.gqa == "per_head":
        return x
    b, hq, m = x.shape
    return x.reshape(b, hkv, hq // hkv, m).sum(2)


def _shared(blocks, count, lengths, block_size, rows, *, follows_lengths=False):
    """Candidates whose block list is common to every row of the KV head; follows_lengths:
    count is min(ceil(length / block_size), C) (see Candidates)."""
    b, hkv, c = blocks.shape
    cand = Candidates(blocks.astype(jnp.int32), count.astype(jnp.int32), None, block_size)
    entry_ok = jnp.arange(c) < count[..., None]  # [B, Hkv, C]
    ok = jnp.repeat(entry_ok, block_size, -1) & (cand.positions < lengths[:, None, None])
    ok = jnp.repeat(ok, rows // hkv, axis=1)
    return dataclasses.replace(cand, valid=ok, by_count=True, count_follows_lengths=follows_lengths)


def _from_topk(ids, lengths, block_size, hkv):
    """Per-row top-k block ids [B, rows, k], in ascending order with the blocks below the
    length first (their real ones: the first min(ceil(length / block_size), k)) -> Candidates."""
    b, rows, k = ids.shape
    n_valid = counts_from_lengths(lengths, block_size, k, rows)  # [B, rows]
    if rows == hkv:
        return _shared(ids, n_valid, lengths, block_size, rows, follows_lengths=True)
    g = rows // hkv
    blocks = ids.reshape(b, hkv, g * k)
    cand = _shared(blocks, jnp.full((b, hkv), g * k), lengths, block_size, rows)
    col = jnp.arange(g * k * block_size) // block_size  # entry of each column
    own = (col // k)[None, None, :] == (jnp.arange(rows) % g)[None, :, None]
    live = (col % k)[None, None, :] < n_valid[..., None]
    return dataclasses.replace(cand, valid=cand.valid & own & live, by_count=False)


def _gather_tokens(pages, page_table, num_tokens: int):
    """pages [Hkv, P, S, X] -> [B, Hkv, num_tokens, X] float32 in logical order."""
    return gather_tokens(pages, page_table, jnp.arange(num_tokens)).astype(jnp.float32)


def _token_topk(score, lengths, budget, hkv):
    """score [B, rows, N] (-inf where invalid) -> Candidates of the top `budget` tokens."""
    k = min(budget, score.shape[-1])
    _, ids = jax.lax.top_k(score, k)
    return _from_topk(ids, lengths, 1, hkv)


def select_all(cache: PagedKVCache, sparsity: SparsityConfig, g: int) -> Candidates:
    """Every token: all pages of the table, the first ceil(length / page_size) live."""
    b, m, s = cache.batch, cache.max_pages, cache.page_size
    blocks = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (b, cache.num_kv_heads, m))
    count = counts_from_lengths(cache.lengths, s, m, cache.num_kv_heads)
    rows = _rows(sparsity, cache.num_kv_heads, g)
    return _shared(blocks, count, cache.lengths, s, rows, follows_lengths=True)


def select_streaming(cache: PagedKVCache, sparsity: SparsityConfig, g: int) -> Candidates:
    """StreamingLLM: the first sink_tokens tokens and the most recent budget - sink_tokens."""
    b, hkv, lengths = cache.batch, cache.num_kv_heads, cache.lengths
    c = min(sparsity.budget, cache.max_seq_len)
    sink = min(sparsity.sink_tokens, c)
    j = jnp.arange(c)
    pos = jnp.where(j < sink, j, lengths[:, None] - (c - sink) + (j - sink))  # [B, C]
    ok = (j < sink) | (pos >= sink)  # recent entries that fall in the sinks are dropped
    blocks = jnp.broadcast_to(jnp.where(ok, pos, 0)[:, None], (b, hkv, c))
    cand = _shared(blocks, jnp.full((b, hkv), c), lengths, 1, _rows(sparsity, hkv, g))
    return dataclasses.replace(cand, valid=cand.valid & ok[:, None], by_count=False)


def select_quest(q, cache, sparsity, layer, backend) -> Candidates:
    """Quest: pages ranked by sum_d max(q_d min_d, q_d max_d) (summed over a group's heads for
    group_union); the top budget / page_size pages, listed in ascending page order (ties at
    the cut go to lower pages; pages past the length score -inf and come last)."""
    hkv, s = cache.num_kv_heads, cache.page_size
    view = cache.layer_view(layer)
    scores = quest_page_scores(
        q,
        view.k_min,
        view.k_max,
        view.page_table,
        cache.lengths,
        scale=view.k_mm_scale,
        page_size=s,
        backend=backend,
        group_sum=sparsity.gqa == "group_union",
    )  # [B, rows, max_pages], -inf past the length
    k = min(sparsity.budget // s, cache.max_pages)
    # The set of the k best pages, in ascending page order (no sort of the scores on the GPU).
    ids = topk_ids(scores, k, backend=backend)
    return _from_topk(ids, cache.lengths, s, hkv)


def select_double_sparsity(q, cache, sparsity, layer) -> Candidates:
    """Double Sparsity: approximate logits q[ch] . label (label = K at the layer's heavy
    channels ch), summed over a group's heads for group_union; the top budget tokens."""
    b, hq, d = q.shape
    hkv, n = cache.num_kv_heads, cache.max_seq_len
    view = cache.layer_view(layer)
    labels = _gather_tokens(view.ds_labels, view.page_table, n)  # [B, Hkv, N, C]
    ch = cache.ds_channel_idx[layer]  # [Hkv, C]
    q_lab = jnp.take_along_axis(
        q.astype(jnp.float32).reshape(b, hkv, hq // hkv, d), ch[None, :, None, :], axis=-1
    )
    score = jnp.einsum("bgjc,bgnc->bgjn", q_lab, labels).reshape(b, hq, n)
    valid = (jnp.arange(n) < cache.lengths[:, None])[:, None]
    score = jnp.where(valid, _group_sum(score, sparsity, hkv), -jnp.inf)
    return _token_topk(score, cache.lengths, sparsity.budget, hkv)


def select_oracle(q, cache, sparsity, layer) -> Candidates:
    """Exact top-k: per head the true logits; per group the summed true attention weights."""
    b, hq, d = q.shape
    hkv, n = cache.num_kv_heads, cache.max_seq_len
    view = cache.layer_view(layer)
    k = _gather_tokens(view.k_pages, view.page_table, n)  # [B, Hkv, N, D]
    qg = q.astype(jnp.float32).reshape(b, hkv, hq // hkv, d)
    logits = jnp.einsum("bgjd,bgnd->bgjn", qg, k).reshape(b, hq, n) / math.sqrt(d)
    valid = (jnp.arange(n) < cache.lengths[:, None])[:, None]
    logits = jnp.where(valid, logits, -jnp.inf)
    if sparsity.gqa == "group_union":
        m = logits.max(-1, keepdims=True)
        w = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))  # 0 where invalid
        w = w / jnp.maximum(w.sum(-1, keepdims=True), 1e-30)
        logits = jnp.where(valid, _group_sum(w, sparsity, hkv), -jnp.inf)
    return _token_topk(logits, cache.lengths, sparsity.budget, hkv)


def select_candidates(
    q, cache: PagedKVCache, sparsity: SparsityConfig, layer, backend
) -> Candidates:
    """Dispatch on sparsity.selector ("dense" has no candidate stage and is not accepted)."""
    g = q.shape[1] // cache.num_kv_heads
    if sparsity.selector == "all":
        return select_all(cache, sparsity, g)
    if sparsity.selector == "streaming":
        return select_streaming(cache, sparsity, g)
    if sparsity.selector == "quest":
        if sparsity.gqa == "group_union" and sparsity.budget // cache.page_size >= cache.max_pages:
            # The budget covers every page of the table: Quest keeps them all, and its
            # candidates are exactly select_all's (same blocks, counts and mask), so the pages
            # need no scores (scoring them costs 100 us of a 500 us step at batch 64 / 8K).
            return select_all(cache, sparsity, g)
        return select_quest(q, cache, sparsity, layer, backend)
    if sparsity.selector == "double_sparsity":
        return select_double_sparsity(q, cache, sparsity, layer)
    if sparsity.selector == "oracle":
        return select_oracle(q, cache, sparsity, layer)
    raise ValueError(f"select_candidates has no stage for selector {sparsity.selector!r}")


# ----------------------------------------------------------------------------- calibration
def calibrate_double_sparsity(q_samples, k_samples, channels: int) -> np.ndarray:
    """Heavy channels per KV head: the `channels` with the largest mean |q_d * k_d|.

    q_samples: [..., N, Hq, D] post-RoPE queries of N tokens of text run through the model;
    k_samples: [..., N, Hkv, D] the keys of the same tokens (leading axes, e.g. layers, must
    match). The mean runs over tokens and the G query heads of each KV head. Returns int32
    [..., Hkv, channels], ascending channel ids (host numpy: an offline step).
    """
    q = np.asarray(q_samples, np.float32)
    k = np.asarray(k_samples, np.float32)
    if q.ndim < 3 or k.ndim != q.ndim:
        raise ValueError(
            f"q_samples [..., N, Hq, D] and k_samples [..., N, Hkv, D] need the same rank >= 3, "
            f"got shapes {q.shape} and {k.shape}"
        )
    if q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"k_samples shape {k.shape} does not match q_samples shape {q.shape} "
            "(leading axes, N and D must agree)"
        )
    hq, hkv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if hq % hkv:
        raise ValueError(f"q_samples heads {hq} must be a multiple of k_samples heads {hkv}")
    if not isinstance(channels, (int, np.integer)) or not 0 < channels <= d:
        raise ValueError(f"channels must be an int in [1, {d}], got {channels!r}")
    qg = q.reshape(*q.shape[:-2], hkv, hq // hkv, d)
    importance = np.abs(qg * k[..., None, :]).mean(axis=(-4, -2))  # [..., Hkv, D]
    top = np.argsort(-importance, axis=-1, kind="stable")[..., :channels]
    return np.sort(top, axis=-1).astype(np.int32)


def save_ds_channels(path, channel_idx) -> None:
    """Writes a calibration [L, Hkv, C] to an .npz file (key "channels")."""
    np.savez(path, channels=np.asarray(channel_idx, np.int32))


def load_ds_channels(path) -> np.ndarray:
    """Reads a calibration written by save_ds_channels: int32 [L, Hkv, C]."""
    with np.load(path) as f:
        if "channels" not in f:
            raise ValueError(f"{path} has no 'channels' array (keys: {list(f.keys())})")
        return f["channels"].astype(np.int32)

"""Top-p pruning of the candidates: estimate, threshold, and the always-kept tokens.

1. ``estimate_scores``: logits of every candidate column from a cheap copy of K (INT4 cache by
   block_spgemv; 8 bits or exact K by a jnp gather for ablations).
2. ``prune``: softmax over the row's candidates, the smallest set reaching mass p, compacted
   (topp_select_grouped; one selection per KV group = union of its heads', or per head), as
   token positions (the kernels map each kept column to its position as they store it).
3. ``add_forced_tokens``: the sink and recent tokens join, duplicates dropped, compacted.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.spgemv import block_spgemv
from pallas_kernels.topp import topp_select_grouped
from twilight_jax.cache import PagedKVCache
from twilight_jax.config import SparsityConfig
from twilight_jax.reference import fake_quantize
from twilight_jax.selectors import Candidates


def estimate_scores(
    q, cache: PagedKVCache, layer, cand: Candidates, bits: int, backend: str
) -> jax.Array:
    """Estimated logits q . K_hat / sqrt(D): [B, Hq, C * block_size] float32.

    Only columns where cand.valid holds are meaningful (others may be -inf or junk).
    """
    view = cache.layer_view(layer)
    if bits == 4:
        return block_spgemv(
            q,
            view.k_int4,
            view.k_scale,
            view.k_zero,
            view.page_table,
            cache.lengths,
            cand.blocks,
            None if cand.count_follows_lengths else cand.count,
            block_size=cand.block_size,
            backend=backend,
        )
    b, hq, d = q.shape
    hkv, s = cache.num_kv_heads, cache.page_size
    pos = cand.positions  # [B, Hkv, N]
    phys = jnp.take_along_axis(
        view.page_table, jnp.clip(pos // s, 0, cache.max_pages - 1).reshape(b, -1), axis=1
    ).reshape(pos.shape)
    k = view.k_pages[jnp.arange(hkv)[None, :, None], phys, pos % s]
    k = k.astype(jnp.float32)
    if bits == 8:
        k = fake_quantize(k, 8)  # the 8-bit ablation has no kernel: the reference's rule
    qg = q.astype(jnp.float32).reshape(b, hkv, hq // hkv, d)
    return (jnp.einsum("bgjd,bgnd->bgjn", qg, k) / math.sqrt(d)).reshape(b, hq, -1)


def prune(logits, cand: Candidates, p, sparsity: SparsityConfig, backend: str):
    """Top-p selection of candidate columns, returned as the token positions they hold.

    logits: [B, Hq, N] estimates; p: [B] float32 (per sequence).
    Returns (positions [B, rows, K] int32 of the kept candidates in column order, 0 past the
    counts; counts [B, rows] int32; saturated [B, rows] bool; mass [B, Hq] float32 estimated
    weight kept per query head). K, the top-p width, is min(max_budget - forced tokens, N):
    room for the sink and recent tokens within the selection capacity max_budget.
    """
    b, hq, n = logits.shape
    hkv = cand.blocks.shape[1]
    rows = cand.valid.shape[1]
    g = hq // rows  # heads sharing one selection: G for group_union, 1 per head
    width = min(sparsity.max_budget - sparsity.forced_tokens, n)
    # INT4 estimates are -inf off the candidates when the mask is the count and length alone,
    # and top-p never keeps a -inf entry: the kernels then need no mask to read.
    mask_in_logits = sparsity.estimate_bits == 4 and cand.by_count
    # Every row of a KV head shares its block list (per-head rows repeat it).
    blocks = jnp.repeat(cand.blocks, rows // hkv, axis=1) if rows != hkv else cand.blocks
    pos, counts, saturated, mass = topp_select_grouped(
        logits.reshape(b * rows, g, n),
        None if mask_in_logits else cand.valid.reshape(b * rows, n),
        p,  # [B]: one per sequence, shared by its rows (no [B * rows] copy)
        width,
        backend=backend,
        blocks=blocks.reshape(b * rows, -1),
        block_size=cand.block_size,
    )
    return (
        pos[:, :width].reshape(b, rows, width),
        counts.reshape(b, rows),
        saturated.reshape(b, rows),
        mass.reshape(b, hq),
    )


def _compact(pos, ok):
    """Moves the entries of pos [..., M] where ok holds to the front, in order.

    Returns (compacted [..., M] int32 with 0 padding, count [...] int32). No sort: each kept
    entry's destination is its rank among the kept (a cumulative sum), then one scatter.
    """
    m = pos.shape[-1]
    rank = jnp.cumsum(ok, axis=-1, dtype=jnp.int32)
    dest = jnp.where(ok, rank - 1, m)  # m = out of range: dropped
    flat_pos = pos.reshape(-1, m)
    flat_dest = dest.reshape(-1, m)
    out = (
        jnp.zeros_like(flat_pos)
        .at[jnp.arange(flat_pos.shape[0])[:, None], flat_dest]
        .set(flat_pos, mode="drop")
    )
    # The count is the running count's last entry: a separate sum would be one more pass (and,
    # with few rows, one slow row reduction on the GPU).
    count = rank[..., -1] if m else jnp.zeros(pos.shape[:-1], jnp.int32)
    return out.reshape(pos.shape).astype(jnp.int32), count


def add_forced_tokens(kept_pos, kept_ok, lengths, sink: int, recent: int, *, kept_count=None):
    """Final token lists: the sink and recent tokens plus the kept tokens not among them.

    kept_pos, kept_ok: [B, rows, K] logical positions and their validity; lengths: [B];
    kept_count: None, or [B, rows] int32 when the kept lists are compacted already (kept_ok
    holds their first kept_count entries, as the pruner's lists do): with no sink or recent
    tokens they are then final as they are, with no cumsum and scatter.
    Returns (token_pos [B, rows, sink + recent + K] int32, counts [B, rows] int32), unique
    positions, padding 0 past counts.
    """
    if sink + recent == 0:
        if kept_count is not None:
            return kept_pos.astype(jnp.int32), kept_count
        return _compact(kept_pos, kept_ok)
    b, rows, _ = kept_pos.shape
    ln = lengths[:, None]
    i = jnp.arange(sink)[None, :]
    j = jnp.arange(recent)[None, :]
    recent_pos = ln - recent + j
    forced_pos = jnp.concatenate([jnp.broadcast_to(i, (b, sink)), recent_pos], -1)
    # A recent token inside the sink range is already listed once.
    forced_ok = jnp.concatenate([i < ln, (recent_pos >= sink) & (recent_pos >= 0)], -1)
    is_forced = (kept_pos < sink) | (kept_pos >= ln[:, :, None] - recent)
    pos = jnp.concatenate(
        [jnp.broadcast_to(forced_pos[:, None], (b, rows, sink + recent)), kept_pos], -1
    )
    ok = jnp.concatenate(
        [jnp.broadcast_to(forced_ok[:, None], (b, rows, sink + recent)), kept_ok & ~is_forced], -1
    )
    return _compact(pos, ok)

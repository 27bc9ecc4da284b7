"""The whole Twilight decode-attention op in plain jnp: the pinned semantics.

Self-contained on purpose (no pallas_kernels, no other twilight_jax module but the config and
the cache container): every stage works on dense per-sequence arrays and boolean token masks
``[B, rows, N]`` instead of compacted lists, so it can be checked by reading. ``rows`` is Hkv
for gqa="group_union" (query head h belongs to row h // G) and Hq for gqa="per_head".
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from twilight_jax.cache import PagedKVCache
from twilight_jax.config import SparsityConfig


class ReferenceSelection(NamedTuple):
    mask: jax.Array  # [B, rows, N] bool: tokens attended
    candidates: jax.Array  # [B, rows, N] bool: the base selector's candidates
    estimated_mass: jax.Array  # [B, Hq] f32: estimated weight of the pruned set (1 unpruned)
    saturated: jax.Array  # [B, rows] bool: the pruned set exceeded its top-p width


def dense_kv(cache: PagedKVCache, layer: int):
    """K, V of one layer in logical order: [B, Hkv, N, D] float32, N = cache.max_seq_len."""
    s = cache.page_size
    pos = jnp.arange(cache.max_seq_len)
    phys = cache.page_table[:, pos // s]  # [B, N]
    g = jnp.arange(cache.num_kv_heads)[None, :, None]
    k = cache.k_pages[:, layer][g, phys[:, None, :], (pos % s)[None, None, :]]
    v = cache.v_pages[:, layer][g, phys[:, None, :], (pos % s)[None, None, :]]
    return k.astype(jnp.float32), v.astype(jnp.float32)


def _divide(a, b):
    """a / b as a true divide (correctly rounded on CPU; XLA's GPU division is not): XLA
    rewrites a / constant and a / broadcast(b) into a * (1 / b) (an ulp off), but not a
    division by a full-shape divisor out of an optimization barrier."""
    return a / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(b, a.dtype), a.shape))


def fake_quantize(x, bits: int):
    """Asymmetric per-row min-max quantization of x [..., D] to `bits` and back:
    zero = min, scale = (max - min) / (2**bits - 1), code = floor((x - zero) / scale + 1/2)."""
    levels = 2**bits - 1
    zero = x.min(-1, keepdims=True)
    scale = _divide(x.max(-1, keepdims=True) - zero, float(levels))
    safe = jnp.where(scale > 0, scale, 1.0)
    code = jnp.floor(_divide(x - zero, safe) + 0.5)
    code = jnp.where(scale > 0, jnp.clip(code, 0, levels), 0.0)
    return code * scale + zero


def topp_keep(w, valid, p):
    """The top-p set of each row: w, valid [R, N] (w sums to 1 over valid), p [R] -> [R, N].

    Token j is kept iff the weights strictly above w_j sum to less than p: the smallest set of
    heaviest tokens reaching mass p, every token tied with its lightest member included.
    p >= 1 keeps every valid token (no float sum can drop one).
    """
    w = jnp.where(valid, w, 0.0)
    heavier = jnp.where(w[:, None, :] > w[:, :, None], w[:, None, :], 0.0).sum(-1)  # [R, N]
    return valid & ((heavier < p[:, None]) | (p[:, None] >= 1.0))


def _topk_mask(score, k: int):
    """Marks the k highest finite entries along the last axis (ties: lower index)."""
    _, idx = jax.lax.top_k(score, k)
    hit = jnp.zeros(score.shape, bool)
    hit = jnp.put_along_axis(hit, idx, True, axis=-1, inplace=False)
    return hit & jnp.isfinite(score)


def _masked_softmax(s, mask):
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, -1, keepdims=True)
    e = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    return e / jnp.maximum(e.sum(-1, keepdims=True), 1e-30)


def _to_rows(x, sparsity: SparsityConfig, g: int):
    """Per-query-head [B, Hq, ...] -> per-row: summed over the group, or as is per head."""
    if sparsity.gqa == "per_head":
        return x
    b, hq = x.shape[:2]
    return x.reshape(b, hq // g, g, *x.shape[2:]).sum(2)


def _candidates(q, k, lengths, cache, sparsity, layer, g):
    """The base selector's candidate mask [B, rows, N]."""
    b, hkv, n, d = k.shape
    valid = jnp.arange(n)[None, :] < lengths[:, None]  # [B, N]
    qg = q.reshape(b, hkv, g, d)
    rows = hkv if sparsity.gqa == "group_union" else hkv * g
    budget = min(sparsity.budget, n)
    if sparsity.selector in ("dense", "all"):
        return jnp.broadcast_to(valid[:, None], (b, rows, n))
    if sparsity.selector == "streaming":
        sink = min(sparsity.sink_tokens, budget)
        pos = jnp.arange(n)[None, :]
        window = (pos < sink) | (pos >= lengths[:, None] - (budget - sink))
        return jnp.broadcast_to((window & valid)[:, None], (b, rows, n))
    if sparsity.selector == "quest":
        s = sparsity.page_size
        kp = k.reshape(b, hkv, n // s, s, d)
        live = valid.reshape(b, 1, n // s, s, 1)
        kmin = jnp.where(live, kp, jnp.inf).min(3)  # [B, Hkv, NP, D]
        kmax = jnp.where(live, kp, -jnp.inf).max(3)
        if cache.k_mm_scale is not None:
            # INT8 metadata: the cache's own bounds (codes times the page's scale, outward of
            # the min / max above), whose codes depend on the order the tokens were written in.
            scale = cache.k_mm_scale[:, layer][..., None]
            kmin = (cache.k_min[:, layer].astype(jnp.float32) * scale)[:, cache.page_table]
            kmax = (cache.k_max[:, layer].astype(jnp.float32) * scale)[:, cache.page_table]
            kmin, kmax = kmin.transpose(1, 0, 2, 3), kmax.transpose(1, 0, 2, 3)
        page_score = jnp.maximum(
            qg[:, :, :, None] * kmin[:, :, None], qg[:, :, :, None] * kmax[:, :, None]
        )
        page_score = page_score.sum(-1).reshape(b, hkv * g, n // s)
        page_live = jnp.arange(n // s)[None, :] * s < lengths[:, None]
        page_score = jnp.where(page_live[:, None], _to_rows(page_score, sparsity, g), -jnp.inf)
        pages = _topk_mask(page_score, min(sparsity.budget // s, n // s))
        return jnp.repeat(pages, s, axis=-1) & valid[:, None]
    if sparsity.selector == "double_sparsity":
        ch = cache.ds_channel_idx[layer]  # [Hkv, C]
        k_lab = jnp.take_along_axis(k, ch[None, :, None, :], axis=-1)  # [B, Hkv, N, C]
        q_lab = jnp.take_along_axis(qg, ch[None, :, None, :], axis=-1)  # [B, Hkv, G, C]
        score = jnp.einsum("bgjc,bgnc->bgjn", q_lab, k_lab).reshape(b, hkv * g, n)
        score = jnp.where(valid[:, None], _to_rows(score, sparsity, g), -jnp.inf)
        return _topk_mask(score, budget)
    if sparsity.selector == "oracle":
        logits = jnp.einsum("bgjd,bgnd->bgjn", qg, k).reshape(b, hkv * g, n) / math.sqrt(d)
        if sparsity.gqa == "group_union":  # the group's total true attention weight per token
            logits = _to_rows(_masked_softmax(logits, valid[:, None]), sparsity, g)
        score = jnp.where(valid[:, None], logits, -jnp.inf)
        return _topk_mask(score, budget)
    raise ValueError(f"unknown selector {sparsity.selector!r}")


def _prune(q, k, cand, p, sparsity, g):
    """Top-p pruning of the candidates on estimated weights -> (mask, mass [B, Hq], saturated)."""
    b, hkv, n, d = k.shape
    k_est = k if sparsity.estimate_bits == 16 else fake_quantize(k, sparsity.estimate_bits)
    logits = jnp.einsum("bgjd,bgnd->bgjn", q.reshape(b, hkv, g, d), k_est) / math.sqrt(d)
    logits = logits.reshape(b, hkv * g, n)
    head_cand = cand if sparsity.gqa == "per_head" else jnp.repeat(cand, g, axis=1)  # [B, Hq, N]
    w = _masked_softmax(logits, head_cand)
    sel = topp_keep(w.reshape(-1, n), head_cand.reshape(-1, n), jnp.repeat(p, hkv * g))
    sel = sel.reshape(b, hkv * g, n)
    gr = 1 if sparsity.gqa == "per_head" else g
    rows = sel.shape[1] // gr
    union = sel.reshape(b, rows, gr, n).any(2)
    width = min(sparsity.max_budget - sparsity.forced_tokens, n)  # the top-p width
    rank_score = jnp.where(union, w.reshape(b, rows, gr, n).max(2), -jnp.inf)
    kept = union & _topk_mask(rank_score, width)  # the highest max_g w when saturated
    saturated = union.sum(-1) > width
    head_kept = kept if sparsity.gqa == "per_head" else jnp.repeat(kept, g, axis=1)
    mass = jnp.where(head_kept, w, 0.0).sum(-1)
    return kept, mass, saturated


@functools.partial(jax.jit, static_argnames=("sparsity", "layer"))
def decode_attention_reference(
    q, cache: PagedKVCache, sparsity: SparsityConfig, *, layer: int = 0, top_p=None
):
    """Reference of ``twilight_jax.decode_attention`` (same arguments, backend aside).

    q: [B, Hq, D] post-RoPE; top_p: None, a float, or [B] per-sequence p (overrides sparsity.top_p;
    pruning runs when either is set). Returns (out [B, Hq, D] in q.dtype, ReferenceSelection).
    """
    b, hq, d = q.shape
    hkv = cache.num_kv_heads
    g = hq // hkv
    k, v = dense_kv(cache, layer)
    n = k.shape[2]
    lengths = cache.lengths
    qf = q.astype(jnp.float32)
    valid = jnp.arange(n)[None, :] < lengths[:, None]
    cand = _candidates(qf, k, lengths, cache, sparsity, layer, g)
    p = sparsity.top_p if top_p is None else top_p
    if sparsity.selector != "dense" and p is not None:
        p = jnp.broadcast_to(jnp.asarray(p, jnp.float32), (b,))
        keep, mass, saturated = _prune(qf, k, cand, p, sparsity, g)
    else:
        keep, mass, saturated = cand, jnp.ones((b, hq)), jnp.zeros(cand.shape[:2], bool)
    pos = jnp.arange(n)[None, :]
    forced = (pos < sparsity.sink_tokens) | (pos >= lengths[:, None] - sparsity.recent_tokens)
    keep = keep | (forced & valid)[:, None]  # sink and recent tokens are always attended
    head_keep = keep if keep.shape[1] == hq else jnp.repeat(keep, g, axis=1)
    s = jnp.einsum("bgjd,bgnd->bgjn", qf.reshape(b, hkv, g, d), k).reshape(b, hq, n)
    w = _masked_softmax(s / math.sqrt(d), head_keep)
    out = jnp.einsum("bgjn,bgnd->bgjd", w.reshape(b, hkv, g, n), v).reshape(b, hq, d)
    return out.astype(q.dtype), ReferenceSelection(keep, cand, mass, saturated)

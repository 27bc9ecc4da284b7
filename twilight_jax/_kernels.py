"""The kernel entries twilight_jax calls, in one place.

Every call site passes ``backend=`` down. Until a pallas_kernels module lands, a plain-jnp
stand-in with the same signature (docs/kernel_api.md) takes its place; the stand-ins go away
once all five modules are in the tree.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from pallas_kernels.int4 import quantize_int4
from pallas_kernels.spgemv import block_spgemv
from pallas_kernels.topp import topp_select_grouped

__all__ = [
    "block_spgemv",
    "paged_decode_attention",
    "quantize_int4",
    "quest_page_scores",
    "sparse_decode_attention",
    "topp_select_grouped",
]

_NEG_INF = float("-inf")


def _positions_to_slots(page_table, pos, page_size):
    """Logical positions [B, ...] -> (physical page, slot), clamped to valid table entries."""
    max_pages = page_table.shape[1]
    logical = jnp.clip(pos // page_size, 0, max_pages - 1)
    b = jnp.arange(pos.shape[0]).reshape((-1,) + (1,) * (pos.ndim - 1))
    return page_table[b, logical], pos % page_size


def _gather_rows(pages, page_table, pos):
    """pages [Hkv, P, S, X]; pos [B, Hkv, N] -> rows [B, Hkv, N, X] (float32)."""
    phys, slot = _positions_to_slots(page_table, pos, pages.shape[2])
    g = jnp.arange(pages.shape[0])[None, :, None]
    return pages[g, phys, slot].astype(jnp.float32)


# ----------------------------------------------------------------------------- quest
def _quest_page_scores(q, k_min, k_max, page_table, lengths, *, page_size, backend="auto"):
    del backend
    b, hq, d = q.shape
    hkv = k_min.shape[0]
    g = jnp.arange(hkv)[None, :, None]
    kmin = k_min[g, page_table[:, None, :]].astype(jnp.float32)  # [B, Hkv, M, D]
    kmax = k_max[g, page_table[:, None, :]].astype(jnp.float32)
    qg = q.astype(jnp.float32).reshape(b, hkv, hq // hkv, 1, d)
    s = jnp.maximum(qg * kmin[:, :, None], qg * kmax[:, :, None]).sum(-1)
    live = jnp.arange(page_table.shape[1]) * page_size < lengths[:, None]
    return jnp.where(live[:, None, None], s, _NEG_INF).reshape(b, hq, -1)


# ----------------------------------------------------------------------------- attention
def _sparse_decode_attention(
    q, k_pages, v_pages, page_table, token_pos, counts, *, scale=None, backend="auto"
):
    del backend
    b, hq, d = q.shape
    hkv = k_pages.shape[0]
    hi, cap = token_pos.shape[1], token_pos.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    gi = hq // hi
    kv_of_row = jnp.arange(hi) * hkv // hi  # Hi = Hkv: identity; Hi = Hq: h // G
    phys, slot = _positions_to_slots(page_table, token_pos, k_pages.shape[2])
    k = k_pages[kv_of_row[None, :, None], phys, slot].astype(jnp.float32)  # [B, Hi, cap, D]
    v = v_pages[kv_of_row[None, :, None], phys, slot].astype(jnp.float32)
    qh = q.astype(jnp.float32).reshape(b, hi, gi, d)
    s = scale * jnp.einsum("bijd,bind->bijn", qh, k)
    ok = (jnp.arange(cap) < counts[..., None])[:, :, None]
    s = jnp.where(ok, s, _NEG_INF)
    m = jnp.where(ok.any(-1, keepdims=True), s.max(-1, keepdims=True), 0.0)
    e = jnp.where(ok, jnp.exp(s - m), 0.0)
    o = jnp.einsum("bijn,bind->bijd", e, v) / jnp.maximum(e.sum(-1), 1e-30)[..., None]
    return o.reshape(b, hq, d).astype(q.dtype)


def _paged_decode_attention(
    q, k_pages, v_pages, page_table, lengths, *, scale=None, backend="auto"
):
    b = q.shape[0]
    hkv = k_pages.shape[0]
    n = page_table.shape[1] * k_pages.shape[2]
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, hkv, n))
    counts = jnp.broadcast_to(lengths[:, None], (b, hkv))
    return _sparse_decode_attention(q, k_pages, v_pages, page_table, pos, counts, scale=scale)


# Stand-ins until quest.py and attention.py land.
quest_page_scores = _quest_page_scores
paged_decode_attention, sparse_decode_attention = _paged_decode_attention, _sparse_decode_attention

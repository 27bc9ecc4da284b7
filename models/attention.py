"""Attention of the prefill: dense causal attention over a prompt, and a prompt chunk's
attention over the paged cache before it and itself (decode attention is
``twilight_jax.decode_attention``)."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp

from twilight_jax.cache import gather_tokens


def dense_attention(q, k, v, lengths=None):
    """Causal softmax attention over a right-padded prompt.

    q [B, T, Hq, D]; k, v [B, T, Hkv, D]; lengths [B] int32 or None (all T valid)
    -> [B, T, Hq, D] in q.dtype. Rows at or past lengths[b] are unspecified.
    cuDNN flash attention on a GPU in bf16/fp16, XLA elsewhere.
    """
    on_gpu = jax.default_backend() in ("gpu", "cuda")
    if on_gpu and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(
                q,
                k,
                v,
                is_causal=True,
                query_seq_lengths=lengths,
                key_value_seq_lengths=None if lengths is None else jnp.maximum(lengths, 1),
                implementation="cudnn",
            )
        except Exception as e:  # noqa: BLE001
            # cuDNN rejects some shapes, GPUs and library versions at trace time; the XLA
            # path computes the same thing, only slower (warnings shows this once per site).
            warnings.warn(f"cuDNN attention unavailable, using XLA: {e!r}", stacklevel=2)
    # Key lengths suffice: valid queries never see padding keys, and the outputs of padding
    # query rows are never used.
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True, key_value_seq_lengths=lengths, implementation="xla"
    )


def cached_attention(q, cache, layer, positions, *, block_tokens: int = 512):
    """Causal attention of a chunk over everything cached before it and itself.

    q [B, T, Hq, D] at positions [B, T] int32; cache holds this layer's keys and values at every
    position up to positions[b, -1] (the chunk's own already written). Query i of sequence b
    attends to positions [0, positions[b, i]] -> [B, T, Hq, D] in q.dtype.

    Keys and values are gathered from the pages ``block_tokens`` positions at a time under an
    online softmax, in a loop that stops after the block holding the largest position: memory
    is [B, Hq, T, block_tokens] logits, not [B, Hq, T, max_seq_len], and the work follows
    the cached prefix rather than the cache size. XLA ops (meant for prefill chunks, not decode).
    """
    b, t, hq, d = q.shape
    view = cache.layer_view(layer)
    hkv, n = view.k_pages.shape[0], cache.max_seq_len
    kb = min(block_tokens, n)
    qg = q.astype(jnp.float32).reshape(b, t, hkv, hq // hkv, d) * (1.0 / math.sqrt(d))
    positions = positions.astype(jnp.int32)

    def block(i, carry):
        m, den, acc = carry  # [B, Hkv, G, T], [B, Hkv, G, T], [B, Hkv, G, T, D]
        pos = i * kb + jnp.arange(kb, dtype=jnp.int32)
        at = jnp.minimum(pos, n - 1)
        k = gather_tokens(view.k_pages, view.page_table, at).astype(jnp.float32)  # [B,Hkv,kb,D]
        v = gather_tokens(view.v_pages, view.page_table, at).astype(jnp.float32)
        logits = jnp.einsum("bthgd,bhkd->bhgtk", qg, k)
        seen = (pos[None, None, :] <= positions[:, :, None]) & (pos < n)  # [B, T, kb]
        logits = jnp.where(seen[:, None, None], logits, -jnp.inf)
        m_new = jnp.maximum(m, logits.max(-1))
        p = jnp.exp(logits - m_new[..., None])
        corr = jnp.exp(m - m_new)
        den = den * corr + p.sum(-1)
        acc = acc * corr[..., None] + jnp.einsum("bhgtk,bhkd->bhgtd", p, v)
        return m_new, den, acc

    # Position 0 is in every query's range, so the first block leaves no row at -inf.
    shape = (b, hkv, hq // hkv, t)
    init = (
        jnp.full(shape, -jnp.inf, jnp.float32),
        jnp.zeros(shape, jnp.float32),
        jnp.zeros((*shape, d), jnp.float32),
    )
    num_blocks = jnp.max(positions) // kb + 1
    _, den, acc = jax.lax.fori_loop(0, num_blocks, block, init)
    out = acc / den[..., None]  # [B, Hkv, G, T, D]
    return jnp.moveaxis(out, 3, 1).reshape(b, t, hq, d).astype(q.dtype)

"""Token sampling with per-sequence parameters as traced arrays.

Every request in the running batch has its own temperature, nucleus p (``sample_top_p``),
top-k and seed; they enter
the jitted sampler as [B] arrays, so a new request never recompiles anything. Temperature 0
means greedy (argmax of the raw logits, so greedy output does not depend on the other knobs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _nucleus(x, sample_top_p, top_k):
    """x [B, V] tempered logits with every token outside the row's top-k-limited nucleus set
    to -inf: the smallest set of highest probabilities whose mass reaches sample_top_p (ties at the
    cutoff included)."""
    vocab = x.shape[-1]
    sorted_x = -jnp.sort(-x, axis=-1)  # descending
    probs = jax.nn.softmax(sorted_x, axis=-1)
    # Mass strictly before each rank: a rank is kept while that is below p, so the top token
    # always survives and the kept set is the smallest one reaching p.
    before = jnp.cumsum(probs, axis=-1) - probs
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(top_k > 0, top_k, vocab)[:, None]
    keep = (before < sample_top_p[:, None]) & (rank < k)
    cutoff = jnp.min(jnp.where(keep, sorted_x, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(x >= cutoff, x, -jnp.inf)


@jax.jit
def sample_tokens(logits, temperature, sample_top_p, top_k, seed, step):
    """Samples one token per row.

    logits: [B, V] float (any float dtype; math in float32).
    temperature: [B] float32; 0 = greedy.
    sample_top_p: [B] float32 in (0, 1]; nucleus sampling over the tempered distribution.
    top_k: [B] int32; 0 = off.
    seed: [B] uint32; step: [B] int32 (tokens generated so far). The key of row b is a function
      of (seed[b], step[b]) only, so a request samples the same tokens whatever batch it shares.
    Returns [B] int32 token ids.

    The costly parts run only when some row needs them (a runtime branch, not a recompile):
    the draw when a row samples, the vocabulary sort when a row sets sample_top_p < 1 or top_k. A
    row's result does not depend on which branch its neighbours took.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampling = temperature > 0
    filtering = sampling & ((sample_top_p < 1.0) | (top_k > 0))

    def draw(_):
        x = logits / jnp.maximum(temperature, 1e-6)[:, None]
        x = jax.lax.cond(
            jnp.any(filtering),
            lambda x: jnp.where(filtering[:, None], _nucleus(x, sample_top_p, top_k), x),
            lambda x: x,
            x,
        )

        def one(s, t, row):
            key = jax.random.fold_in(jax.random.key(s), t)
            return jax.random.categorical(key, row)

        sampled = jax.vmap(one)(seed, step, x).astype(jnp.int32)
        return jnp.where(sampling, sampled, greedy)

    return jax.lax.cond(jnp.any(sampling), draw, lambda _: greedy, None)


def sample_tokens_reference(logits, temperature, sample_top_p, top_k):
    """The support the sampler draws from, per row: bool [B, V] (float32 jnp, for tests).

    Greedy rows support only the argmax. Others: tokens of the smallest top-k-limited set of
    highest tempered probabilities whose mass reaches sample_top_p (ties at the cutoff included).
    """
    logits = jnp.asarray(logits, jnp.float32)
    order = jnp.argsort(-logits, axis=-1)
    rows = []
    for b in range(logits.shape[0]):
        if float(temperature[b]) == 0.0:
            rows.append(jnp.arange(logits.shape[1]) == jnp.argmax(logits[b]))
            continue
        p = jax.nn.softmax(logits[b] / temperature[b])[order[b]]
        k = int(top_k[b]) or logits.shape[1]
        n = 0
        mass = 0.0
        while n < k and (n == 0 or mass < float(sample_top_p[b])):
            mass += float(p[n])
            n += 1
        cutoff = logits[b, order[b, n - 1]]
        rows.append(logits[b] >= cutoff)
    return jnp.stack(rows)

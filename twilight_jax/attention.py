"""decode_attention: select -> estimate -> prune -> attend, for one decode step of one layer.

Everything runs at static capacities with dynamic counts, because XLA needs static shapes:
candidate capacity B0 (``budget``), selection capacity ``max_budget``. Nothing syncs with the
host and nothing depends on the values of lengths, counts or p, so one compiled step serves every
length and every p.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import BACKENDS
from pallas_kernels.attention import paged_decode_attention, sparse_decode_attention
from twilight_jax import pruner, selectors
from twilight_jax.cache import PagedKVCache
from twilight_jax.config import SparsityConfig, check_top_p


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["counts", "estimated_mass", "saturated", "candidates", "token_pos"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class SelectionInfo:
    """What one decode_attention call attended to; rows = Hkv (group_union) or Hq (per_head).

    counts: [B, rows] int32 tokens attended (sink and recent included).
    estimated_mass: [B, Hq] float32 estimated weight of the pruner's set for each query head
      (1 when nothing is pruned).
    saturated: [B, rows] bool, the pruner's set exceeded its capacity and was cut.
    candidates: [B, rows] int32 tokens proposed by the base selector.
    token_pos: [B, rows, W] int32 logical positions attended, valid below counts (W static:
      sink + recent + the top-p width, the candidates without pruning, max_seq_len if dense).
    """

    counts: jax.Array
    estimated_mass: jax.Array
    saturated: jax.Array
    candidates: jax.Array
    token_pos: jax.Array


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["counts", "candidates", "estimated_mass", "saturated"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class DecodeInfo:
    """What one decode step of a model attended to, layer by layer (L = every layer, dense ones
    included): the statistics of each layer's ``SelectionInfo``, stacked.

    counts: int32 [L, B, Hs] tokens attended (Hs = Hkv, or Hq when ``gqa == "per_head"``;
      dense layers count every cached token);
    candidates: int32 [L, B, Hs] tokens the base selector proposed (dense layers: every cached
      token);
    estimated_mass: float32 [L, B, Hq] estimated weight of the kept set (1 on dense layers);
    saturated: bool [L, B, Hs] the pruner's set was cut at max_budget (False on dense layers).
    """

    counts: jax.Array
    candidates: jax.Array
    estimated_mass: jax.Array
    saturated: jax.Array


def _validate(q, cache, sparsity, layer, top_p, backend) -> None:
    if not isinstance(sparsity, SparsityConfig):
        raise ValueError(f"sparsity must be a SparsityConfig, got {type(sparsity).__name__}")
    if not isinstance(cache, PagedKVCache):
        raise ValueError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if np.ndim(q) != 3:
        raise ValueError(f"q must have rank 3 [B, Hq, D], got shape {tuple(np.shape(q))}")
    b, hq, d = q.shape
    if not any(np.dtype(q.dtype) == np.dtype(t) for t in (jnp.float32, jnp.bfloat16)):
        raise ValueError(f"q must be float32 or bfloat16, got {np.dtype(q.dtype)}")
    if b != cache.batch:
        raise ValueError(
            f"q batch {b} must equal the cache batch {cache.batch} (q shape {q.shape})"
        )
    if d != cache.head_dim:
        raise ValueError(f"q head_dim {d} must equal the cache head_dim {cache.head_dim}")
    if hq % cache.num_kv_heads:
        raise ValueError(
            f"q heads {hq} must be a multiple of the cache's KV heads {cache.num_kv_heads}"
        )
    if sparsity.page_size != cache.page_size:
        raise ValueError(
            f"sparsity.page_size={sparsity.page_size} must equal the cache page_size="
            f"{cache.page_size}"
        )
    if isinstance(layer, (int, np.integer)):
        if not 0 <= int(layer) < cache.num_layers:
            raise ValueError(f"layer must be in [0, {cache.num_layers}), got {layer}")
    elif np.ndim(layer) != 0:
        raise ValueError(f"layer must be an int or a scalar array, got shape {np.shape(layer)}")
    if sparsity.selector == "double_sparsity":
        if cache.ds_labels is None:
            raise ValueError(
                "cache has no Double Sparsity labels: create it with ds_channels > 0 "
                "(PagedKVCache.create / from_dense(ds_channel_idx=...))"
            )
        if cache.ds_channels != sparsity.ds_channels:
            raise ValueError(
                f"sparsity.ds_channels={sparsity.ds_channels} must equal the cache's label "
                f"channels {cache.ds_channels}"
            )
    if top_p is not None:
        check_top_p(top_p, b, device_values=True)
    if not isinstance(cache.lengths, jax.core.Tracer):
        ln = np.asarray(cache.lengths)
        if ln.min(initial=0) < 0 or ln.max(initial=0) > cache.max_seq_len:
            raise ValueError(
                f"cache.lengths must lie in [0, max_seq_len={cache.max_seq_len}] (max_pages * "
                f"page_size), got {ln.tolist()}"
            )


def decode_attention(
    q,
    cache: PagedKVCache,
    sparsity: SparsityConfig,
    *,
    layer=0,
    top_p=None,
    backend: str = "auto",
):
    """Twilight sparse attention of one decode step over `layer` of the cache.

    q: [B, Hq, D] post-RoPE queries (float32 / bfloat16), Hq a multiple of the cache's Hkv.
    cache: PagedKVCache; attends over cache.lengths[b] tokens of sequence b.
    sparsity: SparsityConfig (static). sparsity.dense_layers is the model's business, not
      applied here.
    layer: int (or a scalar int array) layer index.
    top_p: None, a real scalar (python, numpy or jax; 0-d arrays too) or a [B] array (may be
      traced) of per-sequence p in (0, 1]; overrides sparsity.top_p. Pruning runs when either is
      set.
    backend: kernel backend passed to every pallas_kernels entry ("auto", "pallas",
      "pallas_gpu", "pallas_tpu", "reference").
    Returns (out [B, Hq, D] in q.dtype, SelectionInfo). A sequence of length 0 gives zeros.
    """
    _validate(q, cache, sparsity, layer, top_p, backend)
    if top_p is None and sparsity.top_p is not None:
        top_p = sparsity.top_p
    return _decode_attention(
        q, cache, _as_int32(layer), _per_sequence(top_p, q.shape[0]), sparsity, backend
    )


# The jitted step's scalar arguments are made int32 / [B] float32 here, on the host, so that
# every form a caller may pass reaches one compiled program: jnp conversions would be eager
# device ops of their own, each costing more host time than the call's dispatch.
def _as_int32(x):
    if isinstance(x, jax.Array) and x.dtype == jnp.int32:
        return x
    return np.int32(x) if isinstance(x, (int, np.integer)) else jnp.asarray(x, jnp.int32)


def _per_sequence(top_p, b: int):
    if top_p is None:
        return None
    if isinstance(top_p, jax.Array):
        if top_p.shape == (b,) and top_p.dtype == jnp.float32:
            return top_p
        return jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (b,))
    return np.broadcast_to(np.asarray(top_p, np.float32), (b,))


@functools.partial(jax.jit, static_argnames=("sparsity", "backend"))
def _decode_attention(q, cache, layer, top_p, sparsity, backend):
    b, hq, _ = q.shape
    hkv = cache.num_kv_heads
    rows = hkv if sparsity.gqa == "group_union" else hq
    view = cache.layer_view(layer)
    k_pages, v_pages = view.k_pages, view.v_pages
    if sparsity.selector == "dense":
        out = paged_decode_attention(
            q, k_pages, v_pages, view.page_table, cache.lengths, backend=backend
        )
        n = jnp.broadcast_to(cache.lengths[:, None], (b, rows))
        pos = jnp.broadcast_to(
            jnp.arange(cache.max_seq_len, dtype=jnp.int32), (b, rows, cache.max_seq_len)
        )
        info = SelectionInfo(n, jnp.ones((b, hq)), jnp.zeros((b, rows), bool), n, pos)
        return out, info

    cand = selectors.select_candidates(q, cache, sparsity, layer, backend)
    if top_p is None:  # the base selector alone: attend to every candidate
        positions = jnp.repeat(cand.positions, rows // hkv, axis=1)  # [B, rows, N]
        kept_pos, kept_ok, kept_count = positions, cand.valid, None  # not compacted
        mass = jnp.ones((b, hq), jnp.float32)
        saturated = jnp.zeros((b, rows), bool)
    else:
        logits = pruner.estimate_scores(q, cache, layer, cand, sparsity.estimate_bits, backend)
        # Positions, compacted, 0 past kept_count: the pruner's kernels map the columns.
        kept_pos, kept_count, saturated, mass = pruner.prune(logits, cand, top_p, sparsity, backend)
        kept_ok = jnp.arange(kept_pos.shape[-1]) < kept_count[..., None]
    token_pos, counts = pruner.add_forced_tokens(
        kept_pos,
        kept_ok,
        cache.lengths,
        sparsity.sink_tokens,
        sparsity.recent_tokens,
        kept_count=kept_count,
    )
    out = sparse_decode_attention(
        q, k_pages, v_pages, view.page_table, token_pos, counts, backend=backend
    )
    info = SelectionInfo(
        counts=counts,
        estimated_mass=mass,
        saturated=saturated,
        candidates=cand.num_tokens(cache.lengths),
        token_pos=token_pos,
    )
    return out, info

"""LLaMA-family decoder in Flax NNX: dense logits, prefill into the paged KV cache, decode.

Module paths mirror Hugging Face names (``layers.3.self_attn.q_proj.kernel``), so the weight
tables in models/loaders.py read one-to-one. Linear kernels are stored ``[in, out]`` (the
checkpoint's ``[out, in]`` transposed).

Three entry points share one set of weights:

- ``logits(token_ids)``: dense causal attention over the whole prompt, no cache. The parity
  and perplexity path.
- ``prefill(token_ids, lengths, cache)``: the same forward pass over right-padded prompts,
  writing post-RoPE K/V of every layer into the ``PagedKVCache``; returns the logits of each
  prompt's last token.
- ``decode_step(tokens, cache, sparsity)``: one new token per sequence. Layers below
  ``sparsity.dense_layers`` attend densely over the paged cache; the rest go through
  ``twilight_jax.decode_attention`` (docs/runtime_api.md).

Numerics follow transformers: RMSNorm statistics, RoPE, softmax and the final logits are in
float32; matmuls run in the model dtype (bf16 on accelerators, float32 on CPU by default).
The prefill's attention is in models/attention.py, the argument checks in models/checks.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from models.attention import cached_attention, dense_attention
from models.checks import check_decode_args, check_prefill_args
from models.config import LlamaConfig
from twilight_jax.attention import DecodeInfo, decode_attention
from twilight_jax.cache import PagedKVCache
from twilight_jax.sharding import HEADS, cache_specs, check_heads, shard_attention, shard_cache


def default_dtype():
    """bf16 on GPU/TPU, float32 on CPU (where bf16 matmuls are slow and parity is checked)."""
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else jnp.float32


@functools.lru_cache(maxsize=32)
def _inv_freq(config: LlamaConfig) -> np.ndarray:
    return config.inv_freq()


def rope_cos_sin(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions [...] int32 -> cos, sin [..., head_dim // 2] float32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(_inv_freq(config))
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, D]; cos, sin [B, T, D // 2] -> [B, T, H, D] in x.dtype.

    The split-halves ("rotate_half") convention of transformers: element i pairs with
    element i + D/2. GGUF files store Q/K rows for the interleaved convention; the loader
    undoes that permutation so this one function serves both.
    """
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


class Init:
    """Makes parameter values. ``Init(rngs)`` draws N(0, 0.02) weights (tests, fresh models);
    ``Init(None)`` makes shape-only placeholders that a loader fills (no memory, no RNG)."""

    def __init__(self, rngs: nnx.Rngs | None, std: float = 0.02):
        self.rngs = rngs
        self.std = std

    def normal(self, shape, dtype):
        if self.rngs is None:
            return jax.ShapeDtypeStruct(tuple(shape), dtype)
        return (self.std * jax.random.normal(self.rngs.params(), shape, jnp.float32)).astype(dtype)

    def ones(self, shape, dtype):
        if self.rngs is None:
            return jax.ShapeDtypeStruct(tuple(shape), dtype)
        return jnp.ones(shape, dtype)


class Linear(nnx.Module):
    """kernel [d_in, d_out]; x [..., d_in] -> [..., d_out] in x.dtype (no bias)."""

    def __init__(self, d_in: int, d_out: int, dtype, init: Init):
        self.kernel = nnx.Param(init.normal((d_in, d_out), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.kernel[...]
        if math.prod(x.shape[:-1]) == 1 and jax.default_backend() == "cpu":
            # One row (a batch-1 decode step): XLA CPU's dot of a vector with a row-major
            # [in, out] matrix streams it at ~5 GB/s, a fused multiply-reduce at ~16 GB/s
            # (measured on the 2-core CI machine: 30 x [576, 1536] float32, 20 vs 6.7 ms).
            y = jnp.sum(x.reshape(-1, 1).astype(jnp.float32) * w, axis=0)
            return y.reshape(*x.shape[:-1], w.shape[1]).astype(x.dtype)
        return jnp.einsum("...i,io->...o", x, w).astype(x.dtype)


class Embed(nnx.Module):
    """embedding [vocab, hidden]; ids [...] int32 -> [..., hidden]."""

    def __init__(self, vocab: int, dim: int, dtype, init: Init):
        self.embedding = nnx.Param(init.normal((vocab, dim), dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


class RMSNorm(nnx.Module):
    """weight [dim]; x [..., dim] -> [..., dim] in x.dtype (statistics in float32)."""

    def __init__(self, dim: int, eps: float, dtype, init: Init):
        self.eps = eps
        self.weight = nnx.Param(init.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); x [..., hidden] -> [..., hidden]."""

    def __init__(self, config: LlamaConfig, dtype, init: Init):
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(h, i, dtype, init)  # kernel [hidden, intermediate]
        self.up_proj = Linear(h, i, dtype, init)  # kernel [hidden, intermediate]
        self.down_proj = Linear(i, h, dtype, init)  # kernel [intermediate, hidden]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nnx.Module):
    """Projections and RoPE of GQA self-attention; the attention itself is the caller's
    (dense, paged dense or sparse), so this module only maps hidden states to Q/K/V and back.
    """

    def __init__(self, config: LlamaConfig, dtype, init: Init):
        self.config = config
        h, d = config.hidden_size, config.head_dim
        self.q_proj = Linear(h, config.num_heads * d, dtype, init)  # [hidden, Hq * D]
        self.k_proj = Linear(h, config.num_kv_heads * d, dtype, init)  # [hidden, Hkv * D]
        self.v_proj = Linear(h, config.num_kv_heads * d, dtype, init)  # [hidden, Hkv * D]
        self.o_proj = Linear(config.num_heads * d, h, dtype, init)  # [Hq * D, hidden]

    def qkv(self, x: jax.Array, positions: jax.Array):
        """x [B, T, hidden], positions [B, T] int32 -> q [B, T, Hq, D], k, v [B, T, Hkv, D].

        q and k carry RoPE at ``positions``.
        """
        c = self.config
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, c.num_heads, c.head_dim)
        k = self.k_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        cos, sin = rope_cos_sin(c, positions)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, attn: jax.Array) -> jax.Array:
        """attn [B, T, Hq, D] -> [B, T, hidden]."""
        b, t = attn.shape[:2]
        return self.o_proj(attn.reshape(b, t, -1))


class DecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, dtype, init: Init):
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype, init)
        self.self_attn = Attention(config, dtype, init)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype, init)
        self.mlp = MLP(config, dtype, init)

    def forward(self, h: jax.Array, positions: jax.Array, attend) -> tuple[jax.Array, Any]:
        """h [B, T, hidden]; ``attend(q, k, v) -> (out [B, T, Hq, D], aux)`` -> (h, aux)."""
        q, k, v = self.self_attn.qkv(self.input_layernorm(h), positions)
        o, aux = attend(q, k, v)
        h = h + self.self_attn.out(o.astype(h.dtype))
        return h + self.mlp(self.post_attention_layernorm(h)), aux


_COLUMN_SPLIT = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROW_SPLIT = ("o_proj", "down_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def param_sharding(config: LlamaConfig, mesh, path):
    """NamedSharding of the parameter at ``path`` (nnx state keys, e.g. ``("layers", 3,
    "self_attn", "q_proj", "kernel")``) on a ``"heads"`` mesh: attention projections split by
    head, the MLP by intermediate unit when the device count divides intermediate_size,
    everything else (embeddings, norms, LM head) replicated."""
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    spec = P()
    if names and names[0] == "layers":
        for name in names:
            if name in _MLP and config.intermediate_size % mesh.size:
                break
            if name in _COLUMN_SPLIT:
                spec = P(None, HEADS)
            elif name in _ROW_SPLIT:
                spec = P(HEADS, None)
    return NamedSharding(mesh, spec)


class LlamaForCausalLM(nnx.Module):
    """A LLaMA-architecture decoder with its LM head.

    The decoder layers are separate modules (``layers[i]``), run by a Python loop inside the
    jitted programs: every layer's weights are their own device arrays, which the matmuls read
    in place. (Weights stacked on a layer axis under ``lax.scan`` made XLA copy each layer's
    slice out of the stack on every step: 3.3 ms of a 11.3 ms LLaMA-8B-shaped decode step on
    an H200.) Parameters (paths as in the weight tables):
    ``embed_tokens.embedding [vocab, hidden]``;
    ``layers.<i>.{input_layernorm,post_attention_layernorm}.weight [hidden]``;
    ``layers.<i>.self_attn.{q,k,v,o}_proj.kernel [in, out]``;
    ``layers.<i>.mlp.{gate,up,down}_proj.kernel [in, out]``; ``norm.weight [hidden]``; and
    ``lm_head.kernel [hidden, vocab]`` unless the embeddings are tied.
    """

    def __init__(
        self,
        config: LlamaConfig,
        *,
        dtype=None,
        rngs: nnx.Rngs | None = None,
        abstract: bool = False,
    ):
        """Random N(0, 0.02) weights from ``rngs`` (default seed 0), or with ``abstract``
        shape-only placeholders that a loader fills."""
        dtype = jnp.dtype(dtype or default_dtype())
        init = Init(None if abstract else (rngs if rngs is not None else nnx.Rngs(0)))
        self.config = config
        self.dtype = dtype
        # None: one device. A "heads" mesh (twilight_jax.sharding) after shard(mesh).
        self.mesh = None
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, dtype, init)
        self.layers = nnx.List(
            [DecoderLayer(config, dtype, init) for _ in range(config.num_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, init)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, dtype, init)

    def jit(self) -> JittedLlama:
        """The compiled entry points (``JittedLlama``) over these weights."""
        return JittedLlama(self)

    def shard(self, mesh) -> LlamaForCausalLM:
        """Splits the model over a ``"heads"`` mesh (``twilight_jax.sharding.head_mesh``), as
        ``param_sharding`` says; prefill and decode then run each layer's attention on each
        device's heads (shard_map) and ``init_cache`` splits the cache the same way. In place;
        returns self. Build ``jit()`` after this. (``models.load(..., mesh=mesh)`` places the
        weights so while loading, without a whole copy on one device first.)"""
        check_heads(mesh, self.config.num_heads, self.config.num_kv_heads)
        state = nnx.state(self)
        shardings = jax.tree_util.tree_map_with_path(
            lambda path, _: param_sharding(self.config, mesh, path), state
        )
        nnx.update(self, jax.device_put(state, shardings))
        self.mesh = mesh
        return self

    def init_cache(
        self,
        batch: int,
        max_seq_len: int,
        *,
        page_size: int = 16,
        num_pages: int | None = None,
        ds_channels: int = 0,
        quest_metadata: str = "int8",
    ) -> PagedKVCache:
        """An empty ``PagedKVCache`` for this model (model dtype, split over its mesh):
        [Hkv, L, P, S, D] pages, sequence b owning pages 1 + b * ceil(max_seq_len / page_size),
        ...; num_pages, ds_channels and quest_metadata as in ``PagedKVCache.create``."""
        c = self.config
        cache = PagedKVCache.create(
            c.num_layers,
            batch,
            c.num_kv_heads,
            c.head_dim,
            max_seq_len=max_seq_len,
            page_size=page_size,
            num_pages=num_pages,
            dtype=self.dtype,
            ds_channels=ds_channels,
            quest_metadata=quest_metadata,
        )
        return self.place_cache(cache)

    def place_cache(self, cache):
        """The cache split over this model's mesh (unchanged without one)."""
        if self.mesh is None:
            return cache
        return shard_cache(cache, self.mesh)

    def _per_device(self, attend, cache, num_stats: int):
        """attend(q, k, v, layer, cache) as is, or run on each device's heads under the mesh
        (its stats: num_stats [B, heads] arrays)."""
        if self.mesh is None:
            return attend
        stats = (P(None, HEADS),) * num_stats if num_stats else None
        return shard_attention(attend, self.mesh, cache_specs(cache), stats_specs=stats)

    # ------------------------------------------------------------------ pieces

    def embed(self, token_ids: jax.Array) -> jax.Array:
        """token_ids [...] int32 -> hidden states [..., hidden] in the model dtype."""
        return self.embed_tokens(token_ids)

    def head(self, h: jax.Array) -> jax.Array:
        """h [..., hidden] -> logits [..., vocab] float32 (final norm included)."""
        h = self.norm(h)
        if self.lm_head is None:
            w = self.embed_tokens.embedding[...]  # [vocab, hidden]
            out = jnp.einsum("...h,vh->...v", h, w, preferred_element_type=jnp.float32)
        else:
            w = self.lm_head.kernel[...]  # [hidden, vocab]
            out = jnp.einsum("...h,hv->...v", h, w, preferred_element_type=jnp.float32)
        return out.astype(jnp.float32)

    def _run_layers(self, h, positions, carry, attend, lo: int, hi: int):
        """Layers lo..hi-1, one after the other.

        h [B, T, hidden]; positions [B, T]; carry: a pytree threaded through the layers (the
        KV cache); ``attend(q, k, v, layer, carry) -> (out [B, T, Hq, D], (carry, stats))``
        with ``layer`` an int32 scalar array. Returns (h, carry, stats stacked over the layers,
        or None when the range is empty or attend returns no stats).
        """
        stats = []
        for i in range(lo, hi):
            layer = jnp.int32(i)
            h, (carry, s) = self.layers[i].forward(
                h, positions, lambda q, k, v: attend(q, k, v, layer, carry)
            )
            stats.append(s)
        if not stats or stats[0] is None:
            return h, carry, None
        return h, carry, jax.tree.map(lambda *xs: jnp.stack(xs), *stats)

    # ------------------------------------------------------------------ entry points

    def logits(self, token_ids: jax.Array) -> jax.Array:
        """token_ids [B, T] int32 -> logits [B, T, vocab] float32; dense causal, no cache."""
        if np.ndim(token_ids) != 2:
            raise ValueError(f"token_ids must be [B, T], got shape {tuple(np.shape(token_ids))}")
        token_ids = jnp.asarray(token_ids, jnp.int32)
        b, t = token_ids.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

        def attend(q, k, v, layer, carry):
            return dense_attention(q, k, v), (carry, None)

        h, _, _ = self._run_layers(
            self.embed(token_ids), positions, (), attend, 0, self.config.num_layers
        )
        return self.head(h)

    def prefill(self, token_ids: jax.Array, lengths: jax.Array, cache, start=None):
        """Dense forward over right-padded prompts, filling the KV cache.

        token_ids [B, T] int32 (entries at or past lengths[b] are padding); lengths [B] int32
        in [0, T]; cache: a ``PagedKVCache`` with room for the tokens. Writes post-RoPE K/V of
        every layer at positions [start[b], start[b] + lengths[b]) and sets the cache length of
        b to start[b] + lengths[b]. A sequence with lengths[b] == 0 is left as it was (its cache
        length too), so one call can prefill some slots of a batch while others hold state.

        start: None (a whole prompt from position 0: causal attention within the chunk,
        cuDNN flash attention on a GPU) or [B] int32, the position of each chunk's first token
        for chunked prefill: the cache must hold positions [0, start[b]) of sequence b, and
        the chunk attends to them and to itself (``cached_attention``).

        Returns (logits [B, vocab] float32 of token lengths[b] - 1 of the chunk (unspecified
        where lengths[b] == 0), cache).
        """
        check_prefill_args(self.config, token_ids, lengths, cache, start)
        token_ids = jnp.asarray(token_ids, jnp.int32)
        b, t = token_ids.shape
        lengths = jnp.asarray(lengths, jnp.int32)
        offset = jnp.zeros((b,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
        positions = offset[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        kv_dtype = cache.k_pages.dtype

        def attend(q, k, v, layer, cache):
            cache = cache.write_prefill(
                layer, k.astype(kv_dtype), v.astype(kv_dtype), offset, lengths
            )
            if start is None:
                return dense_attention(q, k, v, lengths), (cache, None)
            return cached_attention(q, cache, layer, positions), (cache, None)

        h, cache, _ = self._run_layers(
            self.embed(token_ids),
            positions,
            cache,
            self._per_device(attend, cache, 0),
            0,
            self.config.num_layers,
        )
        last = h[jnp.arange(b), jnp.maximum(lengths - 1, 0)]  # [B, hidden]
        cache = cache.with_lengths(jnp.where(lengths > 0, offset + lengths, cache.lengths))
        return self.head(last), cache

    def decode_step(
        self,
        tokens: jax.Array,
        cache,
        sparsity,
        active: jax.Array | None = None,
        top_p: jax.Array | None = None,
        backend: str = "auto",
    ):
        """One decode step: token ``tokens[b]`` sits at position cache.lengths[b].

        tokens [B] int32; cache: ``PagedKVCache``; sparsity: ``SparsityConfig`` (static);
        active [B] bool or None (all): inactive sequences neither grow nor write;
        top_p: None (``sparsity.top_p``) or [B] float32 per-sequence p (may be traced);
        backend: kernel backend of the attention ops (static).
        Every layer attends through ``decode_attention``: layers below
        ``sparsity.dense_layers`` (all of them for the dense selector) with the dense selector.
        Returns (logits [B, vocab] float32, cache, ``DecodeInfo``).
        """
        check_decode_args(self.config, tokens, cache, sparsity, active, top_p)
        c = self.config
        tokens = jnp.asarray(tokens, jnp.int32)
        b = tokens.shape[0]
        # Inactive sequences neither grow nor write (their last cached token must survive).
        active = jnp.ones((b,), bool) if active is None else jnp.asarray(active, bool)
        positions = cache.lengths.astype(jnp.int32)[:, None]  # [B, 1]
        cache = cache.begin_decode_step(active)
        kv_dtype = cache.k_pages.dtype
        dense = dataclasses.replace(sparsity, selector="dense")

        def attend(q, k, v, layer, cache, layer_sparsity):
            cache = cache.write_decode(
                layer,
                k[:, 0].astype(kv_dtype),
                v[:, 0].astype(kv_dtype),
                active=active,
                backend=backend,
            )
            out, info = decode_attention(
                q[:, 0].astype(kv_dtype),
                cache,
                layer_sparsity,
                layer=layer,
                top_p=None if layer_sparsity.selector == "dense" else top_p,
                backend=backend,
            )
            stats = (info.counts, info.candidates, info.estimated_mass, info.saturated)
            return out[:, None], (cache, stats)

        n_dense = c.num_layers if sparsity.selector == "dense" else sparsity.dense_layers
        n_dense = min(n_dense, c.num_layers)
        dense_attend = self._per_device(functools.partial(attend, layer_sparsity=dense), cache, 4)
        sparse_attend = self._per_device(
            functools.partial(attend, layer_sparsity=sparsity), cache, 4
        )
        h = self.embed(tokens[:, None])  # [B, 1, hidden]
        h, cache, dense_stats = self._run_layers(h, positions, cache, dense_attend, 0, n_dense)
        h, cache, sparse_stats = self._run_layers(
            h, positions, cache, sparse_attend, n_dense, c.num_layers
        )
        parts = [x for x in (dense_stats, sparse_stats) if x is not None]
        stats = [jnp.concatenate([p[j] for p in parts], axis=0) for j in range(4)]
        return self.head(h[:, 0]), cache, DecodeInfo(*stats)


# ---------------------------------------------------------------------- jitted wrappers
#
# The model is split once into (graphdef, state); graphdef is static, the state (weights) is
# an ordinary argument, the cache is donated so XLA updates the pages in place.
#
# XLA's rematerialization pass is off for the cache programs: its memory estimate counts the
# donated cache twice (as argument and as output), so with a cache over half the device it
# "saves" memory by recomputing matmuls that the real peak never needed (H200, LLaMA-8B shape,
# 83 GB cache: the estimate said 177 GiB for a program whose peak was 99 GB, and the decode
# step ran its q/k/v projections three times).
CACHE_PROGRAM_OPTIONS = {"xla_disable_hlo_passes": "rematerialization"}


@functools.lru_cache(maxsize=16)
def _programs(graphdef, treedef):
    """The jitted logits / prefill / decode functions of a model structure. Models of one
    structure (the same config, e.g. a JittedLlama built again by every ``generate`` call) share
    them and so their compiled programs; the weights are an argument."""

    def merged(weights):
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, weights))

    def logits(weights, token_ids):
        return merged(weights).logits(token_ids)

    def prefill(weights, token_ids, lengths, cache, start):
        return merged(weights).prefill(token_ids, lengths, cache, start)

    def decode(weights, tokens, cache, sparsity, active, top_p, backend):
        return merged(weights).decode_step(tokens, cache, sparsity, active, top_p, backend)

    return (
        jax.jit(logits),
        jax.jit(prefill, donate_argnums=(3,), compiler_options=CACHE_PROGRAM_OPTIONS),
        jax.jit(
            decode,
            static_argnums=(3, 6),
            donate_argnums=(2,),
            compiler_options=CACHE_PROGRAM_OPTIONS,
        ),
    )


class JittedLlama:
    """Compiled entry points of a model: ``logits``, ``prefill`` and ``decode_step`` with the
    signatures of ``LlamaForCausalLM``. The cache passed to prefill / decode_step is donated
    (do not reuse it after the call). Weights are captured at construction; build a new one
    after changing them.

    The weights travel as one flat list of arrays and the module structure is closed over by
    the jitted functions (``_programs``): a decode step is a few milliseconds, and hashing the
    structure of a 30-layer model as a static argument (about 1 ms) or flattening its nested
    state (0.3 ms) on every call would be host time the device waits for at small batch.
    """

    def __init__(self, model: LlamaForCausalLM):
        self.model = model
        self.config = model.config
        self.dtype = model.dtype
        self.graphdef, self.state = nnx.split(model)
        self.weights, treedef = jax.tree.flatten(self.state)
        self._logits, self._prefill, self._decode = _programs(self.graphdef, treedef)

    @property
    def mesh(self):
        return self.model.mesh

    def jit(self) -> JittedLlama:
        return self

    def init_cache(
        self,
        batch: int,
        max_seq_len: int,
        *,
        page_size: int = 16,
        num_pages: int | None = None,
        ds_channels: int = 0,
        quest_metadata: str = "int8",
    ) -> PagedKVCache:
        return self.model.init_cache(
            batch,
            max_seq_len,
            page_size=page_size,
            num_pages=num_pages,
            ds_channels=ds_channels,
            quest_metadata=quest_metadata,
        )

    def place_cache(self, cache):
        return self.model.place_cache(cache)

    def logits(self, token_ids):
        return self._logits(self.weights, jnp.asarray(token_ids, jnp.int32))

    def _prefill_args(self, token_ids, lengths, cache, start):
        check_prefill_args(self.config, token_ids, lengths, cache, start)
        return (
            self.weights,
            jnp.asarray(token_ids, jnp.int32),
            jnp.asarray(lengths, jnp.int32),
            cache,
            None if start is None else jnp.asarray(start, jnp.int32),
        )

    def prefill(self, token_ids, lengths, cache, start=None):
        return self._prefill(*self._prefill_args(token_ids, lengths, cache, start))

    def _decode_args(self, tokens, cache, sparsity, active, top_p, backend):
        check_decode_args(self.config, tokens, cache, sparsity, active, top_p)
        if active is not None:
            active = jnp.asarray(active, bool)
        if top_p is not None:
            top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (np.shape(tokens)[0],))
        return self.weights, jnp.asarray(tokens, jnp.int32), cache, sparsity, active, top_p, backend

    def decode_step(self, tokens, cache, sparsity, active=None, top_p=None, backend="auto"):
        return self._decode(*self._decode_args(tokens, cache, sparsity, active, top_p, backend))

    def lower_decode_step(self, tokens, cache, sparsity, active=None, top_p=None, backend="auto"):
        """The decode step lowered for these arguments (``.compile()`` it to inspect the
        optimized program, its memory, or to call it directly without re-checking)."""
        return self._decode.lower(
            *self._decode_args(tokens, cache, sparsity, active, top_p, backend)
        )

    def lower_prefill(self, token_ids, lengths, cache, start=None):
        """The prefill lowered for these arguments (see lower_decode_step)."""
        return self._prefill.lower(*self._prefill_args(token_ids, lengths, cache, start))


def abstract_model(config: LlamaConfig, dtype=None) -> LlamaForCausalLM:
    """The model with shape-only parameters (no memory, no random init): the loaders fill it."""
    return LlamaForCausalLM(config, dtype=dtype, abstract=True)

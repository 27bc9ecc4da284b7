"""The model protocol the runtime takes: what ``generate`` and the serving engine call.

``models.JittedLlama`` implements it (``LlamaForCausalLM`` too, uncompiled; its ``jit()`` gives
the compiled one). The runtime's test doubles implement it as well, which is why it lives here,
with the consumer, and imports nothing from ``models``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

from twilight_jax.attention import DecodeInfo
from twilight_jax.cache import PagedKVCache
from twilight_jax.config import SparsityConfig


class ModelConfig(Protocol):
    """The facts about a model the runtime reads (``models.LlamaConfig`` has them)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]


@runtime_checkable
class DecodeModel(Protocol):
    """A causal LM that prefills into a ``PagedKVCache`` and decodes one token per step.

    config: the model's ``ModelConfig``. dtype: the dtype of its weights and KV cache.
    mesh: the "heads" mesh it is split over (``twilight_jax.sharding``), or None (one device).
    """

    config: ModelConfig
    dtype: Any
    mesh: jax.sharding.Mesh | None

    def jit(self) -> DecodeModel:
        """The compiled model (itself when it is compiled already)."""
        ...

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
        """An empty cache for this model (its dtype, split over its mesh):
        ``PagedKVCache.create`` with the model's layers, KV heads and head_dim."""
        ...

    def prefill(
        self, token_ids, lengths, cache: PagedKVCache, start=None
    ) -> tuple[jax.Array, PagedKVCache]:
        """token_ids [B, T] int32 right-padded, lengths [B] int32 (0: leave the row alone),
        start None (whole prompts) or [B] int32 chunk offsets -> (logits [B, vocab] float32 of
        each row's last token, cache). The cache passed in may be donated."""
        ...

    def decode_step(
        self,
        tokens,
        cache: PagedKVCache,
        sparsity: SparsityConfig,
        active=None,
        top_p=None,
        backend: str = "auto",
    ) -> tuple[jax.Array, PagedKVCache, DecodeInfo]:
        """tokens [B] int32 at positions cache.lengths; active [B] bool or None (all);
        top_p None (sparsity.top_p) or [B] float32 per-sequence p -> (logits [B, vocab]
        float32, cache, DecodeInfo). The cache passed in may be donated."""
        ...


_MEMBERS = ("config", "dtype", "mesh", "jit", "init_cache", "prefill", "decode_step")


def check_model(model) -> None:
    """Raises ValueError naming what ``model`` lacks of ``DecodeModel``."""
    if not isinstance(model, DecodeModel):
        missing = [m for m in _MEMBERS if not hasattr(model, m)]
        raise ValueError(
            f"model must implement twilight_jax.runtime.model_api.DecodeModel (e.g. "
            f"models.JittedLlama); {type(model).__name__} lacks {', '.join(missing)}"
        )

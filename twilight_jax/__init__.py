"""Twilight adaptive top-p sparse attention: config, paged KV cache and the decode op."""

from twilight_jax.attention import SelectionInfo, decode_attention
from twilight_jax.cache import OutOfPagesError, PageAllocator, PagedKVCache
from twilight_jax.config import SparsityConfig
from twilight_jax.generate import generate

__all__ = [
    "OutOfPagesError",
    "PageAllocator",
    "PagedKVCache",
    "SelectionInfo",
    "SparsityConfig",
    "decode_attention",
    "generate",
]

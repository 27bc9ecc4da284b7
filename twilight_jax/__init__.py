"""Twilight adaptive top-p sparse attention: config, paged KV cache and the decode op.

This module is the facade. The core (config, cache, selectors, pruner, attention, reference,
sharding) comes first and never imports ``models`` or ``twilight_jax.runtime``; ``generate``
comes from the runtime, which sits above ``models`` (``twilight_jax.runtime.generate`` imports
no model code, so importing this package does not load ``models``).
"""

from twilight_jax.attention import DecodeInfo, SelectionInfo, decode_attention
from twilight_jax.cache import OutOfPagesError, PageAllocator, PagedKVCache
from twilight_jax.config import SparsityConfig
from twilight_jax.runtime.generate import generate

__all__ = [
    "DecodeInfo",
    "OutOfPagesError",
    "PageAllocator",
    "PagedKVCache",
    "SelectionInfo",
    "SparsityConfig",
    "decode_attention",
    "generate",
]

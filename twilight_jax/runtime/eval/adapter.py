"""The accuracy harness's view of a model (``ModelAdapter``): tokenizing, prefill and decode
steps through the compiled model, cache copies, and the Double Sparsity calibration.

``runner`` and ``decode`` take any object with these methods; tests give them a numpy stand-in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import models
from models.attention import dense_attention
from twilight_jax.attention import DecodeInfo
from twilight_jax.config import SparsityConfig
from twilight_jax.selectors import calibrate_double_sparsity


class ModelAdapter:
    """What the runner needs from a model, on top of the models/ API.

    model: a ``models.LlamaForCausalLM``; tokenizer: a ``models.Tokenizer`` (encode, decode,
    eos_token_ids). Prefill and decode run through its ``jit()`` (the cache is donated, hence
    ``clone``).
    """

    def __init__(self, model, tokenizer, config, *, page_size: int = 16):
        self.model = model
        self.jitted = model.jit()
        self.tokenizer = tokenizer
        self.config = config
        self.page_size = page_size
        self.eos_ids = tuple(getattr(tokenizer, "eos_token_ids", ()) or config.eos_token_ids)

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens (task lengths are counted this way)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a whole prompt, BOS added when the model expects it."""
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def new_cache(
        self, batch: int, max_seq_len: int, ds_channel_idx=None, *, quest_metadata: str = "int8"
    ):
        """An empty cache of ``max_seq_len`` tokens per sequence; with ds_channel_idx
        [L, Hkv, C] its Double Sparsity channels; quest_metadata as PagedKVCache.create's."""
        ds = 0 if ds_channel_idx is None else int(np.shape(ds_channel_idx)[-1])
        cache = self.jitted.init_cache(
            batch,
            max_seq_len,
            page_size=self.page_size,
            ds_channels=ds,
            quest_metadata=quest_metadata,
        )
        if ds_channel_idx is not None:
            cache = cache.with_ds_channels(jnp.asarray(ds_channel_idx, jnp.int32))
        return cache

    def prefill(self, token_ids: np.ndarray, lengths: np.ndarray, cache):
        logits, cache = self.jitted.prefill(token_ids, lengths, cache)
        return np.asarray(logits, np.float32), cache

    def step(self, tokens: np.ndarray, cache, sparsity: SparsityConfig):
        """(logits [B, vocab] float32, cache, DecodeInfo of numpy arrays)."""
        top_p = None
        if sparsity.top_p is not None:
            # p as a traced per-sequence array: every p over one selector and budget shares
            # one compiled step instead of compiling the model again per p.
            top_p = np.full(len(tokens), sparsity.top_p, np.float32)
            sparsity = dataclasses.replace(sparsity, top_p=None)
        logits, cache, info = self.jitted.decode_step(tokens, cache, sparsity, top_p=top_p)
        info: DecodeInfo = jax.tree.map(np.asarray, info)
        return np.asarray(logits, np.float32), cache, info

    def clone(self, cache):
        return jax.tree.map(lambda x: x.copy(), cache)

    def calibrate_ds(self, token_ids: Sequence[int], channels: int) -> np.ndarray:
        """Double Sparsity heavy channels [L, Hkv, C] from the post-RoPE q/k of one text."""
        ids = jnp.asarray(np.asarray(token_ids, np.int32)[None])
        positions = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
        h = self.model.embed(ids)
        qs, ks = [], []
        for layer in self.model.layers:
            captured = {}

            def attend(q, k, v, captured=captured):
                captured["q"], captured["k"] = q, k
                return dense_attention(q, k, v), None

            h, _ = layer.forward(h, positions, attend)
            qs.append(np.asarray(captured["q"][0], np.float32))
            ks.append(np.asarray(captured["k"][0], np.float32))
        return calibrate_double_sparsity(np.stack(qs), np.stack(ks), channels)


def load_adapter(name: str, *, page_size: int = 16, dtype=None) -> ModelAdapter:
    model, tokenizer, config = models.load(name, dtype=dtype, progress=False)
    return ModelAdapter(model, tokenizer, config, page_size=page_size)

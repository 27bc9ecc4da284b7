"""Static checks of the model's prefill and decode arguments, before anything is traced: a
ValueError naming the argument, the value seen and what was expected."""

from __future__ import annotations

import numpy as np

from models.config import LlamaConfig
from twilight_jax.config import SparsityConfig, check_top_p


def _host_values(x):
    """x as numpy when it is already on the host (lists, numpy); None for device or traced
    arrays, whose values are not checked (that would cost a device sync per call)."""
    if isinstance(x, (list, tuple, np.ndarray, np.generic, int)):
        return np.asarray(x)
    return None


def _check_cache(config: LlamaConfig, cache, batch: int) -> None:
    for name, got, want in (
        ("num_layers", cache.num_layers, config.num_layers),
        ("num_kv_heads", cache.num_kv_heads, config.num_kv_heads),
        ("head_dim", cache.head_dim, config.head_dim),
        ("batch", cache.batch, batch),
    ):
        if got != want:
            raise ValueError(f"cache {name} must be {want} (the model's / the batch's), got {got}")


def check_prefill_args(config: LlamaConfig, token_ids, lengths, cache, start=None) -> None:
    """Static checks of ``prefill`` arguments (ValueError naming the argument)."""
    if np.ndim(token_ids) != 2:
        raise ValueError(f"token_ids must be [B, T], got shape {tuple(np.shape(token_ids))}")
    b, t = np.shape(token_ids)
    if np.shape(lengths) != (b,):
        raise ValueError(f"lengths must be [B={b}], got shape {tuple(np.shape(lengths))}")
    _check_cache(config, cache, b)
    if t > cache.max_seq_len:
        raise ValueError(
            f"token_ids length T={t} exceeds the cache's max_seq_len {cache.max_seq_len}"
        )
    if t > config.max_position_embeddings:
        raise ValueError(
            f"token_ids length T={t} exceeds max_position_embeddings="
            f"{config.max_position_embeddings}"
        )
    ln = _host_values(lengths)
    if ln is not None and (ln.min(initial=0) < 0 or ln.max(initial=0) > t):
        raise ValueError(f"lengths must lie in [0, T={t}], got {ln.tolist()}")
    if start is not None:
        if np.shape(start) != (b,):
            raise ValueError(f"start must be [B={b}], got shape {tuple(np.shape(start))}")
        st = _host_values(start)
        if st is not None:
            end = st + (ln if ln is not None else t)
            limit = min(cache.max_seq_len, config.max_position_embeddings)
            if st.min(initial=0) < 0 or end.max(initial=0) > limit:
                raise ValueError(
                    f"start must be >= 0 with start + lengths <= {limit} (the cache's max_seq_len "
                    f"and the model context), got start {st.tolist()}"
                )
    ids = _host_values(token_ids)
    if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
        raise ValueError(
            f"token_ids must lie in [0, vocab_size={config.vocab_size}), got values in "
            f"[{ids.min()}, {ids.max()}]"
        )


def check_decode_args(config: LlamaConfig, tokens, cache, sparsity, active, top_p) -> None:
    """Static checks of ``decode_step`` arguments (ValueError naming the argument)."""
    if np.ndim(tokens) != 1:
        raise ValueError(f"tokens must be [B], got shape {tuple(np.shape(tokens))}")
    b = np.shape(tokens)[0]
    _check_cache(config, cache, b)
    if not isinstance(sparsity, SparsityConfig):
        raise ValueError(f"sparsity must be a SparsityConfig, got {type(sparsity).__name__}")
    if sparsity.page_size != cache.page_size:
        raise ValueError(
            f"sparsity.page_size={sparsity.page_size} must equal the cache page_size="
            f"{cache.page_size}"
        )
    if active is not None and np.shape(active) != (b,):
        raise ValueError(f"active must be [B={b}] bool, got shape {tuple(np.shape(active))}")
    if top_p is not None:
        check_top_p(top_p, b, device_values=False)
    ids = _host_values(tokens)
    if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
        raise ValueError(
            f"tokens must lie in [0, vocab_size={config.vocab_size}), got values in "
            f"[{ids.min()}, {ids.max()}]"
        )


# Tensor-parallel split of the [in, out] kernels over a "heads" mesh: Q/K/V by output columns
# (heads), O by input rows (heads); the MLP likewise by intermediate unit.

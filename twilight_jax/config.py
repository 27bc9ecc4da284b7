"""Static configuration of the Twilight decode-attention op.

``SparsityConfig`` is a frozen, hashable dataclass, so it can be a static argument of
``jax.jit``; everything that changes per step (lengths, per-sequence p) is a traced array and
lives elsewhere. Fields are checked in ``__post_init__`` so a bad config fails where it is made,
with a message naming the field.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

SELECTORS = ("dense", "all", "quest", "double_sparsity", "oracle", "streaming")
GQA_MODES = ("group_union", "per_head")
ESTIMATE_BITS = (4, 8, 16)
QUEST_METADATA = ("int8", "native")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"SparsityConfig.{name} must be an int >= {minimum}, got {value!r}")


def _is_real_scalar(x) -> bool:
    """A real number of any kind: Python, numpy or a 0-d array of an integer or float dtype
    (bool and complex are not numbers here)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return isinstance(x, (int, float)) and not isinstance(x, bool)
    kind = np.dtype(dtype).kind
    return np.ndim(x) == 0 and kind in "iuf"


def check_top_p(top_p, batch: int, *, device_values: bool) -> None:
    """Checks a per-call Twilight p: a real scalar (python, numpy or jax, 0-d arrays included)
    or a [batch] array of them, with values in (0, 1]. Values are read when they are on the host,
    and from concrete jax arrays only with ``device_values`` (reading one waits for the device,
    which a decode loop must not do every step); traced values are never read. Raises
    ValueError naming ``top_p``."""
    if isinstance(top_p, (jax.Array, np.ndarray, np.generic)):
        dtype, shape = np.dtype(top_p.dtype), np.shape(top_p)
    elif isinstance(top_p, (int, float)) and not isinstance(top_p, bool):
        dtype, shape = np.dtype(type(top_p)), ()
    else:
        raise ValueError(
            f"top_p must be None, a real number or a [B={batch}] array, got "
            f"{type(top_p).__name__} {top_p!r}"
        )
    if dtype.kind == "b" or not (
        jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
    ):
        raise ValueError(f"top_p must have a real (float or int) dtype, got {dtype}")
    if shape not in ((), (batch,)):
        raise ValueError(f"top_p must be a scalar or a [B={batch}] array, got shape {shape}")
    if isinstance(top_p, jax.core.Tracer) or (isinstance(top_p, jax.Array) and not device_values):
        return
    tp = np.asarray(top_p, np.float32)
    if not ((tp > 0) & (tp <= 1)).all():
        raise ValueError(f"top_p must be in (0, 1], got {np.ravel(tp).tolist()}")


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    """How one decode step picks the tokens it attends to (docs/runtime_api.md).

    selector: "dense" (exact attention over every token), "all" (every token is a candidate,
      i.e. Full + pruner), "quest" (pages ranked by Quest upper bounds), "double_sparsity"
      (tokens ranked by a label cache of heavy channels), "oracle" (exact top-k on the true
      weights; evaluation only) or "streaming" (the first ``sink_tokens`` tokens plus the most
      recent ``budget - sink_tokens``).
    budget: B0, the candidate capacity in tokens of the top-k selectors (quest: a multiple of
      ``page_size``). Clamped to the cache capacity. Ignored by "dense" and "all".
    top_p: p in (0, 1] of the top-p pruner; None = no pruning (the base selector alone).
    max_budget: static capacity in tokens of the final selection when pruning, sink and recent
      tokens included; the pruner flags saturation when its set does not fit.
    page_size: page size of the KV cache and of the Quest metadata.
    dense_layers: the first N layers stay dense. Applied by the model, which calls dense paged
      attention for them; ``decode_attention`` itself does what the selector says at any layer.
    gqa: "group_union" (one selection per KV head: the union of its query heads' top-p sets) or
      "per_head" (one selection per query head).
    sink_tokens, recent_tokens: the first / last tokens of every sequence, always attended.
      Defaults 0: the published Twilight forces none.
    estimate_bits: precision of K for the pruner's estimates: 4 (the INT4 cache), 8 (K
      re-quantized to 8 bits on the fly) or 16 (exact K; an ablation).
    ds_channels: number of heavy channels in the Double Sparsity label cache.
    quest_metadata: the form of Quest's per-page K min / max in the caches made for this
      config (generate, the serving engine): "int8" (int8 codes and a float32 scale per page
      and KV head: half the bytes the Quest selector reads, bounds a little looser) or
      "native" (the cache dtype). decode_attention itself scores whichever form its cache
      holds.
    """

    selector: str = "all"
    budget: int = 8192
    top_p: float | None = None
    max_budget: int = 2048
    page_size: int = 16
    dense_layers: int = 2
    gqa: str = "group_union"
    sink_tokens: int = 0
    recent_tokens: int = 0
    estimate_bits: int = 4
    ds_channels: int = 16
    quest_metadata: str = "int8"

    def __post_init__(self):
        if self.selector not in SELECTORS:
            raise ValueError(
                f"SparsityConfig.selector must be one of {SELECTORS}, got {self.selector!r}"
            )
        if self.quest_metadata not in QUEST_METADATA:
            raise ValueError(
                f"SparsityConfig.quest_metadata must be one of {QUEST_METADATA}, "
                f"got {self.quest_metadata!r}"
            )
        if self.gqa not in GQA_MODES:
            raise ValueError(f"SparsityConfig.gqa must be one of {GQA_MODES}, got {self.gqa!r}")
        _check_int("budget", self.budget, 1)
        _check_int("max_budget", self.max_budget, 1)
        _check_int("page_size", self.page_size, 1)
        _check_int("dense_layers", self.dense_layers, 0)
        _check_int("sink_tokens", self.sink_tokens, 0)
        _check_int("recent_tokens", self.recent_tokens, 0)
        _check_int("ds_channels", self.ds_channels, 1)
        if self.page_size & (self.page_size - 1):
            raise ValueError(
                f"SparsityConfig.page_size must be a power of two, got {self.page_size}"
            )
        if self.top_p is not None:
            if not _is_real_scalar(self.top_p):
                raise ValueError(
                    f"SparsityConfig.top_p must be None or a number in (0, 1], got {self.top_p!r}"
                )
            # A plain float, so the config stays hashable (numpy and 0-d jax scalars are not all).
            object.__setattr__(self, "top_p", float(self.top_p))
            if not 0.0 < self.top_p <= 1.0:
                raise ValueError(f"SparsityConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.estimate_bits not in ESTIMATE_BITS:
            raise ValueError(
                f"SparsityConfig.estimate_bits must be one of {ESTIMATE_BITS}, "
                f"got {self.estimate_bits!r}"
            )
        if self.selector == "quest" and self.budget % self.page_size:
            raise ValueError(
                f"SparsityConfig.budget={self.budget} must be a multiple of "
                f"page_size={self.page_size} for the quest selector"
            )
        if self.selector == "streaming" and self.budget <= self.sink_tokens:
            raise ValueError(
                f"SparsityConfig.budget={self.budget} must exceed sink_tokens="
                f"{self.sink_tokens} for the streaming selector (the rest is the recent window)"
            )
        forced = self.sink_tokens + self.recent_tokens
        if self.max_budget <= forced:
            raise ValueError(
                f"SparsityConfig.max_budget={self.max_budget} must exceed sink_tokens + "
                f"recent_tokens = {forced}: the pruned tokens need room beside them"
            )

    @property
    def forced_tokens(self) -> int:
        """Capacity of the always-kept sink and recent tokens."""
        return self.sink_tokens + self.recent_tokens

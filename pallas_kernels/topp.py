"""Top-p pruning: per-row threshold by bisection, then compaction into a static-capacity list.

For each row of estimated logits with a validity mask, the weights are a softmax over the valid
entries (the row maximum is subtracted, never token 0). The threshold ``t`` is the largest value
with ``sum_{w >= t} w >= p``; the kept set is ``{valid, w >= t}`` (ties at ``t`` are all kept), the
smallest prefix of the weights sorted in decreasing order whose sum reaches ``p``.

The kernels find ``t`` by bisection on its IEEE-754 bit pattern (topp_common). For p <= 1 - 2**-10
the search starts at (1 - p) / (2 N) instead of 0 (the threshold is above (1 - p) / N), which
skips most of the exponent range. The iteration count is fixed (the config's ``iters``, default
16; 30, ``EXACT_ITERS``, is exact); with fewer iterations the result is conservative: the
returned ``t`` never exceeds the exact one, so the kept mass still reaches ``p`` and only
entries just below the exact threshold may be added. A final snap makes it exact whenever the
unresolved band ``[lo, hi)`` holds a single weight: if the heaviest weight there still reaches
``p``, it is the exact threshold. The reference sorts instead, so it checks the search rather
than repeating it.

Special cases, identical on every backend:
  * ``p >= 1`` keeps every valid entry (``t = 0``), so rounding of the sum cannot drop one whose
    weight underflows or whose addition does not change the float sum.
  * If even the sum of all weights rounds to below ``p`` (``p`` within an ulp of 1), ``t = 0``.
  * A valid entry whose logit is ``-inf`` is treated as invalid (its weight is exactly 0).
  * A row with no valid entry keeps nothing: ``t = 0``, count 0, mass 0.

Selection (``topp_select_grouped``): ``G`` heads share one selection. Each head finds its own
threshold; the selection is the union of the heads' kept sets. If the union holds more than
``capacity`` entries, the ``capacity`` entries with the highest priority ``max_g w[g]`` are kept
(ties at the cut broken towards lower columns) and ``saturated`` is set; a second bit-pattern
bisection, counting instead of summing, finds the priority cut. Indices are written in ascending
column order; slots past ``counts`` hold 0.

Modules: this one holds the public entries, the references and the argument checks;
topp_gpu the Pallas Triton kernels (and XLA ops for thresholds of rows longer than
TopPGpuConfig.max_cols);
topp_tpu the Pallas Mosaic kernel; topp_common their configs (one table of tuned defaults) and
the search they share.

Inputs: ``logits [R, N]`` (or ``[R, G, N]``) float32, ``valid [R, N]`` bool or None (every
entry), ``p`` a Python float or a ``[R]`` float array (may be traced; or ``[S]``, S dividing R,
shared by R / S consecutive rows), ``capacity`` a static int.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _common, topp_gpu, topp_tpu
from pallas_kernels.topp_common import (
    EXACT_ITERS,
    TopPGpuConfig,
    TopPTpuConfig,
    columns_to_positions,
    p_rows,
)
from pallas_kernels.topp_gpu import topp_select_gpu, topp_select_grouped_gpu, topp_threshold_gpu
from pallas_kernels.topp_tpu import topp_select_grouped_tpu, topp_select_tpu, topp_threshold_tpu

__all__ = [
    "EXACT_ITERS",
    "TopPGpuConfig",
    "TopPTpuConfig",
    "topp_select",
    "topp_select_gpu",
    "topp_select_grouped",
    "topp_select_grouped_gpu",
    "topp_select_grouped_reference",
    "topp_select_grouped_tpu",
    "topp_select_reference",
    "topp_select_tpu",
    "topp_threshold",
    "topp_threshold_gpu",
    "topp_threshold_reference",
    "topp_threshold_tpu",
]


# --------------------------------------------------------------------------------------------
# Reference (plain jnp, float32): sorts instead of bisecting, so it checks the kernels'
# search rather than repeating it.
# --------------------------------------------------------------------------------------------


def _softmax_reference(logits, valid):
    """Weights over valid entries; 0 elsewhere. logits [..., N] f32, valid [..., N] bool."""
    valid = jnp.broadcast_to(valid, logits.shape) & (logits > -jnp.inf)
    m = jnp.max(jnp.where(valid, logits, -jnp.inf), axis=-1, keepdims=True)
    e = jnp.where(valid, jnp.exp(logits - jnp.where(valid.any(-1, keepdims=True), m, 0.0)), 0.0)
    z = jnp.sum(e, axis=-1, keepdims=True)
    return jnp.where(valid, e / jnp.where(z > 0, z, 1.0), 0.0), valid


def _threshold_reference(w, valid, p):
    """w, valid [..., N]; p [...]. The largest t with sum_{w >= t} w >= p, from a sort."""
    desc = -jnp.sort(-jnp.where(valid, w, -1.0), axis=-1)
    running = jnp.cumsum(jnp.maximum(desc, 0.0), axis=-1)
    # The first position where the running sum reaches p holds the threshold.
    k = jnp.sum(running < p[..., None], axis=-1)
    n_valid = jnp.sum(valid, axis=-1)
    t = jnp.take_along_axis(desc, jnp.minimum(k, desc.shape[-1] - 1)[..., None], axis=-1)[..., 0]
    return jnp.where((p < 1.0) & (k < n_valid), t, 0.0)


@jax.jit
def topp_threshold_reference(logits, valid, p):
    """Reference of ``topp_threshold``: (threshold f32 [R], count i32 [R], mass f32 [R])."""
    logits = jnp.asarray(logits, jnp.float32)
    p = p_rows(p, logits.shape[0])
    w, valid = _softmax_reference(logits, True if valid is None else valid)
    t = _threshold_reference(w, valid, p)
    kept = valid & (w >= t[..., None])
    return t, jnp.sum(kept, axis=-1, dtype=jnp.int32), jnp.sum(jnp.where(kept, w, 0.0), axis=-1)


@functools.partial(jax.jit, static_argnames=("capacity", "block_size"))
def topp_select_grouped_reference(logits, valid, p, capacity, *, blocks=None, block_size=1):
    """Reference of ``topp_select_grouped``: (indices, counts, saturated, mass)."""
    logits = jnp.asarray(logits, jnp.float32)
    r, g, n = logits.shape
    p = p_rows(p, r)
    w, valid_g = _softmax_reference(logits, True if valid is None else valid[:, None, :])
    t = _threshold_reference(w, valid_g, jnp.broadcast_to(p[:, None], (r, g)))
    union = jnp.any(valid_g & (w >= t[..., None]), axis=1)  # [R, N]
    priority = jnp.where(union, jnp.max(w, axis=1), -1.0)
    # Rank by decreasing priority; the stable sort breaks ties towards lower columns.
    order = jnp.argsort(-priority, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)
    final = union & (rank < capacity)
    width = max(n, capacity)
    padded = jnp.pad(final, ((0, 0), (0, width - n)))
    cols = jnp.argsort(~padded, axis=-1, stable=True)[:, :capacity]  # kept columns first
    n_union = jnp.sum(union, axis=-1, dtype=jnp.int32)
    counts = jnp.minimum(n_union, capacity)
    indices = jnp.where(jnp.arange(capacity)[None, :] < counts[:, None], cols, 0)
    if blocks is not None:
        indices = columns_to_positions(indices, counts, blocks, block_size)
    mass = jnp.sum(jnp.where(final[:, None, :], w, 0.0), axis=-1)
    return indices.astype(jnp.int32), counts, n_union > capacity, mass


@functools.partial(jax.jit, static_argnames=("capacity",))
def topp_select_reference(logits, valid, p, capacity):
    """Reference of ``topp_select``: (indices, counts, saturated)."""
    indices, counts, saturated, _ = topp_select_grouped_reference(
        jnp.asarray(logits)[:, None, :], valid, p, capacity
    )
    return indices, counts, saturated


# --------------------------------------------------------------------------------------------
# Validation (shapes, dtypes, static values; never traced values)
# --------------------------------------------------------------------------------------------


def _check_p(p, rows: int) -> None:
    if isinstance(p, bool):
        raise ValueError(f"p must be a float in (0, 1] or a [{rows}] float array, got {p!r}")
    if isinstance(p, (int, float)):
        _common.check_static_p(p)
        return
    shape = tuple(np.shape(p))
    if not (shape == () or (len(shape) == 1 and shape[0] >= 1 and rows % shape[0] == 0)):
        raise ValueError(
            f"p must be a scalar or have shape ({rows},) (one per row) or (S,) with S dividing "
            f"{rows} (one per group of {rows} / S consecutive rows), got {shape}"
        )
    if not jnp.issubdtype(jnp.result_type(p), jnp.floating):
        raise ValueError(f"p must have a floating dtype, got {jnp.result_type(p)}")
    if not isinstance(p, jax.core.Tracer):
        values = np.asarray(p, np.float64)
        bad = values[~((values > 0.0) & (values <= 1.0))]
        if bad.size:
            raise ValueError(f"p must be in (0, 1], got {bad.ravel()[0]} among its values")


def _check_blocks(blocks, block_size, logits) -> None:
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, (int, np.integer))
        or block_size < 1
    ):
        raise ValueError(f"block_size must be a static int >= 1, got {block_size!r}")
    if blocks is None:
        return
    r, n = np.shape(logits)[0], np.shape(logits)[-1]
    _common.check_rank("blocks", blocks, 2, "[R, C]")
    _common.check_dtype("blocks", blocks, (jnp.int32,))
    _common.check_dim("blocks", blocks, 0, r, "rows R of logits")
    if np.shape(blocks)[1] * block_size != n:
        raise ValueError(
            f"blocks [R, C] must cover the N = {n} columns of logits in blocks of block_size="
            f"{block_size} (C * block_size == N), got shape {tuple(np.shape(blocks))}"
        )


def _check_common(logits, valid, p, capacity, layout: str) -> None:
    rank = 3 if layout.startswith("[R, G") else 2
    _common.check_rank("logits", logits, rank, layout)
    _common.check_dtype("logits", logits, (jnp.float32,))
    r, n = np.shape(logits)[0], np.shape(logits)[-1]
    if r == 0 or n == 0 or (rank == 3 and np.shape(logits)[1] == 0):
        raise ValueError(f"logits must be non-empty, got shape {tuple(np.shape(logits))}")
    if valid is not None:
        _common.check_rank("valid", valid, 2, "[R, N]")
        _common.check_dtype("valid", valid, (jnp.bool_,))
        _common.check_dim("valid", valid, 0, r, "rows R of logits")
        _common.check_dim("valid", valid, 1, n, "columns N of logits")
    _check_p(p, r)
    if capacity is not None and (
        isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1
    ):
        raise ValueError(f"capacity must be a static int >= 1, got {capacity!r}")


# --------------------------------------------------------------------------------------------
# Public entries
# --------------------------------------------------------------------------------------------


def topp_threshold(logits, valid, p, *, backend="auto", config=None):
    """Per-row top-p threshold by fixed-iteration bisection.

    Args:
      logits: [R, N] float32 estimated logits.
      valid: [R, N] bool; weights are a softmax over the valid entries only. None: every
        entry (the kernels then read no mask); a -inf logit is never valid either way.
      p: Python float in (0, 1], or a float array (may be traced): [R], a scalar, or [S]
        with S dividing R (row r takes p[r // (R / S)], e.g. one p per sequence).
      backend: "auto" | "pallas" | "pallas_gpu" | "pallas_tpu" | "reference"
        (docs/kernel_api.md).
      config: TopPGpuConfig or TopPTpuConfig for the kernel that runs (None: the defaults);
        its ``iters`` sets the bisection steps (16: conservative; 30, EXACT_ITERS: exact).
        The reference is exact and ignores it.

    Returns:
      threshold: [R] float32, the largest t in [0, max w] with sum_{w >= t} w >= p (0 when
        p >= 1 or the row has no valid entry).
      count: [R] int32, #{valid, w >= t}.
      mass: [R] float32, sum of those weights.
    """
    _check_common(logits, valid, p, None, "[R, N]")
    return _common.implementation(
        backend,
        config,
        reference=topp_threshold_reference,
        gpu=(topp_threshold_gpu, topp_gpu.DEFAULT_CONFIG),
        tpu=(topp_threshold_tpu, topp_tpu.DEFAULT_CONFIG),
    )(logits, valid, p)


def topp_select_grouped(
    logits, valid, p, capacity, *, backend="auto", config=None, blocks=None, block_size=1
):
    """Union of per-head top-p sets for heads sharing one selection, compacted.

    Args:
      logits: [R, G, N] float32; G heads (e.g. the query heads of a KV group) per row.
      valid: [R, N] bool, shared by the G heads, or None (as ``topp_threshold``).
      p: Python float in (0, 1], or a float array (may be traced): [R], a scalar, or [S]
        with S dividing R (row r takes p[r // (R / S)], e.g. one p per sequence).
      capacity: static int >= 1, the selection capacity.
      backend, config: as ``topp_threshold``.
      blocks, block_size: None, or the ids of the blocks the columns come from, [R, C] int32
        with C * block_size == N (column c lies in block c // block_size, e.g. a candidate
        page): the indices returned are then blocks[r, c // block_size] * block_size +
        c % block_size (e.g. token positions) instead of the columns c, written by the GPU
        kernels as they store, so no gather follows. block_size: static int >= 1.

    Returns:
      indices: [R, capacity] int32 kept columns in ascending order (or their positions, with
        blocks); slots >= counts hold 0.
      counts: [R] int32 number of kept columns (<= capacity).
      saturated: [R] bool, the union exceeded capacity and was cut to the `capacity` columns
        with the highest max_g w (ties towards lower columns).
      mass: [R, G] float32, head g's weight on the final selection.
    """
    _check_common(logits, valid, p, capacity, "[R, G, N]")
    _check_blocks(blocks, block_size, logits)
    return _common.implementation(
        backend,
        config,
        reference=topp_select_grouped_reference,
        gpu=(topp_select_grouped_gpu, topp_gpu.DEFAULT_CONFIG),
        tpu=(topp_select_grouped_tpu, topp_tpu.DEFAULT_CONFIG),
    )(logits, valid, p, int(capacity), blocks=blocks, block_size=int(block_size))


def topp_select(logits, valid, p, capacity, *, backend="auto", config=None):
    """Top-p selection per row, compacted to a static capacity.

    Args:
      logits: [R, N] float32.
      valid: [R, N] bool, or None (as ``topp_threshold``).
      p: Python float in (0, 1], or a float array (may be traced): [R], a scalar, or [S]
        with S dividing R (row r takes p[r // (R / S)], e.g. one p per sequence).
      capacity: static int >= 1.
      backend, config: as ``topp_threshold``.

    Returns:
      indices: [R, capacity] int32 kept columns in ascending order; slots >= counts hold 0.
      counts: [R] int32 (<= capacity).
      saturated: [R] bool, the top-p set exceeded capacity and the highest weights were kept.
    """
    _check_common(logits, valid, p, capacity, "[R, N]")
    return _common.implementation(
        backend,
        config,
        reference=topp_select_reference,
        gpu=(topp_select_gpu, topp_gpu.DEFAULT_CONFIG),
        tpu=(topp_select_tpu, topp_tpu.DEFAULT_CONFIG),
    )(logits, valid, p, int(capacity))

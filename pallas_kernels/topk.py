"""Top-k *set* selection per row: the column ids of the k largest scores, in column order.

Replaces ``jax.lax.top_k`` for Quest page selection, where only the set matters (the ids are
consumed in ascending order) and a full sort is wasted work: on an H200, ``lax.top_k`` of
[512, 2048] float32 scores with k = 512 is an XLA sort costing about 55 us.

Semantics (identical on every backend):
  * The k largest entries of each row; ties at the cut are broken towards lower columns, so a
    row with fewer than k finite entries gets all of them plus its lowest-column ``-inf`` ones.
  * ``-0.0`` and ``0.0`` compare equal (as floats do): a tie, broken towards the lower column.
    Subnormals are ordered by value on every platform (not flushed to zero).
  * The ids come out in ascending column order (not score order), exactly k distinct per row.
  * Scores must hold no NaN (not checked: checking would cost a pass over the data).

Method: each float maps to an order-preserving int32 key (``b = bitcast(x)``; for negative
``b`` the key is ``-(b & 0x7FFFFFFF)``, sign-magnitude to two's complement, so signed
comparison of keys orders like the floats, ``-0.0`` and ``0.0`` share key 0, and subnormals
keep their order, never flushed to zero). A 32-step bisection over the int32 range finds the cut
``c``, the largest key with ``#{key >= c} >= k``. Then ``key > c`` holds fewer than k entries,
all selected, and the rest is filled from ``key == c`` in column order (inclusive prefix count
of the band ``<= k - #{key > c}``). Compaction: each selected column's slot is its running
count minus one.

Backends (docs/kernel_api.md):
  * "reference": plain jnp, ``lax.top_k`` on the same int32 keys (stable: equal keys come out
    lower index first), then an ascending sort of the k ids. It checks the kernel's bisection
    rather than repeating it.
  * "tpu" ("pallas_tpu", or "auto"/"pallas" on a TPU): the reference path; there is no TPU
    kernel.
  * "gpu" (Pallas Triton): grid (R,), one program per row; the row [Np] (N padded to a power of
    two with masked loads, padding key INT32_MIN: strictly below every real key, the lowest of
    which is -inf's, so padding never reaches the cut) stays in registers for the bisection,
    and one masked scatter store writes the k ids. Rows longer than ``TopKGpuConfig.max_cols``
    take the reference path instead (a row must fit on chip).

Defaults (TopKGpuConfig): at 512 rows of 2048 page scores, k = 512 (batch 64, 32K context), the
kernel takes 10.9 us on an H200 where lax.top_k's sort took 55.5 us
(docs/results/profile-h200/profile-after.log and profile-before.log). max_cols 32768 is
top-p's limit on a row held in registers; the warps follow the row length (about 16 elements a
thread, 4 to 16 warps). Not swept.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import _common

# 32 halvings of the int32 key range [INT32_MIN, INT32_MAX] (span 2**32 - 1) leave adjacent
# keys: the bisection is exact.
_ITERS = 32
_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class TopKGpuConfig:
    """Knobs of the GPU kernel (there is no TPU kernel: TPUs run the reference).

    max_cols: rows with more columns than this skip the kernel, whose row lives in registers,
      and run the reference (lax.top_k on the same keys: the same ids).
    """

    max_cols: int = 32768

    def __post_init__(self):
        _common.check_positive("TopKGpuConfig", "max_cols", self.max_cols)


DEFAULT_GPU_CONFIG = TopKGpuConfig()


def _keys(x):
    """f32 -> int32 keys whose signed order is the float order. No NaN.

    IEEE floats are sign-magnitude: a negative float's key is minus its magnitude bits, so
    -0.0 and 0.0 share key 0, -inf gets -0x7F800000 (above INT32_MIN) and subnormals keep
    their order. Pure integer ops: no float compare, so no flush-to-zero of subnormals (XLA
    CPU compares them equal to 0).
    """
    b = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(b < 0, -(b & 0x7FFFFFFF), b)


def _gpu_num_warps(np_: int) -> int:
    """About 16 row elements per thread, clamped to [4, 16] warps."""
    return int(min(16, max(4, pl.next_power_of_2(max(1, np_ // (16 * 32))))))


# --------------------------------------------------------------------------------------------
# Reference (plain jnp)
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("k",))
def topk_ids_reference(scores, k: int):
    """scores [R, N] f32 -> int32 [R, k]: lax.top_k on the keys, ids sorted ascending."""
    _, ids = jax.lax.top_k(_keys(scores), k)
    return jnp.sort(ids, axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# GPU (Triton lowering)
# --------------------------------------------------------------------------------------------


def _gpu_kernel(x_ref, out_ref, *, num_cols: int, k: int):
    """x_ref [N] f32 (one row), out_ref [k] i32."""
    np_ = pl.next_power_of_2(num_cols)
    col = jnp.arange(np_, dtype=jnp.int32)
    in_row = col < num_cols
    x = plt.load(x_ref.at[pl.ds(0, np_)], mask=in_row, other=0.0)
    key = jnp.where(in_row, _keys(x), _INT32_MIN)

    def passes(cut):
        return jnp.sum((key >= cut).astype(jnp.int32)) >= k

    # Invariant: count(key >= lo) >= k (lo = INT32_MIN is assumed, never evaluated),
    # count(key >= hi) < k (no key reaches INT32_MAX: that is a NaN's). hi - lo may wrap in
    # int32; as an unsigned span (< 2**32) its logical half fits, and lo + half lies in
    # [lo, hi), so the wrapping add is exact.
    lo0 = jnp.array(_INT32_MIN, jnp.int32)
    hi0 = jnp.array(_INT32_MAX, jnp.int32)
    cut, _ = _common.bisect_bits(passes, lo0, hi0, _ITERS)
    # The cut is at least the lowest real key (all N >= k real entries reach it), which is
    # above INT32_MIN: padding is neither above nor in the band.
    above = key > cut  # fewer than k entries
    band = key == cut
    room = k - jnp.sum(above.astype(jnp.int32))
    taken = band & (jnp.cumsum(band.astype(jnp.int32), axis=0) <= room)
    selected = above | taken  # exactly k entries
    # Each selected column's slot is its running count; the others get distinct slots past the
    # end (masked on the GPU; interpret mode drops out-of-range scatter indices, and distinct
    # indices keep its gather-then-scatter emulation from colliding).
    slot = jnp.where(selected, jnp.cumsum(selected.astype(jnp.int32), axis=0) - 1, k + col)
    plt.store(out_ref.at[slot], col, mask=selected)


@functools.partial(jax.jit, static_argnames=("k", "config", "interpret"))
def topk_ids_gpu(
    scores, k: int, *, config: TopKGpuConfig = DEFAULT_GPU_CONFIG, interpret: bool = False
):
    """Pallas GPU ``topk_ids``. scores [R, N] f32 -> int32 [R, k]."""
    r, n = scores.shape
    if n > config.max_cols:
        return topk_ids_reference(scores, k)
    kernel = functools.partial(_gpu_kernel, num_cols=n, k=k)
    return pl.pallas_call(
        kernel,
        grid=(r,),
        in_specs=[pl.BlockSpec((None, n), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((None, k), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((r, k), jnp.int32),
        compiler_params=plt.CompilerParams(
            num_warps=_gpu_num_warps(pl.next_power_of_2(n)), num_stages=1
        ),
        interpret=interpret,
        name="topk_ids_gpu",
    )(scores)


# --------------------------------------------------------------------------------------------
# Validation and public entry
# --------------------------------------------------------------------------------------------


def _check(scores, k) -> None:
    if np.ndim(scores) < 1:
        raise ValueError(
            f"scores must have rank >= 1 ([..., N]), got shape {tuple(np.shape(scores))}"
        )
    _common.check_dtype("scores", scores, (jnp.float32,))
    n = np.shape(scores)[-1]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be a static int, got {k!r}")
    if not 1 <= k <= n:
        raise ValueError(
            f"k must be in [1, N] with N={n} (the last dimension of scores "
            f"{tuple(np.shape(scores))}), got {k}"
        )


def topk_ids(
    scores, k: int, *, backend: str = "auto", config: TopKGpuConfig | None = None
) -> jax.Array:
    """scores [R, N] float32 (may hold -inf; no NaN) -> int32 [R, k] column ids of the k largest
    entries of each row, in ASCENDING column order (not score order). Ties at the cut are broken
    towards lower columns (so -inf entries are taken lowest column first when a row has fewer
    than k finite entries). Exactly k distinct ids per row; 1 <= k <= N.

    Leading batch dims are accepted: scores [..., N] -> [..., k]. ``-0.0`` and ``0.0`` are
    equal (a tie). backend: "auto" | "pallas" | "pallas_gpu" | "pallas_tpu" | "reference";
    TPU backends run the jnp reference (there is no TPU kernel). config: TopKGpuConfig for the
    GPU kernel (None: the defaults). Raises ValueError for a non-float32 dtype, rank 0, k not
    a static int in [1, N], or a config that is not a TopKGpuConfig.
    """
    _check(scores, k)
    k = int(k)
    run = _common.implementation(
        backend, config, reference=topk_ids_reference, gpu=(topk_ids_gpu, DEFAULT_GPU_CONFIG)
    )
    shape = tuple(np.shape(scores))
    n = shape[-1]
    r = int(np.prod(shape[:-1], dtype=np.int64))
    if r == 0:
        return jnp.zeros(shape[:-1] + (k,), jnp.int32)
    return run(jnp.reshape(scores, (r, n)), k).reshape(shape[:-1] + (k,))

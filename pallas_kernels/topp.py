"""Top-p pruning: per-row threshold by bisection, then compaction into a static-capacity list.

For each row of estimated logits with a validity mask, the weights are a softmax over the valid
entries (the row maximum is subtracted, never token 0). The threshold ``t`` is the largest value
with ``sum_{w >= t} w >= p``; the kept set is ``{valid, w >= t}`` (ties at ``t`` are all kept), the
smallest prefix of the weights sorted in decreasing order whose sum reaches ``p``.

Bisection runs on the IEEE-754 bit pattern of ``t`` rather than on its value: for non-negative
floats the int32 bit pattern orders exactly like the value, so halving the integer interval
``[0, bits(max w)]`` finds the exact answer in at most 30 steps (``bits(1.0) < 2**30``) whatever
the dynamic range of the weights, where halving the value interval would need ~150 steps to
resolve a weight of 1e-40. For p <= 1 - 2**-10 the search starts at (1 - p) / (2 N) instead of
0 (the threshold is above (1 - p) / N), which skips most of the exponent range. The iteration
count is fixed (``TopPConfig.iters``, default 16; 30, ``EXACT``, is exact); with fewer
iterations the result is conservative: the returned ``t`` never exceeds the exact one, so the
kept mass still reaches ``p`` and only entries just below the exact threshold may be added.
A final snap makes it exact whenever the unresolved band ``[lo, hi)`` holds a single weight:
if the heaviest weight there still reaches ``p``, it is the exact threshold.

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

Kernels:
  * GPU (Triton lowering), ``TopPConfig.gpu_split=True`` (default): a ``(row, head)`` grid
    finds each head's threshold (its ``[N]`` logits resident in registers, padded to a power of
    two with masked loads; the bisection is masked sums over the resident block, optionally
    ``2**search_bits`` candidates per pass), then, for selection, a row grid re-reads the row's
    ``[G, N]`` logits (mostly from L2), recomputes the weights from the first kernel's row max
    and softmax sum, forms the union and compacts it: an on-chip cumsum gives each kept column
    its output slot, then one masked scatter store. The capacity bisection runs only for rows
    that overflow. ``gpu_split=False`` does all of it in one program per row (the original
    kernel, kept for A/B runs: fewer, longer programs; no second read). Rows longer than
    ``TopPConfig.gpu_max_cols`` skip the kernels (a row must fit on chip; at 131072 columns the
    Triton compile alone took 4 minutes) and run the same math as plain XLA ops over
    ``[R, G, N]`` (one fused pass over the logits per bisection step; one bit per step, so
    results equal the kernels' at ``search_bits=1``).
  * TPU (Mosaic): a block of rows per grid step, each row viewed as ``[N/128, 128]`` tiles (N
    padded to a multiple of 128). Mosaic has no cumsum or vector scatter, so prefix sums are
    triangular matmuls and compaction counts, for each output slot ``s``, the columns whose
    inclusive prefix is ``<= s`` (a one-hot matmul picks each slot's 128-column tile).

Inputs: ``logits [R, N]`` (or ``[R, G, N]``) float32, ``valid [R, N]`` bool, ``p`` a Python float
or a ``[R]`` float array (may be traced), ``capacity`` a static int.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import _common

# Bit pattern of 1.0f: weights never exceed 1, so [0, _ONE_BITS] brackets every threshold and
# 30 halvings of that interval are exact.
_ONE_BITS = 0x3F800000
_EXACT_ITERS = 30
# Default threshold bisection steps: conservative, and exact unless two or more weights fall in
# the final band (see TopPConfig.iters).
_DEFAULT_ITERS = 16
_LANES = 128


@dataclasses.dataclass(frozen=True)
class TopPConfig:
    """Static tuning knobs of the top-p kernels (hashable: usable as a static jit argument).

    iters: bisection steps (bits of the threshold's bit pattern) for each head's top-p
      threshold; 30 is exact (see module doc). Fewer is conservative (never keeps less mass
      than p) and, after the final snap to the heaviest weight in the unresolved band, exact
      whenever that band holds one weight; 16 leaves a band about 2**-11 of t wide.
    capacity_iters: bisection steps for the priority cut when a selection overflows capacity;
      30 is exact; fewer still keep exactly ``capacity`` entries, but those in the unresolved
      band of priorities just above the cut are taken by column order, not by weight.
    gpu_split: GPU only. True: one program per (row, head) finds the thresholds, then one
      program per row re-reads the row's G heads (mostly from L2), forms the union and
      compacts it. False: one program per row does everything for its G heads (the original
      kernel; kept for A/B runs).
    search_bits: GPU split path only. Bits of the threshold resolved per pass over the row:
      each pass sums the row above 2**search_bits candidate thresholds at once (one block
      reduction instead of search_bits of them), at 2**search_bits / search_bits times the
      compare work per bit. 1 is plain bisection.
    num_warps: GPU warps per program; None picks about 32 row elements per thread, clamped to
      [4, 16], so the resident row fits in registers.
    num_stages: GPU software pipelining stages (nothing to pipeline: one load per program).
    tpu_block_rows: rows per TPU grid step when it divides R (else one row per step).
    gpu_max_cols: GPU only. Rows with more columns than this skip the Pallas kernels and run
      the same bisections as XLA ops (see module doc): the kernels' results at search_bits=1,
      at XLA's speed (about one pass over the logits per bisection step).
    """

    iters: int = _DEFAULT_ITERS
    capacity_iters: int = _EXACT_ITERS
    gpu_split: bool = True
    search_bits: int = 1
    num_warps: int | None = None
    num_stages: int = 1
    tpu_block_rows: int = 8
    gpu_max_cols: int = 32768

    def __post_init__(self):
        for name in ("iters", "capacity_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= 64:
                raise ValueError(f"TopPConfig.{name} must be an int in [1, 64], got {value!r}")
        if not isinstance(self.gpu_split, bool):
            raise ValueError(f"TopPConfig.gpu_split must be a bool, got {self.gpu_split!r}")
        if self.search_bits not in (1, 2, 3, 4, 5):
            raise ValueError(
                f"TopPConfig.search_bits must be an int in [1, 5], got {self.search_bits!r}"
            )
        if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(
                f"TopPConfig.num_warps must be None or a power of two <= 32, got {self.num_warps!r}"
            )
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"TopPConfig.num_stages must be an int >= 1, got {self.num_stages!r}")
        if not isinstance(self.tpu_block_rows, int) or self.tpu_block_rows < 1:
            raise ValueError(
                f"TopPConfig.tpu_block_rows must be an int >= 1, got {self.tpu_block_rows!r}"
            )
        if (
            isinstance(self.gpu_max_cols, bool)
            or not isinstance(self.gpu_max_cols, int)
            or self.gpu_max_cols < 1
        ):
            raise ValueError(
                f"TopPConfig.gpu_max_cols must be an int >= 1, got {self.gpu_max_cols!r}"
            )

    def gpu_num_warps(self, block_elems: int) -> int:
        if self.num_warps is not None:
            return self.num_warps
        return int(min(16, max(4, pl.next_power_of_2(max(1, block_elems // 1024)))))


EXACT = TopPConfig(iters=_EXACT_ITERS)


# --------------------------------------------------------------------------------------------
# Reference (plain jnp, float32): sorts instead of bisecting, so it checks the kernels'
# search rather than repeating it.
# --------------------------------------------------------------------------------------------


def _softmax_reference(logits, valid):
    """Weights over valid entries; 0 elsewhere. logits [..., N] f32, valid [..., N] bool."""
    valid = valid & (logits > -jnp.inf)
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
    p = jnp.broadcast_to(jnp.asarray(p, jnp.float32), logits.shape[:-1])
    w, valid = _softmax_reference(logits, valid)
    t = _threshold_reference(w, valid, p)
    kept = valid & (w >= t[..., None])
    return t, jnp.sum(kept, axis=-1, dtype=jnp.int32), jnp.sum(jnp.where(kept, w, 0.0), axis=-1)


@functools.partial(jax.jit, static_argnames=("capacity",))
def topp_select_grouped_reference(logits, valid, p, capacity):
    """Reference of ``topp_select_grouped``: (indices, counts, saturated, mass)."""
    logits = jnp.asarray(logits, jnp.float32)
    r, g, n = logits.shape
    p = jnp.broadcast_to(jnp.asarray(p, jnp.float32), (r,))
    w, valid_g = _softmax_reference(logits, jnp.broadcast_to(valid[:, None, :], logits.shape))
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
# Math shared by the kernels. Arrays are [heads, *row] where the row is [Np] (GPU) or
# [NC, 128] (TPU); `axes` are the row axes, reduced with keepdims so results broadcast back.
# Invalid entries carry weight -1: every threshold is >= 0, so they never pass a comparison and
# no separate mask has to stay live.
# --------------------------------------------------------------------------------------------


def _softmax_stats(x, valid, axes):
    """x [H, *row] f32, valid broadcastable bool -> (valid [H, *row], max m, sum z [H, 1...]).

    A valid entry with logit -inf counts as invalid (weight exactly 0).
    """
    valid = valid & (x > -jnp.inf)
    m = jnp.max(jnp.where(valid, x, -jnp.inf), axis=axes, keepdims=True)
    m = jnp.where(m > -jnp.inf, m, 0.0)
    z = jnp.sum(jnp.where(valid, jnp.exp(x - m), 0.0), axis=axes, keepdims=True)
    return valid, m, z


def _weights_from(x, valid, m, z):
    """w [H, *row], -1 off valid. The GPU select kernel recomputes w from the threshold
    kernel's m and z with this same expression, so both see bit-identical weights."""
    return jnp.where(valid, jnp.exp(x - m) / z, -1.0)


def _weights(x, valid, axes):
    """x [H, *row] f32, valid broadcastable bool -> (w [H, *row] with -1 off valid, hi bits)."""
    valid, m, z = _softmax_stats(x, valid, axes)
    return _weights_from(x, valid, m, z), _upper_bits(z)


def _upper_bits(z):
    """Bit pattern just above max w = exp(0) / z = 1 / z: no threshold there reaches p > 0."""
    return jnp.where(z > 0, jax.lax.bitcast_convert_type(1.0 / z, jnp.int32) + 1, 1)


def _lower_bits(p, hi, num_cols: int):
    """A bit pattern known to reach p, so the search can start above 0.

    The entries below the exact threshold t sum to more than 1 - p, and there are fewer than
    num_cols of them, so t > (1 - p) / num_cols; at half that, the kept mass is at least
    (1 + p) / 2, a margin of (1 - p) / 2 over p. That margin dwarfs the float error of the sum
    only while 1 - p is not tiny, hence the cut-off; above it the search starts at 0. Starting
    near t skips most of the exponent range: 30 steps still end exact, and fewer steps resolve
    more mantissa bits.
    """
    # Broadcast before the bitcast: on TPU p is an SMEM scalar, the bitcast wants a vector.
    bound = jnp.broadcast_to((1.0 - p) * (0.5 / num_cols), hi.shape)
    lo = jnp.where(p <= 1.0 - 2.0**-10, jax.lax.bitcast_convert_type(bound, jnp.int32), 0)
    return jnp.clip(lo, 0, hi - 1)


def _bisect(passes, lo, hi, iters):
    """Brackets the largest float t >= 0 with passes(t), per head, by its bit pattern.

    lo, hi: int32 [H, 1...], bit patterns known to pass (lo: assumed, never evaluated) and to
    fail (or the end of the range). passes maps an f32 [H, 1...] threshold to a bool of the same
    shape and must be monotone (true up to the answer, false above). Returns (lo, hi) as
    floats: passes(lo), not passes(hi) (unless hi is the initial bound); after 30 steps on a
    range within [0, 2**30) they are adjacent floats, so lo is the answer.
    """

    def step(_, carry):
        lo, hi = carry
        mid = lo + jax.lax.shift_right_logical(hi - lo, 1)
        ok = passes(jax.lax.bitcast_convert_type(mid, jnp.float32))
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, step, (lo, hi))
    return _as_float(lo), _as_float(hi)


def _as_float(bits):
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _multiway_bisect(w, target, lo, hi, iters, bits):
    """``_bisect`` of ``_mass_reaches`` for one head, 2**bits candidates per pass (GPU).

    w [1, Np]; lo, hi int32 [1, 1]. Each pass splits [lo, hi) at K = 2**bits points
    c_j = lo + floor(j * (hi - lo) / K) (c_0 = lo, never failing) and evaluates all K in one
    [K, Np] compare-and-sum, so one block reduction resolves `bits` bits: the new interval
    is at most ceil((hi - lo) / K) wide, so ceil(iters / bits) passes resolve at least `iters`
    bits, and 30 bits are exact as with ``_bisect``.
    """
    k = 1 << bits
    j = jnp.arange(k, dtype=jnp.int32)[:, None]  # [K, 1]

    def step(_, carry):
        lo, hi = carry
        span = hi - lo
        # j * span / K without overflowing int32: span < 2**30, j < 32.
        quot, rem = jax.lax.shift_right_logical(span, bits), span & (k - 1)
        cand = lo + quot * j + jax.lax.shift_right_logical(rem * j, bits)  # [K, 1]
        ok = _mass_reaches(w, _as_float(cand), target, axes=(1,)) | (j == 0)
        new_lo = jnp.max(jnp.where(ok, cand, lo), axis=0, keepdims=True)
        new_hi = jnp.min(jnp.where(ok, hi, cand), axis=0, keepdims=True)
        return new_lo, new_hi

    lo, hi = jax.lax.fori_loop(0, pl.cdiv(iters, bits), step, (lo, hi))
    return _as_float(lo), _as_float(hi)


def _mass_reaches(w, t, target, axes):
    """sum_{w >= t} w >= target, per threshold (t [H, 1...] against w [H or 1, *row])."""
    return jnp.sum(jnp.where(w >= t, w, 0.0), axis=axes, keepdims=True) >= target


def _snap(w, lo, hi, target, axes):
    """Tightens a bracket [lo, hi) of the threshold (passes(lo), not passes(hi)).

    The exact threshold is a weight in [lo, hi). If the heaviest weight there, b, still
    reaches p, nothing lies between b and hi, so b is the exact threshold; otherwise lo stays
    (conservative). After an exact bisection this returns lo; after a short one it is exact
    whenever the band holds a single weight.
    """
    band = jnp.max(jnp.where((w >= lo) & (w < hi), w, -1.0), axis=axes, keepdims=True)
    ok = (band >= lo) & _mass_reaches(w, band, target, axes)
    return jnp.where(ok, band, lo)


def _head_thresholds(w, hi, p, axes, iters, num_cols, search_bits=1):
    """Per-head top-p threshold [H, 1...]; p >= 1 leaves t = 0 (every valid entry).

    search_bits > 1 (one head, w [1, Np]) takes ``_multiway_bisect``.
    """
    target = jnp.where(p >= 1.0, jnp.inf, p)
    lo = _lower_bits(p, hi, num_cols)
    if search_bits > 1:
        lo, hi = _multiway_bisect(w, target, lo, hi, iters, search_bits)
    else:
        lo, hi = _bisect(lambda t: _mass_reaches(w, t, target, axes), lo, hi, iters)
    return _snap(w, lo, hi, target, axes)


def _limit_to_capacity(union, priority, capacity, axes, iters, inclusive_prefix):
    """Keeps the `capacity` union entries of highest priority (ties: lower columns first).

    union bool [*row]; priority f32 [*row] (-1 off the union); inclusive_prefix(bool) -> int32
    running count in column order. Called only when the union holds more than `capacity`.
    """
    ones = functools.partial(jnp.sum, axis=axes, keepdims=True, dtype=jnp.int32)
    # Priorities never exceed 1, so 1.0 + 1 ulp holds none: count < capacity there. One
    # bracket per reduced slice: (1,...) in the kernels (one row), [R, 1] on the XLA path.
    shape = tuple(1 if i in axes else d for i, d in enumerate(union.shape))
    hi = jnp.full(shape, _ONE_BITS + 1, jnp.int32)
    lo, hi = _bisect(lambda t: ones(priority >= t) >= capacity, jnp.zeros_like(hi), hi, iters)
    # >= hi: fewer than `capacity` entries, all kept; [lo, hi): enough to fill the rest, taken
    # in column order. Exact bisection leaves only priority == lo in the band (ties).
    above = priority >= hi
    band = union & (priority >= lo) & ~above
    room = capacity - ones(above)
    return above | (band & (inclusive_prefix(band) <= room))


# --------------------------------------------------------------------------------------------
# GPU (Triton lowering)
# --------------------------------------------------------------------------------------------


def _gpu_load_row(x_ref, valid_ref, num_heads, num_cols):
    """Loads one row padded to powers of two (Triton blocks must be): x [Gp, Np] with -inf
    padding, valid [1, Np] with False padding (so padding is invalid)."""
    from jax.experimental.pallas import triton as plt

    gp, np_ = pl.next_power_of_2(num_heads), pl.next_power_of_2(num_cols)
    head = jnp.arange(gp, dtype=jnp.int32)
    col = jnp.arange(np_, dtype=jnp.int32)
    x = plt.load(
        x_ref.at[pl.ds(0, gp), pl.ds(0, np_)],
        mask=(head[:, None] < num_heads) & (col[None, :] < num_cols),
        other=-jnp.inf,
    )
    valid = plt.load(valid_ref.at[pl.ds(0, np_)], mask=col < num_cols, other=False)
    return x, valid[None, :]


def _gpu_select_store(w, kept, out_refs, num_heads, capacity, config):
    """Union of the heads' kept sets, capacity limit, compaction and stores (one row).

    w [Gp, Np] f32 (-1 off valid and on padding heads), kept [Gp, Np] bool; out_refs: indices
    [capacity] i32, count [1] i32, saturated [1] i32, mass [G] f32.
    """
    from jax.experimental.pallas import triton as plt

    indices_ref, count_ref, saturated_ref, mass_ref = out_refs
    gp, np_ = w.shape
    col = jnp.arange(np_, dtype=jnp.int32)
    union = jnp.max(kept.astype(jnp.int32), axis=0) > 0  # [Np]
    priority = jnp.where(union, jnp.max(w, axis=0), -1.0)
    n_union = jnp.sum(union, dtype=jnp.int32)

    def cumsum(mask):
        return jnp.cumsum(mask.astype(jnp.int32), axis=0)

    def limit(union):
        return _limit_to_capacity(union, priority, capacity, (0,), config.capacity_iters, cumsum)

    # Most rows fit: skip the second bisection for them.
    final = jax.lax.cond(n_union > capacity, limit, lambda u: u, union)
    count = jnp.sum(final, dtype=jnp.int32)
    # Each kept column's output slot is its running count; the others get distinct slots past
    # the end (masked on the GPU; interpret mode drops out-of-range scatter indices, and
    # distinct indices keep its gather-then-scatter emulation from colliding).
    slot = jnp.where(final, cumsum(final) - 1, capacity + col)
    plt.store(indices_ref.at[slot], col, mask=final & (slot < capacity))
    # Padding slots: disjoint from the kept slots, so no ordering between the two stores.
    cap_p = pl.next_power_of_2(capacity)
    out_slot = jnp.arange(cap_p, dtype=jnp.int32)
    plt.store(
        indices_ref.at[pl.ds(0, cap_p)],
        jnp.zeros((cap_p,), jnp.int32),
        mask=(out_slot >= count) & (out_slot < capacity),
    )
    count_ref[0] = count
    saturated_ref[0] = (n_union > capacity).astype(jnp.int32)
    mass = jnp.sum(jnp.where(final[None, :], w, 0.0), axis=1)
    head = jnp.arange(gp, dtype=jnp.int32)
    plt.store(mass_ref.at[pl.ds(0, gp)], mass, mask=head < num_heads)


def _gpu_fused_kernel(
    x_ref,  # [G, N] f32 logits of one row (group)
    valid_ref,  # [N] bool
    p_ref,  # [1] f32
    *out_refs,
    # select: indices [capacity] i32, count [1] i32, saturated [1] i32, mass [G] f32
    # threshold only: threshold [G] f32, count [G] i32, mass [G] f32
    num_heads: int,
    num_cols: int,
    capacity: int | None,
    config: TopPConfig,
):
    """TopPConfig.gpu_split=False: thresholds of all G heads, union and compaction in one
    program per row."""
    from jax.experimental.pallas import triton as plt

    x, valid = _gpu_load_row(x_ref, valid_ref, num_heads, num_cols)
    w, hi = _weights(x, valid, axes=(1,))  # w [Gp, Np], hi [Gp, 1]
    t = _head_thresholds(w, hi, p_ref[0], (1,), config.iters, num_cols)  # [Gp, 1]
    kept = w >= t

    if capacity is not None:
        _gpu_select_store(w, kept, out_refs, num_heads, capacity, config)
        return
    threshold_ref, count_ref, mass_ref = out_refs
    gp = x.shape[0]
    head_ok = jnp.arange(gp, dtype=jnp.int32) < num_heads
    plt.store(threshold_ref.at[pl.ds(0, gp)], jnp.max(t, axis=1), mask=head_ok)
    plt.store(count_ref.at[pl.ds(0, gp)], jnp.sum(kept, axis=1, dtype=jnp.int32), mask=head_ok)
    mass = jnp.sum(jnp.where(kept, w, 0.0), axis=1)
    plt.store(mass_ref.at[pl.ds(0, gp)], mass, mask=head_ok)


def _gpu_head_kernel(
    x_ref,  # [1, N] f32 logits of one head of one row
    valid_ref,  # [N] bool
    p_ref,  # [1] f32
    *out_refs,
    # threshold only: threshold [1] f32, count [1] i32, mass [1] f32
    # select (stats for the union kernel): threshold [1] f32, row max m [1], sum z [1] f32
    num_cols: int,
    capacity: int | None,
    config: TopPConfig,
):
    """TopPConfig.gpu_split=True, first kernel: one head's threshold per program."""
    x, valid = _gpu_load_row(x_ref, valid_ref, 1, num_cols)  # [1, Np] each
    valid, m, z = _softmax_stats(x, valid, axes=(1,))  # m, z [1, 1]
    w = _weights_from(x, valid, m, z)  # [1, Np]
    t = _head_thresholds(
        w, _upper_bits(z), p_ref[0], (1,), config.iters, num_cols, config.search_bits
    )  # [1, 1]
    threshold_ref, *stat_refs = out_refs
    threshold_ref[0] = jnp.max(t)
    if capacity is None:
        count_ref, mass_ref = stat_refs
        kept = w >= t
        count_ref[0] = jnp.sum(kept, dtype=jnp.int32)
        mass_ref[0] = jnp.sum(jnp.where(kept, w, 0.0))
    else:
        m_ref, z_ref = stat_refs
        m_ref[0] = jnp.max(m)
        z_ref[0] = jnp.max(z)


def _gpu_union_kernel(
    x_ref,  # [G, N] f32 logits of one row (group)
    valid_ref,  # [N] bool
    t_ref,  # [G] f32 thresholds from _gpu_head_kernel
    m_ref,  # [G] f32 row maxima from _gpu_head_kernel
    z_ref,  # [G] f32 softmax sums from _gpu_head_kernel
    *out_refs,  # indices [capacity] i32, count [1] i32, saturated [1] i32, mass [G] f32
    num_heads: int,
    num_cols: int,
    capacity: int,
    config: TopPConfig,
):
    """TopPConfig.gpu_split=True, second kernel: union of the G heads' sets, compaction.

    Recomputes w with the first kernel's m and z through the same expression, so `w >= t`
    selects exactly the entries that kernel counted.
    """
    from jax.experimental.pallas import triton as plt

    x, valid = _gpu_load_row(x_ref, valid_ref, num_heads, num_cols)  # [Gp, Np], [1, Np]
    gp = x.shape[0]
    heads = pl.ds(0, gp)
    head_ok = jnp.arange(gp, dtype=jnp.int32) < num_heads
    # Padding heads: x = -inf makes them invalid (w = -1), and -1 never reaches t >= 0.
    t = plt.load(t_ref.at[heads], mask=head_ok, other=0.0)[:, None]
    m = plt.load(m_ref.at[heads], mask=head_ok, other=0.0)[:, None]
    z = plt.load(z_ref.at[heads], mask=head_ok, other=1.0)[:, None]
    w = _weights_from(x, valid & (x > -jnp.inf), m, z)
    _gpu_select_store(w, w >= t, out_refs, num_heads, capacity, config)


def _gpu_select_outputs(r, g, capacity):
    """(out_shape, out_specs) of the per-row select outputs, grid (R,)."""
    out_shape = [
        jax.ShapeDtypeStruct((r, capacity), jnp.int32),
        jax.ShapeDtypeStruct((r,), jnp.int32),
        jax.ShapeDtypeStruct((r,), jnp.int32),
        jax.ShapeDtypeStruct((r, g), jnp.float32),
    ]
    out_specs = [
        pl.BlockSpec((None, capacity), lambda i: (i, 0)),
        pl.BlockSpec((1,), lambda i: (i,)),
        pl.BlockSpec((1,), lambda i: (i,)),
        pl.BlockSpec((None, g), lambda i: (i, 0)),
    ]
    return out_shape, out_specs


def _gpu_fused_call(logits, valid, p, capacity, config, interpret):
    """logits [R, G, N] f32, valid [R, N] bool, p [R] f32 -> per-row outputs (see kernel)."""
    from jax.experimental.pallas import triton as plt

    r, g, n = logits.shape
    kernel = functools.partial(
        _gpu_fused_kernel, num_heads=g, num_cols=n, capacity=capacity, config=config
    )
    row = lambda i: (i, 0)
    if capacity is None:
        out_shape = [
            jax.ShapeDtypeStruct((r, g), jnp.float32),
            jax.ShapeDtypeStruct((r, g), jnp.int32),
            jax.ShapeDtypeStruct((r, g), jnp.float32),
        ]
        out_specs = [pl.BlockSpec((None, g), row)] * 3
    else:
        out_shape, out_specs = _gpu_select_outputs(r, g, capacity)
    block_elems = pl.next_power_of_2(g) * pl.next_power_of_2(n)
    return pl.pallas_call(
        kernel,
        grid=(r,),
        in_specs=[
            pl.BlockSpec((None, g, n), lambda i: (i, 0, 0)),
            pl.BlockSpec((None, n), row),
            pl.BlockSpec((1,), lambda i: (i,)),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plt.CompilerParams(
            num_warps=config.gpu_num_warps(block_elems), num_stages=config.num_stages
        ),
        interpret=interpret,
        name="topp_select_gpu" if capacity is not None else "topp_threshold_gpu",
    )(logits, valid, p)


def _gpu_split_call(logits, valid, p, capacity, config, interpret):
    """Same contract as ``_gpu_fused_call``: a (row, head) grid for the thresholds, then (for
    select) a row grid for the union and compaction."""
    from jax.experimental.pallas import triton as plt

    r, g, n = logits.shape
    np_ = pl.next_power_of_2(n)
    per_head = jax.ShapeDtypeStruct((r, g), jnp.float32)
    if capacity is None:
        head_shapes = [per_head, jax.ShapeDtypeStruct((r, g), jnp.int32), per_head]
    else:
        head_shapes = [per_head] * 3  # threshold, m, z
    head_kernel = functools.partial(_gpu_head_kernel, num_cols=n, capacity=capacity, config=config)
    head_out = pl.pallas_call(
        head_kernel,
        grid=(r, g),
        in_specs=[
            pl.BlockSpec((None, 1, n), lambda i, j: (i, j, 0)),
            pl.BlockSpec((None, n), lambda i, j: (i, 0)),
            pl.BlockSpec((1,), lambda i, j: (i,)),
        ],
        out_specs=[pl.BlockSpec((None, 1), lambda i, j: (i, j))] * 3,
        out_shape=head_shapes,
        compiler_params=plt.CompilerParams(
            num_warps=config.gpu_num_warps(np_), num_stages=config.num_stages
        ),
        interpret=interpret,
        name="topp_threshold_gpu" if capacity is None else "topp_head_threshold_gpu",
    )(logits, valid, p)
    if capacity is None:
        return head_out

    out_shape, out_specs = _gpu_select_outputs(r, g, capacity)
    union_kernel = functools.partial(
        _gpu_union_kernel, num_heads=g, num_cols=n, capacity=capacity, config=config
    )
    per_row = pl.BlockSpec((None, g), lambda i: (i, 0))
    return pl.pallas_call(
        union_kernel,
        grid=(r,),
        in_specs=[
            pl.BlockSpec((None, g, n), lambda i: (i, 0, 0)),
            pl.BlockSpec((None, n), lambda i: (i, 0)),
            per_row,
            per_row,
            per_row,
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plt.CompilerParams(
            num_warps=config.gpu_num_warps(pl.next_power_of_2(g) * np_),
            num_stages=config.num_stages,
        ),
        interpret=interpret,
        name="topp_select_gpu",
    )(logits, valid, *head_out)


def _xla_call(logits, valid, p, capacity, config):
    """The GPU kernels' math as XLA ops over whole [R, G, N] arrays, for rows too long to
    hold on chip; same contract and outputs as ``_gpu_split_call``. Every bisection step is a
    masked sum over N per (row, head), which XLA fuses into one pass over the logits."""
    r, g, n = logits.shape
    valid, m, z = _softmax_stats(logits, valid[:, None, :], axes=(2,))
    w = _weights_from(logits, valid, m, z)  # [R, G, N], -1 off valid
    t = _head_thresholds(w, _upper_bits(z), p[:, None, None], (2,), config.iters, n)
    kept = w >= t  # [R, G, N]
    if capacity is None:
        count = jnp.sum(kept, axis=2, dtype=jnp.int32)
        mass = jnp.sum(jnp.where(kept, w, 0.0), axis=2)
        return t[..., 0], count, mass
    union = jnp.any(kept, axis=1)  # [R, N]
    priority = jnp.where(union, jnp.max(w, axis=1), -1.0)
    n_union = jnp.sum(union, axis=1, dtype=jnp.int32)
    over = n_union > capacity

    def cumsum(mask):
        return jnp.cumsum(mask.astype(jnp.int32), axis=1)

    def limit(union):
        cut = _limit_to_capacity(union, priority, capacity, (1,), config.capacity_iters, cumsum)
        return jnp.where(over[:, None], cut, union)

    # Most batches have no row over capacity: skip the second bisection for them.
    final = jax.lax.cond(jnp.any(over), limit, lambda u: u, union)
    count = jnp.sum(final, axis=1, dtype=jnp.int32)
    col = jnp.arange(n, dtype=jnp.int32)
    slot = jnp.where(final, cumsum(final) - 1, capacity)  # capacity: out of range, dropped
    rows = jnp.arange(r, dtype=jnp.int32)[:, None]
    indices = (
        jnp.zeros((r, capacity), jnp.int32)
        .at[rows, slot]
        .set(jnp.broadcast_to(col, (r, n)), mode="drop")
    )
    mass = jnp.sum(jnp.where(final[:, None, :], w, 0.0), axis=2)
    return indices, count, over.astype(jnp.int32), mass


def _gpu_call(logits, valid, p, capacity, config, interpret):
    if logits.shape[-1] > config.gpu_max_cols:
        return _xla_call(logits, valid, p, capacity, config)
    call = _gpu_split_call if config.gpu_split else _gpu_fused_call
    return call(logits, valid, p, capacity, config, interpret)


# --------------------------------------------------------------------------------------------
# TPU (Mosaic)
# --------------------------------------------------------------------------------------------


def _tile_prefix(mask):
    """Inclusive running count of a bool [NC, 128] tile stack in row-major column order.

    Returns (within [NC, 128] f32 count inside each 128-column tile, offset [NC, 1] f32 count of
    all earlier tiles). Mosaic has no cumsum, so both are matmuls against triangular 0/1
    matrices; every operand is an integer <= 128, exact in bf16, so no matmul precision can
    round them, and the f32 accumulation is exact below 2**24.
    """
    nc = mask.shape[0]
    i = jax.lax.broadcasted_iota(jnp.int32, (_LANES, _LANES), 0)
    k = jax.lax.broadcasted_iota(jnp.int32, (_LANES, _LANES), 1)
    upper = (i <= k).astype(jnp.float32)
    within = jnp.dot(mask.astype(jnp.float32), upper, preferred_element_type=jnp.float32)
    a = jax.lax.broadcasted_iota(jnp.int32, (nc, nc), 0)
    b = jax.lax.broadcasted_iota(jnp.int32, (nc, nc), 1)
    strictly_lower = (b < a).astype(jnp.float32)
    offset = jnp.dot(strictly_lower, within[:, _LANES - 1 :], preferred_element_type=jnp.float32)
    return within, offset


def _tpu_compact(final, cap_p):
    """final bool [NC, 128] -> (indices i32 [1, cap_p] of kept columns in order, 0 past count).

    Slot s holds the column j with prefix(j) == s + 1, i.e. #{j : prefix(j) <= s}. Its tile is
    k_s = #{tiles whose last prefix <= s} (all their columns precede it); a one-hot matmul
    brings tile k_s's 128 within-tile counts to slot s, where they are counted against s.
    """
    nc = final.shape[0]
    within, offset = _tile_prefix(final)
    tile_end = within[:, _LANES - 1 :] + offset  # [NC, 1]
    slot = jax.lax.broadcasted_iota(jnp.int32, (1, cap_p), 1).astype(jnp.float32)
    tile_of_slot = jnp.sum((tile_end <= slot).astype(jnp.float32), axis=0, keepdims=True)
    tile_id = jax.lax.broadcasted_iota(jnp.int32, (nc, cap_p), 0).astype(jnp.float32)
    pick = (tile_id == tile_of_slot).astype(jnp.float32)  # [NC, cap_p]
    picked_within = jnp.dot(within.T, pick, preferred_element_type=jnp.float32)  # [128, cap_p]
    picked_offset = jnp.sum(pick * offset, axis=0, keepdims=True)  # [1, cap_p]
    in_tile = jnp.sum(
        (picked_within + picked_offset <= slot).astype(jnp.float32), axis=0, keepdims=True
    )
    column = _LANES * tile_of_slot + in_tile
    count = jnp.sum(final.astype(jnp.float32), keepdims=True)
    return jnp.where(slot < count, column, 0.0).astype(jnp.int32)


def _tpu_kernel(
    p_ref,  # [R] f32, scalar-prefetched into SMEM
    x_ref,  # [RB, G, NC, 128] f32 logits, padded with -inf
    valid_ref,  # [RB, NC, 128] i32 (0/1), padded with 0
    *out_refs,
    # select: indices [RB, 1, cap_p] i32, count [RB, 1, 1] i32, saturated [RB, 1, 1] i32,
    #         mass [RB, G, 1, 1] f32
    # threshold only: threshold, count, mass, each [RB, G, 1, 1]
    # (per-head scalars keep the [G, 1, 1] shape of keepdims reductions: no relayout)
    capacity: int | None,
    config: TopPConfig,
):
    block_rows = x_ref.shape[0]
    num_cols = x_ref.shape[2] * x_ref.shape[3]  # padded N: still bounds the valid count
    axes = (1, 2)
    first_row = pl.program_id(0) * block_rows

    def one_row(r, carry):
        x = x_ref[r]  # [G, NC, 128]
        valid = valid_ref[r] != 0  # [NC, 128]
        p = p_ref[first_row + r]
        w, hi = _weights(x, valid[None], axes)
        t = _head_thresholds(w, hi, p, axes, config.iters, num_cols)  # [G, 1, 1]
        kept = w >= t
        if capacity is None:
            threshold_ref, count_ref, mass_ref = out_refs
            threshold_ref[r] = t
            count_ref[r] = jnp.sum(kept.astype(jnp.int32), axis=axes, keepdims=True)
            mass_ref[r] = jnp.sum(jnp.where(kept, w, 0.0), axis=axes, keepdims=True)
            return carry

        indices_ref, count_ref, saturated_ref, mass_ref = out_refs
        union = jnp.max(kept.astype(jnp.int32), axis=0) > 0  # [NC, 128]
        priority = jnp.where(union, jnp.max(w, axis=0), -1.0)
        n_union = jnp.sum(union.astype(jnp.int32), keepdims=True)  # [1, 1]

        def prefix(mask):
            within, offset = _tile_prefix(mask)
            return (within + offset).astype(jnp.int32)

        limited = _limit_to_capacity(
            union, priority, capacity, (0, 1), config.capacity_iters, prefix
        )
        saturated = n_union > capacity
        final = jnp.where(saturated, limited, union)
        indices_ref[r] = _tpu_compact(final, indices_ref.shape[-1])
        count_ref[r] = jnp.sum(final.astype(jnp.int32), keepdims=True)
        saturated_ref[r] = saturated.astype(jnp.int32)
        mass_ref[r] = jnp.sum(jnp.where(final[None], w, 0.0), axis=axes, keepdims=True)
        return carry

    jax.lax.fori_loop(0, block_rows, one_row, 0)


def _tpu_call(logits, valid, p, capacity, config, interpret):
    """logits [R, G, N] f32, valid [R, N] bool, p [R] f32 -> per-row outputs (see kernel)."""
    from jax.experimental.pallas import tpu as pltpu

    r, g, n = logits.shape
    nc = pl.cdiv(n, _LANES)
    pad = nc * _LANES - n
    # Free reshapes when N is a multiple of 128; otherwise one padding copy.
    x = jnp.pad(logits, ((0, 0), (0, 0), (0, pad)), constant_values=-jnp.inf)
    x = x.reshape(r, g, nc, _LANES)
    v = jnp.pad(valid, ((0, 0), (0, pad))).astype(jnp.int32).reshape(r, nc, _LANES)
    rb = config.tpu_block_rows if r % config.tpu_block_rows == 0 else 1

    def rows(*tail):
        return lambda i, p_smem: (i, *tail)

    if capacity is None:
        out_shape = [
            jax.ShapeDtypeStruct((r, g, 1, 1), jnp.float32),
            jax.ShapeDtypeStruct((r, g, 1, 1), jnp.int32),
            jax.ShapeDtypeStruct((r, g, 1, 1), jnp.float32),
        ]
        out_specs = [pl.BlockSpec((rb, g, 1, 1), rows(0, 0, 0))] * 3
    else:
        cap_p = pl.cdiv(capacity, _LANES) * _LANES
        out_shape = [
            jax.ShapeDtypeStruct((r, 1, cap_p), jnp.int32),
            jax.ShapeDtypeStruct((r, 1, 1), jnp.int32),
            jax.ShapeDtypeStruct((r, 1, 1), jnp.int32),
            jax.ShapeDtypeStruct((r, g, 1, 1), jnp.float32),
        ]
        out_specs = [
            pl.BlockSpec((rb, 1, cap_p), rows(0, 0)),
            pl.BlockSpec((rb, 1, 1), rows(0, 0)),
            pl.BlockSpec((rb, 1, 1), rows(0, 0)),
            pl.BlockSpec((rb, g, 1, 1), rows(0, 0, 0)),
        ]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(r // rb,),
        in_specs=[
            pl.BlockSpec((rb, g, nc, _LANES), rows(0, 0, 0)),
            pl.BlockSpec((rb, nc, _LANES), rows(0, 0)),
        ],
        out_specs=out_specs,
    )
    kernel = functools.partial(_tpu_kernel, capacity=capacity, config=config)
    outs = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=_common.tpu_interpret(interpret),
        name="topp_select_tpu" if capacity is not None else "topp_threshold_tpu",
    )(p, x, v)
    if capacity is None:
        return tuple(o[..., 0, 0] for o in outs)
    indices, count, saturated, mass = outs
    return indices[:, 0, :capacity], count[:, 0, 0], saturated[:, 0, 0], mass[..., 0, 0]


# --------------------------------------------------------------------------------------------
# Implementations with the public signatures, and dispatch
# --------------------------------------------------------------------------------------------


def _call(impl, logits, valid, p, capacity, config, interpret):
    r = logits.shape[0]
    p = jnp.broadcast_to(jnp.asarray(p, jnp.float32), (r,))
    call = _gpu_call if impl == "gpu" else _tpu_call
    return call(logits, valid, p, capacity, config, interpret)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def topp_threshold_gpu(logits, valid, p, *, config=TopPConfig(), interpret=False):
    """Pallas GPU ``topp_threshold``. logits [R, N] f32, valid [R, N] bool, p [R] or scalar."""
    t, count, mass = _call("gpu", logits[:, None, :], valid, p, None, config, interpret)
    return t[:, 0], count[:, 0], mass[:, 0]


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def topp_threshold_tpu(logits, valid, p, *, config=TopPConfig(), interpret=False):
    """Pallas TPU ``topp_threshold``. logits [R, N] f32, valid [R, N] bool, p [R] or scalar."""
    t, count, mass = _call("tpu", logits[:, None, :], valid, p, None, config, interpret)
    return t[:, 0], count[:, 0], mass[:, 0]


@functools.partial(jax.jit, static_argnames=("capacity", "config", "interpret"))
def topp_select_grouped_gpu(logits, valid, p, capacity, *, config=TopPConfig(), interpret=False):
    """Pallas GPU ``topp_select_grouped``. logits [R, G, N] f32, valid [R, N] bool, p [R]."""
    indices, count, saturated, mass = _call("gpu", logits, valid, p, capacity, config, interpret)
    return indices, count, saturated != 0, mass


@functools.partial(jax.jit, static_argnames=("capacity", "config", "interpret"))
def topp_select_grouped_tpu(logits, valid, p, capacity, *, config=TopPConfig(), interpret=False):
    """Pallas TPU ``topp_select_grouped``. logits [R, G, N] f32, valid [R, N] bool, p [R]."""
    indices, count, saturated, mass = _call("tpu", logits, valid, p, capacity, config, interpret)
    return indices, count, saturated != 0, mass


def topp_select_gpu(logits, valid, p, capacity, *, config=TopPConfig(), interpret=False):
    """Pallas GPU ``topp_select``: ``topp_select_grouped_gpu`` with G = 1."""
    out = topp_select_grouped_gpu(
        logits[:, None, :], valid, p, capacity, config=config, interpret=interpret
    )
    return out[:3]


def topp_select_tpu(logits, valid, p, capacity, *, config=TopPConfig(), interpret=False):
    """Pallas TPU ``topp_select``: ``topp_select_grouped_tpu`` with G = 1."""
    out = topp_select_grouped_tpu(
        logits[:, None, :], valid, p, capacity, config=config, interpret=interpret
    )
    return out[:3]


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
    if shape not in ((), (rows,)):
        raise ValueError(f"p must be a scalar or have shape ({rows},) (one per row), got {shape}")
    if not jnp.issubdtype(jnp.result_type(p), jnp.floating):
        raise ValueError(f"p must have a floating dtype, got {jnp.result_type(p)}")
    if not isinstance(p, jax.core.Tracer):
        values = np.asarray(p, np.float64)
        bad = values[~((values > 0.0) & (values <= 1.0))]
        if bad.size:
            raise ValueError(f"p must be in (0, 1], got {bad.ravel()[0]} among its values")


def _check_common(logits, valid, p, capacity, config, layout: str) -> None:
    rank = 3 if layout.startswith("[R, G") else 2
    _common.check_rank("logits", logits, rank, layout)
    _common.check_dtype("logits", logits, (jnp.float32,))
    r, n = np.shape(logits)[0], np.shape(logits)[-1]
    if r == 0 or n == 0 or (rank == 3 and np.shape(logits)[1] == 0):
        raise ValueError(f"logits must be non-empty, got shape {tuple(np.shape(logits))}")
    _common.check_rank("valid", valid, 2, "[R, N]")
    _common.check_dtype("valid", valid, (jnp.bool_,))
    _common.check_dim("valid", valid, 0, r, "rows R of logits")
    _common.check_dim("valid", valid, 1, n, "columns N of logits")
    _check_p(p, r)
    if capacity is not None and (
        isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1
    ):
        raise ValueError(f"capacity must be a static int >= 1, got {capacity!r}")
    if not isinstance(config, TopPConfig):
        raise ValueError(f"config must be a TopPConfig, got {type(config).__name__}")


# --------------------------------------------------------------------------------------------
# Public entries
# --------------------------------------------------------------------------------------------


def topp_threshold(logits, valid, p, *, iters=None, backend="auto", config=None):
    """Per-row top-p threshold by fixed-iteration bisection.

    Args:
      logits: [R, N] float32 estimated logits.
      valid: [R, N] bool; weights are a softmax over the valid entries only.
      p: Python float in (0, 1], or [R] (or scalar) float array, may be traced.
      iters: bisection steps; overrides ``config.iters`` (default 16, conservative; 30 is
        exact).
      backend: "auto" | "pallas" | "pallas_gpu" | "pallas_tpu" | "reference".
      config: TopPConfig (None: defaults).

    Returns:
      threshold: [R] float32, the largest t in [0, max w] with sum_{w >= t} w >= p (0 when
        p >= 1 or the row has no valid entry).
      count: [R] int32, #{valid, w >= t}.
      mass: [R] float32, sum of those weights.
    """
    config = TopPConfig() if config is None else config
    _check_common(logits, valid, p, None, config, "[R, N]")
    if iters is not None:
        config = dataclasses.replace(config, iters=iters)
    impl, interpret = _common.resolve_backend(backend)
    if impl == "reference":
        return topp_threshold_reference(logits, valid, p)
    fn = topp_threshold_gpu if impl == "gpu" else topp_threshold_tpu
    return fn(logits, valid, p, config=config, interpret=interpret)


def topp_select_grouped(logits, valid, p, capacity, *, backend="auto", config=None):
    """Union of per-head top-p sets for heads sharing one selection, compacted.

    Args:
      logits: [R, G, N] float32; G heads (e.g. the query heads of a KV group) per row.
      valid: [R, N] bool, shared by the G heads.
      p: Python float in (0, 1], or [R] (or scalar) float array, may be traced.
      capacity: static int >= 1, the selection capacity.
      backend: "auto" | "pallas" | "pallas_gpu" | "pallas_tpu" | "reference".
      config: TopPConfig (None: defaults).

    Returns:
      indices: [R, capacity] int32 kept columns in ascending order; slots >= counts hold 0.
      counts: [R] int32 number of kept columns (<= capacity).
      saturated: [R] bool, the union exceeded capacity and was cut to the `capacity` columns
        with the highest max_g w (ties towards lower columns).
      mass: [R, G] float32, head g's weight on the final selection.
    """
    config = TopPConfig() if config is None else config
    _check_common(logits, valid, p, capacity, config, "[R, G, N]")
    capacity = int(capacity)
    impl, interpret = _common.resolve_backend(backend)
    if impl == "reference":
        return topp_select_grouped_reference(logits, valid, p, capacity)
    fn = topp_select_grouped_gpu if impl == "gpu" else topp_select_grouped_tpu
    return fn(logits, valid, p, capacity, config=config, interpret=interpret)


def topp_select(logits, valid, p, capacity, *, backend="auto", config=None):
    """Top-p selection per row, compacted to a static capacity.

    Args:
      logits: [R, N] float32.
      valid: [R, N] bool.
      p: Python float in (0, 1], or [R] (or scalar) float array, may be traced.
      capacity: static int >= 1.
      backend, config: as ``topp_select_grouped``.

    Returns:
      indices: [R, capacity] int32 kept columns in ascending order; slots >= counts hold 0.
      counts: [R] int32 (<= capacity).
      saturated: [R] bool, the top-p set exceeded capacity and the highest weights were kept.
    """
    config = TopPConfig() if config is None else config
    _check_common(logits, valid, p, capacity, config, "[R, N]")
    capacity = int(capacity)
    impl, interpret = _common.resolve_backend(backend)
    if impl == "reference":
        return topp_select_reference(logits, valid, p, capacity)
    fn = topp_select_gpu if impl == "gpu" else topp_select_tpu
    return fn(logits, valid, p, capacity, config=config, interpret=interpret)

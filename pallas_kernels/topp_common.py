"""What the top-p kernels share: their configs (one table of tuned defaults) and the search.

The search is jnp on values, run inside the GPU kernels (topp_gpu), the TPU kernel (topp_tpu)
and the GPU path for long rows (plain XLA ops); the semantics it implements are in the
docstring of pallas_kernels.topp. Arrays are [heads, *row] where the row is [Np] (GPU) or
[NC, 128] (TPU); `axes` are the row axes, reduced with keepdims so results broadcast back.
Invalid entries carry weight -1: every threshold is >= 0, so they never pass a comparison and
no separate mask has to stay live.

Thresholds are bisected on their IEEE-754 bit pattern: for non-negative floats the int32 bit
pattern orders exactly like the value, so halving the integer interval [0, bits(max w)] finds
the exact answer in at most 30 steps (bits(1.0) < 2**30) whatever the dynamic range of the
weights, where halving the value interval would need ~150 steps to resolve a weight of 1e-40.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common

# Bit pattern of 1.0f: weights never exceed 1, so [0, _ONE_BITS] brackets every threshold and
# 30 halvings of that interval are exact.
_ONE_BITS = 0x3F800000
EXACT_ITERS = 30


# Tuned defaults (H200, batch 64, 32K context: 512 rows of 4 heads x 8192 candidates, p = 0.85,
# capacity 2048; the alternatives and their times: docs/results/kernels-sweep{,2,4,6}-h200.*):
#   iters 16: 197-204 us; conservative, and exact unless two or more weights fall in the final
#       band (the exact 30 steps cost about 15% more).
#   capacity_iters 30: exact; the capacity bisection runs only for rows that overflow.
#   GPU num_warps None: about 32 row elements a thread, clamped to [4, 16].
#   GPU max_cols 32768: rows must fit on chip for the row-resident pair (at 131072 columns its
#       Triton compile alone takes minutes); longer rows take the compacting kernel.
#   GPU compact_min_rows 512, chunk_cols 1024: the compacting kernel (with its narrowing) beats
#       the row-resident pair from 512 rows (and on Twilight over all's 32768-column rows);
#       below that the pair wins in the decode step, whose rows are less peaked than the op
#       benchmark's (docs/decode_step.md, "2026-12-05"; chunk widths:
#       docs/results/session-2026-12-04e/sweep-topp-compact.md).
#   GPU narrow_after 2: against 0 (never) in the op, on the planted rows of the attention
#       benchmark (docs/results/session-2026-12-04f/narrow-*.md and .log); 1 and 3 no faster
#       over Quest, 1 slower over all (docs/results/session-2026-12-04g/probe.log).
#   TPU: the same iters; block_rows 8 not measured.


@dataclasses.dataclass(frozen=True)
class _Search:
    """The bisection step counts, shared by both kinds of config.

    iters: bisection steps (bits of the threshold's bit pattern) for each head's top-p
      threshold; 30 (EXACT_ITERS) is exact. Fewer is conservative (never keeps less mass than
      p) and, after the final snap to the heaviest weight in the unresolved band, exact
      whenever that band holds one weight; 16 leaves a band about 2**-11 of t wide.
    capacity_iters: bisection steps for the priority cut when a selection overflows capacity;
      30 is exact; fewer still keep exactly ``capacity`` entries, but those in the unresolved
      band of priorities just above the cut are taken by column order, not by weight.
    """

    iters: int = 16
    capacity_iters: int = EXACT_ITERS

    def __post_init__(self):
        for name in ("iters", "capacity_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
                raise ValueError(
                    f"{type(self).__name__}.{name} must be an int in [1, 64], got {value!r}"
                )


@dataclasses.dataclass(frozen=True)
class TopPGpuConfig(_Search):
    """Static knobs of the GPU top-p kernels (hashable: usable as a static jit argument).

    iters, capacity_iters: see ``_Search``.
    num_warps: warps per program; None picks about 32 row elements per thread, clamped to
      [4, 16], so the resident row fits in registers.
    max_cols: the longest row the row-resident kernels take. Longer rows: selections run the
      compacting kernel, thresholds (topp_threshold) the same bisections as XLA ops (about one
      pass over the logits per bisection step).
    compact_min_rows: selections of at least this many rows run the compacting kernel (one
      program a row looping over tiles, searching only the entries that can matter; topp_gpu)
      whatever their length; fewer rows of at most max_cols run the row-resident pair (a
      threshold kernel a (row, head), then a union kernel a row), whose programs take less
      time each: the compacting kernel's loop of dependent loads wins only once enough rows
      hide its latency.
    chunk_cols: the compacting kernel's tile width in columns, a power of two >= 16.
    narrow_after: bisection steps after which the compacting kernel compacts its entries
      again, keeping only those at or above the search's bracket (no later step, nor the
      union, looks below it): in peaked rows the first steps lift the bracket past the noise,
      and the remaining steps read a few entries instead of every one above the search's
      lower bound. 0 (or iters and more) never compacts again.
    """

    num_warps: int | None = None
    max_cols: int = 32768
    compact_min_rows: int = 512
    chunk_cols: int = 1024
    narrow_after: int = 2

    def __post_init__(self):
        super().__post_init__()
        if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(
                "TopPGpuConfig.num_warps must be None or a power of two <= 32, "
                f"got {self.num_warps!r}"
            )
        if isinstance(self.max_cols, bool) or not isinstance(self.max_cols, int):
            raise ValueError(f"TopPGpuConfig.max_cols must be an int >= 1, got {self.max_cols!r}")
        if self.max_cols < 1:
            raise ValueError(f"TopPGpuConfig.max_cols must be an int >= 1, got {self.max_cols!r}")
        _common.check_positive("TopPGpuConfig", "compact_min_rows", self.compact_min_rows)
        _common.check_pow2("TopPGpuConfig", "chunk_cols", self.chunk_cols, minimum=16)
        k = self.narrow_after
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"TopPGpuConfig.narrow_after must be an int >= 0, got {k!r}")

    def warps_for(self, block_elems: int) -> int:
        """num_warps, or the automatic choice for a program holding block_elems values."""
        if self.num_warps is not None:
            return self.num_warps
        return int(min(16, max(4, pl.next_power_of_2(max(1, block_elems // 1024)))))


@dataclasses.dataclass(frozen=True)
class TopPTpuConfig(_Search):
    """Static knobs of the TPU top-p kernel (hashable: usable as a static jit argument).

    iters, capacity_iters: see ``_Search``.
    block_rows: rows per grid step when it divides R (else one row per step).
    """

    block_rows: int = 8

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.block_rows, bool) or not isinstance(self.block_rows, int):
            raise ValueError(
                f"TopPTpuConfig.block_rows must be an int >= 1, got {self.block_rows!r}"
            )
        if self.block_rows < 1:
            raise ValueError(
                f"TopPTpuConfig.block_rows must be an int >= 1, got {self.block_rows!r}"
            )


# --------------------------------------------------------------------------------------------
# The search


def softmax_stats(x, valid, axes):
    """x [H, *row] f32, valid broadcastable bool -> (valid [H, *row], max m, sum z [H, 1...]).

    A valid entry with logit -inf counts as invalid (weight exactly 0).
    """
    valid = valid & (x > -jnp.inf)
    m = jnp.max(jnp.where(valid, x, -jnp.inf), axis=axes, keepdims=True)
    m = jnp.where(m > -jnp.inf, m, 0.0)
    z = jnp.sum(jnp.where(valid, jnp.exp(x - m), 0.0), axis=axes, keepdims=True)
    return valid, m, z


def weights_from(x, valid, m, z):
    """w [H, *row], -1 off valid. The GPU select kernel recomputes w from the threshold
    kernel's m and z with this same expression, so both see bit-identical weights."""
    return jnp.where(valid, jnp.exp(x - m) / z, -1.0)


def weights(x, valid, axes):
    """x [H, *row] f32, valid broadcastable bool -> (w [H, *row] with -1 off valid, hi bits)."""
    valid, m, z = softmax_stats(x, valid, axes)
    return weights_from(x, valid, m, z), upper_bits(z)


def upper_bits(z):
    """Bit pattern just above max w = exp(0) / z = 1 / z: no threshold there reaches p > 0."""
    return jnp.where(z > 0, jax.lax.bitcast_convert_type(1.0 / z, jnp.int32) + 1, 1)


def lower_bits(p, hi, num_cols: int):
    """A bit pattern known to reach p, so the search can start above 0.

    The entries below the exact threshold t sum to more than 1 - p, and there are fewer than
    num_cols of them, so t > (1 - p) / num_cols; at half that, the kept mass is at least
    (1 + p) / 2, a margin of (1 - p) / 2 over p. That margin dwarfs the float error of the sum
    only while 1 - p is not tiny, hence the cut-off; above it the search starts at 0. Starting
    near t skips most of the exponent range: 30 steps still end exact, and fewer steps resolve
    more mantissa bits. No step of the search or of the snap looks at a weight below this
    bound, so the entries under it can be dropped before the search.
    """
    # Broadcast before the bitcast: on TPU p is an SMEM scalar, the bitcast wants a vector.
    bound = jnp.broadcast_to((1.0 - p) * (0.5 / num_cols), hi.shape)
    lo = jnp.where(p <= 1.0 - 2.0**-10, jax.lax.bitcast_convert_type(bound, jnp.int32), 0)
    return jnp.clip(lo, 0, hi - 1)


def _bisect(passes, lo, hi, iters):
    """Brackets the largest float t >= 0 with passes(t), per head, by its bit pattern.

    lo, hi: int32 [H, 1...], bit patterns known to pass (lo: assumed, never evaluated) and to
    fail (or the end of the range). passes maps an f32 [H, 1...] threshold to a bool of the
    same shape and must be monotone (true up to the answer, false above). Returns (lo, hi) as
    floats: passes(lo), not passes(hi) (unless hi is the initial bound); after 30 steps on a
    range within [0, 2**30) they are adjacent floats, so lo is the answer.
    """
    lo, hi = _common.bisect_bits(lambda bits: passes(as_float(bits)), lo, hi, iters)
    return as_float(lo), as_float(hi)


def as_float(bits):
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def search_threshold(mass_at_least, band_top, lo, hi, p, iters, narrow=None):
    """Per-head top-p threshold [H, 1...] from two reductions over the weights, so the same
    search runs over a resident block or a loop over chunks.

    mass_at_least(t): the sum of the weights >= t, per head; band_top(lo, hi): the largest
    weight in [lo, hi) per head, -1 if none. lo, hi: int32 bit patterns, lower_bits and
    upper_bits. p >= 1 leaves t = 0 (every valid entry). narrow: None, or (k, fn), k static:
    when 0 < k < iters, after k bisection steps fn(lo) runs, lo the bracket's lower end as
    floats [H, 1...]; from then on mass_at_least and band_top are only asked about weights
    >= lo, so fn may drop every entry below it (the compacting kernel does).

    The bisection ends with a bracket [lo, hi) of the threshold (lo reaches p, hi does not).
    The snap: the exact threshold is a weight in [lo, hi); if the heaviest weight there, b,
    still reaches p, nothing lies between b and hi, so b is the exact threshold; otherwise lo
    stays (conservative). After an exact bisection this returns lo; after a short one it is
    exact whenever the band holds a single weight.
    """
    target = jnp.where(p >= 1.0, jnp.inf, p)

    def passes(t):
        return mass_at_least(t) >= target

    if narrow is not None and 0 < narrow[0] < iters:
        k, fn = narrow
        lo, hi = _common.bisect_bits(lambda bits: passes(as_float(bits)), lo, hi, k)
        fn(as_float(lo))
        iters -= k
    lo, hi = _bisect(passes, lo, hi, iters)
    band = band_top(lo, hi)
    ok = (band >= lo) & (mass_at_least(band) >= target)
    return jnp.where(ok, band, lo)


def head_thresholds(w, hi, p, axes, iters, num_cols):
    """Per-head top-p threshold [H, 1...] of resident weights w [H, *row]."""

    def mass_at_least(t):
        return jnp.sum(jnp.where(w >= t, w, 0.0), axis=axes, keepdims=True)

    def band_top(lo, hi):
        return jnp.max(jnp.where((w >= lo) & (w < hi), w, -1.0), axis=axes, keepdims=True)

    lo = lower_bits(p, hi, num_cols)
    return search_threshold(mass_at_least, band_top, lo, hi, p, iters)


def p_operand(p, rows: int):
    """p as the kernels read it: ([S] float32, rows_per): row r takes p[r // rows_per].

    p: a scalar (S = 1), [R], or [S] with S dividing R (one p per group of R / S consecutive
    rows, e.g. per sequence over its KV heads' rows): no [R] copy is made."""
    p = jnp.asarray(p, jnp.float32).reshape(-1)
    return p, rows // p.shape[0]


def p_rows(p, rows: int):
    """p as one float32 value per row, [R] (see p_operand)."""
    p, rows_per = p_operand(p, rows)
    return jnp.repeat(p, rows_per) if rows_per > 1 else p


def columns_to_positions(indices, counts, blocks, block_size: int):
    """What a selection with block ids returns, from its kept columns: indices [R, K] int32
    (kept columns below counts [R]) -> blocks[r, c // block_size] * block_size +
    c % block_size below the counts, 0 after; blocks [R, C] int32. The GPU kernels store the
    same values directly."""
    blk = jnp.take_along_axis(blocks, indices // block_size, axis=1, mode="clip")
    pos = blk * block_size + indices % block_size
    return jnp.where(jnp.arange(indices.shape[1]) < counts[:, None], pos, 0).astype(jnp.int32)


def kept_mass(w, final, axes):
    """Each head's weight on the final selection: w (-1 off valid) summed where final holds.
    A column another head keeps can be invalid for this one (its logit -inf): it adds 0, not
    the -1 that marks it."""
    return jnp.sum(jnp.where(final, jnp.maximum(w, 0.0), 0.0), axis=axes, keepdims=True)


def capacity_cut(count_at_least, capacity, iters, shape):
    """Bracket [lo, hi) of the priority cut: fewer than ``capacity`` priorities are >= hi and
    at least ``capacity`` are >= lo (exact after 30 steps: only priority == lo in the band).
    count_at_least(t) counts the priorities >= t; shape: one bracket per reduced slice; iters
    may be traced (0 leaves the whole range)."""
    # Priorities never exceed 1, so 1.0 + 1 ulp holds none: count < capacity there.
    hi = jnp.full(shape, _ONE_BITS + 1, jnp.int32)
    return _bisect(lambda t: count_at_least(t) >= capacity, jnp.zeros_like(hi), hi, iters)


def limit_to_capacity(union, priority, capacity, axes, iters, inclusive_prefix):
    """Keeps the `capacity` union entries of highest priority (ties: lower columns first).

    union bool [*row]; priority f32 [*row] (-1 off the union); inclusive_prefix(bool) -> int32
    running count in column order. Called only when the union holds more than `capacity`.
    """
    ones = functools.partial(jnp.sum, axis=axes, keepdims=True, dtype=jnp.int32)
    # One bracket per reduced slice: (1,...) for a row.
    shape = tuple(1 if i in axes else d for i, d in enumerate(union.shape))
    lo, hi = capacity_cut(lambda t: ones(priority >= t), capacity, iters, shape)
    # >= hi: fewer than `capacity` entries, all kept; [lo, hi): enough to fill the rest, taken
    # in column order. Exact bisection leaves only priority == lo in the band (ties).
    above = priority >= hi
    band = union & (priority >= lo) & ~above
    room = capacity - ones(above)
    return above | (band & (inclusive_prefix(band) <= room))

"""Top-p on GPU: Pallas Triton kernels, and the same search as XLA ops for rows too long.

Semantics: pallas_kernels.topp. A (row, head) grid finds each head's threshold (its [N]
logits resident in registers, padded to a power of two with masked loads; the bisection is
masked sums over the resident block); for selection, a row grid then re-reads the row's [G, N]
logits (mostly from L2), recomputes the weights from the first kernel's row max and softmax
sum, forms the union and compacts it: an on-chip cumsum gives each kept column its output
slot, then one masked scatter store. The capacity bisection runs only for rows that overflow.

Rows longer than TopPGpuConfig.max_cols skip the kernels (a row must fit on chip) and run the
same math as plain XLA ops over [R, G, N] (one fused pass over the logits per bisection step),
with the kernels' results.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import topp_common as tc
from pallas_kernels.topp_common import TopPGpuConfig

DEFAULT_CONFIG = TopPGpuConfig()


def _gpu_load_row(x_ref, valid_ref, num_heads, num_cols):
    """Loads one row padded to powers of two (Triton blocks must be): x [Gp, Np] with -inf
    padding, valid [1, Np] with False padding (so padding is invalid)."""
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
    indices_ref, count_ref, saturated_ref, mass_ref = out_refs
    gp, np_ = w.shape
    col = jnp.arange(np_, dtype=jnp.int32)
    union = jnp.max(kept.astype(jnp.int32), axis=0) > 0  # [Np]
    priority = jnp.where(union, jnp.max(w, axis=0), -1.0)
    n_union = jnp.sum(union, dtype=jnp.int32)

    def cumsum(mask):
        return jnp.cumsum(mask.astype(jnp.int32), axis=0)

    def limit(union):
        return tc.limit_to_capacity(union, priority, capacity, (0,), config.capacity_iters, cumsum)

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


def _gpu_head_kernel(
    x_ref,  # [1, N] f32 logits of one head of one row
    valid_ref,  # [N] bool
    p_ref,  # [1] f32
    *out_refs,
    # threshold only: threshold [1] f32, count [1] i32, mass [1] f32
    # select (stats for the union kernel): threshold [1] f32, row max m [1], sum z [1] f32
    num_cols: int,
    capacity: int | None,
    config: TopPGpuConfig,
):
    """First kernel: one head's threshold per program (and, for select, its softmax stats)."""
    x, valid = _gpu_load_row(x_ref, valid_ref, 1, num_cols)  # [1, Np] each
    valid, m, z = tc.softmax_stats(x, valid, axes=(1,))  # m, z [1, 1]
    w = tc.weights_from(x, valid, m, z)  # [1, Np]
    t = tc.head_thresholds(w, tc.upper_bits(z), p_ref[0], (1,), config.iters, num_cols)  # [1, 1]
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
    config: TopPGpuConfig,
):
    """Second kernel (select): union of the G heads' sets, capacity cut, compaction.

    Recomputes w with the first kernel's m and z through the same expression, so `w >= t`
    selects exactly the entries that kernel counted.
    """
    x, valid = _gpu_load_row(x_ref, valid_ref, num_heads, num_cols)  # [Gp, Np], [1, Np]
    gp = x.shape[0]
    heads = pl.ds(0, gp)
    head_ok = jnp.arange(gp, dtype=jnp.int32) < num_heads
    # Padding heads: x = -inf makes them invalid (w = -1), and -1 never reaches t >= 0.
    t = plt.load(t_ref.at[heads], mask=head_ok, other=0.0)[:, None]
    m = plt.load(m_ref.at[heads], mask=head_ok, other=0.0)[:, None]
    z = plt.load(z_ref.at[heads], mask=head_ok, other=1.0)[:, None]
    w = tc.weights_from(x, valid & (x > -jnp.inf), m, z)
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


def _kernels_call(logits, valid, p, capacity, config, interpret):
    """logits [R, G, N] f32, valid [R, N] bool, p [R] f32 -> per-row outputs: a (row, head)
    grid for the thresholds, then (for select) a row grid for the union and compaction.

    threshold (capacity None): threshold, count, mass, each [R, G].
    select: indices [R, capacity] i32, count [R] i32, saturated [R] i32, mass [R, G] f32.
    """
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
        compiler_params=plt.CompilerParams(num_warps=config.warps_for(np_), num_stages=1),
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
            num_warps=config.warps_for(pl.next_power_of_2(g) * np_), num_stages=1
        ),
        interpret=interpret,
        name="topp_select_gpu",
    )(logits, valid, *head_out)


def _xla_call(logits, valid, p, capacity, config):
    """The GPU kernels' math as XLA ops over whole [R, G, N] arrays, for rows too long to
    hold on chip; same contract and outputs as ``_kernels_call``. Every bisection step is a
    masked sum over N per (row, head), which XLA fuses into one pass over the logits."""
    r, g, n = logits.shape
    valid, m, z = tc.softmax_stats(logits, valid[:, None, :], axes=(2,))
    w = tc.weights_from(logits, valid, m, z)  # [R, G, N], -1 off valid
    t = tc.head_thresholds(w, tc.upper_bits(z), p[:, None, None], (2,), config.iters, n)
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
        cut = tc.limit_to_capacity(union, priority, capacity, (1,), config.capacity_iters, cumsum)
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


def _call(logits, valid, p, capacity, config, interpret):
    p = jnp.broadcast_to(jnp.asarray(p, jnp.float32), logits.shape[:1])
    if logits.shape[-1] > config.max_cols:
        return _xla_call(logits, valid, p, capacity, config)
    return _kernels_call(logits, valid, p, capacity, config, interpret)


# --------------------------------------------------------------------------------------------
# The GPU implementations of the public entries (arguments checked by pallas_kernels.topp)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def topp_threshold_gpu(logits, valid, p, *, config=DEFAULT_CONFIG, interpret=False):
    """Pallas GPU ``topp_threshold``. logits [R, N] f32, valid [R, N] bool, p [R] or scalar."""
    t, count, mass = _call(logits[:, None, :], valid, p, None, config, interpret)
    return t[:, 0], count[:, 0], mass[:, 0]


@functools.partial(jax.jit, static_argnames=("capacity", "config", "interpret"))
def topp_select_grouped_gpu(logits, valid, p, capacity, *, config=DEFAULT_CONFIG, interpret=False):
    """Pallas GPU ``topp_select_grouped``. logits [R, G, N] f32, valid [R, N] bool, p [R]."""
    indices, count, saturated, mass = _call(logits, valid, p, capacity, config, interpret)
    return indices, count, saturated != 0, mass


def topp_select_gpu(logits, valid, p, capacity, *, config=DEFAULT_CONFIG, interpret=False):
    """Pallas GPU ``topp_select``: ``topp_select_grouped_gpu`` with G = 1."""
    out = topp_select_grouped_gpu(
        logits[:, None, :], valid, p, capacity, config=config, interpret=interpret
    )
    return out[:3]

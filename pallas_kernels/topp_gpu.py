"""Top-p on GPU: Pallas Triton kernels (and, for thresholds of rows too long, XLA ops).

Semantics: pallas_kernels.topp. Two forms of selection, chosen by TopPGpuConfig:

Row-resident pair (few rows, rows of at most max_cols): a (row, head) grid finds each head's
threshold (its [N] logits resident in registers, padded to a power of two with masked loads;
the bisection is masked sums over the resident block); a row grid then re-reads the row's
[G, N] logits (mostly from L2), recomputes the weights from the first kernel's row max and
softmax sum, forms the union and compacts it: an on-chip cumsum gives each kept column its
output slot, then one masked scatter store. The capacity bisection runs only for rows that
overflow.

Compacting kernel (many rows, or longer rows): one program a row, looping over [G, chunk]
tiles, so no row has to fit on chip; see _compact_call.

Thresholds alone (topp_threshold) of rows longer than max_cols run the same math as plain XLA
ops over [R, N] (one fused pass over the logits per bisection step).
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


def _optional_operands(kernel, *optional):
    """The kernel as pallas_call calls it: the optional operands after the logits (valid, then
    for the select kernels blocks) are not operands when None, and the kernel gets None for
    their refs."""

    def call(x_ref, *refs):
        refs = list(refs)
        given = [None if x is None else refs.pop(0) for x in optional]
        return kernel(x_ref, *given, *refs)

    return call


def _positions(cols, blocks_ref, block_size, mask):
    """Kept columns -> what the selection returns: the columns themselves (blocks_ref None), or
    blocks[c // block_size] * block_size + c % block_size (loaded where mask holds)."""
    if blocks_ref is None:
        return cols
    num_blocks = blocks_ref.shape[0]
    blk = jnp.minimum(jax.lax.div(cols, block_size), num_blocks - 1)
    return plt.load(blocks_ref.at[blk], mask=mask, other=0) * block_size + jax.lax.rem(
        cols, block_size
    )


def _gpu_load_row(x_ref, valid_ref, num_heads, num_cols):
    """Loads one row padded to powers of two (Triton blocks must be): x [Gp, Np] with -inf
    padding, valid [1, Np] with False padding (so padding is invalid); valid_ref None: every
    column of the row."""
    gp, np_ = pl.next_power_of_2(num_heads), pl.next_power_of_2(num_cols)
    head = jnp.arange(gp, dtype=jnp.int32)
    col = jnp.arange(np_, dtype=jnp.int32)
    x = plt.load(
        x_ref.at[pl.ds(0, gp), pl.ds(0, np_)],
        mask=(head[:, None] < num_heads) & (col[None, :] < num_cols),
        other=-jnp.inf,
    )
    if valid_ref is None:
        return x, (col < num_cols)[None, :]
    valid = plt.load(valid_ref.at[pl.ds(0, np_)], mask=col < num_cols, other=False)
    return x, valid[None, :]


def _gpu_select_store(w, kept, out_refs, num_heads, capacity, config, blocks_ref, block_size):
    """Union of the heads' kept sets, capacity limit, compaction and stores (one row).

    w [Gp, Np] f32 (-1 off valid and on padding heads), kept [Gp, Np] bool; out_refs: indices
    [capacity] i32, count [1] i32, saturated [1] i32, mass [G] f32; blocks_ref None or the
    row's [C] block ids (the indices stored are then positions, see _positions).
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
    stored = final & (slot < capacity)
    plt.store(indices_ref.at[slot], _positions(col, blocks_ref, block_size, stored), mask=stored)
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
    mass = tc.kept_mass(w, final[None, :], (1,))[:, 0]
    head = jnp.arange(gp, dtype=jnp.int32)
    plt.store(mass_ref.at[pl.ds(0, gp)], mass, mask=head < num_heads)


def _gpu_head_kernel(
    x_ref,  # [1, N] f32 logits of one head of one row
    valid_ref,  # [N] bool, or None: every column
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
    valid_ref,  # [N] bool, or None: every column
    blocks_ref,  # [C] i32 block ids of the row's columns, or None: indices are columns
    t_ref,  # [G] f32 thresholds from _gpu_head_kernel
    m_ref,  # [G] f32 row maxima from _gpu_head_kernel
    z_ref,  # [G] f32 softmax sums from _gpu_head_kernel
    *out_refs,  # indices [capacity] i32, count [1] i32, saturated [1] i32, mass [G] f32
    num_heads: int,
    num_cols: int,
    capacity: int,
    config: TopPGpuConfig,
    block_size: int,
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
    _gpu_select_store(w, w >= t, out_refs, num_heads, capacity, config, blocks_ref, block_size)


def _gpu_compact_kernel(
    x_ref,  # [G, N] f32 logits of one row (group)
    valid_ref,  # [N] bool, or None: every column
    blocks_ref,  # [C] i32 block ids of the row's columns, or None: indices are columns
    p_ref,  # [1] f32
    indices_ref,  # [capacity] i32
    count_ref,  # [1] i32
    saturated_ref,  # [1] i32
    mass_ref,  # [G] f32
    wbuf_ref,  # [G, N] f32 scratch: the weights of the entries that can matter, compacted
    cbuf_ref,  # [N] i32 scratch: their columns
    *,
    num_heads: int,
    num_cols: int,
    capacity: int,
    chunk: int,
    config: TopPGpuConfig,
    interpret: bool,
    block_size: int,
):
    """Select in one kernel a row, looping over [Gp, chunk] tiles (see _compact_call)."""
    gp = pl.next_power_of_2(num_heads)
    heads = jnp.arange(gp, dtype=jnp.int32)[:, None]
    head_ok = heads < num_heads
    lane = jnp.arange(chunk, dtype=jnp.int32)
    num_chunks = pl.cdiv(num_cols, chunk)

    def fold(n, body, init):
        return jax.lax.fori_loop(0, n, body, init)

    def row_sum(x):
        return jnp.sum(x, axis=1, keepdims=True)

    def col_any(mask):
        return jnp.max(mask.astype(jnp.int32), axis=0) > 0

    def cumsum(mask):
        return jnp.cumsum(mask.astype(jnp.int32), axis=0)

    def logits_tile(c):
        """[Gp, chunk] logits of columns c * chunk + lane (-inf off the row) and their validity
        (a valid entry with logit -inf counts as invalid)."""
        col = c * chunk + lane
        in_row = col < num_cols
        x = plt.load(x_ref.at[heads, col[None, :]], mask=head_ok & in_row[None, :], other=-jnp.inf)
        if valid_ref is None:
            valid = in_row[None, :]
        else:
            valid = plt.load(valid_ref.at[col], mask=in_row, other=False)[None, :]
        return x, valid & (x > -jnp.inf), col

    p = p_ref[0]

    def finish_stats(m, z):
        m = jnp.where(m > -jnp.inf, m, 0.0)
        hi = tc.upper_bits(z)
        lo = tc.lower_bits(p, hi, num_cols)
        return m, z, hi, lo, tc.as_float(lo)

    def update_stats(m, z, x, valid):
        """Online softmax statistics after one more tile: the running max and the sum of
        exp(x - base) at the new base."""
        m_new = jnp.maximum(m, jnp.max(jnp.where(valid, x, -jnp.inf), axis=1, keepdims=True))
        base = jnp.where(m_new > -jnp.inf, m_new, 0.0)
        e = jnp.where(valid, jnp.exp(x - base), 0.0)
        return m_new, z * jnp.exp(m - base) + row_sum(e)

    def store_live(live, n_live, col, values):
        # The others get distinct slots past the row (masked on the GPU; interpret mode drops
        # out-of-range scatter indices, and distinct ones keep its gather-then-scatter
        # emulation from colliding with the kept slots).
        slot = jnp.where(live, n_live + cumsum(live) - 1, num_cols + lane)
        plt.store(wbuf_ref.at[heads, slot[None, :]], values, mask=head_ok & live[None, :])
        plt.store(cbuf_ref.at[slot], col, mask=live)
        return n_live + jnp.sum(live, dtype=jnp.int32)

    # 1. Softmax statistics, online over the tiles: max m and sum z of exp(x - m) per head.
    def stats(c, carry):
        x, valid, _ = logits_tile(c)
        return update_stats(*carry, x, valid)

    stats0 = (jnp.full((gp, 1), -jnp.inf), jnp.zeros((gp, 1)))
    m, z, hi, lo, floor = finish_stats(*fold(num_chunks, stats, stats0))

    # 2. Compaction: the columns where some head's weight reaches its search floor (no step of
    # the search looks below it), their weights written in column order to the scratch row.
    def compact(c, n_live):
        x, valid, col = logits_tile(c)
        w = tc.weights_from(x, valid, m, z)
        return store_live(col_any(w >= floor), n_live, col, w)

    n_live = fold(num_chunks, compact, jnp.int32(0))

    def chunks(n):
        return jax.lax.div(n + chunk - 1, chunk)

    # The live entries: the first n of the scratch row. Read when each later step is traced,
    # so the narrowing below (which compacts them again) reaches every step after it.
    live = {"n": n_live}
    if not interpret:  # the scratch row is read back by other threads of the program
        plt.debug_barrier()

    def weights_tile(c):
        """[Gp, chunk] compacted weights (-1 past the live entries) and their slots."""
        slot = c * chunk + lane
        ok = slot < live["n"]
        w = plt.load(wbuf_ref.at[heads, slot[None, :]], mask=head_ok & ok[None, :], other=-1.0)
        return w, slot, ok

    def over_live(reduce, init):
        return fold(chunks(live["n"]), lambda c, acc: reduce(acc, weights_tile(c)[0]), init)

    def narrow(lo):
        """Compacts the live entries again, in place, to those where some head's weight
        reaches its bracket's lower end lo [Gp, 1]. A tile's entries move to slots below the
        next tile's, at or before their own; the barrier lets every thread load the tile
        before any stores into it."""

        def again(c, n_kept):
            w, slot, ok = weights_tile(c)
            keep = col_any(w >= lo) & ok
            col = plt.load(cbuf_ref.at[slot], mask=ok, other=0)
            to = jnp.where(keep, n_kept + cumsum(keep) - 1, num_cols + lane)
            if not interpret:
                plt.debug_barrier()
            plt.store(wbuf_ref.at[heads, to[None, :]], w, mask=head_ok & keep[None, :])
            plt.store(cbuf_ref.at[to], col, mask=keep)
            return n_kept + jnp.sum(keep, dtype=jnp.int32)

        live["n"] = fold(chunks(live["n"]), again, jnp.int32(0))
        if not interpret:
            plt.debug_barrier()

    # 3. The thresholds, searched over the compacted weights only.
    def mass_at_least(t):
        return over_live(lambda acc, w: acc + row_sum(jnp.where(w >= t, w, 0.0)), jnp.zeros_like(t))

    def band_top(lo, hi):
        def top(acc, w):
            band = jnp.where((w >= lo) & (w < hi), w, -1.0)
            return jnp.maximum(acc, jnp.max(band, axis=1, keepdims=True))

        return over_live(top, jnp.full_like(lo, -1.0))

    t = tc.search_threshold(
        mass_at_least, band_top, lo, hi, p, config.iters, (config.narrow_after, narrow)
    )
    live_chunks = chunks(live["n"])

    def union_of(w):
        union = col_any(w >= t)
        return union, jnp.where(union, jnp.max(w, axis=0), -1.0)

    # 4. The union; over capacity, the cut of its priorities max_g w (tc.limit_to_capacity).
    n_union = over_live(lambda acc, w: acc + jnp.sum(union_of(w)[0], dtype=jnp.int32), jnp.int32(0))
    over = n_union > capacity

    # No cut (the common case) runs no step: the bracket stays [0, 1 + ulp), nothing is
    # "above", the band is the whole union and the room all of capacity. (Trip counts, not a
    # lax.cond: Triton's verifier rejects the scalar results of such a cond.)
    cut_chunks = jnp.where(over, live_chunks, 0)

    def count_at_least(th):
        def count(c, acc):
            return acc + jnp.sum(union_of(weights_tile(c)[0])[1] >= th, dtype=jnp.int32)

        return fold(cut_chunks, count, jnp.zeros(th.shape, jnp.int32))

    steps = over.astype(jnp.int32) * config.capacity_iters  # int32, as the loop's other bounds
    cut_lo, cut_hi = tc.capacity_cut(count_at_least, capacity, steps, ())
    room = capacity - count_at_least(cut_hi)

    # 5. The final selection in column order: each kept column's output slot is its running
    # count; mass per head over the kept entries.
    def emit(c, carry):
        n_out, n_band, mass = carry
        w, slot, ok = weights_tile(c)
        union, priority = union_of(w)
        above = priority >= cut_hi
        band = union & (priority >= cut_lo) & ~above
        final = above | (band & (n_band + cumsum(band) <= room))
        col = plt.load(cbuf_ref.at[slot], mask=ok, other=0)
        out = jnp.where(final, n_out + cumsum(final) - 1, capacity + lane)  # as in compact
        stored = final & (out < capacity)
        plt.store(indices_ref.at[out], _positions(col, blocks_ref, block_size, stored), mask=stored)
        mass = mass + tc.kept_mass(w, final[None, :], (1,))
        n_out = n_out + jnp.sum(final, dtype=jnp.int32)
        return n_out, n_band + jnp.sum(band, dtype=jnp.int32), mass

    count, _, mass = fold(live_chunks, emit, (jnp.int32(0), jnp.int32(0), jnp.zeros((gp, 1))))

    def pad(c, carry):
        out = c * chunk + lane
        plt.store(indices_ref.at[out], jnp.zeros_like(out), mask=(out >= count) & (out < capacity))
        return carry

    fold(pl.cdiv(capacity, chunk), pad, 0)
    count_ref[0] = count
    saturated_ref[0] = over.astype(jnp.int32)
    plt.store(mass_ref.at[heads[:, 0]], mass[:, 0], mask=head_ok[:, 0])


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


def _row_operand(x):
    """(operands, in_specs) of an optional [R, X] operand read one row a program (grid (R,) or
    (R, G)): none when x is None."""
    if x is None:
        return (), []
    return (x,), [pl.BlockSpec((None, x.shape[1]), lambda i, *_: (i, 0))]


def _kernels_call(logits, valid, p, capacity, config, interpret, blocks=None, block_size=1):
    """logits [R, G, N] f32, valid [R, N] bool or None (every column), p [R] f32 -> per-row
    outputs: a (row, head) grid for the thresholds, then (for select) a row grid for the union
    and compaction. blocks: None or [R, C] i32 (select: indices are then positions, see
    _positions).

    threshold (capacity None): threshold, count, mass, each [R, G].
    select: indices [R, capacity] i32, count [R] i32, saturated [R] i32, mass [R, G] f32.
    """
    r, g, n = logits.shape
    p, p_per = tc.p_operand(p, r)
    np_ = pl.next_power_of_2(n)
    per_head = jax.ShapeDtypeStruct((r, g), jnp.float32)
    if capacity is None:
        head_shapes = [per_head, jax.ShapeDtypeStruct((r, g), jnp.int32), per_head]
    else:
        head_shapes = [per_head] * 3  # threshold, m, z
    head_kernel = functools.partial(_gpu_head_kernel, num_cols=n, capacity=capacity, config=config)
    v_args, v_specs = _row_operand(valid)
    head_out = pl.pallas_call(
        _optional_operands(head_kernel, valid),
        grid=(r, g),
        in_specs=[
            pl.BlockSpec((None, 1, n), lambda i, j: (i, j, 0)),
            *v_specs,
            pl.BlockSpec((1,), lambda i, j: (i // p_per,)),
        ],
        out_specs=[pl.BlockSpec((None, 1), lambda i, j: (i, j))] * 3,
        out_shape=head_shapes,
        compiler_params=plt.CompilerParams(num_warps=config.warps_for(np_), num_stages=1),
        interpret=interpret,
        name="topp_threshold_gpu" if capacity is None else "topp_head_threshold_gpu",
    )(logits, *v_args, p)
    if capacity is None:
        return head_out

    out_shape, out_specs = _gpu_select_outputs(r, g, capacity)
    union_kernel = functools.partial(
        _gpu_union_kernel,
        num_heads=g,
        num_cols=n,
        capacity=capacity,
        config=config,
        block_size=block_size,
    )
    per_row = pl.BlockSpec((None, g), lambda i: (i, 0))
    v_args, v_specs = _row_operand(valid)
    b_args, b_specs = _row_operand(blocks)
    return pl.pallas_call(
        _optional_operands(union_kernel, valid, blocks),
        grid=(r,),
        in_specs=[
            pl.BlockSpec((None, g, n), lambda i: (i, 0, 0)),
            *v_specs,
            *b_specs,
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
    )(logits, *v_args, *b_args, *head_out)


def _compact_call(logits, valid, p, capacity, config, interpret, blocks=None, block_size=1):
    """Select outputs from one kernel a row (_gpu_compact_kernel), any row length.

    The search's lower bound (topp_common.lower_bits) is known once the row's softmax sum is:
    no step of the search, nor the union, looks at a weight below it. Peaked rows have few
    entries above it (the planted 1.5% of a row and the upper tail of the noise), so the
    kernel compacts those once, to a scratch row, and runs the 16 search steps, the union and
    the capacity cut over the compacted entries, a tile at a time: the work of a step follows
    the entries that can matter instead of the row length, and no tile is held across steps,
    so registers stay few and programs many. After config.narrow_after steps the search's
    bracket has risen, and the entries below it (in peaked rows, the noise) are compacted away
    in place, so the later steps read fewer still. The row is read twice (softmax statistics,
    then the compaction); a flat row keeps every entry and costs about what a whole-row search
    does.
    """
    r, g, n = logits.shape
    p, p_per = tc.p_operand(p, r)
    chunk = min(config.chunk_cols, max(16, pl.next_power_of_2(n)))
    out_shape, out_specs = _gpu_select_outputs(r, g, capacity)
    scratch_shape = [
        jax.ShapeDtypeStruct((r, g, n), jnp.float32),
        jax.ShapeDtypeStruct((r, n), jnp.int32),
    ]
    scratch_specs = [
        pl.BlockSpec((None, g, n), lambda i: (i, 0, 0)),
        pl.BlockSpec((None, n), lambda i: (i, 0)),
    ]
    kernel = functools.partial(
        _gpu_compact_kernel,
        num_heads=g,
        num_cols=n,
        capacity=capacity,
        chunk=chunk,
        config=config,
        interpret=interpret,
        block_size=block_size,
    )
    v_args, v_specs = _row_operand(valid)
    b_args, b_specs = _row_operand(blocks)
    out = pl.pallas_call(
        _optional_operands(kernel, valid, blocks),
        grid=(r,),
        in_specs=[
            pl.BlockSpec((None, g, n), lambda i: (i, 0, 0)),
            *v_specs,
            *b_specs,
            pl.BlockSpec((1,), lambda i: (i // p_per,)),
        ],
        out_specs=out_specs + scratch_specs,
        out_shape=out_shape + scratch_shape,
        compiler_params=plt.CompilerParams(
            num_warps=config.warps_for(pl.next_power_of_2(g) * chunk), num_stages=1
        ),
        interpret=interpret,
        name="topp_compact_select_gpu",
    )(logits, *v_args, *b_args, p)
    return out[:4]


def _xla_threshold_call(logits, valid, p, config):
    """The threshold kernel's math as XLA ops over whole [R, 1, N] arrays, for rows too long to
    hold on chip; outputs as ``_kernels_call``'s threshold. Every bisection step is a masked sum
    over N per row, which XLA fuses into one pass over the logits."""
    n = logits.shape[-1]
    valid = jnp.ones(logits.shape, bool) if valid is None else valid[:, None, :]
    valid, m, z = tc.softmax_stats(logits, valid, axes=(2,))
    w = tc.weights_from(logits, valid, m, z)  # [R, 1, N], -1 off valid
    t = tc.head_thresholds(w, tc.upper_bits(z), p[:, None, None], (2,), config.iters, n)
    kept = w >= t
    count = jnp.sum(kept, axis=2, dtype=jnp.int32)
    mass = jnp.sum(jnp.where(kept, w, 0.0), axis=2)
    return t[..., 0], count, mass


def _call(logits, valid, p, capacity, config, interpret, blocks=None, block_size=1):
    r, _, n = logits.shape
    if capacity is None:
        if n > config.max_cols:
            return _xla_threshold_call(logits, valid, tc.p_rows(p, r), config)
    elif n > config.max_cols or r >= config.compact_min_rows:
        return _compact_call(logits, valid, p, capacity, config, interpret, blocks, block_size)
    return _kernels_call(logits, valid, p, capacity, config, interpret, blocks, block_size)


# --------------------------------------------------------------------------------------------
# The GPU implementations of the public entries (arguments checked by pallas_kernels.topp)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def topp_threshold_gpu(logits, valid, p, *, config=DEFAULT_CONFIG, interpret=False):
    """Pallas GPU ``topp_threshold``. logits [R, N] f32, valid [R, N] bool or None, p [R] or
    scalar."""
    t, count, mass = _call(logits[:, None, :], valid, p, None, config, interpret)
    return t[:, 0], count[:, 0], mass[:, 0]


@functools.partial(jax.jit, static_argnames=("capacity", "config", "interpret", "block_size"))
def topp_select_grouped_gpu(
    logits,
    valid,
    p,
    capacity,
    *,
    config=DEFAULT_CONFIG,
    interpret=False,
    blocks=None,
    block_size=1,
):
    """Pallas GPU ``topp_select_grouped``. logits [R, G, N] f32, valid [R, N] bool or None,
    p [R]; blocks None or [R, C] int32 with C * block_size == N (the kernels then store
    positions, not columns)."""
    indices, count, saturated, mass = _call(
        logits, valid, p, capacity, config, interpret, blocks, block_size
    )
    return indices, count, saturated != 0, mass


def topp_select_gpu(logits, valid, p, capacity, *, config=DEFAULT_CONFIG, interpret=False):
    """Pallas GPU ``topp_select``: ``topp_select_grouped_gpu`` with G = 1."""
    out = topp_select_grouped_gpu(
        logits[:, None, :], valid, p, capacity, config=config, interpret=interpret
    )
    return out[:3]

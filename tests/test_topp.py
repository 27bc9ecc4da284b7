"""topp: threshold and selection kernels (GPU Triton and TPU Mosaic, in interpret mode) against the
sort-based jnp reference, invariants checked without the reference, lowering checks, validation.

The interpreters poison outputs before the kernel runs (NaN, or INT_MIN for int32), so a slot the
kernel never writes fails the exact comparison of indices against the reference's zero padding.
Shapes are tiny and every kernel call covers many cases at once (one row per case), because each
interpret-mode compile costs seconds.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _export import export_cuda, export_tpu, pallas_kernels_called

from pallas_kernels import topp
from pallas_kernels.topp import EXACT_ITERS, TopPGpuConfig, TopPTpuConfig

N = 200  # not a power of two, not a multiple of 128: exercises padding on both backends
P_CYCLE = (1.0, 0.95, 0.5, 1e-6)
TOL = dict(rtol=1e-5, atol=1e-6)
BACKENDS = ("pallas", "pallas_tpu")  # on CPU: GPU kernel and TPU kernel, both interpreted
# The exact search, for each backend's kernel.
EXACT = {"pallas": TopPGpuConfig(iters=EXACT_ITERS), "pallas_tpu": TopPTpuConfig(iters=EXACT_ITERS)}
# Every selection kernel with the exact search: the GPU's two forms (a threshold kernel a head,
# then a union kernel a row; or one compacting kernel a row, over one tile or over several)
# and the TPU kernel.
COMPACT = dict(compact_min_rows=1)
SELECT_KERNELS = [
    ("pallas", TopPGpuConfig(iters=EXACT_ITERS)),
    ("pallas", TopPGpuConfig(iters=EXACT_ITERS, **COMPACT)),
    ("pallas", TopPGpuConfig(iters=EXACT_ITERS, chunk_cols=64, **COMPACT)),
    ("pallas_tpu", EXACT["pallas_tpu"]),
]


def _mixed_batch(seed, rows, heads=None, n=N):
    """Rows of varied shape: Gaussian, peaked, planted few large, flat (all tied), quantized
    (many ties); ragged prefix and scattered valid masks, one all-masked row, one single-valid
    row; p cycling through 1.0, 0.95, 0.5, 1e-6 with random p on later rows."""
    rng = np.random.default_rng(seed)
    shape = (rows, n) if heads is None else (rows, heads, n)
    x = rng.standard_normal(shape).astype(np.float32)
    for r in range(rows):
        kind = r % 5
        if kind == 1:
            x[r] *= 8.0
        elif kind == 2:
            x[r] *= 0.5
            planted = rng.choice(n, 3, replace=False)
            x[r][..., planted] += 8.0
        elif kind == 3:
            x[r] = 0.25
        elif kind == 4:
            x[r] = rng.integers(0, 4, x[r].shape).astype(np.float32)
    lengths = rng.integers(1, n + 1, rows)
    valid = np.arange(n)[None, :] < lengths[:, None]
    scattered = rng.random((rows, n)) < 0.7
    valid[1::3] = scattered[1::3]
    valid[0] = False  # all masked
    valid[min(2, rows - 1)] = np.arange(n) == 7  # a single valid entry
    p = np.array([P_CYCLE[r % 4] for r in range(rows)], np.float32)
    p[8:] = rng.uniform(0.05, 0.99, max(0, rows - 8)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(valid), jnp.asarray(p)


def _weights64(logits, valid):
    """float64 softmax over valid entries (0 elsewhere), independent of the module."""
    x = np.asarray(logits, np.float64)
    v = np.asarray(valid) & np.isfinite(x)
    m = np.max(np.where(v, x, -np.inf), axis=-1, keepdims=True)
    e = np.where(v, np.exp(x - np.where(np.isfinite(m), m, 0.0)), 0.0)
    z = e.sum(-1, keepdims=True)
    return np.where(v, e / np.where(z > 0, z, 1.0), 0.0), v


def _kept_from_indices(indices, counts, n):
    kept = np.zeros((indices.shape[0], n), bool)
    for r, (idx, c) in enumerate(zip(np.asarray(indices), np.asarray(counts))):
        kept[r, idx[:c]] = True
    return kept


def _top_count(w, v, counts):
    """The counts[r] heaviest valid entries of each row (the set a threshold count implies)."""
    kept = np.zeros(w.shape, bool)
    for r, c in enumerate(np.asarray(counts)):
        order = np.argsort(-np.where(v[r], w[r], -1.0), kind="stable")
        kept[r, order[:c]] = True
    return kept


def _check_topp_invariants(w, v, p, kept):
    """Kept mass reaches p; dropping the smallest kept weight falls below p (rows where that
    weight is not tied); p = 1 keeps all valid; tiny p keeps the maximum; empty rows keep none."""
    for r in range(w.shape[0]):
        if not v[r].any():
            assert not kept[r].any(), r
            continue
        assert not (kept[r] & ~v[r]).any(), r
        mass = w[r, kept[r]].sum()
        if p[r] >= 1.0:
            assert kept[r].sum() == v[r].sum(), r
            continue
        assert mass >= p[r] - 1e-6, (r, mass, p[r])
        assert kept[r, np.argmax(np.where(v[r], w[r], -1.0))], r
        smallest = w[r, kept[r]].min()
        # Everything at least as heavy as a kept entry is kept (a threshold set).
        assert not (v[r] & ~kept[r] & (w[r] >= smallest)).any(), r
        if np.sum(kept[r] & (w[r] == smallest)) == 1:
            assert mass - smallest < p[r] + 1e-6, (r, mass, smallest, p[r])


def _assert_same_selection(got, want):
    """Two selections (indices, counts, saturated, mass) agree: exactly, but for the kept mass
    (float sums, which the kernel forms may add in another order)."""
    for a, b in zip(got[:3], want[:3]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(got[3], want[3], **TOL)


# ------------------------------------------------------------------------------------------
# Reference: hand-computed cases and invariants on many fresh rows (cheap, no kernels)
# ------------------------------------------------------------------------------------------


def test_reference_hand_computed():
    # weights 0.5, 0.3, 0.2 (logits are their logs; entry 3 masked).
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.2, 0.9]], jnp.float32))
    valid = jnp.array([[True, True, True, False]])
    # p = 0.7: 0.5 < 0.7 <= 0.5 + 0.3, so t = 0.3, two entries, mass 0.8.
    t, count, mass = topp.topp_threshold(logits, valid, 0.7, backend="reference")
    np.testing.assert_allclose(t, [0.3], rtol=1e-6)
    np.testing.assert_array_equal(count, [2])
    np.testing.assert_allclose(mass, [0.8], rtol=1e-6)
    # p = 0.85 needs all three; capacity 2 keeps the two heaviest (columns 0 and 1).
    idx, counts, sat = topp.topp_select(logits, valid, 0.85, 2, backend="reference")
    np.testing.assert_array_equal(idx, [[0, 1]])
    np.testing.assert_array_equal(counts, [2])
    np.testing.assert_array_equal(sat, [True])
    # Tiny p keeps only the maximum; p = 1 keeps every valid entry, in column order.
    idx, counts, sat = topp.topp_select(logits, valid, 1e-6, 3, backend="reference")
    np.testing.assert_array_equal(idx, [[0, 0, 0]])
    np.testing.assert_array_equal(counts, [1])
    idx, counts, sat = topp.topp_select(logits, valid, 1.0, 4, backend="reference")
    np.testing.assert_array_equal(idx, [[0, 1, 2, 0]])
    np.testing.assert_array_equal(counts, [3])
    np.testing.assert_array_equal(sat, [False])


@pytest.mark.parametrize("seed", range(3))
def test_reference_invariants(seed):
    logits, valid, p = _mixed_batch(seed, rows=40)
    _, count, _ = topp.topp_threshold(logits, valid, p, backend="reference")
    idx, counts, sat = topp.topp_select(logits, valid, p, N, backend="reference")
    w, v = _weights64(logits, valid)
    kept = _kept_from_indices(idx, counts, N)
    _check_topp_invariants(w, v, np.asarray(p), kept)
    np.testing.assert_array_equal(counts, count)
    assert not np.asarray(sat).any()


def test_reference_ties_all_kept():
    # Four equal weights 0.25: p = 0.3 is reached at the second, but ties at t are all kept.
    logits = jnp.zeros((1, 6), jnp.float32)
    valid = jnp.array([[True, False, True, True, False, True]])
    t, count, mass = topp.topp_threshold(logits, valid, 0.3, backend="reference")
    np.testing.assert_allclose(t, [0.25])
    np.testing.assert_array_equal(count, [4])
    # Capacity cuts among ties: lower columns first.
    idx, counts, sat = topp.topp_select(logits, valid, 0.3, 3, backend="reference")
    np.testing.assert_array_equal(idx, [[0, 2, 3]])
    np.testing.assert_array_equal(sat, [True])


def test_reference_under_jit_with_traced_p():
    logits, valid, p = _mixed_batch(7, rows=8)
    fn = jax.jit(lambda p: topp.topp_select(logits, valid, p, 16, backend="reference"))
    eager = topp.topp_select(logits, valid, p, 16, backend="reference")
    for a, b in zip(fn(p), eager):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------
# Kernels (interpret mode) vs the reference
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_kernel_matches_reference(backend):
    logits, valid, p = _mixed_batch(11, rows=16)
    got = topp.topp_threshold(logits, valid, p, backend=backend, config=EXACT[backend])
    want = topp.topp_threshold(logits, valid, p, backend="reference")
    np.testing.assert_allclose(got[0], want[0], **TOL)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[2], want[2], **TOL)
    # Reference-free: the threshold set of the kernel's own t meets the top-p invariants.
    w, v = _weights64(logits, valid)
    _check_topp_invariants(w, v, np.asarray(p), _top_count(w, v, got[1]))


def test_threshold_kernel_python_float_p():
    logits, valid, _ = _mixed_batch(12, rows=8)
    got = topp.topp_threshold(logits, valid, 0.95, backend="pallas", config=EXACT["pallas"])
    want = topp.topp_threshold(logits, valid, 0.95, backend="reference")
    np.testing.assert_allclose(got[0], want[0], **TOL)
    np.testing.assert_array_equal(got[1], want[1])


def test_threshold_fewer_iters_is_conservative():
    # 8 steps leave a wide bit interval: t may sit below the exact threshold, never above.
    logits, valid, p = _mixed_batch(13, rows=16)
    cfg = TopPGpuConfig(iters=8)
    t, count, mass = topp.topp_threshold(logits, valid, p, backend="pallas", config=cfg)
    t_exact, count_exact, _ = topp.topp_threshold(logits, valid, p, backend="reference")
    assert np.all(np.asarray(t) <= np.asarray(t_exact) * (1 + 1e-6))
    assert np.all(np.asarray(count) >= np.asarray(count_exact))
    p_np = np.asarray(p)
    has_valid = np.asarray(valid).any(-1)
    assert np.all(np.asarray(mass)[has_valid] >= np.minimum(p_np, 1.0)[has_valid] - 1e-6)


@pytest.mark.parametrize("backend,config", SELECT_KERNELS)
def test_select_kernel_matches_reference(backend, config):
    # Capacity 24 < N: the p = 1.0 rows and the flat rows saturate, tiny-p rows do not.
    logits, valid, p = _mixed_batch(21, rows=16)
    cap = 24
    got = topp.topp_select(logits, valid, p, cap, backend=backend, config=config)
    want = topp.topp_select(logits, valid, p, cap, backend="reference")
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    sat = np.asarray(got[2])
    assert sat.any() and not sat.all()
    # Saturated rows keep exactly `capacity` entries, all at least as heavy as any dropped
    # entry of the top-p set.
    w, v = _weights64(logits, valid)
    kept = _kept_from_indices(got[0], got[1], N)
    _, count_full, _ = topp.topp_threshold(logits, valid, p, backend="reference")
    for r in np.nonzero(sat)[0]:
        assert got[1][r] == cap and count_full[r] > cap
        t_full = np.sort(np.where(v[r], w[r], -1))[::-1][count_full[r] - 1]
        dropped = v[r] & ~kept[r] & (w[r] >= t_full)
        assert w[r, kept[r]].min() >= w[r, dropped].max() - 1e-12, r
    # Unsaturated rows satisfy the top-p invariants.
    rows = ~sat
    _check_topp_invariants(w[rows], v[rows], np.asarray(p)[rows], kept[rows])


def test_select_fewer_capacity_iters_still_fills_capacity():
    # 4 steps cannot resolve the priority cut: saturated rows still get exactly `capacity`
    # distinct union columns in ascending order, and everything above the band is kept.
    logits, valid, p = _mixed_batch(22, rows=16)
    cap = 24
    cfg = TopPGpuConfig(capacity_iters=4)
    idx, counts, sat = topp.topp_select(logits, valid, p, cap, backend="pallas", config=cfg)
    ridx, rcounts, rsat = topp.topp_select(logits, valid, p, cap, backend="reference")
    np.testing.assert_array_equal(counts, rcounts)
    np.testing.assert_array_equal(sat, rsat)
    idx = np.asarray(idx)
    _, count_full, _ = topp.topp_threshold(logits, valid, p, backend="reference")
    w, v = _weights64(logits, valid)
    for r in range(idx.shape[0]):
        c = int(counts[r])
        assert np.all(np.diff(idx[r, :c]) > 0) and np.all(idx[r, c:] == 0), r
        if not sat[r]:
            np.testing.assert_array_equal(idx[r], ridx[r])
            continue
        top_p_set = _top_count(w[r : r + 1], v[r : r + 1], count_full[r : r + 1])[0]
        assert top_p_set[idx[r, :c]].all(), r


@pytest.mark.parametrize("backend,config", SELECT_KERNELS)
@pytest.mark.parametrize("heads,rows,cap", [(4, 16, 40), (8, 5, 256), (3, 6, 40)])
def test_grouped_kernel_matches_reference(backend, config, heads, rows, cap):
    # (8, 5, 256): capacity above N (never saturates), R not a multiple of the TPU row block;
    # (3, ...): G not a power of two (the GPU kernels pad the heads).
    logits, valid, p = _mixed_batch(31 + heads, rows=rows, heads=heads)
    got = topp.topp_select_grouped(logits, valid, p, cap, backend=backend, config=config)
    want = topp.topp_select_grouped(logits, valid, p, cap, backend="reference")
    for a, b in zip(got[:3], want[:3]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(got[3], want[3], **TOL)
    # Union semantics without the reference: each head's own top-p set is inside the union
    # on rows that did not saturate, so each head's mass reaches p there.
    sat = np.asarray(got[2])
    if cap >= N:
        assert not sat.any()
    else:
        assert sat.any()
    has_valid = np.asarray(valid).any(-1)
    ok = ~sat & has_valid & (np.asarray(p) < 1.0)
    assert np.all(np.asarray(got[3])[ok] >= np.asarray(p)[ok, None] - 1e-6)
    # One head: the grouped entry equals the plain one.
    if heads == 4:
        one = topp.topp_select(logits[:, 0], valid, p, cap, backend="reference")
        ref1 = topp.topp_select_grouped(logits[:, :1], valid, p, cap, backend="reference")
        for a, b in zip(one, ref1[:3]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend,config", [*SELECT_KERNELS, ("reference", None)])
@pytest.mark.parametrize("block_size", [1, 8])
def test_block_ids_map_the_kept_columns_to_positions(backend, config, block_size):
    # With blocks, slot s below the count holds blocks[c // bs] * bs + c % bs for the column c
    # the plain selection keeps there (GPU: written by the kernels as they store), 0 after;
    # counts, saturation and mass do not change. Block ids are random, unordered and large.
    heads, rows, cap, n = 4, 10, 40, 208
    logits, valid, p = _mixed_batch(5 + block_size, rows=rows, heads=heads, n=n)
    rng = np.random.default_rng(block_size)
    blocks = jnp.asarray(rng.integers(0, 1 << 20, (rows, n // block_size)), jnp.int32)
    plain = topp.topp_select_grouped(logits, valid, p, cap, backend=backend, config=config)
    got = topp.topp_select_grouped(
        logits, valid, p, cap, backend=backend, config=config, blocks=blocks, block_size=block_size
    )
    cols, counts = np.asarray(plain[0]), np.asarray(plain[1])
    want = np.asarray(blocks)[np.arange(rows)[:, None], cols // block_size] * block_size
    want = np.where(np.arange(cap) < counts[:, None], want + cols % block_size, 0)
    assert counts.max() > 1 and (counts < cap).any()
    np.testing.assert_array_equal(np.asarray(got[0]), want)
    for a, b in zip(got[1:], plain[1:]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend,config", [*SELECT_KERNELS, ("reference", None)])
def test_p_per_group_of_rows_is_p_repeated(backend, config):
    # p of shape [S], S dividing R: row r takes p[r // (R / S)] (the GPU kernels index it so,
    # with no [R] copy): the same selections and thresholds as p repeated to [R].
    heads, rows, cap = 4, 12, 40
    logits, valid, _ = _mixed_batch(77, rows=rows, heads=heads)
    p_seq = jnp.asarray([0.95, 0.5, 1.0], jnp.float32)
    got = topp.topp_select_grouped(logits, valid, p_seq, cap, backend=backend, config=config)
    want = topp.topp_select_grouped(
        logits, valid, jnp.repeat(p_seq, 4), cap, backend=backend, config=config
    )
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert len({int(c) for c in np.asarray(got[1])}) > 2  # the p differ in effect
    if getattr(config, "compact_min_rows", 2) > 1:  # once per backend: the threshold entry
        threshold_config = None if config is None else EXACT[backend]
        t = topp.topp_threshold(
            logits[:, 0], valid, p_seq, backend=backend, config=threshold_config
        )
        t_want = topp.topp_threshold(
            logits[:, 0], valid, jnp.repeat(p_seq, 4), backend=backend, config=threshold_config
        )
        for a, b in zip(t, t_want):
            np.testing.assert_array_equal(a, b)


def test_bad_block_ids():
    logits, valid, p = _mixed_batch(0, rows=3, heads=2, n=16)
    ok = jnp.zeros((3, 4), jnp.int32)
    for blocks, bs, match in [
        (ok, 0, "block_size"),
        (ok, 2.0, "block_size"),
        (ok, 2, "C \\* block_size == N"),
        (jnp.zeros((2, 4), jnp.int32), 4, "rows R"),
        (ok.astype(jnp.float32), 4, "dtype"),
        (ok[0], 4, "rank"),
    ]:
        with pytest.raises(ValueError, match=match):
            topp.topp_select_grouped(logits, valid, p, 5, blocks=blocks, block_size=bs)


@pytest.mark.parametrize("backend,config", SELECT_KERNELS)
def test_no_mask_is_the_mask_of_the_finite_logits(backend, config):
    """valid=None: the kernels read no mask; with the invalid entries at -inf (what the INT4
    estimates give off the candidates) the results equal those with the mask, on every form
    and for the thresholds too (the long-row XLA path included)."""
    logits, valid, p = _mixed_batch(47, rows=10, heads=4)
    logits = jnp.where(valid[:, None, :], logits, -jnp.inf)
    cap = 40
    want = topp.topp_select_grouped(logits, valid, p, cap, backend="reference")
    for kind in (backend, "reference"):
        got = topp.topp_select_grouped(logits, None, p, cap, backend=kind, config=config)
        for a, b in zip(got[:3], want[:3]):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(got[3], want[3], **TOL)
    configs = [config] + ([TopPGpuConfig(iters=EXACT_ITERS, max_cols=64)] * (backend == "pallas"))
    for cfg in configs:
        got = topp.topp_threshold(logits[:, 0], None, p, backend=backend, config=cfg)
        ref = topp.topp_threshold(logits[:, 0], valid, p, backend="reference")
        np.testing.assert_allclose(got[0], ref[0], **TOL)
        np.testing.assert_array_equal(got[1], ref[1])


def test_gpu_long_row_path_matches_reference():
    # Rows longer than max_cols: selections take the compacting kernel, thresholds the XLA
    # path; exact at 30 steps, with and without saturation.
    config = TopPGpuConfig(iters=EXACT_ITERS, max_cols=64, chunk_cols=64)
    logits, valid, p = _mixed_batch(41, rows=10, heads=4)
    cap = 40
    got = topp.topp_select_grouped(logits, valid, p, cap, backend="pallas", config=config)
    want = topp.topp_select_grouped(logits, valid, p, cap, backend="reference")
    for a, b in zip(got[:3], want[:3]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(got[3], want[3], **TOL)
    assert np.asarray(got[2]).any()
    got = topp.topp_threshold(logits[:, 0], valid, p, backend="pallas", config=config)
    want = topp.topp_threshold(logits[:, 0], valid, p, backend="reference")
    np.testing.assert_allclose(got[0], want[0], **TOL)
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_snap_makes_one_step_exact(backend):
    # Weights 0.6, 0.25, 0.15 (entry 3 masked), p = 0.5: the exact threshold is 0.6. Search
    # range [bits((1 - 0.5) / (2 * 4)), bits(0.6) + 1]; one step moves lo to its middle (bit
    # pattern ~0.18, reached: everything above it weighs 0.85), leaving 0.6 and 0.25 in
    # [lo, hi). The band's top weight 0.6 alone reaches p, so it is the threshold.
    logits = jnp.log(jnp.array([[0.6, 0.25, 0.15, 0.9]], jnp.float32))
    valid = jnp.array([[True, True, True, False]])
    cfg = {"pallas": TopPGpuConfig(iters=1), "pallas_tpu": TopPTpuConfig(iters=1)}[backend]
    t, count, mass = topp.topp_threshold(logits, valid, 0.5, backend=backend, config=cfg)
    np.testing.assert_allclose(t, [0.6], rtol=1e-6)
    np.testing.assert_array_equal(count, [1])
    # p = 0.8 (exact set {0.6, 0.25}): the step moves lo to ~0.119, all three weights stay in
    # the band and its top (0.6) falls short of p, so t stays at lo: conservative, all three.
    t, count, mass = topp.topp_threshold(logits, valid, 0.8, backend=backend, config=cfg)
    np.testing.assert_array_equal(count, [3])
    np.testing.assert_allclose(mass, [1.0], rtol=1e-6)
    assert 0.0 < float(t[0]) < 0.15


def test_default_config_is_conservative():
    # Default (16 steps): never keeps less than the exact set, and its kept set is a
    # threshold set reaching p (every entry at least as heavy as a kept one is kept).
    logits, valid, p = _mixed_batch(14, rows=16, heads=2)
    cap = N
    idx, counts, sat, mass = topp.topp_select_grouped(logits, valid, p, cap, backend="pallas")
    ridx, rcounts, _, _ = topp.topp_select_grouped(logits, valid, p, cap, backend="reference")
    assert not np.asarray(sat).any()
    kept = _kept_from_indices(idx, counts, N)
    assert np.all(kept[_kept_from_indices(ridx, rcounts, N)])
    has_valid = np.asarray(valid).any(-1)
    p_np = np.asarray(p)
    assert np.all(np.asarray(mass)[has_valid] >= p_np[has_valid, None] - 1e-6)
    w, v = _weights64(logits[:, 1], valid)
    t, count, _ = topp.topp_threshold(logits[:, 1], valid, p, backend="pallas")
    _, rcount, _ = topp.topp_threshold(logits[:, 1], valid, p, backend="reference")
    assert np.all(np.asarray(count) >= np.asarray(rcount))
    top = _top_count(w, v, count)
    for r in range(top.shape[0]):
        if top[r].any() and p_np[r] < 1.0:
            assert w[r, top[r]].sum() >= p_np[r] - 1e-6, r


# ------------------------------------------------------------------------------------------
# Lowering checks (no accelerator): Pallas -> Triton IR, Pallas -> Mosaic TPU
# ------------------------------------------------------------------------------------------


EXPORT_SHAPES = [(512, 4, 8192, 2048), (2048, 1, 8192, 2048), (8, 8, 1000, 300), (3, 1, 200, 5)]


@pytest.mark.parametrize("r,g,n,cap", EXPORT_SHAPES)
def test_exports(r, g, n, cap):
    x3 = jax.ShapeDtypeStruct((r, g, n), jnp.float32)
    x2 = jax.ShapeDtypeStruct((r, n), jnp.float32)
    v = jax.ShapeDtypeStruct((r, n), jnp.bool_)
    p = jax.ShapeDtypeStruct((r,), jnp.float32)
    for cfg in (TopPGpuConfig(), TopPGpuConfig(**COMPACT)):
        export_cuda(
            functools.partial(topp.topp_select_grouped_gpu, capacity=cap, config=cfg), x3, v, p
        )
    export_tpu(functools.partial(topp.topp_select_grouped_tpu, capacity=cap), x3, v, p)
    export_cuda(topp.topp_threshold_gpu, x2, v, p)
    export_tpu(topp.topp_threshold_tpu, x2, v, p)
    # Without a mask: one operand fewer for every kernel; with block ids, one more.
    blocks = jax.ShapeDtypeStruct((r, n // 4 if n % 4 == 0 else n), jnp.int32)
    bs = 4 if n % 4 == 0 else 1
    for cfg in (TopPGpuConfig(), TopPGpuConfig(**COMPACT)):
        export_cuda(
            lambda x, p, cfg=cfg: topp.topp_select_grouped_gpu(x, None, p, cap, config=cfg), x3, p
        )
        export_cuda(
            lambda x, p, b, cfg=cfg: topp.topp_select_grouped_gpu(
                x, None, p, cap, config=cfg, blocks=b, block_size=bs
            ),
            x3,
            p,
            blocks,
        )


@pytest.mark.parametrize("chunk_cols", [1024, 64])
def test_default_iters_agree_across_forms(chunk_cols):
    # At the default (conservative) 16 steps the row-resident pair and the compacting kernel
    # (by row count or by row length; one tile or several) keep exactly the same entries: the
    # same bisection over the same weights (the compaction drops only entries no step looks
    # at).
    logits, valid, p = _mixed_batch(43, rows=10, heads=4)
    cap = 40
    forms = [
        TopPGpuConfig(),
        TopPGpuConfig(chunk_cols=chunk_cols, **COMPACT),
        TopPGpuConfig(chunk_cols=chunk_cols, max_cols=N - 1),
    ]
    outs = [
        topp.topp_select_grouped(logits, valid, p, cap, backend="pallas", config=c) for c in forms
    ]
    for other in outs[1:]:
        _assert_same_selection(other, outs[0])


@pytest.mark.parametrize("iters", [16, EXACT_ITERS])
def test_narrowing_keeps_what_the_search_needs(iters):
    # The compacting kernel compacting its entries again after k bisection steps (in place,
    # over several 64-column tiles) keeps exactly what it keeps without (k = 0): only entries
    # below every head's bracket, which no later step looks at, are dropped. Capacity 12 also
    # runs the capacity cut over the narrowed entries; exact steps match the reference.
    logits, valid, p = _mixed_batch(61, rows=10, heads=4)
    for cap in (40, 12):
        base = TopPGpuConfig(iters=iters, chunk_cols=64, narrow_after=0, **COMPACT)
        want = topp.topp_select_grouped(logits, valid, p, cap, backend="pallas", config=base)
        for k in (1, 2, 7, iters - 1):
            cfg = TopPGpuConfig(iters=iters, chunk_cols=64, narrow_after=k, **COMPACT)
            got = topp.topp_select_grouped(logits, valid, p, cap, backend="pallas", config=cfg)
            _assert_same_selection(got, want)
        if iters == EXACT_ITERS:
            ref = topp.topp_select_grouped(logits, valid, p, cap, backend="reference")
            _assert_same_selection(want, ref)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="TopPGpuConfig.narrow_after must be an int >= 0"):
            TopPGpuConfig(narrow_after=bad)


def test_long_rows_export():
    # 131072 columns: selections take the compacting kernel, which loops over tiles (its
    # kernel name); thresholds take the XLA path (no Triton call: the row-resident kernel took
    # minutes to compile at that length). 32768 columns and few rows: the row-resident pair.
    v = jax.ShapeDtypeStruct((64, 131072), jnp.bool_)
    p = jax.ShapeDtypeStruct((64,), jnp.float32)
    x3 = jax.ShapeDtypeStruct((64, 4, 131072), jnp.float32)
    select = functools.partial(topp.topp_select_grouped_gpu, capacity=4096)
    names = pallas_kernels_called(export_cuda(select, x3, v, p).mlir_module())
    assert names == ["topp_compact_select_gpu"]
    x2 = jax.ShapeDtypeStruct((64, 131072), jnp.float32)
    threshold = export_cuda(topp.topp_threshold_gpu, x2, v, p).mlir_module()
    assert pallas_kernels_called(threshold) == []
    x3 = jax.ShapeDtypeStruct((64, 4, 32768), jnp.float32)
    v = jax.ShapeDtypeStruct((64, 32768), jnp.bool_)
    names = pallas_kernels_called(export_cuda(select, x3, v, p).mlir_module())
    assert names == ["topp_head_threshold_gpu", "topp_select_gpu"]


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------


def _args(r=4, n=10, g=None):
    shape = (r, n) if g is None else (r, g, n)
    return jnp.zeros(shape, jnp.float32), jnp.ones((r, n), bool)


@pytest.mark.parametrize("p", [0.0, -0.5, 1.5, float("nan"), True])
def test_bad_scalar_p(p):
    logits, valid = _args()
    with pytest.raises(ValueError, match="p must"):
        topp.topp_select(logits, valid, p, 4)
    with pytest.raises(ValueError, match="p must"):
        topp.topp_threshold(logits, valid, p)


def test_bad_array_p():
    logits, valid = _args()
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\], got 1.5"):
        topp.topp_select(logits, valid, jnp.array([0.5, 1.5, 0.5, 0.5]), 4)
    with pytest.raises(ValueError, match=r"p must .*shape \(4,\)"):
        topp.topp_select(logits, valid, jnp.full((3,), 0.5), 4)
    with pytest.raises(ValueError, match=r"p must .*S dividing 4"):
        topp.topp_select(logits, valid, jnp.full((0,), 0.5), 4)
    with pytest.raises(ValueError, match=r"p must .*shape \(4,\)"):
        topp.topp_select(logits, valid, jnp.full((2, 2), 0.5), 4)
    with pytest.raises(ValueError, match="p must have a floating dtype"):
        topp.topp_select(logits, valid, jnp.ones((4,), jnp.int32), 4)


@pytest.mark.parametrize("cap", [0, -3, 2.5, True])
def test_bad_capacity(cap):
    logits, valid = _args()
    with pytest.raises(ValueError, match="capacity must"):
        topp.topp_select(logits, valid, 0.9, cap)
    with pytest.raises(ValueError, match="capacity must"):
        topp.topp_select_grouped(logits[:, None], valid, 0.9, cap)


def test_bad_shapes_and_dtypes():
    logits, valid = _args()
    with pytest.raises(ValueError, match=r"logits must have rank 2"):
        topp.topp_select(logits[None], valid, 0.9, 4)
    with pytest.raises(ValueError, match=r"logits must have rank 3"):
        topp.topp_select_grouped(logits, valid, 0.9, 4)
    with pytest.raises(ValueError, match=r"logits must have dtype"):
        topp.topp_threshold(logits.astype(jnp.bfloat16), valid, 0.9)
    with pytest.raises(ValueError, match=r"valid dimension 1"):
        topp.topp_select(logits, valid[:, :5], 0.9, 4)
    with pytest.raises(ValueError, match=r"valid dimension 0"):
        topp.topp_select_grouped(logits[:, None], valid[:3], 0.9, 4)
    with pytest.raises(ValueError, match=r"valid must have dtype"):
        topp.topp_select(logits, valid.astype(jnp.int32), 0.9, 4)
    with pytest.raises(ValueError, match=r"logits must be non-empty"):
        topp.topp_threshold(jnp.zeros((4, 0)), jnp.zeros((4, 0), bool), 0.9)


def test_bad_config_and_backend():
    logits, valid = _args()
    with pytest.raises(ValueError, match=r"TopPGpuConfig.iters"):
        TopPGpuConfig(iters=0)
    with pytest.raises(ValueError, match=r"TopPTpuConfig.capacity_iters .* got 100"):
        TopPTpuConfig(capacity_iters=100)
    with pytest.raises(ValueError, match=r"TopPGpuConfig.num_warps"):
        TopPGpuConfig(num_warps=3)
    with pytest.raises(ValueError, match=r"TopPGpuConfig.max_cols must be an int >= 1, got 0"):
        TopPGpuConfig(max_cols=0)
    with pytest.raises(ValueError, match=r"TopPTpuConfig.block_rows must be an int >= 1"):
        TopPTpuConfig(block_rows=0)
    with pytest.raises(ValueError, match="config must be None or a TopPGpuConfig or TopPTpuConfig"):
        topp.topp_threshold(logits, valid, 0.9, config=16)
    with pytest.raises(ValueError, match="config is a TopPGpuConfig, but backend='pallas_tpu'"):
        topp.topp_select(logits, valid, 0.9, 4, backend="pallas_tpu", config=TopPGpuConfig())
    with pytest.raises(ValueError, match="backend must be"):
        topp.topp_select(logits, valid, 0.9, 4, backend="cuda")


@pytest.mark.parametrize("backend,config", SELECT_KERNELS)
def test_mass_of_a_head_whose_logit_is_minus_inf_on_a_kept_column(backend, config):
    # Head 1's logit is -inf on columns the other heads keep: those columns count as invalid
    # for head 1 (weight 0), so its mass on the final selection is over its own valid entries
    # only, as in the reference; it is never pulled down by the -1 that marks invalid entries.
    rng = np.random.default_rng(12)
    rows, heads, n = 4, 3, N
    x = rng.standard_normal((rows, heads, n)).astype(np.float32)
    x[:, 0, :5] += 9.0  # head 0 keeps columns 0-4
    x[:, 1, :5] = -np.inf
    valid = np.ones((rows, n), bool)
    p = np.full((rows,), 0.9, np.float32)
    args = (jnp.asarray(x), jnp.asarray(valid), jnp.asarray(p), 64)
    got = topp.topp_select_grouped(*args, backend=backend, config=config)
    want = topp.topp_select_grouped(*args, backend="reference")
    kept = _kept_from_indices(got[0], got[1], n)
    assert kept[:, :5].all()
    for a, b in zip(got[:3], want[:3]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(got[3], want[3], **TOL)
    assert np.all(np.asarray(got[3]) >= 0.0)

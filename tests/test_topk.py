"""topk: top-k set selection (GPU Triton kernel in interpret mode, and the jnp reference) against
a numpy stable sort, reference-free invariants, lowering checks, validation.

The interpreter poisons outputs before the kernel runs (INT_MIN for int32), so a slot the kernel
never writes (e.g. a cut one key too high, leaving k - 1 selected) fails the exact comparison.
Ties make a cut one key too low visible too: the whole band at the true cut would then count as
"above" and crowd out nothing or the wrong columns. Shapes are tiny: each interpret-mode compile
costs seconds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _export import export_cuda

from pallas_kernels import assume_platform, topk
from pallas_kernels.topk import topk_ids

BACKENDS = ("reference", "pallas_gpu")  # on CPU the GPU kernel runs interpreted
_TRITON_CALL = "custom_call @__gpu$xla.gpu.triton"


def _want(x, k):
    """numpy reference: stable sort by (-score, column), first k, ascending columns.

    Stable argsort of -x breaks ties towards lower columns; -0.0 == 0.0 in numpy comparisons,
    so they tie too, and -(-inf) = inf ties among themselves.
    """
    x = np.asarray(x)
    order = np.argsort(-x, axis=-1, kind="stable")
    return np.sort(order[..., :k], axis=-1).astype(np.int32)


def _check_invariants(x, ids, k):
    """Without any reference: k distinct ascending in-range ids, and every selected score is
    at least every unselected one; among equal scores at the cut, lower columns win."""
    x, ids = np.asarray(x), np.asarray(ids)
    assert ids.shape == x.shape[:-1] + (k,)
    n = x.shape[-1]
    x2, ids2 = x.reshape(-1, n), ids.reshape(-1, k)
    for r in range(x2.shape[0]):
        assert np.all(np.diff(ids2[r]) > 0), r
        assert ids2[r, 0] >= 0 and ids2[r, -1] < n, r
        sel = np.zeros(n, bool)
        sel[ids2[r]] = True
        if sel.all():
            continue
        lo_sel, hi_rest = x2[r, sel].min(), x2[r, ~sel].max()
        assert lo_sel >= hi_rest, r
        if lo_sel == hi_rest:  # ties at the cut: taken lowest column first
            tied = np.nonzero(x2[r] == lo_sel)[0]
            assert np.all(sel[tied] == (np.arange(tied.size) < sel[tied].sum())), r


def _run(x, k, backend):
    got = np.asarray(topk_ids(jnp.asarray(x), k, backend=backend))
    assert got.dtype == np.int32
    return got


# ------------------------------------------------------------------------------------------
# Equality with the numpy reference
# ------------------------------------------------------------------------------------------


SHAPES = [(3, 13, 1), (3, 13, 13), (4, 16, 5), (5, 200, 37), (2, 1, 1), (3, 64, 63)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("r,n,k", SHAPES, ids=[f"{r}x{n}k{k}" for r, n, k in SHAPES])
def test_distinct_scores(backend, r, n, k):
    rng = np.random.default_rng(1000 + 7 * n + k)
    x = rng.standard_normal((r, n)).astype(np.float32) * 10.0
    assert all(np.unique(row).size == n for row in x)  # distinct: the answer is unique
    got = _run(x, k, backend)
    np.testing.assert_array_equal(got, np.sort(np.argsort(-x, axis=-1)[:, :k], axis=-1))
    _check_invariants(x, got, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_tails(backend):
    # Rows with fewer finite entries than k: all finite columns, then the lowest -inf ones.
    rng = np.random.default_rng(2)
    r, n, k = 6, 40, 12
    x = rng.standard_normal((r, n)).astype(np.float32)
    finite = [0, 1, 5, 11, 12, 30]  # finite entries per row (row 5 has more than k)
    for i, f in enumerate(finite):
        x[i, rng.permutation(n)[f:]] = -np.inf  # scattered -inf, not only a suffix
    got = _run(x, k, backend)
    np.testing.assert_array_equal(got, _want(x, k))
    for i, f in enumerate(finite[:-1]):
        fin = np.nonzero(np.isfinite(x[i]))[0]
        ninf = np.nonzero(~np.isfinite(x[i]))[0][: k - f]
        np.testing.assert_array_equal(got[i], np.sort(np.concatenate([fin, ninf])))
    assert np.all(np.isfinite(x[5, got[5]]))
    # All -inf: the first k columns.
    np.testing.assert_array_equal(got[0], np.arange(k))
    _check_invariants(x, got, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_lower_columns_first(backend):
    # Integer-valued scores, many ties at every cut; k sweeps the cut across tied bands.
    # A cut one key too low would take the whole band at the true cut as "above" (more than
    # k, overflowing the slots); one too high would leave slots unwritten.
    rng = np.random.default_rng(3)
    r, n = 8, 50
    x = rng.integers(-3, 4, (r, n)).astype(np.float32)
    x[0] = 1.0  # one band: the first k columns
    x[1] = np.where(np.arange(n) % 2 == 0, 2.0, 1.0)
    for k in (1, 7, 25, 26, 49):
        got = _run(x, k, backend)
        np.testing.assert_array_equal(got, _want(x, k), err_msg=f"k={k}")
        np.testing.assert_array_equal(got[0], np.arange(k))
        _check_invariants(x, got, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_signed_values_and_zeros(backend):
    # -0.0 and 0.0 are equal (a tie, lower column first); negatives below zeros below
    # positives; extremes of the float range, subnormals and infinities order correctly, and
    # adjacent floats (one ulp apart) are told apart (the bisection resolves the last bit).
    tiny = np.float32(1e-45)  # smallest subnormal
    big = np.finfo(np.float32).max
    v = np.float32(0.75)
    rows = [
        [0.0, -0.0, 0.0, -0.0, 1.0, -1.0, -0.0, 0.0],  # k=3: 1.0, then cols 0, 1 (a tie)
        [-0.0, -0.0, 0.0, -1.0, -2.0, 0.0, -0.0, -3.0],  # k=3: cols 0, 1, 2
        [-tiny, tiny, -0.0, 0.0, -big, big, -np.inf, np.inf],
        [np.nextafter(v, 0), v, np.nextafter(v, 2), v, np.nextafter(v, 0), v, v, 0.5],
        [-5.0, -4.5, -4.0, -1e-30, -1e30, -3.0, -2.0, -1.0],
        [np.nextafter(-v, 0), -v, np.nextafter(-v, -2), -v, -v, -1.0, -0.5, -v],
    ]
    x = np.array(rows, np.float32)
    for k in (1, 3, 5, 8):
        got = _run(x, k, backend)
        np.testing.assert_array_equal(got, _want(x, k), err_msg=f"k={k}")
        _check_invariants(x, got, k)
    got = _run(x, 3, backend)
    np.testing.assert_array_equal(got[0], [0, 1, 4])  # -0.0 at col 1 ties 0.0 at col 2
    np.testing.assert_array_equal(got[1], [0, 1, 2])
    np.testing.assert_array_equal(got[2], [1, 5, 7])  # inf, big, tiny
    np.testing.assert_array_equal(got[3], [1, 2, 3])  # next-above v, then first two v's


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_ties_and_infs(backend):
    # Mixed rows (quantised, with -inf, with +inf, negative-only) against the numpy reference,
    # N not a power of two.
    rng = np.random.default_rng(5)
    r, n, k = 12, 77, 20
    x = rng.standard_normal((r, n)).astype(np.float32)
    x[0::3] = np.round(x[0::3] * 2)  # ties, including -0.0 from rounding negatives
    x[1::3, rng.permutation(n)[:50]] = -np.inf
    x[2, :5] = np.inf
    x[5] = -np.abs(x[5]) - 1.0
    assert np.signbit(x[x == 0]).any()  # -0.0 present
    got = _run(x, k, backend)
    np.testing.assert_array_equal(got, _want(x, k))
    _check_invariants(x, got, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_batch_dims(backend):
    rng = np.random.default_rng(6)
    x = rng.integers(0, 5, (2, 3, 20)).astype(np.float32)
    got = _run(x, 6, backend)
    assert got.shape == (2, 3, 6)
    np.testing.assert_array_equal(got, _want(x, 6))
    x1 = rng.standard_normal((9,)).astype(np.float32)  # rank 1: [N] -> [k]
    got1 = _run(x1, 4, backend)
    assert got1.shape == (4,)
    np.testing.assert_array_equal(got1, _want(x1, 4))
    empty = topk_ids(jnp.zeros((0, 3, 8), jnp.float32), 2, backend=backend)
    assert empty.shape == (0, 3, 2) and empty.dtype == jnp.int32


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_jit(backend):
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.integers(0, 3, (4, 2, 24)).astype(np.float32))
    fn = jax.jit(lambda s: topk_ids(s, 10, backend=backend))
    np.testing.assert_array_equal(fn(x), _want(x, 10))


def test_reference_keys_order_like_floats():
    # The int32 key is monotone in the float value (and maps -0.0 onto 0.0's key).
    vals = np.array(
        [-np.inf, -3e38, -1.0, -1e-30, -1e-45, -0.0, 0.0, 1e-45, 1e-30, 1.0, 3e38, np.inf],
        np.float32,
    )
    keys = np.asarray(topk._keys(jnp.asarray(vals)))
    assert np.all(np.diff(keys[:5]) > 0) and np.all(np.diff(keys[6:]) > 0)
    assert keys[5] == keys[6] == 0 and keys[4] < 0 < keys[7]
    assert keys[0] > np.iinfo(np.int32).min  # padding's key is strictly below -inf's


# ------------------------------------------------------------------------------------------
# Lowering checks (no accelerator): Pallas -> Triton IR
# ------------------------------------------------------------------------------------------


@pytest.fixture
def gpu_platform():
    """Backends resolve as on a GPU, so "pallas_gpu" means the native kernel, not interpret mode
    (which on a CPU host would export the interpreter's XLA ops, no Triton call)."""
    with assume_platform("gpu"):
        yield


def test_export_cuda_quest_shape(gpu_platform):
    s = jax.ShapeDtypeStruct((512, 2048), jnp.float32)
    exp = export_cuda(lambda s: topk_ids(s, 512, backend="pallas_gpu"), s)
    assert _TRITON_CALL in exp.mlir_module()
    assert exp.out_avals[0].shape == (512, 512) and exp.out_avals[0].dtype == jnp.int32


@pytest.mark.parametrize("shape,k", [((2, 4, 300), 7), ((3, 5000), 5000)])
def test_export_cuda_other_shapes(gpu_platform, shape, k):
    s = jax.ShapeDtypeStruct(shape, jnp.float32)
    exp = export_cuda(lambda s: topk_ids(s, k, backend="pallas_gpu"), s)
    assert _TRITON_CALL in exp.mlir_module()
    assert exp.out_avals[0].shape == shape[:-1] + (k,)


def test_max_cols_config_moves_the_cut(gpu_platform):
    # The same 5000-column rows take the kernel by default and lax.top_k under max_cols=4096.
    s = jax.ShapeDtypeStruct((3, 5000), jnp.float32)
    short = topk.TopKGpuConfig(max_cols=4096)
    exp = export_cuda(lambda s: topk_ids(s, 8, backend="pallas_gpu", config=short), s)
    assert _TRITON_CALL not in exp.mlir_module()


def test_long_rows_export_without_triton(gpu_platform):
    # Rows longer than TopKGpuConfig.max_cols take lax.top_k: no Triton call in the module.
    s = jax.ShapeDtypeStruct((4, topk.TopKGpuConfig().max_cols + 1), jnp.float32)
    exp = export_cuda(lambda s: topk_ids(s, 64, backend="pallas_gpu"), s)
    assert _TRITON_CALL not in exp.mlir_module()


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [0, -1, 11, 100])
def test_bad_k_range(backend, k):
    with pytest.raises(ValueError, match=r"k must be in \[1, N\] with N=10"):
        topk_ids(jnp.zeros((4, 10), jnp.float32), k, backend=backend)


@pytest.mark.parametrize("k", [2.0, True, None, np.array(3)])
def test_bad_k_type(k):
    with pytest.raises(ValueError, match="k must be a static int"):
        topk_ids(jnp.zeros((4, 10), jnp.float32), k)


@pytest.mark.parametrize(
    "scores",
    [
        jnp.zeros((4, 10), jnp.bfloat16),
        jnp.zeros((4, 10), jnp.int32),
        np.zeros((4, 10), np.float64),
    ],
    ids=["bfloat16", "int32", "float64"],
)
def test_bad_dtype(scores):
    with pytest.raises(ValueError, match=r"scores must have dtype in \(float32\)"):
        topk_ids(scores, 3)


def test_bad_config():
    with pytest.raises(ValueError, match="TopKGpuConfig.max_cols must be an int >= 1"):
        topk.TopKGpuConfig(max_cols=0)
    with pytest.raises(ValueError, match="config must be None or a TopKGpuConfig, got int"):
        topk_ids(jnp.zeros((4, 10), jnp.float32), 3, config=4096)


def test_bad_rank_and_backend():
    with pytest.raises(ValueError, match=r"scores must have rank >= 1"):
        topk_ids(jnp.float32(1.0), 1)
    with pytest.raises(ValueError, match="backend must be"):
        topk_ids(jnp.zeros((4, 10), jnp.float32), 3, backend="cuda")
    # N = 0: no k is valid.
    with pytest.raises(ValueError, match=r"k must be in \[1, N\] with N=0"):
        topk_ids(jnp.zeros((4, 0), jnp.float32), 1)

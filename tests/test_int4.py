"""INT4 K: quantize / dequantize.

The jnp references are pinned by a hand-computed case, the round-trip bound and the documented
rule in numpy (tests/_quant_rule.py); the GPU (Triton, interpret mode) and TPU (Mosaic, TPU
interpreter) kernels are compared to them on fresh random inputs, then lowered for CUDA and TPU.
The paged INT4 writes are tested with the cache (tests/test_append.py, tests/test_cache.py).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from _export import export_cuda, export_tpu
from _quant_rule import HALF_ROW_NIBBLES, halves_rows, int4_rule, quantize_rule

from pallas_kernels import dequantize_int4, int4, quantize_int4
from twilight_jax import reference


@dataclasses.dataclass(frozen=True)
class Case:
    dtype: type
    head_dim: int

    def __str__(self):
        return f"{jnp.dtype(self.dtype).name}-D{self.head_dim}"


# Both float dtypes of the cache and both head_dims of the models; the interpreters compile each
# case separately, so the sweep is kept this short.
CASES = [Case(jnp.float32, 64), Case(jnp.bfloat16, 128)]
SEEDS = {str(c): i for i, c in enumerate(CASES)}

QUANTIZE = {"gpu": int4.quantize_int4_gpu, "tpu": int4.quantize_int4_tpu}
DEQUANTIZE = {"gpu": int4.dequantize_int4_gpu, "tpu": int4.dequantize_int4_tpu}


def _rows(rng, shape, dtype):
    """Random rows with per-row offset and spread; row 0 is constant (scale 0)."""
    x = rng.standard_normal(shape) * rng.uniform(0.1, 4.0, shape[:-1] + (1,))
    x = x + rng.uniform(-3, 3, shape[:-1] + (1,))
    x = x.reshape(-1, shape[-1])
    x[0] = 0.75
    return jnp.asarray(x.reshape(shape), dtype)


def _assert_equal(got, want):
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


# --------------------------------------------------------------------------------------------
# References


def test_quantize_micro_case():
    # D = 8 row with min 0 and max 15, so zero = 0 and scale = 15 / 15 = 1 and n = floor(x + .5):
    #   x = [0, 3, 1.5, 15 | 7.5, 0.2, 14.8, 6] -> n = [0, 3, 2, 15 | 8, 0, 15, 6]
    #   byte j = n[j] | n[j + 4] << 4 = [0 | 128, 3 | 0, 2 | 240, 15 | 96] = [128, 3, 242, 111]
    x = jnp.asarray([[0.0, 3.0, 1.5, 15.0, 7.5, 0.2, 14.8, 6.0]], jnp.float32)
    packed, scale, zero = quantize_int4(x, backend="reference")
    np.testing.assert_array_equal(np.asarray(packed), [[128, 3, 242, 111]])
    np.testing.assert_array_equal(np.asarray(scale), [1.0])
    np.testing.assert_array_equal(np.asarray(zero), [0.0])
    x_hat = dequantize_int4(packed, scale, zero, backend="reference")
    np.testing.assert_array_equal(np.asarray(x_hat), [[0, 3, 2, 15, 8, 0, 15, 6]])


# The reference on every dtype x head_dim; the kernels on the CASES shapes only (each new shape
# is another interpreter compile).
ROUND_TRIP = [("reference", dt, d) for dt in (jnp.float32, jnp.bfloat16) for d in (64, 128)] + [
    (backend, c.dtype, c.head_dim) for backend in ("pallas", "pallas_tpu") for c in CASES
]


@pytest.mark.parametrize(
    "backend,dtype,head_dim",
    ROUND_TRIP,
    ids=[f"{b}-{jnp.dtype(t).name}-D{d}" for b, t, d in ROUND_TRIP],
)
def test_round_trip_bound(backend, dtype, head_dim):
    rng = np.random.default_rng(100 + head_dim + (dtype == jnp.bfloat16))
    x = _rows(rng, (2, 37, head_dim), dtype)  # the shape of test_quantize_kernels: no recompile
    packed, scale, zero = quantize_int4(x, backend=backend)
    x_hat = np.asarray(dequantize_int4(packed, scale, zero, backend=backend))
    xf = np.asarray(x, np.float32)
    s = np.asarray(scale)[..., None]
    err = np.abs(xf - x_hat)
    # Half a step, plus float32 rounding of (x - zero) / scale and of scale * n + zero.
    assert (err <= s / 2 + 1e-5 * (np.abs(xf) + 1)).all(), err.max()
    np.testing.assert_array_equal(np.asarray(zero), xf.min(-1))
    # Constant row: scale 0, dequantizes exactly to the zero point.
    assert float(scale[0, 0]) == 0.0
    np.testing.assert_array_equal(x_hat[0, 0], np.full(head_dim, 0.75, np.float32))


# --------------------------------------------------------------------------------------------
# The documented rule, bit for bit (numpy float32 divides exactly; XLA turns a / constant and
# a / broadcast(b) into a * (1 / b) unless told not to)

RULE_QUANTIZERS = {
    "reference": int4.quantize_int4_reference,
    "gpu-interpret": lambda x: int4.quantize_int4_gpu(x, interpret=True),
    "tpu-interpret": lambda x: int4.quantize_int4_tpu(x, interpret=True),
}


@pytest.mark.parametrize("name", list(RULE_QUANTIZERS))
def test_quantizers_compute_the_documented_rule_bit_for_bit(name):
    x = halves_rows(np.random.default_rng(60), 512, 128)
    packed, scale, zero = RULE_QUANTIZERS[name](jnp.asarray(x, jnp.bfloat16))
    want = int4_rule(x)
    np.testing.assert_array_equal(np.asarray(scale), want[1])
    np.testing.assert_array_equal(np.asarray(zero), want[2])
    np.testing.assert_array_equal(np.asarray(packed), want[0])
    # HALF_ROW: (x - zero) / scale is exactly 4.5 for its second element, which gets nibble 5.
    lo = np.asarray(packed)[0, :2] & 15
    np.testing.assert_array_equal(lo, HALF_ROW_NIBBLES[:2])


@pytest.mark.parametrize(
    "name,fn",
    [("reference", reference.fake_quantize)],
)
@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quantize_computes_the_documented_rule_bit_for_bit(name, fn, bits):
    x = halves_rows(np.random.default_rng(62), 512, 128)
    levels = 2**bits - 1
    codes, scale, zero = quantize_rule(x, levels)
    want = codes.astype(np.float32) * scale[:, None] + zero[:, None]
    got = np.asarray(fn(jnp.asarray(x), bits))
    # Same codes: the dequantized values agree to float32 rounding of scale * code + zero
    # (XLA may fuse that into one FMA), far below half a step.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * (np.abs(want).max() + 1))
    got_codes = np.round((got - zero[:, None]) / np.where(scale > 0, scale, 1)[:, None])
    np.testing.assert_array_equal(got_codes, codes)


# --------------------------------------------------------------------------------------------
# Kernels vs references (interpret mode)


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_quantize_kernels(impl, case):
    rng = np.random.default_rng(10 + SEEDS[str(case)])
    # 2 * 37 rows: not a multiple of any row block, so edge blocks are exercised.
    x = _rows(rng, (2, 37, case.head_dim), case.dtype)
    want = int4.quantize_int4_reference(x)
    got = QUANTIZE[impl](x, interpret=True)
    _assert_equal(got, want)
    got = DEQUANTIZE[impl](*want, interpret=True)
    ref = dequantize_int4(*want, backend="reference")
    assert got.shape == ref.shape and got.dtype == jnp.float32
    # scale * n + zero may or may not be fused into one FMA.
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_public_backends_dispatch():
    x = _rows(np.random.default_rng(40), (2, 37, 64), jnp.float32)
    want = quantize_int4(x, backend="reference")
    _assert_equal(quantize_int4(x, backend="auto"), want)  # the reference on CPU
    small = {"pallas": int4.Int4GpuConfig(rows_per_block=8), "pallas_tpu": int4.Int4TpuConfig(32)}
    for backend, config in small.items():
        _assert_equal(quantize_int4(x, backend=backend, config=config), want)
        got = dequantize_int4(*want, backend=backend, config=config)
        ref = dequantize_int4(*want, backend="reference")
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Lowering (no accelerator needed)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_export_cuda(case):
    x = _rows(np.random.default_rng(0), (4, 8, case.head_dim), case.dtype)
    export_cuda(int4.quantize_int4_gpu, x)
    export_cuda(int4.dequantize_int4_gpu, *int4.quantize_int4_reference(x))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_export_tpu(case):
    x = _rows(np.random.default_rng(0), (4, 80, case.head_dim), case.dtype)
    export_tpu(int4.quantize_int4_tpu, x)
    export_tpu(int4.dequantize_int4_tpu, *int4.quantize_int4_reference(x))


# --------------------------------------------------------------------------------------------
# Validation


_X = jnp.zeros((3, 64), jnp.float32)
_P, _S, _Z = int4.quantize_int4_reference(_X)

BAD = {
    "x rank 0": (lambda: quantize_int4(jnp.float32(1.0)), "x"),
    "x odd D": (lambda: quantize_int4(jnp.zeros((3, 63))), "x last dim"),
    "x int dtype": (lambda: quantize_int4(jnp.zeros((3, 64), jnp.int32)), "x must have dtype"),
    "packed not uint8": (lambda: dequantize_int4(_P.astype(jnp.int32), _S, _Z), "packed"),
    "scale shape": (lambda: dequantize_int4(_P, _S[:2], _Z), "scale"),
    "zero dtype": (lambda: dequantize_int4(_P, _S, _Z.astype(jnp.bfloat16)), "zero"),
    "backend": (lambda: quantize_int4(_X, backend="cuda"), "backend"),
    "config kind": (lambda: quantize_int4(_X, config=object()), "config must be None or a"),
    "config for the other kernel": (
        lambda: quantize_int4(_X, backend="pallas_tpu", config=int4.Int4GpuConfig()),
        "config is a Int4GpuConfig, but backend='pallas_tpu' runs the TPU kernel",
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(name):
    fn, arg = BAD[name]
    with pytest.raises(ValueError, match=arg):
        fn()


def test_odd_head_dim_gpu():
    """head_dim 96: half 48, which the Triton kernels pad to 64 and mask."""
    x = _rows(np.random.default_rng(51), (5, 96), jnp.float32)
    want = int4.quantize_int4_reference(x)
    _assert_equal(int4.quantize_int4_gpu(x, interpret=True), want)
    got = int4.dequantize_int4_gpu(*want, interpret=True)
    ref = int4.dequantize_int4_reference(*want)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-6)
    export_cuda(int4.quantize_int4_gpu, x)


def test_config_validation():
    with pytest.raises(ValueError, match="Int4GpuConfig.rows_per_block"):
        int4.Int4GpuConfig(rows_per_block=24)
    with pytest.raises(ValueError, match="Int4GpuConfig.num_warps"):
        int4.Int4GpuConfig(num_warps=3)
    with pytest.raises(ValueError, match="Int4TpuConfig.rows_per_block"):
        int4.Int4TpuConfig(rows_per_block=40)

"""INT4 K: quantize / dequantize and the paged pack (prefill, decode).

The jnp references are pinned by a hand-computed case, the round-trip bound and a per-token
numpy loop over the paging rules; the GPU (Triton, interpret mode) and TPU (Mosaic, TPU
interpreter) kernels are compared to them on fresh random inputs, then lowered for CUDA and TPU.
The paged caches start as random bytes and scales (not zeros), so a write that lands in the
wrong place or a page that should stay untouched shows as a mismatch against the reference.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from _export import export_cuda, export_tpu
from _quant_rule import HALF_ROW, HALF_ROW_NIBBLES, halves_rows, int4_rule, quantize_rule

from pallas_kernels import dequantize_int4, int4, quantize_int4
from twilight_jax import reference


@dataclasses.dataclass(frozen=True)
class Case:
    dtype: type
    head_dim: int
    page_size: int

    def __str__(self):
        return f"{jnp.dtype(self.dtype).name}-D{self.head_dim}-S{self.page_size}"


# Every dtype, head_dim and page size the task names appears in at least one case; the
# interpreters compile each case separately, so the sweep is kept this short.
CASES = [Case(jnp.float32, 64, 1), Case(jnp.bfloat16, 128, 16)]
SEEDS = {str(c): i for i, c in enumerate(CASES)}

QUANTIZE = {"gpu": int4.quantize_int4_gpu, "tpu": int4.quantize_int4_tpu}
DEQUANTIZE = {"gpu": int4.dequantize_int4_gpu, "tpu": int4.dequantize_int4_tpu}
PREFILL = {"gpu": int4.int4_pack_prefill_gpu, "tpu": int4.int4_pack_prefill_tpu}
DECODE = {"gpu": int4.int4_pack_decode_gpu, "tpu": int4.int4_pack_decode_tpu}


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


def _pack_loop(cache, k_new, page_table, positions):
    """numpy, one token at a time: quantize_int4_reference of the row, written where the paging
    rules say. positions [B, T] (< 0 = skip)."""
    k_int4, k_scale, k_zero = (np.array(a) for a in cache)
    page_size, max_pages = k_int4.shape[2], page_table.shape[1]
    packed, scale, zero = (np.asarray(a) for a in int4.quantize_int4_reference(k_new))
    for b, t in np.ndindex(*positions.shape):
        pos = int(positions[b, t])
        if pos < 0 or pos // page_size >= max_pages:
            continue
        page, slot = int(page_table[b, pos // page_size]), pos % page_size
        if page == 0:
            continue
        k_int4[:, page, slot] = packed[b, t]
        k_scale[:, page, slot] = scale[b, t]
        k_zero[:, page, slot] = zero[b, t]
    return k_int4, k_scale, k_zero


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


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
def test_pack_kernels_round_exact_halves_up(impl):
    case = CASES[1]  # bfloat16, head_dim 128, page size 16
    args = list(_prefill_inputs(case, 61))
    k_new = np.asarray(args[3], np.float32)
    k_new[0, :3] = np.resize(np.asarray(HALF_ROW, np.float32), k_new.shape[-1])
    args[3] = jnp.asarray(k_new, case.dtype)
    want = int4.int4_pack_prefill_reference(*args)
    _assert_equal(PREFILL[impl](*args, interpret=True), want)
    # Token 0 of sequence 0 sits at position start[0], in page page_table[0, start[0] // S].
    s = case.page_size
    pos = int(args[5][0])
    page, slot = int(args[4][0, pos // s]), pos % s
    written = np.asarray(want[0])[:, page, slot]  # [Hkv, D/2]
    np.testing.assert_array_equal(written & 15, np.resize(HALF_ROW_NIBBLES, written.shape))


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
# Paged inputs


def _cache(case: Case, rng, batch=3, num_kv_heads=2, max_pages=4):
    s, half = case.page_size, case.head_dim // 2
    num_pages = batch * max_pages + 3  # page 0 is the null page; two pages never mapped
    k_int4 = jnp.asarray(rng.integers(0, 256, (num_kv_heads, num_pages, s, half)), jnp.uint8)
    k_scale = jnp.asarray(rng.uniform(0.1, 1.0, (num_kv_heads, num_pages, s)), jnp.float32)
    k_zero = jnp.asarray(rng.standard_normal((num_kv_heads, num_pages, s)), jnp.float32)
    perm = rng.permutation(num_pages - 1)[: batch * max_pages] + 1
    page_table = perm.reshape(batch, max_pages)
    page_table[2, 1] = 0  # an unmapped logical page: writes there are skipped
    return (k_int4, k_scale, k_zero), jnp.asarray(page_table, jnp.int32)


def _prefill_inputs(case: Case, seed: int):
    rng = np.random.default_rng(seed)
    cache, page_table = _cache(case, rng)
    s = case.page_size
    tokens = s + 3  # every sequence's block spans at least two pages
    k_new = _rows(rng, (3, tokens, 2, case.head_dim), case.dtype)
    # seq 0 starts mid-page and writes all tokens (crosses a page boundary); seq 1 writes one
    # token at position 0; seq 2 starts at -1 (that token skipped) and reaches the null page.
    start = jnp.asarray([s - 1 if s > 1 else 2, 0, -1], jnp.int32)
    count = jnp.asarray([tokens, 1, tokens], jnp.int32)
    return (*cache, k_new, page_table, start, count)


def _decode_inputs(case: Case, seed: int):
    rng = np.random.default_rng(seed)
    cache, page_table = _cache(case, rng, batch=5)
    s = case.page_size
    k_new = _rows(rng, (5, 2, case.head_dim), case.dtype)
    # skip, first slot of a page, last slot of page 0, past the page table, the null page.
    positions = jnp.asarray([-1, s, s - 1, 4 * s, s + (s > 1)], jnp.int32)
    page_table = page_table.at[4, 1].set(0)
    return (*cache, k_new, page_table, positions)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_pack_prefill_reference_matches_loop(case):
    args = _prefill_inputs(case, SEEDS[str(case)])
    cache, k_new, page_table, start, count = args[:3], args[3], args[4], args[5], args[6]
    t = np.arange(k_new.shape[1])[None, :]
    positions = np.where(t < np.asarray(count)[:, None], np.asarray(start)[:, None] + t, -1)
    want = _pack_loop(cache, k_new, np.asarray(page_table), positions)
    got = int4.int4_pack_prefill(*args, backend="reference")
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), w)
    assert (np.asarray(got[0]) != np.asarray(cache[0])).any()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_pack_decode_reference_matches_loop(case):
    args = _decode_inputs(case, SEEDS[str(case)])
    cache, k_new, page_table, positions = args[:3], args[3], args[4], args[5]
    want = _pack_loop(cache, k_new[:, None], np.asarray(page_table), np.asarray(positions)[:, None])
    got = int4.int4_pack_decode(*args, backend="reference")
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), w)


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


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_pack_prefill_kernels(impl, case):
    args = _prefill_inputs(case, 20 + SEEDS[str(case)])
    _assert_equal(PREFILL[impl](*args, interpret=True), int4.int4_pack_prefill_reference(*args))


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_pack_decode_kernels(impl, case):
    args = _decode_inputs(case, 30 + SEEDS[str(case)])
    _assert_equal(DECODE[impl](*args, interpret=True), int4.int4_pack_decode_reference(*args))


def test_public_backends_dispatch():
    case = CASES[0]
    args = _decode_inputs(case, 40)
    want = int4.int4_pack_decode(*args, backend="reference")
    _assert_equal(int4.int4_pack_decode(*args, backend="pallas"), want)
    _assert_equal(int4.int4_pack_decode(*args, backend="auto"), want)  # reference on CPU


# --------------------------------------------------------------------------------------------
# Lowering (no accelerator needed)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_export_cuda(case):
    x = _rows(np.random.default_rng(0), (4, 8, case.head_dim), case.dtype)
    export_cuda(int4.quantize_int4_gpu, x)
    export_cuda(int4.dequantize_int4_gpu, *int4.quantize_int4_reference(x))
    export_cuda(int4.int4_pack_prefill_gpu, *_prefill_inputs(case, 0))
    export_cuda(int4.int4_pack_decode_gpu, *_decode_inputs(case, 0))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_export_tpu(case):
    x = _rows(np.random.default_rng(0), (4, 80, case.head_dim), case.dtype)
    export_tpu(int4.quantize_int4_tpu, x)
    export_tpu(int4.dequantize_int4_tpu, *int4.quantize_int4_reference(x))
    export_tpu(int4.int4_pack_prefill_tpu, *_prefill_inputs(case, 0))
    export_tpu(int4.int4_pack_decode_tpu, *_decode_inputs(case, 0))


# --------------------------------------------------------------------------------------------
# Validation


def _bad_prefill(**overrides):
    args = dict(
        zip(
            ("k_int4", "k_scale", "k_zero", "k_new", "page_table", "start", "count"),
            _prefill_inputs(CASES[0], 0),
        )
    )
    args.update(overrides)
    return lambda: int4.int4_pack_prefill(*args.values(), backend="reference")


def _bad_decode(**overrides):
    args = dict(
        zip(
            ("k_int4", "k_scale", "k_zero", "k_new", "page_table", "positions"),
            _decode_inputs(CASES[0], 0),
        )
    )
    args.update(overrides)
    return lambda: int4.int4_pack_decode(*args.values(), backend="reference")


_X = jnp.zeros((3, 64), jnp.float32)
_P, _S, _Z = int4.quantize_int4_reference(_X)

BAD = {
    "x rank 0": (lambda: quantize_int4(jnp.float32(1.0)), "x"),
    "x odd D": (lambda: quantize_int4(jnp.zeros((3, 63))), "x last dim"),
    "x int dtype": (lambda: quantize_int4(jnp.zeros((3, 64), jnp.int32)), "x must have dtype"),
    "packed not uint8": (lambda: dequantize_int4(_P.astype(jnp.int32), _S, _Z), "packed"),
    "scale shape": (lambda: dequantize_int4(_P, _S[:2], _Z), "scale"),
    "zero dtype": (lambda: dequantize_int4(_P, _S, _Z.astype(jnp.bfloat16)), "zero"),
    "k_int4 rank": (_bad_prefill(k_int4=jnp.zeros((2, 15, 32), jnp.uint8)), "k_int4"),
    "k_int4 dtype": (_bad_prefill(k_int4=jnp.zeros((2, 15, 1, 32), jnp.int8)), "k_int4"),
    "k_scale pages": (_bad_prefill(k_scale=jnp.zeros((2, 14, 1), jnp.float32)), "k_scale"),
    "k_zero dtype": (_bad_prefill(k_zero=jnp.zeros((2, 15, 1), jnp.bfloat16)), "k_zero"),
    "k_new head_dim": (_bad_prefill(k_new=jnp.zeros((3, 4, 2, 66))), "k_new"),
    "k_new heads": (_bad_prefill(k_new=jnp.zeros((3, 4, 3, 64))), "k_new"),
    "k_new rank": (_bad_prefill(k_new=jnp.zeros((3, 2, 64))), "k_new"),
    "page_table batch": (_bad_prefill(page_table=jnp.zeros((2, 4), jnp.int32)), "page_table"),
    "page_table dtype": (_bad_prefill(page_table=jnp.zeros((3, 4), jnp.float32)), "page_table"),
    "start shape": (_bad_prefill(start=jnp.zeros((2,), jnp.int32)), "start"),
    "count dtype": (_bad_prefill(count=jnp.zeros((3,), jnp.float32)), "count"),
    "decode k_new rank": (_bad_decode(k_new=jnp.zeros((5, 1, 2, 64))), "k_new"),
    "positions rank": (_bad_decode(positions=jnp.zeros((5, 1), jnp.int32)), "positions"),
    "backend": (lambda: quantize_int4(_X, backend="cuda"), "backend"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(name):
    fn, arg = BAD[name]
    with pytest.raises(ValueError, match=arg):
        fn()


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
def test_odd_sizes(impl):
    """head_dim 96 (half 48: the Triton kernels pad to 64 and mask) and page size 3."""
    case = Case(jnp.float32, 96, 3)
    args = _prefill_inputs(case, 50)
    _assert_equal(PREFILL[impl](*args, interpret=True), int4.int4_pack_prefill_reference(*args))
    if impl == "gpu":
        x = _rows(np.random.default_rng(51), (5, 96), jnp.float32)
        want = int4.quantize_int4_reference(x)
        _assert_equal(int4.quantize_int4_gpu(x, interpret=True), want)
        got = int4.dequantize_int4_gpu(*want, interpret=True)
        ref = int4.dequantize_int4_reference(*want)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-6)
        export_cuda(int4.quantize_int4_gpu, x)
        export_cuda(int4.int4_pack_prefill_gpu, *args)


def test_config_validation():
    with pytest.raises(ValueError, match="rows_per_block"):
        int4.Int4GpuConfig(rows_per_block=24)
    with pytest.raises(ValueError, match="rows_per_block"):
        int4.Int4TpuConfig(rows_per_block=40)

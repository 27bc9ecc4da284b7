"""cache_append_decode: the GPU kernel (interpret mode) against the reference, bit for bit, and
the reference against the rule written out in numpy, with float and with INT8 Quest metadata."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _export import export_cuda
from _quant_rule import page_bounds_rule

from pallas_kernels import _common, append, quest
from pallas_kernels.int4 import quantize_int4_reference

HKV, S = 3, 4


def _case(seed, batch, d, dtype, num_pages=13, max_pages=3):
    rng = np.random.default_rng(seed)
    shape = (HKV, num_pages, S)
    cache = (
        jnp.asarray(rng.standard_normal((*shape, d)), dtype),
        jnp.asarray(rng.standard_normal((*shape, d)), dtype),
        jnp.asarray(rng.integers(0, 256, (*shape, d // 2)), jnp.uint8),
        jnp.asarray(rng.random(shape), jnp.float32),
        jnp.asarray(rng.random(shape), jnp.float32),
        jnp.asarray(rng.standard_normal((HKV, num_pages, d)), dtype),
        jnp.asarray(rng.standard_normal((HKV, num_pages, d)), dtype),
    )
    new = (
        jnp.asarray(rng.standard_normal((batch, HKV, d)), jnp.float32),
        jnp.asarray(rng.standard_normal((batch, HKV, d)), jnp.float32),
    )
    # Distinct pages per sequence (as an allocator hands out); 0 is the null page.
    pages = rng.permutation(np.arange(1, num_pages))[: batch * max_pages]
    table = jnp.asarray(pages.reshape(batch, max_pages), jnp.int32)
    # Slot 0 (a fresh page), mid-page, the last slot, skipped (< 0) and past the table.
    choices = np.array([0, 1, S - 1, S, 2 * S + 2, -1, max_pages * S + 1])
    pos = jnp.asarray(rng.choice(choices, batch), jnp.int32)
    return cache, new, table, pos


def _numpy_rule(cache, new, table, pos):
    out = [np.array(x) for x in cache]
    kp, vp, k4, ks, kz, mn, mx = out
    k_new, v_new = (np.asarray(x) for x in new)
    for b, p in enumerate(np.asarray(pos)):
        if p < 0 or p // S >= table.shape[1]:
            continue
        page, slot = int(table[b, p // S]), p % S
        k = np.asarray(jnp.asarray(k_new[b]).astype(kp.dtype))
        packed, scale, zero = (np.asarray(x) for x in quantize_int4_reference(k.astype(np.float32)))
        kp[:, page, slot] = k
        vp[:, page, slot] = np.asarray(jnp.asarray(v_new[b]).astype(vp.dtype))
        k4[:, page, slot], ks[:, page, slot], kz[:, page, slot] = packed, scale, zero
        mn[:, page] = k if slot == 0 else np.minimum(mn[:, page], k)
        mx[:, page] = k if slot == 0 else np.maximum(mx[:, page], k)
    return out


@pytest.mark.parametrize("batch", [1, 5, 20])
@pytest.mark.parametrize("d,dtype", [(64, jnp.bfloat16), (16, jnp.float32), (48, jnp.bfloat16)])
def test_kernel_matches_reference_and_rule(batch, d, dtype):
    cache, new, table, pos = _case(batch * 7 + d, batch, d, dtype, num_pages=3 * batch + 1)
    ref = append.cache_append_decode(*cache, *new, table, pos, backend="reference")
    got = append.cache_append_decode(*cache, *new, table, pos, backend="pallas_gpu")
    rule = _numpy_rule(cache, new, table, pos)
    for name, r, g, w in zip(("kp", "vp", "k4", "ks", "kz", "mn", "mx"), ref, got, rule):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r), err_msg=f"kernel {name}")
        np.testing.assert_array_equal(np.asarray(r), w, err_msg=f"reference {name}")


def test_a_skipped_or_inactive_sequence_writes_nothing():
    cache, new, table, _ = _case(3, 4, 32, jnp.bfloat16, num_pages=13)
    pos = jnp.full((4,), -1, jnp.int32)
    for backend in ("reference", "pallas_gpu"):
        out = append.cache_append_decode(*cache, *new, table, pos, backend=backend)
        for a, b in zip(out, cache):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.__setitem__(1, a[1][..., :8]), "v_pages must have shape"),
        (lambda a: a.__setitem__(2, a[2].astype(jnp.int32)), "k_int4 must have dtype"),
        (lambda a: a.__setitem__(7, a[7][:, :2]), "k_new must have shape"),
        (lambda a: a.__setitem__(10, a[10].astype(jnp.int16)), "positions must have dtype"),
    ],
)
def test_bad_arguments_name_themselves(change, match):
    cache, new, table, pos = _case(0, 2, 16, jnp.float32)
    args = [*cache, *new, table, pos]
    change(args)
    with pytest.raises(ValueError, match=match):
        append.cache_append_decode(*args)


def test_config():
    cache, new, table, pos = _case(5, 5, 32, jnp.bfloat16, num_pages=16)
    ref = append.cache_append_decode(*cache, *new, table, pos, backend="reference")
    small = append.AppendGpuConfig(seqs_per_block=2, num_warps=2)  # 3 programs per KV head
    got = append.cache_append_decode(*cache, *new, table, pos, backend="pallas_gpu", config=small)
    for r, g in zip(ref, got):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
    with pytest.raises(ValueError, match="AppendGpuConfig.seqs_per_block must be a power of two"):
        append.AppendGpuConfig(seqs_per_block=3)
    with pytest.raises(ValueError, match="config must be None or a AppendGpuConfig, got str"):
        append.cache_append_decode(*cache, *new, table, pos, config="small")


# --------------------------------------------------------------------------------------------
# INT8 Quest metadata (codes and a scale per page, pallas_kernels.quest)


def _int8(cache):
    """The case's cache with its random float min / max quantized to INT8 (k_mm_scale last)."""
    lo, hi, scale = quest.quantize_page_bounds(cache[5], cache[6])
    return (*cache[:5], lo, hi), scale


def _int8_rule(cache, scale, new, table, pos):
    """The INT8 append written out in numpy: pages as _numpy_rule, the touched pages' bounds by
    tests/_quant_rule.page_bounds_rule."""
    out = _numpy_rule(cache, new, table, pos)
    mn, mx = (np.array(x) for x in cache[5:7])
    sc = np.array(scale)
    for b, p in enumerate(np.asarray(pos)):
        if p < 0 or p // S >= table.shape[1]:
            continue
        page, slot = int(table[b, p // S]), p % S
        k = np.asarray(jnp.asarray(new[0][b]).astype(cache[0].dtype), np.float32)
        fresh = np.full((HKV,), slot == 0)
        mn[:, page], mx[:, page], sc[:, page] = page_bounds_rule(
            mn[:, page], mx[:, page], sc[:, page], k, k, fresh
        )
    return [*out[:5], mn, mx, sc]


@pytest.mark.parametrize("batch", [1, 20])
@pytest.mark.parametrize("d,dtype", [(64, jnp.bfloat16), (16, jnp.float32), (48, jnp.bfloat16)])
def test_int8_kernel_matches_reference_and_rule(batch, d, dtype):
    cache, new, table, pos = _case(batch * 11 + d, batch, d, dtype, num_pages=3 * batch + 1)
    cache, scale = _int8(cache)
    kw = dict(k_mm_scale=scale)
    ref = append.cache_append_decode(*cache, *new, table, pos, backend="reference", **kw)
    got = append.cache_append_decode(*cache, *new, table, pos, backend="pallas_gpu", **kw)
    rule = _int8_rule(cache, scale, new, table, pos)
    assert len(ref) == len(got) == 8
    names = ("kp", "vp", "k4", "ks", "kz", "mn", "mx", "scale")
    for name, r, g, w in zip(names, ref, got, rule):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r), err_msg=f"kernel {name}")
        np.testing.assert_array_equal(np.asarray(r), w, err_msg=f"reference {name}")


def _fill_page(backend, keys, start_lo, start_hi):
    """Appends keys [n, Hkv, D] one by one at slots 1.. of page 1 (its slot 0 already written:
    metadata quantize_page_bounds(start_lo, start_hi)); -> (min codes, max codes, scale) after
    each append."""
    n, hkv, d = keys.shape
    shape = (hkv, 2, n + 1)
    cache = (
        jnp.zeros((*shape, d), jnp.float32),
        jnp.zeros((*shape, d), jnp.float32),
        jnp.zeros((*shape, d // 2), jnp.uint8),
        jnp.zeros(shape, jnp.float32),
        jnp.zeros(shape, jnp.float32),
    )
    lo, hi, scale = quest.quantize_page_bounds(
        jnp.zeros((hkv, 2, d)).at[:, 1].set(start_lo), jnp.zeros((hkv, 2, d)).at[:, 1].set(start_hi)
    )
    table = jnp.ones((1, 1), jnp.int32)
    states = []
    for i in range(n):
        out = append.cache_append_decode(
            *cache,
            lo,
            hi,
            jnp.asarray(keys[i : i + 1]),
            jnp.asarray(keys[i : i + 1]),
            table,
            jnp.asarray([i + 1], jnp.int32),
            k_mm_scale=scale,
            backend=backend,
        )
        cache, (lo, hi, scale) = out[:5], out[5:]
        states.append([np.asarray(x[:, 1]) for x in (lo, hi, scale)])
    return states


@pytest.mark.parametrize("backend", ["reference", "pallas_gpu"])
def test_int8_keys_inside_the_bounds_leave_the_page_bit_for_bit(backend):
    """Keys within the page's dequantized bounds keep its scale, so its codes stay exactly as
    they were: they are kept, not requantized through code * s / s (which moves some codes a
    step outward; checked below so the test would see it)."""
    rng = np.random.default_rng(21)
    d = 32
    start_lo = -2 - rng.random((HKV, d)).astype(np.float32)
    start_hi = 2 + rng.random((HKV, d)).astype(np.float32)
    lo0, hi0, s0 = (
        np.asarray(x)
        for x in quest.quantize_page_bounds(jnp.asarray(start_lo), jnp.asarray(start_hi))
    )
    keys = rng.uniform(-2, 2, (6, HKV, d)).astype(np.float32)
    for lo, hi, scale in _fill_page(backend, keys, start_lo, start_hi):
        np.testing.assert_array_equal(scale, s0)
        np.testing.assert_array_equal(lo, lo0)
        np.testing.assert_array_equal(hi, hi0)
    s = s0[:, None]
    naive = np.floor(lo0.astype(np.float32) * s / s) != lo0
    naive |= np.ceil(hi0.astype(np.float32) * s / s) != hi0
    assert naive.any()


@pytest.mark.parametrize("backend", ["reference", "pallas_gpu"])
def test_int8_bounds_hold_every_key_as_the_page_grows(backend):
    """Keys of growing magnitude (the scale changes at most appends): after each append the
    dequantized bounds hold every key so far, at most one scale step outward per append."""
    rng = np.random.default_rng(22)
    d = 16
    first = rng.standard_normal((HKV, d)).astype(np.float32)
    keys = (rng.standard_normal((7, HKV, d)) * np.linspace(1, 4, 7)[:, None, None]).astype(
        np.float32
    )
    scales = []
    for i, (lo, hi, scale) in enumerate(_fill_page(backend, keys, first, first)):
        seen = np.concatenate([first[None], keys[: i + 1]])
        mn, mx = seen.min(0), seen.max(0)
        s = scale[:, None]
        slack = 1e-6 * np.abs(seen).max()
        assert (lo * s <= mn + slack).all() and (hi * s >= mx - slack).all()
        assert (mn - lo * s <= (i + 2) * s + slack).all()
        assert (hi * s - mx <= (i + 2) * s + slack).all()
        np.testing.assert_array_equal(
            scale,
            np.maximum(np.abs(seen).max((0, 2)) / np.float32(127), scales[-1] if scales else 0),
        )
        scales.append(scale)
    assert len({tuple(x) for x in scales}) > 3  # the scale did change along the way


def test_int8_bad_scale_names_itself():
    cache, new, table, pos = _case(0, 2, 16, jnp.float32)
    cache, scale = _int8(cache)
    with pytest.raises(ValueError, match="k_mm_scale must have shape"):
        append.cache_append_decode(*cache, *new, table, pos, k_mm_scale=scale[:, :3])
    with pytest.raises(ValueError, match="k_min must have dtype"):  # int8 codes, no scale
        append.cache_append_decode(*cache, *new, table, pos)


@pytest.mark.parametrize("d,dtype", [(64, jnp.bfloat16), (48, jnp.float32), (16, jnp.bfloat16)])
def test_word_stores_write_the_same_bytes(d, dtype):
    # The INT4 codes stored as 4-byte words: D/2 = 32, 24 and 8 columns (the 24 as 6 words,
    # padded to 8 in the kernel).
    cache, new, table, pos = _case(17 + d, 5, d, dtype, num_pages=16)
    ref = append.cache_append_decode(*cache, *new, table, pos, backend="reference")
    words = append.AppendGpuConfig(word_stores=True)
    got = append.cache_append_decode_gpu(*cache, *new, table, pos, interpret=True, config=words)
    for name, r, g in zip(("kp", "vp", "k4", "ks", "kz", "mn", "mx"), ref, got):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r), err_msg=name)
    export_cuda(
        lambda *a: append.cache_append_decode_gpu(*a, config=words), *cache, *new, table, pos
    )


def test_large_int4_pools_store_words():
    # k_int4 of 2**31 to 2**32 bytes: byte offsets past 2**31 would wrap in the kernel's 32-bit
    # indexing (a 16-layer, batch 8, 32K cache of LLaMA-3.1-8B shapes decoded garbage on an
    # H200 that way), so the kernel stores 4-byte words there; below and above, bytes.
    def k4_operand(pages):
        shapes = [
            jax.ShapeDtypeStruct((8, pages, 16, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((8, pages, 16, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((8, pages, 16, 64), jnp.uint8),
            jax.ShapeDtypeStruct((8, pages, 16), jnp.float32),
            jax.ShapeDtypeStruct((8, pages, 16), jnp.float32),
            jax.ShapeDtypeStruct((8, pages, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((8, pages, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((8, 8, 128), jnp.float32),
            jax.ShapeDtypeStruct((8, 8, 128), jnp.float32),
            jax.ShapeDtypeStruct((8, 2048), jnp.int32),
            jax.ShapeDtypeStruct((8,), jnp.int32),
        ]
        jaxpr = jax.make_jaxpr(append.cache_append_decode_gpu)(*shapes)
        calls = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "pallas_call"]
        assert len(calls) == 1
        return calls[0].invars[4 + 2].aval  # after k_new, v_new, positions, page_table

    assert k4_operand(16 * 16385).dtype == jnp.uint32  # 2**31 + 131072 bytes
    assert k4_operand(16 * 12289).dtype == jnp.uint8  # 1.6e9 bytes
    assert k4_operand(16 * 32769).dtype == jnp.uint8  # over 2**32: 64-bit offsets


def _all_eqns(jaxpr):
    for e in jaxpr.eqns:  # and those of the jaxprs in their params (jit, pallas_call)
        yield e
        for v in e.params.values():
            if hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                yield from _all_eqns(v.jaxpr)
            elif hasattr(v, "eqns"):
                yield from _all_eqns(v)


def test_config_word_stores():
    with pytest.raises(ValueError, match="AppendGpuConfig.word_stores must be None or a bool"):
        append.AppendGpuConfig(word_stores=1)


def test_one_byte_arrays_past_2_31_elements_are_named():
    # jax's Pallas Triton lowering indexes arrays of at most 2**32 bytes with signed 32-bit
    # element offsets: for one-byte elements those wrap from 2**31 on.
    def arr(n, dtype=jnp.uint8):
        return jax.ShapeDtypeStruct((n,), dtype)

    overflow = _common.triton_offsets_overflow
    assert not overflow(arr(2**31 - 1))
    assert overflow(arr(2**31)) and overflow(arr(2**32)) and overflow(arr(2**31, jnp.int8))
    assert not overflow(arr(2**32 + 1))  # 64-bit offsets above 2**32 bytes
    assert not overflow(arr(2**31, jnp.bfloat16))
    with pytest.raises(ValueError, match="k_min holds 2147483648 one-byte elements.*use this"):
        _common.check_triton_offsets("k_min", arr(2**31, jnp.int8), "use this")
    _common.check_triton_offsets("k_min", arr(2**31 - 1, jnp.int8), "fine")

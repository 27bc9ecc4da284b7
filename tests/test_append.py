"""cache_append_decode: the GPU kernel (interpret mode) against the reference, bit for bit, and
the reference against the rule written out in numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import append
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

"""PagedKVCache writes (bulk prefill, decode append, metadata) and the host page allocator.

Expected values are computed here in numpy from the definitions in docs/kernel_api.md (INT4:
zero = min, scale = (max - min) / 15, split-halves nibbles; Quest: per-page min/max over the
page's valid tokens, as INT8 codes s = max|bound| / 127, floor(min / s), ceil(max / s) when
quantized once; DS labels: K at the heavy channels), on fresh random K/V.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twilight_jax import OutOfPagesError, PageAllocator, PagedKVCache
from twilight_jax.selectors import calibrate_double_sparsity, load_ds_channels, save_ds_channels

L, HKV, D = 2, 2, 8


def _kv(rng, b, t, dtype=np.float32):
    k = rng.standard_normal((L, b, t, HKV, D)).astype(dtype)
    v = rng.standard_normal((L, b, t, HKV, D)).astype(dtype)
    return k, v


def _read_token(arr, cache, layer, b, pos):
    """arr [Hkv, L, P, S, ...] at logical position pos of sequence b -> [Hkv, ...]."""
    page = cache.page_table[b, pos // cache.page_size]
    return arr[:, layer, page, pos % cache.page_size].astype(np.float32)


def _quantize_np(x):
    """-> (nibbles [..., D] uint8 rounded half up, tie [..., D] bool where (x - zero) / scale
    is within float error of a .5 tie, so a differently rounded division may land on either
    side), scale, zero."""
    zero = x.min(-1)
    scale = (x.max(-1) - zero) / 15
    code = (x - zero[..., None]) / np.where(scale > 0, scale, 1)[..., None]
    code = np.where(scale[..., None] > 0, code, 0)
    tie = np.abs(code - np.floor(code) - 0.5) < 1e-4
    return np.floor(code + 0.5).clip(0, 15).astype(np.uint8), tie, scale, zero


def _unpack(packed):
    return np.concatenate([packed & 15, packed >> 4], -1)


def _check_against_dense(cache, k, v, lengths, channels=None, quest_exact=True):
    """Every valid token's pages, INT4 rows, labels and every live page's Quest min/max."""
    s = cache.page_size
    cache = jax.tree_util.tree_map(np.asarray, cache)  # host copies: indexed per token below
    for layer in range(k.shape[0]):
        for b, n in enumerate(lengths):
            for pos in range(n):
                kt = k[layer, b, pos].astype(np.float32)
                np.testing.assert_array_equal(_read_token(cache.k_pages, cache, layer, b, pos), kt)
                np.testing.assert_array_equal(
                    _read_token(cache.v_pages, cache, layer, b, pos), v[layer, b, pos]
                )
                nib, tie, scale, zero = _quantize_np(kt)
                got = _unpack(cache.k_int4[:, layer, cache.page_table[b, pos // s], pos % s])
                diff = np.abs(got.astype(np.int32) - nib)
                assert (diff <= tie).all(), (got, nib)
                np.testing.assert_allclose(
                    _read_token(cache.k_scale, cache, layer, b, pos), scale, rtol=1e-6
                )
                np.testing.assert_array_equal(_read_token(cache.k_zero, cache, layer, b, pos), zero)
                if channels is not None:
                    lab = np.take_along_axis(kt, channels[layer], axis=-1)
                    np.testing.assert_array_equal(
                        _read_token(cache.ds_labels, cache, layer, b, pos), lab
                    )
            for lp in range(-(-n // s)):
                page = int(cache.page_table[b, lp])
                rows = k[layer, b, lp * s : min(n, (lp + 1) * s)].astype(np.float32)
                _check_quest_page(cache, layer, page, rows, quest_exact)


def _check_quest_page(cache, layer, page, rows, exact):
    """The Quest metadata of one page against its rows [n, Hkv, D] (float32). Native: the
    min / max exactly. INT8 quantized once (exact): the codes of the rule, bit for bit (numpy
    float32 division is correctly rounded, like the cache's). INT8 widened token by token:
    bounds that hold every row, at most one scale step outward per row the page took (each
    rescale can round the old code outward once)."""
    mn, mx = rows.min(0), rows.max(0)
    if cache.k_mm_scale is None:
        np.testing.assert_array_equal(cache.k_min[:, layer, page].astype(np.float32), mn)
        np.testing.assert_array_equal(cache.k_max[:, layer, page].astype(np.float32), mx)
        return
    lo = cache.k_min[:, layer, page].astype(np.float32)
    hi = cache.k_max[:, layer, page].astype(np.float32)
    scale = cache.k_mm_scale[:, layer, page][:, None]
    if exact:
        want = np.maximum(np.abs(mn).max(-1), np.abs(mx).max(-1)) / np.float32(127)
        np.testing.assert_array_equal(scale[:, 0], want)
        safe = np.where(scale > 0, scale, np.float32(1))
        np.testing.assert_array_equal(lo, np.clip(np.floor(mn / safe), -127, 127))
        np.testing.assert_array_equal(hi, np.clip(np.ceil(mx / safe), -127, 127))
        return
    slack = 1e-6 * np.abs(rows).max()  # float rounding of code * scale
    assert (lo * scale <= mn + slack).all() and (hi * scale >= mx - slack).all()
    steps = rows.shape[0] * scale + slack
    assert (mn - lo * scale <= steps).all() and (hi * scale - mx <= steps).all()


@pytest.mark.parametrize("page_size", [4, 8])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
# 8192: one write per layer; 4, 7 and 8: several page-aligned chunks (7 rounds down to whole
# pages, at least one), the last one partial, the 9-token row ending inside the second chunk.
@pytest.mark.parametrize("chunk_tokens", [8192, 4, 7, 8])
def test_from_dense_round_trip(page_size, dtype, chunk_tokens):
    rng = np.random.default_rng(page_size + chunk_tokens)
    b, t = 3, 21
    k, v = _kv(rng, b, t)
    k, v = jnp.asarray(k, dtype), jnp.asarray(v, dtype)
    lengths = [t, 0, 9]
    channels = np.stack([np.stack([rng.choice(D, 3, replace=False) for _ in range(HKV)])] * L)
    cache = PagedKVCache.from_dense(
        k,
        v,
        jnp.asarray(lengths),
        page_size=page_size,
        ds_channel_idx=jnp.asarray(channels),
        chunk_tokens=chunk_tokens,
    )
    max_pages = -(-t // page_size)
    assert cache.k_pages.shape == (HKV, L, 1 + b * max_pages, page_size, D)
    assert cache.k_pages.dtype == dtype and cache.k_min.dtype == jnp.int8
    assert cache.quest_metadata == "int8" and cache.k_mm_scale.shape == cache.k_min.shape[:3]
    assert cache.k_int4.shape[-1] == D // 2 and cache.k_int4.dtype == jnp.uint8
    np.testing.assert_array_equal(
        cache.page_table, 1 + np.arange(b * max_pages).reshape(b, max_pages)
    )
    np.testing.assert_array_equal(cache.lengths, lengths)
    _check_against_dense(
        cache, np.asarray(k, np.float32), np.asarray(v, np.float32), lengths, channels
    )


def test_from_dense_chunk_tokens_validated():
    k = jnp.zeros((1, 4, HKV, D))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="chunk_tokens"):
            PagedKVCache.from_dense(k, k, jnp.asarray([4]), page_size=4, chunk_tokens=bad)


@pytest.mark.parametrize("quest_metadata", ["int8", "native"])
def test_single_layer_from_dense(quest_metadata):
    rng = np.random.default_rng(1)
    k, v = _kv(rng, 2, 10)
    cache = PagedKVCache.from_dense(
        jnp.asarray(k[0]),
        jnp.asarray(v[0]),
        jnp.asarray([10, 3]),
        page_size=4,
        quest_metadata=quest_metadata,
    )
    assert cache.num_layers == 1 and cache.ds_labels is None
    assert cache.quest_metadata == quest_metadata
    assert (cache.k_mm_scale is None) == (quest_metadata == "native")
    _check_against_dense(cache, k[:1], v[:1], [10, 3])


@pytest.mark.parametrize("quest_metadata", ["int8", "native"])
def test_chunked_prefill_and_decode_equal_from_dense(quest_metadata):
    """Two ragged prefill chunks (the second starts mid-page) plus decode steps, some with a
    sequence inactive, leave the same cache as from_dense of the concatenated tokens. INT8
    Quest metadata is the exception: widened token by token, its codes depend on the order
    the tokens came in, so they are checked as bounds instead."""
    rng = np.random.default_rng(7)
    b, s, steps = 3, 4, 5
    first = np.array([5, 0, 8])
    second = np.array([6, 3, 0])
    active = rng.random((steps, b)) < 0.7
    total = first + second + active.sum(0)
    t = int(total.max())
    k, v = _kv(rng, b, t)
    channels = np.stack([np.stack([rng.choice(D, 2, replace=False) for _ in range(HKV)])] * L)

    cache = PagedKVCache.create(
        L, b, HKV, D, max_seq_len=t, page_size=s, ds_channels=2, quest_metadata=quest_metadata
    )
    cache = cache.with_ds_channels(jnp.asarray(channels))
    # The dense view of what gets written: sequence bi's tokens in position order.
    for layer in range(L):
        c1 = np.zeros((b, first.max(), HKV, D), np.float32)
        c2 = np.zeros((b, second.max(), HKV, D), np.float32)
        v1, v2 = np.zeros_like(c1), np.zeros_like(c2)
        for bi in range(b):
            c1[bi, : first[bi]] = k[layer, bi, : first[bi]]
            v1[bi, : first[bi]] = v[layer, bi, : first[bi]]
            c2[bi, : second[bi]] = k[layer, bi, first[bi] : first[bi] + second[bi]]
            v2[bi, : second[bi]] = v[layer, bi, first[bi] : first[bi] + second[bi]]
        cache = cache.write_prefill(
            layer, jnp.asarray(c1), jnp.asarray(v1), jnp.zeros(b, jnp.int32), jnp.asarray(first)
        )
        cache = cache.write_prefill(
            layer, jnp.asarray(c2), jnp.asarray(v2), jnp.asarray(first), jnp.asarray(second)
        )
    cache = cache.with_lengths(jnp.asarray(first + second, jnp.int32))

    @jax.jit
    def step(cache, k_new, v_new, act):
        cache = cache.begin_decode_step(act)
        for layer in range(L):
            cache = cache.write_decode(layer, k_new[layer], v_new[layer], active=act)
        return cache

    step = jax.jit(step.__wrapped__, donate_argnums=0)
    pos = first + second
    for i in range(steps):
        idx = np.minimum(pos, t - 1)
        k_new = np.stack([k[layer, np.arange(b), idx] for layer in range(L)])
        v_new = np.stack([v[layer, np.arange(b), idx] for layer in range(L)])
        cache = step(cache, jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray(active[i]))
        pos = pos + active[i]
    np.testing.assert_array_equal(cache.lengths, total)
    want = PagedKVCache.from_dense(
        jnp.asarray(k),
        jnp.asarray(v),
        jnp.asarray(total),
        page_size=s,
        ds_channel_idx=jnp.asarray(channels),
        quest_metadata=quest_metadata,
    )
    native = quest_metadata == "native"
    _check_against_dense(cache, k, v, total, channels, quest_exact=native)
    # Bit-identical on every valid slot and every live page is checked above; the untouched
    # rest of both caches is zeros, so the whole arrays agree too.
    quest = ("k_min", "k_max") if native else ()
    for name in (
        "k_pages",
        "v_pages",
        "k_int4",
        "k_scale",
        "k_zero",
        *quest,
        "ds_labels",
        "page_table",
        "lengths",
    ):
        np.testing.assert_array_equal(
            np.asarray(getattr(cache, name), np.float32),
            np.asarray(getattr(want, name), np.float32),
            err_msg=name,
        )


def test_permuted_page_table_and_allocator_rows():
    """Pages handed out by the allocator (interleaved between requests) hold the right tokens."""
    rng = np.random.default_rng(3)
    b, t, s = 2, 11, 4
    alloc = PageAllocator(1 + b * 3)
    for _ in range(3):  # interleave so neither request owns a contiguous run
        for r in range(b):
            alloc.alloc(r, 1)
    table = np.stack([alloc.table_row(r, 3) for r in range(b)])
    k, v = _kv(rng, b, t)
    cache = PagedKVCache.create(L, b, HKV, D, max_seq_len=t, page_size=s)
    cache = cache.with_page_table(jnp.asarray(table))
    lengths = np.array([11, 6])
    for layer in range(L):
        cache = cache.write_prefill(
            layer,
            jnp.asarray(k[layer]),
            jnp.asarray(v[layer]),
            jnp.zeros(b, jnp.int32),
            jnp.asarray(lengths),
        )
    cache = cache.with_lengths(jnp.asarray(lengths))
    _check_against_dense(cache, k, v, lengths)
    np.testing.assert_array_equal(np.asarray(cache.k_pages[:, :, 0]), 0)  # null page untouched


def test_layer_view_is_the_layer():
    """layer_view: one [Hkv, L*P, ...] pool and a page table offset into the layer's pages
    address exactly that layer's tokens."""
    rng = np.random.default_rng(5)
    b, t, s = 2, 9, 4
    k, v = _kv(rng, b, t)
    lengths = np.array([9, 5])
    cache = PagedKVCache.from_dense(jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths), s)
    for layer in range(L):
        view = cache.layer_view(layer)
        assert view.k_pages.shape == (HKV, L * cache.num_pages, s, D)
        for bb in range(b):
            for pos in range(lengths[bb]):
                page = view.page_table[bb, pos // s]
                np.testing.assert_array_equal(view.k_pages[:, page, pos % s], k[layer, bb, pos])
                np.testing.assert_array_equal(view.v_pages[:, page, pos % s], v[layer, bb, pos])
                np.testing.assert_array_equal(
                    view.k_scale[:, page, pos % s],
                    _read_token(cache.k_scale, cache, layer, bb, pos),
                )


def test_allocator():
    alloc = PageAllocator(6)
    assert alloc.num_free == 5
    a = alloc.alloc("a", 2)
    bb = alloc.alloc("b", 3)
    assert 0 not in a + bb and len(set(a + bb)) == 5
    with pytest.raises(OutOfPagesError, match="asked for 1 pages, 0 free"):
        alloc.alloc("c", 1)
    assert alloc.pages("c") == []
    alloc.free("a")
    assert alloc.num_free == 2
    with pytest.raises(OutOfPagesError):
        alloc.alloc("c", 3)  # all or nothing
    assert alloc.num_free == 2
    assert alloc.ensure("c", 5, page_size=4) == alloc.pages("c") and len(alloc.pages("c")) == 2
    assert alloc.ensure("c", 8, page_size=4) == []
    assert 0 not in alloc.pages("c")
    row = alloc.table_row("b", 5)
    assert row.dtype == np.int32 and row.tolist() == bb + [0, 0]
    with pytest.raises(ValueError, match="max_pages=2"):
        alloc.table_row("b", 2)
    with pytest.raises(ValueError, match="request_id 'zzz'"):
        alloc.free("zzz")
    with pytest.raises(ValueError, match="num_pages"):
        PageAllocator(1)
    with pytest.raises(ValueError, match="num_pages"):
        alloc.alloc("d", -1)


def test_calibrate_double_sparsity_and_npz(tmp_path):
    rng = np.random.default_rng(5)
    n, hq, hkv, d = 40, 4, 2, 8
    q = rng.standard_normal((L, n, hq, d)).astype(np.float32)
    k = rng.standard_normal((L, n, hkv, d)).astype(np.float32)
    q[..., 3] *= 10  # channel 3 heavy everywhere
    k[:, :, 1, 6] *= 10  # channel 6 heavy for KV head 1
    got = calibrate_double_sparsity(q, k, 2)
    assert got.shape == (L, hkv, 2) and got.dtype == np.int32
    for layer in range(L):
        for g in range(hkv):
            imp = [
                np.mean(
                    [
                        abs(q[layer, t, h, c] * k[layer, t, g, c])
                        for t in range(n)
                        for h in range(g * 2, g * 2 + 2)
                    ]
                )
                for c in range(d)
            ]
            np.testing.assert_array_equal(got[layer, g], np.sort(np.argsort(imp)[::-1][:2]))
    assert 3 in got[0, 0] and 6 in got[0, 1]
    save_ds_channels(tmp_path / "ds.npz", got)
    np.testing.assert_array_equal(load_ds_channels(tmp_path / "ds.npz"), got)
    with pytest.raises(ValueError, match="channels must be"):
        calibrate_double_sparsity(q, k, d + 1)
    with pytest.raises(ValueError, match="k_samples shape"):
        calibrate_double_sparsity(q, k[:, :5], 2)


def test_bad_inputs():
    rng = np.random.default_rng(0)
    k, v = _kv(rng, 2, 8)
    with pytest.raises(ValueError, match="lengths must lie in"):
        PagedKVCache.from_dense(jnp.asarray(k), jnp.asarray(v), jnp.asarray([9, 1]), page_size=4)
    with pytest.raises(ValueError, match="v must have shape"):
        PagedKVCache.from_dense(jnp.asarray(k), jnp.asarray(v[..., :4]), jnp.asarray([1, 1]))
    with pytest.raises(ValueError, match="k must have shape"):
        PagedKVCache.from_dense(jnp.asarray(k[0, 0]), jnp.asarray(v[0, 0]), jnp.asarray([1, 1]))
    with pytest.raises(ValueError, match="k must be float32"):
        PagedKVCache.from_dense(jnp.asarray(k, jnp.int32), jnp.asarray(v), jnp.asarray([1, 1]))
    with pytest.raises(ValueError, match="head_dim must be even"):
        PagedKVCache.create(1, 1, 1, 7, max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        PagedKVCache.create(1, 1, 1, 8, max_seq_len=0)
    cache = PagedKVCache.create(L, 2, HKV, D, max_seq_len=8, page_size=4)
    z = jnp.zeros(2, jnp.int32)
    with pytest.raises(ValueError, match="layer must be in"):
        cache.write_prefill(L, jnp.asarray(k[0]), jnp.asarray(v[0]), z, z)
    with pytest.raises(ValueError, match="k must have shape"):
        cache.write_prefill(0, jnp.asarray(k[0, :, :, :1]), jnp.asarray(v[0]), z, z)
    with pytest.raises(ValueError, match="start \\+ count must be <= max_seq_len=8"):
        cache.write_prefill(0, jnp.asarray(k[0]), jnp.asarray(v[0]), z + 4, z + 5)
    with pytest.raises(ValueError, match="count must have shape"):
        cache.write_prefill(0, jnp.asarray(k[0]), jnp.asarray(v[0]), z, jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="v must have shape"):
        cache.write_decode(0, jnp.asarray(k[0, :, 0]), jnp.asarray(v[0, :, :2]))
    with pytest.raises(ValueError, match="lengths must lie in \\[0, max_seq_len=8\\]"):
        cache.with_lengths(jnp.asarray([9, 0]))
    with pytest.raises(ValueError, match="page_table entries must lie in"):
        cache.with_page_table(jnp.full((2, 2), 99, jnp.int32))
    with pytest.raises(ValueError, match="with_ds_channels needs"):
        cache.with_ds_channels(jnp.zeros((L, HKV, 2), jnp.int32))
    with pytest.raises(ValueError, match="quest_metadata must be one of"):
        PagedKVCache.create(L, 2, HKV, D, max_seq_len=8, quest_metadata="int4")
    ds = PagedKVCache.create(L, 2, HKV, D, max_seq_len=8, page_size=4, ds_channels=2)
    with pytest.raises(ValueError, match="channel_idx entries must lie in"):
        ds.with_ds_channels(jnp.full((L, HKV, 2), D, jnp.int32))


def test_with_quest_metadata_equals_a_prefill_in_that_form():
    rng = np.random.default_rng(9)
    k, v = _kv(rng, 2, 10)
    lengths = jnp.asarray([10, 7])
    native = PagedKVCache.from_dense(
        jnp.asarray(k), jnp.asarray(v), lengths, page_size=4, quest_metadata="native"
    )
    int8 = PagedKVCache.from_dense(jnp.asarray(k), jnp.asarray(v), lengths, page_size=4)
    got = native.with_quest_metadata("int8")
    assert got.quest_metadata == "int8" and native.with_quest_metadata("native") is native
    for name in ("k_min", "k_max", "k_mm_scale", "k_pages"):
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), getattr(int8, name))
    with pytest.raises(ValueError, match="cannot turn int8"):
        int8.with_quest_metadata("native")
    with pytest.raises(ValueError, match="quest_metadata must be one of"):
        native.with_quest_metadata("fp8")


def test_cache_is_a_pytree():
    cache = PagedKVCache.create(L, 2, HKV, D, max_seq_len=8, page_size=4, ds_channels=2)
    leaves, tree = jax.tree_util.tree_flatten(cache)
    assert len(leaves) == 12  # with the INT8 Quest scales
    native = PagedKVCache.create(L, 2, HKV, D, max_seq_len=8, quest_metadata="native")
    assert len(jax.tree_util.tree_leaves(native)) == 9  # no scales, no DS labels or channels
    again = jax.tree_util.tree_unflatten(tree, leaves)
    assert again.page_size == 4
    bumped = jax.jit(lambda c: c.begin_decode_step())(cache)
    np.testing.assert_array_equal(bumped.lengths, [1, 1])
    assert dataclasses.replace(cache, page_size=8).page_size == 8

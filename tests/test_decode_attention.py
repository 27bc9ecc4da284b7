"""decode_attention against exact attention, against twilight_jax.reference, and against the
definitions of its selectors, on fresh random inputs (reference backend of the kernels: CPU).

Compilations dominate the run time on CPU, so each test reuses one small case (ragged lengths
including 0 and 1, a shuffled page table) and varies p through the traced per-sequence
override, which shares one compiled step.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _export import export_cuda, export_tpu, pallas_kernels_called

from pallas_kernels import assume_platform
from twilight_jax import PagedKVCache, SparsityConfig, decode_attention, pruner, selectors
from twilight_jax.attention import _decode_attention
from twilight_jax.reference import decode_attention_reference

S = 8  # page size
LENGTHS = (64, 1, 0, 29)
T = 64
DS_CHANNELS = 4


def _paged(k, v, lengths, rng, dtype=jnp.float32, ds_channels=0):
    """A cache holding dense k, v [B, T, Hkv, D] under a shuffled page table."""
    b, t, hkv, d = k.shape
    max_pages = -(-t // S)
    cache = PagedKVCache.create(
        1, b, hkv, d, max_seq_len=t, page_size=S, dtype=dtype, ds_channels=ds_channels
    )
    table = (1 + rng.permutation(b * max_pages)).reshape(b, max_pages).astype(np.int32)
    cache = cache.with_page_table(jnp.asarray(table))
    if ds_channels:
        ch = np.stack([np.sort(rng.choice(d, ds_channels, replace=False)) for _ in range(hkv)])
        cache = cache.with_ds_channels(jnp.asarray(ch[None], jnp.int32))
    cache = cache.write_prefill(
        0, jnp.asarray(k), jnp.asarray(v), jnp.zeros(b, jnp.int32), jnp.asarray(lengths, jnp.int32)
    )
    return cache.with_lengths(jnp.asarray(lengths, jnp.int32))


@functools.cache
def _case(seed=0, hkv=2, g=2, d=16, dtype=jnp.float32):
    """(q [B, Hq, D], k, v [B, T, Hkv, D] float32 numpy as stored, cache)."""
    rng = np.random.default_rng(seed)
    b = len(LENGTHS)
    k = rng.standard_normal((b, T, hkv, d)).astype(np.float32)
    v = rng.standard_normal((b, T, hkv, d)).astype(np.float32)
    q = (1.5 * rng.standard_normal((b, hkv * g, d))).astype(np.float32)
    k = np.asarray(jnp.asarray(k, dtype), np.float32)  # the values the cache stores
    v = np.asarray(jnp.asarray(v, dtype), np.float32)
    cache = _paged(k, v, LENGTHS, rng, dtype, ds_channels=DS_CHANNELS)
    return jnp.asarray(q, dtype), k, v, cache


def _exact(q, k, v, keep=None):
    """Softmax attention in float64 over LENGTHS (and keep [B, Hq, T] if given)."""
    q = np.asarray(q, np.float64)
    b, hq, d = q.shape
    g = hq // k.shape[2]
    out = np.zeros((b, hq, d))
    for bi, n in enumerate(LENGTHS):
        for h in range(hq):
            m = np.arange(T) < n
            if keep is not None:
                m &= keep[bi, h]
            if not m.any():
                continue
            s = k[bi, m, h // g] @ q[bi, h] / np.sqrt(d)
            w = np.exp(s - s.max())
            out[bi, h] = (w / w.sum()) @ v[bi, m, h // g]
    return out


def _mask(info, n=T, lengths=LENGTHS):
    """SelectionInfo token lists -> [B, rows, n] bool; asserts the lists hold distinct positions
    below the length."""
    pos, cnt = np.asarray(info.token_pos), np.asarray(info.counts)
    m = np.zeros(pos.shape[:2] + (n,), bool)
    for b in range(pos.shape[0]):
        for r in range(pos.shape[1]):
            listed = pos[b, r, : cnt[b, r]]
            assert len(set(listed.tolist())) == cnt[b, r], "duplicate positions"
            assert (listed < lengths[b]).all() and (listed >= 0).all()
            m[b, r, listed] = True
    return m


def _head_mask(mask, hq):
    return np.repeat(mask, hq // mask.shape[1], axis=1)


def _cfg(selector, **kw):
    base = dict(selector=selector, budget=24, max_budget=48, page_size=S, ds_channels=DS_CHANNELS)
    return SparsityConfig(**{**base, **kw})


def _check_vs_reference(q, cache, cfg, top_p, atol):
    out, info = decode_attention(q, cache, cfg, top_p=top_p, backend="reference")
    ref, sel = decode_attention_reference(q, cache, cfg, top_p=top_p)
    np.testing.assert_array_equal(_mask(info), np.asarray(sel.mask)[..., :T])
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=atol)
    np.testing.assert_allclose(info.estimated_mass, sel.estimated_mass, atol=1e-5)
    np.testing.assert_array_equal(info.saturated, sel.saturated)
    np.testing.assert_array_equal(info.candidates, np.asarray(sel.candidates).sum(-1))
    return out, info


# ----------------------------------------------------------------------------- exact cases


@pytest.mark.parametrize("g", [1, 4])
def test_dense_equals_exact(g):
    q, k, v, cache = _case(g=g)
    out, info = decode_attention(q, cache, SparsityConfig(selector="dense", page_size=S))
    np.testing.assert_allclose(out, _exact(q, k, v), atol=1e-5)
    np.testing.assert_array_equal(out[2], 0)  # empty sequence
    np.testing.assert_allclose(out[1], np.repeat(v[1, 0], g, axis=0), atol=1e-6)  # one token
    np.testing.assert_array_equal(info.counts, np.broadcast_to(np.array(LENGTHS)[:, None], (4, 2)))


def test_all_with_p1_equals_dense():
    q, k, v, cache = _case(g=4)
    out, info = decode_attention(q, cache, _cfg("all", top_p=1.0, max_budget=T))
    np.testing.assert_allclose(out, _exact(q, k, v), atol=1e-5)
    np.testing.assert_array_equal(info.counts, np.broadcast_to(np.array(LENGTHS)[:, None], (4, 2)))
    assert not np.asarray(info.saturated).any()


def test_error_bound_with_exact_estimates():
    """estimate_bits=16: the kept true mass is >= p, so |out - exact| <= 2 (1 - p) max|v|."""
    q, k, v, cache = _case(seed=1)
    cfg = _cfg("all", top_p=0.5, estimate_bits=16, max_budget=T)
    exact = _exact(q, k, v)
    for p in ([0.5, 0.9, 0.5, 0.6], [0.99, 0.3, 0.8, 0.95]):
        out, info = _check_vs_reference(q, cache, cfg, jnp.asarray(p, jnp.float32), 1e-5)
        for b, n in enumerate(LENGTHS):
            if n == 0:
                continue
            bound = 2 * (1 - p[b]) * np.abs(v[b, :n]).max() + 1e-5
            assert (np.abs(np.asarray(out[b]) - exact[b]) <= bound).all()
            assert (np.asarray(info.estimated_mass[b]) >= p[b] - 1e-5).all()
        assert np.asarray(info.counts)[0].min() < LENGTHS[0]  # something was pruned


def test_int4_estimates_keep_true_mass_on_peaked_heads():
    """Planted like a real head: per (sequence, KV head) a direction u; 200 of 512 tokens are
    6u + N(0, I) (the rest N(0, I)), the group's queries 4u + 0.3 N(0, I), D = 64. With INT4
    estimates the TRUE weight (exact K, softmax over the candidates) of the kept set is
    >= p - 0.02 for every query head."""
    rng = np.random.default_rng(11)
    b, t, hkv, g, d = 2, 512, 2, 4, 64
    u = rng.standard_normal((b, hkv, d))
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    k = rng.standard_normal((b, t, hkv, d))
    for bi in range(b):
        for gi in range(hkv):
            hot = rng.choice(t, 200, replace=False)
            k[bi, hot, gi] += 6 * u[bi, gi]
    q = 4 * np.repeat(u, g, axis=1) + 0.3 * rng.standard_normal((b, hkv * g, d))
    v = rng.standard_normal((b, t, hkv, d))
    lengths = np.array([t, 300])
    cache = _paged(k.astype(np.float32), v.astype(np.float32), lengths, rng)
    cfg = SparsityConfig(selector="all", top_p=0.9, max_budget=t, page_size=S)
    p = np.array([0.8, 0.9], np.float32)
    _, info = decode_attention(jnp.asarray(q, jnp.float32), cache, cfg, top_p=jnp.asarray(p))
    keep = _head_mask(_mask(info, t, lengths), hkv * g)
    for bi, n in enumerate(lengths):
        s = np.einsum("hd,thd->ht", q[bi], np.repeat(k[bi, :n], g, axis=1)) / np.sqrt(d)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        true_mass = (w * keep[bi, :, :n]).sum(-1)
        assert (true_mass >= p[bi] - 0.02).all(), true_mass
        assert np.asarray(info.counts[bi]).max() < 0.8 * n  # and it did prune


# ----------------------------------------------------------------------------- vs reference

# Every selector with both GQA modes where the per-head path differs (page- and token-level
# per-head candidate lists), sink and recent tokens on, per-sequence p.
SELECTOR_CASES = [
    ("all", "group_union"),
    ("quest", "group_union"),
    ("quest", "per_head"),
    ("double_sparsity", "group_union"),
    ("oracle", "per_head"),
    ("streaming", "group_union"),
]


def _compiles(fn):
    """(fn()'s result, the XLA compilations it ran)."""
    seen = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        out = jax.block_until_ready(fn())
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return out, len(seen)


@pytest.mark.parametrize(
    "selector,gqa,bits,reads_mask",
    [
        ("all", "group_union", 4, False),
        ("quest", "group_union", 4, False),
        ("double_sparsity", "group_union", 4, False),
        ("quest", "per_head", 4, True),  # each head's own segment of the shared list
        ("streaming", "group_union", 4, True),  # recent tokens inside the sinks dropped
        ("quest", "group_union", 8, True),  # jnp estimates: no -inf off the candidates
    ],
)
def test_top_p_reads_a_mask_only_where_the_estimates_lack_it(
    monkeypatch, selector, gqa, bits, reads_mask
):
    seen = []
    select = pruner.topp_select_grouped

    def spy(logits, valid, *args, **kw):
        seen.append(valid is not None)
        return select(logits, valid, *args, **kw)

    monkeypatch.setattr(pruner, "topp_select_grouped", spy)
    _decode_attention.clear_cache()  # traced anew, so the spy sees the call
    q, _, _, cache = _case()
    cfg = _cfg(selector, top_p=0.7, gqa=gqa, estimate_bits=bits)
    p = jnp.asarray([0.7, 0.9, 0.5, 0.3], jnp.float32)
    _check_vs_reference(q, cache, cfg, p, 1e-5)
    assert seen == [reads_mask]


@pytest.mark.parametrize("selector,gqa", SELECTOR_CASES)
def test_pipeline_matches_reference(selector, gqa):
    q, k, v, cache = _case()
    cfg = _cfg(selector, top_p=0.7, gqa=gqa, sink_tokens=2, recent_tokens=3)
    p = jnp.asarray([0.7, 0.9, 0.5, 0.3], jnp.float32)
    out, info = _check_vs_reference(q, cache, cfg, p, 1e-5)
    mask = _mask(info)
    for b, n in enumerate(LENGTHS):  # sink and recent tokens always attended
        forced = [i for i in range(n) if i < 2 or i >= n - 3]
        assert mask[b][:, forced].all()
    np.testing.assert_array_equal(info.counts[2], 0)
    np.testing.assert_array_equal(out[2], 0)
    np.testing.assert_array_equal(info.counts[1], 1)
    # A scalar p is broadcast: the same compiled step, the same selection where p agrees;
    # python and numpy forms of p and the layer compile nothing new either.
    scalar, compiles = _compiles(
        lambda: decode_attention(q, cache, cfg, top_p=0.7, backend="reference")[1]
    )
    assert compiles == 0
    np.testing.assert_array_equal(_mask(scalar)[0], mask[0])
    for layer, top_p in ((np.int64(0), np.float64(0.7)), (0, np.full(4, 0.7)), (0, 1)):
        _, compiles = _compiles(
            lambda: decode_attention(q, cache, cfg, layer=layer, top_p=top_p, backend="reference")
        )
        assert compiles == 0, (type(layer), type(top_p))
    # A tiny p keeps each head's heaviest candidate(s) besides the forced tokens.
    _, tiny = _check_vs_reference(q, cache, cfg, jnp.full((4,), 1e-4, jnp.float32), 1e-5)
    g_rows = q.shape[1] // tiny.counts.shape[1]
    assert (np.asarray(tiny.counts) <= 5 + g_rows).all()


@pytest.mark.parametrize("selector,gqa", [("quest", "group_union"), ("all", "per_head")])
def test_pruned_list_without_forced_tokens(selector, gqa):
    """No sink or recent tokens: the pruner's compacted list is attended as it is (no second
    compaction). Same selection, outputs and statistics as the reference; the token list holds
    each position once, ascending below counts, zeros after."""
    q, k, v, cache = _case()
    cfg = _cfg(selector, top_p=0.7, gqa=gqa, sink_tokens=0, recent_tokens=0)
    p = jnp.asarray([0.7, 0.9, 0.5, 0.3], jnp.float32)
    _, info = _check_vs_reference(q, cache, cfg, p, 1e-5)
    pos, counts = np.asarray(info.token_pos), np.asarray(info.counts)
    assert counts.max() > 1
    for b in range(pos.shape[0]):
        for r in range(pos.shape[1]):
            kept = pos[b, r, : counts[b, r]]
            assert (np.diff(kept) > 0).all()
            assert (pos[b, r, counts[b, r] :] == 0).all()


def test_compacted_kept_lists_skip_the_compaction():
    """add_forced_tokens with kept_count (lists compacted already, 0 past the count, as the
    pruner's are) and no forced tokens returns what the compaction returns on the same lists:
    entries below the count, zeros after."""
    rng = np.random.default_rng(3)
    counts = jnp.asarray(rng.integers(0, 7, (3, 2)), jnp.int32)
    ok = jnp.arange(6) < counts[..., None]
    pos = jnp.where(ok, jnp.asarray(rng.integers(1, 100, (3, 2, 6)), jnp.int32), 0)
    lengths = jnp.full((3,), 100, jnp.int32)
    want = pruner.add_forced_tokens(pos, ok, lengths, 0, 0)
    got = pruner.add_forced_tokens(pos, ok, lengths, 0, 0, kept_count=counts)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        assert g.dtype == w.dtype


def test_eight_bit_estimates_match_reference():
    q, k, v, cache = _case()
    _check_vs_reference(q, cache, _cfg("all", top_p=0.8, estimate_bits=8), None, 1e-5)


def test_bfloat16_cache_matches_reference():
    q, k, v, cache = _case(dtype=jnp.bfloat16)
    out, _ = _check_vs_reference(q, cache, _cfg("quest", top_p=0.8), None, 2e-2)
    assert out.dtype == jnp.bfloat16


def test_saturation_keeps_the_heaviest():
    q, k, v, cache = _case(seed=3)
    cfg = _cfg("all", top_p=0.99, max_budget=12, estimate_bits=16)
    _, info = _check_vs_reference(q, cache, cfg, None, 1e-5)
    np.testing.assert_array_equal(
        info.saturated, [[True, True], [False] * 2, [False] * 2, [True, True]]
    )
    np.testing.assert_array_equal(info.counts, [[12, 12], [1, 1], [0, 0], [12, 12]])


# ----------------------------------------------------------------------------- definitions


def _numpy_selection(cfg, q, k, ds_idx):
    """Candidates [B, rows, T] straight from the selector definitions (top_p None, no sinks)."""
    q = np.asarray(q, np.float64)
    b, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    rows = hkv if cfg.gqa == "group_union" else hq
    out = np.zeros((b, rows, T), bool)
    for bi, n in enumerate(LENGTHS):
        if n == 0:
            continue
        kb = np.repeat(k[bi, :n], g, axis=1).transpose(1, 0, 2)  # [Hq, n, D] per query head
        if cfg.selector == "streaming":
            out[bi, :, :n] = (np.arange(n) < cfg.sink_tokens) | (
                np.arange(n) >= n - (cfg.budget - cfg.sink_tokens)
            )
            continue
        if cfg.selector == "quest":
            pages = -(-n // S)
            score = np.zeros((hq, pages))
            for pg in range(pages):
                rows_k = kb[:, pg * S : min(n, (pg + 1) * S)]
                lo, hi = rows_k.min(1), rows_k.max(1)
                score[:, pg] = np.maximum(q[bi] * lo, q[bi] * hi).sum(-1)
            unit, top = S, cfg.budget // S
        else:
            unit, top = 1, cfg.budget
            if cfg.selector == "oracle":
                score = np.einsum("hd,hnd->hn", q[bi], kb) / np.sqrt(d)
                if cfg.gqa == "group_union":
                    score = np.exp(score - score.max(-1, keepdims=True))
                    score /= score.sum(-1, keepdims=True)
            else:  # double_sparsity
                ch = np.repeat(ds_idx, g, axis=0)  # [Hq, C]
                qc = np.take_along_axis(q[bi], ch, axis=-1)
                kc = np.take_along_axis(kb, ch[:, None, :], axis=-1)
                score = np.einsum("hc,hnc->hn", qc, kc)
        if cfg.gqa == "group_union":
            score = score.reshape(hkv, g, -1).sum(1)
        for r in range(rows):
            chosen = np.argsort(-score[r], kind="stable")[:top]
            for c in chosen:
                out[bi, r, c * unit : min(n, (c + 1) * unit)] = True
    return out


@pytest.mark.parametrize(
    "selector,gqa",
    [
        ("quest", "group_union"),
        ("quest", "per_head"),
        ("double_sparsity", "group_union"),
        ("double_sparsity", "per_head"),
        ("oracle", "group_union"),
        ("oracle", "per_head"),
        ("streaming", "group_union"),
    ],
)
def test_selectors_follow_their_definitions(selector, gqa):
    q, k, v, cache = _case(seed=2)
    cfg = _cfg(selector, gqa=gqa, sink_tokens=2 if selector == "streaming" else 0)
    out, info = decode_attention(q, cache, cfg)
    want = _numpy_selection(cfg, q, k, np.asarray(cache.ds_channel_idx[0]))
    np.testing.assert_array_equal(_mask(info), want)
    np.testing.assert_array_equal(info.candidates, want.sum(-1))
    np.testing.assert_array_equal(info.estimated_mass, 1.0)  # nothing pruned
    assert not np.asarray(info.saturated).any()
    np.testing.assert_allclose(out, _exact(q, k, v, _head_mask(want, q.shape[1])), atol=1e-5)


# ----------------------------------------------------------------------------- compilation


def test_no_recompilation_when_lengths_counts_or_p_change():
    q, k, v, cache = _case(seed=1)
    cfg = _cfg("all", top_p=0.5, estimate_bits=16, max_budget=T)
    rng = np.random.default_rng(0)
    decode_attention(q, cache, cfg, top_p=jnp.full((4,), 0.5, jnp.float32))
    before = _decode_attention._cache_size()

    @jax.jit
    def step(q, cache, p):
        out, info = decode_attention(q, cache, cfg, top_p=p)
        return out, info.counts

    counts = set()
    for i in range(3):
        lengths = jnp.asarray(rng.integers(0, T + 1, 4), jnp.int32)
        c = cache.with_lengths(lengths)
        p = jnp.asarray(rng.uniform(0.1, 1.0, 4), jnp.float32)
        qi = q * (i + 1)
        _, info = decode_attention(qi, c, cfg, top_p=p)
        _, cnt = step(qi, c, p)
        np.testing.assert_array_equal(cnt, info.counts)
        counts.add(tuple(np.asarray(cnt).ravel().tolist()))
    assert len(counts) == 3  # the counts did change
    assert _decode_attention._cache_size() == before
    assert step._cache_size() == 1


# ----------------------------------------------------------------------------- lowering


# The kernels each step calls, once each: Quest's page scores and page top-k (GPU only; TPUs
# run lax.top_k), the SpGEMV, top-p (on GPU a per-head threshold kernel, then the union) and
# the sparse attention.
STEP_KERNELS = {
    ("gpu", "quest"): ["quest_page_scores_gpu", "topk_ids_gpu"],
    ("tpu", "quest"): ["quest_page_scores_tpu"],
    ("gpu", "double_sparsity"): [],
    ("tpu", "double_sparsity"): [],
}
PRUNE_KERNELS = {
    "gpu": ["block_spgemv_gpu", "topp_head_threshold_gpu", "topp_select_gpu"],
    "tpu": ["block_spgemv_tpu", "topp_select_tpu"],
}
ATTENTION_KERNEL = {"gpu": "sparse_decode_attention", "tpu": "sparse_decode_attention_tpu"}


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_whole_step_lowers_with_the_pallas_kernels(platform):
    """The whole op with every Pallas kernel (not interpret mode: backends resolve as on the
    platform) lowers for CUDA (Pallas -> Triton IR) and for TPU (Mosaic), LLaMA-like head_dim
    128 and bf16: page-level per-head and token-level grouped candidates."""
    rng = np.random.default_rng(9)
    b, t, hkv, g, d = 2, 128, 2, 4, 128
    k = jnp.asarray(rng.standard_normal((b, t, hkv, d)), jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((b, hkv * g, d)), jnp.bfloat16)
    ch = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (1, hkv, 16))
    cache = PagedKVCache.from_dense(k, k, jnp.asarray([128, 77]), page_size=16, ds_channel_idx=ch)
    p = jnp.asarray([0.9, 0.8], jnp.float32)
    export = export_cuda if platform == "gpu" else export_tpu
    for selector, gqa in [("quest", "per_head"), ("double_sparsity", "group_union")]:
        cfg = SparsityConfig(
            selector=selector,
            budget=64,
            top_p=0.9,
            max_budget=64,
            page_size=16,
            gqa=gqa,
            sink_tokens=2,
            recent_tokens=4,
        )
        backend = "pallas_gpu" if platform == "gpu" else "pallas_tpu"
        with assume_platform(platform):  # after the cache is built: that ran on this host
            exp = export(
                lambda q, c, p: decode_attention(q, c, cfg, top_p=p, backend=backend), q, cache, p
            )
        want = STEP_KERNELS[platform, selector] + PRUNE_KERNELS[platform]
        want = sorted(want + [ATTENTION_KERNEL[platform]])
        assert pallas_kernels_called(exp.mlir_module()) == want, selector


# ----------------------------------------------------------------------------- bad input


def test_config_validation():
    for kwargs, field in [
        (dict(selector="topk"), "selector"),
        (dict(gqa="union"), "gqa"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p="0.9"), "top_p"),
        (dict(top_p=True), "top_p"),
        (dict(top_p=np.array([0.5])), "top_p"),
        (dict(top_p=0.5 + 0j), "top_p"),
        (dict(selector="quest", budget=20, page_size=16), "budget"),
        (dict(budget=0), "budget"),
        (dict(max_budget=4, sink_tokens=2, recent_tokens=2), "max_budget"),
        (dict(page_size=12), "page_size"),
        (dict(estimate_bits=2), "estimate_bits"),
        (dict(dense_layers=-1), "dense_layers"),
        (dict(sink_tokens=-1), "sink_tokens"),
        (dict(ds_channels=0), "ds_channels"),
        (dict(quest_metadata="int4"), "quest_metadata"),
        (dict(selector="streaming", budget=4, sink_tokens=4), "budget"),
    ]:
        with pytest.raises(ValueError, match=f"SparsityConfig.{field}"):
            SparsityConfig(**kwargs)
    assert hash(SparsityConfig(top_p=0.9)) == hash(SparsityConfig(top_p=0.9))
    # Any real scalar is a p, stored as a plain float so the config stays a valid static arg.
    for p in (np.float32(0.5), jnp.asarray(0.5), np.int64(1), 1):
        cfg = SparsityConfig(top_p=p)
        assert type(cfg.top_p) is float and cfg.top_p == float(p)
        assert hash(cfg) == hash(SparsityConfig(top_p=float(p)))


def test_bad_inputs_raise_before_tracing():
    q, k, v, cache = _case()
    cfg = _cfg("all", top_p=0.9)
    cases = [
        (dict(q=q[0]), "q must have rank 3"),
        (dict(q=q[:2]), "q batch 2"),
        (dict(q=q[..., :8]), "q head_dim 8"),
        (dict(q=q[:, :3]), "q heads 3"),
        (dict(q=q.astype(jnp.float16)), "q must be float32 or bfloat16"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(top_p=1.2), "top_p must be in"),
        (dict(top_p=jnp.asarray([0.5, 0.5, 1.5, 0.5])), "top_p must be in"),
        (dict(top_p=jnp.asarray([0.5, 0.5])), "top_p must be a scalar or a \\[B=4\\]"),
        (dict(cfg=_cfg("all", page_size=16, budget=32)), "sparsity.page_size=16"),
        (dict(layer=1), "layer must be in"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(cfg=_cfg("double_sparsity", ds_channels=8)), "sparsity.ds_channels=8"),
        (dict(cfg="all"), "sparsity must be a SparsityConfig"),
    ]
    for kwargs, msg in cases:
        args = dict(q=q, cache=cache, cfg=cfg)
        args.update(kwargs)
        q_, cache_, cfg_ = args.pop("q"), args.pop("cache"), args.pop("cfg")
        with pytest.raises(ValueError, match=msg):
            decode_attention(q_, cache_, cfg_, **args)
    import dataclasses

    too_long = dataclasses.replace(cache, lengths=jnp.asarray([65, 0, 0, 0], jnp.int32))
    with pytest.raises(ValueError, match="cache.lengths must lie in \\[0, max_seq_len=64\\]"):
        decode_attention(q, too_long, cfg)
    no_labels = PagedKVCache.create(1, 4, 2, 16, max_seq_len=T, page_size=S)
    with pytest.raises(ValueError, match="no Double Sparsity labels"):
        decode_attention(q, no_labels, _cfg("double_sparsity"))


def test_quest_with_a_budget_over_the_table_is_select_all():
    # B0 >= every page: the scores are skipped (select_all); the candidates must be exactly
    # what Quest's page top-k gives, and a budget one page short still scores.
    q, _, _, cache = _case(seed=4)
    full = cache.max_pages * S
    for budget in (full, full + 5 * S):
        cfg = _cfg("quest", budget=budget)
        got = selectors.select_candidates(q, cache, cfg, 0, "auto")
        want = selectors.select_quest(q, cache, cfg, 0, "auto")
        for name in ("blocks", "count", "valid"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
        assert got.block_size == want.block_size
    short = selectors.select_candidates(q, cache, _cfg("quest", budget=full - S), 0, "auto")
    assert short.blocks.shape[-1] == cache.max_pages - 1


@pytest.mark.parametrize("gqa", ["group_union", "per_head"])
def test_candidate_token_counts_equal_the_mask_counts(gqa):
    # Candidates.num_tokens counts from the blocks, the count and the lengths where the mask is
    # exactly "listed and below the length" (by_count), else sums the mask: equal either way,
    # on ragged lengths with partial last pages.
    q, _, _, cache = _case(seed=6)
    for selector in ("all", "quest", "streaming", "double_sparsity", "oracle"):
        cfg = _cfg(selector, gqa=gqa)
        cand = selectors.select_candidates(q, cache, cfg, 0, "reference")
        got = cand.num_tokens(cache.lengths)
        np.testing.assert_array_equal(got, np.asarray(cand.valid).sum(-1), err_msg=selector)
        assert got.dtype == jnp.int32
        # Where the count follows the lengths, the SpGEMV derives it itself (cand_count=None):
        # it must be min(ceil(length / block_size), C) for every KV head, and the mask what
        # that count implies.
        # (Every page: whatever the rows; per-row top-k lists: one list a KV head only.)
        topk = selector in ("quest", "double_sparsity", "oracle")
        follows = selector == "all" or (topk and gqa == "group_union")
        assert cand.count_follows_lengths == follows, selector
        if follows:
            want = np.minimum(-(-np.asarray(LENGTHS) // cand.block_size), cand.blocks.shape[-1])
            np.testing.assert_array_equal(
                cand.count, np.broadcast_to(want[:, None], cand.count.shape)
            )
            assert cand.by_count
    assert any(n % S for n in LENGTHS)  # a partial page is counted

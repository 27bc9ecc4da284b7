"""Every Pallas GPU kernel compiled and run natively on a GPU against its jnp reference.

Skipped without a GPU. On the device machine: TWILIGHT_TEST_PLATFORM=gpu pytest -m gpu.
Shapes are LLaMA-like (head_dim 128, GQA 4) and large enough to use several programs per
(sequence, head), with ragged lengths and counts; inputs are fresh random draws.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _quant_rule import halves_rows, int4_rule, page_bounds_rule

from pallas_kernels import append, attention, int4, quest, spgemv, topp, topp_common

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU"),
]

HQ, HKV, D, S = 16, 4, 128, 16


def _cache(seed, batch, max_len, dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    pages_per_seq = -(-max_len // S)
    num_pages = batch * pages_per_seq + 1
    k = jnp.asarray(rng.standard_normal((HKV, num_pages, S, D)), dtype)
    v = jnp.asarray(rng.standard_normal((HKV, num_pages, S, D)), dtype)
    perm = rng.permutation(num_pages - 1)[: batch * pages_per_seq] + 1
    page_table = jnp.asarray(perm.reshape(batch, pages_per_seq), jnp.int32)
    lengths = jnp.asarray(rng.integers(0, max_len + 1, batch), jnp.int32)
    lengths = lengths.at[0].set(max_len)
    packed, scale, zero = int4.quantize_int4(k.astype(jnp.float32), backend="reference")
    return dict(
        k=k,
        v=v,
        k_int4=packed,
        k_scale=scale,
        k_zero=zero,
        page_table=page_table,
        lengths=lengths,
        rng=rng,
    )


def _close(a, b, tol):
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    assert np.isfinite(a).all()
    err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-6)
    assert err < tol, err


@pytest.mark.parametrize("batch,max_len", [(3, 1000), (2, 8192)])
def test_dense_attention(batch, max_len):
    c = _cache(batch, batch, max_len)
    q = jnp.asarray(c["rng"].standard_normal((batch, HQ, D)), jnp.bfloat16)
    args = (q, c["k"], c["v"], c["page_table"], c["lengths"])
    out = attention.paged_decode_attention(*args, backend="pallas")
    ref = attention.paged_decode_attention(*args, backend="reference")
    # The kernel rounds the softmax weights to bf16 before the P.V dot (relative 2^-9 each).
    _close(out, ref, 5e-3)
    # One split a row: the kernel writes the normalized output itself (no merge).
    one = attention.AttentionGpuConfig(block_tokens=64, max_splits=1)
    _close(attention.paged_decode_attention(*args, backend="pallas", config=one), ref, 5e-3)


@pytest.mark.parametrize("per_head", [False, True])
def test_sparse_attention(per_head):
    batch, max_len, cap = 3, 4096, 1024
    c = _cache(7, batch, max_len)
    rng = c["rng"]
    rows = HQ if per_head else HKV
    lengths = np.asarray(c["lengths"])
    pos = np.zeros((batch, rows, cap), np.int32)
    counts = np.zeros((batch, rows), np.int32)
    for b in range(batch):
        for h in range(rows):
            n = int(min(lengths[b], rng.integers(0, cap + 1)))
            pos[b, h, :n] = np.sort(rng.choice(max(lengths[b], 1), n, replace=False))
            counts[b, h] = n
    q = jnp.asarray(rng.standard_normal((batch, HQ, D)), jnp.bfloat16)
    args = (q, c["k"], c["v"], c["page_table"], jnp.asarray(pos), jnp.asarray(counts))
    out = attention.sparse_decode_attention(*args, backend="pallas")
    ref = attention.sparse_decode_attention(*args, backend="reference")
    _close(out, ref, 5e-3)
    # One split a row: the kernel writes the normalized bf16 output itself (no merge).
    one = attention.AttentionGpuConfig(max_splits=1)
    out1 = attention.sparse_decode_attention(*args, backend="pallas", config=one)
    _close(out1, ref, 5e-3)


@pytest.mark.parametrize("q_dtype", [jnp.bfloat16, jnp.float32])
def test_block_spgemv(q_dtype):
    """Native SpGEMV (head_dim 128: 4-byte words, unpacked in inline PTX) against the
    reference, bf16 q and float32 q (two bf16 terms)."""
    batch, max_len, n_cand = 3, 4096, 160
    c = _cache(11, batch, max_len)
    rng = c["rng"]
    pages = max_len // S
    cand = np.stack([rng.choice(pages, n_cand, replace=False) for _ in range(batch * HKV)])
    cand = jnp.asarray(cand.reshape(batch, HKV, n_cand), jnp.int32)
    count = jnp.asarray(rng.integers(0, n_cand + 1, (batch, HKV)), jnp.int32)
    q = jnp.asarray(rng.standard_normal((batch, HQ, D)), q_dtype)
    args = (q, c["k_int4"], c["k_scale"], c["k_zero"], c["page_table"], c["lengths"], cand, count)
    out = spgemv.block_spgemv(*args, block_size=S, backend="pallas")
    ref = spgemv.block_spgemv(*args, block_size=S, backend="reference")
    out, ref = np.asarray(out), np.asarray(ref)
    np.testing.assert_array_equal(np.isfinite(out), np.isfinite(ref))
    fin = np.isfinite(ref)
    # bf16 q exact, float32 q as two bf16 terms (16 mantissa bits), against the f32
    # reference, f32 accumulation in another order: |logit| ~ 1, sum of |terms| ~ 20.
    np.testing.assert_allclose(out[fin], ref[fin], rtol=1e-4, atol=5e-4)
    # The count from the lengths, derived in the kernel (cand_count=None): the same kernel
    # output as with that count passed.
    derived = spgemv.counts_from_lengths(c["lengths"], S, n_cand, HKV)
    got = spgemv.block_spgemv(*args[:7], None, block_size=S, backend="pallas")
    want = spgemv.block_spgemv(*args[:7], derived, block_size=S, backend="pallas")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("compact_min_rows", [1, 1 << 20])
@pytest.mark.parametrize("groups", [1, 4])
def test_topp(groups, compact_min_rows):
    rng = np.random.default_rng(groups)
    rows, n, cap = 64, 8192, 1024
    logits = rng.standard_normal((rows, groups, n)).astype(np.float32) * 3
    logits[:, :, rng.choice(n, 50, replace=False)] += 8  # a few heavy hitters per row
    valid = rng.random((rows, n)) < 0.9
    p = rng.uniform(0.5, 1.0, rows).astype(np.float32)
    args = (jnp.asarray(logits), jnp.asarray(valid), jnp.asarray(p), cap)
    cfg = topp.TopPGpuConfig(compact_min_rows=compact_min_rows)  # both forms
    idx, cnt, sat, mass = topp.topp_select_grouped(*args, backend="pallas", config=cfg)
    ridx, rcnt, rsat, rmass = topp.topp_select_grouped(*args, backend="reference")
    cnt, rcnt = np.asarray(cnt), np.asarray(rcnt)
    # GPU exp and summation order differ from XLA's in the last bits, which can move an entry
    # lying exactly at the p boundary: allow a one-entry difference on a few rows.
    assert np.abs(cnt - rcnt).max() <= 1
    assert (cnt != rcnt).mean() <= 0.05
    same = 0
    for r in range(rows):
        a = set(np.asarray(idx[r, : cnt[r]]).tolist())
        b = set(np.asarray(ridx[r, : rcnt[r]]).tolist())
        assert len(a ^ b) <= 1
        same += a == b
    assert same >= 0.95 * rows
    np.testing.assert_allclose(np.asarray(mass), np.asarray(rmass), rtol=1e-3, atol=1e-3)
    # Without a mask, the invalid entries at -inf instead: the same selection, bit for bit.
    masked = jnp.where(jnp.asarray(valid)[:, None, :], jnp.asarray(logits), -jnp.inf)
    nomask = topp.topp_select_grouped(masked, None, *args[2:], backend="pallas", config=cfg)
    for a, b in zip(nomask, (idx, cnt, sat, mass)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # With block ids the kernels store positions: the same selection, each column mapped.
    blocks = jnp.asarray(rng.integers(0, 1 << 20, (rows, n // 16)), jnp.int32)
    mapped = topp.topp_select_grouped(
        *args, backend="pallas", config=cfg, blocks=blocks, block_size=16
    )
    want = topp_common.columns_to_positions(idx, cnt, blocks, 16)
    np.testing.assert_array_equal(np.asarray(mapped[0]), np.asarray(want))
    for a, b in zip(mapped[1:], (cnt, sat, mass)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # One p per group of 4 rows, indexed by the kernels: the same as p repeated.
    p_grp = jnp.asarray(p[::4])
    grp = topp.topp_select_grouped(*args[:2], p_grp, cap, backend="pallas", config=cfg)
    rep = topp.topp_select_grouped(
        *args[:2], jnp.repeat(p_grp, 4), cap, backend="pallas", config=cfg
    )
    for a, b in zip(grp, rep):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_quest_scores():
    batch, max_len = 3, 2048
    c = _cache(5, batch, max_len)
    rng = c["rng"]
    # Min / max of every page (the cache keeps them for live pages; here for all of them).
    kmin, kmax = c["k"].min(axis=2), c["k"].max(axis=2)
    q = jnp.asarray(rng.standard_normal((batch, HQ, D)), jnp.bfloat16)
    args = (q, kmin, kmax, c["page_table"], c["lengths"])
    s = np.asarray(quest.quest_page_scores(*args, backend="pallas"))
    r = np.asarray(quest.quest_page_scores(*args, backend="reference"))
    np.testing.assert_array_equal(np.isfinite(s), np.isfinite(r))
    # Exact bf16 inputs, float32 products and sums in another order: 128 terms of |q * k| <= ~10
    # bound the rounding difference by ~128 * 2^-24 * sum|terms|.
    np.testing.assert_allclose(s[np.isfinite(r)], r[np.isfinite(r)], rtol=2e-5, atol=2e-3)


def test_int4_quantizer_is_the_documented_rule_bit_for_bit():
    """Native kernels (div.rn.f32) against the rule in numpy, on bfloat16 rows with exact
    halves (tests/_quant_rule.py). XLA's float32 division on a GPU is not correctly rounded
    (about 0.3% of these nibbles move by one), so the jnp reference and the 8-bit XLA path are
    held to the rule on the CPU only (tests/test_int4.py); the GPU paths use the kernels."""

    x = halves_rows(np.random.default_rng(70), 4096, D)
    want = int4_rule(x)
    xb = jnp.asarray(x, jnp.bfloat16)
    got = int4.quantize_int4(xb, backend="pallas")
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), w)


@pytest.mark.parametrize("word_stores", [False, True], ids=["bytes", "words"])
def test_cache_append_decode_is_the_reference_bit_for_bit(word_stores):
    """The decode append kernel natively: pages and Quest min/max equal the XLA reference
    exactly, INT4 codes, scales and zeros the rule in numpy (fresh pages, mid-page writes,
    skipped sequences); the codes stored as bytes and as 4-byte words (what pools of 2**31
    to 2**32 code bytes take)."""

    rng = np.random.default_rng(11)
    batch, num_pages = 48, 200
    shape = (HKV, num_pages, S)
    cache = (
        jnp.asarray(rng.standard_normal((*shape, D)), jnp.bfloat16),
        jnp.asarray(rng.standard_normal((*shape, D)), jnp.bfloat16),
        jnp.asarray(rng.integers(0, 256, (*shape, D // 2)), jnp.uint8),
        jnp.asarray(rng.random(shape), jnp.float32),
        jnp.asarray(rng.random(shape), jnp.float32),
        jnp.asarray(rng.standard_normal((HKV, num_pages, D)), jnp.bfloat16),
        jnp.asarray(rng.standard_normal((HKV, num_pages, D)), jnp.bfloat16),
    )
    k_new = jnp.asarray(rng.standard_normal((batch, HKV, D)), jnp.bfloat16)
    v_new = jnp.asarray(rng.standard_normal((batch, HKV, D)), jnp.bfloat16)
    table = jnp.asarray(rng.permutation(np.arange(1, num_pages))[: batch * 4].reshape(batch, 4))
    pos = jnp.asarray(rng.choice([0, 5, 15, 16, 40, 63, -1], batch), jnp.int32)
    args = (*cache, k_new, v_new, table.astype(jnp.int32), pos)
    cfg = append.AppendGpuConfig(word_stores=word_stores)
    got = append.cache_append_decode_gpu(*args, config=cfg)
    want = [np.array(x) for x in append.cache_append_decode(*args, backend="reference")]
    # The reference's INT4 rows come from XLA's GPU division; put the rule's there instead.
    live = np.asarray(pos) >= 0
    page = np.asarray(table)[np.arange(batch), np.maximum(np.asarray(pos), 0) // S][live]
    slot = (np.asarray(pos) % S)[live]
    rows = int4_rule(np.asarray(k_new, np.float32)[live])  # [n, Hkv, ...]
    for w, r in zip(want[2:5], rows):
        w[:, page, slot] = np.moveaxis(r, 0, 1)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), w)


@pytest.mark.parametrize("int8_asm", [True, False], ids=["asm", "cast"])
@pytest.mark.parametrize("q_dtype", [jnp.bfloat16, jnp.float32], ids=["qbf16", "qf32"])
def test_quest_scores_int8(q_dtype, int8_asm):
    """INT8 Quest metadata natively, by both INT8 paths (codes as words converted by inline
    PTX, or cast to bf16): the kernel against the jnp reference on the same codes (float32
    sums of the same products in another order, times the same page scale), and an upper bound
    of the native kernel's scores on the exact bf16 metadata, at most s * sum_d |q_d| above
    them."""

    batch, max_len = 3, 2048
    c = _cache(6, batch, max_len)
    rng = c["rng"]
    kmin, kmax = c["k"].min(axis=2), c["k"].max(axis=2)
    lo, hi, scale = quest.quantize_page_bounds(kmin, kmax)
    q = jnp.asarray(rng.standard_normal((batch, HQ, D)), q_dtype)
    table, lengths = c["page_table"], c["lengths"]
    args = (q, lo, hi, table, lengths)
    cfg = quest.QuestGpuConfig(int8_asm=int8_asm)
    s = np.asarray(quest.quest_page_scores(*args, scale=scale, backend="pallas", config=cfg))
    r = np.asarray(quest.quest_page_scores(*args, scale=scale, backend="reference"))
    live = np.isfinite(r)
    np.testing.assert_array_equal(np.isfinite(s), live)
    # Terms up to |q| * 127 * s ~ 4 * 127 * 0.03, 128 of them: float32 sums agree to ~1e-4.
    # Kept for both paths: the inline-PTX path's f16 q term is exact for bf16 q but for
    # entries under 2^-17 of the head's largest |q| (rare here, each moving a score by < 3e-7)
    # and its two terms keep ~22 bits of float32 q (the bf16 terms ~16), so it adds rounding
    # far below 1e-3; a tighter tolerance would be a guess until the native sums are measured.
    np.testing.assert_allclose(s[live], r[live], rtol=1e-5, atol=1e-3)
    # Summed over each group's heads in the kernel: four such sums.
    summed = quest.quest_page_scores(
        *args, scale=scale, backend="pallas", config=cfg, group_sum=True
    )
    r_sum = r.reshape(batch, HKV, HQ // HKV, -1).sum(axis=2)
    np.testing.assert_array_equal(np.isfinite(summed), np.isfinite(r_sum))
    live_sum = np.isfinite(r_sum)
    np.testing.assert_allclose(np.asarray(summed)[live_sum], r_sum[live_sum], rtol=1e-5, atol=4e-3)
    exact = np.asarray(quest.quest_page_scores(q, kmin, kmax, table, lengths, backend="pallas"))
    qa = np.abs(np.asarray(q, np.float32))
    page_scale = np.repeat(np.asarray(scale)[:, np.asarray(table)], HQ // HKV, axis=0)
    step = np.einsum("bhd,hbj->bhj", qa, page_scale)[live]
    gap = s[live] - exact[live]
    assert (gap >= -1e-3).all() and (gap <= step + 1e-3).all()


@pytest.mark.parametrize("form", ["int8", "native"])
def test_quest_scores_mosaic(form):
    """The Mosaic GPU page scores (TMA row copies) against the jnp reference, both metadata
    forms; 2048 / 16 = 128 pages a sequence: two 64-page tiles, ragged lengths, dead tiles."""

    batch, max_len = 3, 2048
    c = _cache(7, batch, max_len)
    rng = c["rng"]
    kmin, kmax = c["k"].min(axis=2), c["k"].max(axis=2)
    scale = None
    if form == "int8":
        kmin, kmax, scale = quest.quantize_page_bounds(kmin, kmax)
    q = jnp.asarray(rng.standard_normal((batch, HQ, D)), jnp.bfloat16)
    args = (q, kmin, kmax, c["page_table"], c["lengths"].at[1].set(S + 1))
    cfg = quest.QuestGpuConfig(pages_per_block=64, lowering="mosaic")
    s = np.asarray(quest.quest_page_scores(*args, scale=scale, backend="pallas", config=cfg))
    r = np.asarray(quest.quest_page_scores(*args, scale=scale, backend="reference"))
    live = np.isfinite(r)
    np.testing.assert_array_equal(np.isfinite(s), live)
    assert (s[~live] == -np.inf).all()
    # As test_quest_scores / test_quest_scores_int8: float32 sums of the same products.
    np.testing.assert_allclose(s[live], r[live], rtol=2e-5, atol=2e-3)


def test_cache_append_decode_int8_is_the_rule_bit_for_bit():
    """The decode append kernel with INT8 Quest metadata natively: pages as the XLA reference,
    min / max codes and page scales the rule in numpy (tests/_quant_rule.page_bounds_rule;
    the kernel divides with div.rn.f32, XLA's GPU division is not correctly rounded)."""

    rng = np.random.default_rng(12)
    batch, num_pages = 48, 200
    shape = (HKV, num_pages, S)
    kmin = jnp.asarray(rng.standard_normal((HKV, num_pages, D)) - 1, jnp.bfloat16)
    kmax = jnp.asarray(rng.standard_normal((HKV, num_pages, D)) + 1, jnp.bfloat16)
    lo, hi, scale = (np.asarray(x) for x in quest.quantize_page_bounds(kmin, kmax))
    cache = (
        jnp.asarray(rng.standard_normal((*shape, D)), jnp.bfloat16),
        jnp.asarray(rng.standard_normal((*shape, D)), jnp.bfloat16),
        jnp.asarray(rng.integers(0, 256, (*shape, D // 2)), jnp.uint8),
        jnp.asarray(rng.random(shape), jnp.float32),
        jnp.asarray(rng.random(shape), jnp.float32),
        jnp.asarray(lo),
        jnp.asarray(hi),
    )
    # Keys of mixed magnitude: some widen the page's scale, most do not.
    mag = rng.choice([0.5, 1.0, 3.0], (batch, 1, 1))
    k_new = jnp.asarray(rng.standard_normal((batch, HKV, D)) * mag, jnp.bfloat16)
    v_new = jnp.asarray(rng.standard_normal((batch, HKV, D)), jnp.bfloat16)
    table = rng.permutation(np.arange(1, num_pages))[: batch * 4].reshape(batch, 4)
    pos = np.asarray(rng.choice([0, 5, 15, 16, 40, 63, -1], batch), np.int32)
    args = (*cache, k_new, v_new, jnp.asarray(table, jnp.int32), jnp.asarray(pos))
    got = append.cache_append_decode(*args, k_mm_scale=jnp.asarray(scale), backend="pallas")
    want = append.cache_append_decode(*args, k_mm_scale=jnp.asarray(scale), backend="reference")
    for g, w in zip(got[:2], want[:2]):  # K and V pages
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    mn, mx, sc = lo.copy(), hi.copy(), scale.copy()
    for b in np.flatnonzero(pos >= 0):
        page, slot = table[b, pos[b] // S], pos[b] % S
        k = np.asarray(k_new[b], np.float32)
        fresh = np.full((HKV,), slot == 0)
        mn[:, page], mx[:, page], sc[:, page] = page_bounds_rule(
            mn[:, page], mx[:, page], sc[:, page], k, k, fresh
        )
    for g, w in zip(got[5:], (mn, mx, sc)):
        np.testing.assert_array_equal(np.asarray(g), w)

"""Quest page scores.

The jnp reference is pinned by a hand-computed score and the upper-bound property; the GPU
(Triton, interpret mode) and TPU (Mosaic, TPU interpreter) kernels are compared to it on fresh
random inputs, then lowered for CUDA and TPU. The metadata is the min/max of random K pages
(numpy, tests/_metadata below); unmapped pages hold stale random values, so a read through the
wrong page shows. Both interpreters fill fresh outputs with NaN, so an unwritten score shows too.
(The cache's writes of the metadata are tested in tests/test_append.py and tests/test_cache.py.)
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _export import export_cuda, export_tpu, pallas_kernels_called
from _quant_rule import page_bounds_rule

from pallas_kernels import assume_platform, quest


@dataclasses.dataclass(frozen=True)
class Case:
    dtype: type  # k_pages / k_min / k_max
    head_dim: int
    page_size: int

    def __str__(self):
        return f"{jnp.dtype(self.dtype).name}-D{self.head_dim}-S{self.page_size}"


# Each dtype, head_dim and page size appears at least once; every case is a separate compile
# in the interpreters, so the sweep stays short.
CASES = [Case(jnp.float32, 64, 1), Case(jnp.bfloat16, 128, 16)]
SEEDS = {str(c): i for i, c in enumerate(CASES)}

SCORES = {"gpu": quest.quest_page_scores_gpu, "tpu": quest.quest_page_scores_tpu}
# Small GPU tiles so tiny inputs still use several programs per (sequence, head), including
# tiles wholly past a sequence's last page.
GPU_CONFIG = quest.QuestGpuConfig(pages_per_block=2)
BATCH, HKV, MAX_PAGES = 5, 2, 5


def _lengths(page_size: int):
    """Ragged: empty, one token, a page boundary exactly, (nearly) all pages with a partial
    last page, and one page plus a token."""
    full = MAX_PAGES * page_size
    return jnp.asarray([0, 1, 2 * page_size, full - (page_size > 1), page_size + 1], jnp.int32)


def _inputs(case: Case, rng):
    """Random K pages and stale metadata, a shuffled page table with one null entry."""
    s, d = case.page_size, case.head_dim
    num_pages = BATCH * MAX_PAGES + 3  # page 0 is the null page; two pages never mapped
    k_pages = jnp.asarray(rng.standard_normal((HKV, num_pages, s, d)) * 2, case.dtype)
    k_min = jnp.asarray(rng.standard_normal((HKV, num_pages, d)) - 3, case.dtype)
    k_max = jnp.asarray(rng.standard_normal((HKV, num_pages, d)) + 3, case.dtype)
    table = rng.permutation(num_pages - 1)[: BATCH * MAX_PAGES].reshape(BATCH, MAX_PAGES) + 1
    table[3, 2] = 0  # a live logical page mapped to the null page: it still gets a score
    return k_pages, k_min, k_max, jnp.asarray(table, jnp.int32)


def _metadata(k_min, k_max, k_pages, table, lengths):
    """The Quest metadata the cache maintains, in numpy: for every live logical page j of
    sequence b (not mapped to the null page), the min / max over its first
    min(S, lengths[b] - j * S) rows; the other pages keep their (stale) values."""
    mn, mx, kp = (np.array(a, np.float32) for a in (k_min, k_max, k_pages))
    s = kp.shape[2]
    for b, length in enumerate(np.asarray(lengths)):
        for j in range(-(-int(length) // s)):
            page = int(table[b, j])
            if page:
                n = min(s, int(length) - j * s)
                mn[:, page] = kp[:, page, :n].min(axis=1)
                mx[:, page] = kp[:, page, :n].max(axis=1)
    # Min and max of values in the metadata dtype are exact in it.
    return jnp.asarray(mn, k_min.dtype), jnp.asarray(mx, k_max.dtype)


def _assert_scores_close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    assert not np.isnan(got).any(), "unwritten (NaN-poisoned) scores"
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    live = np.isfinite(want)
    assert np.isfinite(got[live]).all()
    # float32 sums of the same products in another order (or on the MXU).
    np.testing.assert_allclose(got[live], want[live], rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------
# References


def test_score_micro_case():
    # lengths 3, page size 2: logical pages 0 and 1 are live, page 2 scores -inf.
    # Logical 0 -> physical 1: q = [1, -2], min = [0.5, -1], max = [2, 3]
    #   d0: max(1 * 0.5, 1 * 2) = 2;  d1: max(-2 * -1, -2 * 3) = max(2, -6) = 2;  score 4.
    # Logical 1 -> physical 2: min = [0, 0], max = [1, 1]
    #   d0: max(0, 1) = 1;  d1: max(-0, -2) = 0;  score 1.
    q = jnp.asarray([[[1.0, -2.0]]], jnp.float32)
    k_min = jnp.asarray([[[0, 0], [0.5, -1.0], [0, 0]]], jnp.float32)
    k_max = jnp.asarray([[[0, 0], [2.0, 3.0], [1, 1]]], jnp.float32)
    table = jnp.asarray([[1, 2, 1]], jnp.int32)
    s = quest.quest_page_scores(
        q, k_min, k_max, table, jnp.asarray([3]), page_size=2, backend="reference"
    )
    np.testing.assert_array_equal(np.asarray(s), [[[4.0, 1.0, -np.inf]]])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_scores_bound_every_key(case):
    """A page's score is >= q . k for every key k of it (the Quest upper bound)."""
    rng = np.random.default_rng(SEEDS[str(case)])
    k_pages, k_min, k_max, table = _inputs(case, rng)
    lengths = _lengths(case.page_size)
    k_min, k_max = _metadata(k_min, k_max, k_pages, np.asarray(table), lengths)
    q = jnp.asarray(rng.standard_normal((BATCH, 4 * HKV, case.head_dim)), jnp.float32)
    s = np.asarray(
        quest.quest_page_scores(
            q, k_min, k_max, table, lengths, page_size=case.page_size, backend="reference"
        )
    )
    qn, kp, tbl = np.asarray(q), np.asarray(k_pages, np.float32), np.asarray(table)
    s_sz = case.page_size
    for b, length in enumerate(np.asarray(lengths)):
        for j in range(MAX_PAGES):
            if j * s_sz >= length:
                assert np.isneginf(s[b, :, j]).all()
                continue
            if tbl[b, j] == 0:  # metadata of the null page is not maintained
                continue
            n = min(s_sz, int(length) - j * s_sz)
            for h in range(4 * HKV):
                dots = kp[h // 4, tbl[b, j], :n] @ qn[b, h]
                assert s[b, h, j] >= dots.max() - 1e-4 * (1 + abs(dots.max()))


# --------------------------------------------------------------------------------------------
# Kernels vs references (interpret mode)


def _config(impl):
    return dict(config=GPU_CONFIG) if impl == "gpu" else {}


SCORE_CASES = [
    (CASES[0], jnp.float32, 1),
    (CASES[1], jnp.bfloat16, 4),
    (Case(jnp.bfloat16, 64, 16), jnp.float32, 8),
]


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
@pytest.mark.parametrize(
    "case,q_dtype,group", SCORE_CASES, ids=lambda v: str(v) if isinstance(v, Case) else None
)
def test_scores_kernels(impl, case, q_dtype, group):
    rng = np.random.default_rng(30 + group)
    k_pages, k_min, k_max, table = _inputs(case, rng)
    lengths = _lengths(case.page_size)
    k_min, k_max = _metadata(k_min, k_max, k_pages, np.asarray(table), lengths)
    q = jnp.asarray(rng.standard_normal((BATCH, group * HKV, case.head_dim)), q_dtype)
    args = (q, k_min, k_max, table, lengths)
    s = case.page_size
    got = SCORES[impl](*args, page_size=s, interpret=True, **_config(impl))
    want = quest.quest_page_scores_reference(*args, page_size=s)
    assert got.shape == (BATCH, group * HKV, MAX_PAGES)
    assert np.isfinite(np.asarray(want)).sum()
    _assert_scores_close(got, want)


# GPU page tiles: 6 sequences x 2 KV heads over 23 pages (page size 4). Live pages per
# sequence: 0, 1, 7, 9, 16, 23. With 2-page tiles (12 tiles, the last one half past the table):
# 7 and 9 pages end mid-tile, 16 on a tile boundary, 23 use every tile, 0 only write -inf; with
# 4-page tiles (6 tiles, the last one overhanging by one page) 9 ends one page into a tile.
TILE_PAGES, TILE_LIVE = 23, (0, 1, 7, 9, 16, 23)
TILE_CONFIGS = [quest.QuestGpuConfig(pages_per_block=2), quest.QuestGpuConfig(pages_per_block=4)]


@pytest.mark.parametrize("config", TILE_CONFIGS, ids=str)
def test_gpu_scores_tiles(config):
    rng = np.random.default_rng(70 + TILE_CONFIGS.index(config))
    s, d, group = 4, 64, 4
    batch = len(TILE_LIVE)
    num_pages = batch * TILE_PAGES + 1
    k_min = jnp.asarray(rng.standard_normal((HKV, num_pages, d)) - 1, jnp.bfloat16)
    k_max = jnp.asarray(np.asarray(k_min, np.float32) + rng.random((HKV, num_pages, d)) * 3)
    k_max = k_max.astype(jnp.bfloat16)
    table = rng.permutation(num_pages - 1).reshape(batch, TILE_PAGES) + 1
    table[4, 3] = 0  # a live page mapped to the null page still gets a (finite) score
    table = jnp.asarray(table, jnp.int32)
    # Lengths end mid-page where they can, so the last live page is partial.
    lengths = jnp.asarray([max(0, n * s - (n % 2)) for n in TILE_LIVE], jnp.int32)
    q = jnp.asarray(rng.standard_normal((batch, group * HKV, d)), jnp.float32)
    args = (q, k_min, k_max, table, lengths)
    got = quest.quest_page_scores(*args, page_size=s, backend="pallas", config=config)
    want = quest.quest_page_scores_reference(*args, page_size=s)
    live = np.isfinite(np.asarray(want))
    assert live.sum(axis=(1, 2)).tolist() == [group * HKV * n for n in TILE_LIVE]
    _assert_scores_close(got, want)


DOT_CONFIGS = [quest.QuestGpuConfig(pages_per_block=16), quest.QuestGpuConfig()]


@pytest.mark.parametrize("config", DOT_CONFIGS, ids=str)
@pytest.mark.parametrize("form", ["bf16", "int8"])
@pytest.mark.parametrize("q_dtype", [jnp.float32, jnp.bfloat16], ids=["qf32", "qbf16"])
@pytest.mark.parametrize("d", [64, 96])
def test_gpu_scores_dots(config, form, q_dtype, d):
    """The Triton kernel's tensor-core path (bf16 or INT8 metadata, tiles of >= 16 pages)
    against the reference: the tile-edge lengths of test_gpu_scores_tiles over 16-page tiles
    (two tiles, the second past the table) and one tile wider than the table; float32 q as two
    bf16 terms; head_dim 96 padded to 128."""
    rng = np.random.default_rng(80 + d)
    s, group = 4, 4
    batch = len(TILE_LIVE)
    num_pages = batch * TILE_PAGES + 1
    k_min = jnp.asarray(rng.standard_normal((HKV, num_pages, d)) - 1, jnp.bfloat16)
    k_max = jnp.asarray(np.asarray(k_min, np.float32) + rng.random((HKV, num_pages, d)) * 3)
    k_max = k_max.astype(jnp.bfloat16)
    scale = None
    if form == "int8":
        k_min, k_max, scale = quest.quantize_page_bounds(k_min, k_max)
    pages = min(config.pages_per_block, 32)  # the kernel's tile: the table has 23 pages
    assert quest._uses_dots(k_min.dtype, d, pages)
    table = rng.permutation(num_pages - 1).reshape(batch, TILE_PAGES) + 1
    table = jnp.asarray(table, jnp.int32)
    lengths = jnp.asarray([max(0, n * s - (n % 2)) for n in TILE_LIVE], jnp.int32)
    q = jnp.asarray(rng.standard_normal((batch, group * HKV, d)), q_dtype)
    args = (q, k_min, k_max, table, lengths)
    got = quest.quest_page_scores(*args, scale=scale, page_size=s, backend="pallas", config=config)
    want = quest.quest_page_scores_reference(*args, scale, page_size=s)
    _assert_scores_close(got, want)
    if d == 96 and q_dtype == jnp.float32:  # and the same path lowers for CUDA
        export_cuda(
            lambda *a: quest.quest_page_scores_gpu(*a, page_size=s, config=config),
            *args,
            scale,
        )


def test_gpu_scores_paths():
    """Which Triton path scores: dots for bf16 / INT8 metadata in tiles Triton's dot takes,
    float32 multiply-adds otherwise (float32 metadata stays exact); INT8 codes as words of
    four where head_dim is a multiple of 4 and its words (padded) fill a dot's K of 16."""
    assert quest._uses_dots(jnp.bfloat16, 128, 64)
    assert quest._uses_dots(jnp.int8, 96, 16)
    assert not quest._uses_dots(jnp.float32, 128, 64)
    assert not quest._uses_dots(jnp.bfloat16, 128, 8)
    assert not quest._uses_dots(jnp.int8, 8, 64)
    for d in (64, 96, 128, 256):
        assert quest._uses_int8_words(jnp.int8, d, 16, 4)
    assert not quest._uses_int8_words(jnp.int8, 32, 64, 4)  # 8 words: below a dot's K
    assert not quest._uses_int8_words(jnp.int8, 66, 64, 4)  # not whole words
    assert not quest._uses_int8_words(jnp.int8, 128, 8, 4)  # no dots
    assert not quest._uses_int8_words(jnp.bfloat16, 128, 64, 4)
    # 16 pages x 16 words over 256 threads: one word a thread, no pair for the PTX.
    assert not quest._uses_int8_words(jnp.int8, 64, 16, 8)
    assert quest._uses_int8_words(jnp.int8, 64, 32, 8)


# --------------------------------------------------------------------------------------------
# INT8 codes as words of four (QuestGpuConfig.int8_asm): conversion, scores, lowering


def _words(codes):
    """int8 [..., 4 n] -> uint32 [..., n], as quest_page_scores_gpu views the rows."""
    codes = jnp.asarray(codes, jnp.int8)
    return jax.lax.bitcast_convert_type(codes.reshape(*codes.shape[:-1], -1, 4), jnp.uint32)


def _emulate_int8_asm(asm: str, first, second):
    """The PTX of quest._int8_asm on two uint32 words, in numpy: prmt (default mode, selector
    nibbles < 8 pick bytes of {second:first}), lop3 by its truth table, sub.f16x2 on the
    halves. Returns the two f16 results (of the first word, of the second)."""
    pattern = (
        r"\{ \.reg \.b32 t, c; prmt\.b32 t, \$1, \$2, (0x[0-9a-f]+); "
        r"lop3\.b32 t, t, (0x[0-9a-f]+), (0x[0-9a-f]+), (0x[0-9a-f]+); "
        r"mov\.b32 c, (0x[0-9a-f]+); sub\.f16x2 \$0, t, c; \}"
    )
    sel, mask, xor, lut, const = (int(x, 16) for x in re.fullmatch(pattern, asm).groups())
    both = (second.astype(np.uint64) << np.uint64(32)) | first.astype(np.uint64)
    t = np.zeros_like(first)
    for i in range(4):
        pick = (sel >> (4 * i)) & 0xF
        assert pick < 8
        t |= ((both >> np.uint64(8 * pick)) & np.uint64(0xFF)).astype(np.uint32) << np.uint32(8 * i)
    a, b, c = t, np.uint32(mask), np.uint32(xor)
    t = np.zeros_like(t)
    for i in range(8):  # minterm i: bits (a, b, c) = (i >> 2, i >> 1, i) & 1
        if lut >> i & 1:
            t |= (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)
    halves = t.view(np.uint16).reshape(-1, 2).view(np.float16)
    consts = np.full(2, const, np.uint32).view(np.uint16).reshape(-1, 2).view(np.float16)
    diff = halves - consts[:1]
    return diff[:, 0], diff[:, 1]


def test_int8_codes_f16_are_the_codes():
    """Every INT8 byte value (the codes -127..127 and -128) at every byte position of a word:
    the jnp conversion and a numpy model of the inline PTX both give the code exactly, in
    block k = byte k."""
    rng = np.random.default_rng(100)
    codes = np.arange(-128, 128, dtype=np.int8)
    rows = np.stack([rng.permutation(codes) for _ in range(4)], axis=-1).reshape(1, -1)
    words = _words(rows)  # [1, 256]: byte k of word w is rows[0, 4 w + k]
    blocks = quest._int8_codes_f16(words)
    wn = np.asarray(words)[0]
    for k, block in enumerate(blocks):
        assert block.dtype == jnp.float16
        want = rows[0, k::4].astype(np.float32)
        np.testing.assert_array_equal(np.asarray(block, np.float32)[0], want)
        lo, hi = _emulate_int8_asm(quest._int8_asm(k), wn[0::2], wn[1::2])
        np.testing.assert_array_equal(lo.astype(np.float32), want[0::2])
        np.testing.assert_array_equal(hi.astype(np.float32), want[1::2])


def test_pow2_scale():
    """Exact powers of two with the largest |q| scaled into [1, 2); zero and extreme rows."""
    top = jnp.asarray([1.0, 1.5, 2.0, 1e-3, 1e3, 3e38, 0.0, 1.2e-38], jnp.float32)
    up, down = (np.asarray(x) for x in quest._pow2_scale(top))
    scaled = np.asarray(top) * up
    assert ((scaled[:5] >= 1) & (scaled[:5] < 2)).all()
    assert 2 <= scaled[5] < 4  # e clamped at 126
    assert (up * down == 1).all() and (np.frexp(np.concatenate([up, down]))[0] == 0.5).all()


# q magnitudes per query head of a group of 4: ordinary, large, tiny and mixed (entries
# spread over 1e-3..1e3 within the head), then 1e6 (f16 overflows at 65504) and 1e-6 (f16
# subnormals) without the power-of-two scaling, a zero head, and an ordinary one.
_Q_MAGNITUDES = ("1", "1e3", "1e-3", "mixed", "1e6", "1e-6", "0", "1")


def _q_of_magnitudes(rng, batch, d, dtype):
    q = rng.standard_normal((batch, len(_Q_MAGNITUDES), d))
    for h, m in enumerate(_Q_MAGNITUDES):
        if m == "mixed":
            q[:, h] *= 10.0 ** rng.uniform(-3, 3, (batch, d))
        else:
            q[:, h] *= float(m)
    return jnp.asarray(q, dtype)


@pytest.mark.parametrize("q_dtype", [jnp.float32, jnp.bfloat16], ids=["qf32", "qbf16"])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_scores_int8_words(d, q_dtype):
    """The INT8 word path (jnp conversion, f16 q terms, power-of-two scaling, one dot per code
    block and term) against the reference on q of very different magnitudes, and against the
    bf16-cast path. Tolerance: float32 rounding of sums of D products, relative 2e-6 of the
    terms' magnitude sum_d |q_d| s max(|min_q_d|, |max_q_d|) (the f16 terms keep about 22 bits
    of a head's largest |q|)."""
    rng = np.random.default_rng(110 + d)
    s, group = 4, 4
    batch = len(TILE_LIVE)
    num_pages = batch * TILE_PAGES + 1
    k_min = jnp.asarray(rng.standard_normal((HKV, num_pages, d)) - 1, jnp.float32)
    k_max = k_min + jnp.asarray(rng.random((HKV, num_pages, d)) * 3, jnp.float32)
    lo, hi, scale = quest.quantize_page_bounds(k_min, k_max)
    table = rng.permutation(num_pages - 1).reshape(batch, TILE_PAGES) + 1
    table = jnp.asarray(table, jnp.int32)
    lengths = jnp.asarray([max(0, n * s - (n % 2)) for n in TILE_LIVE], jnp.int32)
    q = _q_of_magnitudes(rng, batch, d, q_dtype)
    assert q.shape[1] == group * HKV
    args = (q, lo, hi, table, lengths, scale)
    config = quest.QuestGpuConfig(pages_per_block=16)
    assert quest._uses_int8_words(lo.dtype, d, config.pages_per_block, config.num_warps)
    got = quest.quest_page_scores_gpu(*args, page_size=s, interpret=True, config=config)
    want = quest.quest_page_scores_reference(*args, page_size=s)
    got, want = np.asarray(got), np.asarray(want)
    assert not np.isnan(got).any()
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    live = np.isfinite(want)
    tbl = np.asarray(table)
    code_mag = np.maximum(np.abs(np.asarray(lo, np.float32)), np.abs(np.asarray(hi, np.float32)))
    code_mag = code_mag * np.asarray(scale)[..., None]  # [Hkv, P, D]
    qa = np.abs(np.asarray(q, np.float32)).reshape(batch, HKV, group, d)
    terms = np.einsum("bhgd,hbjd->bhgj", qa, code_mag[:, tbl]).reshape(want.shape)
    tol = 2e-6 * terms[live]
    assert (np.abs(got[live] - want[live]) <= tol).all()
    zero = _Q_MAGNITUDES.index("0")
    assert (got[:, zero][live[:, zero]] == 0).all()
    old = quest.QuestGpuConfig(pages_per_block=16, int8_asm=False)
    cast = np.asarray(quest.quest_page_scores_gpu(*args, page_size=s, interpret=True, config=old))
    assert (np.abs(cast[live] - want[live]) <= 1e-5 * terms[live]).all()


@pytest.mark.parametrize("d", [32, 96, 128])
def test_int8_words_export_cuda(d):
    """The Triton kernel the public entry lowers for CUDA converts INT8 codes by the inline PTX
    where the word path applies (head_dim 96: 24 words padded to 32; 128), and not for
    head_dim 32 (8 words), with int8_asm=False, or for bf16 metadata."""
    rng = np.random.default_rng(120)
    num_pages = 2 * TILE_PAGES + 1
    k_min = jnp.asarray(rng.standard_normal((HKV, num_pages, d)), jnp.bfloat16)
    k_max = k_min + 1
    lo, hi, scale = quest.quantize_page_bounds(k_min, k_max)
    table = jnp.asarray(rng.permutation(num_pages - 1).reshape(2, TILE_PAGES) + 1, jnp.int32)
    lengths = jnp.asarray([TILE_PAGES * 4, 9], jnp.int32)
    asm_ops = ("prmt.b32", "lop3.b32", "sub.f16x2")
    forms = [((lo, hi, scale), True), ((lo, hi, scale), False), ((k_min, k_max, None), True)]
    for q_dtype in (jnp.float32, jnp.bfloat16):
        q = jnp.asarray(rng.standard_normal((2, 4 * HKV, d)), q_dtype)
        for (mn, mx, sc), int8_asm in forms:
            cfg = quest.QuestGpuConfig(pages_per_block=16, int8_asm=int8_asm)

            def scores(q, mn, mx, sc, cfg=cfg):
                return quest.quest_page_scores(
                    q, mn, mx, table, lengths, scale=sc, page_size=4, backend="pallas", config=cfg
                )

            with assume_platform("gpu"):
                text = export_cuda(scores, q, mn, mx, sc).mlir_module()
            assert pallas_kernels_called(text) == ["quest_page_scores_gpu"]
            words = int8_asm and sc is not None and d != 32
            assert [text.count(op) for op in asm_ops] == [4 * words] * 3


GROUP_SUM_FORMS = {
    # (metadata, GPU config): the Triton kernel's float32 multiply-add path, its bf16 dots,
    # its INT8 words, and (TPU) the Mosaic kernel's MXU dots.
    "f32-fma": (jnp.float32, quest.QuestGpuConfig(pages_per_block=4)),
    "bf16-dots": (jnp.bfloat16, quest.QuestGpuConfig(pages_per_block=16)),
    "int8-words": ("int8", quest.QuestGpuConfig(pages_per_block=16)),
}


@pytest.mark.parametrize("form", GROUP_SUM_FORMS)
def test_group_sum_is_the_sum_of_the_groups_heads(form):
    """group_sum=True returns [B, Hkv, P], each KV head's sum over its query heads, summed in
    the kernels; -inf at the same pages, and tiles wholly past the length written too."""
    meta, config = GROUP_SUM_FORMS[form]
    rng = np.random.default_rng(130 + list(GROUP_SUM_FORMS).index(form))
    s, group, d = 4, 4, 128
    batch = len(TILE_LIVE)
    num_pages = batch * TILE_PAGES + 1
    k_min = jnp.asarray(rng.standard_normal((HKV, num_pages, d)) - 1, jnp.float32)
    k_max = k_min + jnp.asarray(rng.random((HKV, num_pages, d)) * 3, jnp.float32)
    scale = None
    if meta == "int8":
        k_min, k_max, scale = quest.quantize_page_bounds(k_min, k_max)
    else:
        k_min, k_max = k_min.astype(meta), k_max.astype(meta)
    table = jnp.asarray(rng.permutation(num_pages - 1).reshape(batch, TILE_PAGES) + 1, jnp.int32)
    lengths = jnp.asarray([max(0, n * s - (n % 2)) for n in TILE_LIVE], jnp.int32)
    q = jnp.asarray(rng.standard_normal((batch, group * HKV, d)), jnp.float32)
    args = (q, k_min, k_max, table, lengths)
    per_head = quest.quest_page_scores_reference(*args, scale, page_size=s)
    want = np.asarray(per_head).reshape(batch, HKV, group, TILE_PAGES).sum(axis=2)
    ref = quest.quest_page_scores(*args, scale=scale, page_size=s, group_sum=True)
    _assert_scores_close(ref, want)
    for backend, cfg in (("pallas", config), ("pallas_tpu", None)):
        got = quest.quest_page_scores(
            *args, scale=scale, page_size=s, backend=backend, config=cfg, group_sum=True
        )
        _assert_scores_close(got, want)
    if form == "int8-words":  # the summing kernel lowers for CUDA, asm included
        with assume_platform("gpu"):
            text = export_cuda(
                lambda q, mn, mx, table, lengths, scale: quest.quest_page_scores(
                    *(q, mn, mx, table, lengths),
                    scale=scale,
                    page_size=s,
                    backend="pallas",
                    config=config,
                    group_sum=True,
                ),
                *args,
                scale,
            ).mlir_module()
        assert pallas_kernels_called(text) == ["quest_page_scores_gpu"]
        assert text.count("prmt.b32") == 4
        export_tpu(
            lambda *a: quest.quest_page_scores_tpu(*a, page_size=s, group_sum=True), *args, scale
        )
    with pytest.raises(ValueError, match="group_sum must be a static bool"):
        quest.quest_page_scores(*args, scale=scale, page_size=s, group_sum=1)


def test_tpu_scores_several_page_chunks():
    """max_pages > 128: the TPU kernel's page axis spans two blocks, the second partial."""
    case = Case(jnp.float32, 64, 1)
    rng = np.random.default_rng(40)
    max_pages = 130
    k_min = jnp.asarray(rng.standard_normal((1, max_pages + 1, 64)) - 1, jnp.float32)
    k_max = k_min + 2
    table = jnp.asarray(rng.permutation(max_pages) + 1, jnp.int32)[None].repeat(2, 0)
    lengths = jnp.asarray([129, 3], jnp.int32)
    q = jnp.asarray(rng.standard_normal((2, 1, 64)), jnp.float32)
    args = (q, k_min, k_max, table, lengths)
    want = quest.quest_page_scores_reference(*args, page_size=case.page_size)
    got = quest.quest_page_scores_tpu(*args, page_size=case.page_size, interpret=True)
    _assert_scores_close(got, want)
    # The TPU tuning through the public entry: one 256-page block instead of two of 128.
    one_block = quest.QuestTpuConfig(pages_per_block=256)
    got = quest.quest_page_scores(
        *args, page_size=case.page_size, backend="pallas_tpu", config=one_block
    )
    _assert_scores_close(got, want)


def test_public_backends_dispatch():
    case = CASES[0]
    rng = np.random.default_rng(50)
    k_pages, k_min, k_max, table = _inputs(case, rng)
    lengths = _lengths(case.page_size)
    k_min, k_max = _metadata(k_min, k_max, k_pages, np.asarray(table), lengths)
    q = jnp.asarray(rng.standard_normal((BATCH, 2 * HKV, case.head_dim)), jnp.float32)
    args = (q, k_min, k_max, table, lengths)
    want = quest.quest_page_scores(*args, page_size=case.page_size, backend="reference")
    for backend in ("pallas", "pallas_tpu", "auto"):
        got = quest.quest_page_scores(*args, page_size=case.page_size, backend=backend)
        _assert_scores_close(got, want)


# --------------------------------------------------------------------------------------------
# Lowering (no accelerator needed)


def _export_args(case: Case, group: int = 4):
    rng = np.random.default_rng(0)
    _, k_min, k_max, table = _inputs(case, rng)
    q = jnp.asarray(rng.standard_normal((BATCH, group * HKV, case.head_dim)), case.dtype)
    return q, k_min, k_max, table, _lengths(case.page_size)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_export_cuda(case):
    scores = _export_args(case)
    s = case.page_size
    export_cuda(lambda *a: quest.quest_page_scores_gpu(*a, page_size=s), *scores)
    # 1-page tiles: a grid of one program per page.
    cfg = quest.QuestGpuConfig(pages_per_block=1)
    export_cuda(lambda *a: quest.quest_page_scores_gpu(*a, page_size=s, config=cfg), *scores)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("form", ["int8", "native"])
def test_export_cuda_mosaic(case, form):
    # Mosaic GPU has no interpreter for this kernel: its lowering is what a CPU can check.
    q, k_min, k_max, table, lengths = _export_args(case)
    scale = None
    if form == "int8":
        k_min, k_max, scale = quest.quantize_page_bounds(k_min, k_max)
    cfg = quest.QuestGpuConfig(pages_per_block=64, lowering="mosaic")
    s = case.page_size
    export = jax.export.export(
        jax.jit(lambda *a: quest.quest_page_scores_gpu(*a, page_size=s, config=cfg)),
        platforms=["cuda"],
    )
    args = (q, k_min, k_max, table, lengths, scale)
    if case.head_dim * k_min.dtype.itemsize % 128:  # int8 rows of 64 dims: 64 bytes
        with pytest.raises(ValueError, match="a metadata row of a multiple of 128 bytes"):
            export(*args)
        return
    text = export(*args).mlir_module()
    assert text.count("custom_call @mosaic_gpu_v2") == 1 and "__gpu$xla.gpu.triton" not in text


def test_mosaic_lowering_limits_are_clear_errors():
    with pytest.raises(ValueError, match="QuestGpuConfig.lowering must be one of"):
        quest.QuestGpuConfig(lowering="cuda")
    with pytest.raises(ValueError, match="multiple of 64 with lowering='mosaic', got 32"):
        quest.QuestGpuConfig(pages_per_block=32, lowering="mosaic")
    cfg = quest.QuestGpuConfig(pages_per_block=64, lowering="mosaic")
    with pytest.raises(ValueError, match="runs only on a GPU"):
        quest.quest_page_scores(*_SCORES, backend="pallas_gpu", config=cfg)
    q, k_min, k_max, table, lengths = _SCORES
    d = 4  # int8 rows of 4 bytes: below what one TMA copy moves
    small = (q[..., :d], k_min[..., :d].astype(jnp.int8), k_max[..., :d].astype(jnp.int8))
    scale = jnp.ones(k_min.shape[:2], jnp.float32)
    with pytest.raises(ValueError, match="head_dim a multiple of 32"):
        jax.eval_shape(
            lambda *a: quest.quest_page_scores_gpu(*a, page_size=1, config=cfg),
            *small,
            table,
            lengths,
            scale,
        )


@pytest.mark.parametrize("case", CASES, ids=str)
def test_export_tpu(case):
    s = case.page_size
    export_tpu(lambda *a: quest.quest_page_scores_tpu(*a, page_size=s), *_export_args(case))


# --------------------------------------------------------------------------------------------
# Validation

_SCORES = _export_args(CASES[0])


def _bad_scores(**overrides):
    args = dict(zip(("q", "k_min", "k_max", "page_table", "lengths"), _SCORES))
    args.update(overrides)
    return lambda: quest.quest_page_scores(*args.values(), backend="reference")


_P = BATCH * MAX_PAGES + 3
BAD = {
    "k_min rank": (_bad_scores(k_min=jnp.zeros((HKV, _P, 1, 64))), "k_min"),
    "k_min dtype": (_bad_scores(k_min=jnp.zeros((HKV, _P, 64), jnp.int32)), "k_min"),
    "k_max shape": (_bad_scores(k_max=jnp.zeros((HKV, _P - 1, 64))), "k_max"),
    "page_size": (
        lambda: quest.quest_page_scores(*_SCORES, page_size=0, backend="reference"),
        "page_size",
    ),
    "q rank": (_bad_scores(q=jnp.zeros((BATCH, 64))), "q"),
    "q dtype": (_bad_scores(q=jnp.zeros((BATCH, 8, 64), jnp.float16)), "q"),
    "q heads": (_bad_scores(q=jnp.zeros((BATCH, 3, 64))), "q num_q_heads"),
    "q head_dim": (_bad_scores(q=jnp.zeros((BATCH, 8, 128))), "q"),
    "scores lengths": (_bad_scores(lengths=jnp.zeros((BATCH, 1), jnp.int32)), "lengths"),
    "scores page_table": (_bad_scores(page_table=jnp.zeros((BATCH,), jnp.int32)), "page_table"),
    "scores lengths dtype": (
        _bad_scores(lengths=jnp.zeros((BATCH,), jnp.float32)),
        "lengths",
    ),
    "backend": (lambda: quest.quest_page_scores(*_SCORES, backend="triton"), "backend"),
    "config kind": (
        lambda: quest.quest_page_scores(*_SCORES, config=quest.QuestGpuConfig),
        "config must be None or a QuestGpuConfig or QuestTpuConfig",
    ),
    "config for the other kernel": (
        lambda: quest.quest_page_scores(*_SCORES, backend="pallas", config=quest.QuestTpuConfig()),
        "config is a QuestTpuConfig, but backend='pallas' runs the GPU kernel",
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(name):
    fn, arg = BAD[name]
    with pytest.raises(ValueError, match=arg):
        fn()


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
def test_odd_sizes(impl):
    """head_dim 96 and page size 3: the Triton kernel pads head_dim to 128 and masks."""
    case = Case(jnp.float32, 96, 3)
    rng = np.random.default_rng(60)
    k_pages, k_min, k_max, table = _inputs(case, rng)
    lengths = _lengths(case.page_size)
    k_min, k_max = _metadata(k_min, k_max, k_pages, np.asarray(table), lengths)
    q = jnp.asarray(rng.standard_normal((BATCH, 2 * HKV, case.head_dim)), jnp.float32)
    args = (q, k_min, k_max, table, lengths)
    got = SCORES[impl](*args, page_size=3, interpret=True, **_config(impl))
    _assert_scores_close(got, quest.quest_page_scores_reference(*args, page_size=3))
    if impl == "gpu":
        export_cuda(lambda *a: quest.quest_page_scores_gpu(*a, page_size=3), *args)


def test_config_validation():
    with pytest.raises(ValueError, match="QuestGpuConfig.pages_per_block"):
        quest.QuestGpuConfig(pages_per_block=3)
    with pytest.raises(ValueError, match="QuestGpuConfig.num_warps"):
        quest.QuestGpuConfig(num_warps=0)
    with pytest.raises(ValueError, match="QuestTpuConfig.pages_per_block"):
        quest.QuestTpuConfig(pages_per_block=64)
    # The reference takes either kind (and ignores it).
    for config in (quest.QuestGpuConfig(), quest.QuestTpuConfig()):
        quest.quest_page_scores(*_SCORES, backend="reference", config=config)


# --------------------------------------------------------------------------------------------
# INT8 metadata (codes and a float32 scale per page and KV head)


def _int8_metadata(case: Case, rng):
    """Exact metadata of random pages (as _metadata, in case.dtype) and its INT8 form, plus a
    zero page (scale 0) at physical page 1."""
    k_pages, k_min, k_max, table = _inputs(case, rng)
    lengths = _lengths(case.page_size)
    k_min, k_max = _metadata(k_min, k_max, k_pages, np.asarray(table), lengths)
    k_min, k_max = k_min.at[:, 1].set(0), k_max.at[:, 1].set(0)
    lo, hi, scale = quest.quantize_page_bounds(k_min, k_max)
    return k_pages, (k_min, k_max), (lo, hi, scale), table, lengths


def test_int8_quantization_is_the_rule():
    """quantize_page_bounds against the rule in numpy float32 (correctly rounded division, as
    exact_divide's), bit for bit; a zero page gets scale 0 and codes 0; the largest |bound| of
    a page becomes the code -127 or 127."""
    rng = np.random.default_rng(80)
    _, (k_min, k_max), (lo, hi, scale), _, _ = _int8_metadata(CASES[1], rng)
    codes, zeros = np.zeros(np.shape(lo), np.float32), np.zeros(np.shape(scale), np.float32)
    want = page_bounds_rule(codes, codes, zeros, k_min, k_max, np.ones(np.shape(scale), bool))
    for g, w in zip((lo, hi, scale), want):
        np.testing.assert_array_equal(np.asarray(g), w)
    assert lo.dtype == hi.dtype == jnp.int8 and scale.dtype == jnp.float32
    assert (np.asarray(scale[:, 1]) == 0).all() and (np.asarray(hi[:, 1]) == 0).all()
    extreme = np.maximum(np.abs(np.asarray(lo, np.int32)), np.abs(np.asarray(hi, np.int32)))
    assert (extreme.max(-1)[:, 2:] == 127).all()


@pytest.mark.parametrize("q_dtype", [jnp.float32, jnp.bfloat16])
def test_int8_scores_bound_the_exact_scores_closely(q_dtype):
    """The INT8 score is an upper bound of the exact-metadata score and of every q . k of the
    page, and looser by at most s * sum_d |q_d|: each code rounds its bound outward by less
    than one step s. Slack: float32 rounding of sums of D products, relative 1e-5 of the
    terms' magnitude sum_d |q_d| max(|min_d|, |max_d|)."""
    case = CASES[1]
    rng = np.random.default_rng(81)
    k_pages, exact, (lo, hi, scale), table, lengths = _int8_metadata(case, rng)
    q = jnp.asarray(rng.standard_normal((BATCH, 4 * HKV, case.head_dim)), q_dtype)
    s = case.page_size
    want = np.asarray(quest.quest_page_scores(q, *exact, table, lengths, page_size=s))
    got = np.asarray(quest.quest_page_scores(q, lo, hi, table, lengths, scale=scale, page_size=s))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    live = np.isfinite(want)
    qa = np.abs(np.asarray(q, np.float32))  # [B, Hq, D]
    tbl = np.asarray(table)
    page_scale = np.asarray(scale)[:, tbl]  # [Hkv, B, max_pages]
    step = np.einsum("bhd,hbj->bhj", qa, np.repeat(page_scale, 4, axis=0))
    mags = np.maximum(np.abs(np.asarray(exact[0], np.float32)), np.abs(np.asarray(exact[1])))
    terms = np.einsum("bhd,hbjd->bhj", qa, np.repeat(mags[:, tbl], 4, axis=0))
    slack = 1e-5 * terms + 1e-6
    gap, tol = got[live] - want[live], slack[live]
    assert (gap >= -tol).all()
    assert (gap <= step[live] + tol).all()
    assert (gap > tol).mean() > 0.5  # the bound is looser, not the same
    # Every key of a live page mapped to a real page.
    kp, qn = np.asarray(k_pages, np.float32), np.asarray(q, np.float32)
    for b, length in enumerate(np.asarray(lengths)):
        for j in range(-(-int(length) // s)):
            if tbl[b, j] > 1:  # not the null page or the zeroed page 1
                n = min(s, int(length) - j * s)
                dots = np.einsum("hnd,hd->hn", np.repeat(kp[:, tbl[b, j], :n], 4, 0), qn[b])
                assert (got[b, :, j] >= dots.max(1) - slack[b, :, j]).all()


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
@pytest.mark.parametrize(
    "case,q_dtype,group", SCORE_CASES, ids=lambda v: str(v) if isinstance(v, Case) else None
)
def test_int8_scores_kernels(impl, case, q_dtype, group):
    rng = np.random.default_rng(90 + group)
    _, _, (lo, hi, scale), table, lengths = _int8_metadata(case, rng)
    q = jnp.asarray(rng.standard_normal((BATCH, group * HKV, case.head_dim)), q_dtype)
    args = (q, lo, hi, table, lengths, scale)
    s = case.page_size
    got = SCORES[impl](*args, page_size=s, interpret=True, **_config(impl))
    want = quest.quest_page_scores_reference(*args, page_size=s)
    _assert_scores_close(got, want)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_int8_export(case):
    rng = np.random.default_rng(0)
    _, _, (lo, hi, scale), table, lengths = _int8_metadata(case, rng)
    for q_dtype in (jnp.float32, jnp.bfloat16):
        q = jnp.asarray(rng.standard_normal((BATCH, 4 * HKV, case.head_dim)), q_dtype)
        args = (q, lo, hi, table, lengths, scale)
        s = case.page_size
        export_cuda(lambda *a: quest.quest_page_scores_gpu(*a, page_size=s), *args)
        export_tpu(lambda *a: quest.quest_page_scores_tpu(*a, page_size=s), *args)


def test_int8_bad_input():
    q, k_min, k_max, table, lengths = _SCORES
    lo, hi, scale = quest.quantize_page_bounds(k_min, k_max)
    with pytest.raises(ValueError, match="k_min must have dtype"):  # float metadata, a scale
        quest.quest_page_scores(q, k_min, k_max, table, lengths, scale=scale)
    with pytest.raises(ValueError, match="k_min must have dtype"):  # codes without a scale
        quest.quest_page_scores(q, lo, hi, table, lengths)
    with pytest.raises(ValueError, match="scale must have shape"):
        quest.quest_page_scores(q, lo, hi, table, lengths, scale=scale[:, :-1])
    with pytest.raises(ValueError, match="scale must have dtype"):
        quest.quest_page_scores(q, lo, hi, table, lengths, scale=scale.astype(jnp.bfloat16))

"""Quest page metadata: refresh, decode update and page scores.

The jnp references are pinned by a hand-computed score, numpy loops over the paging rules and
the upper-bound property; the GPU (Triton, interpret mode) and TPU (Mosaic, TPU interpreter)
kernels are compared to them on fresh random inputs, then lowered for CUDA and TPU. Metadata
starts as random values (not zeros), so a write to the wrong page or a read of a stale row
shows. Both interpreters fill fresh outputs with NaN, so an unwritten score shows too.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from _export import export_cuda, export_tpu

from pallas_kernels import quest


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

REFRESH = {"gpu": quest.quest_refresh_gpu, "tpu": quest.quest_refresh_tpu}
UPDATE = {"gpu": quest.quest_update_decode_gpu, "tpu": quest.quest_update_decode_tpu}
SCORES = {"gpu": quest.quest_page_scores_gpu, "tpu": quest.quest_page_scores_tpu}
# Small GPU chunks so tiny inputs still use several programs per (sequence, head), including
# chunks wholly past a sequence's last page.
GPU_CONFIG = quest.QuestGpuConfig(pages_per_block=2, tokens_per_block=4, seqs_per_block=2)
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
    table[3, 2] = 0  # a live logical page mapped to the null page: its writes are skipped
    return k_pages, k_min, k_max, jnp.asarray(table, jnp.int32)


def _np(*arrays):
    return [np.asarray(a, np.float32) for a in arrays]


def _assert_equal(got, want):
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        np.testing.assert_array_equal(*_np(g, w))


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


def _refresh_loop(k_min, k_max, k_pages, table, lengths):
    k_min, k_max, k_pages = (np.array(a, np.float32) for a in (k_min, k_max, k_pages))
    s = k_pages.shape[2]
    for b, length in enumerate(np.asarray(lengths)):
        for j in range(-(-int(length) // s)):
            page = int(table[b, j])
            if page:
                n = min(s, int(length) - j * s)
                k_min[:, page] = k_pages[:, page, :n].min(axis=1)
                k_max[:, page] = k_pages[:, page, :n].max(axis=1)
    return k_min, k_max


def _update_loop(k_min, k_max, k_new, table, positions, page_size):
    k_min, k_max = (np.array(a, np.float32) for a in (k_min, k_max))
    k_new = np.asarray(k_new, np.float32)
    for b, pos in enumerate(np.asarray(positions)):
        if pos < 0 or pos // page_size >= table.shape[1] or table[b, pos // page_size] == 0:
            continue
        page = int(table[b, pos // page_size])
        if pos % page_size == 0:
            k_min[:, page] = k_max[:, page] = k_new[b]
        else:
            k_min[:, page] = np.minimum(k_min[:, page], k_new[b])
            k_max[:, page] = np.maximum(k_max[:, page], k_new[b])
    return k_min, k_max


@pytest.mark.parametrize("case", CASES, ids=str)
def test_refresh_reference_matches_loop(case):
    k_pages, k_min, k_max, table = _inputs(case, np.random.default_rng(SEEDS[str(case)]))
    lengths = _lengths(case.page_size)
    got = quest.quest_refresh(k_min, k_max, k_pages, table, lengths, backend="reference")
    want = _refresh_loop(k_min, k_max, k_pages, np.asarray(table), lengths)
    for g, w in zip(got, want):
        assert g.dtype == k_min.dtype
        np.testing.assert_array_equal(np.asarray(g, np.float32), w)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_update_reference_matches_loop(case):
    rng = np.random.default_rng(SEEDS[str(case)])
    _, k_min, k_max, table = _inputs(case, rng)
    k_new = jnp.asarray(rng.standard_normal((BATCH, HKV, case.head_dim)), case.dtype)
    positions = _positions(case.page_size)
    got = quest.quest_update_decode(
        k_min, k_max, k_new, table, positions, page_size=case.page_size, backend="reference"
    )
    want = _update_loop(k_min, k_max, k_new, np.asarray(table), positions, case.page_size)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), w)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_scores_bound_every_key(case):
    """A page's score is >= q . k for every key k of it (the Quest upper bound)."""
    rng = np.random.default_rng(SEEDS[str(case)])
    k_pages, k_min, k_max, table = _inputs(case, rng)
    lengths = _lengths(case.page_size)
    k_min, k_max = quest.quest_refresh(k_min, k_max, k_pages, table, lengths, backend="reference")
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


def test_decode_updates_crossing_a_page_equal_refresh():
    """Appending tokens one by one across a page boundary gives the refreshed metadata."""
    case = CASES[1]
    s = case.page_size
    rng = np.random.default_rng(7)
    k_pages, k_min, k_max, table = _inputs(case, rng)
    start = jnp.asarray([s - 3, 0, 1, 2 * s - 1, 3 * s - 2], jnp.int32)
    k_min, k_max = quest.quest_refresh(k_min, k_max, k_pages, table, start, backend="reference")
    for step in range(5):  # positions s-3 .. s+1: through the end of a page into the next
        pos = start + step
        slot, page = pos % s, table[jnp.arange(BATCH), pos // s]
        k_new = k_pages[:, page, slot].transpose(1, 0, 2)  # the token already in k_pages
        k_min, k_max = quest.quest_update_decode(
            k_min, k_max, k_new, table, pos, page_size=s, backend="reference"
        )
    want = quest.quest_refresh(k_min, k_max, k_pages, table, start + 5, backend="reference")
    _assert_equal((k_min, k_max), want)


# --------------------------------------------------------------------------------------------
# Kernels vs references (interpret mode)


def _positions(page_size: int):
    """skip; first slot of logical page 1 (fresh: the stale row must not leak in); last slot of
    page 0 (folded into the row); logical page 2 of sequence 3, mapped to the null page; past
    the page table."""
    s = page_size
    return jnp.asarray([-1, s, s - 1, 2 * s + (s > 1), MAX_PAGES * s], jnp.int32)


def _config(impl):
    return dict(config=GPU_CONFIG) if impl == "gpu" else {}


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_refresh_kernels(impl, case):
    k_pages, k_min, k_max, table = _inputs(case, np.random.default_rng(10 + SEEDS[str(case)]))
    args = (k_min, k_max, k_pages, table, _lengths(case.page_size))
    got = REFRESH[impl](*args, interpret=True, **_config(impl))
    _assert_equal(got, quest.quest_refresh_reference(*args))


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_update_kernels(impl, case):
    rng = np.random.default_rng(20 + SEEDS[str(case)])
    _, k_min, k_max, table = _inputs(case, rng)
    # float32 keys into bf16 metadata are rounded first, as the reference does.
    k_new = jnp.asarray(rng.standard_normal((BATCH, HKV, case.head_dim)), jnp.float32)
    args = (k_min, k_max, k_new, table, _positions(case.page_size))
    s = case.page_size
    got = UPDATE[impl](*args, page_size=s, interpret=True, **_config(impl))
    _assert_equal(got, quest.quest_update_decode_reference(*args, page_size=s))


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
    k_min, k_max = quest.quest_refresh_reference(k_min, k_max, k_pages, table, lengths)
    q = jnp.asarray(rng.standard_normal((BATCH, group * HKV, case.head_dim)), q_dtype)
    args = (q, k_min, k_max, table, lengths)
    s = case.page_size
    got = np.asarray(SCORES[impl](*args, page_size=s, interpret=True, **_config(impl)))
    want = np.asarray(quest.quest_page_scores_reference(*args, page_size=s))
    assert got.shape == want.shape == (BATCH, group * HKV, MAX_PAGES)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    live = np.isfinite(want)
    assert live.sum() and np.isfinite(got[live]).all()
    # float32 sums of the same products in another order (or on the MXU).
    np.testing.assert_allclose(got[live], want[live], rtol=1e-5, atol=1e-4)


# GPU page tiles and splits: 6 sequences x 2 KV heads = 12 rows over 23 pages (page size 4).
# Live pages per sequence: 0, 1, 7, 9, 16, 23. With 2-page tiles (12 tiles, the last one half
# past the table) and 4 splits: 7 pages = 4 tiles ending mid-tile, one per split; 9 pages = 5
# tiles, splits take 2, 2, 1, 0 and the count ends mid-tile inside split 2; 16 pages = 8
# tiles, 2 per split; 23 = every tile; 0 = every split only writes -inf.
SPLIT_PAGES, SPLIT_LIVE = 23, (0, 1, 7, 9, 16, 23)
SPLIT_CONFIGS = [
    quest.QuestGpuConfig(pages_per_block=2, target_programs=48),
    quest.QuestGpuConfig(pages_per_block=4, target_programs=24, num_stages=3),
    # One tile per program, the previous structure.
    quest.QuestGpuConfig(pages_per_block=2, target_programs=2**30, max_splits=2**30, num_stages=1),
]


@pytest.mark.parametrize("config", SPLIT_CONFIGS, ids=str)
def test_gpu_scores_tiles_and_splits(config):
    rng = np.random.default_rng(70 + SPLIT_CONFIGS.index(config))
    s, d, group = 4, 64, 4
    batch = len(SPLIT_LIVE)
    num_pages = batch * SPLIT_PAGES + 1
    k_min = jnp.asarray(rng.standard_normal((HKV, num_pages, d)) - 1, jnp.bfloat16)
    k_max = jnp.asarray(np.asarray(k_min, np.float32) + rng.random((HKV, num_pages, d)) * 3)
    k_max = k_max.astype(jnp.bfloat16)
    table = rng.permutation(num_pages - 1).reshape(batch, SPLIT_PAGES) + 1
    table[4, 3] = 0  # a live page mapped to the null page still gets a (finite) score
    table = jnp.asarray(table, jnp.int32)
    # Lengths end mid-page where they can, so the last live page is partial.
    lengths = jnp.asarray([max(0, n * s - (n % 2)) for n in SPLIT_LIVE], jnp.int32)
    q = jnp.asarray(rng.standard_normal((batch, group * HKV, d)), jnp.float32)
    args = (q, k_min, k_max, table, lengths)
    tiles = -(-SPLIT_PAGES // config.pages_per_block)
    assert config.num_splits(batch * HKV, tiles) > 1
    got = np.asarray(quest.quest_page_scores(*args, page_size=s, backend="pallas", config=config))
    want = np.asarray(quest.quest_page_scores_reference(*args, page_size=s))
    assert not np.isnan(got).any(), "unwritten (NaN-poisoned) scores"
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    live = np.isfinite(want)
    assert live.sum(axis=(1, 2)).tolist() == [group * HKV * n for n in SPLIT_LIVE]
    np.testing.assert_allclose(got[live], want[live], rtol=1e-5, atol=1e-4)


def test_gpu_scores_num_splits():
    cfg = quest.QuestGpuConfig(target_programs=1024, max_splits=64)
    assert cfg.num_splits(64 * 8, 64) == 2  # batch 64 x 8 KV heads, 2048 pages of 32
    assert cfg.num_splits(1, 256) == 64  # capped at max_splits
    assert cfg.num_splits(1, 3) == 3  # capped at the tiles


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
    got = np.asarray(quest.quest_page_scores_tpu(*args, page_size=case.page_size, interpret=True))
    want = np.asarray(quest.quest_page_scores_reference(*args, page_size=case.page_size))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    live = np.isfinite(want)
    np.testing.assert_allclose(got[live], want[live], rtol=1e-5, atol=1e-4)


def test_public_backends_dispatch():
    case = CASES[0]
    rng = np.random.default_rng(50)
    k_pages, k_min, k_max, table = _inputs(case, rng)
    args = (k_min, k_max, k_pages, table, _lengths(case.page_size))
    want = quest.quest_refresh(*args, backend="reference")
    for backend in ("pallas", "pallas_tpu", "auto"):
        _assert_equal(quest.quest_refresh(*args, backend=backend), want)


# --------------------------------------------------------------------------------------------
# Lowering (no accelerator needed)


def _export_args(case: Case, group: int = 4):
    rng = np.random.default_rng(0)
    k_pages, k_min, k_max, table = _inputs(case, rng)
    lengths = _lengths(case.page_size)
    k_new = jnp.asarray(rng.standard_normal((BATCH, HKV, case.head_dim)), case.dtype)
    q = jnp.asarray(rng.standard_normal((BATCH, group * HKV, case.head_dim)), case.dtype)
    return (
        (k_min, k_max, k_pages, table, lengths),
        (k_min, k_max, k_new, table, _positions(case.page_size)),
        (q, k_min, k_max, table, lengths),
    )


@pytest.mark.parametrize("case", CASES, ids=str)
def test_export_cuda(case):
    refresh, update, scores = _export_args(case)
    s = case.page_size
    export_cuda(quest.quest_refresh_gpu, *refresh)
    export_cuda(lambda *a: quest.quest_update_decode_gpu(*a, page_size=s), *update)
    export_cuda(lambda *a: quest.quest_page_scores_gpu(*a, page_size=s), *scores)
    # 1-page tiles, several splits: the lowered kernel has a real tile loop.
    cfg = quest.QuestGpuConfig(pages_per_block=1, target_programs=40, num_stages=3)
    export_cuda(lambda *a: quest.quest_page_scores_gpu(*a, page_size=s, config=cfg), *scores)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_export_tpu(case):
    refresh, update, scores = _export_args(case)
    s = case.page_size
    export_tpu(quest.quest_refresh_tpu, *refresh)
    export_tpu(lambda *a: quest.quest_update_decode_tpu(*a, page_size=s), *update)
    export_tpu(lambda *a: quest.quest_page_scores_tpu(*a, page_size=s), *scores)


# --------------------------------------------------------------------------------------------
# Validation

_REFRESH, _UPDATE, _SCORES = _export_args(CASES[0])


def _bad(fn, base, names, **overrides):
    args = dict(zip(names, base))
    args.update(overrides)
    return lambda: fn(*args.values(), backend="reference")


def _bad_refresh(**o):
    names = ("k_min", "k_max", "k_pages", "page_table", "lengths")
    return _bad(quest.quest_refresh, _REFRESH, names, **o)


def _bad_update(**o):
    names = ("k_min", "k_max", "k_new", "page_table", "positions")
    return _bad(quest.quest_update_decode, _UPDATE, names, **o)


def _bad_scores(**o):
    names = ("q", "k_min", "k_max", "page_table", "lengths")
    return _bad(quest.quest_page_scores, _SCORES, names, **o)


_P = BATCH * MAX_PAGES + 3
BAD = {
    "k_min rank": (_bad_refresh(k_min=jnp.zeros((HKV, _P, 1, 64))), "k_min"),
    "k_min dtype": (_bad_refresh(k_min=jnp.zeros((HKV, _P, 64), jnp.int32)), "k_min"),
    "k_max shape": (_bad_refresh(k_max=jnp.zeros((HKV, _P - 1, 64))), "k_max"),
    "k_pages dtype": (_bad_refresh(k_pages=jnp.zeros((HKV, _P, 1, 64), jnp.bfloat16)), "k_pages"),
    "k_pages head_dim": (_bad_refresh(k_pages=jnp.zeros((HKV, _P, 1, 32))), "k_pages"),
    "k_pages rank": (_bad_refresh(k_pages=jnp.zeros((HKV, _P, 64))), "k_pages"),
    "refresh lengths": (_bad_refresh(lengths=jnp.zeros((BATCH + 1,), jnp.int32)), "page_table"),
    "refresh lengths dtype": (
        _bad_refresh(lengths=jnp.zeros((BATCH,), jnp.float32)),
        "lengths",
    ),
    "k_new heads": (_bad_update(k_new=jnp.zeros((BATCH, HKV + 1, 64))), "k_new"),
    "k_new rank": (_bad_update(k_new=jnp.zeros((BATCH, 1, HKV, 64))), "k_new"),
    "positions batch": (_bad_update(positions=jnp.zeros((BATCH - 1,), jnp.int32)), "positions"),
    "update page_table": (_bad_update(page_table=jnp.zeros((BATCH, 5))), "page_table"),
    "page_size": (
        lambda: quest.quest_update_decode(*_UPDATE, page_size=0, backend="reference"),
        "page_size",
    ),
    "q rank": (_bad_scores(q=jnp.zeros((BATCH, 64))), "q"),
    "q dtype": (_bad_scores(q=jnp.zeros((BATCH, 8, 64), jnp.float16)), "q"),
    "q heads": (_bad_scores(q=jnp.zeros((BATCH, 3, 64))), "q num_q_heads"),
    "q head_dim": (_bad_scores(q=jnp.zeros((BATCH, 8, 128))), "q"),
    "scores lengths": (_bad_scores(lengths=jnp.zeros((BATCH, 1), jnp.int32)), "lengths"),
    "scores page_table": (_bad_scores(page_table=jnp.zeros((BATCH,), jnp.int32)), "page_table"),
    "backend": (
        lambda: quest.quest_refresh(*_REFRESH, backend="triton"),
        "backend",
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(name):
    fn, arg = BAD[name]
    with pytest.raises(ValueError, match=arg):
        fn()


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
def test_odd_sizes(impl):
    """head_dim 96 and page size 3: the Triton kernels pad both to powers of two and mask."""
    case = Case(jnp.float32, 96, 3)
    rng = np.random.default_rng(60)
    k_pages, k_min, k_max, table = _inputs(case, rng)
    lengths = _lengths(case.page_size)
    args = (k_min, k_max, k_pages, table, lengths)
    got = REFRESH[impl](*args, interpret=True, **_config(impl))
    k_min, k_max = quest.quest_refresh_reference(*args)
    _assert_equal(got, (k_min, k_max))
    q = jnp.asarray(rng.standard_normal((BATCH, 2 * HKV, case.head_dim)), jnp.float32)
    args = (q, k_min, k_max, table, lengths)
    got = np.asarray(SCORES[impl](*args, page_size=3, interpret=True, **_config(impl)))
    want = np.asarray(quest.quest_page_scores_reference(*args, page_size=3))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    live = np.isfinite(want)
    np.testing.assert_allclose(got[live], want[live], rtol=1e-5, atol=1e-4)
    if impl == "gpu":
        export_cuda(quest.quest_refresh_gpu, k_min, k_max, k_pages, table, lengths)
        export_cuda(lambda *a: quest.quest_page_scores_gpu(*a, page_size=3), *args)


def test_config_validation():
    with pytest.raises(ValueError, match="pages_per_block"):
        quest.QuestGpuConfig(pages_per_block=3)
    for field in ("target_programs", "max_splits", "num_stages"):
        with pytest.raises(ValueError, match=field):
            quest.QuestGpuConfig(**{field: 0})
    with pytest.raises(ValueError, match="config"):
        quest.quest_page_scores(*_SCORES, backend="reference", config=quest.QuestTpuConfig())
    with pytest.raises(ValueError, match="pages_per_block"):
        quest.QuestTpuConfig(pages_per_block=64)

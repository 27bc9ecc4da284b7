"""block_spgemv: GPU (Triton) and TPU (Mosaic) kernels in interpret mode vs the jnp reference,
CUDA and TPU lowering checks, and argument validation.

Both interpreters fill outputs with NaN before the kernel runs, so an element the kernel never
writes shows up as NaN and fails the finite/-inf pattern check.
"""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest
from _export import export_cuda, export_tpu

from pallas_kernels import _common, spgemv, spgemv_gpu

TOL = {jnp.float32: dict(rtol=1e-4, atol=1e-4), jnp.bfloat16: dict(rtol=2e-4, atol=2e-4)}


def _quantize(x):
    """numpy INT4 quantizer following docs/kernel_api.md (split-halves nibble order)."""
    zero = x.min(-1)
    scale = (x.max(-1) - zero) / 15
    safe = np.where(scale > 0, scale, 1)
    n = np.where(scale[..., None] > 0, np.round((x - zero[..., None]) / safe[..., None]), 0)
    n = np.clip(n, 0, 15).astype(np.uint8)
    half = x.shape[-1] // 2
    packed = (n[..., :half] | (n[..., half:] << 4)).astype(np.uint8)
    return packed, scale.astype(np.float32), zero.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Case:
    group: int
    head_dim: int
    page_size: int
    block_size: int
    q_dtype: type
    tokens_per_chunk: int = 256
    batch: int = 3
    num_kv_heads: int = 2
    max_len: int = 45  # not a multiple of 16: partial last pages
    num_cand: int | None = None  # default: every block of max_len
    scale: float | None = None
    target_programs: int = 1024  # GPU splits: batch * Hkv * splits ~ target_programs
    num_stages: int = 2
    counts: tuple | None = None  # cand_count rows; default random with fixed corner cases

    def __str__(self):
        return (
            f"G{self.group}-D{self.head_dim}-S{self.page_size}-bs{self.block_size}-"
            f"{jnp.dtype(self.q_dtype).name}-T{self.tokens_per_chunk}-C{self.num_cand}"
            + (f"-prog{self.target_programs}" if self.target_programs != 1024 else "")
            + (f"-B{self.batch}-counts" if self.counts else "")
        )

    def config(self):
        return spgemv.SpGEMVGpuConfig(
            tokens_per_chunk=self.tokens_per_chunk,
            target_programs=self.target_programs,
            max_splits=self.target_programs,
            num_stages=self.num_stages,
        )


def _make(case: Case, seed: int):
    """Fresh random cache, page table, ragged lengths, candidates and counts."""
    rng = np.random.default_rng(seed)
    b, hkv, s, bs = case.batch, case.num_kv_heads, case.page_size, case.block_size
    d, hq = case.head_dim, case.num_kv_heads * case.group
    pages_per_seq = -(-case.max_len // s)
    num_pages = b * pages_per_seq + 2  # page 0 is the null page, one page unused
    k = rng.standard_normal((hkv, num_pages, s, d)).astype(np.float32) * 1.5
    k += rng.standard_normal((hkv, num_pages, s, 1)).astype(np.float32)  # per-token offset
    k[:, 1, 0, :] = 0.75  # a constant row: scale 0, dequantizes to zero exactly
    k_int4, k_scale, k_zero = _quantize(k)
    perm = rng.permutation(num_pages - 1)[: b * pages_per_seq] + 1
    page_table = perm.reshape(b, pages_per_seq).astype(np.int32)
    # Ragged: one full sequence, one empty, the rest random (partial last pages).
    lengths = rng.integers(1, case.max_len + 1, b).astype(np.int32)
    lengths[0] = case.max_len
    lengths[1] = 0
    total_blocks = pages_per_seq * s // bs
    c = case.num_cand or total_blocks
    cand = np.stack([rng.permutation(total_blocks)[:c] for _ in range(b * hkv)])
    cand = cand.reshape(b, hkv, c).astype(np.int32)
    count = rng.integers(0, c + 1, (b, hkv)).astype(np.int32)
    count[0, 0] = c  # full capacity
    count[0, -1] = 0  # no candidates
    count[-1, 0] = c + 3  # past capacity: clamped to C
    if case.counts is not None:
        count = np.asarray(case.counts, np.int32).reshape(b, hkv)
    # Entries past the count are garbage the kernels must neither use nor follow.
    garbage = rng.choice(np.array([-7, 10**6, total_blocks + 1], np.int32), (b, hkv, c))
    cand = np.where(np.arange(c) < count[..., None], cand, garbage).astype(np.int32)
    q = rng.standard_normal((b, hq, d)).astype(np.float32)
    arrays = (q, k_int4, k_scale, k_zero, page_table, lengths, cand, count)
    args = [jnp.asarray(a) for a in arrays]
    args[0] = args[0].astype(case.q_dtype)
    return args


def _assert_matches(out, ref, q_dtype):
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.shape == ref.shape
    assert not np.isnan(out).any(), "unwritten (NaN-poisoned) outputs"
    np.testing.assert_array_equal(np.isneginf(out), np.isneginf(ref))
    fin = np.isfinite(ref)
    assert fin.any()
    np.testing.assert_allclose(out[fin], ref[fin], **TOL[q_dtype])


F32, BF16 = jnp.float32, jnp.bfloat16
CASES = [
    Case(1, 64, 16, 16, F32, scale=0.3),
    Case(4, 128, 16, 16, BF16, tokens_per_chunk=16),  # a page per program
    Case(8, 64, 16, 16, BF16, tokens_per_chunk=32, num_cand=3),  # C % blocks_per_chunk != 0
    Case(4, 64, 16, 1, F32, tokens_per_chunk=16, num_cand=12),  # tokens
    Case(8, 128, 16, 4, BF16, num_cand=10),  # a block inside a page
    Case(1, 128, 1, 1, F32, tokens_per_chunk=16, max_len=20, num_cand=12),  # page size 1
]


def _run(impl, case, args):
    kw = dict(block_size=case.block_size, scale=case.scale)
    if impl == "gpu":
        return spgemv.block_spgemv(*args, **kw, backend="pallas_gpu", config=case.config())
    return spgemv.block_spgemv(*args, **kw, backend="pallas_tpu")


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_matches_reference(case, impl):
    seed = CASES.index(case) * 2 + (impl == "tpu")
    args = _make(case, seed)
    ref = spgemv.block_spgemv(
        *args, block_size=case.block_size, scale=case.scale, backend="reference"
    )
    out = _run(impl, case, args)
    _assert_matches(out, ref, case.q_dtype)
    # Count 0 (sequence 0, last KV head) and empty sequence 1: all -inf.
    g = case.group
    assert np.isneginf(np.asarray(out)[0, -g:]).all()
    assert np.isneginf(np.asarray(out)[1]).all()


# GPU tiles and splits. 4 sequences x 2 KV heads = 8 rows; target_programs 32 gives 4 splits
# per row. With C = 13 blocks of 16 tokens and 32-token tiles (2 blocks), there are 7 tiles,
# the last one half past the C * bs columns. Counts (row-major over (b, g)):
#   13 (all 7 tiles live: splits take 2, 2, 2, 1), 0 (every split only writes -inf),
#   16 (clamped to 13), 3 (ends mid-tile: 2 live tiles, splits 0 and 1, the rest -inf),
#   5 (3 live tiles: the count ends mid-tile inside split 2, split 3 is all -inf),
#   9 (5 live tiles: ends mid-tile and mid-split), 12 (6 live, mid-tile), 1 (one block).
SPLIT_COUNTS = (13, 0, 16, 3, 5, 9, 12, 1)
SPLIT_CASES = [
    Case(
        4,
        64,
        16,
        16,
        BF16,
        tokens_per_chunk=32,
        batch=4,
        max_len=200,
        num_cand=13,
        target_programs=32,
        counts=SPLIT_COUNTS,
    ),
    Case(
        4,
        64,
        16,
        16,
        F32,
        tokens_per_chunk=32,
        batch=4,
        max_len=200,
        num_cand=13,
        target_programs=32,
        counts=SPLIT_COUNTS,
    ),
    # Tokens (bs 1), 16-token tiles: 40 entries = 3 tiles over 2 splits, random counts.
    Case(
        2,
        128,
        16,
        1,
        BF16,
        tokens_per_chunk=16,
        batch=2,
        max_len=60,
        num_cand=40,
        target_programs=8,
    ),
    # One tile per program (target_programs = max_splits huge), one stage.
    Case(
        4,
        64,
        16,
        16,
        BF16,
        tokens_per_chunk=32,
        batch=4,
        max_len=200,
        num_cand=13,
        target_programs=2**30,
        num_stages=1,
        counts=SPLIT_COUNTS,
    ),
]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=str)
def test_gpu_tiles_and_splits(case):
    args = _make(case, 50 + SPLIT_CASES.index(case))
    cfg = case.config()
    tiles = -(-case.num_cand * case.block_size // case.tokens_per_chunk)
    assert cfg.num_splits(case.batch * case.num_kv_heads, tiles) > 1
    ref = spgemv.block_spgemv(
        *args, block_size=case.block_size, scale=case.scale, backend="reference"
    )
    _assert_matches(_run("gpu", case, args), ref, case.q_dtype)


# cand_count=None: the count follows the lengths (min(ceil(length / block_size), C)); the GPU
# kernel derives it in the kernel, the TPU kernel and the reference from the same helper.
COUNT_CASES = [
    Case(4, 64, 16, 16, BF16, tokens_per_chunk=32, num_cand=2),  # capped at C = 2 pages
    Case(4, 64, 16, 1, F32, tokens_per_chunk=16, num_cand=40),  # tokens; C below max_len
]


@pytest.mark.parametrize("case", COUNT_CASES, ids=str)
def test_count_from_lengths(case):
    args = _make(case, 80 + COUNT_CASES.index(case))
    lengths, cand = args[5], args[6]
    want = spgemv.counts_from_lengths(lengths, case.block_size, cand.shape[2], cand.shape[1])
    np.testing.assert_array_equal(
        want[:, 0], np.minimum(-(-np.asarray(lengths) // case.block_size), cand.shape[2])
    )
    assert np.asarray(want).min() == 0 and np.asarray(want).max() == cand.shape[2]
    explicit = [*args[:7], want]
    implicit = [*args[:7], None]
    for run in (
        lambda a: _run("gpu", case, a),
        lambda a: _run("tpu", case, a),
        lambda a: spgemv.block_spgemv(
            *a, block_size=case.block_size, scale=case.scale, backend="reference"
        ),
    ):
        np.testing.assert_array_equal(np.asarray(run(implicit)), np.asarray(run(explicit)))


# The gather word width follows head_dim (4 bytes at D = 128, 2 at D = 64, which the cases
# above run): bytes at D = 32, where wider words would leave Triton's dots fewer than 16 columns.
BYTE_CASE = Case(4, 32, 16, 1, F32, tokens_per_chunk=16, batch=2, max_len=40, num_cand=24)


def test_gpu_byte_gather():
    args = _make(BYTE_CASE, 70)
    ref = spgemv.block_spgemv(*args, block_size=1, backend="reference")
    _assert_matches(_run("gpu", BYTE_CASE, args), ref, BYTE_CASE.q_dtype)


def test_word_bytes():
    assert spgemv_gpu._word_bytes(256) == 4
    assert spgemv_gpu._word_bytes(128) == 4  # uint32 words, 16 of them per row
    assert spgemv_gpu._word_bytes(64) == 2  # uint16 words, 16
    assert spgemv_gpu._word_bytes(32) == 1  # bytes, 16


def test_num_splits():
    cfg = spgemv.SpGEMVGpuConfig(target_programs=1024, max_splits=64)
    assert cfg.num_splits(64 * 8, 64) == 2  # batch 64 x 8 KV heads: 1024 programs
    assert cfg.num_splits(1, 64) == 64  # capped at max_splits
    assert cfg.num_splits(1, 5) == 5  # capped at the tiles
    assert cfg.num_splits(4096, 64) == 1


def test_scale_default_is_inverse_sqrt_head_dim():
    args = _make(Case(4, 64, 16, 16, F32, batch=2), 100)
    a = np.asarray(spgemv.block_spgemv(*args, block_size=16, scale=0.3, backend="reference"))
    b = np.asarray(spgemv.block_spgemv(*args, block_size=16, backend="reference"))
    fin = np.isfinite(a)
    np.testing.assert_allclose(a[fin] / 0.3, b[fin] * math.sqrt(64), rtol=1e-5, atol=1e-5)


def test_reference_hand_computed():
    # One KV head, one query head, head_dim 2, page size 2; sequence 0 has 3 tokens, pages
    # [2, 1]. Position 2 = page 1 slot 0 -> physical page 1, slot 0: byte 0x21 = nibbles (1, 2),
    # scale 0.5, zero -1 -> k = (-0.5, 0.0). q = (2, 3), scale 1: logit = -1.0.
    # Position 3 is past lengths -> -inf; candidate entry 1 is past cand_count -> -inf.
    k_int4 = jnp.zeros((1, 3, 2, 1), jnp.uint8).at[0, 1, 0, 0].set(0x21)
    k_scale = jnp.zeros((1, 3, 2), jnp.float32).at[0, 1, 0].set(0.5)
    k_zero = jnp.zeros((1, 3, 2), jnp.float32).at[0, 1, 0].set(-1.0)
    q = jnp.asarray([[[2.0, 3.0]]], jnp.float32)
    page_table = jnp.asarray([[2, 1]], jnp.int32)
    lengths = jnp.asarray([3], jnp.int32)
    cand = jnp.asarray([[[1, 0]]], jnp.int32)
    count = jnp.asarray([[1]], jnp.int32)
    out = spgemv.block_spgemv(
        q,
        k_int4,
        k_scale,
        k_zero,
        page_table,
        lengths,
        cand,
        count,
        block_size=2,
        scale=1.0,
        backend="reference",
    )
    np.testing.assert_array_equal(np.asarray(out), [[[-1.0, -np.inf, -np.inf, -np.inf]]])


def test_backend_dispatch_and_empty_capacity():
    case = Case(4, 64, 16, 16, BF16, batch=2)
    args = _make(case, 7)
    ref = spgemv.block_spgemv(*args, block_size=16, backend="reference")
    auto = spgemv.block_spgemv(*args, block_size=16)  # CPU: the reference
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(ref))
    args[6] = args[6][:, :, :0]
    for backend in ("reference", "pallas", "pallas_tpu"):
        out = spgemv.block_spgemv(*args, block_size=16, backend=backend)
        assert out.shape == (2, 8, 0) and out.dtype == jnp.float32


def test_config_kinds_through_the_entry():
    case = Case(4, 64, 16, 16, F32, batch=2)
    args = _make(case, 8)
    ref = spgemv.block_spgemv(*args, block_size=16, backend="reference")
    tpu = spgemv.SpGEMVTpuConfig()
    out = spgemv.block_spgemv(*args, block_size=16, backend="pallas_tpu", config=tpu)
    _assert_matches(out, ref, F32)
    with pytest.raises(ValueError, match="config is a SpGEMVTpuConfig, but backend='pallas'"):
        spgemv.block_spgemv(*args, block_size=16, backend="pallas", config=tpu)
    with pytest.raises(ValueError, match="config must be None or a SpGEMVGpuConfig or"):
        spgemv.block_spgemv(*args, block_size=16, config={"tokens_per_chunk": 16})


def _llama_like(block_size, q_dtype=BF16):
    # LLaMA-3.1-8B grouping (G = 4, D = 128, page 16), small batch and cache.
    case = Case(4, 128, 16, block_size, q_dtype, batch=2, num_kv_heads=2, max_len=64)
    return _make(case, 3)


@pytest.mark.parametrize("block_size", [16, 1])
@pytest.mark.parametrize("q_dtype", [BF16, F32], ids=["bf16", "f32"])
def test_export_cuda(block_size, q_dtype):
    args = _llama_like(block_size, q_dtype)
    # 16-token tiles and 2 splits, so the lowered kernel has a real tile loop.
    cfg = spgemv.SpGEMVGpuConfig(tokens_per_chunk=16, target_programs=8)
    exp = export_cuda(
        lambda *a: spgemv.block_spgemv_gpu(*a, block_size=block_size, config=cfg), *args
    )
    assert "block_spgemv_gpu" in exp.mlir_module()


@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("q_dtype", [BF16, F32], ids=["bf16", "f32"])
def test_export_cuda_word_widths(head_dim, q_dtype):
    # 1-, 2- and 4-byte words: their shifts, masks and truncations must lower to Triton.
    case = Case(4, head_dim, 16, 1, q_dtype, batch=2, max_len=64)
    args = _make(case, 4)
    cfg = spgemv.SpGEMVGpuConfig(tokens_per_chunk=16, target_programs=8)
    exp = export_cuda(lambda *a: spgemv.block_spgemv_gpu(*a, block_size=1, config=cfg), *args)
    assert "block_spgemv_gpu" in exp.mlir_module()
    # 4-byte words unpack in inline PTX natively (its values: tests/test_gpu_kernels.py).
    assert ("prmt.b32" in exp.mlir_module()) == (spgemv_gpu._word_bytes(head_dim) == 4)


def test_asm_unpack_selectors():
    """prmt selectors of the inline-PTX unpack: byte k of the first word to byte 0 and of the
    second word (prmt bytes 4-7) to byte 2."""
    for k in range(4):
        sel = _common.prmt_selector(k)
        assert sel & 0xF == k and (sel >> 8) & 0xF == 4 + k


@pytest.mark.parametrize("block_size", [16, 1])
@pytest.mark.parametrize("q_dtype", [BF16, F32], ids=["bf16", "f32"])
def test_export_tpu(block_size, q_dtype):
    args = _llama_like(block_size, q_dtype)
    exp = export_tpu(lambda *a: spgemv.block_spgemv_tpu(*a, block_size=block_size), *args)
    assert "tpu_custom_call" in exp.mlir_module()


def _bad(i, value):
    def f(args):
        args[i] = value(args[i])
        return args

    return f


BAD = [
    ("q", _bad(0, lambda x: x[0])),
    ("q", _bad(0, lambda x: x.astype(jnp.float16))),
    ("k_int4", _bad(1, lambda x: x.astype(jnp.int32))),
    ("k_int4", _bad(1, lambda x: x[..., :-1])),
    ("num_kv_heads", _bad(0, lambda x: x[:, :3])),
    ("k_scale", _bad(2, lambda x: x[:, :, :-1])),
    ("k_zero", _bad(3, lambda x: x.astype(jnp.bfloat16))),
    ("page_table", _bad(4, lambda x: x[:1])),
    ("page_table", _bad(4, lambda x: x.astype(jnp.float32))),
    ("lengths", _bad(5, lambda x: x[:, None])),
    ("cand_blocks", _bad(6, lambda x: x[:, :1])),
    ("cand_blocks", _bad(6, lambda x: x.astype(jnp.uint32))),
    ("cand_count", _bad(7, lambda x: x[:, :1])),
]


@pytest.mark.parametrize("name,mutate", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_input(name, mutate):
    args = mutate(_make(Case(4, 64, 16, 16, F32, batch=2), 0))
    with pytest.raises(ValueError, match=name):
        spgemv.block_spgemv(*args, block_size=16, backend="reference")


@pytest.mark.parametrize("block_size", [0, 3, 32, 16.0])
def test_bad_block_size(block_size):
    args = _make(Case(4, 64, 16, 16, F32, batch=2), 0)
    with pytest.raises(ValueError, match="block_size"):
        spgemv.block_spgemv(*args, block_size=block_size, backend="reference")


def test_bad_scale_and_backend():
    args = _make(Case(4, 64, 16, 16, F32, batch=2), 0)
    with pytest.raises(ValueError, match="scale"):
        spgemv.block_spgemv(*args, block_size=16, scale=jnp.float32(2.0))
    with pytest.raises(ValueError, match="backend"):
        spgemv.block_spgemv(*args, block_size=16, backend="cuda")


def test_gpu_limits():
    # head_dim 48: D/2 = 24 is not a power of two; fine for the reference, not for Triton.
    args = _make(Case(4, 48, 16, 16, F32, batch=2), 0)
    spgemv.block_spgemv(*args, block_size=16, backend="reference")
    with pytest.raises(ValueError, match="head_dim"):
        spgemv.block_spgemv(*args, block_size=16, backend="pallas")


@pytest.mark.parametrize("tokens", [8, 24])
def test_config_validation(tokens):
    with pytest.raises(ValueError, match="SpGEMVGpuConfig.tokens_per_chunk"):
        spgemv.SpGEMVGpuConfig(tokens_per_chunk=tokens)


@pytest.mark.parametrize(
    "field,value",
    [("target_programs", 0), ("max_splits", 0), ("num_stages", 0), ("num_warps", 6)],
)
def test_config_validation_loop_knobs(field, value):
    with pytest.raises(ValueError, match=f"SpGEMVGpuConfig.{field}"):
        spgemv.SpGEMVGpuConfig(**{field: value})

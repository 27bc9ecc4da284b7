"""Quest page scores: an upper bound of q . k over the keys of each page, from its K min / max.

The Quest metadata of a page, per KV head: k_min, k_max, the elementwise min and max of the K
rows the page holds (written by the cache: pallas_kernels.append at decode, XLA scatters at
prefill). For a query q the upper bound of q . k over the keys k of the page is

    score = sum_d max(q_d * min_d, q_d * max_d)      (float32)

computed per query head h against the metadata of its KV head h // G. Since max >= min,
max(q*min, q*max) = relu(q) * max + min(q, 0) * min exactly (one product is q*max or q*min,
the other is a multiplication by 0), which is how both kernels evaluate it: two multiply-adds
per element, and the signs of q are split once per program instead of once per page.

Layouts (docs/kernel_api.md, head-major): k_min, k_max [Hkv, P, D] float32 or bfloat16;
page_table [B, max_pages] int32 (0 = null page); lengths [B] int32. Logical page j of sequence
b is physical page page_table[b, j]; pages from ceil(lengths[b] / S) on score -inf.

INT8 metadata (``scale`` given): k_min, k_max [Hkv, P, D] int8 codes and scale [Hkv, P]
float32, one scale per page and KV head, by the rule of ``quantize_page_bounds``:

    s     = max_d max(|min_d|, |max_d|) / 127        (s = 0: every code 0)
    min_q = clip(floor(min / s), -127, 127)    max_q = clip(ceil(max / s), -127, 127)

so min_q * s <= min and max_q * s >= max (up to float rounding), and the score computed from
the codes, s * sum_d (relu(q_d) * max_q_d + min(q_d, 0) * min_q_d), is still an upper bound of
q . k over the page's keys, looser than the exact-metadata bound by at most s * sum_d |q_d|
when quantized once (each growth of the scale at decode can round a code one more step out).
A page then costs 2 * D + 4 bytes per KV head instead of 2 * D * itemsize (4 * D in bf16).
The cache keeps the codes up to date at decode with ``widen_page_bounds`` (pallas_kernels.
append) and quantizes prefill pages once.

GPU (Triton): grid (sequence, KV head, tile of pages_per_block pages), one tile per program. A
program holding live pages gathers their min/max rows through the page table with masked
vector loads (each row read once and used for all G query heads of the group: 2 * D * itemsize
bytes per page and KV head, 2 * D + 4 with INT8 metadata). With bf16 or INT8 metadata it scores
by tensor-core dots, relu(q) . max^T + min(q, 0) . min^T over [G padded to 16, D] x [D, pages]
with float32 accumulation. Why dots: scored on the CUDA cores (a multiply-add per element, query
head and page, then a cross-lane sum) the kernel is bound by its instructions, not its bytes
(docs/kernels.md). float32 metadata (and tiles under 16 pages, where Triton's dot does not
apply) is scored by those float32 multiply-adds, which are exact. A program past the last live
page writes -inf. A head_dim that is not a power of two (Triton's block rule) is padded and
masked.

  bf16 metadata: the rows enter the dots as they are, and float32 q as two bf16 terms (hi +
  lo, about 16 bits of each entry; bf16 q is one exact term).

  INT8 metadata (head_dim a multiple of 4 and D / 4 padded to >= 16, _uses_int8_words;
  QuestGpuConfig.int8_asm): the wrapper bitcasts the rows to uint32 words of four codes, so a
  program gathers one load element per four codes, and inline PTX turns them into float16
  with integer operations (prmt, lop3 and one sub.f16x2 per two codes, _int8_codes_f16_asm;
  the codes are exact in f16). Triton's int8 -> bf16 cast instead extracts and converts each
  code on its own: those instructions, not the bytes, bound the kernel (docs/kernels.md).
  Block k of the converted codes holds dims {4 w + k}, so q is gathered in that column order,
  once per program. f16 has 5 exponent
  bits, so each query head is scaled by the power of two that brings its largest |q| into
  [1, 2) (exact), then split into f16 terms: float32 q as hi + lo (within max(2^-22 |x|,
  2^-25) of each scaled entry x: about 22 bits of the head's largest entry), bfloat16 q as one
  term (exact but for entries under 2^-17 of the largest, off by at most 2^-25 scaled;
  _common.f16_terms). Products of f16 terms and codes are exact in the float32 accumulator;
  the sum is scaled back by the power of two and by the page's scale at the end. Other INT8
  tiles and int8_asm=False cast the codes to bf16 and take q as bf16 terms, as for bf16
  metadata, then apply the page scale.

TPU (Mosaic): a one-page block of k_min ([1, D] out of a [P, D] plane) is not a legal Mosaic
block, so the min/max rows of a chunk of pages move by DMA (memory_space ANY) at the page
table's physical ids, and two MXU dots score all G heads of the group. INT8 rows are converted
to the dot dtype in VMEM; their page scales are gathered by XLA outside the kernel (one float a
page, the size of the output) and enter as a lane-dense block, multiplied after the dots.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt

from pallas_kernels import _common, quest_mgpu
from pallas_kernels.int4 import exact_divide

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16)
_INDEX_DTYPES = (np.int32,)
DEFAULT_PAGE_SIZE = 16
GPU_LOWERINGS = ("triton", "mosaic")
CODE_MAX = 127  # INT8 codes lie in [-127, 127]: symmetric, so |code * s| <= max |bound|


# Tuned defaults (H200, batch 64, 32K context = 2048 pages of 16, 8 KV heads x 4 query heads,
# head_dim 128; the alternatives and their times: docs/results/kernels-sweep{2,3,5,6,9}-h200.*
# and docs/results/session-2026-12-04d/quest-dots-probe.md):
#   GPU pages_per_block 64, num_warps 4, one tile per program, scores by tensor-core dots;
#       INT8 min / max enter them as words converted by inline PTX (int8_asm), faster than
#       the bf16-cast path in the same run (docs/results/session-2026-12-04e/
#       sweep-quest-topp.md).
#   TPU pages_per_block 128: the pages are the lanes of the output block (not measured).


@dataclasses.dataclass(frozen=True)
class QuestGpuConfig:
    """Triton knobs of the page scores.

    pages_per_block: pages one program scores (its tile), a power of two; 64 pages x 128
      dims x 2 arrays is 16 KB of INT8 codes. Tiles of 16 pages or more score by tensor-core
      dots (bf16 or INT8 metadata), smaller ones by float32 multiply-adds.
    num_warps: a power of two. (One tile per program, no loop: no pipeline stages to set.)
    lowering: "triton" (Pallas Triton: masked vector gathers) or "mosaic" (Pallas Mosaic GPU,
      Hopper and later: each page row by TMA, pallas_kernels.quest_mgpu; pages_per_block a
      multiple of 64; num_warps does not apply, a program is one warpgroup). Slower than
      Triton on Hopper (docs/kernels.md), so not the default.
    int8_asm: INT8 metadata on the dots path with head_dim a multiple of 4 (and D / 4 padded
      >= 16; see _uses_int8_words) is gathered as uint32 words of four codes and converted to
      float16 by inline PTX (interpret mode: the same arithmetic in jnp), against q as f16
      terms. False takes the bf16-cast INT8 path (int8 rows cast to bf16 by Triton, q as bf16
      terms) for every tile, the path tiles the words do not fit take anyway; the tests run
      both paths on the same inputs with it. Triton lowering only.
    """

    pages_per_block: int = 64
    num_warps: int = 4
    lowering: str = "triton"
    int8_asm: bool = True

    def __post_init__(self):
        _common.check_pow2("QuestGpuConfig", "pages_per_block", self.pages_per_block)
        _common.check_pow2("QuestGpuConfig", "num_warps", self.num_warps)
        if self.lowering not in GPU_LOWERINGS:
            raise ValueError(
                f"QuestGpuConfig.lowering must be one of {GPU_LOWERINGS}, got {self.lowering!r}"
            )
        if self.lowering == "mosaic":
            quest_mgpu.check_pages_per_block(self.pages_per_block)


@dataclasses.dataclass(frozen=True)
class QuestTpuConfig:
    """Mosaic knobs of the page scores.

    pages_per_block: pages per grid step; a multiple of 128 because the pages are the lanes of
      the output block (shorter page tables use one block of all pages).
    """

    pages_per_block: int = 128

    def __post_init__(self):
        if self.pages_per_block <= 0 or self.pages_per_block % 128:
            raise ValueError(
                "QuestTpuConfig.pages_per_block must be a positive multiple of 128, "
                f"got {self.pages_per_block}"
            )


DEFAULT_GPU_CONFIG = QuestGpuConfig()
DEFAULT_TPU_CONFIG = QuestTpuConfig()


# --------------------------------------------------------------------------------------------
# Validation (shapes, dtypes and static ints only: runs on tracers, before any kernel)


def _check_args(q, k_min, k_max, page_table, lengths, page_size, scale=None) -> None:
    _common.check_rank("k_min", k_min, 3, "[num_kv_heads, num_pages, head_dim]")
    _common.check_dtype("k_min", k_min, _FLOAT_DTYPES if scale is None else (np.int8,))
    _common.check_rank("k_max", k_max, 3, "[num_kv_heads, num_pages, head_dim]")
    if tuple(np.shape(k_max)) != tuple(np.shape(k_min)) or k_max.dtype != k_min.dtype:
        raise ValueError(
            f"k_max must match k_min (shape {tuple(np.shape(k_min))}, dtype {k_min.dtype}), "
            f"got shape {tuple(np.shape(k_max))}, dtype {k_max.dtype}"
        )
    hkv, num_pages, d = np.shape(k_min)
    if scale is not None:
        _common.check_dtype("scale", scale, (np.float32,))
        if tuple(np.shape(scale)) != (hkv, num_pages):
            raise ValueError(
                f"scale must have shape {(hkv, num_pages)} ([num_kv_heads, num_pages] of "
                f"k_min), got {tuple(np.shape(scale))}"
            )
    _common.check_rank("q", q, 3, "[batch, num_q_heads, head_dim]")
    _common.check_dtype("q", q, _FLOAT_DTYPES)
    _common.check_dim("q", q, 2, d, "head_dim of k_min")
    hq = np.shape(q)[1]
    if hq == 0 or hq % hkv:
        raise ValueError(f"q num_q_heads={hq} must be a positive multiple of num_kv_heads={hkv}")
    batch = np.shape(q)[0]
    _common.check_rank("page_table", page_table, 2, "[batch, max_pages]")
    _common.check_dtype("page_table", page_table, _INDEX_DTYPES)
    _common.check_dim("page_table", page_table, 0, batch, "batch of q")
    _common.check_rank("lengths", lengths, 1, "[batch]")
    _common.check_dtype("lengths", lengths, _INDEX_DTYPES)
    _common.check_dim("lengths", lengths, 0, batch, "batch of q")
    if not isinstance(page_size, (int, np.integer)) or isinstance(page_size, bool):
        raise ValueError(f"page_size must be a static int, got {page_size!r}")
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")


# --------------------------------------------------------------------------------------------
# INT8 metadata: quantization and the decode-time update (jnp on values: the append kernel's
# body and the cache's XLA writes share these, so kernels and references agree bit for bit)


def _scale_of(top, divide):
    """The page scale for a largest |bound| of top."""
    return divide(top, float(CODE_MAX))


def widen_page_bounds(min_q, max_q, scale, new_min, new_max, fresh, *, divide=exact_divide):
    """INT8 bounds of a page widened to cover float bounds new_min, new_max [..., D].

    min_q, max_q [..., D] (codes, any dtype holding them) and scale [..., 1] float32 are the
    page's current metadata; fresh [..., 1] bool: the page starts afresh (its current metadata
    is ignored). The new scale is max(scale, max|new| / 127) (fresh: max|new| / 127), and the
    codes are those of the float bounds min(min_q * scale, new_min), max(max_q * scale,
    new_max) under it, rounded outward, so every bound stays conservative. Returns (min codes,
    max codes) as float32 integers in [-127, 127] and the new scale [..., 1].

    When the scale does not change the old codes are kept as they are rather than requantized
    through code * s / s, whose rounding could move a code one step outward: a page whose new
    key lies inside its bounds is left bit for bit unchanged, however many tokens it takes.
    divide: a correctly rounded float32 division (int4._kernel_divide in kernels).
    """
    new_min = new_min.astype(jnp.float32)
    new_max = new_max.astype(jnp.float32)
    top = jnp.maximum(
        jnp.abs(new_min).max(axis=-1, keepdims=True), jnp.abs(new_max).max(axis=-1, keepdims=True)
    )
    s_new = _scale_of(top, divide)
    s_new = jnp.where(fresh, s_new, jnp.maximum(scale, s_new))
    return (*_widen_codes(min_q, max_q, scale, new_min, new_max, s_new, fresh, divide), s_new)


def _widen_codes(min_q, max_q, scale, new_min, new_max, s_new, fresh, divide):
    """The codes of ``widen_page_bounds`` under a given new scale s_new (the GPU append kernel
    computes s_new over both halves of a row, then codes each half)."""
    # s_new = 0 only when every bound is 0: the codes are 0, with no division by zero.
    safe = jnp.where(s_new > 0, s_new, 1.0)
    lo = jnp.floor(divide(new_min, safe))
    hi = jnp.ceil(divide(new_max, safe))
    same = s_new == scale
    old_lo, old_hi = min_q.astype(jnp.float32), max_q.astype(jnp.float32)
    old_lo = jnp.where(same, old_lo, jnp.floor(divide(old_lo * scale, safe)))
    old_hi = jnp.where(same, old_hi, jnp.ceil(divide(old_hi * scale, safe)))
    lo = jnp.where(fresh, lo, jnp.minimum(lo, old_lo))
    hi = jnp.where(fresh, hi, jnp.maximum(hi, old_hi))
    return jnp.clip(lo, -CODE_MAX, CODE_MAX), jnp.clip(hi, -CODE_MAX, CODE_MAX)


@jax.jit
def quantize_page_bounds(k_min, k_max):
    """Float page bounds k_min, k_max [..., D] -> (min codes int8, max codes int8 [..., D],
    scale float32 [...]) by the rule in the module docstring."""
    zeros = jnp.zeros(k_min.shape[:-1] + (1,), jnp.float32)
    lo, hi, scale = widen_page_bounds(zeros, zeros, zeros, k_min, k_max, True)
    return lo.astype(jnp.int8), hi.astype(jnp.int8), scale[..., 0]


@jax.jit
def dequantize_page_bounds(min_q, max_q, scale):
    """INT8 page bounds -> float32 (min_q * scale, max_q * scale), [..., D]."""
    s = scale[..., None]
    return min_q.astype(jnp.float32) * s, max_q.astype(jnp.float32) * s


# --------------------------------------------------------------------------------------------
# Reference (float32 jnp)


def _num_pages(lengths, page_size: int):
    return (jnp.maximum(lengths, 0) + page_size - 1) // page_size


@functools.partial(jax.jit, static_argnames=("page_size", "group_sum"))
def quest_page_scores_reference(
    q,
    k_min,
    k_max,
    page_table,
    lengths,
    scale=None,
    *,
    page_size: int = DEFAULT_PAGE_SIZE,
    group_sum: bool = False,
):
    """Arguments and result as `quest_page_scores`."""
    batch, hq, d = q.shape
    hkv = k_min.shape[0]
    max_pages = page_table.shape[1]
    qg = q.astype(jnp.float32).reshape(batch, hkv, hq // hkv, 1, d)
    mn = k_min[:, page_table].astype(jnp.float32).transpose(1, 0, 2, 3)[:, :, None]
    mx = k_max[:, page_table].astype(jnp.float32).transpose(1, 0, 2, 3)[:, :, None]
    s = jnp.maximum(qg * mn, qg * mx).sum(axis=-1)  # [B, Hkv, G, max_pages]
    if scale is not None:  # INT8 codes: the page's scale factors out of its sum
        s = s * scale[:, page_table].transpose(1, 0, 2)[:, :, None]
    live = jnp.arange(max_pages) < _num_pages(lengths, page_size)[:, None]
    s = jnp.where(live[:, None, None, :], s, -jnp.inf)
    return s.sum(axis=2) if group_sum else s.reshape(batch, hq, max_pages)


# --------------------------------------------------------------------------------------------
# GPU (Pallas Triton)


# INT8 codes to float16 with integer ops only. In a 16-bit half holding a code's byte u (two's
# complement), (u & 0xFF) ^ 0x6480 is the f16 bit pattern 0x6400 | (u ^ 0x80): u ^ 0x80 is
# code + 128 in [1, 255], and f16's 10 mantissa bits count in units of 1 in [1024, 2048), so
# the value is 1024 + 128 + code; subtracting 1152 (0x6480) leaves the code, exactly.
_F16_1152 = 0x6480
_F16_1152_X2 = 0x64806480
_BYTES_0_2 = 0x00FF00FF
# lop3 truth table of (a & b) ^ c over the PTX operand tables a = 0xF0, b = 0xCC, c = 0xAA.
_LUT_AND_XOR = (0xF0 & 0xCC) ^ 0xAA  # 0x6A
_INT8_WORD = 4  # codes per uint32 word


def _int8_codes_f16(words):
    """words uint32 [T, Dw] (four little-endian INT8 codes each) -> 4 float16 [T, Dw], block k
    holding byte k of every word (dims {4 w + k} of the row), exactly the codes. The bit
    arithmetic of _int8_codes_f16_asm in jnp, which the interpreter can run."""
    out = []
    for k in range(_INT8_WORD):
        x = words >> (8 * k) if k else words
        bits = ((x & 0xFF) ^ _F16_1152).astype(jnp.uint16)
        out.append(jax.lax.bitcast_convert_type(bits, jnp.float16) - jnp.float16(1152))
    return out


def _int8_codes_f16_asm(words):
    """_int8_codes_f16 in inline PTX, two words per 32-bit result register: prmt gathers byte
    k of both words into the two 16-bit halves, one lop3 masks and flips them into the f16
    patterns 1152 + code, one sub.f16x2 removes the 1152: three instructions per two codes
    (and a move of the constant, which does not depend on the words), where Triton's int8 ->
    bf16 cast extracts and converts each code on its own. Native GPU only: the interpreter
    cannot run inline assembly."""
    out_type = [jax.ShapeDtypeStruct(words.shape, jnp.float16)]
    out = []
    for k in range(_INT8_WORD):
        [x] = plt.elementwise_inline_asm(
            _int8_asm(k), args=[words], constraints="=r,r,r", pack=2, result_shape_dtypes=out_type
        )
        out.append(x)
    return out


def _int8_asm(k: int) -> str:
    """The PTX of _int8_codes_f16_asm for byte k: $1, $2 two words, $0 two f16 codes."""
    return (
        "{ .reg .b32 t, c; "
        f"prmt.b32 t, $1, $2, {_common.prmt_selector(k):#06x}; "
        f"lop3.b32 t, t, {_BYTES_0_2:#010x}, {_F16_1152_X2:#010x}, {_LUT_AND_XOR:#04x}; "
        f"mov.b32 c, {_F16_1152_X2:#010x}; "  # ptxas rejects an immediate f16x2 operand
        "sub.f16x2 $0, t, c; }"
    )


def _pow2_scale(top):
    """top [M] float32 >= 0 -> (2^-e, 2^e) [M] float32 with e = floor(log2(top)), so that
    top * 2^-e lies in [1, 2): exact powers of two made from top's exponent bits (no log2 /
    exp2, whose approximations could miss). e is clamped to [-126, 126], so both factors are
    normal floats: top 0 or subnormal gets 2^126 (its row stays under 1, and is 0 for a zero
    row), top >= 2^127 gets 2^-126 (under 4)."""
    biased = jnp.clip(jax.lax.bitcast_convert_type(top, jnp.int32) >> 23, 1, 253)
    scale = jax.lax.bitcast_convert_type((254 - biased) << 23, jnp.float32)
    return scale, jax.lax.bitcast_convert_type(biased << 23, jnp.float32)


def _scores_gpu_kernel(
    q_ref,  # [B, Hq, D] (whole array)
    mn_ref,  # [Hkv, P, D], or [Hkv, P, D / 4] uint32 words of INT8 codes (int8_words)
    mx_ref,  # as mn_ref
    pt_ref,  # [B, max_pages] int32
    len_ref,  # [B] int32
    *refs,  # (scale [Hkv, P] f32 with INT8 min/max,) then o [B, Hq, max_pages] f32
    group: int,
    pages_per_block: int,
    page_size: int,
    dots: bool,
    int8_words: bool,
    asm: bool,
    group_sum: bool,
):
    """One tile of pages of one (sequence, KV head). dots: score by tensor-core dots (see
    _uses_dots); else by float32 multiply-adds per query head. int8_words: the min/max rows are
    uint32 words of four INT8 codes, converted to float16 (by inline PTX when asm, else by its
    jnp twin) and scored by f16 dots (see _uses_int8_words). group_sum: o is [B, Hkv,
    max_pages], the sum of the group's heads, written once per tile."""
    sc_ref, o_ref = refs if len(refs) == 2 else (None, refs[0])
    b, h, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    max_pages = pt_ref.shape[1]
    ppb = pages_per_block
    live_pages = jnp.minimum(
        jax.lax.div(jnp.maximum(len_ref[b], 0) + page_size - 1, page_size), max_pages
    )
    lpage = t * ppb + jnp.arange(ppb)
    # The last tile overhangs the page table unless ppb divides it.
    in_table = lpage < max_pages if max_pages % ppb else None
    # The dots want M >= 16: their G query heads are padded (masked on load and store).
    group_pad = max(16, pl.next_power_of_2(group))
    heads = jnp.arange(group_pad)
    head_ok = heads < group
    q_rows = h * group + heads[:, None]
    split = q_ref.dtype == jnp.float32

    def store(scores, head=None):
        """scores [group_pad, ppb] of every head (padded heads 0 or -inf), or [ppb] of query
        head `head` of the group, or with group_sum [ppb] of the group's sum."""
        if group_sum:
            if scores.ndim == 2:
                scores = jnp.sum(scores, axis=0)
            plt.store(o_ref.at[b, h, lpage], scores, mask=in_table)
            return
        if head is not None:
            plt.store(o_ref.at[b, h * group + head, lpage], scores, mask=in_table)
            return
        mask = _common.and_mask(head_ok[:, None], None if in_table is None else in_table[None])
        plt.store(o_ref.at[b, q_rows, lpage[None, :]], scores, mask=mask)

    def word_scores(mn, mx, c2, q_ok):
        """[group_pad, ppb] scores from min/max words [ppb, Dw] (c2 [1, Dw] word ids), before
        the page scale. Block k of the codes holds dims {4 w + k}, so q is gathered in the same
        order (q is read once per program, the codes once per page: permuting q is the cheap
        side). Each query head is scaled by the power of two that brings its largest |q| into
        [1, 2), so its f16 terms neither overflow nor lose their small entries to f16's narrow
        exponent range; the scores are scaled back (exactly) at the end."""
        convert = _int8_codes_f16_asm if asm else _int8_codes_f16
        mn_k, mx_k = convert(mn), convert(mx)
        q_k = [
            plt.load(q_ref.at[b, q_rows, _INT8_WORD * c2 + k], mask=q_ok, other=0)
            for k in range(_INT8_WORD)
        ]
        q_k = [x.astype(jnp.float32) for x in q_k]
        top = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x), axis=1) for x in q_k])
        up, down = _pow2_scale(top)  # [group_pad]
        products = []
        for x, mn_c, mx_c in zip(q_k, mn_k, mx_k):
            x = x * up[:, None]
            pos = _common.f16_terms(jnp.maximum(x, 0.0), split)
            neg = _common.f16_terms(jnp.minimum(x, 0.0), split)
            products += [_common.dot_nt(y, mx_c) for y in pos]
            products += [_common.dot_nt(y, mn_c) for y in neg]
        return _common.add_all(products) * down[:, None]  # [group_pad, ppb]

    @pl.when(t * ppb < live_pages)
    def _live():
        # Row columns: dims, or words of four codes.
        col, col_ok = _common.padded_iota(mn_ref.shape[2])
        ok = lpage < live_pages
        phys = plt.load(pt_ref.at[b, lpage], mask=ok, other=0)
        p2, c2 = phys[:, None], col[None, :]
        ok2 = _common.and_mask(ok[:, None], None if col_ok is None else col_ok[None, :])
        # One read of the group's min/max rows serves its G query heads; padded columns load
        # 0 on both sides, so they add nothing.
        mn = plt.load(mn_ref.at[h, p2, c2], mask=ok2, other=0)
        mx = plt.load(mx_ref.at[h, p2, c2], mask=ok2, other=0)
        page_scale = None
        if sc_ref is not None:
            page_scale = plt.load(sc_ref.at[h, phys], mask=ok, other=0)
        if dots:
            q_ok = _common.and_mask(head_ok[:, None], None if col_ok is None else col_ok[None])
            if int8_words:
                score = word_scores(mn, mx, c2, q_ok)
            else:
                # bf16 rows (INT8 codes convert exactly) against q's signed parts as bf16 terms.
                qg = plt.load(q_ref.at[b, q_rows, c2], mask=q_ok, other=0)
                qg = qg.astype(jnp.float32)
                mn, mx = mn.astype(jnp.bfloat16), mx.astype(jnp.bfloat16)
                pos = _common.bf16_terms(jnp.maximum(qg, 0.0), split)
                neg = _common.bf16_terms(jnp.minimum(qg, 0.0), split)
                score = _common.add_all(
                    [_common.dot_nt(x, mx) for x in pos] + [_common.dot_nt(x, mn) for x in neg]
                )  # [group_pad, ppb]
            if page_scale is not None:
                score = score * page_scale[None, :]
            store(jnp.where(ok[None, :], score, -jnp.inf))
            return
        mn, mx = mn.astype(jnp.float32), mx.astype(jnp.float32)
        total = None
        for g in range(group):
            if col_ok is None:
                qh = q_ref[b, h * group + g, :]
            else:  # padded columns load 0: no contribution
                qh = plt.load(q_ref.at[b, h * group + g, col], mask=col_ok, other=0)
            qh = qh.astype(jnp.float32)[None, :]
            score = jnp.sum(jnp.maximum(qh, 0.0) * mx + jnp.minimum(qh, 0.0) * mn, axis=1)
            if page_scale is not None:
                score = score * page_scale
            if group_sum:
                total = score if total is None else total + score
            else:
                store(jnp.where(ok, score, -jnp.inf), g)
        if group_sum:
            store(jnp.where(ok, total, -jnp.inf))

    @pl.when(t * ppb >= live_pages)
    def _past_the_end():
        store(jnp.full((ppb,) if group_sum else (group_pad, ppb), -jnp.inf, jnp.float32))


def _sum_groups(scores, hkv: int):
    """[B, Hq, P] -> [B, Hkv, P], summed over each KV head's query heads."""
    b, hq, p = scores.shape
    return scores.reshape(b, hkv, hq // hkv, p).sum(axis=2)


def _uses_dots(meta_dtype, head_dim: int, pages: int) -> bool:
    """Whether the Triton kernel scores by tensor-core dots: bf16 or INT8 metadata (exact in
    bf16 and in f16) and tiles Triton's dot takes (>= 16 pages, padded head_dim >= 16). float32
    metadata keeps the exact float32 multiply-adds."""
    return (
        jnp.dtype(meta_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.int8))
        and pages >= 16
        and pl.next_power_of_2(head_dim) >= 16
    )


def _uses_int8_words(meta_dtype, head_dim: int, pages: int, num_warps: int) -> bool:
    """Whether INT8 codes can enter the dots as uint32 words of four (QuestGpuConfig.int8_asm):
    the dots path, head_dim a multiple of 4, the dots' contraction over the words (D / 4
    padded to a power of two) >= 16 (Triton's dot), and a tile of words that gives every
    thread at least two (the inline PTX takes words in pairs, pack=2, and Triton requires a
    thread's elements to split into whole packs)."""
    words = pl.next_power_of_2(head_dim // _INT8_WORD)
    return (
        jnp.dtype(meta_dtype) == jnp.dtype(jnp.int8)
        and _uses_dots(meta_dtype, head_dim, pages)
        and head_dim % _INT8_WORD == 0
        and words >= 16
        and pages * words >= 2 * 32 * num_warps
    )


@functools.partial(jax.jit, static_argnames=("page_size", "interpret", "config", "group_sum"))
def quest_page_scores_gpu(
    q,
    k_min,
    k_max,
    page_table,
    lengths,
    scale=None,
    *,
    page_size: int = DEFAULT_PAGE_SIZE,
    interpret: bool = False,
    config: QuestGpuConfig = DEFAULT_GPU_CONFIG,
    group_sum: bool = False,
):
    """Pallas GPU page scores; arguments and result as `quest_page_scores` (checked by the
    caller). Triton: grid (B, Hkv, tiles of pages_per_block pages). ``config.lowering ==
    "mosaic"``: pallas_kernels.quest_mgpu, which has no interpret mode."""
    if config.lowering == "mosaic":
        if interpret:
            raise ValueError(
                "QuestGpuConfig(lowering='mosaic') runs only on a GPU (Mosaic GPU kernels have "
                "no interpret mode here); check its lowering with jax.export(..., "
                "platforms=['cuda'])"
            )
        s = quest_mgpu.quest_page_scores_mgpu(
            q,
            k_min,
            k_max,
            page_table,
            _num_pages(lengths, page_size),
            scale,
            pages_per_block=config.pages_per_block,
        )
        return _sum_groups(s, k_min.shape[0]) if group_sum else s
    batch, hq, d = q.shape
    hkv = k_min.shape[0]
    max_pages = page_table.shape[1]
    if batch == 0 or max_pages == 0:
        return jnp.zeros((batch, hkv if group_sum else hq, max_pages), jnp.float32)
    pages = min(config.pages_per_block, pl.next_power_of_2(max_pages))
    dots = _uses_dots(k_min.dtype, d, pages)
    int8_words = config.int8_asm and _uses_int8_words(k_min.dtype, d, pages, config.num_warps)
    if int8_words:
        # Free in XLA: a row's D codes viewed as D / 4 little-endian words (byte k of word w is
        # dim 4 w + k), so the kernel gathers four codes per loaded element.
        k_min, k_max = (
            jax.lax.bitcast_convert_type(
                x.reshape(hkv, x.shape[1], d // _INT8_WORD, _INT8_WORD), jnp.uint32
            )
            for x in (k_min, k_max)
        )
    else:
        for name, x in (("k_min", k_min), ("k_max", k_max)):
            _common.check_triton_offsets(
                name,
                x,
                "QuestGpuConfig(int8_asm=True) with a head_dim that is a multiple of 4 "
                "reads it as 4-byte words",
            )
    inputs = (q, k_min, k_max, page_table, lengths) + (() if scale is None else (scale,))
    return pl.pallas_call(
        functools.partial(
            _scores_gpu_kernel,
            group=hq // hkv,
            pages_per_block=pages,
            page_size=page_size,
            dots=dots,
            int8_words=int8_words,
            # Inline PTX needs a GPU; the interpreter runs the same arithmetic in jnp.
            asm=int8_words and not interpret,
            group_sum=group_sum,
        ),
        grid=(batch, hkv, pl.cdiv(max_pages, pages)),
        in_specs=[pl.no_block_spec] * len(inputs),
        out_specs=pl.no_block_spec,
        out_shape=jax.ShapeDtypeStruct((batch, hkv if group_sum else hq, max_pages), jnp.float32),
        compiler_params=plt.CompilerParams(num_warps=config.num_warps, num_stages=1),
        interpret=interpret,
        name="quest_page_scores_gpu",
    )(*inputs)


# --------------------------------------------------------------------------------------------
# TPU (Pallas Mosaic)


def _scores_tpu_kernel(
    pt_ref,  # SMEM [B * max_pages] int32
    len_ref,  # SMEM [B] int32
    q_ref,  # [G, D] f32 or bf16: the query heads of KV head h
    mn_hbm,  # ANY [Hkv, P, D]
    mx_hbm,  # ANY [Hkv, P, D]
    *refs,  # (scale [1, PB] f32 of the chunk's pages with INT8 min/max,) o [G, PB] f32,
    # then the scratch: mn_buf, mx_buf VMEM [PB, D] (min/max dtype), sem
    page_size: int,
    max_pages: int,
):
    sc_ref = refs[0] if len(refs) == 5 else None
    o_ref, mn_buf, mx_buf, sem = refs[-4:]
    b, h, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    pages = mn_buf.shape[0]
    first = c * pages
    # lax.div (truncating) on a non-negative value: jnp's floor division lowers through sign,
    # which Mosaic only lowers for a known TPU generation.
    live = jax.lax.div(jnp.maximum(len_ref[b], 0) + page_size - 1, page_size)
    live_pages = jnp.minimum(live, max_pages)
    # Rows past the live pages are not fetched; whatever the buffer holds there only reaches
    # output lanes that are masked to -inf below.
    n = jnp.clip(live_pages - first, 0, pages)

    def row_copies(i):
        page = pt_ref[b * max_pages + first + i]
        dst = pl.ds(i, 1)
        return (
            pltpu.make_async_copy(mn_hbm.at[h, pl.ds(page, 1), :], mn_buf.at[dst, :], sem),
            pltpu.make_async_copy(mx_hbm.at[h, pl.ds(page, 1), :], mx_buf.at[dst, :], sem),
        )

    def start(i, carry):
        for cp in row_copies(i):
            cp.start()
        return carry

    def wait(i, carry):
        for cp in row_copies(i):
            cp.wait()
        return carry

    # All row DMAs of the chunk are in flight together, then drained.
    jax.lax.fori_loop(0, n, start, 0)
    jax.lax.fori_loop(0, n, wait, 0)

    q = q_ref[...]
    # INT8 codes (|code| <= 127) are exact in bfloat16.
    both_bf16 = q.dtype == jnp.bfloat16 and mn_buf.dtype in (jnp.bfloat16, jnp.int8)
    # bf16 x bf16 products are exact in the f32 accumulator; f32 operands need HIGHEST.
    dt, prec = (jnp.bfloat16, None) if both_bf16 else (jnp.float32, jax.lax.Precision.HIGHEST)
    zero = jnp.zeros((), q.dtype)
    nt = (((1,), (1,)), ((), ()))  # [G, D] x [PB, D] -> [G, PB]

    def dot(a, m):
        if m.dtype == jnp.int8:  # through float32: the int8 -> float conversion Mosaic has
            m = m.astype(jnp.int32).astype(jnp.float32)
        return jax.lax.dot_general(
            a.astype(dt), m.astype(dt), nt, precision=prec, preferred_element_type=jnp.float32
        )

    s = dot(jnp.maximum(q, zero), mx_buf[...]) + dot(jnp.minimum(q, zero), mn_buf[...])
    if sc_ref is not None:
        s = s * sc_ref[...]
    if o_ref.shape[0] != s.shape[0]:  # group_sum: one row, the group's sum
        s = jnp.sum(s, axis=0, keepdims=True)
    lane = first + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    o_ref[...] = jnp.where(lane < live_pages, s, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("page_size", "interpret", "config", "group_sum"))
def quest_page_scores_tpu(
    q,
    k_min,
    k_max,
    page_table,
    lengths,
    scale=None,
    *,
    page_size: int = DEFAULT_PAGE_SIZE,
    interpret: bool = False,
    config: QuestTpuConfig = DEFAULT_TPU_CONFIG,
    group_sum: bool = False,
):
    """Pallas Mosaic TPU page scores; arguments and result as `quest_page_scores`.

    Grid (B, Hkv, chunks of pages): a step DMAs the chunk's min/max rows (one row per page,
    at the scalar-prefetched physical id) into VMEM and scores all G heads with two MXU dots.
    The output leaves as [B, Hkv, G, max_pages] (G is then a full block dim; 1 with
    group_sum, the sum of the G rows) and is reshaped.
    """
    batch, hq, d = q.shape
    hkv = k_min.shape[0]
    max_pages = page_table.shape[1]
    group = hq // hkv
    rows = 1 if group_sum else group
    if batch == 0 or max_pages == 0:
        return jnp.zeros((batch, hkv if group_sum else hq, max_pages), jnp.float32)
    pages = max_pages if max_pages <= config.pages_per_block else config.pages_per_block
    # Pad the page table so the chunk overhanging max_pages reads in-bounds SMEM entries.
    padded = pl.cdiv(max_pages, pages) * pages
    table = jnp.pad(page_table, ((0, 0), (0, padded - max_pages))).reshape(-1)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    extra_specs, extra = [], ()
    if scale is not None:
        # The scales of each sequence's pages in logical order, [B, Hkv, 1, max_pages]: 4 bytes
        # a page, gathered by XLA (a one-float DMA per page into a lane would cost more).
        extra = (scale[:, page_table].transpose(1, 0, 2)[:, :, None, :],)
        extra_specs = [pl.BlockSpec((None, None, 1, pages), lambda b, h, c, *_: (b, h, 0, c))]
    out = pl.pallas_call(
        functools.partial(_scores_tpu_kernel, page_size=page_size, max_pages=padded),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, hkv, pl.cdiv(max_pages, pages)),
            in_specs=[
                pl.BlockSpec((None, None, group, d), lambda b, h, c, *_: (b, h, 0, 0)),
                any_spec,
                any_spec,
                *extra_specs,
            ],
            out_specs=pl.BlockSpec((None, None, rows, pages), lambda b, h, c, *_: (b, h, 0, c)),
            scratch_shapes=[
                pltpu.VMEM((pages, d), k_min.dtype),
                pltpu.VMEM((pages, d), k_min.dtype),
                pltpu.SemaphoreType.DMA,
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((batch, hkv, rows, max_pages), jnp.float32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=_common.tpu_interpret(interpret),
        name="quest_page_scores_tpu",
    )(table, lengths, q.reshape(batch, hkv, group, d), k_min, k_max, *extra)
    return out.reshape(batch, hkv * rows, max_pages)


# --------------------------------------------------------------------------------------------
# Public entry


def quest_page_scores(
    q,
    k_min,
    k_max,
    page_table,
    lengths,
    *,
    scale=None,
    page_size: int = DEFAULT_PAGE_SIZE,
    backend: str = "auto",
    config: QuestGpuConfig | QuestTpuConfig | None = None,
    group_sum: bool = False,
):
    """Quest upper-bound scores of every logical page for every query head.

    Args:
      q: [batch, num_q_heads, head_dim] float32 or bfloat16, post-RoPE queries; query head h
        uses KV head h // (num_q_heads // num_kv_heads).
      k_min, k_max: [num_kv_heads, num_pages, head_dim] float32 or bfloat16, or int8 codes
        when scale is given.
      page_table: [batch, max_pages] int32.
      lengths: [batch] int32 tokens in the cache per sequence.
      scale: None (float metadata) or [num_kv_heads, num_pages] float32, the scale of each
        page's INT8 codes (``quantize_page_bounds``).
      page_size: static, tokens per page of the cache the metadata describes.
      backend: "auto" | "pallas" | "pallas_gpu" | "pallas_tpu" | "reference"
        (docs/kernel_api.md).
      config: QuestGpuConfig or QuestTpuConfig for the kernel that runs; None: the defaults.
      group_sum: static; return each KV head's sum over its query heads (the group's page
        score, which selection by KV group ranks by), summed inside the kernels: a quarter of
        the output at four query heads a group, and no separate reduction.

    Returns:
      [batch, num_q_heads, max_pages] float32: sum_d max(q_d * min_d, q_d * max_d) over the
      metadata of physical page page_table[b, j] (INT8: min_d = min_q_d * scale, etc.); -inf
      for j >= ceil(lengths[b] / page_size). With group_sum: [batch, num_kv_heads,
      max_pages], the sum over each KV head's query heads (-inf at the same pages).
    """
    _check_args(q, k_min, k_max, page_table, lengths, page_size, scale)
    if not isinstance(group_sum, bool):
        raise ValueError(f"group_sum must be a static bool, got {group_sum!r}")
    return _common.implementation(
        backend,
        config,
        reference=quest_page_scores_reference,
        gpu=(quest_page_scores_gpu, DEFAULT_GPU_CONFIG),
        tpu=(quest_page_scores_tpu, DEFAULT_TPU_CONFIG),
    )(q, k_min, k_max, page_table, lengths, scale, page_size=int(page_size), group_sum=group_sum)

"""Decode-time append: one new token per sequence into every array of the paged KV cache.

For each sequence b with position pos = positions[b] (skipped when pos < 0 or pos // S is past
the page table), and each KV head g, at physical page page_table[b, pos // S], slot pos % S:

- k_pages, v_pages: the new K and V rows (in the cache dtype);
- k_int4, k_scale, k_zero: the INT4 codes of the new K row as stored (rounded to the cache dtype
  first), by the quantization rule of pallas_kernels.int4;
- k_min, k_max (Quest metadata of the page): the new row at slot 0 (a page starts afresh), the
  elementwise min / max with the page's current values otherwise. With INT8 metadata (k_mm_scale
  given: int8 codes and a float32 scale per page, pallas_kernels.quest), the page's bounds are
  widened by ``quest.widen_page_bounds``: scale max(old scale, max|k| / 127), codes of the
  dequantized old bounds widened by the new row, rounded outward (unchanged codes when the
  scale is unchanged); at slot 0 the row's own quantization.

One kernel instead of seven scatters, a quantization and a gather of the page metadata per
layer: at decode batch sizes each of those is a launch of a few microseconds whatever its size.

Layouts (docs/kernel_api.md): k_pages, v_pages [Hkv, P, S, D]; k_int4 [Hkv, P, S, D/2] uint8;
k_scale, k_zero [Hkv, P, S] float32; k_min, k_max [Hkv, P, D] (k_pages dtype, or int8 with
k_mm_scale [Hkv, P] float32); k_new, v_new [B, Hkv, D]; page_table [B, max_pages] int32;
positions [B] int32.

GPU (Triton): grid (Hkv, blocks of sequences); masked stores into the aliased cache arrays, so
under jit with the cache donated the update is in place. The INT4 codes go as bytes, or as
4-byte words where k_int4 holds 2**31 to 2**32 bytes (Pallas Triton indexes such an array
with 32-bit offsets, which overflow past 2**31 one-byte elements; AppendGpuConfig). There is
no TPU kernel: on a TPU the reference runs (XLA scatters, in place under donation as well).

Defaults (AppendGpuConfig; docs/kernels.md, "Decode append"): 16 sequences a program, 4 warps,
measured inside the LLaMA-8B-shaped decode step on an H200 (4.5 us a layer at batch 8); not
swept.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import _common
from pallas_kernels.int4 import (
    _half_cols,
    _kernel_divide,
    _pack_nibbles,
    _quantize_halves,
    quantize_int4_reference,
)
from pallas_kernels.quest import _scale_of, _widen_codes, widen_page_bounds

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class AppendGpuConfig:
    """Triton launch knobs. seqs_per_block: sequences (rows) one program writes, a power of
    two; num_warps: a power of two. (No loop in the kernel: no pipeline stages to set.)
    word_stores: write the INT4 codes as 4-byte (or, for D/2 not a multiple of 4, 2-byte)
    words instead of bytes. None: only where byte offsets would overflow the kernel's 32-bit
    indexing (k_int4 of 2**31 to 2**32 bytes, _common.triton_offsets_overflow), as in a 17-34
    GB cache of 8 KV heads of dimension 128; True always (tests), False never."""

    seqs_per_block: int = 16
    num_warps: int = 4
    word_stores: bool | None = None

    def __post_init__(self):
        _common.check_pow2("AppendGpuConfig", "seqs_per_block", self.seqs_per_block)
        _common.check_pow2("AppendGpuConfig", "num_warps", self.num_warps)
        if not (self.word_stores is None or isinstance(self.word_stores, bool)):
            raise ValueError(
                f"AppendGpuConfig.word_stores must be None or a bool, got {self.word_stores!r}"
            )


DEFAULT_GPU_CONFIG = AppendGpuConfig()


def _check_args(
    k_pages, v_pages, k_int4, k_scale, k_zero, k_min, k_max, k_new, v_new, pt, pos, k_mm_scale
):
    _common.check_rank("k_pages", k_pages, 4, "[Hkv, P, S, D]")
    hkv, num_pages, page_size, d = np.shape(k_pages)
    if d % 2:
        raise ValueError(f"k_pages head_dim must be even (two nibbles a byte), got {d}")
    _common.check_dtype("k_pages", k_pages, _FLOAT_DTYPES)
    meta_dtype = k_pages.dtype if k_mm_scale is None else jnp.int8
    expected = {
        "v_pages": ((hkv, num_pages, page_size, d), [k_pages.dtype]),
        "k_int4": ((hkv, num_pages, page_size, d // 2), [jnp.uint8]),
        "k_scale": ((hkv, num_pages, page_size), [jnp.float32]),
        "k_zero": ((hkv, num_pages, page_size), [jnp.float32]),
        "k_min": ((hkv, num_pages, d), [meta_dtype]),
        "k_max": ((hkv, num_pages, d), [meta_dtype]),
    }
    arrays = dict(v_pages=v_pages, k_int4=k_int4, k_scale=k_scale, k_zero=k_zero)
    arrays.update(k_min=k_min, k_max=k_max)
    if k_mm_scale is not None:
        expected["k_mm_scale"] = ((hkv, num_pages), [jnp.float32])
        arrays["k_mm_scale"] = k_mm_scale
    for name, (shape, dtypes) in expected.items():
        if tuple(np.shape(arrays[name])) != shape:
            raise ValueError(
                f"{name} must have shape {shape} (from k_pages {np.shape(k_pages)}), "
                f"got {tuple(np.shape(arrays[name]))}"
            )
        _common.check_dtype(name, arrays[name], dtypes)
    _common.check_rank("page_table", pt, 2, "[B, max_pages]")
    _common.check_dtype("page_table", pt, [np.int32])
    batch = np.shape(pt)[0]
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        if tuple(np.shape(x)) != (batch, hkv, d):
            raise ValueError(
                f"{name} must have shape {(batch, hkv, d)} ([B, Hkv, D]), got {np.shape(x)}"
            )
        _common.check_dtype(name, x, _FLOAT_DTYPES)
    if tuple(np.shape(pos)) != (batch,):
        raise ValueError(f"positions must have shape ({batch},) ([B]), got {np.shape(pos)}")
    _common.check_dtype("positions", pos, [np.int32])


@jax.jit
def cache_append_decode_reference(
    k_pages,
    v_pages,
    k_int4,
    k_scale,
    k_zero,
    k_min,
    k_max,
    k_new,
    v_new,
    page_table,
    positions,
    k_mm_scale=None,
):
    """Arguments and result as `cache_append_decode`; XLA scatters."""
    hkv, num_pages, page_size, _ = k_pages.shape
    batch, max_pages = page_table.shape
    ok = (positions >= 0) & (positions < max_pages * page_size)
    lpage = jnp.clip(positions // page_size, 0, max_pages - 1)
    # Skipped sequences write to page num_pages: out of range, dropped by the scatters.
    phys = jnp.where(ok, page_table[jnp.arange(batch), lpage], num_pages)[:, None]  # [B, 1]
    slot = (positions % page_size)[:, None]
    heads = jnp.arange(hkv)[None, :]  # [1, Hkv]
    k = k_new.astype(k_pages.dtype)
    packed, scale, zero = quantize_int4_reference(k.astype(jnp.float32))
    safe = jnp.minimum(phys, num_pages - 1)
    first = (slot == 0)[..., None]
    row, page = (heads, phys, slot), (heads, phys)
    meta = ()
    if k_mm_scale is None:
        kc = k.astype(k_min.dtype)
        kmin = jnp.where(first, kc, jnp.minimum(k_min[heads, safe], kc))
        kmax = jnp.where(first, kc, jnp.maximum(k_max[heads, safe], kc))
    else:
        kf = k.astype(jnp.float32)
        old_scale = k_mm_scale[heads, safe][..., None]
        lo, hi, scale_new = widen_page_bounds(
            k_min[heads, safe], k_max[heads, safe], old_scale, kf, kf, first
        )
        kmin, kmax = lo.astype(jnp.int8), hi.astype(jnp.int8)
        meta = (k_mm_scale.at[page].set(scale_new[..., 0], mode="drop"),)
    return (
        k_pages.at[row].set(k, mode="drop"),
        v_pages.at[row].set(v_new.astype(v_pages.dtype), mode="drop"),
        k_int4.at[row].set(packed, mode="drop"),
        k_scale.at[row].set(scale, mode="drop"),
        k_zero.at[row].set(zero, mode="drop"),
        k_min.at[page].set(kmin, mode="drop"),
        k_max.at[page].set(kmax, mode="drop"),
        *meta,
    )


def _gpu_kernel(
    k_new_ref,  # [B, Hkv, D] (whole array)
    v_new_ref,  # [B, Hkv, D]
    pos_ref,  # [B] int32, < 0 = skip
    pt_ref,  # [B, max_pages] int32
    *refs,  # n aliased inputs (not read), then the n outputs:
    # kp, vp [Hkv, P*S, D]; k4 [Hkv, P*S, D/2] u8 (or [Hkv, P*S, D/2/W] words of W bytes);
    # ks, kz [Hkv, P*S] f32; mn, mx [Hkv, P, D] (float, or int8 codes followed by their scale
    # [Hkv, P] f32)
    seqs_per_block: int,
    page_size: int,
    word_bytes: int,
    divide,
):
    outs = refs[len(refs) // 2 :]
    kp_ref, vp_ref, k4_ref, ks_ref, kz_ref, mn_ref, mx_ref = outs[:7]
    sc_ref = outs[7] if len(outs) == 8 else None
    h = pl.program_id(0)
    batch, max_pages = pt_ref.shape
    num_pages = mn_ref.shape[1]
    half = k_new_ref.shape[2] // 2
    seq = pl.program_id(1) * seqs_per_block + jnp.arange(seqs_per_block)
    in_range = seq < batch
    pos = plt.load(pos_ref.at[seq], mask=in_range, other=-1)
    pos0 = jnp.maximum(pos, 0)
    lpage = jax.lax.div(pos0, page_size)
    ok = in_range & (pos >= 0) & (lpage < max_pages)
    phys = plt.load(pt_ref.at[seq, jnp.minimum(lpage, max_pages - 1)], mask=ok, other=0)
    phys = jnp.clip(phys, 0, num_pages - 1)
    slot = jax.lax.rem(pos0, page_size)
    dest = phys * page_size + slot

    c2, col_ok = _half_cols(half)
    s2, ok2 = seq[:, None], _common.and_mask(ok[:, None], col_ok)
    d2, p2 = dest[:, None], phys[:, None]
    first = (slot == 0)[:, None]
    kdt, mdt = kp_ref.dtype, mn_ref.dtype
    halves = []
    for off in (0, half):
        k = plt.load(k_new_ref.at[s2, h, c2 + off], mask=ok2, other=0).astype(kdt)
        v = plt.load(v_new_ref.at[s2, h, c2 + off], mask=ok2, other=0).astype(vp_ref.dtype)
        plt.store(kp_ref.at[h, d2, c2 + off], k, mask=ok2)
        plt.store(vp_ref.at[h, d2, c2 + off], v, mask=ok2)
        if sc_ref is None:
            km = k.astype(mdt)
            old_min = plt.load(mn_ref.at[h, p2, c2 + off], mask=ok2, other=0)
            old_max = plt.load(mx_ref.at[h, p2, c2 + off], mask=ok2, other=0)
            new_min = jnp.where(first, km, jnp.minimum(old_min, km))
            new_max = jnp.where(first, km, jnp.maximum(old_max, km))
            plt.store(mn_ref.at[h, p2, c2 + off], new_min, mask=ok2)
            plt.store(mx_ref.at[h, p2, c2 + off], new_max, mask=ok2)
        halves.append(k.astype(jnp.float32))
    if sc_ref is not None:
        # The page's new scale needs max|k| over the whole row (padded columns load 0), then
        # each half is coded under it (quest.widen_page_bounds, split at the scale).
        top = jnp.maximum(
            jnp.abs(halves[0]).max(axis=1, keepdims=True),
            jnp.abs(halves[1]).max(axis=1, keepdims=True),
        )
        old_scale = plt.load(sc_ref.at[h, phys], mask=ok, other=0)[:, None]
        new_scale = _scale_of(top, divide)
        new_scale = jnp.where(first, new_scale, jnp.maximum(old_scale, new_scale))
        for off, kf in zip((0, half), halves):
            old_min = plt.load(mn_ref.at[h, p2, c2 + off], mask=ok2, other=0)
            old_max = plt.load(mx_ref.at[h, p2, c2 + off], mask=ok2, other=0)
            lo, hi = _widen_codes(old_min, old_max, old_scale, kf, kf, new_scale, first, divide)
            plt.store(mn_ref.at[h, p2, c2 + off], lo.astype(mdt), mask=ok2)
            plt.store(mx_ref.at[h, p2, c2 + off], hi.astype(mdt), mask=ok2)
        plt.store(sc_ref.at[h, phys], new_scale[:, 0], mask=ok)
    packed, scale, zero = _quantize_halves(*halves, col_ok, divide=divide)
    if word_bytes == 1:
        plt.store(k4_ref.at[h, d2, c2], packed.astype(jnp.uint8), mask=ok2)
    else:
        # Word w holds bytes W w .. W w + W - 1 (little-endian): byte j packs columns j and
        # j + D/2, re-read here in word order and coded under the row's scale and zero.
        w2, w_ok = _half_cols(half // word_bytes)
        okw = _common.and_mask(ok[:, None], w_ok)
        word_dt = k4_ref.dtype
        word = None
        for k in range(word_bytes):
            cols = w2 * word_bytes + k
            lo, hi = (
                plt.load(k_new_ref.at[s2, h, cols + off], mask=okw, other=0)
                .astype(kdt)
                .astype(jnp.float32)
                for off in (0, half)
            )
            byte = _pack_nibbles(lo, hi, scale, zero, divide=divide).astype(word_dt)
            word = byte if word is None else word | (byte << (8 * k))
        plt.store(k4_ref.at[h, d2, w2], word, mask=okw)
    plt.store(ks_ref.at[h, dest], scale[:, 0], mask=ok)
    plt.store(kz_ref.at[h, dest], zero[:, 0], mask=ok)


@functools.partial(jax.jit, static_argnames=("interpret", "config"))
def cache_append_decode_gpu(
    k_pages,
    v_pages,
    k_int4,
    k_scale,
    k_zero,
    k_min,
    k_max,
    k_new,
    v_new,
    page_table,
    positions,
    k_mm_scale=None,
    *,
    interpret: bool = False,
    config: AppendGpuConfig = DEFAULT_GPU_CONFIG,
):
    """Pallas Triton append; arguments and result as `cache_append_decode` (checked by the
    caller)."""
    hkv, num_pages, page_size, d = k_pages.shape
    batch = page_table.shape[0]
    shapes = (k_pages, v_pages, k_int4, k_scale, k_zero, k_min, k_max)
    shapes += () if k_mm_scale is None else (k_mm_scale,)
    if batch == 0:
        return shapes
    rows = min(config.seqs_per_block, pl.next_power_of_2(batch))
    slots = num_pages * page_size
    word_bytes = _word_bytes(k_int4, config)
    k_words = k_int4.reshape(hkv, slots, d // 2 // word_bytes, word_bytes)
    if word_bytes == 1:
        k_words = k_words[..., 0]
    else:  # a free view in XLA
        k_words = jax.lax.bitcast_convert_type(k_words, _WORD_DTYPES[word_bytes])
    for name, x in (("k_min", k_min), ("k_max", k_max)):
        _common.check_triton_offsets(
            name, x, "use float Quest metadata, or split the cache over more devices"
        )
    cache = (
        k_pages.reshape(hkv, slots, d),
        v_pages.reshape(hkv, slots, d),
        k_words,
        k_scale.reshape(hkv, slots),
        k_zero.reshape(hkv, slots),
        *shapes[5:],
    )
    n = len(cache)
    out = pl.pallas_call(
        functools.partial(
            _gpu_kernel,
            seqs_per_block=rows,
            page_size=page_size,
            word_bytes=word_bytes,
            divide=_kernel_divide("gpu", interpret),
        ),
        grid=(hkv, pl.cdiv(batch, rows)),
        in_specs=[pl.no_block_spec] * (4 + n),
        out_specs=[pl.no_block_spec] * n,
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in cache],
        input_output_aliases={4 + i: i for i in range(n)},
        compiler_params=plt.CompilerParams(num_warps=config.num_warps, num_stages=1),
        interpret=interpret,
        name="cache_append_decode_gpu",
    )(k_new, v_new, positions, page_table, *cache)
    out = list(out)
    if word_bytes > 1:
        out[2] = jax.lax.bitcast_convert_type(out[2], jnp.uint8)
    return tuple(o.reshape(x.shape) for o, x in zip(out, shapes))


_WORD_DTYPES = {2: jnp.uint16, 4: jnp.uint32}


def _word_bytes(k_int4, config: AppendGpuConfig) -> int:
    """Bytes per stored INT4 word: 1 (bytes) unless config.word_stores asks for words or
    leaves it to the size of k_int4 (see AppendGpuConfig)."""
    words = config.word_stores
    if words is None:
        words = _common.triton_offsets_overflow(k_int4)
    if not words:
        return 1
    half = k_int4.shape[-1]
    if half % 4 == 0:
        return 4
    if half % 2 == 0:
        return 2
    _common.check_triton_offsets(
        "k_int4", k_int4, "a head_dim that is a multiple of 4 lets it store 2-byte words"
    )
    return 1


def cache_append_decode(
    k_pages,
    v_pages,
    k_int4,
    k_scale,
    k_zero,
    k_min,
    k_max,
    k_new,
    v_new,
    page_table,
    positions,
    *,
    k_mm_scale=None,
    backend: str = "auto",
    config: AppendGpuConfig | None = None,
):
    """Writes one new token per sequence into the paged cache (see the module docstring).

    Args:
      k_pages, v_pages: [Hkv, P, S, D] float; k_int4: [Hkv, P, S, D/2] uint8; k_scale,
        k_zero: [Hkv, P, S] float32; k_min, k_max: [Hkv, P, D] in k_pages' dtype, or int8
        codes with k_mm_scale.
      k_new, v_new: [B, Hkv, D] float, the new token's post-RoPE K and its V.
      page_table: [B, max_pages] int32, logical page -> physical page.
      positions: [B] int32 position of the new token; < 0 skips sequence b.
      k_mm_scale: None (float Quest metadata) or [Hkv, P] float32, the page scales of INT8
        k_min / k_max (pallas_kernels.quest).
      backend: "auto" | "pallas" | "pallas_gpu" | "pallas_tpu" | "reference" ("pallas_tpu"
        and "auto" on a TPU run the reference: XLA's scatters, in place under donation).
      config: AppendGpuConfig for the GPU kernel; None: the defaults.

    Returns:
      (k_pages, v_pages, k_int4, k_scale, k_zero, k_min, k_max) updated, then k_mm_scale
      updated when it was given.
    """
    args = (k_pages, v_pages, k_int4, k_scale, k_zero, k_min, k_max, k_new, v_new)
    _check_args(*args, page_table, positions, k_mm_scale)
    return _common.implementation(
        backend,
        config,
        reference=cache_append_decode_reference,
        gpu=(cache_append_decode_gpu, DEFAULT_GPU_CONFIG),
    )(*args, page_table, positions, k_mm_scale)

"""INT4 K: per-row asymmetric quantization, and packing new K rows into the paged INT4 cache.

Quantization (docs/kernel_api.md, "INT4 nibble order"), per row of head_dim D values:

    zero  = min(x)                 scale = (max(x) - min(x)) / 15
    n     = clip(floor((x - zero) / scale + 0.5), 0, 15)      (round half up)
    x_hat = scale * n + zero       so |x - x_hat| <= scale / 2

A constant row has scale 0; every x - zero is then exactly 0, so n = 0 and x_hat = zero exactly
(the division uses a safe scale of 1 there, never 0). Rounding is half up rather than jnp.round's
half to even because the Triton lowering has no round primitive; the bound is the same.

Both divisions are meant as true float32 divisions, correctly rounded (an input where
(x - zero) / scale is exactly k + 1/2 gets nibble k + 1). That takes care on each backend:
XLA's algebraic simplifier rewrites a / constant and a / broadcast(b) into a * (1 / b), which
is an ulp off often enough to move a nibble (`exact_divide` keeps a true divide: exact on CPU,
and what the interpreters run; XLA's GPU division itself is not correctly rounded); Triton
lowers `/` to the approximate div.full.f32 (the native GPU kernels use div.rn.f32 through
inline PTX and are exact). Mosaic TPU's division has not been checked bit for bit on a TPU.

Split-halves nibble order: byte j of a row holds n[j] in its low nibble and n[j + D/2] in its high
nibble, so a kernel unpacks with `& 15` / `>> 4` and two contiguous half-rows, never interleaves.

Paged cache (head-major): k_int4 [Hkv, P, S, D/2] uint8, k_scale / k_zero [Hkv, P, S] float32.
A new token of sequence b at position pos goes to physical page page_table[b, pos // S], slot
pos % S. A write is skipped when pos < 0, when pos // S is past the page table, or when the page
table points at physical page 0 (the null page stays untouched, so padding entries never race).

Kernels:
- GPU (Triton): one program per (KV head, block of rows); rows are tokens, prefill and decode
  alike. The destination rows are scattered with masked stores into the aliased cache. Half
  rows whose length is not a power of two (Triton's block rule) are padded and masked.
- TPU (Mosaic): Mosaic cannot scatter single rows of a tiled [S, D/2] page or a [P, S] scale
  plane with block specs (a one-page block of k_scale has second-minor block dim 1). So a step
  handles one page of one sequence: the page's bytes come in and go out through a block spec
  whose index map reads the scalar-prefetched page table (read-modify-write of the whole page),
  and the scale/zero rows [Hkv, 1, S] of that page are read, merged and written back with DMAs.
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

from pallas_kernels import _common

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_INDEX_DTYPES = (np.int32,)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class Int4GpuConfig:
    """Triton launch knobs shared by the INT4 kernels.

    rows_per_block: rows (tokens) one program quantizes, dequantizes or packs; a power of two.
      32 rows of 128 values is 4K elements in registers for 4 warps, and a decode batch of 64
      sequences x 8 KV heads is still 16 programs.
    """

    rows_per_block: int = 32
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        if not _is_pow2(self.rows_per_block):
            raise ValueError(f"rows_per_block must be a power of two, got {self.rows_per_block}")
        if not _is_pow2(self.num_warps):
            raise ValueError(f"num_warps must be a power of two, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")


@dataclasses.dataclass(frozen=True)
class Int4TpuConfig:
    """Mosaic knobs of the plain (unpaged) quantize / dequantize kernels.

    rows_per_block: rows per grid step; a multiple of 32 because uint8 packs 4 rows per 32-bit
      sublane (the paged kernels work a page at a time and need no knob).
    """

    rows_per_block: int = 256

    def __post_init__(self):
        if self.rows_per_block <= 0 or self.rows_per_block % 32:
            raise ValueError(
                f"rows_per_block must be a positive multiple of 32, got {self.rows_per_block}"
            )


DEFAULT_GPU_CONFIG = Int4GpuConfig()
DEFAULT_TPU_CONFIG = Int4TpuConfig()


# --------------------------------------------------------------------------------------------
# Validation (shapes and dtypes only, so it runs on tracers too, before any kernel is traced)


def _check_quantize_args(x) -> None:
    if np.ndim(x) < 1:
        raise ValueError(f"x must have rank >= 1 ([..., head_dim]), got shape {np.shape(x)}")
    _common.check_dtype("x", x, _FLOAT_DTYPES)
    d = np.shape(x)[-1]
    if d == 0 or d % 2:
        raise ValueError(
            f"x last dim (head_dim) must be even and > 0 (two nibbles per byte), got {d} "
            f"(shape {tuple(np.shape(x))})"
        )


def _check_dequantize_args(packed, scale, zero) -> None:
    if np.ndim(packed) < 1:
        raise ValueError(
            f"packed must have rank >= 1 ([..., head_dim // 2]), got shape {np.shape(packed)}"
        )
    _common.check_dtype("packed", packed, (np.uint8,))
    lead = tuple(np.shape(packed)[:-1])
    for name, a in (("scale", scale), ("zero", zero)):
        _common.check_dtype(name, a, (np.float32,))
        if tuple(np.shape(a)) != lead:
            raise ValueError(
                f"{name} must have shape {lead} (packed shape without its last dim), "
                f"got {tuple(np.shape(a))}"
            )


def _check_cache_args(k_int4, k_scale, k_zero, page_table, batch: int) -> tuple[int, ...]:
    """Checks the paged INT4 cache and page table; returns (Hkv, P, S, D/2)."""
    _common.check_rank("k_int4", k_int4, 4, "[num_kv_heads, num_pages, page_size, head_dim // 2]")
    _common.check_dtype("k_int4", k_int4, (np.uint8,))
    hkv, num_pages, page_size, half = np.shape(k_int4)
    for name, a in (("k_scale", k_scale), ("k_zero", k_zero)):
        _common.check_rank(name, a, 3, "[num_kv_heads, num_pages, page_size]")
        _common.check_dtype(name, a, (np.float32,))
        for axis, n, what in (
            (0, hkv, "num_kv_heads"),
            (1, num_pages, "num_pages"),
            (2, page_size, "page_size"),
        ):
            _common.check_dim(name, a, axis, n, what + " of k_int4")
    _common.check_rank("page_table", page_table, 2, "[batch, max_pages]")
    _common.check_dtype("page_table", page_table, _INDEX_DTYPES)
    _common.check_dim("page_table", page_table, 0, batch, "batch of k_new")
    return hkv, num_pages, page_size, half


def _check_k_new(k_new, rank: int, layout: str, hkv: int, half: int) -> None:
    _common.check_rank("k_new", k_new, rank, layout)
    _common.check_dtype("k_new", k_new, _FLOAT_DTYPES)
    _common.check_dim("k_new", k_new, rank - 2, hkv, "num_kv_heads of k_int4")
    _common.check_dim("k_new", k_new, rank - 1, 2 * half, "head_dim = 2 * k_int4.shape[3]")


def _check_per_seq(name: str, a, batch: int) -> None:
    _common.check_rank(name, a, 1, "[batch]")
    _common.check_dtype(name, a, _INDEX_DTYPES)
    _common.check_dim(name, a, 0, batch, "batch of k_new")


def _check_prefill_args(k_int4, k_scale, k_zero, k_new, page_table, start, count) -> None:
    batch = np.shape(k_new)[0] if np.ndim(k_new) else 0
    hkv, _, _, half = _check_cache_args(k_int4, k_scale, k_zero, page_table, batch)
    _check_k_new(k_new, 4, "[batch, tokens, num_kv_heads, head_dim]", hkv, half)
    _check_per_seq("start", start, batch)
    _check_per_seq("count", count, batch)


def _check_decode_args(k_int4, k_scale, k_zero, k_new, page_table, positions) -> None:
    batch = np.shape(k_new)[0] if np.ndim(k_new) else 0
    hkv, _, _, half = _check_cache_args(k_int4, k_scale, k_zero, page_table, batch)
    _check_k_new(k_new, 3, "[batch, num_kv_heads, head_dim]", hkv, half)
    _check_per_seq("positions", positions, batch)


# --------------------------------------------------------------------------------------------
# Division


def exact_divide(a, b):
    """a / b as a true XLA divide, b broadcastable to a's shape: correctly rounded on CPU (XLA's
    GPU division is not, whatever the HLO says).

    XLA's algebraic simplifier turns a / constant and a / broadcast(b) into a * (1 / b) (an ulp
    off for many inputs). A divisor of a's full shape that comes out of an optimization barrier
    matches neither pattern, so the compiled HLO keeps a true divide.
    """
    a = jnp.asarray(a)
    b = jnp.broadcast_to(jnp.asarray(b, a.dtype), a.shape)
    return a / jax.lax.optimization_barrier(b)


def _div_rn_gpu(a, b):
    """a / b correctly rounded in a native Triton kernel (its `/` is div.full.f32, approximate);
    float32 operands, b broadcastable to a's shape."""
    b = jnp.broadcast_to(jnp.asarray(b, jnp.float32), a.shape)
    (out,) = plt.elementwise_inline_asm(
        "div.rn.f32 $0, $1, $2;",
        args=[a, b],
        constraints="=f,f,f",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)],
    )
    return out


def _div_tpu(a, b):
    return a / b


def _kernel_divide(platform: str, interpret):
    """The division a kernel body uses: interpreters run the kernel as XLA (exact_divide)."""
    if interpret:
        return exact_divide
    return _div_rn_gpu if platform == "gpu" else _div_tpu


# --------------------------------------------------------------------------------------------
# References (float32 jnp)


@jax.jit
def quantize_int4_reference(x):
    """x [..., D] float -> (packed uint8 [..., D/2], scale f32 [...], zero f32 [...])."""
    x = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    zero = x.min(axis=-1)
    scale = exact_divide(x.max(axis=-1) - zero, 15.0)
    safe = jnp.where(scale > 0, scale, 1.0)
    n = jnp.floor(exact_divide(x - zero[..., None], safe[..., None]) + 0.5)
    n = jnp.clip(n, 0, 15).astype(jnp.uint8)
    packed = n[..., :half] | (n[..., half:] << 4)
    return packed, scale, zero


@jax.jit
def dequantize_int4_reference(packed, scale, zero):
    """packed uint8 [..., D/2], scale, zero f32 [...] -> f32 [..., D]."""
    n = jnp.concatenate([packed & 15, packed >> 4], axis=-1).astype(jnp.float32)
    return n * scale[..., None] + zero[..., None]


@jax.jit
def int4_pack_prefill_reference(k_int4, k_scale, k_zero, k_new, page_table, start, count):
    """Scatter of quantize_int4_reference(k_new); arguments and result as `int4_pack_prefill`."""
    _, num_pages, page_size, _ = k_int4.shape
    batch, tokens = k_new.shape[:2]
    max_pages = page_table.shape[1]
    packed, scale, zero = quantize_int4_reference(k_new)  # [B, T, Hkv, D/2], [B, T, Hkv]
    t = jnp.arange(tokens)[None, :]
    pos = start[:, None] + t  # [B, T]
    lpage = pos // page_size
    phys = page_table[jnp.arange(batch)[:, None], jnp.clip(lpage, 0, max_pages - 1)]
    ok = (t < count[:, None]) & (pos >= 0) & (lpage < max_pages) & (phys != 0)
    phys = jnp.where(ok, phys, num_pages)  # out of range: dropped by the scatters
    slot = pos % page_size
    k_int4 = k_int4.at[:, phys, slot].set(jnp.moveaxis(packed, 2, 0), mode="drop")
    k_scale = k_scale.at[:, phys, slot].set(jnp.moveaxis(scale, 2, 0), mode="drop")
    k_zero = k_zero.at[:, phys, slot].set(jnp.moveaxis(zero, 2, 0), mode="drop")
    return k_int4, k_scale, k_zero


@jax.jit
def int4_pack_decode_reference(k_int4, k_scale, k_zero, k_new, page_table, positions):
    """One token per sequence; arguments and result as `int4_pack_decode`."""
    count = (positions >= 0).astype(jnp.int32)
    return int4_pack_prefill_reference(
        k_int4, k_scale, k_zero, k_new[:, None], page_table, positions, count
    )


# --------------------------------------------------------------------------------------------
# In-kernel quantization (GPU and TPU bodies share it; jnp on values, no refs)


def _quantize_halves(lo, hi, col_ok=None, *, divide):
    """lo, hi [..., D/2] f32, the two halves of rows -> (bytes i32 [..., D/2], scale, zero).

    scale and zero keep a trailing unit dim ([..., 1]) so they broadcast against the halves.
    col_ok (broadcastable bool) marks real columns when the halves are padded to a power of
    two; padding is left out of min and max (its bytes are never stored). divide: the
    backend's correctly rounded division (`_kernel_divide`).
    """
    lo_min, hi_min, lo_max, hi_max = lo, hi, lo, hi
    if col_ok is not None:
        lo_min, hi_min = jnp.where(col_ok, lo, jnp.inf), jnp.where(col_ok, hi, jnp.inf)
        lo_max, hi_max = jnp.where(col_ok, lo, -jnp.inf), jnp.where(col_ok, hi, -jnp.inf)
    zero = jnp.minimum(lo_min.min(axis=-1, keepdims=True), hi_min.min(axis=-1, keepdims=True))
    top = jnp.maximum(lo_max.max(axis=-1, keepdims=True), hi_max.max(axis=-1, keepdims=True))
    scale = divide(top - zero, 15.0)
    safe = jnp.where(scale > 0, scale, 1.0)

    def nibble(v):
        return jnp.clip(jnp.floor(divide(v - zero, safe) + 0.5), 0, 15).astype(jnp.int32)

    return nibble(lo) | (nibble(hi) << 4), scale, zero


# --------------------------------------------------------------------------------------------
# GPU (Pallas Triton)


def _gpu_params(config: Int4GpuConfig):
    return plt.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def _half_cols(half: int):
    """Column iota [1, Hp] over the half-row padded to a power of two (Triton block dims must
    be), and the mask of real columns, None when no padding is needed."""
    padded = pl.next_power_of_2(half)
    col = jnp.arange(padded)[None, :]
    return col, (col < half if padded != half else None)


def _and(mask, extra):
    return mask if extra is None else mask & extra


def _quantize_gpu_kernel(
    x_ref,  # [R, D] float (whole array)
    q_ref,  # [R, D/2] uint8
    s_ref,  # [R] f32
    z_ref,  # [R] f32
    *,
    rows_per_block: int,
    divide,
):
    num_rows, half = q_ref.shape
    row = pl.program_id(0) * rows_per_block + jnp.arange(rows_per_block)
    ok = row < num_rows
    # Masked accesses index every dim with an array (no slices): that is the form both the
    # Triton lowering and the interpreter support for masked gathers and scatters.
    c2, col_ok = _half_cols(half)
    r2, ok2 = row[:, None], _and(ok[:, None], col_ok)
    lo = plt.load(x_ref.at[r2, c2], mask=ok2, other=0).astype(jnp.float32)
    hi = plt.load(x_ref.at[r2, c2 + half], mask=ok2, other=0).astype(jnp.float32)
    packed, scale, zero = _quantize_halves(lo, hi, col_ok, divide=divide)
    plt.store(q_ref.at[r2, c2], packed.astype(jnp.uint8), mask=ok2)
    plt.store(s_ref.at[row], scale[:, 0], mask=ok)
    plt.store(z_ref.at[row], zero[:, 0], mask=ok)


def _dequantize_gpu_kernel(
    q_ref,  # [R, D/2] uint8 (whole array)
    s_ref,  # [R] f32
    z_ref,  # [R] f32
    o_ref,  # [R, D] f32
    *,
    rows_per_block: int,
):
    num_rows, half = q_ref.shape
    row = pl.program_id(0) * rows_per_block + jnp.arange(rows_per_block)
    ok = row < num_rows
    c2, col_ok = _half_cols(half)
    r2, ok2 = row[:, None], _and(ok[:, None], col_ok)
    packed = plt.load(q_ref.at[r2, c2], mask=ok2, other=0).astype(jnp.int32)
    scale = plt.load(s_ref.at[row], mask=ok, other=0.0)[:, None]
    zero = plt.load(z_ref.at[row], mask=ok, other=0.0)[:, None]
    plt.store(o_ref.at[r2, c2], (packed & 15).astype(jnp.float32) * scale + zero, mask=ok2)
    plt.store(o_ref.at[r2, c2 + half], (packed >> 4).astype(jnp.float32) * scale + zero, mask=ok2)


def _row_grid(num_rows: int, config: Int4GpuConfig) -> tuple[int, int]:
    """(rows per program, number of programs); small inputs get one small program."""
    rows = min(config.rows_per_block, pl.next_power_of_2(max(num_rows, 1)))
    return rows, pl.cdiv(num_rows, rows)


@functools.partial(jax.jit, static_argnames=("interpret", "config"))
def quantize_int4_gpu(x, *, interpret: bool = False, config: Int4GpuConfig = DEFAULT_GPU_CONFIG):
    """Pallas Triton quantizer; arguments and result as `quantize_int4` (checked by the caller).

    Leading dims are flattened to rows; grid (row blocks,).
    """
    lead, d = x.shape[:-1], x.shape[-1]
    num_rows = int(np.prod(lead, dtype=np.int64))
    if num_rows == 0:
        return quantize_int4_reference(x)
    rows, grid = _row_grid(num_rows, config)
    packed, scale, zero = pl.pallas_call(
        functools.partial(
            _quantize_gpu_kernel, rows_per_block=rows, divide=_kernel_divide("gpu", interpret)
        ),
        grid=(grid,),
        in_specs=[pl.no_block_spec],
        out_specs=[pl.no_block_spec] * 3,
        out_shape=[
            jax.ShapeDtypeStruct((num_rows, d // 2), jnp.uint8),
            jax.ShapeDtypeStruct((num_rows,), jnp.float32),
            jax.ShapeDtypeStruct((num_rows,), jnp.float32),
        ],
        compiler_params=_gpu_params(config),
        interpret=interpret,
        name="quantize_int4_gpu",
    )(x.reshape(num_rows, d))
    return packed.reshape(*lead, d // 2), scale.reshape(lead), zero.reshape(lead)


@functools.partial(jax.jit, static_argnames=("interpret", "config"))
def dequantize_int4_gpu(
    packed, scale, zero, *, interpret: bool = False, config: Int4GpuConfig = DEFAULT_GPU_CONFIG
):
    """Pallas Triton dequantizer; arguments and result as `dequantize_int4` (checked by caller)."""
    lead, half = packed.shape[:-1], packed.shape[-1]
    num_rows = int(np.prod(lead, dtype=np.int64))
    if num_rows == 0:
        return dequantize_int4_reference(packed, scale, zero)
    rows, grid = _row_grid(num_rows, config)
    out = pl.pallas_call(
        functools.partial(_dequantize_gpu_kernel, rows_per_block=rows),
        grid=(grid,),
        in_specs=[pl.no_block_spec] * 3,
        out_specs=pl.no_block_spec,
        out_shape=jax.ShapeDtypeStruct((num_rows, 2 * half), jnp.float32),
        compiler_params=_gpu_params(config),
        interpret=interpret,
        name="dequantize_int4_gpu",
    )(packed.reshape(num_rows, half), scale.reshape(num_rows), zero.reshape(num_rows))
    return out.reshape(*lead, 2 * half)


def _pack_gpu_kernel(
    k_ref,  # [R, Hkv, D] float (whole array): R = B * T new rows, row r is token r % T of b
    pos_ref,  # [R] int32: destination position of each row, < 0 = skip
    pt_ref,  # [B, max_pages] int32
    q_in_ref,  # aliased with q_ref (not read)
    s_in_ref,  # aliased with s_ref
    z_in_ref,  # aliased with z_ref
    q_ref,  # [Hkv, P * S, D/2] uint8: the cache, one row per (page, slot)
    s_ref,  # [Hkv, P * S] f32
    z_ref,  # [Hkv, P * S] f32
    *,
    rows_per_block: int,
    tokens: int,
    page_size: int,
    divide,
):
    del q_in_ref, s_in_ref, z_in_ref
    h = pl.program_id(0)
    num_rows = pos_ref.shape[0]
    max_pages = pt_ref.shape[1]
    half = q_ref.shape[2]
    row = pl.program_id(1) * rows_per_block + jnp.arange(rows_per_block)
    in_range = row < num_rows
    pos = plt.load(pos_ref.at[row], mask=in_range, other=-1)
    pos0 = jnp.maximum(pos, 0)
    lpage = jax.lax.div(pos0, page_size)
    want = in_range & (pos >= 0) & (lpage < max_pages)
    seq = jax.lax.div(row, tokens)
    phys = plt.load(pt_ref.at[seq, lpage], mask=want, other=0)
    ok = want & (phys != 0)
    dest = phys * page_size + jax.lax.rem(pos0, page_size)

    c2, col_ok = _half_cols(half)
    r2, ok2 = row[:, None], _and(ok[:, None], col_ok)
    lo = plt.load(k_ref.at[r2, h, c2], mask=ok2, other=0).astype(jnp.float32)
    hi = plt.load(k_ref.at[r2, h, c2 + half], mask=ok2, other=0).astype(jnp.float32)
    packed, scale, zero = _quantize_halves(lo, hi, col_ok, divide=divide)
    plt.store(q_ref.at[h, dest[:, None], c2], packed.astype(jnp.uint8), mask=ok2)
    plt.store(s_ref.at[h, dest], scale[:, 0], mask=ok)
    plt.store(z_ref.at[h, dest], zero[:, 0], mask=ok)


def _pack_gpu(k_int4, k_scale, k_zero, k_new, page_table, pos, *, interpret, config):
    """k_new [B, T, Hkv, D]; pos [B, T] int32 destination positions (< 0 skips)."""
    hkv, num_pages, page_size, half = k_int4.shape
    batch, tokens = k_new.shape[:2]
    num_rows = batch * tokens
    if num_rows == 0:
        return k_int4, k_scale, k_zero
    rows, grid = _row_grid(num_rows, config)
    slots = num_pages * page_size
    q, s, z = pl.pallas_call(
        functools.partial(
            _pack_gpu_kernel,
            rows_per_block=rows,
            tokens=tokens,
            page_size=page_size,
            divide=_kernel_divide("gpu", interpret),
        ),
        grid=(hkv, grid),
        in_specs=[pl.no_block_spec] * 6,
        out_specs=[pl.no_block_spec] * 3,
        out_shape=[
            jax.ShapeDtypeStruct((hkv, slots, half), jnp.uint8),
            jax.ShapeDtypeStruct((hkv, slots), jnp.float32),
            jax.ShapeDtypeStruct((hkv, slots), jnp.float32),
        ],
        input_output_aliases={3: 0, 4: 1, 5: 2},
        compiler_params=_gpu_params(config),
        interpret=interpret,
        name="int4_pack_gpu",
    )(
        k_new.reshape(num_rows, hkv, 2 * half),
        pos.reshape(num_rows),
        page_table,
        k_int4.reshape(hkv, slots, half),
        k_scale.reshape(hkv, slots),
        k_zero.reshape(hkv, slots),
    )
    return (
        q.reshape(k_int4.shape),
        s.reshape(k_scale.shape),
        z.reshape(k_zero.shape),
    )


@functools.partial(jax.jit, static_argnames=("interpret", "config"))
def int4_pack_prefill_gpu(
    k_int4,
    k_scale,
    k_zero,
    k_new,
    page_table,
    start,
    count,
    *,
    interpret: bool = False,
    config: Int4GpuConfig = DEFAULT_GPU_CONFIG,
):
    """Pallas Triton paged pack; arguments and result as `int4_pack_prefill` (checked by the
    caller). Grid (Hkv, blocks of B*T rows); the cache is updated in place (aliased)."""
    t = jnp.arange(k_new.shape[1])[None, :]
    pos = jnp.where(t < count[:, None], start[:, None] + t, -1)
    return _pack_gpu(
        k_int4, k_scale, k_zero, k_new, page_table, pos, interpret=interpret, config=config
    )


@functools.partial(jax.jit, static_argnames=("interpret", "config"))
def int4_pack_decode_gpu(
    k_int4,
    k_scale,
    k_zero,
    k_new,
    page_table,
    positions,
    *,
    interpret: bool = False,
    config: Int4GpuConfig = DEFAULT_GPU_CONFIG,
):
    """Pallas Triton paged pack of one token per sequence; as `int4_pack_decode`."""
    return _pack_gpu(
        k_int4,
        k_scale,
        k_zero,
        k_new[:, None],
        page_table,
        positions[:, None],
        interpret=interpret,
        config=config,
    )


# --------------------------------------------------------------------------------------------
# TPU (Pallas Mosaic)


def _tpu_interpret(interpret: bool):
    return _common.tpu_interpret_params() if interpret else False


def _quantize_tpu_kernel(
    x_ref,  # [BR, D] float
    q_ref,  # [BR, D/2] uint8
    s_ref,  # [BR, 1] f32
    z_ref,  # [BR, 1] f32
    *,
    divide,
):
    half = q_ref.shape[1]
    lo = x_ref[:, :half].astype(jnp.float32)
    hi = x_ref[:, half:].astype(jnp.float32)
    packed, scale, zero = _quantize_halves(lo, hi, divide=divide)
    q_ref[...] = packed.astype(jnp.uint8)
    s_ref[...] = scale
    z_ref[...] = zero


def _dequantize_tpu_kernel(
    q_ref,  # [BR, D/2] uint8
    s_ref,  # [BR, 1] f32
    z_ref,  # [BR, 1] f32
    o_ref,  # [BR, D] f32
):
    half = q_ref.shape[1]
    packed = q_ref[...].astype(jnp.int32)
    scale, zero = s_ref[...], z_ref[...]
    o_ref[:, :half] = (packed & 15).astype(jnp.float32) * scale + zero
    o_ref[:, half:] = (packed >> 4).astype(jnp.float32) * scale + zero


def _tpu_row_block(num_rows: int, config: Int4TpuConfig) -> int:
    # A block equal to the whole (short) row dim is always a legal Mosaic block shape.
    return num_rows if num_rows <= config.rows_per_block else config.rows_per_block


@functools.partial(jax.jit, static_argnames=("interpret", "config"))
def quantize_int4_tpu(x, *, interpret: bool = False, config: Int4TpuConfig = DEFAULT_TPU_CONFIG):
    """Pallas Mosaic TPU quantizer; arguments and result as `quantize_int4`.

    scale / zero leave the kernel as [rows, 1] (the lane-reduction result, no relayout in
    VMEM) and are reshaped outside.
    """
    lead, d = x.shape[:-1], x.shape[-1]
    num_rows = int(np.prod(lead, dtype=np.int64))
    if num_rows == 0:
        return quantize_int4_reference(x)
    br = _tpu_row_block(num_rows, config)
    row_map = lambda i: (i, 0)
    packed, scale, zero = pl.pallas_call(
        functools.partial(_quantize_tpu_kernel, divide=_kernel_divide("tpu", interpret)),
        grid=(pl.cdiv(num_rows, br),),
        in_specs=[pl.BlockSpec((br, d), row_map)],
        out_specs=[
            pl.BlockSpec((br, d // 2), row_map),
            pl.BlockSpec((br, 1), row_map),
            pl.BlockSpec((br, 1), row_map),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((num_rows, d // 2), jnp.uint8),
            jax.ShapeDtypeStruct((num_rows, 1), jnp.float32),
            jax.ShapeDtypeStruct((num_rows, 1), jnp.float32),
        ],
        interpret=_tpu_interpret(interpret),
        name="quantize_int4_tpu",
    )(x.reshape(num_rows, d))
    return packed.reshape(*lead, d // 2), scale.reshape(lead), zero.reshape(lead)


@functools.partial(jax.jit, static_argnames=("interpret", "config"))
def dequantize_int4_tpu(
    packed, scale, zero, *, interpret: bool = False, config: Int4TpuConfig = DEFAULT_TPU_CONFIG
):
    """Pallas Mosaic TPU dequantizer; arguments and result as `dequantize_int4`."""
    lead, half = packed.shape[:-1], packed.shape[-1]
    num_rows = int(np.prod(lead, dtype=np.int64))
    if num_rows == 0:
        return dequantize_int4_reference(packed, scale, zero)
    br = _tpu_row_block(num_rows, config)
    row_map = lambda i: (i, 0)
    out = pl.pallas_call(
        _dequantize_tpu_kernel,
        grid=(pl.cdiv(num_rows, br),),
        in_specs=[
            pl.BlockSpec((br, half), row_map),
            pl.BlockSpec((br, 1), row_map),
            pl.BlockSpec((br, 1), row_map),
        ],
        out_specs=pl.BlockSpec((br, 2 * half), row_map),
        out_shape=jax.ShapeDtypeStruct((num_rows, 2 * half), jnp.float32),
        interpret=_tpu_interpret(interpret),
        name="dequantize_int4_tpu",
    )(packed.reshape(num_rows, half), scale.reshape(num_rows, 1), zero.reshape(num_rows, 1))
    return out.reshape(*lead, 2 * half)


def _window_page(b, j, pt_ref, lp0_ref, off_ref, cnt_ref, *, page_size: int, max_pages: int):
    """Physical page that window page j of sequence b writes to, or 0 when it writes nothing.

    Window page j is logical page lp0[b] + j; its slot s holds token j * S + s - off[b].
    """
    lpage = lp0_ref[b] + j
    first = j * page_size - off_ref[b]  # token in slot 0 (off < S, so slot S-1 is >= 0)
    live = (lpage >= 0) & (lpage < max_pages) & (first < cnt_ref[b])
    lclip = jnp.minimum(jnp.maximum(lpage, 0), max_pages - 1)
    return jnp.where(live, pt_ref[b * max_pages + lclip], 0)


def _pack_tpu_kernel(
    pt_ref,  # SMEM [B * max_pages] int32: page table, flattened
    lp0_ref,  # SMEM [B] int32: logical page of start[b]
    off_ref,  # SMEM [B] int32: slot of start[b]
    cnt_ref,  # SMEM [B] int32: tokens to write, clamped to [0, T]
    x_ref,  # [Hkv, S, D] float: window page j of sequence b, slot-aligned
    xt_ref,  # [Hkv, D, S] float: the same, transposed (scale/zero come out lane-major)
    q_in_ref,  # [Hkv, S, D/2] uint8: current bytes of the destination page
    s_in_hbm,  # ANY, aliased with s_hbm (not read)
    z_in_hbm,  # ANY, aliased with z_hbm
    q_ref,  # [Hkv, S, D/2] uint8: same block as q_in_ref (aliased buffer)
    s_hbm,  # ANY [Hkv, P, S] f32
    z_hbm,  # ANY [Hkv, P, S] f32
    s_buf,  # VMEM [Hkv, 1, S] f32
    z_buf,  # VMEM [Hkv, 1, S] f32
    sem,  # DMA semaphore
    *,
    page_size: int,
    max_pages: int,
    divide,
):
    del s_in_hbm, z_in_hbm
    b, j = pl.program_id(0), pl.program_id(1)
    page = _window_page(
        b, j, pt_ref, lp0_ref, off_ref, cnt_ref, page_size=page_size, max_pages=max_pages
    )
    first = j * page_size - off_ref[b]
    cnt = cnt_ref[b]
    half = q_ref.shape[2]

    # Always write the output block: when nothing lands here the block is the null page and
    # the merge keeps its bytes (every slot's token is then out of range or page == 0).
    tok = first + jax.lax.broadcasted_iota(jnp.int32, (1, page_size, 1), 1)
    ok = (tok >= 0) & (tok < cnt) & (page != 0)
    packed, _, _ = _quantize_halves(
        x_ref[:, :, :half].astype(jnp.float32),
        x_ref[:, :, half:].astype(jnp.float32),
        divide=divide,
    )
    q_ref[...] = jnp.where(ok, packed, q_in_ref[...].astype(jnp.int32)).astype(jnp.uint8)

    @pl.when(page != 0)
    def _scale_rows():
        xt = xt_ref[...].astype(jnp.float32)
        zero = xt.min(axis=1, keepdims=True)  # [Hkv, 1, S]; same values as _quantize_halves
        scale = divide(xt.max(axis=1, keepdims=True) - zero, 15.0)
        tok_l = first + jax.lax.broadcasted_iota(jnp.int32, (1, 1, page_size), 2)
        ok_l = (tok_l >= 0) & (tok_l < cnt)
        for new, hbm, buf in ((scale, s_hbm, s_buf), (zero, z_hbm, z_buf)):
            rows = hbm.at[:, pl.ds(page, 1), :]
            copy_in = pltpu.make_async_copy(rows, buf, sem)
            copy_in.start()
            copy_in.wait()
            buf[...] = jnp.where(ok_l, new, buf[...])
            copy_out = pltpu.make_async_copy(buf, rows, sem)
            copy_out.start()
            copy_out.wait()


@functools.partial(jax.jit, static_argnames=("interpret",))
def _pack_tpu(k_int4, k_scale, k_zero, k_new, page_table, start, count, *, interpret):
    """k_new [B, T, Hkv, D]: token t < count[b] goes to position start[b] + t."""
    hkv, num_pages, page_size, half = k_int4.shape
    batch, tokens = k_new.shape[:2]
    max_pages = page_table.shape[1]
    if batch * tokens == 0:
        return k_int4, k_scale, k_zero
    # T tokens starting anywhere in a page touch at most this many pages.
    window = pl.cdiv(tokens + page_size - 1, page_size)
    lp0 = jnp.floor_divide(start, page_size)
    off = jnp.mod(start, page_size)
    cnt = jnp.clip(count, 0, tokens)
    # Slot-align the new rows to their pages (one gather of k_new): row r of the window is
    # token r - off[b]. Out-of-range rows are clamped copies, masked in the kernel.
    src = jnp.clip(jnp.arange(window * page_size)[None, :] - off[:, None], 0, tokens - 1)
    x = jnp.take_along_axis(k_new, src[:, :, None, None], axis=1)  # [B, W*S, Hkv, D]
    x = x.reshape(batch, window, page_size, hkv, 2 * half)
    x_rows = x.transpose(0, 1, 3, 2, 4)  # [B, W, Hkv, S, D]
    x_cols = x.transpose(0, 1, 3, 4, 2)  # [B, W, Hkv, D, S]

    page_map = functools.partial(_window_page, page_size=page_size, max_pages=max_pages)
    page_block = pl.BlockSpec(
        (hkv, None, page_size, half), lambda b, j, *refs: (0, page_map(b, j, *refs), 0, 0)
    )
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    q, s, z = pl.pallas_call(
        functools.partial(
            _pack_tpu_kernel,
            page_size=page_size,
            max_pages=max_pages,
            divide=_kernel_divide("tpu", interpret),
        ),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(batch, window),
            in_specs=[
                pl.BlockSpec(
                    (None, None, hkv, page_size, 2 * half), lambda b, j, *_: (b, j, 0, 0, 0)
                ),
                pl.BlockSpec(
                    (None, None, hkv, 2 * half, page_size), lambda b, j, *_: (b, j, 0, 0, 0)
                ),
                page_block,
                any_spec,
                any_spec,
            ],
            out_specs=[page_block, any_spec, any_spec],
            scratch_shapes=[
                pltpu.VMEM((hkv, 1, page_size), jnp.float32),
                pltpu.VMEM((hkv, 1, page_size), jnp.float32),
                pltpu.SemaphoreType.DMA,
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct(k_int4.shape, jnp.uint8),
            jax.ShapeDtypeStruct(k_scale.shape, jnp.float32),
            jax.ShapeDtypeStruct(k_zero.shape, jnp.float32),
        ],
        # Inputs count the 4 scalar-prefetch operands first.
        input_output_aliases={6: 0, 7: 1, 8: 2},
        # Each real page is visited by exactly one step, so sequences may run on either core;
        # the window axis stays in order.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=_tpu_interpret(interpret),
        name="int4_pack_tpu",
    )(page_table.reshape(-1), lp0, off, cnt, x_rows, x_cols, k_int4, k_scale, k_zero)
    return q, s, z


def int4_pack_prefill_tpu(
    k_int4, k_scale, k_zero, k_new, page_table, start, count, *, interpret: bool = False
):
    """Pallas Mosaic TPU paged pack; arguments and result as `int4_pack_prefill`.

    Grid (B, pages a sequence's window touches); each step rewrites one page in place.
    """
    return _pack_tpu(k_int4, k_scale, k_zero, k_new, page_table, start, count, interpret=interpret)


def int4_pack_decode_tpu(
    k_int4, k_scale, k_zero, k_new, page_table, positions, *, interpret: bool = False
):
    """Pallas Mosaic TPU paged pack of one token per sequence; as `int4_pack_decode`."""
    count = (positions >= 0).astype(jnp.int32)
    return _pack_tpu(
        k_int4, k_scale, k_zero, k_new[:, None], page_table, positions, count, interpret=interpret
    )


# --------------------------------------------------------------------------------------------
# Public entries


def quantize_int4(x, *, backend: str = "auto"):
    """Per-row asymmetric INT4 quantization, two nibbles per byte (split halves).

    Args:
      x: [..., D] float32, bfloat16 or float16; D even.
      backend: "auto" | "pallas" | "pallas_gpu" | "pallas_tpu" | "reference"
        (pallas_kernels._common.resolve_backend).

    Returns:
      packed: [..., D // 2] uint8; byte j = n[j] | n[j + D/2] << 4.
      scale: [...] float32, (max - min) / 15 (0 for a constant row).
      zero: [...] float32, min of the row.
    """
    _check_quantize_args(x)
    impl, interpret = _common.resolve_backend(backend)
    if impl == "reference":
        return quantize_int4_reference(x)
    if impl == "gpu":
        return quantize_int4_gpu(x, interpret=interpret)
    return quantize_int4_tpu(x, interpret=interpret)


def dequantize_int4(packed, scale, zero, *, backend: str = "auto"):
    """Inverse of `quantize_int4`: x_hat = scale * n + zero.

    Args:
      packed: [..., D // 2] uint8 (split-halves nibble order).
      scale, zero: [...] float32 (packed's shape without its last dim).
      backend: as in `quantize_int4`.

    Returns:
      [..., D] float32.
    """
    _check_dequantize_args(packed, scale, zero)
    impl, interpret = _common.resolve_backend(backend)
    if impl == "reference":
        return dequantize_int4_reference(packed, scale, zero)
    if impl == "gpu":
        return dequantize_int4_gpu(packed, scale, zero, interpret=interpret)
    return dequantize_int4_tpu(packed, scale, zero, interpret=interpret)


def int4_pack_prefill(
    k_int4, k_scale, k_zero, k_new, page_table, start, count, *, backend: str = "auto"
):
    """Quantizes a block of new K rows per sequence into the paged INT4 cache.

    Args:
      k_int4: [num_kv_heads, num_pages, page_size, head_dim // 2] uint8.
      k_scale, k_zero: [num_kv_heads, num_pages, page_size] float32.
      k_new: [batch, T, num_kv_heads, head_dim] float32 / bfloat16 / float16, post-RoPE K.
      page_table: [batch, max_pages] int32, logical page -> physical page (0 = null page).
      start: [batch] int32, position of token 0 of k_new[b].
      count: [batch] int32, tokens of k_new[b] to write (t < count[b]; the rest is padding).
      backend: as in `quantize_int4`.

    Returns:
      (k_int4, k_scale, k_zero) with token t < count[b] of k_new[b] quantized at position
      start[b] + t. Writes at negative positions, past the page table, or to physical page 0
      are skipped. The Pallas kernels alias the cache: donate it under jit to update in place.
    """
    _check_prefill_args(k_int4, k_scale, k_zero, k_new, page_table, start, count)
    impl, interpret = _common.resolve_backend(backend)
    args = (k_int4, k_scale, k_zero, k_new, page_table, start, count)
    if impl == "reference":
        return int4_pack_prefill_reference(*args)
    if impl == "gpu":
        return int4_pack_prefill_gpu(*args, interpret=interpret)
    return int4_pack_prefill_tpu(*args, interpret=interpret)


def int4_pack_decode(
    k_int4, k_scale, k_zero, k_new, page_table, positions, *, backend: str = "auto"
):
    """Quantizes one new K row per sequence into the paged INT4 cache.

    Args:
      k_int4, k_scale, k_zero, page_table: as in `int4_pack_prefill`.
      k_new: [batch, num_kv_heads, head_dim] float32 / bfloat16 / float16.
      positions: [batch] int32 position of the new token; < 0 skips sequence b.
      backend: as in `quantize_int4`.

    Returns:
      (k_int4, k_scale, k_zero) updated at positions[b] (same skipping rules as prefill).
    """
    _check_decode_args(k_int4, k_scale, k_zero, k_new, page_table, positions)
    impl, interpret = _common.resolve_backend(backend)
    args = (k_int4, k_scale, k_zero, k_new, page_table, positions)
    if impl == "reference":
        return int4_pack_decode_reference(*args)
    if impl == "gpu":
        return int4_pack_decode_gpu(*args, interpret=interpret)
    return int4_pack_decode_tpu(*args, interpret=interpret)

"""INT4 K: per-row asymmetric quantization (quantize_int4) and its inverse (dequantize_int4).

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

The paged cache stores these rows (docs/kernel_api.md): the decode append kernel
(pallas_kernels.append) quantizes in its body with `_quantize_halves`, prefill writes scatter
the output of quantize_int4.

Kernels (leading dims flattened to rows):
- GPU (Triton): one program per block of rows, with masked loads and stores. A half row whose
  length is not a power of two (Triton's block rule) is padded and masked.
- TPU (Mosaic): a block of rows per grid step.
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

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


# Defaults (not swept: these kernels move a few MB at most and are not on the decode path):
#   GPU rows_per_block 32, num_warps 4: 32 rows of 128 values is 4K elements in registers
#       for 4 warps; a decode batch of 64 sequences x 8 KV heads is still 16 programs.
#   TPU rows_per_block 256: a multiple of 32 (uint8 packs 4 rows per 32-bit sublane).


@dataclasses.dataclass(frozen=True)
class Int4GpuConfig:
    """Triton launch knobs of quantize_int4 / dequantize_int4.

    rows_per_block: rows one program quantizes or dequantizes; a power of two.
    num_warps: a power of two. (The kernels have no loop, so no pipeline stages to set.)
    """

    rows_per_block: int = 32
    num_warps: int = 4

    def __post_init__(self):
        _common.check_pow2("Int4GpuConfig", "rows_per_block", self.rows_per_block)
        _common.check_pow2("Int4GpuConfig", "num_warps", self.num_warps)


@dataclasses.dataclass(frozen=True)
class Int4TpuConfig:
    """Mosaic knobs of quantize_int4 / dequantize_int4.

    rows_per_block: rows per grid step; a positive multiple of 32.
    """

    rows_per_block: int = 256

    def __post_init__(self):
        if self.rows_per_block <= 0 or self.rows_per_block % 32:
            raise ValueError(
                "Int4TpuConfig.rows_per_block must be a positive multiple of 32, "
                f"got {self.rows_per_block}"
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
    return _pack_nibbles(lo, hi, scale, zero, divide=divide), scale, zero


def _pack_nibbles(lo, hi, scale, zero, *, divide):
    """The bytes (i32) of columns lo, hi under a row's scale and zero (_quantize_halves)."""
    safe = jnp.where(scale > 0, scale, 1.0)

    def nibble(v):
        return jnp.clip(jnp.floor(divide(v - zero, safe) + 0.5), 0, 15).astype(jnp.int32)

    return nibble(lo) | (nibble(hi) << 4)


# --------------------------------------------------------------------------------------------
# GPU (Pallas Triton)


def _gpu_params(config: Int4GpuConfig):
    return plt.CompilerParams(num_warps=config.num_warps, num_stages=1)


def _half_cols(half: int):
    """Column iota [1, Hp] over the half row padded to a power of two (Triton block dims must
    be), and the mask of real columns (None when no padding is needed)."""
    padded = pl.next_power_of_2(half)
    col = jnp.arange(padded)[None, :]
    return col, (col < half if padded != half else None)


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
    r2, ok2 = row[:, None], _common.and_mask(ok[:, None], col_ok)
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
    r2, ok2 = row[:, None], _common.and_mask(ok[:, None], col_ok)
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


# --------------------------------------------------------------------------------------------
# TPU (Pallas Mosaic)


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
        interpret=_common.tpu_interpret(interpret),
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
        interpret=_common.tpu_interpret(interpret),
        name="dequantize_int4_tpu",
    )(packed.reshape(num_rows, half), scale.reshape(num_rows, 1), zero.reshape(num_rows, 1))
    return out.reshape(*lead, 2 * half)


# --------------------------------------------------------------------------------------------
# Public entries


def quantize_int4(x, *, backend: str = "auto", config: Int4GpuConfig | Int4TpuConfig | None = None):
    """Per-row asymmetric INT4 quantization, two nibbles per byte (split halves).

    Args:
      x: [..., D] float32, bfloat16 or float16; D even.
      backend: "auto" | "pallas" | "pallas_gpu" | "pallas_tpu" | "reference"
        (docs/kernel_api.md).
      config: Int4GpuConfig or Int4TpuConfig for the kernel that runs; None: the defaults.

    Returns:
      packed: [..., D // 2] uint8; byte j = n[j] | n[j + D/2] << 4.
      scale: [...] float32, (max - min) / 15 (0 for a constant row).
      zero: [...] float32, min of the row.
    """
    _check_quantize_args(x)
    return _common.implementation(
        backend,
        config,
        reference=quantize_int4_reference,
        gpu=(quantize_int4_gpu, DEFAULT_GPU_CONFIG),
        tpu=(quantize_int4_tpu, DEFAULT_TPU_CONFIG),
    )(x)


def dequantize_int4(
    packed,
    scale,
    zero,
    *,
    backend: str = "auto",
    config: Int4GpuConfig | Int4TpuConfig | None = None,
):
    """Inverse of `quantize_int4`: x_hat = scale * n + zero.

    Args:
      packed: [..., D // 2] uint8 (split-halves nibble order).
      scale, zero: [...] float32 (packed's shape without its last dim).
      backend, config: as in `quantize_int4`.

    Returns:
      [..., D] float32.
    """
    _check_dequantize_args(packed, scale, zero)
    return _common.implementation(
        backend,
        config,
        reference=dequantize_int4_reference,
        gpu=(dequantize_int4_gpu, DEFAULT_GPU_CONFIG),
        tpu=(dequantize_int4_tpu, DEFAULT_TPU_CONFIG),
    )(packed, scale, zero)

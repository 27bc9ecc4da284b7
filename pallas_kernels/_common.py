"""What every kernel module shares: backend resolution and dispatch, argument checks, small helpers.

Validation is kept apart from computation: each public entry calls these checks on concrete
shapes and dtypes (never on traced values) before it dispatches, so bad input raises a
``ValueError`` that names the argument instead of a tracing error from deep inside a kernel.

Dispatch: an entry ``op(..., backend=..., config=...)`` hands its reference and its kernels to
``implementation``, which resolves ``backend`` on the current platform and returns the one
function to call. Every op follows the same convention: a GPU config class and (where the op has
a TPU kernel) a TPU config class, frozen dataclasses whose defaults are the op's tuned defaults.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import operator
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

BACKENDS = ("auto", "pallas", "pallas_gpu", "pallas_tpu", "reference")
PLATFORMS = ("cpu", "gpu", "tpu")

_ASSUMED_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "pallas_kernels_assumed_platform", default=None
)


def platform() -> str:
    """The platform backends resolve on: "gpu", "tpu" or "cpu".

    That of JAX's default backend, unless an ``assume_platform`` block says otherwise.
    """
    assumed = _ASSUMED_PLATFORM.get()
    if assumed is not None:
        return assumed
    p = jax.default_backend()
    return "gpu" if p in ("gpu", "cuda", "rocm") else p


@contextlib.contextmanager
def assume_platform(name: str) -> Iterator[None]:
    """Inside the block, backends resolve as if JAX ran on ``name`` ("cpu", "gpu" or "tpu").

    For lowering checks on a host without the accelerator: under ``assume_platform("gpu")``,
    ``backend="auto"`` and ``"pallas"`` pick the native Triton kernels (not interpret mode), so
    ``jax.export`` for CUDA lowers the real kernels; running them still needs a GPU. Only the
    choice made at trace time changes: jit caches do not key on it, so a function traced under
    one platform is reused under another (``jax.clear_caches()`` between the two).
    """
    if name not in PLATFORMS:
        raise ValueError(f"name must be one of {PLATFORMS}, got {name!r}")
    token = _ASSUMED_PLATFORM.set(name)
    try:
        yield
    finally:
        _ASSUMED_PLATFORM.reset(token)


def resolve_backend(backend: str) -> tuple[str, bool]:
    """Maps a public ``backend`` argument to (implementation, interpret).

    implementation is "reference", "gpu" or "tpu"; interpret is True when the Pallas kernel has
    to run in interpret mode because the platform cannot run it natively. "auto" is the native
    kernel on a GPU or TPU and the reference elsewhere; "pallas" is the kernel written for the
    platform (on CPU the GPU kernel, interpreted).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    plat = platform()
    if backend == "reference" or (backend == "auto" and plat not in ("gpu", "tpu")):
        return "reference", False
    if backend == "pallas_tpu":
        return "tpu", plat != "tpu"
    if backend == "pallas_gpu":
        return "gpu", plat != "gpu"
    if plat == "tpu":
        return "tpu", False
    return "gpu", plat != "gpu"


def implementation(
    backend: str,
    config,
    *,
    reference: Callable,
    gpu: tuple[Callable, object] | None = None,
    tpu: tuple[Callable, object] | None = None,
) -> Callable:
    """The function an op's public entry calls for ``backend`` and ``config``.

    Args:
      backend: the entry's ``backend`` argument (``resolve_backend``).
      config: the entry's ``config`` argument: None (the kernel's default) or an instance of
        the op's GPU or TPU config class.
      reference: the op's jnp reference, called with the op's arguments.
      gpu, tpu: ``(kernel, default_config)`` of the op's Pallas kernel for that platform; the
        kernel is called with the op's arguments plus ``config=`` and ``interpret=``. None where
        the op has no such kernel: the reference runs there.

    Returns:
      The reference, or the kernel with its config and interpret mode bound.

    Raises ValueError when ``config`` is none of the op's config classes, or is the other
    platform's config for the kernel that runs (a tuning run would otherwise time the defaults
    without a word). The reference ignores ``config``.
    """
    impl, interpret = resolve_backend(backend)
    kinds = tuple(type(default) for _, default in filter(None, (gpu, tpu)))
    if config is not None and not isinstance(config, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"config must be None or a {names}, got {type(config).__name__}")
    chosen = {"gpu": gpu, "tpu": tpu}.get(impl)
    if chosen is None:
        return reference
    kernel, default = chosen
    if config is None:
        config = default
    elif not isinstance(config, type(default)):
        raise ValueError(
            f"config is a {type(config).__name__}, but backend={backend!r} runs the "
            f"{impl.upper()} kernel here, which takes a {type(default).__name__}"
        )
    return functools.partial(kernel, config=config, interpret=interpret)


def tpu_interpret(interpret: bool):
    """The ``interpret`` argument of a TPU ``pallas_call``: False, or parameters that simulate
    TPU semantics on CPU."""
    return pltpu.InterpretParams() if interpret else False


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def padded_iota(n: int):
    """(iota [Np], mask [Np] of the entries < n, or None when Np == n), Np the power of two >= n.

    Triton block dims must be powers of two: a kernel spans a dim of n by Np lanes and masks
    the extra ones out of its loads, stores and reductions.
    """
    padded = pl.next_power_of_2(n)
    i = jnp.arange(padded)
    return i, (i < n if padded != n else None)


def and_mask(mask, extra):
    """mask & extra, where extra may be None (nothing to mask)."""
    return mask if extra is None else mask & extra


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_pow2(owner: str, name: str, value, minimum: int = 1) -> None:
    """A config field that must be a power of two >= minimum (Triton block dims are)."""
    if not _is_int(value) or value < minimum or not is_pow2(int(value)):
        raise ValueError(f"{owner}.{name} must be a power of two >= {minimum}, got {value!r}")


def check_positive(owner: str, name: str, value) -> None:
    """A config field that must be an int >= 1."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{owner}.{name} must be an int >= 1, got {value!r}")


def check_rank(name: str, x, rank: int, layout: str) -> None:
    if np.ndim(x) != rank:
        raise ValueError(f"{name} must have rank {rank} ({layout}), got shape {tuple(np.shape(x))}")


def check_dim(name: str, x, axis: int, expected: int, what: str) -> None:
    got = np.shape(x)[axis]
    if got != expected:
        raise ValueError(
            f"{name} dimension {axis} ({what}) must be {expected}, got {got} "
            f"(shape {tuple(np.shape(x))})"
        )


def check_dtype(name: str, x, allowed: Sequence) -> None:
    dt = np.dtype(x.dtype)
    if not any(dt == np.dtype(a) for a in allowed):
        names = ", ".join(str(np.dtype(a)) for a in allowed)
        raise ValueError(f"{name} must have dtype in ({names}), got {dt}")


# Pallas Triton indexes an array of at most 2**32 bytes with signed 32-bit element offsets
# (jax's lowering picks 64 bits only above that size): for one-byte elements, offsets from
# 2**31 up wrap around and address memory outside the array, silently.
TRITON_I32_ELEMENTS = 2**31


def triton_offsets_overflow(x) -> bool:
    """Whether a GPU kernel indexing x element by element would hit that wrap-around."""
    itemsize = np.dtype(x.dtype).itemsize
    return itemsize == 1 and TRITON_I32_ELEMENTS <= int(np.prod(np.shape(x))) <= 2**32


def check_triton_offsets(name: str, x, remedy: str) -> None:
    """A clear error instead of the wrong addresses of triton_offsets_overflow."""
    if triton_offsets_overflow(x):
        raise ValueError(
            f"{name} holds {int(np.prod(np.shape(x)))} one-byte elements: the Pallas Triton "
            "kernel would index it with 32-bit offsets, which overflow from 2**31 on "
            f"(wrong addresses, silently); {remedy}"
        )


def check_static_p(p) -> None:
    """Checks a Python-number p; traced or array p is checked only for shape by callers."""
    if isinstance(p, (int, float)) and not (0.0 < float(p) <= 1.0):
        raise ValueError(f"p must be in (0, 1], got {p}")


# --------------------------------------------------------------------------------------------
# Tensor-core dots in Triton kernels


def bf16_terms(x, split_f32: bool):
    """x [M, K] in the input's dtype -> bf16 terms whose sum is x (to ~2^-17 for f32).

    bf16 x is one exact term. f32 x is split as hi + lo (lo carries the next 8 mantissa bits):
    two tensor-core dots instead of an IEEE f32 dot on CUDA cores.
    """
    hi = x.astype(jnp.bfloat16)
    if not split_f32:
        return [hi]
    return [hi, (x.astype(jnp.float32) - hi.astype(jnp.float32)).astype(jnp.bfloat16)]


def f16_terms(x, split: bool):
    """x [M, K] float32 with |x| < 2 (the caller scales it by a power of two) -> float16 terms
    whose sum is x to within max(2^-22 |x|, 2^-25) per element.

    hi = f16(x) holds 11 significant bits and lo = f16(x - hi) the next 11 (x - hi is exact in
    float32); what is left is under half an ulp of lo, or under half of f16's smallest
    subnormal 2^-24 where lo (or hi, for |x| < 2^-14) is subnormal. Products of f16 terms with
    codes of up to 8 bits are exact in a float32 accumulator.

    split=False returns [hi] alone, for x holding bfloat16 values (8 significant bits): such an
    x is exact in f16 when |x| >= 2^-17 (its last bit is >= 2^-24), and otherwise hi is off by
    at most 2^-25, which lo would not recover (f16(r) = 0 for |r| <= 2^-25, ties to even): one
    term is as precise as two.
    """
    hi = x.astype(jnp.float16)
    if not split:
        return [hi]
    return [hi, (x - hi.astype(jnp.float32)).astype(jnp.float16)]


def add_all(xs):
    return functools.reduce(operator.add, xs)


def dot_nt(a, b):
    """a [M, K] . b [N, K]^T with float32 accumulation (pl.dot is gone in jax >= 0.11)."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


# --------------------------------------------------------------------------------------------
# Inline PTX on packed words


def prmt_selector(k: int) -> int:
    """prmt.b32 selector that puts byte k of the first word in byte 0 and byte k of the second
    word in byte 2 (bytes 1 and 3 repeat them; they are masked off)."""
    return k | (k << 4) | ((4 + k) << 8) | ((4 + k) << 12)


def bisect_bits(passes, lo, hi, iters):
    """Halves the int32 interval [lo, hi) ``iters`` times towards the largest value that
    passes: lo is known (assumed) to pass, hi to fail. passes maps an int32 candidate (shaped
    like lo) to a bool of that shape and must be monotone (true up to the answer, false above).
    The midpoint lo + (hi - lo) / 2 uses a logical shift of the difference, so spans up to
    2**32 - 1 (wrapping in int32) halve exactly. iters may be traced. Returns (lo, hi).
    """

    def step(_, carry):
        lo, hi = carry
        mid = lo + jax.lax.shift_right_logical(hi - lo, 1)
        ok = passes(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    return jax.lax.fori_loop(0, iters, step, (lo, hi))

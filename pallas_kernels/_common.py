"""Backend resolution and argument checks shared by every kernel module.

Validation is kept apart from computation: each public entry calls these checks on concrete
shapes and dtypes (never on traced values) before it dispatches, so bad input raises a
``ValueError`` that names the argument instead of a tracing error from deep inside a kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

BACKENDS = ("auto", "pallas", "pallas_gpu", "pallas_tpu", "reference")


def platform() -> str:
    """The default JAX backend's platform: "gpu", "tpu" or "cpu"."""
    p = jax.default_backend()
    return "gpu" if p in ("gpu", "cuda", "rocm") else p


def resolve_backend(backend: str) -> tuple[str, bool]:
    """Maps a public ``backend`` argument to (implementation, interpret).

    implementation is "reference", "gpu" or "tpu"; interpret is True when the Pallas kernel has
    to run in interpret mode because the platform cannot run it natively.
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
    # "auto" on an accelerator, or "pallas": the kernel written for this platform.
    if plat == "tpu":
        return "tpu", False
    return "gpu", plat != "gpu"


def tpu_interpret_params():
    """Interpret-mode parameters that simulate TPU semantics on CPU."""
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams()


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


def check_divides(name: str, value: int, divisor_name: str, divisor: int) -> None:
    if divisor <= 0 or value % divisor != 0:
        raise ValueError(f"{name}={value} must be a multiple of {divisor_name}={divisor}")


def check_static_p(p) -> None:
    """Checks a Python-number p; traced or array p is checked only for shape by callers."""
    if isinstance(p, (int, float)) and not (0.0 < float(p) <= 1.0):
        raise ValueError(f"p must be in (0, 1], got {p}")

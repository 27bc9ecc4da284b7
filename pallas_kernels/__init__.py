"""Pallas kernels for Twilight sparse decode attention (GPU via Triton lowering, TPU via Mosaic).

Layouts and entry points: docs/kernel_api.md. Every op has ``op(..., backend="auto")``, a jnp
``op_reference``, ``op_gpu`` and ``op_tpu``.
"""

from pallas_kernels.int4 import dequantize_int4, quantize_int4  # noqa: F401
from pallas_kernels.topp import topp_select, topp_select_grouped, topp_threshold  # noqa: F401

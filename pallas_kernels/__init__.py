"""Pallas kernels for Twilight sparse decode attention (GPU via Triton lowering, TPU via Mosaic).

Layouts and entry points: docs/kernel_api.md. Every op has a public entry
``op(..., backend="auto", config=None)``, a jnp ``op_reference``, and Pallas kernels ``op_gpu`` /
``op_tpu`` (TPU ones where the op has a TPU kernel). ``config`` takes the op's GPU or TPU config
class (``QuestGpuConfig`` / ``QuestTpuConfig``, ...), whose defaults are the tuned ones, listed
in one table per op with the file of their measurements; ``_common.implementation`` resolves
backend and config for every entry.

Modules: one per op (int4, append, quest, spgemv, topp, topk, attention); an op whose kernels
would make it long keeps its entry, references and checks there and its kernels in
``op_gpu`` / ``op_tpu`` (attention, spgemv, topp; topp's shared search and configs in
topp_common).

``BACKENDS`` are the values every entry's ``backend`` takes; ``assume_platform`` makes backend
resolution act as on another platform (for lowering checks on a host without it).
"""

from pallas_kernels._common import BACKENDS, assume_platform  # noqa: F401
from pallas_kernels.int4 import dequantize_int4, quantize_int4  # noqa: F401
from pallas_kernels.topp import topp_select, topp_select_grouped, topp_threshold  # noqa: F401

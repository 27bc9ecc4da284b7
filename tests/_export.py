"""Lowering checks that need no accelerator.

``export_tpu`` runs Mosaic TPU lowering (rejects bad block shapes). ``export_cuda`` runs the
Pallas Triton lowering to Triton IR (catches unsupported ops) and runs the MLIR verifier over
each Triton module (catches ill-typed IR, e.g. loop bounds of two integer types, which the GPU
backend would reject only when it parses the module); the PTX compile still needs a GPU.
"""

import contextlib
import re

import jax
from jax._src.pallas.triton import pallas_call_registration as _triton_registration

_TRITON_CALL = "__gpu$xla.gpu.triton"
# The pallas_call name in the backend config of a Triton call (after its IR) and of a Mosaic
# TPU call.
_KERNEL_NAME = re.compile(r'(?:\bname = "([^"]+)", num_stages|\bkernel_name = "([^"]+)")')


def export_tpu(fn, *args, **kwargs):
    return jax.export.export(jax.jit(fn, **kwargs), platforms=["tpu"])(*args)


@contextlib.contextmanager
def _verified_triton_modules():
    """Runs the MLIR verifier on every Triton module lowered inside the block (a private hook
    of jax's Pallas Triton lowering: where it is missing, modules go unverified)."""
    lowering = getattr(_triton_registration, "lowering", None)
    lower = getattr(lowering, "lower_jaxpr_to_triton_module", None)
    if lower is None:
        yield
        return

    def verified(*args, **kwargs):
        result = lower(*args, **kwargs)
        with result.module.context:
            result.module.operation.verify()
        return result

    lowering.lower_jaxpr_to_triton_module = verified
    try:
        yield
    finally:
        lowering.lower_jaxpr_to_triton_module = lower


def export_cuda(fn, *args, **kwargs):
    with _verified_triton_modules():
        return jax.export.export(
            jax.jit(fn, **kwargs),
            platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(_TRITON_CALL)],
        )(*args)


def pallas_kernels_called(module_text: str) -> list[str]:
    """The pallas_call names of the Pallas kernels an exported module calls, one entry per call
    site, sorted: what a test compares to the exact list of kernels it expects."""
    names = [a or b for a, b in _KERNEL_NAME.findall(module_text)]
    calls = module_text.count(_TRITON_CALL) + module_text.count("tpu_custom_call")
    assert len(names) == calls, f"{calls} kernel calls but {len(names)} names: {names}"
    return sorted(names)


def default_model_shapes(num_layers: int = 3):
    """A LlamaConfig with the embedded default's attention and MLP shapes (SmolLM2-135M: 9 query
    / 3 KV heads, head_dim 64, hidden 576, intermediate 1536), few layers and a small vocab,
    for lowering checks of the whole model."""
    import models

    return models.LlamaConfig(
        vocab_size=512,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=num_layers,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
    )

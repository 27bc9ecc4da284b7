"""Lowering checks that need no accelerator.

``export_tpu`` runs Mosaic TPU lowering (rejects bad block shapes). ``export_cuda`` runs the
Pallas Triton lowering to Triton IR (catches unsupported ops); the PTX compile still needs a GPU.
"""

import jax

_TRITON_CALL = "__gpu$xla.gpu.triton"


def export_tpu(fn, *args, **kwargs):
    return jax.export.export(jax.jit(fn, **kwargs), platforms=["tpu"])(*args)


def export_cuda(fn, *args, **kwargs):
    return jax.export.export(
        jax.jit(fn, **kwargs),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(_TRITON_CALL)],
    )(*args)

"""The model's programs copy no weights and no page pool, on this backend (CPU in CI)."""

import jax.numpy as jnp
import model_memory_checks as mm
from _hlo import weight_shaped
from flax import nnx

from models import LlamaForCausalLM


def test_detector_sees_a_stacked_weight_slice():
    text, shape = mm.stacked_scan_program(mm.small_config(), jnp.float32)
    assert weight_shaped(text, [shape]), "the check would miss a per-layer weight copy"


def test_programs_copy_no_weights_or_pages():
    model = LlamaForCausalLM(mm.small_config(), dtype=jnp.float32, rngs=nnx.Rngs(0))
    # Decode runs the jnp references on CPU, which gather each sequence's K/V (the GPU and TPU
    # kernels read pages in place): its temporaries are only checked on the GPU.
    mm.check_programs(
        model,
        batch=3,
        max_seq_len=16384,
        chunk=40,
        temp_fraction=0.05,
        skip_temp=("decode dense", "decode twilight/quest"),
    )

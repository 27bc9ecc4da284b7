"""The model's jitted programs on a GPU, compiled natively: no weight-sized copy in the decode
step or prefill (every layer's matmuls read its weights in place), and no temporary above 5%
of the KV cache (no copy of the page pool). Skipped without a GPU."""

import jax
import jax.numpy as jnp
import model_memory_checks as mm
import pytest
from flax import nnx

from models import LlamaForCausalLM
from pallas_kernels import append

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU"),
]


@pytest.mark.parametrize("word_stores", [None, True], ids=["default", "words"])
def test_programs_copy_no_weights_or_pages_on_gpu(word_stores, monkeypatch):
    # "words": the decode append stores the INT4 codes as 4-byte words, as it does for pools
    # of 2**31 to 2**32 code bytes: the views of the pool around it must stay free.
    monkeypatch.setattr(
        append, "DEFAULT_GPU_CONFIG", append.AppendGpuConfig(word_stores=word_stores)
    )
    config = mm.small_config(hidden=1024, heads=8, kv_heads=2, head_dim=128, inter=2816)
    model = LlamaForCausalLM(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    # 5.2 GB of cache: the fixed workspaces of cuBLAS and cuDNN (~110 MB) stay under 5%.
    mm.check_programs(model, batch=8, max_seq_len=131072, chunk=200, temp_fraction=0.05)

"""The whole model's prefill and decode step lower for TPU (Mosaic) and CUDA (Pallas Triton).

The kernel tests export each kernel alone; this exports the jitted model entry points at the
embedded default's attention shapes (9 query / 3 KV heads, head_dim 64, bf16, page 16), so a
layout the kernels accept alone but not inside the model (the cache's layer pool, the INT4
writes, Quest refreshes) fails here rather than on the accelerator.
"""

import contextlib

import jax
import jax.numpy as jnp
import pytest
from _export import default_model_shapes, export_cuda, export_tpu
from flax import nnx

import models
from pallas_kernels import assume_platform
from twilight_jax import SparsityConfig

CONFIG = default_model_shapes()
B = 4
SPARSITY = {
    "dense": SparsityConfig(selector="dense"),
    "twilight_all": SparsityConfig(selector="all", top_p=0.95, max_budget=256, dense_layers=1),
    "twilight_quest": SparsityConfig(
        selector="quest", budget=256, top_p=0.95, max_budget=128, dense_layers=1
    ),
}
MARKER = {"tpu": "tpu_custom_call", "gpu": "xla.gpu.triton"}
# The kernels each program must contain, by pallas_call name. On a TPU the decode append is XLA
# scatters (pallas_kernels.append), so its dense step holds only the attention kernel.
KERNELS = {
    ("gpu", "prefill"): {"quantize_int4_gpu"},
    ("tpu", "prefill"): {"quantize_int4_tpu"},
    ("gpu", "dense"): {"cache_append_decode_gpu", "paged_decode_attention"},
    ("tpu", "dense"): {"paged_decode_attention_tpu"},
}
SPARSE_KERNELS = {
    "gpu": {"block_spgemv_gpu", "topp_select_gpu", "sparse_decode_attention"},
    "tpu": {"block_spgemv_tpu", "topp_select_tpu", "sparse_decode_attention_tpu"},
}


@pytest.fixture(scope="module")
def jitted():
    model = models.LlamaForCausalLM(CONFIG, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    return model.jit()


@pytest.fixture
def on_platform():
    """Makes backend="auto" pick the kernels of `platform` (pallas_kernels.assume_platform);
    traces of the other platform's kernels are dropped from jax's caches before and after
    (they would be reused)."""
    with contextlib.ExitStack() as stack:

        def set_platform(platform):
            jax.clear_caches()
            stack.enter_context(assume_platform(platform))

        yield set_platform
    jax.clear_caches()


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_model_entry_points_lower(jitted, on_platform, platform):
    on_platform(platform)
    export = export_tpu if platform == "tpu" else export_cuda
    cache = jitted.init_cache(B, 1024)
    state = jitted.state

    def prefill(state, ids, lengths, cache):
        return nnx.merge(jitted.graphdef, state).prefill(ids, lengths, cache)

    text = export(
        prefill, state, jnp.zeros((B, 128), jnp.int32), jnp.full((B,), 100, jnp.int32), cache
    ).mlir_module()
    assert MARKER[platform] in text
    for kernel in KERNELS[platform, "prefill"]:
        assert kernel in text, f"prefill has no {kernel}"
    for name, sparsity in SPARSITY.items():

        def step(state, tokens, cache, sparsity=sparsity):
            return nnx.merge(jitted.graphdef, state).decode_step(tokens, cache, sparsity)

        text = export(step, state, jnp.zeros((B,), jnp.int32), cache).mlir_module()
        want = KERNELS[platform, "dense"] | (set() if name == "dense" else SPARSE_KERNELS[platform])
        if name == "twilight_quest":
            want |= {f"quest_page_scores_{platform}"}
        missing = sorted(k for k in want if k not in text)
        assert not missing, f"{name} decode step has no {missing}"

"""Checks of twilight_jax.sharding on several (forced) CPU devices.

Not collected by default (the name does not start with test_): tests/test_sharding.py runs this
file in a pytest subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4, since the
device count is fixed when jax starts.
"""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.tiny import tiny_random_model, tiny_tokenizer
from twilight_jax import SparsityConfig, generate
from twilight_jax.sharding import HEADS, head_mesh

pytestmark = pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 (forced) devices")

B, T, CTX = 2, 40, 64
LENGTHS = np.array([40, 23], np.int32)
CONFIGS = {
    "dense": SparsityConfig(selector="dense"),
    "twilight_all": SparsityConfig(
        selector="all", top_p=0.6, dense_layers=1, max_budget=64, sink_tokens=1, recent_tokens=1
    ),
    "twilight_quest": SparsityConfig(
        selector="quest", budget=32, top_p=0.6, dense_layers=1, max_budget=64
    ),
    "twilight_all_per_head": SparsityConfig(
        selector="all", top_p=0.8, dense_layers=1, max_budget=64, gqa="per_head"
    ),
    "double_sparsity": SparsityConfig(
        selector="double_sparsity", budget=16, top_p=0.6, dense_layers=1, ds_channels=4
    ),
}


@pytest.fixture(scope="module")
def models_pair():
    ref, _, _ = tiny_random_model(0)  # 4 query heads, 2 KV heads
    shd, _, _ = tiny_random_model(0)
    shd.shard(head_mesh(2))
    return ref.jit(), shd.jit()


def _caches(ref, shd, cfg):
    extra = {}
    if cfg.selector == "double_sparsity":
        extra["ds_channels"] = cfg.ds_channels
    rc = ref.init_cache(B, CTX, **extra)
    sc = shd.init_cache(B, CTX, **extra)
    if extra:
        c = ref.config
        rng = np.random.default_rng(3)
        idx = np.sort(
            np.stack(
                [
                    np.stack(
                        [rng.choice(c.head_dim, cfg.ds_channels, replace=False) for _ in range(2)]
                    )
                    for _ in range(c.num_layers)
                ]
            ),
            axis=-1,
        ).astype(np.int32)
        rc, sc = rc.with_ds_channels(idx), shd.place_cache(sc.with_ds_channels(idx))
    return rc, sc


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_devices_decode_like_one(models_pair, name):
    ref, shd = models_pair
    cfg = CONFIGS[name]
    rc, sc = _caches(ref, shd, cfg)
    assert sc.k_pages.sharding.spec == jax.sharding.PartitionSpec(HEADS)
    ids = np.random.default_rng(0).integers(0, 250, (B, T)).astype(np.int32)
    l1, rc = ref.prefill(ids, LENGTHS, rc)
    l2, sc = shd.prefill(ids, LENGTHS, sc)
    np.testing.assert_allclose(np.asarray(l2), np.asarray(l1), atol=1e-5)
    tok = np.array([3, 7], np.int32)
    for _ in range(4):
        l1, rc, i1 = ref.decode_step(tok, rc, cfg)
        l2, sc, i2 = shd.decode_step(tok, sc, cfg)
        np.testing.assert_allclose(np.asarray(l2), np.asarray(l1), atol=1e-5)
        for key in ("counts", "candidates", "saturated"):
            got, want = getattr(i2, key), getattr(i1, key)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=key)
        np.testing.assert_allclose(
            np.asarray(i2.estimated_mass), np.asarray(i1.estimated_mass), atol=1e-5
        )
        # Each device still holds its KV heads of the cache (no gather back to one device).
        assert sc.k_pages.sharding.spec == jax.sharding.PartitionSpec(HEADS)
        assert len(sc.k_pages.addressable_shards) == 2
        assert sc.k_pages.addressable_shards[0].data.shape[0] == 1
        tok = np.asarray(jnp.argmax(l1, -1)).astype(np.int32)
    if cfg.selector != "dense":
        pruned = np.asarray(i1.counts)[1:] < np.asarray(i1.candidates)[1:]
        assert pruned.any(), (
            "the sparse layers pruned nothing: the check would not see a head mix-up"
        )


def test_decode_step_moves_no_cache_between_devices(models_pair):
    _, shd = models_pair
    cfg = CONFIGS["twilight_all"]
    cache = shd.init_cache(B, CTX)
    tok = jnp.zeros((B,), jnp.int32)
    hlo = shd.lower_decode_step(tok, cache, cfg).compile().as_text()
    ops = collections.Counter(
        m.group(1)
        for m in re.finditer(
            r"(all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)(?:-start)?\(",
            hlo,
        )
    )
    # One all-reduce of the [B, 1, hidden] residual after the attention output projection and
    # one after the MLP, per layer (the layer loop is unrolled in the program): nothing else,
    # so no cache, query or selection crosses devices.
    assert ops == {"all-reduce": 2 * shd.config.num_layers}, ops
    hidden = shd.config.hidden_size
    shapes = set(re.findall(r"= (\S+) all-reduce(?:-start)?\(", hlo))
    assert shapes == {f"f32[{B},1,{hidden}]{{2,1,0}}"}, shapes


def test_generate_on_two_devices_equals_one():
    tok = tiny_tokenizer()
    ref, _, _ = tiny_random_model(1)
    shd, _, _ = tiny_random_model(1)
    shd.shard(head_mesh(2))
    kw = dict(max_new_tokens=6, sparsity=CONFIGS["twilight_all"], chat=False, stop_on_eos=False)
    a = generate(ref, tok, ["hello there", "a b c"], **kw)
    b = generate(shd, tok, ["hello there", "a b c"], **kw)
    assert a.token_ids == b.token_ids
    # Chunked prefill: each device's chunk attends to its heads of the cached tokens.
    c = generate(shd, tok, ["hello there", "a b c"], prefill_chunk=4, **kw)
    assert c.token_ids == a.token_ids


def test_device_count_must_divide_the_heads():
    model, _, _ = tiny_random_model(0)  # 2 KV heads
    with pytest.raises(ValueError, match=r"4 devices must divide the KV heads \(2\)"):
        model.shard(head_mesh(4))
    assert model.mesh is None


def test_server_with_two_devices_serves_like_one():
    from twilight_jax.runtime.serve import build_parser, build_server
    from twilight_jax.runtime.serving import SamplingParams

    common = ["--model", "tiny-random", "--max-batch", "2", "--max-seq-len", "128"]
    common += ["--selector", "all", "--top-p", "0.8", "--dense-layers", "1"]
    prompts = [[5, 6, 7, 8, 9], list(range(20, 50)), [1, 2, 3]]
    params = [SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True) for _ in prompts]
    outs = []
    # The 2-device server also prefills the 30-token prompt in chunks of 8.
    for extra in (["--devices", "1"], ["--devices", "2", "--prefill-chunk", "8"]):
        devices = extra[1]
        _, engine = build_server(build_parser().parse_args(common + extra))
        engine.start()
        try:
            if devices == "2":
                spec = engine.cache.k_pages.sharding.spec
                assert spec == jax.sharding.PartitionSpec(HEADS), spec
            res = engine.generate(prompts, params)  # 3 requests, 2 slots: one waits
            outs.append([r.token_ids for r in res])
            assert engine.pages_free == engine.pages_total
        finally:
            engine.shutdown()
    assert outs[0] == outs[1] and all(len(t) == 5 for t in outs[0])


def test_full_sequence_logits_on_two_devices(models_pair):
    ref, shd = models_pair
    ids = np.random.default_rng(5).integers(0, 250, (2, 24)).astype(np.int32)
    np.testing.assert_allclose(np.asarray(shd.logits(ids)), np.asarray(ref.logits(ids)), atol=1e-5)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_three_way_split_of_the_default_model_shape_lowers(platform):
    """SmolLM2's 9 / 3 heads over 3 devices: each device's kernels see 1 KV head and a group
    of 3 query heads (not a power of two) and must still lower for TPU and CUDA."""
    from _export import default_model_shapes, export_cuda, export_tpu
    from flax import nnx

    import models
    from pallas_kernels import assume_platform

    model = models.LlamaForCausalLM(default_model_shapes(), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    jitted = model.shard(head_mesh(3)).jit()
    cache = jitted.init_cache(4, 1024)
    cfg = SparsityConfig(selector="quest", budget=256, top_p=0.95, max_budget=128, dense_layers=1)
    jax.clear_caches()  # traces made for the other platform's kernels would be reused
    export = export_tpu if platform == "tpu" else export_cuda

    def step(state, tokens, cache):
        return nnx.merge(jitted.graphdef, state).decode_step(tokens, cache, cfg)

    with assume_platform(platform):
        exported = export(step, jitted.state, jnp.zeros((4,), jnp.int32), cache)
    marker = "tpu_custom_call" if platform == "tpu" else "xla.gpu.triton"
    assert exported.nr_devices == 3 and marker in exported.mlir_module()
    jax.clear_caches()


def test_load_with_a_mesh_places_each_weight_on_its_devices():
    """The embedded SmolLM2 GGUF (9 / 3 heads) loaded straight onto 3 devices."""
    import models

    mesh = head_mesh(3)
    one, _, _ = models.load("smollm2-135m-instruct", progress=False)
    three, _, config = models.load("smollm2-135m-instruct", progress=False, mesh=mesh)
    assert three.mesh is mesh and one.mesh is None
    for layer in three.layers:
        q = layer.self_attn.q_proj.kernel[...]
        assert q.sharding.spec == jax.sharding.PartitionSpec(None, HEADS)
        assert q.addressable_shards[0].data.shape == (576, 3 * config.head_dim)
        down = layer.mlp.down_proj.kernel[...]
        assert down.addressable_shards[0].data.shape == (1536 // 3, 576)
    assert three.embed_tokens.embedding[...].sharding.spec == jax.sharding.PartitionSpec()
    ids = np.random.default_rng(2).integers(0, config.vocab_size, (1, 48)).astype(np.int32)
    np.testing.assert_allclose(
        np.asarray(three.jit().logits(ids)), np.asarray(one.jit().logits(ids)), atol=2e-4
    )
    with pytest.raises(models.ModelLoadError, match="2 devices must divide the KV heads"):
        models.load("smollm2-135m-instruct", progress=False, mesh=head_mesh(2))

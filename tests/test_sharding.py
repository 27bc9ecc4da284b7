"""twilight_jax.sharding: KV heads split across devices.

The multi-device checks (2 devices against 1: logits, selection counts, cache placement, the
decode step's collectives, generate) live in multidevice_checks.py and run here in a
subprocess with 4 forced CPU devices; this process has the one device jax started with.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from models.tiny import tiny_random_model
from twilight_jax import PagedKVCache, SparsityConfig
from twilight_jax.sharding import HEADS, cache_specs, check_heads, head_mesh, shard_cache

TESTS = Path(__file__).resolve().parent


def test_multidevice_checks_in_a_four_device_process():
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    }
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"]
        + [str(TESTS / "multidevice_checks.py")],
        capture_output=True,
        text=True,
        env=env,
        cwd=TESTS.parent,
        timeout=900,
    )
    tail = r.stdout[-4000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    assert "13 passed" in r.stdout and "skipped" not in r.stdout, tail


def test_head_mesh_and_divisibility_errors():
    n = len(jax.devices())
    assert head_mesh().size == n and head_mesh(1).axis_names == (HEADS,)
    with pytest.raises(ValueError, match=r"num_devices must be an int in \[1, "):
        head_mesh(n + 1)
    with pytest.raises(ValueError, match="num_devices"):
        head_mesh(0)
    with pytest.raises(ValueError, match="3 devices must divide the KV heads \\(2\\)"):
        check_heads(jax.sharding.Mesh(np.array(jax.devices()[:1] * 3), (HEADS,)), 4, 2)
    with pytest.raises(ValueError, match="one axis 'heads'"):
        check_heads(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",)), 4, 2)


def test_cache_specs_split_head_major_arrays_only():
    cache = PagedKVCache.create(2, 3, 2, 16, max_seq_len=32, page_size=16, ds_channels=4)
    specs = cache_specs(cache)
    heads = jax.sharding.PartitionSpec(HEADS)
    for f in ("k_pages", "v_pages", "k_int4", "k_scale", "k_zero", "k_min", "k_max", "ds_labels"):
        assert getattr(specs, f) == heads, f
    assert specs.page_table == jax.sharding.PartitionSpec() == specs.lengths
    assert specs.ds_channel_idx == jax.sharding.PartitionSpec(None, HEADS)
    placed = shard_cache(cache, head_mesh(1))
    assert placed.k_pages.sharding.spec == heads
    with pytest.raises(ValueError, match="cache must be a PagedKVCache"):
        shard_cache(np.zeros(3), head_mesh(1))


def test_one_device_mesh_runs_the_sharded_path_like_no_mesh():
    ref, _, _ = tiny_random_model(2)
    shd, _, _ = tiny_random_model(2)
    shd.shard(head_mesh(1))
    assert shd.mesh is not None and ref.mesh is None
    rj, sj = ref.jit(), shd.jit()
    cfg = SparsityConfig(selector="quest", budget=32, top_p=0.7, dense_layers=1, max_budget=64)
    ids = np.random.default_rng(1).integers(0, 250, (2, 33)).astype(np.int32)
    lengths = np.array([33, 20], np.int32)
    rc, sc = rj.init_cache(2, 64), sj.init_cache(2, 64)
    l1, rc = rj.prefill(ids, lengths, rc)
    l2, sc = sj.prefill(ids, lengths, sc)
    tok = np.array([1, 2], np.int32)
    for _ in range(2):
        l1, rc, i1 = rj.decode_step(tok, rc, cfg)
        l2, sc, i2 = sj.decode_step(tok, sc, cfg)
        np.testing.assert_allclose(np.asarray(l2), np.asarray(l1), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(i2.counts), np.asarray(i1.counts))
        tok = np.asarray(l1.argmax(-1)).astype(np.int32)


def test_cli_devices_flag_errors_in_one_line():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "generate_cli_sharding", TESTS.parent / "scripts" / "generate.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    n = len(jax.devices())
    with pytest.raises(mod.UsageError, match=f"--devices {n + 1}: num_devices must be"):
        mod.load_model("tiny-random", None, n + 1)

"""Serving beyond one accelerator: KV heads (and their query heads) split across devices.

A one-axis mesh named ``"heads"`` holds n devices. Device i keeps KV heads
[i * Hkv / n, (i + 1) * Hkv / n) of every layer in its part of the ``PagedKVCache`` (the cache's
arrays are head-major, so this is a split of their leading axis), together with the query
heads of those groups and the matching columns of the Q/K/V projections, rows of the output
projection and the MLP's intermediate units (Megatron-style tensor parallelism). Attention
then needs no communication at all: every (sequence, KV head) is independent in the selectors,
the INT4 estimate, the top-p pruner and the attention kernels, so the per-layer attention
(cache write + ``decode_attention``) runs under ``jax.shard_map`` on each device's heads, and
the Pallas kernels see ordinary local arrays. The projections are left to XLA's partitioner
(``jax.jit`` with sharded weights), which adds one all-reduce after the output projection and
one after the MLP of each layer. Page tables, lengths and everything per sequence are
replicated.

    mesh = head_mesh(2)                                   # the first 2 local devices
    model, tokenizer, config = models.load(name, mesh=mesh)   # or model.shard(mesh)
    cache = model.init_cache(batch, max_seq_len)          # split like the model
    cache = shard_cache(cache_made_elsewhere, mesh)       # the same for any PagedKVCache

Constraints: Hkv and Hq divisible by the device count.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from twilight_jax.cache import PagedKVCache

HEADS = "heads"

# PagedKVCache fields whose leading axis is the KV head; ds_channel_idx is [L, Hkv, C].
_HEAD_MAJOR = (
    "k_pages",
    "v_pages",
    "k_int4",
    "k_scale",
    "k_zero",
    "k_min",
    "k_max",
    "k_mm_scale",
    "ds_labels",
)


def head_mesh(num_devices: int | None = None, devices=None) -> Mesh:
    """A one-axis ``"heads"`` mesh over ``devices`` (default: the first ``num_devices`` of
    ``jax.devices()``, all of them when None)."""
    if devices is None:
        available = jax.devices()
        n = len(available) if num_devices is None else num_devices
        if not isinstance(n, int) or not 1 <= n <= len(available):
            raise ValueError(
                f"num_devices must be an int in [1, {len(available)}] (the devices of this "
                f"process: {len(available)} x {available[0].platform}), got {num_devices!r}"
            )
        devices = available[:n]
    return Mesh(np.asarray(devices), (HEADS,))


def check_heads(mesh: Mesh, num_heads: int, num_kv_heads: int) -> None:
    """ValueError unless the mesh is a "heads" mesh that divides both head counts."""
    if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != (HEADS,):
        raise ValueError(f"mesh must be a Mesh with the one axis {HEADS!r} (head_mesh), got {mesh}")
    n = mesh.size
    if num_kv_heads % n or num_heads % n:
        raise ValueError(
            f"{n} devices must divide the KV heads ({num_kv_heads}) and the query heads "
            f"({num_heads}); use a device count that divides {np.gcd(num_kv_heads, num_heads)}"
        )


def cache_specs(cache: PagedKVCache) -> PagedKVCache:
    """The cache's PartitionSpec tree: head-major arrays split on their leading axis,
    ds_channel_idx on its KV-head axis, page table and lengths replicated."""
    specs = {f: (None if getattr(cache, f) is None else P(HEADS)) for f in _HEAD_MAJOR}
    specs["page_table"] = P()
    specs["lengths"] = P()
    specs["ds_channel_idx"] = None if cache.ds_channel_idx is None else P(None, HEADS)
    return dataclasses.replace(cache, **specs)


def shard_cache(cache: PagedKVCache, mesh: Mesh) -> PagedKVCache:
    """The cache placed on the mesh by cache_specs (each device holds its KV heads)."""
    if not isinstance(cache, PagedKVCache):
        raise ValueError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
    n = mesh.size
    if cache.num_kv_heads % n:
        raise ValueError(f"{n} devices must divide the cache's KV heads ({cache.num_kv_heads})")
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), cache_specs(cache))
    return jax.device_put(cache, shardings)


def shard_attention(fn, mesh: Mesh, cache_spec, *, stats_specs=None):
    """``fn(q, k, v, layer, cache) -> (out, (cache, stats))`` run on each device's heads.

    q, out: [B, T, Hq, D]; k, v: [B, T, Hkv, D], all split on the head axis; layer: scalar;
    cache: split as ``cache_spec`` (cache_specs of the cache); stats: None, or a tuple of
    [B, heads] arrays split on axis 1 (``stats_specs`` gives their specs). Values fn closes
    over must be replicated (per-sequence arrays, static config).
    """
    heads4 = P(None, None, HEADS, None)
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(heads4, heads4, heads4, P(), cache_spec),
        out_specs=(heads4, (cache_spec, stats_specs)),
        # Pallas calls declare their outputs without a varying-axes annotation, which the
        # checker requires (jax: "manual_axis_type ... must not be None").
        check_vma=False,
    )

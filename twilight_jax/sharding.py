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

Beyond one process (several hosts, or one process per GPU): every process calls
``initialize_distributed`` first, then runs the same program. ``jax.devices()`` then lists the
devices of all processes, ``head_mesh()`` spans them, and each jitted step is one program over
the whole mesh that every process launches with the same host inputs; XLA's collectives
(NCCL between GPUs, gloo between CPU processes) carry the per-layer all-reduces. Arrays split
over several processes are read back with ``to_host``.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils
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


def initialize_distributed(
    coordinator_address: str,
    num_processes: int,
    process_id: int,
    *,
    initialization_timeout: int = 300,
) -> None:
    """Joins this process to a job of ``num_processes`` processes (``jax.distributed``).

    Every process calls it with the same ``coordinator_address`` ("host:port" where process 0
    listens; the other processes connect to it) and its own ``process_id`` in
    [0, num_processes), before anything uses a device. Afterwards ``jax.devices()`` lists the
    devices of every process and ``head_mesh()`` spans them. With one process it does nothing.
    Between CPU processes the collectives are gloo's (TCP). Waits up to
    ``initialization_timeout`` seconds for the others. Raises ValueError naming a bad argument.
    """
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be an int >= 1, got {num_processes!r}")
    if (
        isinstance(process_id, bool)
        or not isinstance(process_id, int)
        or not 0 <= process_id < num_processes
    ):
        raise ValueError(
            f"process_id must be an int in [0, {num_processes}) (num_processes="
            f"{num_processes}), got {process_id!r}"
        )
    if num_processes == 1:
        return
    host, sep, port = str(coordinator_address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"coordinator_address must be host:port (where process 0 listens, e.g. "
            f"10.0.0.1:1234), got {coordinator_address!r}"
        )
    if jax.config.jax_cpu_collectives_implementation is None:
        # Without it, a program spanning CPU processes fails to compile its collectives.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=initialization_timeout,
        )
    except RuntimeError as e:
        raise RuntimeError(
            f"jax.distributed did not start (process {process_id} of {num_processes}, "
            f"coordinator {coordinator_address}); it must run before anything uses a "
            f"device: {e}"
        ) from e
    # Every process waits here for all the others, and the collectives connect now: gloo
    # announces its connections on stdout (fd 1, from C++), which is the answer's stream in
    # scripts/generate.py, so that line goes to stderr.
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        multihost_utils.sync_global_devices("twilight_jax.sharding.initialize_distributed")
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def head_mesh(num_devices: int | None = None, devices=None) -> Mesh:
    """A one-axis ``"heads"`` mesh over ``devices`` (default: the first ``num_devices`` of
    ``jax.devices()``, all of them when None).

    Under jax.distributed (``initialize_distributed``), ``jax.devices()`` holds every process's
    devices and the mesh must take them all: each process runs its part of every step.
    """
    if devices is None:
        available = jax.devices()
        n = len(available) if num_devices is None else num_devices
        processes = jax.process_count()
        where = (
            f"the devices of this process: {len(available)} x {available[0].platform}"
            if processes == 1
            else f"the devices of all {processes} processes"
        )
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(available):
            raise ValueError(
                f"num_devices must be an int in [1, {len(available)}] ({where}), "
                f"got {num_devices!r}"
            )
        if processes > 1 and n != len(available):
            raise ValueError(
                f"num_devices must be {len(available)} ({where}) under jax.distributed: every "
                f"process runs its part of each step, so the mesh holds all their devices; "
                f"got {n}"
            )
        devices = available[:n]
    return Mesh(np.asarray(devices), (HEADS,))


def spans_processes(mesh: Mesh | None) -> bool:
    """Whether the mesh holds devices of other processes (its programs need all of them)."""
    return mesh is not None and any(
        d.process_index != jax.process_index() for d in np.asarray(mesh.devices).flat
    )


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


def to_host(x) -> np.ndarray:
    """The whole value of an array as numpy. An array split over devices of several processes
    (under jax.distributed) is gathered with ``multihost_utils.process_allgather``, a
    collective: every process must then call this for the same array, in the same order."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        return multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)

"""What the model's jitted programs write besides their outputs: no copy of a weight (the layer
loop must hand each layer's weights to its matmuls in place) and no temporary that grows with
the KV cache (a copy of the page pool). Run on CPU by tests/test_model_memory.py and natively
on a GPU by tests/test_gpu_model.py, through ``check_programs``."""

from __future__ import annotations

import _hlo
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import LlamaConfig
from twilight_jax import SparsityConfig

METHODS = {
    "dense": SparsityConfig(selector="dense"),
    "twilight/quest": SparsityConfig(
        selector="quest", budget=256, top_p=0.85, max_budget=128, dense_layers=1
    ),
}


def small_config(hidden=128, heads=4, kv_heads=2, head_dim=32, inter=384, layers=4):
    return LlamaConfig(
        vocab_size=300,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=1 << 16,
    )


def weight_shapes(model) -> list[tuple[int, ...]]:
    return [tuple(x.shape) for x in jax.tree.leaves(nnx.state(model.layers)) if x.ndim == 2]


def programs(jm, batch: int, max_seq_len: int, chunk: int):
    """(name, compiled program, cache bytes) of decode (each method), whole prefill and
    chunked prefill over one cache of ``max_seq_len`` tokens per sequence."""
    cache = jm.init_cache(batch, max_seq_len)
    cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))
    tokens = jnp.zeros((batch,), jnp.int32)
    ids = jnp.zeros((batch, chunk), jnp.int32)
    lengths = jnp.full((batch,), chunk, jnp.int32)
    out = []
    for name, cfg in METHODS.items():
        lowered = jm.lower_decode_step(tokens, cache, cfg)
        out.append((f"decode {name}", lowered.compile(), cache_bytes))
    for name, start in (("prefill", None), ("chunked prefill", lengths)):
        lowered = jm.lower_prefill(ids, lengths, cache, start)
        out.append((name, lowered.compile(), cache_bytes))
    return out


def check_programs(model, batch, max_seq_len, chunk, *, temp_fraction, skip_temp=()):
    """Asserts that no program writes a weight-shaped array and that each program's temporary
    memory is below temp_fraction of the cache (programs named in skip_temp: copies only)."""
    jm = model.jit()
    shapes = weight_shapes(model)
    cache = jm.init_cache(batch, max_seq_len)
    pool_shapes = {tuple(x.shape) for x in jax.tree.leaves(cache) if x.ndim >= 4}
    for name, compiled, cache_bytes in programs(jm, batch, max_seq_len, chunk):
        text = compiled.as_text()
        copies = _hlo.weight_shaped(text, shapes)
        assert not copies, f"{name} writes weight-sized arrays: {copies[:4]}"
        pool_copies = [
            f"{n} = {dt}{list(s)} {op}"
            for n, dt, s, op in _hlo.materialized(text)
            if s in pool_shapes and op == "copy"
        ]
        assert not pool_copies, f"{name} copies the page pool: {pool_copies[:4]}"
        if name in skip_temp:
            continue
        temp = compiled.memory_analysis().temp_size_in_bytes
        assert temp < temp_fraction * cache_bytes, (
            f"{name}: {temp / 1e6:.1f} MB of temporaries for a {cache_bytes / 1e6:.1f} MB cache"
        )


def stacked_scan_program(config, dtype):
    """A layer loop over weights stacked on a layer axis (what the model does not do): its
    compiled text, for checking that the copy detector sees the slices."""
    w = jnp.zeros((config.num_layers, config.hidden_size, config.intermediate_size), dtype)

    def f(w, x):
        def body(h, wl):
            return jnp.tanh(h @ wl) @ wl.T, None

        return jax.lax.scan(body, x, w)[0]

    x = jnp.zeros((3, config.hidden_size), dtype)
    return jax.jit(f).lower(w, x).compile().as_text(), np.shape(w)[1:]

"""Shared setup of the serving tests: one tiny random model, one engine shape.

Both serving test files build their engines with ``ENGINE`` and ``SPARSITY`` so the jitted
prefill (one length bucket), decode step and sampler compile once per pytest process.
"""

from __future__ import annotations

import functools
import threading
import time

import numpy as np

from models.tiny import tiny_random_model
from twilight_jax import SparsityConfig
from twilight_jax.runtime.serving import Engine, EngineConfig

# Twilight on the one sparse layer of three: every token a candidate, then top-p pruning.
SPARSITY = SparsityConfig(selector="all", top_p=0.9, max_budget=64, page_size=16)
# One prefill bucket (64) covers every prompt in the tests; context 128 = 8 pages a slot.
ENGINE = EngineConfig(max_batch=4, max_seq_len=128, max_queue=64, min_prefill_len=64)
MODEL_NAME = "tiny-random"


@functools.lru_cache(maxsize=1)
def tiny():
    """(jitted model, tokenizer, config), built once per process."""
    model, tokenizer, config = tiny_random_model(seed=0)
    return model.jit(), tokenizer, config


def make_engine(model=None, **overrides) -> Engine:
    jitted, tokenizer, _ = tiny()
    cfg = EngineConfig(**{**ENGINE.__dict__, **overrides})
    return Engine(model or jitted, tokenizer, SPARSITY, cfg)


class FaultyModel:
    """A DecodeModel that delegates to the jitted model, with faults and pauses on demand.

    fail_decode / fail_prefill: the next that many decode steps / prefills raise (before the
    call: the cache is intact). poison: a token id; a prefill whose tokens hold it raises, after
    running the call when ``poison_consumes_cache`` (its donated cache is then gone).
    gate: while clear, prefill blocks (holding the engine thread); ``in_prefill`` is set while
    a prefill waits on it. decode_gate / in_decode: the same for decode steps. step_delay:
    seconds of sleep per decode step.
    """

    def __init__(self, inner):
        self.inner = inner
        self.config = inner.config
        self.dtype = inner.dtype
        self.mesh = inner.mesh
        self.fail_decode = 0
        self.step_delay = 0.0
        self.fail_prefill = 0
        self.poison: int | None = None
        self.poison_consumes_cache = False
        self.gate = threading.Event()
        self.gate.set()
        self.in_prefill = threading.Event()
        self.decode_gate = threading.Event()
        self.decode_gate.set()
        self.in_decode = threading.Event()

    def jit(self):
        return self

    def init_cache(self, batch, max_seq_len, **kwargs):
        return self.inner.init_cache(batch, max_seq_len, **kwargs)

    def prefill(self, token_ids, lengths, cache, start=None):
        self.in_prefill.set()
        self.gate.wait(60)
        self.in_prefill.clear()
        if self.fail_prefill:
            self.fail_prefill -= 1
            raise RuntimeError("injected prefill fault")
        poisoned = self.poison is not None and bool((np.asarray(token_ids) == self.poison).any())
        if poisoned and not self.poison_consumes_cache:
            raise RuntimeError("injected prefill fault (poisoned prompt)")
        out = self.inner.prefill(token_ids, lengths, cache, start)
        if poisoned:
            raise RuntimeError("injected prefill fault (poisoned prompt, cache consumed)")
        return out

    def decode_step(self, tokens, cache, sparsity, active=None, top_p=None, backend="auto"):
        self.in_decode.set()
        self.decode_gate.wait(60)
        self.in_decode.clear()
        if self.fail_decode:
            self.fail_decode -= 1
            raise RuntimeError("injected decode fault")
        time.sleep(self.step_delay)
        return self.inner.decode_step(tokens, cache, sparsity, active, top_p, backend)

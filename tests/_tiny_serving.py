"""Shared setup of the serving tests: one tiny random model, one engine shape.

Both serving test files build their engines with ``ENGINE`` and ``SPARSITY`` so the jitted
prefill (one length bucket), decode step and sampler compile once per pytest process.
"""

from __future__ import annotations

import functools
import threading
import time

from twilight_jax import SparsityConfig
from twilight_jax.serving import Engine, EngineConfig

# Twilight on the one sparse layer of three: every token a candidate, then top-p pruning.
SPARSITY = SparsityConfig(selector="all", top_p=0.9, max_budget=64, page_size=16)
# One prefill bucket (64) covers every prompt in the tests; context 128 = 8 pages a slot.
ENGINE = EngineConfig(max_batch=4, max_seq_len=128, max_queue=64, min_prefill_len=64)
MODEL_NAME = "tiny-random"


@functools.lru_cache(maxsize=1)
def tiny():
    """(jitted model, tokenizer, config), built once per process."""
    from models import JittedLlama
    from twilight_jax.serve import tiny_random_model

    model, tokenizer, config = tiny_random_model(seed=0)
    return JittedLlama(model), tokenizer, config


def make_engine(model=None, **overrides) -> Engine:
    jitted, tokenizer, _ = tiny()
    cfg = EngineConfig(**{**ENGINE.__dict__, **overrides})
    return Engine(model or jitted, tokenizer, SPARSITY, cfg)


class FaultyModel:
    """Delegates to the jitted model. The next ``fail_decode`` decode steps and ``fail_prefill``
    prefills raise; while ``gate`` is clear, prefill blocks (holding the engine thread);
    ``step_delay`` slows every decode step down."""

    def __init__(self, inner):
        self.inner = inner
        self.config = inner.config
        self.dtype = inner.dtype
        self.fail_decode = 0
        self.step_delay = 0.0  # seconds of sleep per decode step: slow generation on demand
        self.fail_prefill = 0
        self.gate = threading.Event()
        self.gate.set()

    def prefill(self, *args):
        self.gate.wait(60)
        if self.fail_prefill:
            self.fail_prefill -= 1
            raise RuntimeError("injected prefill fault")
        return self.inner.prefill(*args)

    def decode_step(self, tokens, cache, sparsity, active=None, top_p=None):
        if self.fail_decode:
            self.fail_decode -= 1
            raise RuntimeError("injected decode fault")
        time.sleep(self.step_delay)
        return self.inner.decode_step(tokens, cache, sparsity, active, top_p=top_p)

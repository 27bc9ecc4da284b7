"""Twilight's top_p may be any real scalar (python, numpy, 0-d numpy / jax arrays) or a [B]
array, wherever it enters: decode_attention, the model's decode_step checks, and a serving
request's sparsity_top_p. Everything else is refused with a ValueError naming top_p."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import LlamaConfig
from models.checks import check_decode_args
from twilight_jax import PagedKVCache, SparsityConfig, decode_attention
from twilight_jax.runtime.serving import InvalidRequestError, SamplingParams

B, HQ, HKV, D, T, S = 2, 4, 2, 16, 32, 16

HALF = [
    np.float32(0.5),
    np.float64(0.5),
    np.float16(0.5),
    jnp.float32(0.5),
    jnp.asarray(0.5, jnp.bfloat16),
    jnp.asarray(0.5),
    np.asarray(0.5, np.float32),
    np.asarray([0.5, 0.5], np.float32),
]
ONE = [1, np.int64(1), np.int32(1), jnp.asarray(1), np.asarray(1)]
BAD = [
    (True, "real"),
    ("0.5", "real number"),
    (0.5 + 0j, "real number"),
    (np.complex64(0.5), "real"),
    (np.asarray([True, True]), "real"),
    (np.float32(1.5), r"must (be|lie) in \(0, 1\]"),
    (jnp.asarray(0.0), r"must (be|lie) in \(0, 1\]"),
    (2, r"must (be|lie) in \(0, 1\]"),
    (np.asarray([0.5, 0.5, 0.5]), r"scalar or a \[B=2\]"),
    (np.ones((2, 1)), r"scalar or a \[B=2\]"),
]


def _ids(values):
    return [f"{type(v).__name__}-{getattr(v, 'dtype', '')}-{np.shape(v)}" for v in values]


def _case():
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.standard_normal((B, T, HKV, D)), jnp.float32)
    cache = PagedKVCache.from_dense(k, k * 0.5, jnp.asarray([20, 32], jnp.int32), page_size=S)
    q = jnp.asarray(rng.standard_normal((B, HQ, D)) * 3, jnp.float32)
    cfg = SparsityConfig(selector="all", top_p=0.9, budget=T, max_budget=T, page_size=S)
    return q, cache, cfg


@pytest.mark.parametrize("p", HALF + ONE, ids=_ids(HALF + ONE))
def test_decode_attention_takes_any_real_scalar(p):
    q, cache, cfg = _case()
    want_p = 1.0 if any(p is x for x in ONE) else 0.5
    out, info = decode_attention(q, cache, cfg, top_p=p, backend="reference")
    ref, ref_info = decode_attention(q, cache, cfg, top_p=want_p, backend="reference")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(info.counts), np.asarray(ref_info.counts))


@pytest.mark.parametrize("p,match", BAD, ids=_ids([b for b, _ in BAD]))
def test_decode_attention_refuses_what_is_not_a_p(p, match):
    q, cache, cfg = _case()
    with pytest.raises(ValueError, match="top_p") as e:
        decode_attention(q, cache, cfg, top_p=p, backend="reference")
    assert re.search(match, str(e.value)), str(e.value)


def _decode_args():
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=HQ,
        num_kv_heads=HKV,
        head_dim=D,
        max_position_embeddings=T,
    )
    cache = PagedKVCache.create(1, B, HKV, D, max_seq_len=T, page_size=S)
    cfg = SparsityConfig(selector="all", top_p=0.9, budget=T, max_budget=T, page_size=S)
    return config, np.zeros((B,), np.int32), cache, cfg


@pytest.mark.parametrize("p", HALF + ONE, ids=_ids(HALF + ONE))
def test_model_decode_checks_take_any_real_scalar(p):
    config, tokens, cache, cfg = _decode_args()
    check_decode_args(config, tokens, cache, cfg, None, p)


@pytest.mark.parametrize("p,match", BAD, ids=_ids([b for b, _ in BAD]))
def test_model_decode_checks_refuse_what_is_not_a_p(p, match):
    config, tokens, cache, cfg = _decode_args()
    if isinstance(p, jax.Array) and p.dtype.kind == "f":
        # Values of device arrays are not read here (a sync per step); the op checks them.
        check_decode_args(config, tokens, cache, cfg, None, p)
        return
    with pytest.raises(ValueError, match=match):
        check_decode_args(config, tokens, cache, cfg, None, p)


@pytest.mark.parametrize("p", [x for x in HALF if np.shape(x) == ()], ids=str)
def test_sampling_params_take_any_real_scalar(p):
    sp = SamplingParams(sparsity_top_p=p, sample_top_p=p, temperature=p, max_tokens=np.int64(3))
    assert (sp.sparsity_top_p, sp.sample_top_p, sp.temperature, sp.max_tokens) == (0.5,) * 3 + (3,)
    assert type(sp.sparsity_top_p) is float and type(sp.max_tokens) is int
    assert SamplingParams(sparsity_top_p=jnp.asarray(1)).sparsity_top_p == 1.0


@pytest.mark.parametrize("p", [True, "0.5", np.asarray([0.5]), 0.0, np.float32(1.5)], ids=str)
def test_sampling_params_refuse_what_is_not_a_p(p):
    with pytest.raises(InvalidRequestError, match="sparsity_top_p") as e:
        SamplingParams(sparsity_top_p=p)
    assert e.value.param == "sparsity_top_p"

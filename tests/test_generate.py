"""twilight_jax.runtime.generate and scripts/generate.py.

Greedy continuations of the embedded SmolLM2 equal transformers' ``generate`` on the same
weights (float32, CPU); the rest runs on the tiny random model of models.tiny.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models import loaders
from models.tiny import tiny_random_model
from twilight_jax import SparsityConfig
from twilight_jax.runtime.generate import default_attention, generate


@pytest.fixture(scope="module")
def tiny():
    model, tok, config = tiny_random_model(0)
    return model.jit(), tok, config


def _hf_from_ours(model, config):
    """A transformers LLaMA holding our model's weights (inverse of the HF weight table)."""
    import torch
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        bos_token_id=config.bos_token_id,
        eos_token_id=list(config.eos_token_ids),
    )
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    sd = {}
    for spec in loaders.hf_weight_table(config):
        arr = np.array(flat[spec.target][...], np.float32)
        if spec.transform is not None:
            arr = arr.T
        sd[spec.source] = torch.from_numpy(np.ascontiguousarray(arr))
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return hf


def test_greedy_matches_transformers_smollm2():
    torch = pytest.importorskip("torch")
    try:
        model, tok, config = models.load("smollm2-135m-instruct", dtype=jnp.float32, progress=False)
    except models.ModelLoadError as e:
        pytest.skip(f"embedded model unavailable: {e}")
    hf = _hf_from_ours(model, config)
    # Two ragged chat prompts in one batch; each must continue exactly as transformers does
    # on its own (30 greedy tokens, or fewer if it emits end-of-sequence).
    prompts = ["Write a short poem about the sea.", "Capital of France?"]
    res = generate(model, tok, prompts, max_new_tokens=30, chat=True)
    for i, ids in enumerate(res.prompt_token_ids):
        with torch.no_grad():
            want = hf.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=30,
                do_sample=False,
            )[0, len(ids) :].tolist()
        if want[-1] in config.eos_token_ids:
            assert res.finish_reasons[i] == "stop"
            want = want[:-1]
        else:
            assert res.finish_reasons[i] == "length" and len(want) == 30
        assert res.token_ids[i] == want, (tok.decode(res.token_ids[i]), tok.decode(want))
    assert res.stats.new_tokens == [len(t) for t in res.token_ids]


def test_sparse_p1_generation_equals_dense(tiny):
    model, tok, _ = tiny
    prompts = ["Hello there, tiny model!", "A longer prompt " * 3]
    dense = generate(model, tok, prompts, max_new_tokens=12, stop_on_eos=False)
    cfg = SparsityConfig(selector="all", top_p=1.0, dense_layers=1, max_budget=256)
    sparse = generate(model, tok, prompts, max_new_tokens=12, sparsity=cfg, stop_on_eos=False)
    assert sparse.token_ids == dense.token_ids
    st = sparse.stats
    assert st.new_tokens == [12, 12] and st.prompt_tokens == [len(p) for p in prompts]
    # p = 1 keeps every candidate: nothing pruned, every token in context attended.
    assert st.pruned_fraction == pytest.approx(0.0, abs=1e-9)
    assert st.attended_tokens == pytest.approx(st.context_tokens)


@pytest.mark.parametrize(
    "sparsity",
    [
        SparsityConfig(selector="dense"),
        SparsityConfig(selector="quest", budget=32, top_p=0.8, dense_layers=1, max_budget=64),
    ],
    ids=["dense", "twilight_quest"],
)
def test_chunked_prefill_generates_the_same_tokens(tiny, sparsity, capsys):
    model, tok, _ = tiny
    # A ~50-token and a few-token prompt: chunks end mid-prompt and past the short prompt's
    # end; 16 is page-aligned, 24 starts chunks mid-page (Quest refresh of a shared page).
    prompts = ["The quick brown fox jumps over the lazy dog, twice.", "Hi"]
    kw = dict(max_new_tokens=8, sparsity=sparsity, stop_on_eos=False)
    whole = generate(model, tok, prompts, **kw)
    for chunk in (16, 24):
        got = generate(model, tok, prompts, prefill_chunk=chunk, progress=True, **kw)
        assert got.token_ids == whole.token_ids, chunk
    assert "prefill" in capsys.readouterr().err  # the progress bar ran
    with pytest.raises(ValueError, match="prefill_chunk must be None or an int >= 1"):
        generate(model, tok, prompts, prefill_chunk=0, **kw)


def test_chunked_prefill_fills_the_cache_like_one_call(tiny):
    from models.checks import check_prefill_args

    model, _, config = tiny
    jm = model.jit()
    ids = np.random.default_rng(4).integers(0, config.vocab_size, (2, 40)).astype(np.int32)
    lengths = np.array([40, 23], np.int32)
    one, whole = jm.prefill(ids, lengths, jm.init_cache(2, 64))
    cache, last = jm.init_cache(2, 64), np.zeros(one.shape, np.float32)
    for s0 in range(0, 40, 16):
        n = np.clip(lengths - s0, 0, 16).astype(np.int32)
        piece = np.zeros((2, 16), np.int32)
        piece[:, : min(16, 40 - s0)] = ids[:, s0 : s0 + 16]
        logits, cache = jm.prefill(piece, n, cache, start=np.full((2,), s0, np.int32))
        ends = (lengths > s0) & (lengths <= s0 + 16)
        last[ends] = np.asarray(logits)[ends]
    np.testing.assert_allclose(last, np.asarray(one), atol=1e-5)
    for f in ("k_pages", "v_pages", "k_scale", "k_zero", "k_min", "k_max"):
        np.testing.assert_allclose(
            np.asarray(getattr(cache, f)), np.asarray(getattr(whole, f)), atol=1e-5, err_msg=f
        )
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)
    with pytest.raises(ValueError, match="start must be >= 0 with start"):
        check_prefill_args(config, piece, np.array([16, 16]), cache, np.array([60, 0]))
    with pytest.raises(ValueError, match=r"start must be \[B=2\]"):
        check_prefill_args(config, piece, n, cache, np.array([0]))


def test_pruning_stats(tiny):
    model, tok, _ = tiny
    cfg = SparsityConfig(selector="all", top_p=0.5, dense_layers=1, max_budget=256)
    prompts = ["x" * 50, "The quick brown fox jumps over the lazy dog. " * 1]
    res = generate(model, tok, prompts, max_new_tokens=6, sparsity=cfg, stop_on_eos=False)
    st = res.stats
    assert 0 < st.attended_tokens < st.context_tokens
    assert 0 < st.pruned_fraction < 1 and st.attended_fraction == pytest.approx(
        st.attended_tokens / st.context_tokens
    )
    assert st.decode_steps == 5 and st.time_per_token_s > 0 and st.tokens_per_s > 0
    assert "pruned" in st.summary()


def test_repetition_penalty_matches_transformers(tiny):
    torch = pytest.importorskip("torch")
    model, tok, config = tiny
    hf = _hf_from_ours(model.model, config)
    prompts = ["abcabc", "hello hello"]
    plain = generate(model, tok, prompts, max_new_tokens=12, stop_on_eos=False)
    res = generate(
        model, tok, prompts, max_new_tokens=12, repetition_penalty=1.5, stop_on_eos=False
    )
    # The random model repeats itself; the penalty must change what it says.
    assert res.token_ids != plain.token_ids
    for i, ids in enumerate(res.prompt_token_ids):
        with torch.no_grad():
            want = hf.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=12,
                min_new_tokens=12,
                do_sample=False,
                repetition_penalty=1.5,
            )[0, len(ids) :].tolist()
        assert res.token_ids[i] == want, i


def test_penalize_repeats_by_hand():
    from twilight_jax.runtime.generate import penalize_repeats

    logits = jnp.asarray([[2.0, -2.0, 1.0, 0.0]])
    seen = jnp.asarray([[True, True, False, True]])
    # Seen: 2 / 2 = 1, -2 * 2 = -4, 0 either way; unseen 1.0 stays.
    got = penalize_repeats(logits, seen, jnp.float32(2.0))
    np.testing.assert_allclose(np.asarray(got), [[1.0, -4.0, 1.0, 0.0]])


def test_tokens_per_s_is_the_inverse_of_the_step_time(tiny):
    model, tok, _ = tiny
    free = generate(model, tok, ["stop here"], max_new_tokens=10, stop_on_eos=False)
    # Make the 6th generated token end the sequence: the step that samples it counts too.
    eos = free.token_ids[0][5]
    tok2 = models.Tokenizer(tok.backend, eos_token_ids=(eos,), chat_template=tok.chat_template)
    one = generate(model, tok2, ["stop here"], max_new_tokens=10).stats
    assert one.new_tokens == [free.token_ids[0].index(eos)]
    assert one.tokens_per_s == pytest.approx(1.0 / one.time_per_token_s, rel=1e-9)
    two = generate(model, tok, ["a", "bc"], max_new_tokens=6, stop_on_eos=False).stats
    assert two.tokens_per_s == pytest.approx(2.0 / two.time_per_token_s, rel=1e-9)
    line = next(ln for ln in one.summary().splitlines() if "tokens/s" in ln)
    ms_s, rate_s = re.findall(r"([\d.]+) (?:ms per step|tokens/s)", line)

    # Both numbers are rounded for print: the inverse must hold within what the rounding allows.
    def half_ulp(s):
        return 0.5 * 10.0 ** -(len(s.split(".")[1]) if "." in s else 0)

    ms, rate = float(ms_s), float(rate_s)
    lo, hi = 1e3 / (ms + half_ulp(ms_s)), 1e3 / (ms - half_ulp(ms_s))
    assert lo - half_ulp(rate_s) <= rate <= hi + half_ulp(rate_s), (line, lo, hi)


def test_default_attention_by_platform():
    assert default_attention("cpu") == SparsityConfig(selector="dense")
    for platform in ("gpu", "cuda", "rocm", "tpu"):
        assert default_attention(platform) == SparsityConfig(selector="all", top_p=0.95)
    assert default_attention() == default_attention(jax.default_backend())


def test_sampling_seeded_and_streaming(tiny):
    model, tok, _ = tiny
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=50, sample_top_p=0.9, stop_on_eos=False)
    a = generate(model, tok, ["abc", "abc"], seed=3, **kw)
    b = generate(model, tok, ["abc", "abc"], seed=3, **kw)
    c = generate(model, tok, ["abc", "abc"], seed=4, **kw)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert a.token_ids[0] != a.token_ids[1]  # sequence b samples with seed + b
    # top_k = 1 is greedy whatever the temperature.
    g = generate(model, tok, ["abc", "de"], max_new_tokens=10, stop_on_eos=False)
    k1 = generate(
        model,
        tok,
        ["abc", "de"],
        max_new_tokens=10,
        temperature=2.0,
        top_k=1,
        seed=9,
        stop_on_eos=False,
    )
    assert g.token_ids == k1.token_ids
    pieces: dict[int, list[str]] = {0: [], 1: []}
    s = generate(
        model, tok, ["héllo", "wörld"], seed=3, on_text=lambda i, p: pieces[i].append(p), **kw
    )
    assert ["".join(pieces[i]) for i in (0, 1)] == s.texts


def test_stops_at_eos(tiny):
    model, tok, config = tiny
    free = generate(model, tok, ["stop here", "go on"], max_new_tokens=8, stop_on_eos=False)
    # Declare the 4th generated token an end-of-sequence token: generation stops before it.
    eos = free.token_ids[0][3]
    tok2 = models.Tokenizer(tok.backend, eos_token_ids=(eos,), chat_template=tok.chat_template)
    res = generate(model, tok2, ["stop here", "go on"], max_new_tokens=8)
    first = free.token_ids[0].index(eos)
    assert res.token_ids[0] == free.token_ids[0][:first]
    assert res.finish_reasons[0] == "stop"
    # The other sequence runs on (inactive rows do not disturb it) unless it meets eos too.
    if eos not in free.token_ids[1]:
        assert res.token_ids[1] == free.token_ids[1] and res.finish_reasons[1] == "length"


def test_chat_prompt_uses_template(tiny):
    model, tok, _ = tiny
    res = generate(model, tok, ["hi", "yo"], max_new_tokens=2, chat=True, system="be brief")
    want = tok.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        add_generation_prompt=True,
        tokenize=True,
    )
    assert res.prompt_token_ids[0] == want


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(prompts=[]), "prompts must be a non-empty list"),
        (dict(prompts=[3]), r"prompts\[0\] must be a str"),
        (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(sample_top_p=0.0), r"sample_top_p must be in \(0, 1\]"),
        (dict(repetition_penalty=0.0), r"repetition_penalty must be > 0 \(1 = off\)"),
        (dict(top_k=-2), "top_k must be an int >= 0"),
        (dict(sparsity="all"), "sparsity must be a SparsityConfig"),
        (dict(prompts=["y" * 600]), "exceeds the model context of 512 tokens"),
    ],
)
def test_generate_errors(tiny, kwargs, msg):
    model, tok, _ = tiny
    kw = dict(prompts=["ok"], max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=msg):
        generate(model, tok, **kw)


def test_generate_refuses_what_is_not_a_model(tiny):
    _, tok, _ = tiny
    with pytest.raises(ValueError, match=r"model must implement .*DecodeModel.*lacks .*init_cache"):
        generate(object(), tok, ["ok"], max_new_tokens=2)

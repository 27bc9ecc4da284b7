"""Two processes under jax.distributed (CPU, gloo collectives over loopback) against one.

Each check starts two python processes with one CPU device each; the tiny random model's two
KV heads are split one per process, so every decode step's all-reduces cross the processes.
Greedy tokens must equal the one-process run exactly.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from twilight_jax.runtime.cli import distributed_from_flags
from twilight_jax.runtime.serve import build_parser as serve_parser
from twilight_jax.runtime.serving import lockstep

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "multiprocess_worker.py"
TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device each
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_PYTHON_CLIENT_PREALLOCATE="false")
    return env


def _start(argvs: list[list[str]], tmp_path: Path) -> list[tuple[subprocess.Popen, Path]]:
    procs = []
    for i, argv in enumerate(argvs):
        log = tmp_path / f"process{i}.log"
        with open(log, "w") as f:
            p = subprocess.Popen(
                [sys.executable, *argv], stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT
            )
        procs.append((p, log))
    return procs


def _finish(procs, deadline: float) -> list[str]:
    """Waits for every process (killing all of them past the deadline); their logs."""
    try:
        for p, _ in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    return [log.read_text() for _, log in procs]


def _skip_without_gloo(procs, logs) -> None:
    if any(p.returncode == 3 and "NO GLOO" in log for (p, _), log in zip(procs, logs)):
        pytest.skip("this jax has no gloo CPU collectives: " + logs[0][-300:])


def _one_process_engine_tokens(flags, prompts, params):
    from twilight_jax.runtime.serve import build_server

    _, engine = build_server(serve_parser().parse_args(flags))
    engine.start()
    try:
        return [list(c.token_ids) for c in engine.generate(prompts, params)]
    finally:
        engine.shutdown()


def _run_worker(part: str, tmp_path: Path) -> list[dict]:
    """What each of the two worker processes saw running ``part``."""
    coordinator = f"127.0.0.1:{_free_port()}"
    outs = [tmp_path / f"seen{i}.json" for i in range(2)]
    argvs = [[str(WORKER), part, coordinator, "2", str(i), str(outs[i])] for i in range(2)]
    procs = _start(argvs, tmp_path)
    logs = _finish(procs, time.monotonic() + TIMEOUT_S)
    _skip_without_gloo(procs, logs)
    for (p, _), log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    seen = [json.loads(o.read_text()) for o in outs]
    for s in seen:
        assert (s["processes"], s["devices"], s["mesh_size"]) == (2, 2, 2), s
        assert "must be 2" in s["partial_mesh_error"], s["partial_mesh_error"]
    return seen


def test_two_processes_generate_like_one(tmp_path):
    import multiprocess_worker as w

    seen = _run_worker("generate", tmp_path)
    want = w.generate_tokens(None)  # here: one process, no jax.distributed
    for s in seen:
        assert s["generate"] == want, (s["process"], s["generate"], want)
        # The decode step over both processes: per layer (unrolled in the program), the
        # all-reduces of the [B, 1, hidden] residual after the attention output projection
        # and after the MLP; nothing else.
        assert s["collectives"] == {"all-reduce": 2 * 3}, s["collectives"]  # 3 layers
        assert s["all_reduce_shapes"] == ["f32[2,1,64]{2,1,0}"], s["all_reduce_shapes"]


def test_two_processes_serving_engine_like_one(tmp_path):
    import multiprocess_worker as w

    seen = _run_worker("engine", tmp_path)
    want = _one_process_engine_tokens(w.SERVER_FLAGS, w.ENGINE_PROMPTS, w.engine_params())
    assert not seen[0]["follower"] and seen[1]["follower"]
    assert seen[0]["engine"] == want and all(len(t) == 5 for t in want)
    assert seen[0]["pages_free"]
    assert "an engine runs once" in seen[0]["restart_error"], seen[0]
    assert seen[1]["calls"] > 0


def _post(url: str, body: dict) -> dict:
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_serve_cli_on_two_processes_answers_like_one_process(tmp_path):
    from twilight_jax.runtime.serve import build_server
    from twilight_jax.runtime.serving import ServerThread

    flags = ["--model", "tiny-random", "--max-batch", "2", "--max-seq-len", "128"]
    flags += ["--selector", "all", "--top-p", "0.8", "--dense-layers", "1"]
    bodies = [
        {"model": "tiny-random", "prompt": p, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        for p in ("hello there", "the quick brown fox")
    ]
    server, _ = build_server(serve_parser().parse_args(flags))
    thread = ServerThread(server.app).start()
    try:
        want = [_post(thread.url, b)["choices"][0]["text"] for b in bodies]
    finally:
        thread.stop()

    port = _free_port()
    coordinator = f"127.0.0.1:{_free_port()}"
    script = str(ROOT / "scripts" / "serve.py")
    dist = ["--port", str(port), "--coordinator", coordinator, "--num-processes", "2"]
    procs = _start([[script, *flags, *dist, "--process-id", str(i)] for i in range(2)], tmp_path)
    deadline = time.monotonic() + TIMEOUT_S
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            assert all(p.poll() is None for p, _ in procs), "a server process exited"
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the two-process server did not come up"
            time.sleep(0.5)
        got = [_post(url, b)["choices"][0]["text"] for b in bodies]
    finally:
        if procs[0][0].poll() is None:
            procs[0][0].send_signal(signal.SIGINT)  # process 0 stops; it tells process 1
        logs = _finish(procs, deadline)
    assert got == want, (got, want)
    for (p, _), log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    assert "process 1: process 0 stopped after" in logs[1], logs[1][-2000:]


def test_generate_cli_on_two_processes_prints_what_one_process_prints(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_cli_mp", ROOT / "scripts/generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    # Two prompts: the batch path, whose texts are printed once done (no streaming).
    flags = ["--model", "tiny-random", "--prompt", "hello there", "--prompt", "a b c"]
    flags += ["--max-new-tokens", "6", "--attention", "all", "--top-p", "0.6"]
    flags += ["--dense-layers", "1"]
    assert gen.main(flags) == 0
    want = capsys.readouterr().out
    assert want.strip()

    coordinator = f"127.0.0.1:{_free_port()}"
    dist = ["--coordinator", coordinator, "--num-processes", "2"]
    script = str(ROOT / "scripts" / "generate.py")
    argvs = [[script, *flags, *dist, "--process-id", str(i)] for i in range(2)]
    procs = []
    for i, argv in enumerate(argvs):  # stdout apart from stderr: only the answer is compared
        out, err = (open(tmp_path / f"{name}{i}.txt", "w") for name in ("out", "err"))
        with out, err:
            procs.append(
                subprocess.Popen(
                    [sys.executable, *argv], stdout=out, stderr=err, env=_env(), cwd=ROOT
                )
            )
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    outs = [(tmp_path / f"out{i}.txt").read_text() for i in range(2)]
    errs = [(tmp_path / f"err{i}.txt").read_text() for i in range(2)]
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-3000:]
    assert outs[0] == want, (outs[0], want)
    assert outs[1] == ""  # process 1 generated the same tokens and printed nothing


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-processes", "2"], "--num-processes 2 needs --coordinator host:port"),
        (["--coordinator", "h:1"], "--coordinator h:1 does nothing with one process"),
        (["--process-id", "1"], "--process-id 1 does nothing with one process"),
        (["--num-processes", "0"], "--num-processes must be >= 1, got 0"),
        (
            ["--num-processes", "2", "--coordinator", "h:1", "--process-id", "2"],
            r"--process-id must be in \[0, 2\) with --num-processes 2, got 2",
        ),
        (
            ["--num-processes", "2", "--coordinator", "h:1"],
            r"--process-id must be in \[0, 2\) with --num-processes 2, got None",
        ),
        (
            ["--num-processes", "2", "--coordinator", "nohost", "--process-id", "0"],
            "--coordinator 'nohost': coordinator_address must be host:port",
        ),
    ],
)
def test_inconsistent_distributed_flags_are_refused_before_joining(flags, message):
    with pytest.raises(ValueError, match=message):
        distributed_from_flags(serve_parser().parse_args(flags))


def test_lockstep_messages_round_trip():
    table = np.arange(3 * 2000, dtype=np.int32).reshape(3, 2000)  # longer than one block
    args = {"tokens": np.array([1, 2], np.int32), "table": table, "start": None}
    args["top_p"] = np.array([0.5, 1.0], np.float32)
    args["seed"] = np.array([7, 2**32 - 1], np.uint32)
    args["active"] = np.array([True, False])
    data = lockstep.encode("decode", args)
    assert len(data) > lockstep.BLOCK
    op, got = lockstep.decode(data)
    assert op == "decode" and set(got) == set(args) and got["start"] is None
    for k, v in args.items():
        if v is not None:
            assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
            np.testing.assert_array_equal(got[k], v, err_msg=k)

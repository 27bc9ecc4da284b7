"""The command lines a new user meets: scripts/generate.py and ``python -m twilight_jax.serve``.

Their defaults (one attention per platform, decided by
twilight_jax.runtime.generate.default_attention), their --help texts, bad input (one line naming
the flag, exit code 2), and the server's startup (a taken port, jax's missing-TPU notice).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from twilight_jax import SparsityConfig
from twilight_jax.runtime import cli, serve
from twilight_jax.runtime.generate import DEFAULT_ATTENTION_TEXT, default_attention

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gen():
    """scripts/generate.py as a module."""
    spec = importlib.util.spec_from_file_location("generate_cli", REPO / "scripts" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env(**extra):
    """The test environment for a child process, without the forced JAX_PLATFORMS=cpu of
    conftest: what a user's shell has, so jax probes its backends (and TPU) as it would there.
    The checkout under test comes first on PYTHONPATH (a script's own folder is scripts/, and an
    installed copy of the package may be another checkout's)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    path = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return {**env, "PYTHONPATH": path, **extra}


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


# ---------------------------------------------------------------------- defaults


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
def test_both_tools_default_to_the_platform_attention(gen, monkeypatch, platform):
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    want = default_attention(platform)
    assert want.selector == ("dense" if platform == "cpu" else "all")
    assert gen.sparsity_config(gen.build_parser().parse_args([])) == want
    assert serve.sparsity_from_args(serve.build_parser().parse_args([])) == want


@pytest.mark.parametrize(
    "args, selector, top_p",
    [
        (["--attention", "dense"], "dense", None),
        (["--attention", "twilight"], "all", 0.95),
        (["--attention", "twilight", "--top-p", "0.8"], "all", 0.8),
        (["--attention", "all"], "all", 0.95),
        (["--top-p", "0.7"], "all", 0.7),  # --top-p alone: Twilight over all at that p
        (["--attention", "quest"], "quest", None),
        (["--attention", "quest", "--top-p", "0.9"], "quest", 0.9),
    ],
)
def test_attention_flags(gen, args, selector, top_p):
    cfg = gen.sparsity_config(gen.build_parser().parse_args(args))
    assert (cfg.selector, cfg.top_p) == (selector, top_p)
    assert cfg.quest_metadata == "int8"
    # The server spells --attention --selector and takes the same values.
    server_args = [a.replace("--attention", "--selector") for a in args]
    assert serve.sparsity_from_args(serve.build_parser().parse_args(server_args)) == cfg


@pytest.mark.parametrize("form", ["int8", "native"])
def test_quest_metadata_flag(gen, form):
    args = ["--attention", "quest", "--top-p", "0.9", "--quest-metadata", form]
    cfg = gen.sparsity_config(gen.build_parser().parse_args(args))
    assert (cfg.selector, cfg.quest_metadata) == ("quest", form)
    server_args = [a.replace("--attention", "--selector") for a in args]
    assert serve.sparsity_from_args(serve.build_parser().parse_args(server_args)) == cfg


def test_server_top_p_zero_means_no_pruning():
    parse = serve.build_parser().parse_args
    cfg = serve.sparsity_from_args(parse(["--selector", "quest", "--top-p", "-1"]))
    assert cfg == SparsityConfig(selector="quest")
    with pytest.raises(ValueError, match=r"--top-p -1.0 \(no pruning\) with --selector all"):
        serve.sparsity_from_args(parse(["--selector", "all", "--top-p", "-1"]))


# ---------------------------------------------------------------------- --help


@pytest.mark.parametrize("tool", ["generate", "serve"])
def test_help_gives_every_flag_a_help_and_each_default_once(gen, tool):
    parser = gen.build_parser() if tool == "generate" else serve.build_parser()
    text = " ".join(parser.format_help().split())
    assert f"(default: {DEFAULT_ATTENTION_TEXT})" in text
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, action.option_strings
        shown = formatter._expand_help(action)
        assert shown.count("(default") <= 1, shown
        for wrong in ("(default: None)", "(default: True)", "(default: False)", "(default: [])"):
            assert wrong not in shown, (action.option_strings, shown)
    if tool == "serve":  # every flag with a value states its default
        for flag in ("--host", "--port", "--max-batch", "--top-p", "--budget", "--max-budget"):
            assert f"{flag} " in text
        assert "(default: 127.0.0.1)" in text and "(default: 8000)" in text


def test_generate_help_states_the_sampling_defaults(gen):
    text = " ".join(gen.build_parser().format_help().split())
    assert repr(gen.DEFAULT_PROMPT) in text
    assert "repetition penalty 1.1" in text and "(default: 1.1)" in text
    assert "--budget bounds what the selector proposes, --max-budget what pruning keeps" in text


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--prompt", ""], "--prompt must not be empty, got ''"),
        (["--prompt", "  "], "--prompt must not be empty"),
        (
            ["--attention", "dense", "--top-p", "0.9"],
            "--top-p 0.9 does nothing with --attention dense",
        ),
        (["--attention", "dense", "--dense-layers", "1"], "--dense-layers 1 does nothing"),
        (["--budget", "64"], "--budget 64 does nothing with dense attention (this platform's"),
        (["--attention", "all", "--budget", "64"], "--budget 64 does nothing with --attention all"),
        (["--attention", "quest", "--max-budget", "64"], "--max-budget 64 does nothing"),
        (
            ["--attention", "twilight", "--quest-metadata", "native"],
            "--quest-metadata native does nothing with --attention twilight",
        ),
        (["--quest-metadata", "fp8"], "argument --quest-metadata: invalid choice: 'fp8'"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
        (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
        (["--attention", "quest", "--budget", "0"], "--budget must be >= 1, got 0"),
        (
            ["--attention", "quest", "--budget", "40"],
            "--budget 40 must be a multiple of --page-size 16",
        ),
        (["--page-size", "12"], "--page-size must be a power of two, got 12"),
        (["--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
        (
            ["--temperature", "1", "--sample-top-p", "1.5"],
            "--sample-top-p must be in (0, 1], got 1.5",
        ),
        (["--temperature", "1", "--top-k", "0"], "--top-k must be >= 1, got 0"),
        (["--top-k", "5"], "--top-k 5 does nothing with greedy decoding"),
        (["--seed", "3"], "--seed 3 does nothing with greedy decoding"),
        (["--greedy", "--temperature", "0.5"], "--greedy contradicts --temperature 0.5"),
        (["--repetition-penalty", "0"], "--repetition-penalty must be > 0 (1 = off), got 0.0"),
        (["--raw", "--system", "be brief"], "--system is a chat turn"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--prefill-chunk", "-1"], "--prefill-chunk must be >= 0, got -1"),
        (["--prompt-file", "/nonexistent.txt"], "--prompt-file '/nonexistent.txt' does not exist"),
        (["--prompt", "z" * 700], "the prompt has"),
        (
            ["--prompt", "z" * 700],
            "with --max-new-tokens 128 that exceeds the model context of 512",
        ),
        (["--budget", "abc"], "argument --budget: invalid int value: 'abc'"),
        (["--attention", "sparse"], "argument --attention: invalid choice: 'sparse'"),
        (["--num-processes", "2"], "--num-processes 2 needs --coordinator host:port"),
        (["--process-id", "1"], "--process-id 1 does nothing with one process"),
        (["--devices", "3"], "--devices 3: num_devices must be an int in [1, 1]"),
    ],
)
def test_generate_bad_input_is_one_line_naming_the_flag(gen, capsys, args, msg):
    try:
        code = gen.main(["--model", "tiny-random", *args])
    except SystemExit as e:  # argparse's own errors (a non-number, an unknown choice)
        code = e.code
    assert code == 2
    captured = capsys.readouterr()
    lines = _lines(captured.err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], captured.err
    assert "SparsityConfig" not in lines[0] and captured.out == ""


def test_generate_bad_files(gen, capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    for flag, msg in (("--prompt-file", "is empty"), ("--batch-file", "has no prompt")):
        assert gen.main(["--model", "tiny-random", flag, str(empty)]) == 2
        assert msg in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--model", "/nonexistent/m.gguf"], "does not exist"),
    ],
)
def test_generate_bad_model(gen, capsys, args, msg):
    assert gen.main(args) == 2
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0]


def test_generate_empty_prompt_exits_2_as_a_process():
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "generate.py"), "--prompt", ""],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert r.returncode == 2 and r.stdout == ""
    assert _lines(r.stderr) == ["error: --prompt must not be empty, got ''"]


def test_generate_runs_quietly_and_its_rate_matches_its_step_time():
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "generate.py"), "--model", "tiny-random"]
        + ["--prefill-chunk", "2", "--prompt", "hello", "--max-new-tokens", "5"]
        + ["--attention", "all", "--top-p", "0.9", "--dense-layers", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert r.returncode == 0, r.stderr
    assert "libtpu" not in r.stderr and "Unable to initialize backend" not in r.stderr
    assert "prompt tokens:" in r.stderr and "tokens/s" in r.stderr and "pruned" in r.stderr


@pytest.mark.parametrize(
    "args, msg",
    [
        (
            ["--selector", "dense", "--top-p", "0.9"],
            "--top-p 0.9 does nothing with --selector dense",
        ),
        (["--top-p", "2"], "--top-p must be in (0, 1], got 2.0"),
        (
            ["--selector", "quest", "--budget", "40"],
            "--budget 40 must be a multiple of --page-size",
        ),
        (["--port", "70000"], "--port must be in 0..65535, got 70000"),
        (["--selector", "nope"], "argument --selector: invalid choice: 'nope'"),
        (
            ["--selector", "dense", "--quest-metadata", "int8"],
            "--quest-metadata int8 does nothing with --selector dense",
        ),
        (["--coordinator", "h:1"], "--coordinator h:1 does nothing with one process"),
        (
            ["--num-processes", "2", "--coordinator", "h:1", "--process-id", "5"],
            "--process-id must be in [0, 2) with --num-processes 2, got 5",
        ),
        (["--devices", "3"], "--devices 3: num_devices must be an int in [1, 1]"),
    ],
)
def test_server_bad_input_is_one_line_naming_the_flag(capsys, args, msg):
    try:
        code = serve.main(["--model", "tiny-random", "--port", "0", *args])
    except SystemExit as e:
        code = e.code
    assert code == 2
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], lines


# ---------------------------------------------------------------------- server startup


def test_server_with_its_port_taken_says_so_in_one_line_and_exits_2():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "twilight_jax.serve", "--model", "tiny-random"]
            + ["--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
            env=_env(),
        )
    assert r.returncode == 2 and r.stdout == ""
    assert _lines(r.stderr) == [
        f"error: port {port} on 127.0.0.1 is already in use: stop what holds it or pick "
        "another --port"
    ]


def test_check_port_counts_a_closed_port_as_free():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert serve.check_port("127.0.0.1", port) is None


def test_server_startup_log_opens_without_the_missing_tpu_notice():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "twilight_jax.serve", "--model", "tiny-random"]
        + ["--port", str(port), "--max-batch", "1", "--max-seq-len", "128"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=_env(),
    )
    lines = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line.rstrip())
            if "Uvicorn running on" in line:
                break
    finally:
        proc.terminate()
        proc.wait(30)
    log = "\n".join(lines)
    assert any("Uvicorn running on" in ln for ln in lines), log
    assert "libtpu" not in log and "Unable to initialize backend 'tpu'" not in log, log
    # The server's own lines come first (the engine's pool sizing, then where it serves), then
    # uvicorn's.
    serving = [i for i, ln in enumerate(lines) if ln.startswith("serving 'tiny-random' on ")]
    assert serving and lines[serving[0]].startswith(
        f"serving 'tiny-random' on http://127.0.0.1:{port}"
    ), log
    assert all("twilight_jax" in ln for ln in lines[: serving[0]]), log
    assert "attention: dense" in lines[serving[0]]  # the CPU default, in words


def test_tpu_notice_filter_drops_only_that_notice(caplog):
    cli.quiet_startup()
    cli.quiet_startup()  # idempotent
    logger = logging.getLogger("jax._src.xla_bridge")
    assert sum(isinstance(f, cli._NoMissingTpuNotice) for f in logger.filters) == 1
    with caplog.at_level(logging.INFO, logger="jax._src.xla_bridge"):
        logger.info("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so")
        logger.info("Unable to initialize backend 'cuda': no CUDA")
        logger.warning("Unable to initialize backend 'tpu': something else went wrong")
    assert [r.getMessage()[:40] for r in caplog.records] == [
        "Unable to initialize backend 'cuda': no ",
        "Unable to initialize backend 'tpu': some",
    ]


def test_describe_attention():
    assert cli.describe_attention(SparsityConfig(selector="dense")) == "dense"
    assert (
        cli.describe_attention(SparsityConfig(selector="all", top_p=0.95))
        == "Twilight over all, p = 0.95"
    )
    assert cli.describe_attention(SparsityConfig(selector="quest", budget=64)) == "quest, B0 = 64"
    native = SparsityConfig(selector="quest", budget=64, quest_metadata="native")
    assert cli.describe_attention(native) == "quest, B0 = 64, native page bounds"

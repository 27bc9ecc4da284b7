"""scripts/benchlib.py's profile parser on a synthetic trace (the GPU runs rely on it)."""

import argparse
import gzip
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from _export import export_cuda  # noqa: E402

import bench_attention  # noqa: E402
import bench_decode_step  # noqa: E402
import bench_engine  # noqa: E402
import benchlib  # noqa: E402
import probe_mgpu_gather  # noqa: E402
import probe_op_configs  # noqa: E402
from pallas_kernels import assume_platform  # noqa: E402
from twilight_jax import decode_attention  # noqa: E402


def _write(path, events):
    with gzip.open(path, "wt") as f:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, f)


def test_kernel_breakdown_sums_device_events_per_run(tmp_path):
    ev = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
        # two runs of: kernel a (10 us) overlapping kernel b on another stream, then a again
        {"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 10, "name": "a"},
        {"ph": "X", "pid": 1, "tid": 2, "ts": 5, "dur": 10, "name": "b"},
        {"ph": "X", "pid": 1, "tid": 1, "ts": 30, "dur": 10, "name": "a"},
        {"ph": "X", "pid": 1, "tid": 1, "ts": 100, "dur": 4, "name": "a"},
        {"ph": "X", "pid": 2, "tid": 1, "ts": 0, "dur": 500, "name": "host work"},
    ]
    path = tmp_path / "t.trace.json.gz"
    _write(path, ev)
    out = benchlib.kernel_breakdown(str(path), runs=2)
    # union of [0,15] + [30,40] + [100,104] = 29 us over 2 runs; host events ignored
    assert out["busy_us"] == 14.5
    assert out["span_us"] == 52.0
    assert out["kernels"] == [("a", 12.0, 1.5), ("b", 5.0, 0.5)]


def test_step_times_split_steps_at_the_host_waits(tmp_path):
    gpu = {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}}

    def k(ts, dur, tid=1):
        return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": "k"}

    # step 1: [0,10] + [12,20] (a 2 us launch gap), then the host waits 500 us;
    # step 2: [520,530] overlapping [525,540] on another stream, [541,560]; wait; step 3.
    ev = [gpu, k(0, 10), k(12, 8), k(520, 10), k(525, 15, 2), k(541, 19), k(1100, 30)]
    path = tmp_path / "t.trace.json.gz"
    _write(path, ev)
    out = benchlib.step_times(str(path), runs=3)
    # busy per step: 18, 39, 30 -> median 30; span: 20, 40, 30 -> median 30
    assert out == {"busy_us": 30.0, "span_us": 30.0}
    assert benchlib.step_times(str(path), runs=1) == {"busy_us": 87.0, "span_us": 1130.0}


def test_kernel_breakdown_without_device_events(tmp_path):
    path = tmp_path / "t.trace.json.gz"
    _write(path, [{"ph": "X", "pid": 3, "tid": 1, "ts": 0, "dur": 5, "name": "host"}])
    assert benchlib.kernel_breakdown(str(path), runs=1) == {
        "busy_us": 0.0,
        "span_us": 0.0,
        "kernels": [],
    }


def test_per_call_time_drops_the_once_per_measurement_cost():
    # A program of 20 calls of 30 us each, plus 500 us of dispatch and wait paid once per
    # measurement: 30 us a call, where dividing one launch's time by 20 would give 55.
    def launches(n):
        return 500e-6 + n * 20 * 30e-6

    got = benchlib.per_call_device_seconds(launches, 20, repeats=3, extra=4)
    assert abs(got - 30e-6) < 1e-12
    assert abs(launches(1) / 20 - 55e-6) < 1e-12
    # A clock whose differences vanish (a program too short to time): the one-launch bound.
    assert benchlib.per_call_device_seconds(lambda n: 1e-3, 20, repeats=3, extra=4) == 1e-3 / 20


def test_l2_flush_reads_its_buffer_after_every_call_and_leaves_results_alone():
    # The flush must be read once per call (a sum XLA hoisted out of the unrolled calls would
    # flush once per program) and must not change what the calls compute.
    q = jnp.arange(1, 5, dtype=jnp.float32)
    n = 1 << 18  # floats in a 1 MiB flush buffer
    fn = lambda q: q * 2 + 1  # noqa: E731
    launches, flushed = benchlib.unrolled_launches(fn, [(q,)], (), iters=3, flush_bytes=4 * n)
    sums = [ln for ln in flushed.as_text().splitlines() if " reduce(" in ln]
    assert len(sums) == 3, sums
    _, plain = benchlib.unrolled_launches(fn, [(q,)], (), iters=3)
    stacked = (q[None],)
    got = flushed(stacked, (), jnp.zeros((n,), jnp.float32))
    assert float(got) == float(plain(stacked, (), None)) == 3.0  # q[0] * 2 + 1, each call
    assert launches(1) > 0
    t = benchlib.time_fn(fn, [(q,)], (), iters=3, repeats=1, flush_bytes=4 * n)
    assert isinstance(t, float)


def test_time_fn_reports_a_cache_sized_scratch_copy(capsys):
    cache = jnp.ones((256, 1024), jnp.float32)  # 1 MiB "cache"

    def reads(q, c):  # reads the cache in place: no scratch of its size
        return q + jnp.sum(c)

    def copies(q, c):  # a sort materializes a cache-sized temporary
        return q + jnp.sort(c, axis=0)[0, 0] + jnp.sort(c.T, axis=0)[0, 0]

    q = jnp.zeros((4,), jnp.float32)
    assert benchlib.time_fn(reads, [(q,)], (cache,), iters=2, repeats=1, label="reads") > 0
    out = capsys.readouterr().out
    assert "[reads] compiled: scratch" in out and "a copy?" not in out
    benchlib.time_fn(copies, [(q,)], (cache,), iters=2, repeats=1, label="copies")
    out = capsys.readouterr().out
    assert "[copies] compiled: scratch" in out and "a copy?" in out, out
    mem = benchlib.compiled_memory(jax.jit(reads).lower(q, cache).compile())
    assert set(mem) == {"argument_bytes", "output_bytes", "temp_bytes"}
    assert mem["argument_bytes"] >= cache.nbytes


def test_bench_attention_runs_end_to_end_on_cpu(tmp_path, monkeypatch):
    # The H200 benchmark's whole path at a tiny size (cuDNN is absent on CPU and reported as
    # failed): every method and stage gets a time, and the table is written.
    monkeypatch.setattr(benchlib, "measure_copy_bandwidth", lambda *a, **k: {"peak": 1e11})
    out = tmp_path / "attn"
    args = argparse.Namespace(
        batches=[1],
        contexts=[128],
        budget=64,
        max_budget=32,
        p=0.85,
        planted=0.05,
        lift=7.0,
        all_max_ctx=1 << 20,
        quest_metadata=["native", "int8"],
        torch=True,  # no CUDA here: no torch rows, and none is needed for the others
        flush_l2_mb=0,  # the flushed timing has its own test, above
        out=str(out),
    )
    bench_attention.run(args)
    rows = json.loads(Path(f"{out}.json").read_text())["rows"]
    by_method = {(r["method"].split(" ")[0], r["quest_metadata"]): r for r in rows}
    quest = {(m, f) for m in ("quest", "twilight/quest") for f in ("native", "int8")}
    assert set(by_method) == {("dense", ""), ("twilight/all", ""), *quest}
    for r in rows:
        assert r["total_us"] > 0, r
    for name in (("twilight/quest", "int8"), ("twilight/quest", "native"), ("twilight/all", "")):
        r = by_method[name]
        assert all(r[f"{s}_us"] > 0 for s in ("select", "estimate", "threshold", "attend")), r
        assert 0 < r["attended"] <= 64
    # Against the fastest dense time of the run: here ours alone (cuDNN and torch absent).
    dense = by_method[("dense", "")]["total_us"]
    for r in rows:
        assert r["vs_best_dense"] == pytest.approx(dense / r["total_us"]), r


def test_bench_decode_step_runs_end_to_end_on_cpu(tmp_path):
    # The decode-step benchmark's whole path on a 2-layer SmolLM2-shaped model: each method
    # gets a step time, a floor, an attended fraction and its compiled temporaries.

    out = tmp_path / "ds"
    argv = ["--layers", "2", "--points", "2x512", "--steps", "1", "--budget", "128"]
    argv += ["--copy-tbps", "0.1", "--quest-metadata", "int8", "native"]
    bench_decode_step.main([*argv, "--max-budget", "64", "--out", str(out)])
    rows = json.loads(Path(f"{out}.json").read_text())["rows"]
    # Native first (the cache cannot go back from int8), then the Quest methods in int8.
    quest = bench_decode_step.QUEST_METHODS
    want = [(m, "native" if m in quest else "") for m in bench_decode_step.METHODS]
    want += [(m, "int8") for m in quest]
    assert [(r["method"], r["quest_metadata"]) for r in rows] == want
    for r in rows:
        assert r["step_ms"] > 0 and r["floor_ms"] > 0 and r["temp_GB"] is not None, r
        assert r["logits_sum"] > 0, r  # the last step's fingerprint (gpu_suite "xlaflags")
    int8 = {r["method"]: r for r in rows if r["quest_metadata"] == "int8"}
    assert int8["quest"]["cache_GB"] < rows[1]["cache_GB"]  # the same cache, int8 metadata
    # The floors' metadata bytes: 2 * D * 2 a page and KV head (bf16), 2 * D + 4 (int8).
    shape = types.SimpleNamespace(num_kv_heads=3, head_dim=64, num_layers=4)
    cfg = types.SimpleNamespace(budget=128)
    lengths = [100, 33]  # 7 + 3 pages
    floors = {
        form: bench_decode_step.floor_bytes("quest", cfg, shape, lengths, 0, 1, form)
        for form in ("native", "int8")
    }
    assert floors["native"] - floors["int8"] == 3 * 10 * 3 * (256 - 132)
    by = {r["method"]: r for r in rows if r["quest_metadata"] != "int8"}
    assert by["dense"]["attended"] == 1.0
    assert 0 < by["twilight/quest"]["attended"] < by["quest"]["attended"] <= 1.0
    # Sparse methods must read fewer bytes than dense: their floors are lower.
    assert by["twilight/quest"]["floor_ms"] < by["quest"]["floor_ms"] < by["dense"]["floor_ms"]


_DEVICES_RUN = """
import json, sys
sys.path.insert(0, "scripts")
import bench_decode_step
argv = ["--layers", "2", "--points", "2x512", "--steps", "1", "--budget", "128"]
argv += ["--max-budget", "64", "--copy-tbps", "0.1", "--methods", "dense", "twilight/quest"]
for n in (1, 3):
    bench_decode_step.main([*argv, "--devices", str(n), "--out", f"{sys.argv[1]}/d{n}"])
"""


def test_bench_decode_step_devices_splits_the_heads(tmp_path):
    # --devices 3 on SmolLM2's 9 / 3 heads (3 forced CPU devices, in a subprocess: the device
    # count is fixed when jax starts): the same planted cache and selection as one device, a
    # third of the cache on each device, and a lower per-device floor.
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(repo), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=3"
    cmd = [sys.executable, "-c", _DEVICES_RUN, str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=repo, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one, three = (
        {row["method"]: row for row in json.loads((tmp_path / f"d{n}.json").read_text())["rows"]}
        for n in (1, 3)
    )
    assert json.loads((tmp_path / "d3.json").read_text())["meta"]["devices"] == 3
    for m in ("dense", "twilight/quest"):
        assert three[m]["attended"] == one[m]["attended"], (m, one[m], three[m])
        assert three[m]["cache_GB"] == pytest.approx(one[m]["cache_GB"] / 3, rel=1e-3)
        assert three[m]["floor_ms"] < one[m]["floor_ms"], (m, one[m], three[m])
        # The same steps on the same cache: the same logits, up to the split sums' rounding.
        assert three[m]["logits_sum"] == pytest.approx(one[m]["logits_sum"], rel=1e-4)
    assert 0 < three["twilight/quest"]["attended"] < 1.0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--points", "8x100"], "--points 8x100: batch must be >= 1, context >= 256"),
        (
            ["--devices", "2"],
            "--devices must divide the KV heads (3) and query heads (9) of --shape smollm2, got 2",
        ),
        (["--devices", "3"], "--devices 3: this process has 1 cpu device(s)"),
        (["--points", "eight"], "--points entries must look like 8x32768"),
        (["--layers", "99"], "--layers must be in [1, 30] for --shape smollm2, got 99"),
        (["--methods", "bogus"], "--methods must be among"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
        (["--budget", "100"], "--budget must be a multiple of the page size 16"),
        (["--shape", "gpt9"], "argument --shape: invalid choice"),
        (["--copy-tbps", "0"], "--copy-tbps must be > 0, got 0.0"),
    ],
)
def test_bench_decode_step_bad_flags_are_one_line_and_exit_2(argv, message):
    repo = Path(__file__).resolve().parent.parent
    # The checkout under test first: an installed copy of the package may be another checkout's.
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])
    )
    cmd = [sys.executable, str(repo / "scripts" / "bench_decode_step.py"), *argv]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_bench_engine_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "engine"
    argv = ["--model", "tiny-random", "--concurrency", "1", "3", "--prompt-tokens", "20"]
    argv += ["--new-tokens", "10", "--short-tokens", "2", "--repeats", "1", "--out", str(out)]
    assert bench_engine.main([*argv, "--methods", "dense", "twilight/all p=0.95"]) == 0
    data = json.loads(Path(f"{out}.json").read_text())
    rows = [(r["method"], r["concurrency"]) for r in data["rows"]]
    assert rows == [(m, c) for m in ("dense", "twilight/all p=0.95") for c in (1, 3)]
    # A step time is a difference of two timed runs: on a loaded machine the noise can exceed
    # it, and the script then reports NaN (never a negative time).
    for r in data["rows"]:
        if not math.isnan(r["ms/step"]):
            assert r["ms/step"] > 0
            assert r["tokens/s"] == pytest.approx(r["concurrency"] / r["ms/step"] * 1e3)
    assert data["meta"]["command"].startswith("python scripts/bench_engine.py")


def test_bench_engine_reports_nan_not_a_negative_step(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_engine, "step_time", lambda *a: -1e-3)
    out = tmp_path / "engine"
    argv = ["--model", "tiny-random", "--concurrency", "2", "--prompt-tokens", "8"]
    assert bench_engine.main([*argv, "--out", str(out)]) == 0
    (row,) = json.loads(Path(f"{out}.json").read_text())["rows"]
    assert math.isnan(row["ms/step"]) and math.isnan(row["tokens/s"])
    assert "the longer run was not slower" in capsys.readouterr().err


def test_bench_engine_profile_traces_each_length(tmp_path):
    # On the CPU the traces hold no device events: the column is there, NaN.
    out, prof = tmp_path / "engine", tmp_path / "prof"
    argv = ["--model", "tiny-random", "--concurrency", "1", "--prompt-tokens", "8"]
    argv += ["--new-tokens", "6", "--short-tokens", "2", "--repeats", "1"]
    assert bench_engine.main([*argv, "--out", str(out), "--profile", str(prof)]) == 0
    (row,) = json.loads(Path(f"{out}.json").read_text())["rows"]
    assert math.isnan(row["device_ms/step"])
    for n in (6, 2):
        assert list((prof / "dense_c1" / f"tokens_{n}").glob("plugins/profile/*/*.trace.json.gz"))


def test_bench_engine_device_step_time_is_the_busy_difference(monkeypatch, tmp_path):
    busy_us = {"tokens_10": 5000.0, "tokens_2": 1000.0}
    monkeypatch.setattr(bench_engine.benchlib, "profile", lambda fn, log_dir, runs: log_dir)
    monkeypatch.setattr(
        bench_engine.benchlib,
        "kernel_breakdown",
        lambda trace, runs: {"busy_us": busy_us[Path(trace).name]},
    )
    t = bench_engine.device_step_time(None, None, 10, 2, str(tmp_path))
    assert t == pytest.approx((5000 - 1000) * 1e-6 / 8)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--concurrency", "0"], "--concurrency must be >= 1"),
        (["--short-tokens", "64"], "need 1 <= --short-tokens < --new-tokens"),
        (["--methods", "bogus"], "argument --methods: invalid choice"),
    ],
)
def test_bench_engine_bad_flags_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench_engine.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_probe_mgpu_gather_lowers_for_cuda(capsys):
    # The Mosaic GPU page-gather probe runs only on a GPU; its lowering is checked here so the
    # script does not rot between device sessions.
    assert probe_mgpu_gather.main(["--check", "--pages", "32", "128"]) == 0
    # 32 pages: the gather and the dots; 128: the gather, the nibble unpack (64-page row
    # tiles) and the dots.
    assert capsys.readouterr().out.count("lowers for CUDA") == 5


def test_probe_op_configs_variants_reach_the_kernels():
    # Each variant of the op probe patches a kernel module's default config; exported for CUDA
    # at the point's real shapes (abstract: no memory), every variant must change the program,
    # or its GPU time would be the default's under another name.
    for batch, ctx, method, variants in probe_op_configs.POINTS:
        q, cache = jax.eval_shape(
            lambda k, b=batch, c=ctx: bench_attention._planted_cache(b, c, 0.015, 7.0, k),
            jax.random.key(0),
        )
        cache = jax.eval_shape(lambda c: c.with_quest_metadata("int8"), cache)
        cfg = bench_attention.method_configs(ctx, 8192, 0.85, 4096)[method]
        texts = {}
        for name, patch in variants.items():
            jax.clear_caches()
            with probe_op_configs.patched(patch), assume_platform("gpu"):
                texts[name] = export_cuda(
                    lambda q, c, cfg=cfg: decode_attention(q, c, cfg)[0], q, cache
                ).mlir_module()
        same = [n for n in texts if n != "default" and texts[n] == texts["default"]]
        assert not same, (batch, ctx, method, same)
    jax.clear_caches()


def test_decode_step_rows_flag_zero_or_non_finite_logits():
    # A step whose logits are all zero or not finite ran on a corrupted state (an overflowed
    # kernel offset once wrote over the step's buffers): its row must say so.
    assert bench_decode_step._note({"logits_sum": 131000.0}) == ""
    for bad in (0.0, float("nan"), float("inf")):
        assert bench_decode_step._note({"logits_sum": bad}) == "LOGITS ZERO OR NON-FINITE"
    both = bench_decode_step._note({"logits_sum": 0.0, "weight_copies": [("copy", 9.0)]})
    assert both == "WEIGHT COPIES; LOGITS ZERO OR NON-FINITE"

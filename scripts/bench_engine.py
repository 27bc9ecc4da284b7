"""The serving engine's decode step time, in process (no HTTP): what the engine's own loop
costs on top of the model's step (host work, transfers, sampling, events).

For each method and concurrency c, c requests of --prompt-tokens random prompt tokens are
submitted at once, greedy, ``ignore_eos``; each run is timed twice, with --new-tokens and with
--short-tokens output tokens. Their difference over the difference in tokens is the time of one
decode step of c requests (prefill and the first token cancel out); the median over --repeats
pairs is reported, with tokens/s = c / step.

    python scripts/bench_engine.py --out docs/results/engine          # embedded SmolLM2
    python scripts/bench_engine.py --model tiny-random --concurrency 1 4 --prompt-tokens 200

With --profile DIR (GPU/TPU) each point also gets the device-busy time of a step from a
profiler trace, so a step's wall time can be split into device work and host-bound gaps.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time

import numpy as np

import benchlib
import models
from models.tiny import tiny_random_model
from twilight_jax import SparsityConfig
from twilight_jax.runtime.serving import Engine, EngineConfig, SamplingParams

METHODS = {
    "dense": SparsityConfig(selector="dense"),
    "twilight/all p=0.95": SparsityConfig(selector="all", top_p=0.95, max_budget=1024),
    "twilight/quest B0=1024 p=0.95": SparsityConfig(
        selector="quest", budget=1024, top_p=0.95, max_budget=1024
    ),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL, help="a model name, or tiny-random")
    ap.add_argument("--methods", nargs="+", default=["dense"], choices=list(METHODS))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--short-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="path stem of the table: STEM.md and STEM.json")
    ap.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="also trace one run of each length under the JAX profiler (traces under DIR) and "
        "report the device-busy time of a step next to its wall time (GPU/TPU; NaN on CPU)",
    )
    args = ap.parse_args(argv)
    if min(args.concurrency) < 1:
        ap.error(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.prompt_tokens < 1 or args.repeats < 1:
        ap.error("--prompt-tokens and --repeats must be >= 1")
    if not 1 <= args.short_tokens < args.new_tokens:
        ap.error(
            f"need 1 <= --short-tokens < --new-tokens, got {args.short_tokens}, {args.new_tokens}"
        )
    return args


def step_time(engine, prompts, long: int, short: int, repeats: int) -> float:
    """Median seconds per decode step of len(prompts) requests."""

    def run(n):
        t0 = time.perf_counter()
        out = engine.generate(
            prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        )
        elapsed = time.perf_counter() - t0
        bad = [c for c in out if c.finish_reason != "length"]
        if bad:
            raise RuntimeError(f"a request ended with {bad[0].finish_reason}: {bad[0].error}")
        return elapsed

    # Both lengths once first: each compiles the batch, context and page-table buckets it
    # passes through, and a compile inside a timed run would swamp the difference.
    run(long)
    run(short)
    return statistics.median((run(long) - run(short)) / (long - short) for _ in range(repeats))


def device_step_time(engine, prompts, long: int, short: int, log_dir: str) -> float:
    """Device-busy seconds per decode step: one traced run of each length, the difference of
    their busy times over the difference in tokens. NaN when the trace has no device events."""
    busy = {}
    for n in (long, short):
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        trace = benchlib.profile(
            lambda params=params: engine.generate(prompts, params),
            os.path.join(log_dir, f"tokens_{n}"),
            runs=1,
        )
        busy[n] = benchlib.kernel_breakdown(trace, 1)["busy_us"] * 1e-6
    if busy[long] == 0.0:
        return float("nan")
    return (busy[long] - busy[short]) / (long - short)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.model == "tiny-random":
        model, tokenizer, config = tiny_random_model(max_seq_len=4096)
    else:
        model, tokenizer, config = models.load(args.model, progress=False)
    jitted = model.jit()
    rng = np.random.default_rng(0)
    # Random ids away from the special tokens at both ends of the vocabulary.
    lo, hi = min(300, config.vocab_size // 4), config.vocab_size - 8
    max_batch = max(args.concurrency)
    seq = args.prompt_tokens + args.new_tokens + 1
    columns = ["method", "concurrency", "prompt_tok", "ms/step", "tokens/s"]
    table = benchlib.Table(columns + (["device_ms/step"] if args.profile else []))
    for name in args.methods:
        engine = Engine(
            jitted,
            tokenizer,
            METHODS[name],
            EngineConfig(max_batch=max_batch, max_seq_len=seq, prefill_batch=max_batch),
        ).start()
        try:
            for c in args.concurrency:
                prompts = [rng.integers(lo, hi, args.prompt_tokens).tolist() for _ in range(c)]
                t = step_time(engine, prompts, args.new_tokens, args.short_tokens, args.repeats)
                if t <= 0:
                    # The runs' noise exceeded their difference: no step time to report.
                    print(
                        f"warning: {name} at concurrency {c}: the longer run was not slower "
                        "(noise); raise --new-tokens or --repeats",
                        file=sys.stderr,
                    )
                    t = float("nan")
                row = {"ms/step": t * 1e3, "tokens/s": c / t}
                if args.profile:
                    slug = name.replace("/", "_").replace(" ", "_").replace("=", "")
                    log_dir = os.path.join(args.profile, f"{slug}_c{c}")
                    dt = device_step_time(
                        engine, prompts, args.new_tokens, args.short_tokens, log_dir
                    )
                    row["device_ms/step"] = dt * 1e3
                table.add(method=name, concurrency=c, prompt_tok=args.prompt_tokens, **row)
        finally:
            engine.shutdown()
    print("\n" + table.text())
    if args.out:
        meta = benchlib.device_meta()
        meta["model"] = args.model
        meta["command"] = "python scripts/bench_engine.py " + shlex.join(sys.argv[1:])
        table.save(args.out, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Accuracy of sparse decode attention on offline long-context tasks, and the results page.

Dense prefill, the question decoded token by token through the method under test, greedy
answers scored by string match; perplexity on natural text decoded teacher-forced. Methods:
dense, Quest, Double Sparsity and oracle top-k at several budgets, Twilight over all tokens,
over Quest and over Double Sparsity at several p (twilight_jax/runtime/eval/settings.py).

Every run writes into --out: the records, the budget traces, the PNG plots and the page
(results.md, or --report). A small CPU run, a few minutes on two cores:

    python scripts/eval_accuracy.py --preset cpu-small --out /tmp/eval-cpu

The full sweep (2K/4K/8K, every method) on a GPU, bounded in time and resumable: rerun the same
command until it prints COMPLETE (exit code 0; 3 means the time limit stopped it, and the page
then shows what is done so far):

    python scripts/eval_accuracy.py --preset gpu --out /tmp/eval-gpu \\
        --time-limit 540 --compile-cache build/jax_cache

Redraw the page and plots of a finished folder (any machine with the eval extra):

    python scripts/eval_accuracy.py --report-only --out /tmp/eval-gpu

The committed runs (docs/results/eval-h200, docs/results/eval-cpu) list the commands that made
them in their meta.json; use a new folder, not theirs. Presets, methods and their spelling
(``quest:256``, ``ds:ctx/4@0.95``, ``all@0.95``) are in twilight_jax/runtime/eval/settings.py;
any field can be overridden below.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from twilight_jax.runtime.eval import report, runner, tasks
from twilight_jax.runtime.eval.adapter import load_adapter
from twilight_jax.runtime.eval.settings import PRESETS, EvalConfig, protocol_mismatch

INCOMPLETE = 3


def _ints(text):
    return tuple(int(x) for x in text.split(",") if x)


def _strs(text):
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--preset", choices=sorted(PRESETS), default="cpu-small", help="(default: cpu-small)"
    )
    ap.add_argument(
        "--out",
        required=True,
        help="sweep folder: records, budget traces, PNG plots and the page (results.md) go here;\n"
        "rerunning with the same folder continues its sweep",
    )
    ap.add_argument("--model", help="model name or path (default: the preset's)")
    ap.add_argument("--lengths", type=_ints, help="comma-separated context lengths in tokens")
    ap.add_argument("--tasks", type=_strs, help=f"comma-separated, from {tasks.TASKS}")
    ap.add_argument("--methods", type=_strs, help="comma-separated method specs")
    ap.add_argument("--samples", type=int, help="samples per task and length")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--ppl-docs", type=int, help="perplexity texts per length (0: none)")
    ap.add_argument("--ppl-tokens", type=int, help="tokens decoded teacher-forced per text")
    ap.add_argument("--seed", type=int)
    ap.add_argument(
        "--quest-metadata",
        choices=("int8", "native"),
        help="Quest's per-page K min / max in the cache: int8 codes with a scale per page, or "
        "the model dtype (default: the preset's, int8)",
    )
    ap.add_argument("--time-limit", type=float, help="seconds; stop cleanly after this")
    ap.add_argument("--compile-cache", help="JAX persistent compilation cache folder")
    ap.add_argument("--report", help="write the page here instead of OUT/results.md")
    ap.add_argument(
        "--report-only", action="store_true", help="only (re)draw the plots and write the page"
    )
    ap.add_argument("--title", default="Accuracy of sparse decode attention")
    ap.add_argument("--note", help="a paragraph at the top of the page")
    return ap.parse_args(argv)


def settings_from_args(args) -> EvalConfig:
    overrides = {
        "model": args.model,
        "lengths": args.lengths,
        "tasks": args.tasks,
        "methods": args.methods,
        "samples": args.samples,
        "batch_size": args.batch_size,
        "ppl_docs": args.ppl_docs,
        "ppl_tokens": args.ppl_tokens,
        "seed": args.seed,
        "quest_metadata": args.quest_metadata,
    }
    base = PRESETS[args.preset]
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def hardware() -> dict:
    import flax
    import jax

    dev = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "device": f"{jax.device_count()} x {getattr(dev, 'device_kind', dev.platform)}",
        "platform": dev.platform,
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "jax": jax.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        report.check_report_inputs(out)
        page = report.write_report(
            out, args.report or out / "results.md", title=args.title, note=args.note
        )
        print(f"wrote {page}")
        return 0

    settings = settings_from_args(args)
    if args.compile_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    clash = protocol_mismatch(meta.get("settings"), settings)
    if clash:
        print(
            f"error: {out} holds a sweep run with another protocol ({clash}); its records "
            "cannot be mixed with this one: use another --out",
            file=sys.stderr,
        )
        return 2

    t0 = time.monotonic()
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]])
    adapter = load_adapter(settings.model, page_size=settings.page_size)
    c = adapter.config
    meta.update(
        settings=dataclasses.asdict(settings),
        model=settings.model,
        model_info=(
            f"{c.num_layers} layers, {c.num_heads} query / {c.num_kv_heads} KV heads, head_dim "
            f"{c.head_dim}, {adapter.model.dtype} weights and KV cache"
        ),
        commands=list(dict.fromkeys([*meta.get("commands", []), command])),
        hardware=hardware(),
        text_sources=tasks.text_sources(),
        started=meta.get("started", datetime.datetime.now(datetime.timezone.utc).isoformat()),
        invocations=meta.get("invocations", 0) + 1,
    )
    meta_path.write_text(json.dumps(meta, indent=1))
    print(
        f"model loaded in {time.monotonic() - t0:.1f}s; {len(settings.methods)} methods, "
        f"lengths {settings.lengths}",
        flush=True,
    )

    limit = None if args.time_limit is None else args.time_limit - (time.monotonic() - t0)
    complete = runner.run_sweep(
        adapter, settings, out, time_limit_s=limit, log=lambda s: print(s, flush=True)
    )
    meta.update(
        complete=complete,
        elapsed_s=meta.get("elapsed_s", 0.0) + time.monotonic() - t0,
        finished=datetime.datetime.now(datetime.timezone.utc).isoformat(),
    )
    meta_path.write_text(json.dumps(meta, indent=1))

    table, ppl = runner.collect(runner.RecordStore(out).records)
    for length in settings.lengths:
        print(f"\ncontext {length}")
        print(
            f"{'method':40s} {'acc':>6s} {'ppl':>8s} {'attended':>9s} {'frac':>7s} {'pruned':>7s}"
        )
        for r in report.summary_rows(table, ppl, length):
            print(
                f"{r['label']:40s} {report.fmt(r['accuracy']):>6s} "
                f"{report.fmt(r['perplexity'], '.3f'):>8s} "
                f"{report.fmt(r['attended'], '.0f'):>9s} "
                f"{report.pct(r['attended_frac']):>7s} {report.pct(r['pruned']):>7s}"
            )
    page = report.write_report(
        out, args.report or out / "results.md", title=args.title, note=args.note
    )
    print(f"\nwrote {page} and the plots in {out}")
    print("COMPLETE" if complete else "INCOMPLETE: rerun the same command to continue")
    return 0 if complete else INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())

"""The results page of a sweep: tables, target checks, plots, model, command and hardware.

``write_report(run_dir, page)`` reads ``records.jsonl``, ``meta.json`` and the budget traces of
a sweep folder, draws the plots into that folder (when matplotlib is installed) and writes a
markdown page that links them relative to itself. It runs anywhere: the GPU run only has to
bring its folder back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from twilight_jax.runtime.eval import plots, runner
from twilight_jax.runtime.eval.settings import Method

TASK_NAMES = {
    "passkey": "passkey",
    "niah_single": "NIAH single",
    "niah_multikey": "NIAH multikey",
    "variable_tracking": "var. tracking",
    "common_words": "common words",
    "frequent_words": "frequent words",
}


def fmt(x, spec=".1f", none="-"):
    return none if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def _method_order(methods: Sequence[str]) -> list[str]:
    order = {"all": -1, "dense": 0, "quest": 1, "double_sparsity": 2, "oracle": 3, "streaming": 4}

    def key(name):
        m = Method.parse(name)
        b = m.budget
        budget = float(b) * 1e6 if isinstance(b, Fraction) else (b or 0)
        return (m.top_p is not None, order[m.selector], budget, m.top_p or 0)

    return sorted(methods, key=key)


def summary_rows(table: Mapping, ppl: Mapping, length: int) -> list[dict]:
    """One row per method at a length: mean accuracy over tasks and the budget statistics."""
    rows = []
    methods = {m for (m, _t, n) in table if n == length} | {m for (m, n) in ppl if n == length}
    for method in _method_order(methods):
        cells = [s for (m, _t, n), s in table.items() if m == method and n == length]

        def mean(field, cells=cells):
            vals = [c[field] for c in cells if c[field] is not None]
            return float(np.mean(vals)) if vals else None

        p = ppl.get((method, length), {})
        rows.append(
            {
                "method": method,
                "label": Method.parse(method).label,
                "accuracy": mean("accuracy") if cells else None,
                "perplexity": p.get("perplexity"),
                "attended": mean("attended") if cells else p.get("attended"),
                "attended_frac": mean("attended_frac") if cells else p.get("attended_frac"),
                "pruned": mean("pruned"),
                "mass": mean("mass"),
                "saturated": mean("saturated"),
            }
        )
    return rows


def target_checks(table: Mapping, ppl: Mapping, lengths: Sequence[int]) -> list[tuple[str, str]]:
    """The issue's targets, each as (statement, verdict with the numbers)."""
    out = []
    tw, dense = "all@0.95", "dense"
    cells = [(t, n) for (m, t, n) in table if m == dense]
    gaps = []
    if cells and any(m == tw for (m, _, _) in table):
        for task, n in sorted(cells, key=lambda c: (c[1], c[0])):
            if (tw, task, n) in table:
                gaps.append(
                    (
                        table[(dense, task, n)]["accuracy"] - table[(tw, task, n)]["accuracy"],
                        task,
                        n,
                    )
                )
    if cells and gaps:
        worst = max(gaps)
        ok = worst[0] <= 1.0
        out.append(
            (
                "Twilight (Full) p=0.95 within 1 point of dense on every task and length",
                f"{'PASS' if ok else 'FAIL'}: largest drop {worst[0]:.1f} points "
                f"({TASK_NAMES.get(worst[1], worst[1])} @ {worst[2]})",
            )
        )
    for n in lengths:
        if (tw, n) in ppl and (dense, n) in ppl:
            rel = ppl[(tw, n)]["perplexity"] / ppl[(dense, n)]["perplexity"] - 1
            out.append(
                (
                    f"perplexity within 1% of dense @ {n}",
                    f"{'PASS' if rel <= 0.01 else 'FAIL'}: {ppl[(tw, n)]['perplexity']:.3f} vs "
                    f"{ppl[(dense, n)]['perplexity']:.3f} ({100 * rel:+.2f}%)",
                )
            )
    longest = max(lengths)
    fr = [s["attended_frac"] for (m, _t, n), s in table.items() if m == tw and n == longest]
    if fr:
        mean = float(np.mean(fr))
        out.append(
            (
                f"Twilight (Full) p=0.95 attends to at most 10% of the context @ {longest}",
                f"{'PASS' if mean <= 0.10 else 'FAIL'}: {100 * mean:.1f}% on average",
            )
        )
    quest = "quest:ctx/4"
    for m in sorted({m for (m, _, _) in table}):
        spec = Method.parse(m)
        if not (spec.selector == "quest" and spec.budget == Fraction(1, 4) and spec.top_p):
            continue
        for n in lengths:
            a = [s for (mm, _t, nn), s in table.items() if mm == m and nn == n]
            b = [s for (mm, _t, nn), s in table.items() if mm == quest and nn == n]
            if not a or not b:
                continue
            acc_a = float(np.mean([s["accuracy"] for s in a]))
            acc_b = float(np.mean([s["accuracy"] for s in b]))
            frac = float(np.mean([s["attended_frac"] for s in a]))
            ok = acc_a >= acc_b and frac <= 1 / 16
            out.append(
                (
                    f"{spec.label} at least as accurate as Quest B=ctx/4 while attending to at "
                    f"most B0/4 @ {n}",
                    f"{'PASS' if ok else 'FAIL'}: {acc_a:.1f} vs {acc_b:.1f} (mean over tasks); "
                    f"attends {100 * frac:.2f}% of the context (B0/4 = 6.25%)",
                )
            )
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def write_report(
    run_dir: str | Path,
    page: str | Path,
    *,
    title: str = "Accuracy of sparse decode attention",
    note: str | None = None,
) -> Path:
    """Writes the markdown page for the sweep in ``run_dir``; returns its path."""
    run_dir, page = Path(run_dir), Path(page)
    records = runner.RecordStore(run_dir).records
    meta_path = run_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    settings = meta.get("settings", {})
    table, ppl = runner.collect(records)
    lengths = sorted({n for (_m, _t, n) in table} | {n for (_m, n) in ppl})
    tasks_seen = [t for t in TASK_NAMES if any(tt == t for (_m, tt, _n) in table)]
    rel = os.path.relpath(run_dir, page.parent)

    lines = [f"# {title}", ""]
    if note:
        lines += [note, ""]
    lines += _header(meta, settings, records, rel)

    lines += ["## Targets", ""]
    checks = target_checks(table, ppl, lengths) if lengths else []
    if checks:
        lines += _table(["target", "result"], [[a, b] for a, b in checks])
    else:
        lines.append("No target could be checked: the sweep lacks dense or Twilight methods.")
    lines.append("")

    lines += ["## Summary per method", ""]
    lines += [
        "Accuracy: string match in percent, mean over tasks. Attended: tokens per KV head per "
        "decode step in the sparse layers (layers >= dense_layers), mean over steps; "
        "pruned: fraction of the base selector's candidates the top-p pruner dropped; mass: "
        "the pruner's estimated attention mass kept; saturated: fraction of (step, head) "
        "selections cut by the capacity.",
        "",
    ]
    for n in lengths:
        lines += [f"### Context {n}", ""]
        rows = [
            [
                r["label"],
                fmt(r["accuracy"]),
                fmt(r["perplexity"], ".3f"),
                fmt(r["attended"], ".0f"),
                pct(r["attended_frac"]),
                pct(r["pruned"]),
                fmt(r["mass"], ".3f"),
                pct(r["saturated"]),
            ]
            for r in summary_rows(table, ppl, n)
        ]
        header = [
            "method",
            "accuracy",
            "perplexity",
            "attended",
            "of context",
            "pruned",
            "mass",
            "saturated",
        ]
        lines += _table(header, rows) + [""]

    lines += ["## Accuracy per task", ""]
    for n in lengths:
        lines += [f"### Context {n}", ""]
        methods = _method_order({m for (m, _t, nn) in table if nn == n})
        rows = []
        for m in methods:
            row = [Method.parse(m).label]
            for t in tasks_seen:
                s = table.get((m, t, n))
                row.append("-" if s is None else f"{s['accuracy']:.1f}")
            rows.append(row)
        samples = {table[k]["n"] for k in table if k[2] == n}
        lines += _table(["method"] + [TASK_NAMES[t] for t in tasks_seen], rows)
        lines += ["", f"Samples per cell: {', '.join(map(str, sorted(samples)))}.", ""]

    lines += _plots(run_dir, rel, table, ppl, settings)
    lines += _protocol(settings)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return page


def _header(meta: Mapping, settings: Mapping, records, rel: str) -> list[str]:
    hw = meta.get("hardware", {})
    sources = ", ".join(f"{k}: {v}" for k, v in meta.get("text_sources", {}).items())
    lines = [
        f"- Model: `{meta.get('model', settings.get('model', '?'))}`"
        + (f" ({meta['model_info']})" if meta.get("model_info") else ""),
        f"- Hardware: {hw.get('device', '?')}; host {hw.get('cpu', '?')}; jax {hw.get('jax', '?')}",
        "- Command (rerun until it prints COMPLETE; each distinct command that added to this "
        "folder is listed): " + "; ".join(f"`{c}`" for c in meta.get("commands", ["?"])),
        f"- Date: {meta.get('finished', meta.get('started', '?'))}; wall time "
        f"{fmt(meta.get('elapsed_s'), '.0f')} s over {meta.get('invocations', 1)} invocation(s)",
        f"- Text sources: {sources}",
        f"- Raw data: [`{rel}/records.jsonl`]({rel}/records.jsonl) ({len(records)} records: one "
        "per sample and method, with the prediction and its budget statistics)",
    ]
    if not meta.get("complete", True):
        lines.append("- **Incomplete**: the time limit stopped the sweep; rerun the command.")
    return lines + [""]


def _plots(run_dir: Path, rel: str, table, ppl, settings: Mapping) -> list[str]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ["## Plots", "", "(matplotlib is not installed: `pip install '.[eval]'`)", ""]
    lines = ["## Plots", ""]
    if table:
        plots.plot_accuracy_vs_budget(table, run_dir / "accuracy_vs_budget.png")
        lines += [
            "Accuracy against the average budget:",
            "",
            f"![accuracy vs budget]({rel}/accuracy_vs_budget.png)",
            "",
        ]
    if plots.plot_perplexity_vs_budget(ppl, run_dir / "perplexity_vs_budget.png"):
        lines += [
            "Perplexity against the average budget:",
            "",
            f"![perplexity vs budget]({rel}/perplexity_vs_budget.png)",
            "",
        ]
    traces = {int(p.stem.split("_")[1]): p for p in sorted(run_dir.glob("budgets_*.npz"))}
    trace_method = settings.get("budget_trace", "all@0.95")
    dense_layers = int(settings.get("dense_layers", 2))
    label = Method.parse(trace_method).label
    if plots.plot_head_budgets(
        traces, run_dir / "head_budgets.png", dense_layers=dense_layers, label=label
    ):
        lines += [
            f"Per-head budgets per layer under {label} (boxes: quartiles over decode steps "
            "and KV heads; whiskers 1.5 IQR):",
            "",
            f"![per-head budgets]({rel}/head_budgets.png)",
            "",
        ]
        for n, p in sorted(traces.items()):
            summ = plots.head_budget_summary(p, dense_layers)
            med = [s["median"] for s in summ]
            lines.append(
                f"- context {n}: median budget per layer from {100 * min(med):.2f}% to "
                f"{100 * max(med):.2f}% of the context; 10th-90th percentile over all sparse "
                f"layers {100 * min(s['p10'] for s in summ):.2f}% to "
                f"{100 * max(s['p90'] for s in summ):.2f}%"
            )
        lines.append("")
    return lines


def _protocol(settings: Mapping) -> list[str]:
    dense_layers = settings.get("dense_layers", 2)
    return [
        "## Protocol",
        "",
        "Tasks are generated in code (twilight_jax/runtime/eval/tasks.py): passkey retrieval at "
        "several depths, RULER-style single and multi-key needles in a haystack, variable "
        "tracking, common- and frequent-words extraction; lengths are counted in the model's "
        "tokens. Each prompt's context is prefilled densely; its question (ending with the "
        "answer prefix) is fed token by token through the decode step, so it attends to the "
        "context through the method under test; the answer is decoded greedily and scored by "
        "string match (fraction of expected strings found in the first paragraph). Perplexity: "
        f"the last {settings.get('ppl_tokens', '?')} tokens of each text are fed teacher-forced "
        "through the decode step. Prompts are plain text (no chat template). Layers below "
        f"dense_layers = {dense_layers} stay dense; Double Sparsity channels are calibrated on a "
        "separate passage of the same text. Budget B0 = ctx/N is a fraction of the context "
        "length.",
        "",
    ]


def check_report_inputs(run_dir: str | Path) -> None:
    if not (Path(run_dir) / "records.jsonl").is_file():
        raise ValueError(f"run_dir {str(run_dir)!r} has no records.jsonl: run the sweep first")

"""PNG plots of a sweep (matplotlib, the eval extra): accuracy against the average budget per
method, perplexity against the budget, and the distribution of per-head budgets per layer under
Twilight. Inputs are the tables of ``runner.collect`` and the ``budgets_<length>.npz`` traces,
so plots can be redrawn on any machine from a finished sweep's folder.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from twilight_jax.runtime.eval.settings import Method

# One colour per method family, stable across figures.
_COLOURS = {
    "Dense": "black",
    "Quest": "tab:blue",
    "DS": "tab:green",
    "Oracle top-k": "tab:gray",
    "Streaming": "tab:brown",
    "Twilight (Full)": "tab:red",
    "Twilight (Quest)": "tab:purple",
    "Twilight (DS)": "tab:orange",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on the evaluation machines
    import matplotlib.pyplot as plt

    return plt


def _family_points(cells: Mapping[str, tuple[float, float]]) -> dict[str, list]:
    """{method: (x, y)} -> {family: [(x, y, method), ...] sorted by x}."""
    fams: dict[str, list] = defaultdict(list)
    for method, (x, y) in cells.items():
        fams[Method.parse(method).family].append((x, y, method))
    return {f: sorted(p) for f, p in fams.items()}


def _budget_axes(ax, families, length, ylabel):
    for family, pts in sorted(families.items()):
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        colour = _COLOURS.get(family)
        if family == "Dense":
            ax.axhline(ys[0], color=colour, linestyle="--", linewidth=1, label="Dense")
            continue
        ax.plot(xs, ys, marker="o", color=colour, label=family)
        for x, y, method in pts:
            m = Method.parse(method)
            tag = f"p={m.top_p:g}" if m.top_p is not None else m.name.split(":", 1)[-1]
            ax.annotate(tag, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
    ax.set_xscale("log", base=2)
    ax.set_title(f"context {length}")
    ax.set_xlabel("average attended tokens (sparse layers)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def plot_accuracy_vs_budget(table: Mapping, path: str | Path) -> Path:
    """Mean accuracy over tasks against mean attended tokens, one panel per length.

    table: ``runner.collect``'s accuracy table {(method, task, length): stats}.
    """
    plt = _pyplot()
    by_length: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for (method, _task, length), s in table.items():
        by_length[length][method].append(s)
    lengths = sorted(by_length)
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        cells = {
            m: (
                float(np.mean([c["attended"] for c in cs])),
                float(np.mean([c["accuracy"] for c in cs])),
            )
            for m, cs in by_length[length].items()
        }
        _budget_axes(ax, _family_points(cells), length, "accuracy (%), mean over tasks")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_perplexity_vs_budget(ppl: Mapping, path: str | Path) -> Path | None:
    """Perplexity against mean attended tokens, one panel per length; None without data.

    ppl: ``runner.collect``'s perplexity table {(method, length): stats}.
    """
    if not ppl:
        return None
    plt = _pyplot()
    lengths = sorted({length for _, length in ppl})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        cells = {m: (s["attended"], s["perplexity"]) for (m, n), s in ppl.items() if n == length}
        _budget_axes(ax, _family_points(cells), length, "perplexity")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_head_budgets(
    traces: Mapping[int, str | Path], path: str | Path, *, dense_layers: int, label: str
) -> Path | None:
    """Box plots of per-head budgets (attended tokens / context) per layer, one row per length.

    traces: {length: budgets_<length>.npz} with counts [steps, L, Hs] and context [steps].
    Layers below ``dense_layers`` attend to everything and are left out.
    """
    traces = {n: Path(p) for n, p in traces.items() if Path(p).is_file()}
    if not traces:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(traces), 1, figsize=(12, 3 * len(traces)), squeeze=False)
    for ax, (length, file) in zip(axes[:, 0], sorted(traces.items())):
        with np.load(file) as f:
            counts, context = f["counts"], f["context"]
        frac = counts[:, dense_layers:, :] / np.maximum(context, 1)[:, None, None]
        layers = range(dense_layers, counts.shape[1])
        data = [frac[:, i, :].reshape(-1) for i in range(frac.shape[1])]
        ax.boxplot(data, positions=list(layers), widths=0.6, showfliers=False)
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("attended / context")
        ax.set_title(
            f"{label}: per-head budget per layer, context {length} "
            f"({counts.shape[0]} decode steps x {counts.shape[2]} KV heads)"
        )
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def head_budget_summary(trace: str | Path, dense_layers: int) -> Sequence[dict]:
    """Per sparse layer: median, 10th and 90th percentile of attended / context."""
    with np.load(trace) as f:
        counts, context = f["counts"], f["context"]
    frac = counts[:, dense_layers:, :] / np.maximum(context, 1)[:, None, None]
    out = []
    for i in range(frac.shape[1]):
        v = frac[:, i, :].reshape(-1)
        out.append(
            {
                "layer": dense_layers + i,
                "p10": float(np.percentile(v, 10)),
                "median": float(np.median(v)),
                "p90": float(np.percentile(v, 90)),
            }
        )
    return out

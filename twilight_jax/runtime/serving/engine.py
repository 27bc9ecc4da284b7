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
3. dispatches one decode step over the decoding requests (sampling one token each), then
   reads back the step dispatched in the iteration before and applies its tokens: stop tokens,
   stop strings and max_tokens. The loop runs one step ahead: the devices compute step k + 1
   while the host handles step k's tokens. Step k + 1 takes each continuing row's input token
   from step k's output on the device; all other per-row inputs travel as one packed array,
   and the page table only when the rows or their pages change.

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

Several processes (jax.distributed, the model split over a mesh holding every process's
devices): every process builds the same engine; process 0 calls ``start`` (and serves HTTP),
the others ``follow``: they make each device call process 0's engine makes, with the arrays it
broadcasts (``lockstep``), until it shuts down. The page pool is the smallest any process
would size.

This module holds the public, thread-safe API and the loop; the engine thread's work is split
by concern: ``scheduler`` (admission, pages, preemption, request ends, faults), ``stepping``
(prefill and decode calls, sampling, stop rules, events), ``sizing`` (EngineConfig, the page
pool, the buckets) and ``lockstep`` (the device calls sent to the other processes).
"""

from __future__ import annotations

import collections
import itertools
import secrets
import threading
import time
import traceback
from collections.abc import Callable, Sequence

import jax

from twilight_jax.cache import PageAllocator
from twilight_jax.config import SparsityConfig
from twilight_jax.runtime.model_api import check_model
from twilight_jax.runtime.serving.lockstep import Lockstep
from twilight_jax.runtime.serving.metrics import ServingMetrics
from twilight_jax.runtime.serving.requests import (
    Completion,
    EngineStoppedError,
    InvalidRequestError,
    QueueFullError,
    Request,
    RequestOutput,
    SamplingParams,
)
from twilight_jax.runtime.serving.scheduler import Scheduler, log
from twilight_jax.runtime.serving.sizing import EngineConfig, gib, page_bytes, size_pool
from twilight_jax.runtime.serving.stepping import Stepper
from twilight_jax.sharding import spans_processes

# The device calls (``_run_<op>``) process 0 may send to the other processes.
_OPS = ("prefill", "sample", "decode", "fetch", "new_cache", "idle")


class Engine(Scheduler, Stepper):
    """Continuous batching over one model.

    model: a ``DecodeModel`` (``twilight_jax.runtime.model_api``; ``models.JittedLlama``,
      whose prefill and decode_step donate the cache). Requests may set their own Twilight p:
      it enters decode_step as a [B] float32 array, so no p compiles anything.
    tokenizer: ``decode`` and ``stream_decoder()`` (``models.tokenizer.Tokenizer``).
    sparsity: the attention configuration of every decode step (static).
    memory_stats: a function returning ``memory_stats()`` of each device the cache lives on
      (default: this process's devices of the model's mesh, or the default device); used to
      size the pool.
    """

    # Under jax.distributed, process 0 sends a no-op this often while it has nothing to do,
    # so the other processes never sit in one collective long enough for it to time out.
    keepalive_s = 10.0

    def __init__(
        self,
        model,
        tokenizer,
        sparsity: SparsityConfig,
        config: EngineConfig | None = None,
        metrics: ServingMetrics | None = None,
        memory_stats: Callable[[], Sequence[dict | None]] | None = None,
    ):
        if not isinstance(sparsity, SparsityConfig):
            raise ValueError(f"sparsity must be a SparsityConfig, got {type(sparsity).__name__}")
        config = EngineConfig() if config is None else config
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
            quest_metadata=self.sparsity.quest_metadata,
        )
        if memory_stats is None:
            memory_stats = self._device_memory_stats
        self.num_pages, self.pool_note = size_pool(
            config, self.page_bytes, self.max_pages, self.page_size, memory_stats
        )
        self._lockstep = Lockstep() if spans_processes(model.mesh) else None
        if self._lockstep is not None:
            # Every process's cache has the same shape: the pool all of them can hold.
            agreed = self._lockstep.agree_min(self.num_pages)
            if agreed != self.num_pages:
                self.pool_note += f"; {agreed} pages, the smallest pool of the processes"
            self.num_pages = agreed
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
        self._inflight = None  # the decode step dispatched and not read back yet
        # Device side of the steps (every process): the results not read back yet, oldest
        # first, by step number, and the last step's tokens (the next step's inputs).
        self._unread: collections.deque = collections.deque()
        self._last_tokens = None
        self._last_step_end = 0.0
        self._steps_made = 0  # decode steps planned by this process (process 0 numbers them)
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
        if mesh is None:
            return [jax.devices()[0].memory_stats()]
        # Under jax.distributed the other processes' devices report to their own process.
        here = jax.process_index()
        return [d.memory_stats() for d in mesh.devices.flat if d.process_index == here]

    def describe(self) -> str:
        """One line: batch, context and the KV pool."""
        return (
            f"batch {self.config.max_batch}, context {self.config.max_seq_len}, KV pool "
            f"{self.num_pages - 1} pages x {self.page_bytes / 2**10:.0f} KiB = "
            f"{gib((self.num_pages - 1) * self.page_bytes)} ({self.pool_note})"
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

    @property
    def follower(self) -> bool:
        """Whether this process follows process 0's engine (jax.distributed, process > 0)."""
        return self._lockstep is not None and not self._lockstep.leader

    def start(self) -> Engine:
        """Starts the engine thread (idempotent). Under jax.distributed: process 0 only."""
        if self.follower:
            raise RuntimeError(
                f"process {self._lockstep.process} of {self._lockstep.processes} follows "
                "process 0's engine: call follow(), not start()"
            )
        if self._lockstep is not None and self._lockstep.stopped:
            raise RuntimeError(
                "the other processes stopped following when this engine shut down: under "
                "jax.distributed an engine runs once"
            )
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

    def follow(self) -> int:
        """Processes other than 0 under jax.distributed: makes every device call process 0's
        engine makes, in the same order and with the same arrays, until process 0 shuts its
        engine down. Blocks; returns the number of calls made."""
        if not self.follower:
            raise RuntimeError(
                "follow() is for processes other than 0 of a jax.distributed job whose model "
                "mesh spans the processes; this engine runs itself: call start()"
            )
        calls = 0
        while True:
            op, args = self._lockstep.receive()
            if op == "stop":
                return calls
            if op not in _OPS:
                raise RuntimeError(f"process 0 sent an unknown engine call {op!r}")
            try:
                getattr(self, "_run_" + op)(**args)
            except Exception:
                # Process 0 made the same call; it fails it (and rebuilds the cache if the
                # call consumed it) and sends what comes next, which this process follows.
                log.error(
                    "%s failed on process %d: %s",
                    op,
                    self._lockstep.process,
                    traceback.format_exc(limit=3),
                )
            calls += 1

    # ------------------------------------------------------------------ engine thread
    def _device(self, op: str, **args):
        """Makes the device call ``_run_<op>(**args)`` (host arrays in and out); under
        jax.distributed it is first sent to the other processes, which make it too."""
        if self._lockstep is not None:
            self._lockstep.send(op, args)
        return getattr(self, "_run_" + op)(**args)

    def _run_idle(self) -> None:
        pass

    def _loop(self) -> None:
        keepalive = None if self._lockstep is None else self.keepalive_s
        while True:
            idle = False
            with self._lock:
                while (
                    not self._stopping
                    and not self._waiting
                    and not self._running
                    and not self._outbox
                    and self._inflight is None
                ):
                    if not self._lock.wait(keepalive):
                        idle = True
                        break
                if self._stopping:
                    break
            if idle:
                self._device("idle")
                continue
            try:
                self._iteration()
            except Exception:  # the loop must survive any fault
                self._fail_running(f"engine fault: {traceback.format_exc(limit=3)}")
            self._flush()
        self._drain()
        if self._lockstep is not None:
            self._lockstep.send("stop", {})

    def _iteration(self) -> None:
        self._flush()
        while batch := self._admit():
            self._prefill(batch)
            self._flush()
        self._prefill_chunk()
        self._flush()
        self._decode()

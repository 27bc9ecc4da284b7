"""The engine's bookkeeping of requests and pages: admission, page growth, preemption, the
end of a request, and recovery from failed model calls. A part of ``Engine`` (a mixin): it
works on the state ``Engine.__init__`` sets up, under ``self._lock`` where a method says so.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Sequence

import jax
import numpy as np

from twilight_jax.cache import PagedKVCache
from twilight_jax.runtime.serving.requests import Request, State

log = logging.getLogger("twilight_jax.serving")


class Scheduler:
    """Admission, pages and preemption, request ends and faults of ``Engine``."""

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

    def _grow(self, ahead=frozenset()) -> None:
        """Under the lock: gives every decoding request, oldest first, the pages its next token
        needs (one token further for those whose seq is in ``ahead``: a step in flight adds
        one); while the pool is short, preempts the newest running request (the one asking,
        if it is the newest)."""
        for req in sorted((r for r in self._running if r.state is State.DECODE), key=_seq):
            tokens = req.cached + 1 + (req.seq in ahead)
            need = self._pages_for(tokens) - len(self.allocator.pages(req.request_id))
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
            quest_metadata=self.sparsity.quest_metadata,
        )

    def _run_new_cache(self) -> None:
        self.cache = None  # the old buffers go before the new ones come
        self._unread.clear()
        self._last_tokens = None
        self.cache = self._new_cache()
        self._table_key = None

    def _rebuild_cache(self, keep: Sequence[Request] = ()) -> None:
        """After a failed call consumed the cache: a fresh one, and every running request but
        ``keep`` is preempted (its K/V went with the old cache) to be recomputed."""
        log.error("the cache was lost with a failed model call; rebuilding it")
        self._inflight = None  # its K/V went with the old cache; its rows are recomputed
        self._device("new_cache")
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

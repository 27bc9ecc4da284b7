"""The engine's model calls and what follows them: prefill (whole prompts or chunks), the decode
step at its batch and context buckets, sampling, stop rules and the events a request emits.
A part of ``Engine`` (a mixin): it works on the state ``Engine.__init__`` sets up, taking
``self._lock`` around every change of a request.

Every device call is a ``_run_<op>`` method that takes host (numpy) arrays and returns host
arrays or nothing, made through ``Engine._device``: under jax.distributed the other processes
make the same calls with the same arrays (``lockstep``). The decode step is two calls: "decode"
dispatches it and keeps its results on the devices, "fetch" reads them back, one step later.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import traceback
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from twilight_jax.runtime.sampling import sample_tokens
from twilight_jax.runtime.serving.requests import Request, RequestOutput, State
from twilight_jax.runtime.serving.scheduler import log
from twilight_jax.runtime.serving.sizing import bucket, next_pow2
from twilight_jax.sharding import to_host

# The per-row inputs of a decode step, packed as rows of one int32 array so that a step costs
# one host-to-device copy (floats and uint32 travel as their bits). src: the row's slot in the
# step before, whose sampled token is its input (-1: ``token`` is).
STEP_FIELDS = (
    "src",
    "token",
    "length",
    "active",
    "top_p",
    "temperature",
    "sample_top_p",
    "top_k",
    "seed",
    "step",
)
_FLOAT_FIELDS = frozenset({"top_p", "temperature", "sample_top_p"})
_NO_TOKENS = np.zeros((1,), np.int32)


def pack_step(**cols: np.ndarray) -> np.ndarray:
    """[len(STEP_FIELDS), bb] int32 from one [bb] array per field (float32 / uint32 fields
    by their bits)."""
    if set(cols) != set(STEP_FIELDS):
        raise ValueError(f"pack_step needs exactly {STEP_FIELDS}, got {sorted(cols)}")
    rows = []
    for name in STEP_FIELDS:
        x = np.asarray(cols[name])
        if name in _FLOAT_FIELDS:
            x = x.astype(np.float32).view(np.int32)
        elif x.dtype == np.uint32:
            x = x.view(np.int32)
        rows.append(x.astype(np.int32))
    return np.stack(rows)


@jax.jit
def _step_inputs(packed, prev_tokens):
    """The per-row arrays of ``pack_step``'s packing, each [bb] (``active`` as bool), with the
    input tokens taken from ``prev_tokens`` (the last step's samples, on the device) where
    src >= 0."""
    x = dict(zip(STEP_FIELDS, packed))
    for name in _FLOAT_FIELDS:
        x[name] = jax.lax.bitcast_convert_type(x[name], jnp.float32)
    x["seed"] = jax.lax.bitcast_convert_type(x["seed"], jnp.uint32)
    x["active"] = x["active"] != 0
    src = x["src"]
    chained = prev_tokens[jnp.clip(src, 0, prev_tokens.shape[0] - 1)]
    x["token"] = jnp.where(src >= 0, chained, x["token"])
    return x


@functools.partial(jax.jit, static_argnames=("dense_layers",))
def _sample_step(logits, counts, temperature, sample_top_p, top_k, seed, step, *, dense_layers):
    """The step's next tokens [B] and each row's attended tokens [B] f32, averaged over the
    sparse layers and the heads of counts [L, B, H] (NaN without sparse layers)."""
    new = sample_tokens(logits, temperature, sample_top_p, top_k, seed, step)
    sparse = counts[dense_layers:].astype(jnp.float32)
    return new, jnp.mean(sparse, axis=(0, 2))


@dataclasses.dataclass
class _Step:
    """A decode step dispatched and not read back yet."""

    rows: list[Request]
    epochs: list[int]  # each row's preemption count at dispatch: a later one voids its token
    key: tuple  # the decode layout its page table holds (Engine._table_key)
    table: np.ndarray | None
    packed: np.ndarray
    context: np.ndarray  # [n] cached tokens of each row after the step
    t0: float
    tag: np.ndarray  # its number (0-d int64), which the read-back names

    def alive(self, i: int) -> bool:
        """Whether row i still decodes as at the dispatch (not ended or preempted since)."""
        req = self.rows[i]
        return req.state is State.DECODE and req.preemptions == self.epochs[i]

    def alive_rows(self) -> list[tuple[int, Request]]:
        """(row index at dispatch, request) of the rows still alive."""
        return [(i, r) for i, r in enumerate(self.rows) if self.alive(i)]

    def live(self) -> list[Request]:
        return [r for _, r in self.alive_rows()]


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of text that could begin a stop string (held back from events)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


class Stepper:
    """Prefill, decode steps, sampling and events of ``Engine``."""

    def _prefill(self, batch: list[Request]) -> None:
        n = len(batch)
        rows = min(next_pow2(n), self.config.max_batch)
        longest = max(len(r.prefill_tokens) for r in batch)
        t = min(max(self.config.min_prefill_len, next_pow2(longest)), self._prefill_cap)
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
            self._device("prefill", tokens=tokens, lengths=lengths, table=table, start=None)
        except Exception:
            self._prefill_failed(batch, traceback.format_exc(limit=3))
            return
        self._start_decoding(batch)

    def _run_prefill(self, tokens, lengths, table, start) -> None:
        """model.prefill of [rows, T] tokens on a view of the cache holding those rows' page
        tables (start: chunk offsets [rows], or None for whole prompts); the logits stay on
        the devices (``self._logits``) for ``_run_sample``."""
        rows = tokens.shape[0]
        cached = np.zeros((rows,), np.int32) if start is None else start
        view = dataclasses.replace(
            self.cache, page_table=jnp.asarray(table), lengths=jnp.asarray(cached)
        )
        self._logits, view = self.model.prefill(tokens, lengths, view, start=start)
        # The donated view's page pool is the only live copy now.
        self.cache = view
        self._table_key = None

    def _run_sample(self, temperature, sample_top_p, top_k, seed) -> np.ndarray:
        """The first token of each row of the last prefill: [rows] int32."""
        return np.asarray(
            sample_tokens(
                self._logits,
                jnp.asarray(temperature),
                jnp.asarray(sample_top_p),
                jnp.asarray(top_k),
                jnp.asarray(seed),
                jnp.zeros(temperature.shape, jnp.int32),
            )
        )

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
            self._device(
                "prefill",
                tokens=tokens,
                lengths=np.array([len(piece)], np.int32),
                table=table,
                start=np.array([start], np.int32),
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
        self._start_decoding([req])

    def _start_decoding(self, batch: list[Request]) -> None:
        """Moves freshly prefilled requests into the decode batch (the last prefill's logits:
        [rows >= len(batch), vocab]). A new request samples its first token from the logits;
        a recomputed one has all its tokens but the last output cached and goes on from that
        token with a decode step, as it would have without the preemption (prefill attention
        is dense, decode attention may be sparse: a token sampled from the prefill could
        differ)."""
        n, rows = len(batch), self._logits.shape[0]
        fresh = [not r.output for r in batch]
        first = None
        if any(fresh):
            params = [r.params for r in batch] + [None] * (rows - n)
            first = self._device(
                "sample",
                temperature=np.array([p.temperature if p else 0.0 for p in params], np.float32),
                sample_top_p=np.array([p.sample_top_p if p else 1.0 for p in params], np.float32),
                top_k=np.array([p.top_k if p else 0 for p in params], np.int32),
                seed=np.array([r.seed for r in batch] + [0] * (rows - n), np.uint32),
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

    def _decode(self) -> None:
        """Dispatches the next decode step, then reads back the one before it: the devices run
        step k + 1 while the host applies the tokens of step k. A row of step k + 1 takes its
        input token from step k's output on the device. A request that step k ends with a stop
        token or string still rides in step k + 1, whose token for it is dropped; one that step
        k brings to max_tokens does not."""
        prev, self._inflight = self._inflight, None
        step, error = self._plan_step(prev), None
        if step is not None:
            try:
                self._device("decode", packed=step.packed, table=step.table, tag=step.tag)
                self._table_key = step.key
            except Exception:
                error = traceback.format_exc(limit=3)
        if prev is not None and not self._finish_step(prev) and step is not None:
            if error is None:
                # Step k + 1 ran on step k's tokens: drop it and recompute its rows (unless
                # the cache went, with its results, in the failure).
                if self._unread:
                    self._discard_step(step)
                with self._lock:
                    for req in step.live():
                        self._preempt(req)
            return
        if step is None:
            return
        if error is not None:
            self._decode_failed(step.rows, error)
        else:
            self._inflight = step

    def _plan_step(self, prev: _Step | None) -> _Step | None:
        """The rows and host arrays of the next decode step, its pages granted (None: no row
        decodes). ``prev``: the step in flight, whose tokens are not read back yet."""
        with self._lock:
            # A row's slot is its index among the rows the step was dispatched with (its row
            # of the step's output), not among those still alive.
            slot = {} if prev is None else {r.seq: j for j, r in prev.alive_rows()}
            if not any(r.state is State.DECODE for r in self._running):
                return None
            self._grow(ahead=slot)
            rows = [
                r
                for r in self._running
                if r.state is State.DECODE and len(r.output) + (r.seq in slot) < r.params.max_tokens
            ]
            if not rows:
                return None
            n = len(rows)
            bb = bucket(n, self.config.max_batch)
            ahead = np.array([r.seq in slot for r in rows], np.int32)
            cached = np.array([r.cached for r in rows], np.int32) + ahead
            width = bucket(self._pages_for(int(cached.max()) + 1), self.max_pages)
            key = (bb, width, self._version, tuple(r.seq for r in rows))
            table = None if key == self._table_key else self._table(rows, bb, width)
            # Rows in the step in flight take their input token from it on the device.
            src = [slot.get(r.seq, -1) for r in rows]
            token = [0 if j >= 0 else r.output[-1] for r, j in zip(rows, src)]
            steps = np.array([len(r.output) for r in rows], np.int32) + ahead
            epochs = [r.preemptions for r in rows]
            self._publish_state()

        def col(values, dtype, pad=0):
            return np.array(list(values) + [pad] * (bb - n), dtype)

        default_p = self.sparsity.top_p or 1.0
        packed = pack_step(
            src=col(src, np.int32, -1),
            token=col(token, np.int32),
            length=col(cached, np.int32),
            active=col([1] * n, np.int32),
            top_p=col(
                (
                    (default_p if r.params.sparsity_top_p is None else r.params.sparsity_top_p)
                    for r in rows
                ),
                np.float32,
                1.0,
            ),
            temperature=col((r.params.temperature for r in rows), np.float32),
            sample_top_p=col((r.params.sample_top_p for r in rows), np.float32, 1.0),
            top_k=col((min(r.params.top_k, self.model.config.vocab_size) for r in rows), np.int32),
            seed=col((r.seed for r in rows), np.uint32),
            step=col(steps, np.int32),
        )
        self._steps_made += 1
        tag = np.array(self._steps_made, np.int64)
        return _Step(rows, epochs, key, table, packed, cached + 1, time.monotonic(), tag)

    def _finish_step(self, step: _Step) -> bool:
        """Reads a dispatched step's tokens back and applies them; False when it failed (its
        requests are failed)."""
        try:
            new, attended = self._device("fetch", tag=step.tag)
        except Exception:
            self._decode_failed(step.rows, traceback.format_exc(limit=3))
            return False
        n = len(step.rows)
        self._record_attention(attended[:n], step.context, step.t0)
        events = []
        with self._lock:
            for i, req in enumerate(step.rows):
                if not step.alive(i):
                    continue  # cancelled, ended or preempted since the dispatch
                req.cached += 1
                self._accept_token(req, int(new[i]), events)
            self._publish_state()
        self._send(events)
        return True

    def _discard_step(self, step: _Step) -> None:
        """Reads back and drops a dispatched step (so that no process keeps it unread)."""
        try:
            self._device("fetch", tag=step.tag)
        except Exception:
            pass  # it is dropped either way

    def _run_decode(self, packed, table, tag) -> None:
        """Dispatches one decode step over [bb] rows and the sampling of their next tokens,
        without waiting for it; ``_run_fetch`` reads the results back, oldest step first.

        packed: ``pack_step``'s [len(STEP_FIELDS), bb] int32 (one host-to-device copy).
        table: [bb, width] int32, or None to keep the page table of the cache the last step
        returned. tag: the step's number, which ``_run_fetch`` asks for.
        """
        prev = self._last_tokens if self._last_tokens is not None else _NO_TOKENS
        x = _step_inputs(jnp.asarray(packed), prev)
        # The cache is donated to each step, so an unchanged table is the copy the last step
        # returned; uploading [B, max_pages] every step would cost megabytes at long contexts.
        page_table = self.cache.page_table if table is None else jnp.asarray(table)
        cache = dataclasses.replace(self.cache, page_table=page_table, lengths=x["length"])
        logits, self.cache, info = self.model.decode_step(
            x["token"], cache, self.sparsity, x["active"], top_p=x["top_p"]
        )
        new, attended = _sample_step(
            logits,
            info.counts,
            x["temperature"],
            x["sample_top_p"],
            x["top_k"],
            x["seed"],
            x["step"],
            dense_layers=self.sparsity.dense_layers,
        )
        self._last_tokens = new
        self._unread.append((int(tag), new, attended))

    def _run_fetch(self, tag) -> tuple[np.ndarray, np.ndarray]:
        """Step ``tag``'s tokens [bb] int32 and attended tokens per row [bb] f32 (averaged over
        sparse layers and heads; NaN when every layer is dense). Unread steps older than it
        are dropped: under jax.distributed a step that failed on process 0 alone is never read
        back here."""
        tag = int(tag)
        while self._unread and self._unread[0][0] < tag:
            self._unread.popleft()
        if not self._unread or self._unread[0][0] != tag:
            raise RuntimeError(f"decode step {tag} was not dispatched here")
        _, new, attended = self._unread.popleft()
        return np.asarray(new), to_host(attended)

    def _record_attention(self, attended: np.ndarray, context: np.ndarray, t0: float) -> None:
        ctx = float(context.mean())
        sparse = self.sparsity.dense_layers < self.model.config.num_layers
        # Steps overlap (one ahead): a step's time starts where the last one's ended.
        t0 = max(t0, self._last_step_end)
        self.metrics.record_step(t0, len(context), float(attended.mean()) if sparse else ctx, ctx)
        self._last_step_end = time.monotonic()

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
        end = len(req.text) if final else len(req.text) - stop_holdback(req.text, req.params.stop)
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

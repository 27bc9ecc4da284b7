"""Serving metrics, rendered in the Prometheus text exposition format (version 0.0.4).

The engine thread records events; the HTTP thread renders. One lock guards everything, and
every record is O(1), so the decode loop never waits on a scrape for long. Rates (tokens per
second, attended tokens, pruned fraction) are taken over a sliding window of recent decode
steps, so the gauges describe what the server is doing now rather than since it started.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import threading
import time

# Seconds. Wide enough for CPU tests (slow) and an H200 (a few ms per token).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FINISH_REASONS = ("stop", "length", "cancelled", "error")


class Histogram:
    """Cumulative-bucket histogram as Prometheus expects (le buckets, sum, count)."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        running = 0
        for le, c in zip(self.buckets, self.counts):
            running += c
            lines.append(f'{name}_bucket{{le="{le}"}} {running}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum {self.sum:.6f}")
        lines.append(f"{name}_count {self.count}")
        return lines


@dataclasses.dataclass
class _Step:
    t0: float  # monotonic time at the start of the step
    t: float  # monotonic time at the end of the step
    tokens: int  # tokens generated in the step
    attended: float  # tokens attended, averaged over sequences, sparse layers and KV heads
    context: float  # tokens in the cache, averaged over the same sequences


class ServingMetrics:
    """Counters, gauges and histograms of one engine.

    window_s: length of the sliding window behind the rate gauges.
    """

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self._lock = threading.Lock()
        self._steps: collections.deque[_Step] = collections.deque()
        self.queue_depth = 0
        self.running = 0
        self.max_batch = 0
        self.pages_total = 0
        self.pages_free = 0
        self.requests = dict.fromkeys(FINISH_REASONS, 0)
        self.preemptions = 0
        self.rejected: collections.Counter[int] = collections.Counter()  # by HTTP status
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.decode_steps = 0
        self.attended_tokens = 0.0
        self.context_tokens = 0.0
        self.tpot = Histogram()
        self.ttft = Histogram()
        self.e2e = Histogram(LATENCY_BUCKETS + (30.0, 60.0, 120.0))

    # ------------------------------------------------------------------ recording
    def set_state(self, *, queue_depth: int, running: int, pages_free: int) -> None:
        with self._lock:
            self.queue_depth = queue_depth
            self.running = running
            self.pages_free = pages_free

    def set_capacity(self, *, max_batch: int, pages_total: int) -> None:
        with self._lock:
            self.max_batch = max_batch
            self.pages_total = pages_total

    def record_step(self, t0: float, tokens: int, attended: float, context: float) -> None:
        """One decode step, begun at monotonic time ``t0``, that produced ``tokens`` tokens.

        attended / context: tokens attended / in the cache, averaged over the step's sequences
        (and over sparse layers and KV heads for attended).
        """
        now = time.monotonic()
        with self._lock:
            self.decode_steps += 1
            self.generation_tokens += tokens
            self.attended_tokens += attended * tokens
            self.context_tokens += context * tokens
            self._steps.append(_Step(t0, now, tokens, attended * tokens, context * tokens))
            self._trim(now)

    def record_first_token(self, ttft_s: float) -> None:
        """The first token of a request (sampled from its prefill)."""
        with self._lock:
            self.generation_tokens += 1
            self.ttft.observe(ttft_s)

    def record_preemption(self) -> None:
        with self._lock:
            self.preemptions += 1

    def record_finish(self, reason: str, prompt_tokens: int, tpot_s: float | None, e2e_s: float):
        with self._lock:
            self.requests[reason] = self.requests.get(reason, 0) + 1
            self.prompt_tokens += prompt_tokens
            if tpot_s is not None:
                self.tpot.observe(tpot_s)
            self.e2e.observe(e2e_s)

    def record_rejected(self, status: int) -> None:
        with self._lock:
            self.rejected[status] += 1

    def _trim(self, now: float) -> None:
        while self._steps and now - self._steps[0].t > self.window_s:
            self._steps.popleft()

    # ------------------------------------------------------------------ reading
    def window(self) -> dict[str, float]:
        """Rates over the sliding window: tokens_per_s, avg_attended, pruned_fraction."""
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            steps = list(self._steps)
        if not steps:
            return {"tokens_per_s": 0.0, "avg_attended": 0.0, "pruned_fraction": 0.0}
        tokens = sum(s.tokens for s in steps)
        attended = sum(s.attended for s in steps)
        context = sum(s.context for s in steps)
        # From the start of the oldest step still in the window to now: idle time after the
        # last step lowers the rate, as it should for "tokens per second lately".
        span = max(now - steps[0].t0, 1e-3)
        return {
            "tokens_per_s": tokens / span,
            "avg_attended": attended / tokens if tokens else 0.0,
            "pruned_fraction": 1.0 - attended / context if context > 0 else 0.0,
        }

    def render(self) -> str:
        w = self.window()
        with self._lock:
            lines = []

            def gauge(name, help_text, value):
                lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} gauge"])
                lines.append(f"{name} {value}")

            def counter(name, help_text, value, label=None):
                lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} counter"])
                if label is None:
                    lines.append(f"{name} {value}")
                else:
                    key, values = label
                    for k, v in values.items():
                        lines.append(f'{name}{{{key}="{k}"}} {v}')

            gauge("twilight_queue_depth", "Requests waiting for a batch slot.", self.queue_depth)
            gauge("twilight_running_requests", "Requests in the running batch.", self.running)
            gauge("twilight_max_batch", "Static maximum batch of the decode step.", self.max_batch)
            gauge("twilight_kv_pages_total", "KV-cache pages in the pool.", self.pages_total)
            gauge(
                "twilight_kv_pages_free", "KV-cache pages not held by a request.", self.pages_free
            )
            gauge(
                "twilight_generation_tokens_per_second",
                f"Output tokens per second over the last {self.window_s:g} s of decode steps.",
                f"{w['tokens_per_s']:.6f}",
            )
            gauge(
                "twilight_attended_tokens_avg",
                "Tokens attended per sequence, sparse layer and KV head, averaged over the "
                "window (the whole context for dense attention).",
                f"{w['avg_attended']:.6f}",
            )
            gauge(
                "twilight_attention_pruned_fraction",
                "Fraction of the context not attended by the sparse layers, over the window.",
                f"{w['pruned_fraction']:.6f}",
            )
            counter(
                "twilight_requests_finished_total",
                "Requests finished, by reason.",
                None,
                ("reason", dict(self.requests)),
            )
            counter(
                "twilight_requests_preempted_total",
                "Running requests preempted when the KV pool ran out (recomputed later).",
                self.preemptions,
            )
            counter(
                "twilight_requests_rejected_total",
                "Requests answered with an HTTP error, by status.",
                None,
                ("status", dict(sorted(self.rejected.items()))),
            )
            counter("twilight_prompt_tokens_total", "Prompt tokens prefilled.", self.prompt_tokens)
            counter(
                "twilight_generation_tokens_total", "Output tokens sampled.", self.generation_tokens
            )
            counter("twilight_decode_steps_total", "Decode steps run.", self.decode_steps)
            counter(
                "twilight_attended_tokens_total",
                "Sum over decode tokens of the average tokens attended (sparse layers).",
                f"{self.attended_tokens:.1f}",
            )
            counter(
                "twilight_context_tokens_total",
                "Sum over decode tokens of the context length (sparse layers).",
                f"{self.context_tokens:.1f}",
            )
            lines += self.tpot.render(
                "twilight_time_per_output_token_seconds",
                "Per request: (end - first token) / (output tokens - 1).",
            )
            lines += self.ttft.render(
                "twilight_time_to_first_token_seconds", "Per request: arrival to first token."
            )
            lines += self.e2e.render(
                "twilight_request_latency_seconds", "Per request: arrival to finish."
            )
        return "\n".join(lines) + "\n"

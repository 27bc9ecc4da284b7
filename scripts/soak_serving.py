"""Soak test of the OpenAI-compatible server over loopback: bounded mixed traffic, then an
account of every request and of the KV pages.

Starts ``python -m twilight_jax.serve`` on a free loopback port (default: the random toy model
with Twilight attention, a KV pool of two full contexts and a short queue, so that admission
waits, preemption and queue-full refusals all happen), or uses ``--url``. ``--clients``
concurrent clients send ``--requests`` requests in all, for at most ``--duration`` seconds,
drawn from this mix:

    greedy     completion of a probe prompt (temperature 0); every answer to the same probe
               must be the same text, whatever ran beside it
    stream     streamed completion, random prompt and length
    chat       chat completion
    sampled    completion at temperature 0.8 with a seed, random Twilight sparsity_top_p (when
               the server's attention prunes)
    hangup     streamed completion whose client disconnects after a few events
    too_long   prompt beyond the context (expect 400 context_length_exceeded)
    bad_json   malformed body (expect 400)
    bad_model  unknown model (expect 404)

Each response is classified: served (200, with a finish reason), rejected (by status and error
code), hung up by the client, or failed (5xx, connection error, timeout). Afterwards it waits for
the server to go idle and reads /metrics: pages leaked = pages total - pages free with nothing
running or queued, and the preemptions. A report is printed and written to ``--out``/soak.json.
Exit status 1 on leaked pages, failures, unexpected statuses or differing greedy answers.

    python scripts/soak_serving.py                       # tiny-random, 400 requests, 24 clients
    python scripts/soak_serving.py --url http://127.0.0.1:8000 --requests 100 --clients 8
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import re
import sys
import time
from pathlib import Path

import httpx

from bench_serving import WORDS, Server, percentile

KINDS = {  # kind: weight
    "greedy": 4,
    "stream": 4,
    "chat": 2,
    "sampled": 2,
    "hangup": 2,
    "too_long": 1,
    "bad_json": 1,
    "bad_model": 1,
}
EXPECTED = {"too_long": (400,), "bad_json": (400,), "bad_model": (404,)}
PROBES = 6  # distinct greedy prompts


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


class Soak:
    def __init__(self, args, url: str, model: str, context: int):
        self.args = args
        self.url = url
        self.model = model
        self.context = context
        self.records: list[dict] = []
        rng = random.Random(args.seed)
        # Probe prompts and lengths short enough to fit any context this script is run with.
        self.probes = [(_words(rng, rng.randint(3, 12)), rng.randint(8, 32)) for _ in range(PROBES)]
        self.greedy_texts: dict[int, set[str]] = collections.defaultdict(set)
        # Per-request Twilight p only where the server's attention prunes (else it is a 400).
        probe = {"model": model, "prompt": "x", "max_tokens": 1, "sparsity_top_p": 0.5}
        r = httpx.post(url + "/v1/completions", json=probe, timeout=args.request_timeout)
        self.sparsity_p = r.status_code == 200

    def body(self, kind: str, rng: random.Random) -> tuple[dict | bytes, str]:
        """(request body, path) of one request of this kind."""
        m = self.model
        if kind == "greedy":
            i = rng.randrange(PROBES)
            prompt, n = self.probes[i]
            return {
                "model": m,
                "prompt": prompt,
                "max_tokens": n,
                "temperature": 0,
                "ignore_eos": True,
                "_probe": i,
            }, "/v1/completions"
        if kind in ("stream", "hangup"):
            return {
                "model": m,
                "prompt": _words(rng, rng.randint(1, 25)),
                "max_tokens": rng.randint(4, 64),
                "temperature": 0,
                "stream": True,
                "ignore_eos": kind == "hangup",
            }, "/v1/completions"
        if kind == "chat":
            msg = [{"role": "user", "content": _words(rng, rng.randint(2, 20))}]
            return {
                "model": m,
                "messages": msg,
                "max_tokens": rng.randint(4, 48),
                "temperature": 0,
            }, "/v1/chat/completions"
        if kind == "sampled":
            return {
                "model": m,
                "prompt": _words(rng, rng.randint(2, 30)),
                "max_tokens": rng.randint(4, 48),
                "temperature": 0.8,
                "seed": rng.randrange(1 << 30),
                **({"sparsity_top_p": rng.choice([0.3, 0.6, 0.9, 1.0])} if self.sparsity_p else {}),
            }, "/v1/completions"
        if kind == "too_long":
            return {"model": m, "prompt": [1] * self.context, "max_tokens": 4}, "/v1/completions"
        if kind == "bad_json":
            return b'{"model": "x", "prompt": ', "/v1/completions"
        if kind == "bad_model":
            return {"model": "no-such-model", "prompt": "x", "max_tokens": 2}, "/v1/completions"
        raise ValueError(kind)

    async def one(self, client: httpx.AsyncClient, kind: str, rng: random.Random) -> dict:
        body, path = self.body(kind, rng)
        probe = body.pop("_probe", None) if isinstance(body, dict) else None
        rec = {"kind": kind}
        t0 = time.perf_counter()
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"content-type": "application/json"}
        try:
            if isinstance(body, dict) and body.get("stream"):
                await self._stream(client, path, content, headers, kind, rng, rec, t0)
            else:
                r = await client.post(self.url + path, content=content, headers=headers)
                rec["status"] = r.status_code
                data = r.json()
                if r.status_code == 200:
                    choice = data["choices"][0]
                    rec["finish_reason"] = choice["finish_reason"]
                    text = choice.get("text") or (choice.get("message") or {}).get("content")
                    if probe is not None:
                        self.greedy_texts[probe].add(text)
                else:
                    rec["code"] = data.get("error", {}).get("code")
        except (httpx.HTTPError, asyncio.TimeoutError, json.JSONDecodeError) as e:
            rec["exception"] = f"{type(e).__name__}: {e}"[:200]
        rec["e2e"] = time.perf_counter() - t0
        return rec

    async def _stream(self, client, path, content, headers, kind, rng, rec, t0):
        hang_after = rng.randint(1, 4) if kind == "hangup" else None
        events = 0
        async with client.stream("POST", self.url + path, content=content, headers=headers) as r:
            rec["status"] = r.status_code
            if r.status_code != 200:
                data = json.loads(await r.aread())
                rec["code"] = data.get("error", {}).get("code")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    rec["stream_error"] = chunk["error"].get("code")
                    return
                events += 1
                if events == 1:
                    rec["ttft"] = time.perf_counter() - t0
                for c in chunk.get("choices", ()):
                    if c.get("finish_reason"):
                        rec["finish_reason"] = c["finish_reason"]
                if hang_after is not None and events >= hang_after:
                    rec["hung_up"] = True
                    return  # leaving the block closes the connection mid-stream

    async def run(self, plan: list[str], records: list[dict]) -> float:
        """Sends the planned requests from --clients workers into records; returns the wall
        time. A client refused with 429 waits --backoff seconds, as a polite client would."""
        a = self.args
        plan = list(plan)
        deadline = time.perf_counter() + a.duration
        limits = httpx.Limits(max_connections=a.clients + 4)
        timeout = httpx.Timeout(a.request_timeout)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

            async def worker(seed):
                wrng = random.Random(seed)
                while plan and time.perf_counter() < deadline:
                    rec = await self.one(client, plan.pop(), wrng)
                    records.append(rec)
                    if rec.get("status") == 429:
                        await asyncio.sleep(a.backoff)

            t0 = time.perf_counter()
            await asyncio.gather(*(worker(a.seed * 1000 + i) for i in range(a.clients)))
            return time.perf_counter() - t0

    def plan(self, n: int, kinds=KINDS) -> list[str]:
        rng = random.Random(self.args.seed + n)
        names = list(kinds)
        return rng.choices(names, weights=[kinds[k] for k in names], k=n)


def classify(rec: dict) -> str:
    if "exception" in rec:
        return "failed: " + rec["exception"].split(":")[0]
    if rec.get("hung_up"):
        return "hung up by client"
    status = rec.get("status")
    if status == 200 and rec.get("stream_error"):
        return f"failed: in-stream {rec['stream_error']}"
    if status == 200:
        return "served"
    label = f"rejected {status} {rec.get('code')}"
    if status >= 500:
        return "failed: " + label
    return label


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(twilight_[a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+)$", line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def wait_idle(url: str, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if m["twilight_running_requests"] == 0 and m["twilight_queue_depth"] == 0:
            return m
        if time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def report(soak: Soak, wall: float, before: dict, after: dict) -> dict:
    recs = soak.records
    outcomes = collections.Counter(classify(r) for r in recs)
    unexpected = [
        r
        for r in recs
        if r["kind"] in EXPECTED
        and r.get("status") not in EXPECTED[r["kind"]]
        and classify(r) != "rejected 429 queue_full"
    ]
    served = [r for r in recs if classify(r) == "served"]
    lat = {}
    for key in ("e2e", "ttft"):
        xs = [r[key] for r in served if key in r]
        lat[key] = {f"p{q}_ms": 1000 * percentile(xs, q / 100) for q in (50, 90, 99)}
        lat[key]["n"] = len(xs)
    mismatched = {i: sorted(t) for i, t in soak.greedy_texts.items() if len(t) > 1}
    leaked = after["twilight_kv_pages_total"] - after["twilight_kv_pages_free"]
    idle = after["twilight_running_requests"] == 0 and after["twilight_queue_depth"] == 0

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    out = {
        "wall_s": wall,
        "sent": len(recs),
        "outcomes": dict(sorted(outcomes.items())),
        "by_kind": {
            k: dict(collections.Counter(classify(r) for r in recs if r["kind"] == k)) for k in KINDS
        },
        "latency_served": lat,
        "pages_total": after["twilight_kv_pages_total"],
        "pages_leaked": leaked,
        "idle_after": idle,
        "preemptions": delta("twilight_requests_preempted_total"),
        "finished_by_reason": {
            r: delta(f'twilight_requests_finished_total{{reason="{r}"}}')
            for r in ("stop", "length", "cancelled", "error")
        },
        "greedy_probes_checked": sum(len(t) >= 1 for t in soak.greedy_texts.values()),
        "greedy_mismatches": mismatched,
        "unexpected_statuses": [
            {k: r.get(k) for k in ("kind", "status", "code")} for r in unexpected
        ],
    }
    failed = sum(n for o, n in outcomes.items() if o.startswith("failed"))
    out["ok"] = bool(idle and leaked == 0 and not failed and not mismatched and not unexpected)
    return out


def print_report(rep: dict) -> None:
    print(f"\nsent {rep['sent']} requests in {rep['wall_s']:.1f} s")
    for outcome, n in rep["outcomes"].items():
        print(f"  {n:6d}  {outcome}")
    for key, q in rep["latency_served"].items():
        print(
            f"  {key} of served ({q['n']}): p50 {q['p50_ms']:.0f} ms, p90 {q['p90_ms']:.0f} ms, "
            f"p99 {q['p99_ms']:.0f} ms"
        )
    fin = ", ".join(f"{k} {v:.0f}" for k, v in rep["finished_by_reason"].items())
    print(f"  engine: finished {fin}; preemptions {rep['preemptions']:.0f}")
    print(
        f"  pages leaked: {rep['pages_leaked']:.0f} of {rep['pages_total']:.0f} "
        f"(idle: {rep['idle_after']}); greedy probes with differing answers: "
        f"{len(rep['greedy_mismatches'])} of {rep['greedy_probes_checked']}"
    )
    if rep["unexpected_statuses"]:
        print(f"  unexpected statuses: {rep['unexpected_statuses'][:5]}")
    print("OK" if rep["ok"] else "NOT OK")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="soak this running server instead")
    p.add_argument("--model", default="tiny-random", help="--model of the server")
    p.add_argument("--requests", type=int, default=400, help="requests in all")
    p.add_argument("--clients", type=int, default=24, help="concurrent clients")
    p.add_argument("--warmup", type=int, default=48, help="requests sent first, not counted")
    p.add_argument("--backoff", type=float, default=0.5, help="wait after a 429 (s)")
    p.add_argument("--duration", type=float, default=600.0, help="stop sending after (s)")
    p.add_argument("--request-timeout", type=float, default=300.0, help="a hang, after (s)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument(
        "--server-arg",
        action="append",
        default=None,
        help="extra server argument (default: --num-pages 33 --max-queue 12 --selector all "
        "--top-p 0.9: a pool of two full contexts, a short queue, Twilight attention)",
    )
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for soak.json")
    args = p.parse_args(argv)
    if args.server_arg is None:
        args.server_arg = ["--num-pages", "33", "--max-queue", "12", "--selector", "all"]
        args.server_arg += ["--top-p", "0.9"]
    args.modes = ["default"]

    server = None
    url = args.url.rstrip("/") if args.url else None
    if url is None:
        log = Path(args.out or "/tmp") / "soak_server.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        server = Server(args, "default", log)
    try:
        if server is not None:
            server.wait_ready(args.startup_timeout)
            url = server.url
        card = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]
        soak = Soak(args, url, card["id"], card["max_model_len"])
        if args.warmup:  # compiles the prefill and decode buckets; not counted
            asyncio.run(soak.run(soak.plan(args.warmup, {"stream": 1, "greedy": 1}), []))
            soak.greedy_texts.clear()
        before = wait_idle(url, 120.0)
        wall = asyncio.run(soak.run(soak.plan(args.requests), soak.records))
        after = wait_idle(url, 120.0)
    finally:
        if server is not None:
            server.stop()
    rep = report(soak, wall, before, after)
    print_report(rep)
    if args.out:
        path = Path(args.out) / "soak.json"
        path.write_text(json.dumps({"args": vars(args), "report": rep}, indent=1))
        print(f"wrote {path}")
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Load generator for the OpenAI-compatible server: throughput and latency, dense vs Twilight.

For each attention mode it starts ``python -m twilight_jax.serve`` on a free loopback port
(or uses ``--url``), warms it up, then for each concurrency sends ``--requests`` streaming
completions (``ignore_eos``, fixed ``--max-tokens``) from that many concurrent clients. Each
phase is bounded in requests and in time (``--phase-timeout``). Reported per phase: output
tokens/s, requests/s, and p50/p90/p99 of time to first token, time per output token and
end-to-end latency, plus the attention's average attended tokens and pruned fraction scraped
from /metrics. A table goes to stdout; the same numbers to ``--out``/serving.json and .csv.

    # GPU (the embedded default model, 4K-token prompts):
    python scripts/bench_serving.py --prompt-tokens 4096 --max-tokens 128 --requests 64 \\
        --concurrency 1,8,32 --max-batch 32 --max-seq-len 8192 --out docs/results/serving
    # CPU smoke run with a random toy model:
    python scripts/bench_serving.py --model tiny-random --prompt-tokens 48 --max-tokens 8 \\
        --requests 8 --concurrency 1,4 --max-batch 4 --max-seq-len 128
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

# Attention modes: extra server arguments ("default": the server's own default attention).
MODES = {
    "default": [],
    "dense": ["--selector", "dense"],
    "twilight": ["--selector", "all", "--top-p", "0.95"],
    "quest": ["--selector", "quest", "--top-p", "-1"],
    "quest+twilight": ["--selector", "quest", "--top-p", "0.95"],
}
WORDS = (
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot"
).split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def make_prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, words)))


def words_for(url, model, tokens: int) -> int:
    """Words of random text that make about ``tokens`` prompt tokens with the server's
    tokenizer (measured on a probe: one completion token, usage read back)."""
    n = 16  # short enough for a toy context
    probe = make_prompt(random.Random(1), n)
    r = httpx.post(
        url + "/v1/completions",
        json={"model": model, "prompt": probe, "max_tokens": 1},
        timeout=600,
    )
    if r.status_code != 200:
        raise RuntimeError(f"probe request failed: HTTP {r.status_code} {r.text[:300]}")
    per_word = r.json()["usage"]["prompt_tokens"] / n
    return max(1, int(tokens / per_word))


class Server:
    """A server subprocess on a free loopback port; stopped (by its own pid) on exit."""

    def __init__(self, args, mode: str, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "twilight_jax.serve", "--port", str(self.port)]
        if args.max_batch is not None:
            cmd += ["--max-batch", str(args.max_batch)]
        if args.max_seq_len is not None:
            cmd += ["--max-seq-len", str(args.max_seq_len)]
        cmd += ["--log-level", "warning", *MODES[mode]]
        if args.model:
            cmd += ["--model", args.model]
        cmd += args.server_arg
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        print(f"[{mode}] {' '.join(cmd)}", flush=True)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}; see {self.log.name}"
                )
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


async def one_request(client: httpx.AsyncClient, url, model, prompt, max_tokens, timeout):
    """Streams one completion; returns its timings (or an error)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    t0 = time.perf_counter()
    first = None
    usage = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": chunk["error"]["message"]}
                if chunk.get("choices") and first is None:
                    first = time.perf_counter()
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except (httpx.HTTPError, asyncio.TimeoutError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    n = usage["completion_tokens"] if usage else 0
    first = first or end
    return {
        "ttft": first - t0,
        "e2e": end - t0,
        "tpot": (end - first) / (n - 1) if n > 1 else None,
        "prompt_tokens": usage["prompt_tokens"] if usage else 0,
        "completion_tokens": n,
    }


async def run_phase(url, model, prompts, concurrency, max_tokens, phase_timeout, req_timeout):
    """Sends every prompt with ``concurrency`` workers; stops launching at phase_timeout."""
    queue = list(prompts)
    results = []
    deadline = time.perf_counter() + phase_timeout
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits) as client:

        async def worker():
            while queue and time.perf_counter() < deadline:
                prompt = queue.pop()
                results.append(
                    await one_request(client, url, model, prompt, max_tokens, req_timeout)
                )

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return results, wall


def scrape(url) -> dict[str, float]:
    """Counters of /metrics this benchmark reads."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for name in ("twilight_attended_tokens_total", "twilight_context_tokens_total"):
        m = re.search(rf"^{name} ([0-9.eE+-]+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


def summarize(mode, concurrency, results, wall, before, after) -> dict:
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["completion_tokens"] for r in ok)
    attended = after["twilight_attended_tokens_total"] - before["twilight_attended_tokens_total"]
    context = after["twilight_context_tokens_total"] - before["twilight_context_tokens_total"]
    row = {
        "mode": mode,
        "concurrency": concurrency,
        "requests": len(ok),
        "errors": len(results) - len(ok),
        "wall_s": wall,
        "prompt_tokens_avg": statistics.mean(r["prompt_tokens"] for r in ok) if ok else 0,
        "output_tok_s": tokens / wall if wall else 0.0,
        "req_s": len(ok) / wall if wall else 0.0,
        "attended_avg": attended / tokens if tokens else float("nan"),
        "pruned_frac": 1 - attended / context if context else float("nan"),
    }
    for key in ("ttft", "tpot", "e2e"):
        xs = [r[key] for r in ok if r[key] is not None]
        for q in (50, 90, 99):
            row[f"{key}_p{q}_ms"] = 1000 * percentile(xs, q / 100)
    if len(results) != len(ok):
        row["first_error"] = next(r["error"] for r in results if "error" in r)
    return row


COLUMNS = [
    ("mode", "{:>14}"),
    ("concurrency", "{:>5}"),
    ("requests", "{:>5}"),
    ("errors", "{:>4}"),
    ("prompt_tokens_avg", "{:>7.0f}"),
    ("output_tok_s", "{:>9.1f}"),
    ("req_s", "{:>6.2f}"),
    ("ttft_p50_ms", "{:>8.1f}"),
    ("ttft_p99_ms", "{:>8.1f}"),
    ("tpot_p50_ms", "{:>8.2f}"),
    ("tpot_p90_ms", "{:>8.2f}"),
    ("tpot_p99_ms", "{:>8.2f}"),
    ("e2e_p50_ms", "{:>9.1f}"),
    ("e2e_p99_ms", "{:>9.1f}"),
    ("attended_avg", "{:>8.1f}"),
    ("pruned_frac", "{:>6.3f}"),
]


HEADS = ["mode", "conc", "reqs", "err", "prompt", "out tok/s", "req/s", "ttft50", "ttft99"]
HEADS += ["tpot50", "tpot90", "tpot99", "e2e50", "e2e99", "attended", "pruned"]


def print_table(rows) -> None:
    cells = [[f.format(r.get(k, float("nan"))) for k, f in COLUMNS] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(HEADS)]
    print("  ".join(h.rjust(w) for h, w in zip(HEADS, widths)))
    for c in cells:
        print("  ".join(x.rjust(w) for x, w in zip(c, widths)))
    print(
        "(times in ms; tpot = time per output token after the first; attended = tokens attended "
        "per sparse layer, KV head and decode token; pruned = 1 - attended / context)"
    )


def bench_server(args, url, mode, model) -> list[dict]:
    rng = random.Random(args.seed)
    words = words_for(url, model, args.prompt_tokens)
    phases = {c: [make_prompt(rng, words) for _ in range(args.requests)] for c in args.concurrency}
    # Prompt lengths in tokens vary around the target and may straddle a prefill length bucket:
    # warm up on the shortest and the longest prompt too, so no phase pays for a compile.
    every = sorted((p for ps in phases.values() for p in ps), key=len)
    warm = [make_prompt(rng, words) for _ in range(args.warmup)] + [every[0], every[-1]]
    print(f"[{mode}] warm-up: {len(warm)} requests of {words} words", flush=True)
    results, _ = asyncio.run(
        run_phase(url, model, warm, 1, args.max_tokens, args.phase_timeout, args.request_timeout)
    )
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        raise RuntimeError(f"[{mode}] warm-up request failed: {failed[0]}")
    rows = []
    for c in args.concurrency:
        prompts = phases[c]
        if c > 1:
            # The decode step compiles once per batch bucket (powers of two up to the running
            # count): a round at this concurrency first, so the phase times no compile.
            warm = [make_prompt(rng, words) for _ in range(c)]
            asyncio.run(run_phase(url, model, warm, c, args.max_tokens, args.phase_timeout, 600.0))
        before = scrape(url)
        results, wall = asyncio.run(
            run_phase(
                url, model, prompts, c, args.max_tokens, args.phase_timeout, args.request_timeout
            )
        )
        row = summarize(mode, c, results, wall, before, scrape(url))
        print(
            f"[{mode}] concurrency {c}: {row['requests']} ok, {row['errors']} errors, "
            f"{row['output_tok_s']:.1f} tok/s, tpot p50 {row['tpot_p50_ms']:.2f} ms",
            flush=True,
        )
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="benchmark this running server instead")
    p.add_argument("--model", default=None, help="--model of the server (default: its default)")
    p.add_argument("--modes", default="dense,twilight", help=f"comma list of {list(MODES)}")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=512, help="approximate prompt length")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=None, help="(default: the server's)")
    p.add_argument("--max-seq-len", type=int, default=None, help="(default: the server's)")
    p.add_argument("--server-arg", action="append", default=[], help="extra server argument")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--phase-timeout", type=float, default=600.0)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for serving.json / serving.csv")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)

    rows = []
    if args.url:
        model = httpx.get(args.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        rows += bench_server(args, args.url.rstrip("/"), "external", model)
    else:
        logdir = out or Path("/tmp")
        for mode in modes:
            server = Server(args, mode, logdir / f"server_{mode.replace('+', '_')}.log")
            try:
                server.wait_ready(args.startup_timeout)
                model = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
                rows += bench_server(args, server.url, mode, model)
            finally:
                server.stop()
    print()
    print_table(rows)
    if out:
        meta = {k: v for k, v in vars(args).items()}
        (out / "serving.json").write_text(json.dumps({"args": meta, "rows": rows}, indent=1))
        with open(out / "serving.csv", "w", newline="") as f:
            keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "mode", k))
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {out / 'serving.json'} and {out / 'serving.csv'}")
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

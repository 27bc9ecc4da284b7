"""Timing and reporting helpers shared by the bench_*.py scripts (GPU runs).

Timing method (device time, not host dispatch): each measurement runs the function `iters`
times inside ONE jitted program, unrolled (a while loop would add its own per-iteration
bookkeeping on the device), rotating through several input sets (so repeated runs do not
measure the L2 cache), with a tiny data dependency on the previous call so XLA can neither
hoist, merge nor drop the calls. The compiled program is launched once, and then `1 + extra`
times back to back, each waited for with `block_until_ready`: the difference of the two
host-clock times is `extra` programs of device work, without the dispatch and the wait for the
result that both include and that would otherwise be spread over the calls
(docs/attention.md, "late night"). The median over `repeats` such pairs, divided by
`extra * iters`, is the time per call. Launch gaps between the kernels of the calls are
included, as in a real decode step. Torch callables are timed the same way through a CUDA
graph of `iters` calls (CUDA events around its replays), which removes torch's host launch
time likewise.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp


def measure_copy_bandwidth(nbytes: int = 4 << 30, repeats: int = 10) -> dict:
    """Device-to-device bandwidth in bytes/s (bytes read + bytes written), several ways.

    Returns {"jax_scale": ..., "torch_copy": ... (when torch sees the GPU), "peak": max}.
    """
    n = nbytes // 4
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)

    @jax.jit
    def scale(x):
        return x * 1.0000001  # an elementwise pass: read n, write n (a plain copy may alias)

    scale(x).block_until_ready()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        scale(x).block_until_ready()
        ts.append(time.perf_counter() - t0)
    result = {"jax_scale": 2 * n * 4 / statistics.median(ts)}
    del x
    try:
        import torch

        if torch.cuda.is_available():
            a = torch.empty(n, dtype=torch.float32, device="cuda").normal_()
            b = torch.empty_like(a)
            t = time_torch(lambda: b.copy_(a), iters=10)
            result["torch_copy"] = 2 * n * 4 / t
            del a, b
            torch.cuda.empty_cache()
    except ImportError:
        pass
    result["peak"] = max(result.values())
    return result


def time_fn(
    fn: Callable,
    rotating: Sequence[tuple],
    fixed: tuple = (),
    *,
    iters: int = 20,
    repeats: int = 5,
    extra: int = 4,
    label: str | None = None,
    flush_bytes: int = 0,
) -> float:
    """Device seconds per call of fn(*rotating[i], *fixed), the calls unrolled in one jitted
    program (see the module docstring for the method).

    flush_bytes > 0 reads a buffer of that size after every call, so no call finds the
    previous call's data in the L2 cache (a sparse call at batch 1 reads a few MB, which a
    50 MB L2 would otherwise serve on every repeat, unlike a decode step that runs the other
    layers in between); that read's own time, measured the same way around a call that does
    nothing, is subtracted.

    `rotating` holds small per-call inputs (the query, page tables, index lists); `fixed` the
    large ones (the caches), passed as jit arguments, never captured as constants. The first
    rotating input must be a floating array: a scalar from the previous call's output is added
    to it with weight 0 so the calls are ordered but their results unchanged. With a
    `label`, the compiled program's scratch memory is printed first (report_memory).
    """
    launches, _ = unrolled_launches(
        fn, rotating, fixed, iters=iters, label=label, flush_bytes=flush_bytes
    )
    t = per_call_device_seconds(launches, iters, repeats=repeats, extra=extra)
    if flush_bytes:
        idle, _ = unrolled_launches(
            lambda q, *_: q, rotating[:1], (), iters=iters, flush_bytes=flush_bytes
        )
        t_idle = per_call_device_seconds(idle, iters, repeats=repeats, extra=extra)
        # A call too short to show above the read's noise keeps its unsubtracted time, an
        # upper bound (as per_call_device_seconds does for a program too short to time).
        t = t - t_idle if t > t_idle else t
    return t


def unrolled_launches(
    fn: Callable,
    rotating: Sequence[tuple],
    fixed: tuple = (),
    *,
    iters: int = 20,
    label=None,
    flush_bytes: int = 0,
):
    """time_fn's program, compiled and run once: returns (launches, compiled), launches(n)
    the host seconds of n back-to-back launches of it waited for once (for
    per_call_device_seconds). Compiling variants first and timing them later, in rotation,
    keeps any one of them from owning the first-run slot (scripts/probe_op_configs.py).
    flush_bytes: see time_fn."""
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *rotating)
    n_sets = len(rotating)
    scrub = jnp.zeros((max(flush_bytes // 4, 1),), jnp.float32) if flush_bytes else None

    @jax.jit
    def program(stacked, fixed, scrub):
        carry = jnp.float32(0)
        for i in range(iters):  # unrolled: no loop iterations on the device
            args = jax.tree.map(lambda s, i=i: s[i % n_sets], stacked)
            q = args[0] + (carry * 0).astype(args[0].dtype)
            out = fn(q, *args[1:], *fixed)
            carry = jax.tree.leaves(out)[0].reshape(-1)[0].astype(jnp.float32)
            if scrub is not None:
                # Scaled by the carry so it is read again each call (not hoisted as invariant).
                carry = carry + 0 * jnp.sum(scrub * carry)
        return carry

    compiled = program.lower(stacked, fixed, scrub).compile()
    report_memory(compiled, fixed, label)
    compiled(stacked, fixed, scrub).block_until_ready()

    def launches(n):
        t0 = time.perf_counter()
        outs = [compiled(stacked, fixed, scrub) for _ in range(n)]
        jax.block_until_ready(outs)
        return time.perf_counter() - t0

    return launches, compiled


def per_call_device_seconds(launches: Callable[[int], float], iters: int, *, repeats, extra):
    """Seconds of device work per call from ``launches(n)``, the host time of n back-to-back
    launches of a program of ``iters`` calls, waited for once: the median over ``repeats`` of
    (launches(1 + extra) - launches(1)) / (extra * iters), which drops the cost every
    measurement pays once (dispatching the first program, waiting for the result). Where noise
    leaves that difference at 0 or below (a program too short to time: CPU tests), one launch's
    time per call instead, an upper bound."""
    ts, ones = [], []
    for _ in range(repeats):
        ones.append(launches(1))
        ts.append((launches(1 + extra) - ones[-1]) / (extra * iters))
    t = statistics.median(ts)
    return t if t > 0 else statistics.median(ones) / iters


def time_calls(fn: Callable, args: tuple, *, iters: int = 20, repeats: int = 5) -> float:
    """Seconds per call of the jitted fn(*args), dispatched iters times from Python and waited
    for once (no device-side loop: the fallback where time_fn's loop program fails, e.g. for
    memory). Includes any dispatch gap the device cannot hide, so it reads high for calls of
    a few tens of microseconds."""
    jitted = jax.jit(fn)
    jax.block_until_ready(jitted(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [jitted(*args) for _ in range(iters)]
        jax.block_until_ready(outs)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) / iters


def compiled_memory(compiled) -> dict:
    """{"argument_bytes", "output_bytes", "temp_bytes"} of a compiled program ({} where the
    backend gives no analysis)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return {}
    if m is None:
        return {}
    return {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
    }


def report_memory(compiled, fixed, label: str | None, *, warn_fraction: float = 0.25):
    """Prints the program's scratch memory next to its large inputs, flagged when the scratch
    is at least warn_fraction of them: a copy of a cache inside a timed program shows here,
    at compile time, before it can run out of memory. Returns compiled_memory(compiled)."""
    mem = compiled_memory(compiled)
    if not mem or label is None:
        return mem
    fixed_bytes = sum(x.nbytes for x in jax.tree.leaves(fixed) if hasattr(x, "nbytes"))
    gib = 1 << 30
    flag = ""
    if fixed_bytes and mem["temp_bytes"] >= warn_fraction * fixed_bytes:
        flag = "  <-- scratch is a large fraction of the inputs (a copy?)"
    print(
        f"[{label}] compiled: scratch {mem['temp_bytes'] / gib:.2f} GiB, large inputs "
        f"{fixed_bytes / gib:.2f} GiB, outputs {mem['output_bytes'] / gib:.3f} GiB{flag}",
        flush=True,
    )
    if flag:
        for line in large_instructions(compiled, min_bytes=max(1 << 28, mem["temp_bytes"] // 8)):
            print(f"[{label}]   {line}", flush=True)
    return mem


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2}
_DTYPE_BYTES.update({"s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8})


def large_instructions(compiled, min_bytes: int, limit: int = 12) -> list[str]:
    """Instructions of the optimized HLO whose result is at least min_bytes (parameters and
    pass-through tuples left out): where a cache-sized temporary comes from."""
    try:
        text = compiled.as_text()
    except Exception:
        return []
    found, in_fusion = [], False
    for line in text.splitlines():
        if line.rstrip().endswith("{") and "->" in line:  # a computation's header
            in_fusion = "fused" in line.split("(")[0] or "region" in line.split("(")[0]
            continue
        if in_fusion:
            continue
        m = re.match(r"\s*(ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]", line)
        if not m or " parameter(" in line or "get-tuple-element" in line:
            continue
        dtype, dims = m.group(3), m.group(4)
        size = _DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
        if size >= min_bytes:
            found.append(f"{size / (1 << 30):.2f} GiB: {line.strip()[:240]}")
    return found[:limit]


def time_torch(fn: Callable, *, iters: int = 20, repeats: int = 5) -> float:
    """Device seconds per call of a torch CUDA callable: `iters` calls captured in a CUDA graph,
    CUDA events around each replay, median over `repeats`. Where the capture fails, the calls
    are launched eagerly between the events instead (host launch time may then show)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture wants
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
        run = graph.replay
    except Exception as e:  # a kernel that cannot be captured
        print(f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:120]}); timing eager calls")

        def run():
            for _ in range(iters):
                fn()

    run()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        ts.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(ts)


def torch_sdpa_times(batch: int, hq: int, hkv: int, ctx: int, head_dim: int):
    """[(name, seconds per call)] of torch SDPA decode (one bf16 query, contiguous K/V, GQA),
    one entry per backend that runs here (flash, cuDNN), timed by ``time_torch``; none without
    torch or CUDA."""
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []

    def time_backends():
        out = []
        qt = torch.randn(batch, hq, 1, head_dim, device="cuda", dtype=torch.bfloat16)
        kt = torch.randn(batch, hkv, ctx, head_dim, device="cuda", dtype=torch.bfloat16)
        vt = torch.randn(batch, hkv, ctx, head_dim, device="cuda", dtype=torch.bfloat16)
        for label, backend in (
            ("torch SDPA flash", SDPBackend.FLASH_ATTENTION),
            ("torch SDPA cuDNN", SDPBackend.CUDNN_ATTENTION),
        ):
            try:
                with sdpa_kernel([backend]):
                    t = time_torch(
                        lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
                    )
                out.append((f"{label} {torch.__version__}", t))
            except Exception as e:  # a backend that does not take these shapes here
                print(f"FAILED {label} batch {batch} ctx {ctx}: {type(e).__name__}: {e}")
        return out

    out = time_backends()
    torch.cuda.empty_cache()  # the K/V went with time_backends' frame
    return out


class Table:
    """Rows of dicts printed as an aligned text table and saved as JSON and Markdown."""

    def __init__(self, columns: Sequence[str]):
        self.columns = list(columns)
        self.rows: list[dict] = []

    def add(self, **row) -> None:
        self.rows.append(row)
        print("  " + "  ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)

    def text(self) -> str:
        cells = [[_fmt(r.get(c, "")) for c in self.columns] for r in self.rows]
        widths = [
            max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(self.columns)
        ]
        lines = ["  ".join(c.rjust(w) for c, w in zip(self.columns, widths))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
        return "\n".join(lines)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        for r in self.rows:
            lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in self.columns) + " |")
        return "\n".join(lines)

    def save(self, path_stem: str, meta: dict) -> None:
        os.makedirs(os.path.dirname(path_stem) or ".", exist_ok=True)
        with open(path_stem + ".json", "w") as f:
            json.dump({"meta": meta, "rows": self.rows}, f, indent=1)
        with open(path_stem + ".md", "w") as f:
            f.write("\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n")
            f.write(self.markdown() + "\n")


def _fmt(v) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def device_meta() -> dict:
    d = jax.devices()[0]
    return {
        "device": getattr(d, "device_kind", str(d)),
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def profile(fn: Callable, log_dir: str, runs: int = 3):
    """Runs ``fn()`` (which must block until its work is done) ``runs`` times under the JAX
    profiler and returns the trace file (``*.trace.json.gz``) it wrote under ``log_dir``."""
    import glob

    os.makedirs(log_dir, exist_ok=True)
    with jax.profiler.trace(log_dir):
        for _ in range(runs):
            fn()
    found = sorted(glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.trace.json.gz")))
    if not found:
        raise RuntimeError(f"the profiler wrote no *.trace.json.gz under {log_dir}")
    return max(found, key=os.path.getmtime)


def device_events(trace_file: str) -> list[tuple[float, float, str]]:
    """(start us, end us, name) of every device event of a profiler trace (``*.trace.json.gz``),
    sorted by start: events on processes whose name mentions a GPU/TPU device (kernels,
    memcpys)."""
    import gzip

    with gzip.open(trace_file, "rb") as f:
        events = json.load(f)["traceEvents"]
    device_pids = {
        e["pid"]
        for e in events
        if e.get("ph") == "M"
        and e.get("name") == "process_name"
        and any(s in str(e.get("args", {}).get("name", "")) for s in ("GPU", "TPU", "gpu"))
    }
    return sorted(
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), e.get("name", "?"))
        for e in events
        if e.get("ph") == "X" and e.get("pid") in device_pids
    )


def step_times(trace_file: str, runs: int) -> dict:
    """Median device busy and span time of one step, from a trace of ``runs`` steps each waited
    for by the host: the device events are split into steps at the runs - 1 longest idle gaps
    (between steps the host waits for the result, so those gaps are the longest). busy = the
    union of a step's event intervals, span = its first start to its last end. {} without
    device events."""
    spans = device_events(trace_file)
    if not spans:
        return {}
    merged = [[spans[0][0], spans[0][1]]]
    for t0, t1, _ in spans[1:]:
        if t0 <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], t1)
        else:
            merged.append([t0, t1])
    gaps = sorted(range(1, len(merged)), key=lambda i: merged[i][0] - merged[i - 1][1])
    cuts = sorted(gaps[-(runs - 1) :]) if runs > 1 else []
    bounds = [0, *cuts, len(merged)]
    steps = [
        (sum(t1 - t0 for t0, t1 in merged[a:b]), merged[b - 1][1] - merged[a][0])
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return {
        "busy_us": sorted(s[0] for s in steps)[len(steps) // 2],
        "span_us": sorted(s[1] for s in steps)[len(steps) // 2],
    }


def kernel_breakdown(trace_file: str, runs: int, top: int = 15) -> dict:
    """Device time by kernel from a profiler trace of ``runs`` repetitions of one step.

    Events on processes whose name mentions a GPU/TPU device are device work (kernels,
    memcpys); they are summed by name and divided by ``runs``. Returns {"busy_us": device
    busy time per run (union of the events' intervals), "span_us": first start to last end
    per run, "kernels": [(name, us per run, calls per run), ...] longest first (``top``)}.
    Empty when the trace holds no device events (e.g. on CPU).
    """
    spans = device_events(trace_file)
    if not spans:
        return {"busy_us": 0.0, "span_us": 0.0, "kernels": []}
    by_name: dict[str, list[float]] = {}
    for t0, t1, name in spans:
        by_name.setdefault(name, []).append(t1 - t0)
    busy, end = 0.0, float("-inf")
    for t0, t1, _ in spans:  # union of intervals (streams may overlap)
        if t1 > end:
            busy += t1 - max(t0, end)
            end = t1
    kernels = sorted(
        ((n, sum(d) / runs, len(d) / runs) for n, d in by_name.items()),
        key=lambda r: -r[1],
    )
    return {
        "busy_us": busy / runs,
        "span_us": (spans[-1][1] - spans[0][0]) / runs,
        "kernels": kernels[:top],
    }

"""Probe: the public op (decode_attention, one jitted loop of 20 calls, as bench_attention.py
times it) under kernel-config variants, in one process; plus where the loop's idle time sits.

Each variant patches a kernel module's default config while the loop is traced and compiled
(jax.clear_caches() first, so every nested jit retraces), then every compiled loop of a point
is timed in rotation, `--rounds` times, so no variant owns the first-run slot.

    python docs/results/session-2026-12-04g/probe_op_configs.py --out /tmp/probe
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "scripts"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import benchlib  # noqa: E402
from bench_attention import method_configs, planted_problem  # noqa: E402
from pallas_kernels import quest, spgemv, topp_gpu  # noqa: E402
from pallas_kernels.topp_common import TopPGpuConfig  # noqa: E402
from twilight_jax import decode_attention  # noqa: E402

MODULES = {
    "topp": (topp_gpu, "DEFAULT_CONFIG"),
    "quest": (quest, "DEFAULT_GPU_CONFIG"),
    "spgemv": (spgemv, "DEFAULT_GPU_CONFIG"),
}


@contextlib.contextmanager
def patched(patch):
    saved = {}
    for kind, cfg in patch.items():
        mod, attr = MODULES[kind]
        saved[kind] = getattr(mod, attr)
        setattr(mod, attr, cfg)
    try:
        yield
    finally:
        for kind, cfg in saved.items():
            mod, attr = MODULES[kind]
            setattr(mod, attr, cfg)


def compile_loop(cfg, q, cache, iters):
    @jax.jit
    def loop(q, cache):
        def body(i, carry):
            out = decode_attention(q + (carry * 0).astype(q.dtype), cache, cfg)[0]
            return out.reshape(-1)[0].astype(jnp.float32)

        return jax.lax.fori_loop(0, iters, body, jnp.float32(0))

    return loop.lower(q, cache).compile()


def time_once(compiled, q, cache, iters, repeats=5):
    compiled(q, cache).block_until_ready()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        compiled(q, cache).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) / iters * 1e6


def gaps(compiled, q, cache, iters, out_dir):
    """Idle time of the loop program by the kernel that ends it (the one launched after)."""
    trace = benchlib.profile(lambda: compiled(q, cache).block_until_ready(), out_dir, runs=2)
    ev = benchlib.device_events(trace)
    if len(ev) < 2:
        return {}
    # The second run: events after the longest idle gap.
    cut = max(range(1, len(ev)), key=lambda i: ev[i][0] - ev[i - 1][1])
    ev = ev[cut:]
    busy = {}
    idle = {}
    for (_, a1, _), (b0, _, name) in zip(ev, ev[1:]):
        idle[name] = idle.get(name, 0.0) + max(0.0, b0 - a1)
    for t0, t1, name in ev:
        busy[name] = busy.get(name, 0.0) + (t1 - t0)
    span = ev[-1][1] - ev[0][0]
    return {
        "span_per_call_us": span / iters,
        "busy_per_call_us": sum(busy.values()) / iters,
        "idle_before_per_call_us": {
            k: v / iters for k, v in sorted(idle.items(), key=lambda x: -x[1])
        },
        "busy_per_call_us_by_kernel": {
            k: v / iters for k, v in sorted(busy.items(), key=lambda x: -x[1])
        },
    }


def T(**kw):
    return {"topp": TopPGpuConfig(**kw)}


POINTS = [
    # (batch, ctx, method, {variant: patch})
    (
        64,
        32768,
        "twilight/quest",
        {
            "default": {},
            "topp narrow_after=1": T(narrow_after=1),
            "topp narrow_after=3": T(narrow_after=3),
            "topp chunk_cols=512": T(chunk_cols=512),
            "topp chunk_cols=2048": T(chunk_cols=2048),
            "topp num_warps=8": T(num_warps=8),
            "quest num_warps=8": {"quest": quest.QuestGpuConfig(num_warps=8)},
            "quest pages_per_block=32": {"quest": quest.QuestGpuConfig(pages_per_block=32)},
            "spgemv tokens_per_chunk=256": {"spgemv": spgemv.SpGEMVGpuConfig(tokens_per_chunk=256)},
            "spgemv target_programs=8192": {"spgemv": spgemv.SpGEMVGpuConfig(target_programs=8192)},
        },
    ),
    (64, 32768, "twilight/all", {"default": {}, "topp narrow_after=1": T(narrow_after=1)}),
    (
        32,
        32768,
        "twilight/quest",
        {
            "default": {},
            "topp compact_min_rows=1": T(compact_min_rows=1),
            "topp compact_min_rows=1 narrow_after=1": T(compact_min_rows=1, narrow_after=1),
        },
    ),
    (
        16,
        32768,
        "twilight/quest",
        {
            "default": {},
            "topp compact_min_rows=1": T(compact_min_rows=1),
            "topp compact_min_rows=1 narrow_after=1": T(compact_min_rows=1, narrow_after=1),
        },
    ),
    (
        1,
        32768,
        "twilight/quest",
        {
            "default": {},
            "topp compact_min_rows=1": T(compact_min_rows=1),
            "topp compact_min_rows=1 narrow_after=1": T(compact_min_rows=1, narrow_after=1),
        },
    ),
    (16, 131072, "twilight/all", {"default": {}, "topp narrow_after=1": T(narrow_after=1)}),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/probe")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--only", nargs="*", default=None, help="batch/ctx/method keys to run")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, for a CPU check")
    args = ap.parse_args()
    points = POINTS
    if args.smoke:
        points = [(2, 512, m, v) for _, _, m, v in POINTS[:2]]
    os.makedirs(args.out, exist_ok=True)
    results = []
    key = jax.random.key(0)
    for batch, ctx, method, variants in points:
        tag = f"{batch}/{ctx}/{method}"
        if args.only and tag not in args.only:
            continue
        t0 = time.time()
        q, cache = planted_problem(jax.random.fold_in(key, batch * 7 + ctx), batch, ctx, 0.015, 7.0)
        cache = cache.with_quest_metadata("int8")
        cfg = method_configs(ctx, 8192, 0.85, 4096)[method]
        compiled = {}
        for name, patch in variants.items():
            jax.clear_caches()
            try:
                with patched(patch):
                    compiled[name] = compile_loop(cfg, q, cache, args.iters)
            except Exception as e:  # noqa: BLE001
                print(f"[{tag}] {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        # Distinct programs prove each patch reached the trace.
        prints = {name: hash(c.as_text()) for name, c in compiled.items()}
        same = [n for n in compiled if n != "default" and prints[n] == prints.get("default")]
        if same:
            print(f"[{tag}] WARNING: same program as the default: {same}", flush=True)
        times = {name: [] for name in compiled}
        for _ in range(args.rounds):
            for name, c in compiled.items():
                times[name].append(time_once(c, q, cache, args.iters))
        for name, ts in times.items():
            row = dict(
                point=tag, variant=name, us=statistics.median(ts), rounds=[round(t, 1) for t in ts]
            )
            results.append(row)
            print(f"[{tag}] {name:45s} {row['us']:8.1f} us  {row['rounds']}", flush=True)
        if method == "twilight/quest" and "default" in compiled and (batch == 64 or args.smoke):
            g = gaps(compiled["default"], q, cache, args.iters, os.path.join(args.out, "trace"))
            results.append(dict(point=tag, variant="default: loop profile", **g))
            print(json.dumps(g, indent=1), flush=True)
            jax.clear_caches()
            op = jax.jit(lambda q, cache: decode_attention(q, cache, cfg)[0])
            with open(os.path.join(args.out, "op-b64-hlo.txt"), "w") as f:
                f.write(op.lower(q, cache).compile().as_text())
        print(f"[{tag}] {time.time() - t0:.0f} s", flush=True)
        del q, cache, compiled
        with open(os.path.join(args.out, "probe.json"), "w") as f:
            json.dump({"meta": benchlib.device_meta(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

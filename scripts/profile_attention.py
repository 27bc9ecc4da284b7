"""Where the time of one decode-attention call goes, kernel by kernel, on a GPU.

Builds bench_attention's planted problem (LLaMA-3.1-8B attention shapes; default batch 64,
32K context) and, for each method, runs `decode_attention` under the JAX profiler and prints
the device time of every kernel (Pallas and XLA glue: top-k, masks, gathers) per call, next to
the call's device-busy time. With --ncu-once the script instead runs each method's compiled
call twice and nothing else, for `ncu` to attach to:

    python scripts/profile_attention.py --out /tmp/prof
    ncu --clock-control none -k regex:'spgemv|topp|quest|sparse' --set full \
        python scripts/profile_attention.py --ncu-once --methods twilight/quest

Needs a GPU (the trace holds no device events on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

import benchlib
from bench_attention import method_configs, planted_problem
from twilight_jax import decode_attention


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--budget", type=int, default=8192)
    ap.add_argument("--max-budget", type=int, default=4096)
    ap.add_argument("--p", type=float, default=0.85)
    ap.add_argument("--methods", nargs="+", default=["quest", "twilight/quest", "twilight/all"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--ncu-once", action="store_true", help="run each call twice, no trace")
    ap.add_argument(
        "--output-only",
        action="store_true",
        help="profile the attention output alone, as bench_attention.py times it (the "
        "SelectionInfo's reductions are then compiled away)",
    )
    ap.add_argument(
        "--quest-metadata",
        choices=["int8", "native"],
        default="int8",
        help="the cache's Quest min / max form (int8: the cache default)",
    )
    ap.add_argument("--out", default="/tmp/profile_attention")
    args = ap.parse_args()
    if jax.default_backend() != "gpu":
        sys.exit(f"profile_attention.py needs a GPU (backend is {jax.default_backend()!r})")
    configs = method_configs(args.ctx, args.budget, args.p, args.max_budget)
    unknown = [m for m in args.methods if m not in configs]
    if unknown:
        sys.exit(f"unknown methods {unknown}; choose from {sorted(configs)}")
    q, cache = planted_problem(jax.random.key(0), args.batch, args.ctx, 0.015, 7.0)
    cache = cache.with_quest_metadata(args.quest_metadata)
    results = {}
    for name in args.methods:
        cfg = configs[name]
        if args.output_only:
            fn = jax.jit(lambda q, cache, cfg=cfg: decode_attention(q, cache, cfg)[0])
        else:
            fn = jax.jit(lambda q, cache, cfg=cfg: decode_attention(q, cache, cfg))
        out = fn(q, cache)
        jax.block_until_ready(out)
        if args.ncu_once:
            jax.block_until_ready(fn(q, cache))
            print(f"{name}: ran", flush=True)
            continue
        trace = benchlib.profile(
            lambda fn=fn: jax.block_until_ready(fn(q, cache)),
            os.path.join(args.out, name.replace("/", "_")),
            runs=args.runs,
        )
        br = benchlib.kernel_breakdown(trace, args.runs, top=args.top)
        results[name] = br
        print(
            f"\n== {name}, batch {args.batch}, ctx {args.ctx}: device busy "
            f"{br['busy_us']:.1f} us, span {br['span_us']:.1f} us per call",
            flush=True,
        )
        for kname, us, calls in br["kernels"]:
            print(f"  {us:8.1f} us  x{calls:g}  {kname[:110]}", flush=True)
    if results:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "breakdown.json"), "w") as f:
            json.dump({"args": vars(args), "methods": results}, f, indent=1)


if __name__ == "__main__":
    main()

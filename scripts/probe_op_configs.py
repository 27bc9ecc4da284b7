"""A/B probe of kernel configs inside the public op, in one process (GPU).

Each variant patches one or more kernel modules' default configs while `decode_attention` is
traced and compiled (jax.clear_caches() first, so every nested jit retraces under the patch),
into the program `bench_attention.py` times (benchlib.unrolled_launches: 20 unrolled calls).
Then the compiled programs of a point are timed in rotation, `--rounds` times, device time
per call (benchlib.per_call_device_seconds), so no variant owns the first-run slot. A variant
whose compiled program equals the default's is reported: its patch did not reach the trace.
Same problem as bench_attention.py (planted peaked attention, LLaMA-3.1-8B attention shapes,
INT8 Quest metadata, B0 = 8192, p = 0.85, max_budget 4096).

    python scripts/probe_op_configs.py --out /tmp/probe              # every point
    python scripts/probe_op_configs.py --only 64/32768/twilight/quest
    python scripts/probe_op_configs.py --smoke                       # tiny shapes (CPU check)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import jax

import benchlib
from bench_attention import method_configs, planted_problem
from pallas_kernels import quest, spgemv, topp_gpu
from pallas_kernels.topp_common import TopPGpuConfig
from twilight_jax import decode_attention

# What a variant's patch may name: the module attribute holding that kernel's default config.
MODULES = {
    "topp": (topp_gpu, "DEFAULT_CONFIG"),
    "quest": (quest, "DEFAULT_GPU_CONFIG"),
    "spgemv": (spgemv, "DEFAULT_GPU_CONFIG"),
}


def T(**kw):
    return {"topp": TopPGpuConfig(**kw)}


def SP(**kw):
    return {"spgemv": spgemv.SpGEMVGpuConfig(**kw)}


# (batch, context, method, {variant: patch}); "default" patches nothing. Kept as the
# alternatives closest to the defaults (docs/kernels.md has their last times): at batch 32 (256
# top-p rows) the compacting top-p against the row-resident pair, whose order flips with how
# peaked the rows are; the SpGEMV's program count at the decode step's batch 8.
POINTS = [
    (
        32,
        32768,
        "twilight/quest",
        {"default": {}, "topp compacting (compact_min_rows=256)": T(compact_min_rows=256)},
    ),
    (
        8,
        32768,
        "twilight/quest",
        {
            "default": {},
            "spgemv target_programs=1024": SP(target_programs=1024),
            "spgemv target_programs=2048": SP(target_programs=2048),
        },
    ),
]


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


def probe_point(batch, ctx, method, variants, *, key, rounds, iters, extra, max_budget):
    """{variant: [us per call, one a round]} for one point."""
    tag = f"{batch}/{ctx}/{method}"
    q, cache = planted_problem(jax.random.fold_in(key, batch * 7 + ctx), batch, ctx, 0.015, 7.0)
    cache = cache.with_quest_metadata("int8")
    # One query: the planted keys follow it, so any other query would pose another problem.
    # The points' caches are 20 times the L2 cache or more.
    qs = [(q,)]
    cfg = method_configs(ctx, 8192, 0.85, max_budget)[method]

    def op(q, cache):
        return decode_attention(q, cache, cfg)[0]

    launches, texts = {}, {}
    for name, patch in variants.items():
        jax.clear_caches()
        try:
            with patched(patch):
                launches[name], compiled = benchlib.unrolled_launches(op, qs, (cache,), iters=iters)
            texts[name] = compiled.as_text()
        except Exception as e:  # noqa: BLE001 - a variant that fails to build is reported
            print(f"[{tag}] {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    same = [n for n in texts if n != "default" and texts[n] == texts.get("default")]
    if same:
        print(f"[{tag}] WARNING: the same program as the default: {same}", flush=True)
    times = {name: [] for name in launches}
    for _ in range(rounds):
        for name, run in launches.items():
            s = benchlib.per_call_device_seconds(run, iters, repeats=1, extra=extra)
            times[name].append(s * 1e6)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/probe")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--extra", type=int, default=4)
    ap.add_argument(
        "--max-budget",
        type=int,
        default=4096,
        help="Twilight's selection capacity (bench_attention's default; the decode step's "
        "benchmark uses 2048)",
    )
    ap.add_argument("--only", nargs="*", default=None, help="batch/context/method keys to run")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, a CPU check of the script")
    args = ap.parse_args()
    points = POINTS
    if args.smoke:
        points = [(2, 512, m, v) for _, _, m, v in POINTS[:1]]
        args.iters, args.extra, args.rounds = 2, 1, 1
    os.makedirs(args.out, exist_ok=True)
    results = []
    key = jax.random.key(0)
    for batch, ctx, method, variants in points:
        tag = f"{batch}/{ctx}/{method}"
        if args.only and tag not in args.only:
            continue
        t0 = time.time()
        times = probe_point(
            batch,
            ctx,
            method,
            variants,
            key=key,
            rounds=args.rounds,
            iters=args.iters,
            extra=args.extra,
            max_budget=args.max_budget,
        )
        for name, ts in times.items():
            row = dict(point=tag, variant=name, us=statistics.median(ts), rounds=ts)
            results.append(row)
            rounds = [round(t, 1) for t in ts]
            print(f"[{tag}] {name:45s} {row['us']:8.1f} us  {rounds}", flush=True)
        print(f"[{tag}] {time.time() - t0:.0f} s", flush=True)
        with open(os.path.join(args.out, "probe.json"), "w") as f:
            meta = {**benchlib.device_meta(), "max_budget": args.max_budget}
            json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

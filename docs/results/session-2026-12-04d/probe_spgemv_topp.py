"""Probe: where the block SpGEMV and the top-p kernels spend their time (H200, 2026-12-04;
results: spgemv-topp-probe.md).

Each variant patches one piece of the library's kernels (module attributes read at trace time;
jax.clear_caches() between variants), then times the kernels through scripts/bench_kernels.py's
own benchmark (batch 64 / 32K: SpGEMV over 8192 candidates, top-p select over 4 x 8192
planted logits per row). Variants that drop work give wrong results on purpose: they only
bound what that work costs.

SpGEMV: base; "one unpack" (the first nibble block stands in for all 2 W of them: the unpack's
cost); "no dots" (each dot replaced by row and column sums: the tensor-core dots and their
operand layout conversions); "loads only" (both).
Top-p: base; "reciprocal" (w = exp(x - m) * (1 / z) instead of a division per entry); "exp2"
(reciprocal, and exp as exp2 of (x - m) * log2(e)); "no compaction" (the union kernel writes
count and mass but no index list); "iters 1" (one bisection step).
Run from the repo root:
    PYTHONPATH=. python docs/results/session-2026-12-04d/probe_spgemv_topp.py
"""

import argparse
import contextlib
import math
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

sys.path.insert(0, "scripts")
import bench_kernels  # noqa: E402
import benchlib  # noqa: E402
from pallas_kernels import _common, spgemv_gpu, topp, topp_common, topp_gpu  # noqa: E402
from pallas_kernels.topp_common import TopPGpuConfig  # noqa: E402


@contextlib.contextmanager
def patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    jax.clear_caches()
    try:
        yield
    finally:
        setattr(module, name, old)
        jax.clear_caches()


def one_unpack(words, word_bytes):
    x = (words & 15).astype(jnp.uint16) | 0x4300
    lo = jax.lax.bitcast_convert_type(x, jnp.bfloat16)
    return [(lo, lo)] * word_bytes


def no_dot(a, b):
    return (
        jnp.sum(a.astype(jnp.float32), axis=1)[:, None]
        + jnp.sum(b.astype(jnp.float32), axis=1)[None, :]
    )


def weights_recip(x, valid, m, z):
    return jnp.where(valid, jnp.exp(x - m) * (1.0 / z), -1.0)


LOG2E = 1.0 / math.log(2.0)


def softmax_stats_exp2(x, valid, axes):
    valid = valid & (x > -jnp.inf)
    m = jnp.max(jnp.where(valid, x, -jnp.inf), axis=axes, keepdims=True)
    m = jnp.where(m > -jnp.inf, m, 0.0)
    z = jnp.sum(jnp.where(valid, jnp.exp2((x - m) * LOG2E), 0.0), axis=axes, keepdims=True)
    return valid, m, z


def weights_exp2(x, valid, m, z):
    return jnp.where(valid, jnp.exp2((x - m) * LOG2E) * (1.0 / z), -1.0)


def select_store_no_compaction(w, kept, out_refs, num_heads, capacity, config):
    indices_ref, count_ref, saturated_ref, mass_ref = out_refs
    gp, np_ = w.shape
    union = jnp.max(kept.astype(jnp.int32), axis=0) > 0
    count_ref[0] = jnp.sum(union, dtype=jnp.int32)
    indices_ref[0] = count_ref[0]  # the timed output depends on the kernel's work
    saturated_ref[0] = jnp.int32(0)
    mass = jnp.sum(jnp.where(union[None, :], w, 0.0), axis=1)
    head = jnp.arange(gp, dtype=jnp.int32)
    plt.store(mass_ref.at[pl.ds(0, gp)], mass, mask=head < num_heads)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[64])
    ap.add_argument("--ctx", type=int, default=32768)
    args = ap.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    bw = benchlib.measure_copy_bandwidth() if on_gpu else {"peak": 1e11}
    rows = []

    def record(kernel, batch, ctx, work, seconds, nbytes, note=""):
        rows.append((variant, kernel, batch, seconds * 1e6, note))
        print(f"{variant:16s} {kernel:22s} batch {batch:3d}: {seconds * 1e6:8.1f} us", flush=True)

    def attempt(name, fn):
        if name in ("block_spgemv", "topp_select_grouped"):
            try:
                fn()
            except Exception as e:
                print(f"FAILED {variant} {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)

    bargs = argparse.Namespace(torch=False, sweep=False, kernels=[])
    key = jax.random.key(0)
    single = [
        ("base", contextlib.nullcontext),
        ("one unpack", lambda: patched(spgemv_gpu, "_unpack_nibbles", one_unpack)),
        ("no dots", lambda: patched(_common, "dot_nt", no_dot)),
        ("reciprocal", lambda: patched(topp_common, "weights_from", weights_recip)),
        (
            "no compaction",
            lambda: patched(topp_gpu, "_gpu_select_store", select_store_no_compaction),
        ),
    ]
    if not on_gpu:  # a quick check that every variant traces and runs (interpret mode)
        bench_kernels.MIN_POOL_BYTES = 1 << 20
    for batch in args.batches:
        for variant, ctx in single:  # noqa: B007 (read by record)
            with ctx():
                bench_kernels.bench_config(batch, args.ctx, bargs, key, bw["peak"], record, attempt)
        variant = "loads only"
        with patched(spgemv_gpu, "_unpack_nibbles", one_unpack), patched(_common, "dot_nt", no_dot):
            bench_kernels.bench_config(batch, args.ctx, bargs, key, bw["peak"], record, attempt)
        variant = "exp2"
        with (
            patched(topp_common, "weights_from", weights_exp2),
            patched(topp_common, "softmax_stats", softmax_stats_exp2),
        ):
            bench_kernels.bench_config(batch, args.ctx, bargs, key, bw["peak"], record, attempt)
        variant = "iters 1"
        with patched(bench_kernels, "topp", _Topp(TopPGpuConfig(iters=1))):
            bench_kernels.bench_config(batch, args.ctx, bargs, key, bw["peak"], record, attempt)
    print("\n| variant | kernel | batch | us |\n|---|---|---|---|")
    for v, k, b, us, _ in rows:
        print(f"| {v} | {k} | {b} | {us:.1f} |")


class _Topp:
    """bench_kernels' view of pallas_kernels.topp with a fixed config."""

    def __init__(self, config):
        self._config = config

    def topp_select_grouped(self, *a, config=None, **kw):
        return topp.topp_select_grouped(*a, config=self._config, **kw)


if __name__ == "__main__":
    main()

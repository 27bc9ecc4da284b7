"""Probe: block SpGEMV launch configs timed alternately in one process (H200, 2026-12-04;
results: spgemv-configs.md). The sweep times the default first in each batch and each variant
once, so a drift over the run can pass for a config's effect; here every config runs twice,
in rotation. Inputs as scripts/bench_kernels.py (8192 candidate tokens per (sequence, KV
head), a page pool larger than L2). Run from the repo root:
    PYTHONPATH=. python docs/results/session-2026-12-04e/probe_spgemv_configs.py
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, "scripts")
import bench_kernels as bk  # noqa: E402
import benchlib  # noqa: E402
from pallas_kernels import spgemv  # noqa: E402

CONFIGS = {
    "default (stages 2)": spgemv.SpGEMVGpuConfig(),
    "stages 3": spgemv.SpGEMVGpuConfig(num_stages=3),
    "stages 1": spgemv.SpGEMVGpuConfig(num_stages=1),
    "tokens 256": spgemv.SpGEMVGpuConfig(tokens_per_chunk=256),
    "tokens 256, stages 3": spgemv.SpGEMVGpuConfig(tokens_per_chunk=256, num_stages=3),
}


def main():
    ctx = 32768
    key = jax.random.key(0)
    for batch in (64, 32, 8):
        pool, tables = bk.make_pool(jax.random.fold_in(key, batch), batch, ctx)
        qs = bk.queries(key, batch)
        pps = ctx // bk.S
        lengths = jnp.full((batch,), ctx, jnp.int32)
        n_cand = 8192 // bk.S
        rng = np.random.default_rng(1)
        cand = np.sort(
            np.stack([rng.choice(pps, n_cand, replace=False) for _ in range(batch * bk.HKV)]),
            axis=-1,
        )
        cand = jnp.asarray(cand.reshape(batch, bk.HKV, n_cand), jnp.int32)
        count = jnp.full((batch, bk.HKV), n_cand, jnp.int32)
        times = {name: [] for name in CONFIGS}
        for _ in range(2):
            for name, cfg in CONFIGS.items():

                def f(q, pt, k4, sc, zr, cfg=cfg):
                    return spgemv.block_spgemv(
                        q,
                        k4,
                        sc,
                        zr,
                        pt,
                        lengths,
                        cand,
                        count,
                        block_size=bk.S,
                        backend="pallas",
                        config=cfg,
                    )

                t = benchlib.time_fn(
                    f, list(zip(qs, tables)), (pool["k_int4"], pool["k_scale"], pool["k_zero"])
                )
                times[name].append(t * 1e6)
        for name, ts in times.items():
            print(
                f"batch {batch}: {name}: " + " / ".join(f"{t:.1f}" for t in ts) + " us", flush=True
            )


if __name__ == "__main__":
    main()

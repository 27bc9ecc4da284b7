"""Probe of the Quest page-score kernel's bound (H200, 2026-12-04; results: quest-dots-probe.md).

Times, at batch 64 / 8 / 1 and 32K context, bf16 and INT8 metadata:
- the library's kernel ("head-major (default)": whatever quest_page_scores runs by default);
- the same with an identity page table (contiguous pages: is the gather pattern the limit?);
- page-major metadata [P, Hkv, D]: one program scores a tile of pages for every KV head, so
  one page-table lookup serves Hkv * 2 adjacent rows (are scattered small rows the limit?);
- tensor-core scoring: relu(q) . max^T + min(q, 0) . min^T as two Triton dots over [G padded to
  16, D] x [D, pages] (is the float32 multiply-add scoring the limit?).
Run from the repo root: PYTHONPATH=. python docs/results/session-2026-12-04d/probe_quest_layout.py
(PROBE=cpu: the two probe kernels against the reference in interpret mode).
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import quest

S, HKV, HQ, D = 16, 8, 32, 128


def _pm_kernel(q_ref, mn_ref, mx_ref, pt_ref, len_ref, *refs, group, ppb, page_size, hkv):
    sc_ref, o_ref = refs if len(refs) == 2 else (None, refs[0])
    b, t = pl.program_id(0), pl.program_id(1)
    max_pages = pt_ref.shape[1]
    live_pages = jnp.minimum(
        jax.lax.div(jnp.maximum(len_ref[b], 0) + page_size - 1, page_size), max_pages
    )
    lpage = t * ppb + jnp.arange(ppb)
    in_table = lpage < max_pages if max_pages % ppb else None
    d = q_ref.shape[2]

    def store(h, scores):
        plt.store(o_ref.at[b, h, lpage], scores, mask=in_table)

    @pl.when(t * ppb < live_pages)
    def _live():
        col = jnp.arange(d)
        ok = lpage < live_pages
        phys = plt.load(pt_ref.at[b, lpage], mask=ok, other=0)
        p2, c2 = phys[:, None], col[None, :]
        ok2 = ok[:, None]
        for h in range(hkv):
            mn = plt.load(mn_ref.at[p2, h, c2], mask=ok2, other=0).astype(jnp.float32)
            mx = plt.load(mx_ref.at[p2, h, c2], mask=ok2, other=0).astype(jnp.float32)
            sc = None if sc_ref is None else plt.load(sc_ref.at[phys, h], mask=ok, other=0)
            for g in range(group):
                qh = q_ref[b, h * group + g, :].astype(jnp.float32)[None, :]
                s = jnp.sum(jnp.maximum(qh, 0.0) * mx + jnp.minimum(qh, 0.0) * mn, axis=1)
                if sc is not None:
                    s = s * sc
                store(h * group + g, jnp.where(ok, s, -jnp.inf))

    @pl.when(t * ppb >= live_pages)
    def _dead():
        for h in range(hkv * group):
            store(h, jnp.full((ppb,), -jnp.inf, jnp.float32))


@functools.partial(jax.jit, static_argnames=("ppb", "warps", "page_size", "interpret"))
def scores_pm(q, mn, mx, pt, lengths, scale=None, *, ppb=16, warps=4, page_size=S, interpret=False):
    """mn, mx [P, Hkv, D]; scale [P, Hkv] or None."""
    batch, hq, d = q.shape
    hkv = mn.shape[1]
    max_pages = pt.shape[1]
    inputs = (q, mn, mx, pt, lengths) + (() if scale is None else (scale,))
    return pl.pallas_call(
        functools.partial(_pm_kernel, group=hq // hkv, ppb=ppb, page_size=page_size, hkv=hkv),
        grid=(batch, pl.cdiv(max_pages, ppb)),
        in_specs=[pl.no_block_spec] * len(inputs),
        out_specs=pl.no_block_spec,
        out_shape=jax.ShapeDtypeStruct((batch, hq, max_pages), jnp.float32),
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name="quest_pm_probe",
    )(*inputs)


def _dot_nt(a, b):
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_kernel(q_ref, mn_ref, mx_ref, pt_ref, len_ref, *refs, group, group_pad, ppb, page_size):
    sc_ref, o_ref = refs if len(refs) == 2 else (None, refs[0])
    b, h, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    max_pages = pt_ref.shape[1]
    live_pages = jnp.minimum(
        jax.lax.div(jnp.maximum(len_ref[b], 0) + page_size - 1, page_size), max_pages
    )
    lpage = t * ppb + jnp.arange(ppb)
    heads = jnp.arange(group_pad)
    hmask = heads < group
    omask = hmask[:, None]
    if max_pages % ppb:
        omask = omask & (lpage < max_pages)[None, :]
    d = q_ref.shape[2]

    def store(scores):
        plt.store(o_ref.at[b, h * group + heads[:, None], lpage[None, :]], scores, mask=omask)

    @pl.when(t * ppb < live_pages)
    def _live():
        col = jnp.arange(d)
        ok = lpage < live_pages
        phys = plt.load(pt_ref.at[b, lpage], mask=ok, other=0)
        p2, c2, ok2 = phys[:, None], col[None, :], ok[:, None]
        mn = plt.load(mn_ref.at[h, p2, c2], mask=ok2, other=0).astype(jnp.bfloat16)
        mx = plt.load(mx_ref.at[h, p2, c2], mask=ok2, other=0).astype(jnp.bfloat16)
        qv = plt.load(q_ref.at[b, h * group + heads[:, None], c2], mask=hmask[:, None], other=0)
        qv = qv.astype(jnp.bfloat16)
        zero = jnp.zeros_like(qv)
        s = _dot_nt(jnp.maximum(qv, zero), mx) + _dot_nt(jnp.minimum(qv, zero), mn)
        if sc_ref is not None:
            s = s * plt.load(sc_ref.at[h, phys], mask=ok, other=0)[None, :]
        store(jnp.where(ok[None, :], s, -jnp.inf))

    @pl.when(t * ppb >= live_pages)
    def _dead():
        store(jnp.full((group_pad, ppb), -jnp.inf, jnp.float32))


@functools.partial(jax.jit, static_argnames=("ppb", "warps", "stages", "page_size", "interpret"))
def scores_dot(
    q, mn, mx, pt, lengths, scale=None, *, ppb=32, warps=4, stages=1, page_size=S, interpret=False
):
    """Head-major [Hkv, P, D] metadata, scores by tensor-core dots."""
    batch, hq, d = q.shape
    hkv = mn.shape[0]
    max_pages = pt.shape[1]
    group = hq // hkv
    inputs = (q, mn, mx, pt, lengths) + (() if scale is None else (scale,))
    return pl.pallas_call(
        functools.partial(
            _dot_kernel, group=group, group_pad=max(16, group), ppb=ppb, page_size=page_size
        ),
        grid=(batch, hkv, pl.cdiv(max_pages, ppb)),
        in_specs=[pl.no_block_spec] * len(inputs),
        out_specs=pl.no_block_spec,
        out_shape=jax.ShapeDtypeStruct((batch, hq, max_pages), jnp.float32),
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name="quest_dot_probe",
    )(*inputs)


def check_cpu():
    key = jax.random.PRNGKey(0)
    b, ctx, pool = 2, 16 * 24, 64
    ks = jax.random.split(key, 4)
    q = jax.random.normal(ks[0], (b, 8, 32), jnp.bfloat16)
    kmin = jax.random.normal(ks[1], (2, pool, 32), jnp.bfloat16)
    kmax = kmin + jnp.abs(jax.random.normal(ks[2], (2, pool, 32), jnp.bfloat16))
    pt = jax.random.permutation(ks[3], pool - 1)[: b * 24].reshape(b, 24).astype(jnp.int32) + 1
    lengths = jnp.array([ctx, 100], jnp.int32)
    ref = quest.quest_page_scores_reference(q, kmin, kmax, pt, lengths)
    out = scores_pm(
        q, kmin.transpose(1, 0, 2), kmax.transpose(1, 0, 2), pt, lengths, ppb=8, interpret=True
    )
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-4)
    mq, xq, sc = quest.quantize_page_bounds(kmin, kmax)
    ref = quest.quest_page_scores_reference(q, mq, xq, pt, lengths, sc)
    out = scores_pm(
        q, mq.transpose(1, 0, 2), xq.transpose(1, 0, 2), pt, lengths, sc.T, ppb=8, interpret=True
    )
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-4)
    for scale_, a, b_ in ((None, kmin, kmax), (sc, mq, xq)):
        ref = quest.quest_page_scores_reference(q, a, b_, pt, lengths, scale_)
        out = scores_dot(q, a, b_, pt, lengths, scale_, ppb=16, interpret=True)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-4)
    print("cpu ok")


def bench():
    sys.path.insert(0, "scripts")
    import benchlib

    key = jax.random.PRNGKey(1)
    rows = []
    for batch in (64, 8, 1):
        ctx = 32768
        pps = ctx // S
        pool = batch * pps + 1
        ks = jax.random.split(jax.random.fold_in(key, batch), 6)
        kmin = jax.random.normal(ks[0], (HKV, pool, D), jnp.bfloat16)
        kmax = kmin + jnp.abs(jax.random.normal(ks[1], (HKV, pool, D), jnp.bfloat16))
        mq, xq, sc = quest.quantize_page_bounds(kmin, kmax)
        tables = [
            (jax.random.permutation(jax.random.fold_in(ks[2], r), pool - 1)[: batch * pps] + 1)
            .reshape(batch, pps)
            .astype(jnp.int32)
            for r in range(4)
        ]
        ident = [(jnp.arange(batch * pps) + 1).reshape(batch, pps).astype(jnp.int32)] * 4
        qs = [
            jax.random.normal(jax.random.fold_in(ks[3], r), (batch, HQ, D), jnp.bfloat16)
            for r in range(4)
        ]
        lengths = jnp.full((batch,), ctx, jnp.int32)
        pm = dict(
            bf16=(kmin.transpose(1, 0, 2), kmax.transpose(1, 0, 2), None),
            int8=(mq.transpose(1, 0, 2), xq.transpose(1, 0, 2), sc.T),
        )
        hm = dict(bf16=(kmin, kmax, None), int8=(mq, xq, sc))
        nbytes = dict(bf16=batch * HKV * pps * 4 * D, int8=batch * HKV * pps * (2 * D + 4))

        def rec(name, form, t):
            mb = nbytes[form] / 1e6
            rows.append((batch, name, form, t * 1e6, mb / (t * 1e6) * 1e6 / 1e6))
            print(
                f"batch {batch} {name:28s} {form}: {t * 1e6:8.1f} us  {mb:7.1f} MB "
                f"{nbytes[form] / t / 1e12:5.2f} TB/s",
                flush=True,
            )

        def library(q, p, a, b_, c):
            return quest.quest_page_scores(q, a, b_, p, lengths, scale=c, backend="pallas")

        for form in ("bf16", "int8"):
            for label, table_set in (("head-major (default)", tables), ("identity table", ident)):
                t = benchlib.time_fn(library, list(zip(qs, table_set)), hm[form])
                rec(label, form, t)
            ref = quest.quest_page_scores(
                qs[0], *hm[form][:2], tables[0], lengths, scale=hm[form][2], backend="pallas"
            )
            # (label, kernel, its metadata layout, tile sizes)
            variants = [
                ("page-major", scores_pm, pm[form], (8, 16, 32)),
                ("dot", scores_dot, hm[form], (16, 32, 64, 128)),
            ]
            for label, kernel, meta, tiles in variants:
                for ppb in tiles:
                    for warps in (4, 8):
                        out = kernel(
                            qs[0], *meta[:2], tables[0], lengths, meta[2], ppb=ppb, warps=warps
                        )
                        err = float(jnp.max(jnp.abs(out - ref)))
                        t = benchlib.time_fn(
                            lambda q, p, a, b_, c, k=kernel, ppb=ppb, warps=warps: k(
                                q, a, b_, p, lengths, c, ppb=ppb, warps=warps
                            ),
                            list(zip(qs, tables)),
                            meta,
                        )
                        rec(f"{label} ppb={ppb} w={warps} err={err:.1e}", form, t)
        del kmin, kmax, mq, xq, sc, pm, hm


if __name__ == "__main__":
    if os.environ.get("PROBE") == "cpu":
        check_cpu()
    else:
        bench()

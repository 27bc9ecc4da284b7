"""PyTorch port of twilight_jax.reference: the Twilight decode-attention op on dense tensors.

Works on logical (unpaged) K/V so it shares nothing with the JAX cache code; float32 math,
boolean token masks [B, rows, T] (rows = Hkv for gqa="group_union", Hq for "per_head").
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _t(x):
    return torch.as_tensor(np.asarray(x, np.float32))


def _softmax(s, mask):
    s = torch.where(mask, s, torch.full_like(s, -math.inf))
    m = s.max(-1, keepdim=True).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.where(mask, torch.exp(s - m), torch.zeros_like(s))
    return e / e.sum(-1, keepdim=True).clamp_min(1e-30)


def _topk_mask(score, k):
    idx = torch.topk(score, k, dim=-1).indices
    hit = torch.zeros_like(score, dtype=torch.bool).scatter(-1, idx, True)
    return hit & torch.isfinite(score)


def _fake_quantize(x, bits):
    levels = 2**bits - 1
    zero = x.min(-1, keepdim=True).values
    scale = (x.max(-1, keepdim=True).values - zero) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    code = torch.clamp(torch.floor((x - zero) / safe + 0.5), 0, levels)
    return torch.where(scale > 0, code, torch.zeros_like(code)) * scale + zero


def _rows(x, gqa, g):
    if gqa == "per_head":
        return x
    b, hq = x.shape[:2]
    return x.reshape(b, hq // g, g, *x.shape[2:]).sum(2)


def candidates(q, k, lengths, cfg, ds_channel_idx, quest_metadata="native"):
    """q [B, Hq, D], k [B, Hkv, T, D] float32, lengths [B] -> candidate mask [B, rows, T].
    quest_metadata "int8": Quest scores pages with INT8 bounds quantized once from the exact
    min / max of the page's tokens (what a cache prefilled in one write holds)."""
    b, hkv, t, d = k.shape
    g = q.shape[1] // hkv
    valid = torch.arange(t)[None, :] < lengths[:, None]
    rows = hkv if cfg.gqa == "group_union" else hkv * g
    qg = q.reshape(b, hkv, g, d)
    budget = min(cfg.budget, t)
    if cfg.selector in ("dense", "all"):
        return valid[:, None].expand(b, rows, t)
    if cfg.selector == "streaming":
        sink = min(cfg.sink_tokens, budget)
        pos = torch.arange(t)[None, :]
        keep = (pos < sink) | (pos >= lengths[:, None] - (budget - sink))
        return (keep & valid)[:, None].expand(b, rows, t)
    if cfg.selector == "quest":
        s = cfg.page_size
        kp = k.reshape(b, hkv, t // s, s, d)
        live = valid.reshape(b, 1, t // s, s, 1)
        kmin = torch.where(live, kp, torch.full_like(kp, math.inf)).amin(3)
        kmax = torch.where(live, kp, torch.full_like(kp, -math.inf)).amax(3)
        if quest_metadata == "int8":  # codes of the min / max rounded outward, times the scale
            s8 = torch.maximum(kmin.abs().amax(-1), kmax.abs().amax(-1))[..., None] / 127
            safe = torch.where(s8 > 0, s8, torch.ones_like(s8))
            kmin = torch.clamp(torch.floor(kmin / safe), -127, 127) * s8
            kmax = torch.clamp(torch.ceil(kmax / safe), -127, 127) * s8
        qe = qg[:, :, :, None, :]
        score = torch.maximum(qe * kmin[:, :, None], qe * kmax[:, :, None]).sum(-1)
        score = _rows(score.reshape(b, hkv * g, t // s), cfg.gqa, g)
        page_live = torch.arange(t // s)[None, :] * s < lengths[:, None]
        score = torch.where(page_live[:, None], score, torch.full_like(score, -math.inf))
        pages = _topk_mask(score, min(cfg.budget // s, t // s))
        return pages.repeat_interleave(s, dim=-1) & valid[:, None]
    if cfg.selector == "double_sparsity":
        ch = torch.as_tensor(np.asarray(ds_channel_idx), dtype=torch.long)  # [Hkv, C]
        k_lab = torch.gather(k, -1, ch[None, :, None, :].expand(b, hkv, t, ch.shape[-1]))
        q_lab = torch.gather(qg, -1, ch[None, :, None, :].expand(b, hkv, g, ch.shape[-1]))
        score = torch.einsum("bgjc,bgnc->bgjn", q_lab, k_lab).reshape(b, hkv * g, t)
        score = _rows(score, cfg.gqa, g)
        score = torch.where(valid[:, None], score, torch.full_like(score, -math.inf))
        return _topk_mask(score, budget)
    if cfg.selector == "oracle":
        logits = torch.einsum("bgjd,bgnd->bgjn", qg, k).reshape(b, hkv * g, t) / math.sqrt(d)
        if cfg.gqa == "group_union":
            logits = _rows(_softmax(logits, valid[:, None]), cfg.gqa, g)
        score = torch.where(valid[:, None], logits, torch.full_like(logits, -math.inf))
        return _topk_mask(score, budget)
    raise ValueError(cfg.selector)


def estimated_weights(q, k, cand, cfg):
    """Softmax over each head's candidates of the estimated logits -> (w, head_cand) [B, Hq, T]."""
    b, hkv, t, d = k.shape
    hq = q.shape[1]
    g = hq // hkv
    k_est = k if cfg.estimate_bits == 16 else _fake_quantize(k, cfg.estimate_bits)
    logits = torch.einsum("bgjd,bgnd->bgjn", q.reshape(b, hkv, g, d), k_est) / math.sqrt(d)
    head_cand = cand if cfg.gqa == "per_head" else cand.repeat_interleave(g, dim=1)
    return _softmax(logits.reshape(b, hq, t), head_cand), head_cand


def heavier_mass(w):
    """[..., T] -> for each token, the summed weight of the tokens strictly heavier than it."""
    return torch.where(w[..., None, :] > w[..., :, None], w[..., None, :], 0.0).sum(-1)


def prune(q, k, cand, p, cfg):
    """-> (kept [B, rows, T], mass [B, Hq], saturated [B, rows])."""
    b, hkv, t, d = k.shape
    hq = q.shape[1]
    g = hq // hkv
    w, head_cand = estimated_weights(q, k, cand, cfg)
    # Top-p set: token j is kept iff the weights strictly above w_j sum to less than p.
    heavier = heavier_mass(w)
    pp = p[:, None, None]
    sel = head_cand & ((heavier < pp) | (pp >= 1.0))
    gr = 1 if cfg.gqa == "per_head" else g
    rows = hq // gr
    union = sel.reshape(b, rows, gr, t).any(2)
    capacity = min(cfg.max_budget - cfg.sink_tokens - cfg.recent_tokens, t)
    prio = w.reshape(b, rows, gr, t).amax(2)
    prio = torch.where(union, prio, torch.full_like(prio, -math.inf))
    kept = union & _topk_mask(prio, capacity)
    saturated = union.sum(-1) > capacity
    head_kept = kept if cfg.gqa == "per_head" else kept.repeat_interleave(g, dim=1)
    mass = torch.where(head_kept, w, torch.zeros_like(w)).sum(-1)
    return kept, mass, saturated


def decode_attention_torch(
    q, k, v, lengths, cfg, *, top_p=None, ds_channel_idx=None, quest_metadata="native"
):
    """q [B, Hq, D]; k, v [B, T, Hkv, D] (T a multiple of cfg.page_size); lengths [B];
    cfg: a SparsityConfig (read for its fields); top_p: None or [B] overriding cfg.top_p.

    Returns numpy (out [B, Hq, D] float32, mask [B, rows, T], mass [B, Hq], saturated)."""
    q = _t(q)
    k = _t(k).permute(0, 2, 1, 3).contiguous()
    v = _t(v).permute(0, 2, 1, 3).contiguous()
    lengths = torch.as_tensor(np.asarray(lengths), dtype=torch.long)
    b, hq, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    g = hq // hkv
    cand = candidates(q, k, lengths, cfg, ds_channel_idx, quest_metadata)
    p = cfg.top_p if top_p is None else top_p
    if cfg.selector != "dense" and p is not None:
        p = torch.as_tensor(np.broadcast_to(np.asarray(p, np.float32), (b,)).copy())
        keep, mass, saturated = prune(q, k, cand, p, cfg)
    else:
        keep = cand
        mass = torch.ones(b, hq)
        saturated = torch.zeros(cand.shape[:2], dtype=torch.bool)
    pos = torch.arange(t)[None, :]
    valid = pos < lengths[:, None]
    forced = (pos < cfg.sink_tokens) | (pos >= lengths[:, None] - cfg.recent_tokens)
    keep = keep | (forced & valid)[:, None]
    head_keep = keep if keep.shape[1] == hq else keep.repeat_interleave(g, dim=1)
    s = torch.einsum("bgjd,bgnd->bgjn", q.reshape(b, hkv, g, d), k).reshape(b, hq, t)
    w = _softmax(s / math.sqrt(d), head_keep)
    out = torch.einsum("bgjn,bgnd->bgjd", w.reshape(b, hkv, g, t), v).reshape(b, hq, d)
    return out.numpy(), keep.numpy(), mass.numpy(), saturated.numpy()


def boundary_distance(q, k, lengths, cfg, top_p, ds_channel_idx=None, quest_metadata="native"):
    """|mass of the strictly heavier candidates - p| per query head and token, numpy
    [B, Hq, T] (inf off the candidates): near 0 exactly for the tokens on the top-p boundary,
    whose membership a few ulps of estimate error may flip."""
    q = _t(q)
    k = _t(k).permute(0, 2, 1, 3).contiguous()
    lengths = torch.as_tensor(np.asarray(lengths), dtype=torch.long)
    cand = candidates(q, k, lengths, cfg, ds_channel_idx, quest_metadata)
    w, head_cand = estimated_weights(q, k, cand, cfg)
    p = torch.as_tensor(np.broadcast_to(np.asarray(top_p, np.float32), (q.shape[0],)).copy())
    dist = (heavier_mass(w) - p[:, None, None]).abs()
    return torch.where(head_cand, dist, torch.full_like(dist, math.inf)).numpy()

"""Batched text generation: dense prefill, then Twilight (or dense) decode steps.

    result = generate(model, tokenizer, ["What is the capital of France?"], max_new_tokens=32,
                      sparsity=SparsityConfig(selector="all", top_p=0.95), chat=True)
    result.texts; result.token_ids; result.stats

The model is a ``DecodeModel`` (``twilight_jax.runtime.model_api``): ``models.JittedLlama``, or
a ``models.LlamaForCausalLM``, which is compiled with its ``jit()``.

Prompts are right-padded, and the cache sized, to multiples of ``pad_multiple`` tokens, and
Twilight's p is passed as a traced per-sequence array, so calls with similar lengths and any p
share the compiled prefill and decode step.
Finished sequences stay in the batch as inactive rows (they neither grow nor write) until all
are done. Timings include compilation on first use: ``prefill_s`` and the first decode step;
``time_per_token_s`` and ``tokens_per_s`` are measured on the steps after the first.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from twilight_jax.attention import DecodeInfo
from twilight_jax.config import SparsityConfig
from twilight_jax.runtime.model_api import check_model
from twilight_jax.runtime.sampling import sample_tokens

DEFAULT_ATTENTION_TEXT = "dense on CPU, Twilight over all tokens at p = 0.95 on GPU and TPU"


def default_attention(platform: str | None = None) -> SparsityConfig:
    """The decode attention scripts/generate.py and the server use when none is asked for:
    dense on CPU, Twilight over all tokens at p = 0.95 on GPU and TPU.

    On CPU the sparse stages run as their plain-jnp references (no Pallas kernels), which cost
    more than the attention they skip. platform: a jax platform name ("cpu", "gpu", "cuda",
    "rocm", "tpu"); default ``jax.default_backend()``.
    """
    platform = platform or jax.default_backend()
    if platform == "cpu":
        return SparsityConfig(selector="dense")
    return SparsityConfig(selector="all", top_p=0.95)


@dataclasses.dataclass
class GenerationStats:
    """What a ``generate`` call did and how long it took.

    prompt_tokens / new_tokens: per sequence. prefill_s: the prefill call (compilation
    included on first use). first_step_s: the first decode step (likewise). decode_s: all decode
    steps. time_per_token_s: mean wall time of a decode step after the first (one token for
    every active sequence). tokens_per_s: tokens those steps sampled per second, one per
    active sequence and step, end-of-sequence tokens included (at batch 1, exactly
    1 / time_per_token_s).
    context_tokens: mean tokens in the cache over active (sequence, step) pairs.
    attended_tokens: mean tokens attended per sparse layer and KV head (the selection of
    layers >= dense_layers; equals context_tokens when decoding densely).
    candidate_tokens: mean tokens the base selector proposed on those layers.
    pruned_fraction: 1 - attended / candidates, the share of the base selector's tokens that
    the top-p pruner dropped (0 without pruning). attended_fraction: attended / context.
    """

    batch: int
    prompt_tokens: list[int]
    new_tokens: list[int]
    prefill_s: float
    first_step_s: float
    decode_s: float
    decode_steps: int
    time_per_token_s: float
    tokens_per_s: float
    context_tokens: float
    attended_tokens: float
    candidate_tokens: float
    pruned_fraction: float
    attended_fraction: float
    saturated_fraction: float
    sparsity: SparsityConfig

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [
            f"prompt tokens: {sum(self.prompt_tokens)} ({self.batch} sequence"
            f"{'s' if self.batch != 1 else ''}), generated: {sum(self.new_tokens)}",
            f"prefill: {self.prefill_s:.3f} s (incl. compilation on first use)",
            f"decode: {self.time_per_token_s * 1e3:.3f} ms per step, "
            f"{self.tokens_per_s:.1f} tokens/s (first step {self.first_step_s:.3f} s)",
        ]
        if self.sparsity.selector != "dense":
            lines.append(
                f"attention ({self.sparsity.selector}, top_p={self.sparsity.top_p}): "
                f"{self.attended_tokens:.1f} tokens attended per sparse layer and KV head of "
                f"{self.context_tokens:.1f} in context ({self.attended_fraction:.1%}); "
                f"candidates {self.candidate_tokens:.1f}, pruned "
                f"{self.pruned_fraction:.1%}"
            )
        return "\n".join(lines)


@dataclasses.dataclass
class GenerationResult:
    """texts: decoded continuations (special tokens dropped). token_ids: generated ids, the
    end-of-sequence token excluded. prompt_token_ids: the encoded prompts. finish_reasons:
    "stop" (an end-of-sequence token) or "length" (max_new_tokens)."""

    texts: list[str]
    token_ids: list[list[int]]
    prompt_token_ids: list[list[int]]
    finish_reasons: list[str]
    stats: GenerationStats


def encode_prompts(
    tokenizer, prompts: Sequence[str], *, chat: bool, system: str | None = None
) -> list[list[int]]:
    """Prompt token ids: through the chat template (a user turn, after an optional system
    turn, with the assistant's generation prompt) or encoded as raw text."""
    out = []
    for p in prompts:
        if chat:
            msgs = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": p}
            ]
            out.append(
                list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
            )
        else:
            out.append(list(tokenizer.encode(p)))
    return out


def _validate(
    prompts,
    max_new_tokens,
    temperature,
    top_k,
    sample_top_p,
    repetition_penalty,
    sparsity,
    pad_multiple,
    prefill_chunk,
):
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of str, got {prompts!r:.80}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompts[{i}] must be a str, got {type(p).__name__}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not 0 < sample_top_p <= 1:
        raise ValueError(f"sample_top_p must be in (0, 1], got {sample_top_p}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")
    if not isinstance(sparsity, SparsityConfig):
        raise ValueError(f"sparsity must be a SparsityConfig, got {type(sparsity).__name__}")
    if not isinstance(pad_multiple, int) or pad_multiple < 1:
        raise ValueError(f"pad_multiple must be an int >= 1, got {pad_multiple!r}")
    if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk must be None or an int >= 1, got {prefill_chunk!r}")


@jax.jit
def penalize_repeats(logits, seen, penalty):
    """transformers' repetition penalty: logits [B, V] (math in float32), seen [B, V] bool (the
    tokens already in each sequence), penalty: float32 scalar. Returns [B, V] float32 where the
    seen tokens' logits are divided by ``penalty`` if positive, multiplied by it if not."""
    logits = logits.astype(jnp.float32)
    damped = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, damped, logits)


def _prefill(model, tokens, lengths, cache, chunk, bar):
    """(logits [B, vocab] of each prompt's last token, cache): the whole prompt in one call, or
    with ``chunk`` in pieces of that many tokens (each attending to the cached ones before it),
    the progress bar advancing per piece."""
    b, t = tokens.shape
    if chunk is None or t <= chunk:
        logits, cache = model.prefill(tokens, lengths, cache)
        logits.block_until_ready()
        if bar is not None:
            bar.update(int(lengths.sum()))
        return logits, cache
    last = None
    for s0 in range(0, int(lengths.max()), chunk):
        piece = np.zeros((b, chunk), np.int32)
        piece[:, : min(chunk, t - s0)] = tokens[:, s0 : s0 + chunk]
        n = np.clip(lengths - s0, 0, chunk).astype(np.int32)
        logits, cache = model.prefill(piece, n, cache, start=np.full((b,), s0, np.int32))
        ends = jnp.asarray((lengths > s0) & (lengths <= s0 + chunk))[:, None]
        last = logits if last is None else jnp.where(ends, logits, last)
        last.block_until_ready()
        if bar is not None:
            bar.update(int(n.sum()))
    return last, cache


def generate(
    model,
    tokenizer,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int = 64,
    sparsity: SparsityConfig | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    sample_top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    chat: bool = False,
    system: str | None = None,
    stop_on_eos: bool = True,
    on_text: Callable[[int, str], None] | None = None,
    pad_multiple: int = 64,
    progress: bool = False,
    prefill_chunk: int | None = None,
) -> GenerationResult:
    """Generates continuations of a batch of prompts.

    prompts: one str or a list of B str. chat: wrap each prompt as a user turn of the model's
    chat template (``system``: an optional system turn). sparsity: the decode attention
    (default dense). temperature 0 = greedy; otherwise sampling with top_k (0 = off),
    sample_top_p (the nucleus; Twilight's p is ``sparsity.top_p``) and ``seed`` (sequence b
    uses seed + b). repetition_penalty: as in transformers, the logit of every token already in
    the sequence (prompt or generated) is divided by it when positive and multiplied by it when
    negative, before sampling or argmax (1 = off; 1.1 to 1.3 breaks the loops small models fall
    into). on_text(b, piece): called with text of sequence b as soon as it is complete UTF-8
    (streaming). pad_multiple: prompts are padded to a multiple of this many tokens (fewer
    distinct compiled shapes). progress: a status bar on stderr for the prefill. prefill_chunk:
    None (each prompt in one prefill call) or a token count: longer prompts are prefilled in
    chunks of it, each attending to the cached tokens before it (lower peak memory for long
    documents; the bar moves per chunk).

    Raises ValueError (naming the argument) for bad arguments, or when a prompt plus
    max_new_tokens does not fit the model's context (max_position_embeddings).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    sparsity = sparsity if sparsity is not None else SparsityConfig(selector="dense")
    _validate(
        prompts,
        max_new_tokens,
        temperature,
        top_k,
        sample_top_p,
        repetition_penalty,
        sparsity,
        pad_multiple,
        prefill_chunk,
    )
    check_model(model)
    model = model.jit()
    config = model.config
    ids = encode_prompts(tokenizer, prompts, chat=chat, system=system)
    context = config.max_position_embeddings
    for i, p in enumerate(ids):
        if not p:
            raise ValueError(f"prompts[{i}] encodes to no tokens")
        if len(p) + max_new_tokens > context:
            raise ValueError(
                f"prompts[{i}] has {len(p)} tokens; with max_new_tokens={max_new_tokens} that "
                f"exceeds the model context of {context} tokens"
            )
    b = len(ids)
    longest = max(len(p) for p in ids)
    # Padded prompt length and cache capacity both round up to pad_multiple, so calls with
    # similar lengths reuse the compiled prefill and decode step.
    t_pad = min(-(-longest // pad_multiple) * pad_multiple, context)
    max_seq = -(-(longest + max_new_tokens) // pad_multiple) * pad_multiple
    tokens = np.zeros((b, t_pad), np.int32)
    for i, p in enumerate(ids):
        tokens[i, : len(p)] = p
    lengths = np.array([len(p) for p in ids], np.int32)

    cache = model.init_cache(
        b,
        max_seq,
        page_size=sparsity.page_size,
        ds_channels=sparsity.ds_channels if sparsity.selector == "double_sparsity" else 0,
        quest_metadata=sparsity.quest_metadata,
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=int(lengths.sum()), desc="prefill", unit="tok", file=sys.stderr)
    t0 = time.perf_counter()
    logits, cache = _prefill(model, tokens, lengths, cache, prefill_chunk, bar)
    prefill_s = time.perf_counter() - t0
    if bar is not None:
        bar.close()

    eos = set()
    if stop_on_eos:
        eos = set(getattr(tokenizer, "eos_token_ids", ())) | set(config.eos_token_ids)
    temp = jnp.full((b,), temperature, jnp.float32)
    s_top_p = jnp.full((b,), sample_top_p, jnp.float32)
    s_top_k = jnp.full((b,), top_k, jnp.int32)
    seeds = jnp.asarray((seed + np.arange(b)) % 2**32, jnp.uint32)

    out: list[list[int]] = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    reasons = ["length"] * b
    decoders = [tokenizer.stream_decoder() for _ in range(b)] if on_text else None

    def accept(next_tokens):
        for i in np.flatnonzero(~done):
            tok = int(next_tokens[i])
            if tok in eos:
                done[i] = True
                reasons[i] = "stop"
                if decoders:
                    tail = decoders[i].flush()
                    if tail:
                        on_text(int(i), tail)
                continue
            out[i].append(tok)
            if decoders:
                piece = decoders[i].push(tok)
                if piece:
                    on_text(int(i), piece)
            if len(out[i]) >= max_new_tokens:
                done[i] = True

    seen = None
    if repetition_penalty != 1.0:
        mask = np.zeros((b, logits.shape[-1]), bool)
        for i, p in enumerate(ids):
            mask[i, p] = True
        seen = jnp.asarray(mask)
    penalty = jnp.float32(repetition_penalty)
    sampler = (temp, s_top_p, s_top_k, seeds, penalty)

    nxt, seen = _sample(logits, seen, sampler, jnp.int32(0))
    accept(np.asarray(nxt))

    # Twilight's p enters the step as a traced [B] array: every p shares one compiled step.
    step_sparsity, attn_p = sparsity, None
    if sparsity.top_p is not None and sparsity.selector != "dense":
        step_sparsity = dataclasses.replace(sparsity, top_p=None)
        attn_p = jnp.full((b,), sparsity.top_p, jnp.float32)
    first_sparse = (
        0 if sparsity.selector == "dense" else min(sparsity.dense_layers, config.num_layers)
    )
    totals = jnp.zeros((4,), jnp.float32)  # context, attended, candidates, saturated
    n_rows = 0
    step_times: list[float] = []
    step_rows: list[int] = []  # tokens each step sampled: one per row it ran for

    # One step ahead: step k + 1 is dispatched from step k's tokens while they are still on the
    # device, and only then are they read back (the one transfer a step) to find EOS and
    # stream text. The host's work then overlaps the device's instead of adding to it. A row
    # that samples EOS at step k runs once more, inactive-to-be, in step k + 1, whose output is
    # dropped (the cache keeps max_new_tokens of room, so the extra write always fits); rows
    # that reach max_new_tokens at step k are known in advance and left out of step k + 1.
    sent = [None, None]  # the last step's mask, host and device: re-sent only when it changes

    def dispatch(tokens, cache, seen, totals, run, k):
        """Step k over the rows of ``run`` (None when there are none)."""
        nonlocal n_rows
        if not run.any():
            return None
        if sent[0] is None or not np.array_equal(sent[0], run):
            sent[:] = [run.copy(), jnp.asarray(run)]
        n_rows += int(run.sum())
        logits, cache, info = model.decode_step(tokens, cache, step_sparsity, sent[1], top_p=attn_p)
        tokens, seen = _sample(logits, seen, sampler, jnp.int32(k))
        totals = _add_stats(totals, info, cache.lengths, sent[1], first_sparse)
        return tokens, cache, seen, totals

    k = 1
    run = ~done
    t1 = time.perf_counter()
    in_flight = dispatch(nxt, cache, seen, totals, run, k)
    while in_flight is not None:
        nxt, cache, seen, totals = in_flight
        sampled = int((run & ~done).sum())  # rows whose token of this step is kept
        run = ~done & (np.array([len(o) for o in out]) + 1 < max_new_tokens)
        k += 1
        in_flight = dispatch(nxt, cache, seen, totals, run, k)
        accept(np.asarray(nxt))
        t2 = time.perf_counter()
        step_times.append(t2 - t1)
        step_rows.append(sampled)
        t1 = t2
        if done.all():
            in_flight = None
    totals = np.asarray(totals, np.float64)
    sums = dict(
        context=totals[0], attended=totals[1], candidates=totals[2], saturated=totals[3], n=n_rows
    )
    if decoders:
        for i in range(b):
            if reasons[i] == "length":
                tail = decoders[i].flush()
                if tail:
                    on_text(i, tail)

    texts = [tokenizer.decode(o) for o in out]
    stats = _stats(b, ids, out, prefill_s, step_times, step_rows, sums, sparsity)
    return GenerationResult(texts, out, ids, reasons, stats)


@jax.jit
def _sample(logits, seen, sampler, step):
    """(tokens [B] int32, seen): the repetition penalty (when ``seen`` is not None) and the
    sampler in one program; ``step`` is the tokens generated so far (the same for every row
    still running)."""
    temp, s_top_p, s_top_k, seeds, penalty = sampler
    if seen is not None:
        logits = penalize_repeats(logits, seen, penalty)
    tokens = sample_tokens(
        logits, temp, s_top_p, s_top_k, seeds, jnp.full_like(seeds, step, jnp.int32)
    )
    if seen is not None:
        seen = seen.at[jnp.arange(tokens.shape[0]), tokens].set(True)
    return tokens, seen


@functools.partial(jax.jit, static_argnums=(4,))
def _add_stats(totals, info: DecodeInfo, lengths, run, first_sparse: int):
    """totals [4] float32 plus one step's sums over the rows that ran: context tokens, and the
    per-row means over the sparse layers and heads of tokens attended, candidates and saturated
    sets (with no sparse layer: the context, attended in full)."""
    run = run.astype(jnp.float32)
    ctx = lengths.astype(jnp.float32)
    if info.counts.shape[0] > first_sparse:
        counts = info.counts[first_sparse:].astype(jnp.float32).mean(axis=(0, 2))
        cands = info.candidates[first_sparse:].astype(jnp.float32).mean(axis=(0, 2))
        sat = info.saturated[first_sparse:].astype(jnp.float32).mean(axis=(0, 2))
    else:
        counts = cands = ctx
        sat = jnp.zeros_like(ctx)
    step = jnp.stack([ctx, counts, cands, sat]) @ run
    return totals + step


def _stats(b, ids, out, prefill_s, step_times, step_rows, sums, sparsity) -> GenerationStats:
    n = max(sums["n"], 1)
    context = sums["context"] / n
    attended = sums["attended"] / n
    candidates = sums["candidates"] / n
    later = step_times[1:]
    # Every token a step sampled counts, an end-of-sequence token too: it cost the step its
    # time, and so at batch 1 tokens_per_s is exactly 1 / time_per_token_s.
    produced_later = sum(step_rows[1:])
    t_later = float(sum(later))
    return GenerationStats(
        batch=b,
        prompt_tokens=[len(p) for p in ids],
        new_tokens=[len(o) for o in out],
        prefill_s=prefill_s,
        first_step_s=step_times[0] if step_times else 0.0,
        decode_s=float(sum(step_times)),
        decode_steps=len(step_times),
        time_per_token_s=(t_later / len(later)) if later else (step_times[0] if step_times else 0),
        tokens_per_s=(produced_later / t_later) if t_later > 0 else 0.0,
        context_tokens=context,
        attended_tokens=attended,
        candidate_tokens=candidates,
        pruned_fraction=(1.0 - attended / candidates) if candidates else 0.0,
        attended_fraction=(attended / context) if context else 0.0,
        saturated_fraction=sums["saturated"] / n,
        sparsity=sparsity,
    )

"""Generate text with a LLaMA-family model and Twilight sparse attention.

    python scripts/generate.py                       # default chat prompt, embedded SmolLM2
    python scripts/generate.py --prompt "Tell me a joke." --attention twilight --top-p 0.9
    python scripts/generate.py --prompt-file long.txt --raw --max-new-tokens 64 \\
        --attention quest --budget 1024 --top-p 0.95
    python scripts/generate.py --prompt "A" --prompt "B" --temperature 0.7 --seed 1
    # two hosts, one process each (docs/multihost.md); process 0 prints:
    python scripts/generate.py --coordinator host0:1234 --num-processes 2 --process-id 0
    python scripts/generate.py --coordinator host0:1234 --num-processes 2 --process-id 1

Defaults: greedy decoding with a repetition penalty of 1.1, at most 128 new tokens, and the
platform's attention (twilight_jax.runtime.generate.default_attention: dense on CPU, Twilight
over all tokens at p = 0.95 on GPU and TPU). Streams tokens as they come (one prompt) or prints
each answer when done (a batch), then a summary on stderr: prompt tokens, prefill time, time per
decode step, tokens/s, and for sparse attention the average tokens attended per layer and the
fraction pruned. Bad input (unknown model, missing file, empty prompt, a flag out of range or
one the chosen attention or sampling would ignore, a prompt longer than the context) prints one
line naming the flag and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

import models
from models.tiny import TINY_RANDOM, tiny_random_model
from twilight_jax.config import QUEST_METADATA
from twilight_jax.runtime.cli import (
    ATTENTION,
    ATTENTION_FLAG_HELP,
    DEVICES_HELP,
    ArgumentParser,
    HelpFormatter,
    add_distributed_flags,
    attention_from_flags,
    attention_help,
    distributed_from_flags,
    mesh_from_flags,
    quiet_startup,
)
from twilight_jax.runtime.generate import encode_prompts, generate

# A question the 135M default model answers well and briefly (about 70 tokens, then it stops);
# questions about things it does not know, such as this project, come back invented or looping.
DEFAULT_PROMPT = "Give three tips for staying healthy."
# Greedy decoding with transformers' repetition penalty at 1.1: deterministic, and it breaks
# the loops the small model falls into; 1.2 and above already garble its answers.
DEFAULT_REPETITION_PENALTY = 1.1
DEFAULT_MAX_NEW_TOKENS = 128


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="generate.py",
        description="Generate text with Twilight adaptive sparse attention. Defaults: the "
        f"embedded SmolLM2-135M-Instruct, the prompt {DEFAULT_PROMPT!r} in its chat template, "
        f"greedy decoding with repetition penalty {DEFAULT_REPETITION_PENALTY}, at most "
        f"{DEFAULT_MAX_NEW_TOKENS} new tokens, attention by platform (see --attention).",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--model",
        default=None,
        help="embedded name (smollm2-135m-instruct, the default), a GGUF file, a Hugging Face "
        f"directory (config.json + safetensors), or {TINY_RANDOM!r} (a random toy model)",
    )
    src = p.add_argument_group("prompts (several make a batch)")
    src.add_argument(
        "--prompt",
        action="append",
        default=[],
        help=f"a prompt; repeat for more (default, when no prompt is given: {DEFAULT_PROMPT!r})",
    )
    src.add_argument(
        "--prompt-file", action="append", default=[], help="a file whose whole text is a prompt"
    )
    src.add_argument("--batch-file", default=None, help="a file with one prompt per line")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--chat",
        dest="chat",
        action="store_const",
        const=True,
        default=None,
        help="wrap prompts in the model's chat template (the default when the model has one)",
    )
    mode.add_argument(
        "--raw",
        dest="chat",
        action="store_const",
        const=False,
        help="give prompts to the model as plain text to continue (the default without a "
        "chat template)",
    )
    p.add_argument("--system", default=None, help="a system message before the prompt (chat)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help="tokens to generate at most per prompt; generation stops earlier at the model's "
        "end-of-sequence token",
    )
    samp = p.add_argument_group("sampling (default: greedy, repetition penalty 1.1)")
    samp.add_argument(
        "--greedy", action="store_true", help="argmax decoding: --temperature 0 (the default)"
    )
    samp.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="softmax temperature of sampling; 0 = greedy",
    )
    samp.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="sample among the k likeliest tokens only (default: all; needs --temperature > 0)",
    )
    samp.add_argument(
        "--sample-top-p",
        type=float,
        default=None,
        help="nucleus sampling: sample among the likeliest tokens holding this much "
        "probability, in (0, 1] (default: 1, all; needs --temperature > 0). Not Twilight's "
        "--top-p",
    )
    samp.add_argument(
        "--repetition-penalty",
        type=float,
        default=DEFAULT_REPETITION_PENALTY,
        help="divide the positive logits of tokens already in the text by this and multiply "
        "the negative ones (as transformers' repetition_penalty); 1 = off",
    )
    samp.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of sampling; prompt i uses seed + i (default: 0; needs --temperature > 0)",
    )
    att = p.add_argument_group("attention (Twilight: select candidates, prune by top-p, attend)")
    att.add_argument(
        "--attention", default=None, choices=ATTENTION, help=attention_help("--attention")
    )
    for flag in ("top_p", "budget", "max_budget", "page_size", "dense_layers"):
        att.add_argument(
            "--" + flag.replace("_", "-"),
            type=float if flag == "top_p" else int,
            default=None,
            help=ATTENTION_FLAG_HELP[flag],
        )
    att.add_argument(
        "--quest-metadata",
        default=None,
        choices=QUEST_METADATA,
        help=ATTENTION_FLAG_HELP["quest_metadata"],
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="float32 or bfloat16 (default: float32 on CPU, bfloat16 on GPU and TPU)",
    )
    p.add_argument("--devices", type=int, default=None, help=DEVICES_HELP)
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=0,
        help="prefill prompts longer than this many tokens in chunks; 0 = in one call",
    )
    p.add_argument(
        "--no-stream",
        action="store_true",
        help="print the answer when done instead of token by token (a batch always is)",
    )
    add_distributed_flags(p)
    return p


def read_prompts(args) -> list[str]:
    prompts = []
    for text in args.prompt:
        if not text.strip():
            raise UsageError(f"--prompt must not be empty, got {text!r}")
        prompts.append(text)
    for f in args.prompt_file:
        if not os.path.isfile(f):
            raise UsageError(f"--prompt-file {f!r} does not exist")
        text = Path(f).read_text()
        if not text.strip():
            raise UsageError(f"--prompt-file {f!r} is empty")
        prompts.append(text)
    if args.batch_file:
        if not os.path.isfile(args.batch_file):
            raise UsageError(f"--batch-file {args.batch_file!r} does not exist")
        lines = [ln for ln in Path(args.batch_file).read_text().splitlines() if ln.strip()]
        if not lines:
            raise UsageError(f"--batch-file {args.batch_file!r} has no prompt (no non-blank line)")
        prompts += lines
    return prompts or [DEFAULT_PROMPT]


def sampling_from_args(args) -> dict:
    """generate()'s sampling keywords from the flags; UsageError naming the flag when bad."""
    if args.greedy and args.temperature != 0:
        raise UsageError(f"--greedy contradicts --temperature {args.temperature}: give one")
    if not args.temperature >= 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if args.temperature == 0:
        for flag, value in (
            ("--top-k", args.top_k),
            ("--sample-top-p", args.sample_top_p),
            ("--seed", args.seed),
        ):
            if value is not None:
                raise UsageError(
                    f"{flag} {value} does nothing with greedy decoding: add --temperature > 0"
                )
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    if args.sample_top_p is not None and not 0 < args.sample_top_p <= 1:
        raise UsageError(f"--sample-top-p must be in (0, 1], got {args.sample_top_p}")
    if not args.repetition_penalty > 0:
        raise UsageError(
            f"--repetition-penalty must be > 0 (1 = off), got {args.repetition_penalty}"
        )
    return dict(
        temperature=args.temperature,
        top_k=args.top_k or 0,
        sample_top_p=1.0 if args.sample_top_p is None else args.sample_top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed or 0,
    )


def sparsity_config(args):
    try:
        return attention_from_flags(
            args.attention,
            top_p=args.top_p,
            budget=args.budget,
            max_budget=args.max_budget,
            page_size=args.page_size,
            dense_layers=args.dense_layers,
            quest_metadata=args.quest_metadata,
        )
    except ValueError as e:
        raise UsageError(str(e)) from e


def device_mesh(devices: int | None):
    """None for one device, else a "heads" mesh over `devices` devices (all of every process
    under jax.distributed when not given)."""
    try:
        return mesh_from_flags(devices)
    except ValueError as e:
        raise UsageError(str(e)) from e


def load_model(name: str | None, dtype: str | None, devices: int | None = None):
    name = name or models.DEFAULT_MODEL
    mesh = device_mesh(devices)
    if name == TINY_RANDOM:
        try:
            return tiny_random_model(0, mesh=mesh)
        except ValueError as e:
            raise UsageError(f"--devices {mesh.size if mesh else 1}: {e}") from e
    try:
        dt = jnp.dtype(dtype) if dtype else None
    except TypeError as e:
        raise UsageError(f"--dtype {dtype!r} is not a dtype") from e
    try:
        model, tokenizer, config = models.load(name, dtype=dt, mesh=mesh)
    except (models.ModelLoadError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e
    if tokenizer is None:
        raise UsageError(f"model {name!r} has no tokenizer (tokenizer.json); cannot generate text")
    return model, tokenizer, config


def check_context(tokenizer, config, prompts, args, chat: bool) -> None:
    """Every prompt plus --max-new-tokens fits the model's context, or a UsageError."""
    ids = encode_prompts(tokenizer, prompts, chat=chat, system=args.system)
    context = config.max_position_embeddings
    for i, p in enumerate(ids):
        if len(p) + args.max_new_tokens > context:
            which = f"prompt {i + 1} of {len(ids)}" if len(ids) > 1 else "the prompt"
            raise UsageError(
                f"{which} has {len(p)} tokens; with --max-new-tokens {args.max_new_tokens} "
                f"that exceeds the model context of {context} tokens"
            )


def run(args) -> int:
    prompts = read_prompts(args)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.prefill_chunk < 0:
        raise UsageError(f"--prefill-chunk must be >= 0, got {args.prefill_chunk}")
    if args.chat is False and args.system is not None:
        raise UsageError("--system is a chat turn: it does nothing with --raw")
    sampling = sampling_from_args(args)
    sparsity = sparsity_config(args)
    model, tokenizer, config = load_model(args.model, args.dtype, args.devices)
    chat = args.chat if args.chat is not None else bool(tokenizer.chat_template)
    if chat and not tokenizer.chat_template:
        raise UsageError("--chat: this model has no chat template (use --raw)")
    if not chat and args.system is not None:
        raise UsageError("--system is a chat turn, and this model has no chat template")
    check_context(tokenizer, config, prompts, args, chat)
    # Under jax.distributed every process generates the same tokens; process 0 prints them.
    quiet = jax.process_index() != 0
    stream = len(prompts) == 1 and not args.no_stream and not quiet

    def on_text(i, piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=args.max_new_tokens,
        sparsity=sparsity,
        chat=chat,
        system=args.system,
        on_text=on_text if stream else None,
        progress=max(len(p) for p in prompts) > 2000,
        prefill_chunk=args.prefill_chunk or None,
        **sampling,
    )
    if quiet:
        return 0
    if stream:
        print()
    else:
        for i, text in enumerate(result.texts):
            if len(prompts) > 1:
                print(f"--- [{i}] {prompts[i][:60]!r}")
            print(text)
    print(result.stats.summary(), file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    quiet_startup()
    try:
        try:
            distributed_from_flags(args)
        except ValueError as e:
            raise UsageError(str(e)) from e
        return run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Generate text with a LLaMA-family model and Twilight sparse attention.

    python scripts/generate.py                       # default chat prompt, embedded SmolLM2
    python scripts/generate.py --prompt "Tell me a joke." --attention all --top-p 0.9
    python scripts/generate.py --prompt-file long.txt --raw --max-new-tokens 64 \\
        --attention quest --budget 1024 --top-p 0.95
    python scripts/generate.py --prompt "A" --prompt "B" --temperature 0.7 --seed 1

Streams tokens as they come (one prompt) or prints each answer when done (a batch), then a
summary on stderr: prompt tokens, prefill time, time per output token, tokens/s, and for sparse
attention the average tokens attended per layer and the fraction pruned. Bad input (unknown
model, missing file, prompt longer than the context) prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Runnable as a plain script from a checkout: the repository root holds the packages.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_PROMPT = "What is Twilight in one paragraph? Explain it to a curious ten-year-old."
# "twilight" is Twilight over every token ("all" + top-p); other selectors prune with --top-p.
ATTENTION = ("dense", "twilight", "all", "quest", "double_sparsity", "oracle", "streaming")


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate.py",
        description="Generate text with Twilight adaptive sparse attention.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=None,
        help="embedded name (smollm2-135m-instruct), a GGUF file or a Hugging Face directory",
    )
    src = p.add_argument_group("prompts (repeat to make a batch; default: a built-in question)")
    src.add_argument("--prompt", action="append", default=[], help="prompt text")
    src.add_argument(
        "--prompt-file", action="append", default=[], help="a file whose whole text is a prompt"
    )
    src.add_argument("--batch-file", default=None, help="a file with one prompt per line")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--chat",
        dest="chat",
        action="store_true",
        default=None,
        help="wrap prompts in the model's chat template (default when it has one)",
    )
    mode.add_argument("--raw", dest="chat", action="store_false", help="plain text continuation")
    p.add_argument("--system", default=None, help="system message (chat mode)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    samp = p.add_argument_group("sampling (default: greedy)")
    samp.add_argument("--greedy", action="store_true", help="argmax decoding (temperature 0)")
    samp.add_argument("--temperature", type=float, default=0.0)
    samp.add_argument("--top-k", type=int, default=0, help="0 = off")
    samp.add_argument("--sample-top-p", type=float, default=1.0, help="nucleus sampling p")
    samp.add_argument("--seed", type=int, default=0)
    att = p.add_argument_group("attention")
    att.add_argument(
        "--attention",
        default="dense",
        choices=ATTENTION,
        help="decode attention: dense, twilight (= all with --top-p 0.95), or a base selector "
        "(Twilight over it when --top-p is given)",
    )
    att.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="Twilight pruning p in (0, 1] (default: 0.95 for 'twilight' and 'all', none "
        "otherwise)",
    )
    att.add_argument("--budget", type=int, default=8192, help="base selector budget B0 (tokens)")
    att.add_argument("--max-budget", type=int, default=2048, help="selection capacity (tokens)")
    att.add_argument("--page-size", type=int, default=16)
    att.add_argument("--dense-layers", type=int, default=2)
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: by platform)")
    p.add_argument(
        "--devices",
        type=int,
        default=1,
        help="split the KV heads (and the weights by head) over this many local devices",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=0,
        help="prefill prompts longer than this many tokens in chunks (0 = in one call)",
    )
    p.add_argument("--no-stream", action="store_true", help="print answers only when done")
    return p


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    for f in args.prompt_file:
        if not os.path.isfile(f):
            raise UsageError(f"prompt file {f!r} does not exist")
        prompts.append(Path(f).read_text())
    if args.batch_file:
        if not os.path.isfile(args.batch_file):
            raise UsageError(f"batch file {args.batch_file!r} does not exist")
        prompts += [ln for ln in Path(args.batch_file).read_text().splitlines() if ln.strip()]
    return prompts or [DEFAULT_PROMPT]


def sparsity_config(args):
    from twilight_jax.config import SparsityConfig

    top_p = args.top_p
    selector = "all" if args.attention == "twilight" else args.attention
    if top_p is None and selector == "all":
        top_p = 0.95  # "all" without pruning is dense attention the long way round
    try:
        return SparsityConfig(
            selector=selector,
            budget=args.budget,
            top_p=top_p,
            max_budget=args.max_budget,
            page_size=args.page_size,
            dense_layers=args.dense_layers,
        )
    except ValueError as e:
        raise UsageError(str(e)) from e


def device_mesh(devices: int):
    """None for one device, else a "heads" mesh over the first `devices` local devices."""
    if devices == 1:
        return None
    from twilight_jax.sharding import head_mesh

    try:
        return head_mesh(devices)
    except ValueError as e:
        raise UsageError(f"--devices {devices}: {e}") from e


def load_model(name: str | None, dtype: str | None, devices: int = 1):
    import jax.numpy as jnp

    import models
    from twilight_jax.serve import TINY_RANDOM, tiny_random_model

    name = name or models.DEFAULT_MODEL
    mesh = device_mesh(devices)
    if name == TINY_RANDOM:
        try:
            return tiny_random_model(0, mesh=mesh)
        except ValueError as e:
            raise UsageError(f"--devices {devices}: {e}") from e
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


def run(args) -> int:
    from twilight_jax.generate import generate

    prompts = read_prompts(args)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.prefill_chunk < 0:
        raise UsageError(f"--prefill-chunk must be >= 0, got {args.prefill_chunk}")
    sparsity = sparsity_config(args)
    temperature = 0.0 if args.greedy else args.temperature
    model, tokenizer, config = load_model(args.model, args.dtype, args.devices)
    chat = args.chat if args.chat is not None else bool(tokenizer.chat_template)
    if chat and not tokenizer.chat_template:
        raise UsageError("--chat: this model has no chat template (use --raw)")
    stream = len(prompts) == 1 and not args.no_stream

    def on_text(i, piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        result = generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=args.max_new_tokens,
            sparsity=sparsity,
            temperature=temperature,
            top_k=args.top_k,
            top_p=args.sample_top_p,
            seed=args.seed,
            chat=chat,
            system=args.system,
            on_text=on_text if stream else None,
            progress=max(len(p) for p in prompts) > 2000,
            prefill_chunk=args.prefill_chunk or None,
        )
    except ValueError as e:
        raise UsageError(str(e)) from e
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
    try:
        return run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

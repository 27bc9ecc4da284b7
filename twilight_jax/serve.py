"""OpenAI-compatible server: ``python -m twilight_jax.serve`` (also scripts/serve.py).

With no arguments it serves the embedded default model on 127.0.0.1:8000 with Twilight
attention (selector "all", p = 0.95). ``--model`` takes anything ``models.load`` takes, or
"tiny-random" (a two-hundred-token byte-level toy with random weights, for CPU smoke tests and
benchmarks of the serving machinery itself).

This module sits at the top of the import chain like scripts/: the engine and server take a
model object, and only this entry point imports ``models`` to build one.
"""

from __future__ import annotations

import argparse
import logging
import sys

TINY_RANDOM = "tiny-random"

# ChatML, the format of SmolLM2-Instruct, for the tiny model's byte-level vocabulary.
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """Byte-level tokenizer: ids 0..255 are bytes; 256 <|endoftext|>, 257 <|im_start|>,
    258 <|im_end|> (end of sequence). No merges, so every byte is one token."""
    import tokenizers
    from tokenizers import decoders, pre_tokenizers

    from models import Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = tokenizers.Tokenizer(
        tokenizers.models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[])
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return Tokenizer(backend, eos_token_ids=(258, 256), chat_template=_CHATML)


def tiny_random_model(seed: int = 0, *, num_layers: int = 3, max_seq_len: int = 512, mesh=None):
    """(model, tokenizer, config): a random LLaMA small enough to serve on one CPU core.

    Three layers so that one is sparse under the default two dense layers; GQA 4:2. mesh: split
    it over a "heads" mesh, as ``models.load(..., mesh=)`` does.
    """
    from flax import nnx

    from models import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=128,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=max_seq_len,
        eos_token_ids=(258, 256),
        name=TINY_RANDOM,
    )
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(seed))
    if mesh is not None:
        model.shard(mesh)
    return model, tiny_tokenizer(), config


def build_parser() -> argparse.ArgumentParser:
    from twilight_jax.config import SELECTORS

    p = argparse.ArgumentParser(
        prog="python -m twilight_jax.serve",
        description="OpenAI-compatible server with Twilight sparse attention.",
    )
    p.add_argument(
        "--model",
        default=None,
        help="embedded name, GGUF path, HF directory, or "
        f"{TINY_RANDOM!r} (default: the embedded default model)",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="id clients pass as 'model' (default: the --model value)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="static decode batch")
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="context length (default: min(model max, 4096))",
    )
    p.add_argument(
        "--num-pages",
        type=int,
        default=None,
        help="KV pages in the shared pool (default: sized by --memory-fraction)",
    )
    p.add_argument(
        "--memory-fraction",
        type=float,
        default=0.9,
        help="share of free memory the KV page pool may take when --num-pages is not given: "
        "device memory after the weights on GPU/TPU, available host memory on CPU; the pool "
        "never exceeds every request holding a full context (default: 0.9)",
    )
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests at most")
    p.add_argument("--prefill-batch", type=int, default=1)
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=0,
        help="prefill prompts longer than this in chunks between decode steps (0 = whole)",
    )
    p.add_argument("--selector", default="all", choices=SELECTORS)
    p.add_argument(
        "--top-p", type=float, default=0.95, help="Twilight attention p; <= 0 turns pruning off"
    )
    p.add_argument("--budget", type=int, default=8192, help="candidate capacity B0")
    p.add_argument("--max-budget", type=int, default=2048, help="selection capacity")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dense-layers", type=int, default=2)
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: by platform)")
    p.add_argument(
        "--devices",
        type=int,
        default=1,
        help="split KV heads over this many local devices (twilight_jax.sharding)",
    )
    p.add_argument("--seed", type=int, default=0, help="weights seed of tiny-random")
    p.add_argument("--log-level", default="info")
    return p


# Engine settings by flag, for errors that name the flag rather than the config field.
_ENGINE_FLAGS = {
    "max_batch": "--max-batch",
    "max_seq_len": "--max-seq-len",
    "num_pages": "--num-pages",
    "memory_fraction": "--memory-fraction",
    "max_queue": "--max-queue",
    "prefill_batch": "--prefill-batch",
    "prefill_chunk": "--prefill-chunk",
}


def check_engine_flags(args, model_config=None) -> None:
    """Refuses engine settings that cannot be served, with a ValueError naming the flag; the
    model's limits are checked once ``model_config`` is known."""
    for name in ("max_batch", "max_queue", "prefill_batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"{_ENGINE_FLAGS[name]} must be >= 1, got {getattr(args, name)}")
    if args.prefill_chunk < 0:
        raise ValueError(f"--prefill-chunk must be >= 0 (0 = whole), got {args.prefill_chunk}")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise ValueError(f"--max-seq-len must be >= 2, got {args.max_seq_len}")
    if args.num_pages is not None and args.num_pages < 2:
        raise ValueError(f"--num-pages must be >= 2 (page 0 is null), got {args.num_pages}")
    if not 0.0 < args.memory_fraction <= 1.0:
        raise ValueError(f"--memory-fraction must be in (0, 1], got {args.memory_fraction}")
    if model_config is not None and args.max_seq_len is not None:
        limit = model_config.max_position_embeddings
        if args.max_seq_len > limit:
            raise ValueError(
                f"--max-seq-len {args.max_seq_len} exceeds the model's {limit} positions "
                f"(max_position_embeddings); use at most {limit}"
            )


def build_server(args):
    """(OpenAIServer, engine) from parsed arguments."""
    import jax.numpy as jnp

    import models
    from models import JittedLlama
    from twilight_jax.config import SparsityConfig
    from twilight_jax.serving import Engine, EngineConfig, OpenAIServer

    check_engine_flags(args)
    name = args.model or models.DEFAULT_MODEL
    dtype = jnp.dtype(args.dtype) if args.dtype else None
    mesh = None
    if args.devices != 1:
        from twilight_jax.sharding import head_mesh

        mesh = head_mesh(args.devices)
    if name == TINY_RANDOM:
        model, tokenizer, config = tiny_random_model(args.seed, mesh=mesh)
    else:
        model, tokenizer, config = models.load(name, dtype=dtype, mesh=mesh)
    if tokenizer is None:
        raise SystemExit(f"--model {name}: no tokenizer found; the server needs one")
    check_engine_flags(args, config)
    sparsity = SparsityConfig(
        selector=args.selector,
        budget=args.budget,
        top_p=args.top_p if args.top_p > 0 else None,
        max_budget=args.max_budget,
        page_size=args.page_size,
        dense_layers=args.dense_layers,
    )
    ctx = args.max_seq_len or min(config.max_position_embeddings, 4096)
    engine_cfg = EngineConfig(
        max_batch=args.max_batch,
        max_seq_len=ctx,
        num_pages=args.num_pages,
        memory_fraction=args.memory_fraction,
        max_queue=args.max_queue,
        prefill_batch=args.prefill_batch,
        prefill_chunk=args.prefill_chunk or None,
    )
    try:
        engine = Engine(JittedLlama(model), tokenizer, sparsity, engine_cfg)
    except ValueError as e:
        message = str(e)
        for field, flag in _ENGINE_FLAGS.items():
            message = message.replace(f"EngineConfig.{field}", flag)
        raise ValueError(message) from None
    logging.getLogger("twilight_jax.serving").info("engine: %s", engine.describe())
    served = args.served_model_name or name
    return OpenAIServer(engine, tokenizer, served, aliases=(name,)), engine


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    from twilight_jax.serving import serve

    try:
        server, engine = build_server(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"serving {server.model_name!r} on http://{args.host}:{args.port} "
        f"(batch {engine.config.max_batch}, context {engine.context_length}, "
        f"attention {engine.sparsity})",
        file=sys.stderr,
    )
    serve(server, args.host, args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())

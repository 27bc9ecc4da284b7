"""OpenAI-compatible server: ``python -m twilight_jax.serve`` (also scripts/serve.py).

With no arguments it serves the embedded default model on 127.0.0.1:8000 with the platform's
default attention (``twilight_jax.runtime.generate.default_attention``: dense on CPU, Twilight
over all tokens at p = 0.95 on GPU and TPU). ``--model`` takes anything ``models.load`` takes,
or "tiny-random" (``models.tiny``: a byte-level toy with random weights, for CPU smoke tests
and benchmarks of the serving machinery itself).

Several processes (hosts): start the same command in each with ``--coordinator host:port
--num-processes N --process-id i``; the model is split over every process's devices, process 0
serves HTTP and runs the engine, the others follow its device calls (``Engine.follow``) until
it stops. docs/multihost.md.
"""

from __future__ import annotations

import argparse
import errno
import logging
import socket
import sys

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
    describe_attention,
    distributed_from_flags,
    mesh_from_flags,
    quiet_startup,
)
from twilight_jax.runtime.serving import Engine, EngineConfig, OpenAIServer, serve


def check_port(host: str, port: int) -> str | None:
    """None if the server can listen on (host, port), else one line saying why.

    Binds the way uvicorn does (SO_REUSEADDR), so a port left in TIME_WAIT by a previous run
    counts as free, as it is to uvicorn, while one another process listens on counts as taken.
    """
    if not 0 <= port <= 65535:
        return f"--port must be in 0..65535, got {port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"--host {host!r} does not resolve: {e.strerror}"
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return (
                    f"port {port} on {host} is already in use: stop what holds it or pick "
                    "another --port"
                )
            return f"cannot listen on {host}:{port} (--host, --port): {e.strerror}"
    return None


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m twilight_jax.serve",
        description="OpenAI-compatible server with Twilight sparse attention.",
        formatter_class=HelpFormatter,
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
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
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
    p.add_argument("--prefill-batch", type=int, default=1, help="requests prefilled together")
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=0,
        help="prefill prompts longer than this in chunks between decode steps (0 = whole)",
    )
    p.add_argument("--selector", default=None, choices=ATTENTION, help=attention_help("--selector"))
    p.add_argument(
        "--top-p",
        type=float,
        default=None,
        help=ATTENTION_FLAG_HELP["top_p"] + "; <= 0: no pruning. Requests may set their own p "
        "(sparsity_top_p) when the server prunes",
    )
    for flag in ("budget", "max_budget", "page_size", "dense_layers"):
        p.add_argument(
            "--" + flag.replace("_", "-"), type=int, default=None, help=ATTENTION_FLAG_HELP[flag]
        )
    p.add_argument(
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
    add_distributed_flags(p)
    p.add_argument("--seed", type=int, default=0, help="weights seed of tiny-random")
    p.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="of the server and uvicorn",
    )
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


def sparsity_from_args(args):
    """The server's SparsityConfig from its flags (ValueError naming the flag when bad)."""
    top_p = args.top_p
    if top_p is not None and top_p <= 0:  # "no pruning", spelled out
        if args.selector in (None, "twilight", "all"):
            raise ValueError(
                f"--top-p {top_p} (no pruning) with --selector {args.selector or 'default'} "
                "would attend to every token the long way round: use --selector dense"
            )
        top_p = None
    return attention_from_flags(
        args.selector,
        top_p=top_p,
        budget=args.budget,
        max_budget=args.max_budget,
        page_size=args.page_size,
        dense_layers=args.dense_layers,
        quest_metadata=args.quest_metadata,
        attention_flag="--selector",
    )


def build_server(args):
    """(OpenAIServer, engine) from parsed arguments."""
    check_engine_flags(args)
    sparsity = sparsity_from_args(args)  # before loading the model: bad flags fail fast
    name = args.model or models.DEFAULT_MODEL
    dtype = jnp.dtype(args.dtype) if args.dtype else None
    mesh = mesh_from_flags(args.devices)
    if name == TINY_RANDOM:
        model, tokenizer, config = tiny_random_model(args.seed, mesh=mesh)
    else:
        model, tokenizer, config = models.load(name, dtype=dtype, mesh=mesh)
    if tokenizer is None:
        raise SystemExit(f"--model {name}: no tokenizer found; the server needs one")
    check_engine_flags(args, config)
    ctx = args.max_seq_len or min(config.max_position_embeddings, 4096)
    engine_config = EngineConfig(
        max_batch=args.max_batch,
        max_seq_len=ctx,
        num_pages=args.num_pages,
        memory_fraction=args.memory_fraction,
        max_queue=args.max_queue,
        prefill_batch=args.prefill_batch,
        prefill_chunk=args.prefill_chunk or None,
    )
    try:
        engine = Engine(model.jit(), tokenizer, sparsity, engine_config)
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
    # First, before any output: a taken port is one line, not a model load and a traceback.
    # (Only process 0 listens.)
    taken = check_port(args.host, args.port) if not args.process_id else None
    if taken:
        print(f"error: {taken}", file=sys.stderr)
        return 2
    quiet_startup()
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    try:
        distributed_from_flags(args)
        server, engine = build_server(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if engine.follower:
        print(
            f"process {args.process_id} of {args.num_processes}: following process 0's engine "
            f"(attention: {describe_attention(engine.sparsity)})",
            file=sys.stderr,
        )
        calls = engine.follow()
        print(f"process {args.process_id}: process 0 stopped after {calls} calls", file=sys.stderr)
        return 0
    print(
        f"serving {server.model_name!r} on http://{args.host}:{args.port} "
        f"(batch {engine.config.max_batch}, context {engine.context_length}, "
        f"attention: {describe_attention(engine.sparsity)})",
        file=sys.stderr,
    )
    serve(server, args.host, args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())

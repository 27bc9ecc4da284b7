"""OpenAI-compatible server: ``python -m twilight_jax.serve`` (also scripts/serve.py).

With no arguments it serves the embedded default model on 127.0.0.1:8000 with the platform's
default attention (``twilight_jax.generate.default_attention``: dense on CPU, Twilight over all
tokens at p = 0.95 on GPU and TPU). ``--model`` takes anything ``models.load`` takes, or
"tiny-random" (a two-hundred-token byte-level toy with random weights, for CPU smoke tests and
benchmarks of the serving machinery itself).

This module sits at the top of the import chain like scripts/: the engine and server take a
model object, and only this entry point imports ``models`` to build one. It also holds what
scripts/generate.py shares with the server's command line: the attention flags and their
checks, the help layout, one-line errors, and quiet startup.
"""

from __future__ import annotations

import argparse
import errno
import logging
import socket
import sys

from twilight_jax.config import SparsityConfig
from twilight_jax.generate import DEFAULT_ATTENTION_TEXT, default_attention

TINY_RANDOM = "tiny-random"

# "twilight" is Twilight over every token ("all" + top-p); the other names are base selectors.
ATTENTION = ("dense", "twilight", "all", "quest", "double_sparsity", "oracle", "streaming")
TOP_K_SELECTORS = ("quest", "double_sparsity", "oracle", "streaming")
DEFAULT_TOP_P = 0.95  # of "twilight" and "all" when --top-p is not given


def attention_help(flag: str) -> str:
    """Help of the attention choice, shared by generate.py (--attention) and the server."""
    return (
        f"decode attention (default: {DEFAULT_ATTENTION_TEXT}). dense: exact attention over "
        "every token. twilight: Twilight over every token, the same as 'all' (every token is a "
        "candidate) pruned at --top-p 0.95. quest, double_sparsity, oracle, streaming: a top-k "
        f"base selector proposing --budget tokens, pruned by Twilight when --top-p is given. "
        f"--top-p alone, without {flag}, means twilight at that p"
    )


ATTENTION_FLAG_HELP = {
    "top_p": "Twilight's p in (0, 1]: keep the fewest candidates whose estimated attention "
    "weights (softmax over an INT4 copy of K) sum to p (default: 0.95 with twilight and all; "
    "none, i.e. no pruning, with a top-k selector; not with dense)",
    "budget": "B0, the candidate capacity: how many tokens a top-k selector proposes per "
    "sequence and KV head before pruning; quest: a multiple of --page-size (default: 8192; "
    "top-k selectors only)",
    "max_budget": "selection capacity: the most tokens per KV head that survive top-p pruning "
    "(a static array size; a larger top-p set is cut to its heaviest tokens and counted as "
    "saturated). --budget bounds what the selector proposes, --max-budget what pruning keeps "
    "(default: 2048; only with pruning)",
    "page_size": "tokens per page of the paged KV cache and of Quest's metadata, a power of "
    "two (default: 16)",
    "dense_layers": "the first N layers attend densely whatever the attention (default: 2; not "
    "with dense)",
}


def attention_from_flags(
    attention: str | None,
    *,
    top_p: float | None = None,
    budget: int | None = None,
    max_budget: int | None = None,
    page_size: int | None = None,
    dense_layers: int | None = None,
    attention_flag: str = "--attention",
    platform: str | None = None,
):
    """The SparsityConfig the attention flags ask for; None = the flag was not given.

    No attention and no --top-p: ``default_attention(platform)``. A flag the chosen attention
    would ignore (--top-p with dense, --budget without a top-k selector, --max-budget without
    pruning, --dense-layers with dense) is an error rather than silently dropped.
    Raises ValueError naming the flag, the value and what was expected.
    """
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    for flag, value, low in (
        ("--budget", budget, 1),
        ("--max-budget", max_budget, 1),
        ("--page-size", page_size, 1),
        ("--dense-layers", dense_layers, 0),
    ):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if page_size is not None and page_size & (page_size - 1):
        raise ValueError(f"--page-size must be a power of two, got {page_size}")
    if attention is not None and attention not in ATTENTION:
        raise ValueError(
            f"{attention_flag} must be one of {', '.join(ATTENTION)}, got {attention!r}"
        )

    given = f"{attention_flag} {attention}"
    if attention is None:
        if top_p is not None:
            attention = "all"
        else:
            default = default_attention(platform)
            attention, top_p = default.selector, default.top_p
        given = f"{attention} attention (this platform's default)"
    selector = "all" if attention == "twilight" else attention
    if selector == "dense":
        for flag, value in (
            ("--top-p", top_p),
            ("--budget", budget),
            ("--max-budget", max_budget),
            ("--dense-layers", dense_layers),
        ):
            if value is not None:
                raise ValueError(
                    f"{flag} {value} does nothing with {given}, which attends to every token: "
                    f"drop {flag} or choose a sparse {attention_flag}"
                )
    if selector == "all":
        if budget is not None:
            raise ValueError(
                f"--budget {budget} does nothing with {given} (every token is a candidate): "
                f"it sets the candidates of a top-k selector ({', '.join(TOP_K_SELECTORS)})"
            )
        top_p = DEFAULT_TOP_P if top_p is None else top_p
    if selector in TOP_K_SELECTORS and max_budget is not None and top_p is None:
        raise ValueError(
            f"--max-budget {max_budget} does nothing with {given} and no --top-p: it caps what "
            "top-p pruning keeps (without pruning the selector attends to its --budget)"
        )
    fields = {
        "budget": budget,
        "max_budget": max_budget,
        "page_size": page_size,
        "dense_layers": dense_layers,
    }
    fields = {k: v for k, v in fields.items() if v is not None}
    defaults = SparsityConfig()
    b0, page = fields.get("budget", defaults.budget), fields.get("page_size", defaults.page_size)
    if selector == "quest" and b0 % page:
        raise ValueError(f"--budget {b0} must be a multiple of --page-size {page} with {given}")
    return SparsityConfig(selector=selector, top_p=top_p, **fields)


def describe_attention(cfg) -> str:
    """A SparsityConfig in words, for startup lines: "dense", "Twilight over all, p = 0.95",
    "quest, B0 = 1024", "Twilight over quest, B0 = 1024, p = 0.9"."""
    if cfg.selector == "dense":
        return "dense"
    words = cfg.selector if cfg.top_p is None else f"Twilight over {cfg.selector}"
    if cfg.selector in TOP_K_SELECTORS:
        words += f", B0 = {cfg.budget}"
    if cfg.top_p is not None:
        words += f", p = {cfg.top_p}"
    return words


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help states its default itself or
    there is none worth printing (None, False, an empty list)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "default" in text
            or not action.option_strings
            or action.default is None
            or action.default is False
            or action.default == []
            or action.default is argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """Bad arguments are reported in one line, "error: ...", with exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


class _NoMissingTpuNotice(logging.Filter):
    """Drops jax's note that it found no TPU runtime (libtpu): on a machine without a TPU that
    is expected, not an error, yet it opens every log at INFO level. Other backend messages,
    and every warning or error, pass."""

    def filter(self, record):
        return not (
            record.levelno <= logging.INFO
            and record.getMessage().startswith("Unable to initialize backend 'tpu'")
        )


def quiet_startup() -> None:
    """Installs the filter above on jax's backend logger (idempotent)."""
    logger = logging.getLogger("jax._src.xla_bridge")
    if not any(isinstance(f, _NoMissingTpuNotice) for f in logger.filters):
        logger.addFilter(_NoMissingTpuNotice())


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
        "--dtype",
        default=None,
        help="float32 or bfloat16 (default: float32 on CPU, bfloat16 on GPU and TPU)",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=1,
        help="split KV heads over this many local devices (twilight_jax.sharding)",
    )
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
        attention_flag="--selector",
    )


def build_server(args):
    """(OpenAIServer, engine) from parsed arguments."""
    import jax.numpy as jnp

    import models
    from models import JittedLlama
    from twilight_jax.serving import Engine, EngineConfig, OpenAIServer

    check_engine_flags(args)
    sparsity = sparsity_from_args(args)  # before loading the model: bad flags fail fast
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
    # First, before any output: a taken port is one line, not a model load and a traceback.
    taken = check_port(args.host, args.port)
    if taken:
        print(f"error: {taken}", file=sys.stderr)
        return 2
    quiet_startup()
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
        f"attention: {describe_attention(engine.sparsity)})",
        file=sys.stderr,
    )
    serve(server, args.host, args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What scripts/generate.py and the server's command line share: the attention flags and their
checks, the device and process flags, the help layout, one-line errors, and quiet startup."""

from __future__ import annotations

import argparse
import logging

import jax

from twilight_jax.config import SparsityConfig
from twilight_jax.runtime.generate import DEFAULT_ATTENTION_TEXT, default_attention
from twilight_jax.sharding import head_mesh, initialize_distributed

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
    "quest_metadata": "form of the per-page K bounds the quest selector reads: int8 (codes and "
    "a scale per page and KV head; half the bytes, bounds a little looser) or native (the cache "
    "dtype) (default: int8; quest only)",
}


def attention_from_flags(
    attention: str | None,
    *,
    top_p: float | None = None,
    budget: int | None = None,
    max_budget: int | None = None,
    page_size: int | None = None,
    dense_layers: int | None = None,
    quest_metadata: str | None = None,
    attention_flag: str = "--attention",
    platform: str | None = None,
):
    """The SparsityConfig the attention flags ask for; None = the flag was not given.

    No attention and no --top-p: ``default_attention(platform)``. A flag the chosen attention
    would ignore (--top-p with dense, --budget without a top-k selector, --max-budget without
    pruning, --dense-layers with dense, --quest-metadata without quest) is an error rather than
    silently dropped.
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
    if quest_metadata is not None and selector != "quest":
        raise ValueError(
            f"--quest-metadata {quest_metadata} does nothing with {given}: it is the form of the "
            f"page bounds the quest selector reads ({attention_flag} quest)"
        )
    fields = {
        "quest_metadata": quest_metadata,
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


def describe_attention(sparsity) -> str:
    """A SparsityConfig in words, for startup lines: "dense", "Twilight over all, p = 0.95",
    "quest, B0 = 1024", "Twilight over quest, B0 = 1024, p = 0.9"."""
    if sparsity.selector == "dense":
        return "dense"
    words = sparsity.selector if sparsity.top_p is None else f"Twilight over {sparsity.selector}"
    if sparsity.selector in TOP_K_SELECTORS:
        words += f", B0 = {sparsity.budget}"
    if sparsity.top_p is not None:
        words += f", p = {sparsity.top_p}"
    if sparsity.selector == "quest" and sparsity.quest_metadata != SparsityConfig.quest_metadata:
        words += f", {sparsity.quest_metadata} page bounds"
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


DEVICES_HELP = (
    "split the KV heads (and the weights by head) over this many devices (default: 1; with "
    "--num-processes > 1, every device of every process)"
)


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    """--coordinator, --num-processes and --process-id: one program over several processes
    (hosts) under jax.distributed."""
    g = parser.add_argument_group(
        "several processes (jax.distributed: start the same command once per process, "
        "each with its --process-id; docs/multihost.md)"
    )
    g.add_argument(
        "--coordinator",
        default=None,
        help="host:port where process 0 listens for the others (the same in every process)",
    )
    g.add_argument(
        "--num-processes",
        type=int,
        default=1,
        help="processes in the job, e.g. one per host (1: no jax.distributed)",
    )
    g.add_argument(
        "--process-id", type=int, default=None, help="this process's rank in [0, --num-processes)"
    )


def distributed_from_flags(args) -> None:
    """Joins the jax.distributed job the process flags describe (nothing for one process).
    Run it before anything uses a device. ValueError naming the flag when they are bad."""
    n, rank, coordinator = args.num_processes, args.process_id, args.coordinator
    if n < 1:
        raise ValueError(f"--num-processes must be >= 1, got {n}")
    if n == 1:
        for flag, value in (("--coordinator", coordinator), ("--process-id", rank)):
            if value is not None:
                raise ValueError(
                    f"{flag} {value} does nothing with one process: add --num-processes N"
                )
        return
    if coordinator is None:
        raise ValueError(
            f"--num-processes {n} needs --coordinator host:port (where process 0 listens)"
        )
    if rank is None or not 0 <= rank < n:
        raise ValueError(f"--process-id must be in [0, {n}) with --num-processes {n}, got {rank}")
    try:
        initialize_distributed(coordinator, n, rank)
    except ValueError as e:
        raise ValueError(f"--coordinator {coordinator!r}: {e}") from None


def mesh_from_flags(devices: int | None):
    """The "heads" mesh --devices asks for: None for one device; under jax.distributed (and
    --devices not given) every device of every process. ValueError naming --devices."""
    if devices is None:
        devices = 1 if jax.process_count() == 1 else jax.device_count()
    if devices == 1 and jax.process_count() == 1:
        return None
    try:
        return head_mesh(devices)
    except ValueError as e:
        raise ValueError(f"--devices {devices}: {e}") from None

"""One process of the two-process checks in tests/test_multiprocess.py (not collected).

    python tests/multiprocess_worker.py PART COORDINATOR NUM_PROCESSES PROCESS_ID OUT_JSON

Joins the jax.distributed job through the server's own flags, then, with the tiny random
model split by KV head over every process's devices, runs PART: "generate" generates
greedily with ``twilight_jax.generate`` and compiles the decode step to count its
collectives; "engine" runs the serving engine (process 0 schedules, the others follow).
Writes what it saw to OUT_JSON for the test to compare with one process. Exits 3 with
"NO GLOO" when this jax cannot run CPU collectives across processes.
"""

from __future__ import annotations

import collections
import json
import re
import sys
import time

import jax

PROMPTS = ["hello there", "a b c"]
# The engine's prompts: 3 requests for 2 slots (one waits), the long one prefilled in chunks
# of 8 (a chunk attends to each process's heads of the tokens cached before it).
ENGINE_PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 50)), [1, 2, 3]]
SERVER_FLAGS = ["--model", "tiny-random", "--max-batch", "2", "--max-seq-len", "128"]
SERVER_FLAGS += ["--selector", "all", "--top-p", "0.8", "--dense-layers", "1"]
SERVER_FLAGS += ["--prefill-chunk", "8"]
COLLECTIVE = re.compile(
    r"(all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter|collective-broadcast)"
    r"(?:-start)?\("
)


def sparsity():
    from twilight_jax import SparsityConfig

    return SparsityConfig(
        selector="all", top_p=0.6, dense_layers=1, max_budget=64, sink_tokens=1, recent_tokens=1
    )


def generate_tokens(mesh) -> dict:
    """Greedy token ids of PROMPTS (also run by the test itself, on one process)."""
    from models.tiny import tiny_random_model, tiny_tokenizer
    from twilight_jax import generate

    model, _, _ = tiny_random_model(1, mesh=mesh)
    kw = dict(max_new_tokens=6, sparsity=sparsity(), chat=False, stop_on_eos=False)
    tok = tiny_tokenizer()
    return generate(model, tok, PROMPTS, **kw).token_ids


def engine_params():
    from twilight_jax.runtime.serving import SamplingParams

    return [SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True) for _ in ENGINE_PROMPTS]


def decode_step_collectives(jitted) -> dict:
    """The collectives of the compiled decode step, by opcode, and the all-reduces' shapes."""
    cache = jitted.init_cache(2, 64)
    tokens = jax.numpy.zeros((2,), jax.numpy.int32)
    hlo = jitted.lower_decode_step(tokens, cache, sparsity()).compile().as_text()
    return {
        "collectives": collections.Counter(m.group(1) for m in COLLECTIVE.finditer(hlo)),
        "all_reduce_shapes": sorted(set(re.findall(r"= (\S+) all-reduce(?:-start)?\(", hlo))),
    }


def run_engine(args) -> dict:
    """Process 0: the engine's greedy tokens of ENGINE_PROMPTS; the others: follow it."""
    from twilight_jax.runtime.serve import build_server

    _, engine = build_server(args)
    seen = {"follower": engine.follower}
    if engine.follower:
        seen["calls"] = engine.follow()
        return seen
    engine.start()
    try:
        done = engine.generate(ENGINE_PROMPTS, engine_params())
        seen["engine"] = [list(c.token_ids) for c in done]
        seen["pages_free"] = engine.pages_free == engine.pages_total
    finally:
        engine.shutdown()
    try:  # the followers have gone: no second run
        engine.start()
    except RuntimeError as e:
        seen["restart_error"] = str(e)
    return seen


def main(part: str, coordinator: str, num_processes: str, process_id: str, out: str) -> int:
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception as e:  # noqa: BLE001 (any failure here means: no gloo in this jax)
        print(f"NO GLOO: {e!r}", file=sys.stderr)
        return 3

    from models.tiny import tiny_random_model
    from twilight_jax.runtime.cli import distributed_from_flags, mesh_from_flags
    from twilight_jax.runtime.serve import build_parser
    from twilight_jax.sharding import head_mesh

    t0 = time.monotonic()
    dist = ["--coordinator", coordinator, "--num-processes", num_processes]
    args = build_parser().parse_args(SERVER_FLAGS + dist + ["--process-id", process_id])
    distributed_from_flags(args)
    seen: dict = {"process": jax.process_index(), "processes": jax.process_count()}
    seen["devices"] = jax.device_count()
    try:
        head_mesh(1)
    except ValueError as e:
        seen["partial_mesh_error"] = str(e)
    mesh = mesh_from_flags(None)
    seen["mesh_size"] = mesh.size
    if part == "generate":
        seen["generate"] = generate_tokens(mesh)
        seen.update(decode_step_collectives(tiny_random_model(1, mesh=mesh)[0].jit()))
    else:
        seen.update(run_engine(args))
    seen["seconds"] = time.monotonic() - t0
    with open(out, "w") as f:
        json.dump(seen, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

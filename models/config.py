"""LLaMA-family model configuration, built from a Hugging Face config.json or GGUF metadata.

One frozen, hashable dataclass: it is static under ``jax.jit`` and is the single source of
shapes for the model, the weight loaders and the KV cache. Anything a checkpoint asks for that
the model does not implement (other architectures, biases, partial rotary, YaRN or dynamic
RoPE) is rejected here, when the config is read, with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

ROPE_SCALINGS = ("none", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling.

    kind: "none"; "linear" (Longchat / position interpolation: every inverse frequency divided
    by ``factor``); "llama3" (LLaMA-3.1: low frequencies divided by ``factor``, high ones kept,
    a smooth blend between, set by ``low_freq_factor``, ``high_freq_factor`` and
    ``original_max_position_embeddings``).
    """

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.kind not in ROPE_SCALINGS:
            raise ValueError(f"rope scaling kind must be one of {ROPE_SCALINGS}, got {self.kind!r}")
        if self.kind != "none" and not self.factor > 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                f"llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                f"{self.high_freq_factor} and {self.low_freq_factor}"
            )


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shapes and constants of a LLaMA-architecture decoder.

    ``rope_freq_factors`` (head_dim // 2 floats or None) divides the inverse frequencies; GGUF
    files of LLaMA-3.1 store their llama3 scaling this way (tensor ``rope_freqs.weight``)
    instead of as metadata. ``eos_token_ids`` holds every id that ends generation.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    rope_freq_factors: tuple[float, ...] | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "llama"

    def __post_init__(self):
        for field in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{field} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise ValueError(
                f"rope_freq_factors must have head_dim // 2 = {self.head_dim // 2} entries, "
                f"got {len(self.rope_freq_factors)}"
            )

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [head_dim // 2] float32, scaling applied.

        Computed in float32 in the same order as transformers, so positions of several thousand
        tokens rotate by the same angles on both sides of the parity tests.
        """
        d = self.head_dim
        exponent = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
        inv = (np.float32(1.0) / np.power(np.float32(self.rope_theta), exponent)).astype(np.float32)
        s = self.rope_scaling
        if s.kind == "linear":
            inv = inv / np.float32(s.factor)
        elif s.kind == "llama3":
            old = s.original_max_position_embeddings
            low_wavelen = old / s.low_freq_factor
            high_wavelen = old / s.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
            smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            blended = (1 - smooth) * scaled / s.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv = np.where(medium, blended, scaled).astype(np.float32)
        if self.rope_freq_factors is not None:
            inv = inv / np.asarray(self.rope_freq_factors, np.float32)
        return inv.astype(np.float32)

    # ------------------------------------------------------------------ builders

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], generation_config: Mapping[str, Any] | None = None):
        """From a Hugging Face ``config.json`` dict (transformers 4 or 5 spelling).

        ``generation_config`` (generation_config.json) may add end-of-sequence ids: LLaMA-3.1
        Instruct stops on <|eot_id|> and <|eom_id|>, which only that file lists.
        """
        model_type = hf.get("model_type")
        if model_type != "llama":
            raise ValueError(f"config.json model_type must be 'llama', got {model_type!r}")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ValueError(f"config.json {flag}=true is not supported (LLaMA has no biases)")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json hidden_act must be 'silu', got {act!r}")
        if hf.get("pretraining_tp", 1) not in (1, None):
            raise ValueError(f"config.json pretraining_tp must be 1, got {hf['pretraining_tp']}")
        hidden = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        head_dim = int(hf.get("head_dim") or hidden // heads)

        # transformers 5 writes "rope_parameters" (theta inside); 4 writes "rope_scaling".
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        partial = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
        if partial != 1.0:
            raise ValueError(f"config.json partial_rotary_factor must be 1.0, got {partial}")
        scaling = _rope_scaling_from_hf(rope, hf)

        eos = _as_ids(hf.get("eos_token_id"))
        if generation_config:
            eos = eos + tuple(
                i for i in _as_ids(generation_config.get("eos_token_id")) if i not in eos
            )
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
            name=str(hf.get("_name_or_path") or "llama"),
        )

    @classmethod
    def from_gguf(
        cls,
        metadata: Mapping[str, Any],
        tensor_names: Sequence[str],
        rope_freq_factors: Sequence[float] | None = None,
    ):
        """From GGUF key/value metadata (values already decoded to Python) and tensor names.

        ``rope_freq_factors``: the contents of tensor ``rope_freqs.weight`` when the file has it.
        """
        arch = metadata.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"GGUF general.architecture must be 'llama', got {arch!r}")

        def get(key, default=None, required=True):
            full = f"{arch}.{key}"
            if full in metadata:
                return metadata[full]
            if required and default is None:
                raise ValueError(f"GGUF metadata is missing {full!r}")
            return default

        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        head_dim = int(get("attention.key_length", hidden // heads))
        rope_dims = int(get("rope.dimension_count", head_dim))
        if rope_dims != head_dim:
            raise ValueError(
                f"GGUF {arch}.rope.dimension_count={rope_dims} must equal head_dim={head_dim} "
                "(partial rotary embeddings are not supported)"
            )
        scaling_type = str(get("rope.scaling.type", "none"))
        if scaling_type == "none":
            scaling = RopeScaling()
        elif scaling_type == "linear":
            scaling = RopeScaling("linear", factor=float(get("rope.scaling.factor")))
        else:
            raise ValueError(
                f"GGUF {arch}.rope.scaling.type={scaling_type!r} is not supported "
                "(expected 'none' or 'linear'; llama3 scaling comes as rope_freqs.weight)"
            )
        tokens = metadata.get("tokenizer.ggml.tokens")
        vocab = int(get("vocab_size", len(tokens) if tokens is not None else None))
        eos = metadata.get("tokenizer.ggml.eos_token_id")
        eot = metadata.get("tokenizer.ggml.eot_token_id")
        eos_ids = tuple(dict.fromkeys(int(i) for i in (eos, eot) if i is not None))
        bos = metadata.get("tokenizer.ggml.bos_token_id")
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            rope_freq_factors=(
                tuple(float(f) for f in rope_freq_factors)
                if rope_freq_factors is not None
                else None
            ),
            tie_word_embeddings="output.weight" not in tensor_names,
            max_position_embeddings=int(get("context_length", 4096)),
            bos_token_id=int(bos) if bos is not None else None,
            eos_token_ids=eos_ids,
            name=str(metadata.get("general.name", "llama")),
        )


def _rope_scaling_from_hf(rope: Mapping[str, Any], hf: Mapping[str, Any]) -> RopeScaling:
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    if kind == "default":
        return RopeScaling()
    if kind == "linear":
        return RopeScaling("linear", factor=float(rope["factor"]))
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(
                rope.get("original_max_position_embeddings") or hf["max_position_embeddings"]
            ),
        )
    raise ValueError(
        f"config.json rope type {kind!r} is not supported (expected default, linear or llama3)"
    )


def _as_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)

"""A random toy LLaMA with a byte-level tokenizer: "tiny-random".

Small enough to serve on one CPU core: for smoke tests, the CPU examples, and benchmarks of the
serving machinery itself (``--model tiny-random`` in scripts/generate.py and the server).
"""

from __future__ import annotations

import tokenizers
from flax import nnx
from tokenizers import decoders, pre_tokenizers

from models.config import LlamaConfig
from models.llama import LlamaForCausalLM
from models.tokenizer import Tokenizer

TINY_RANDOM = "tiny-random"

# ChatML, the format of SmolLM2-Instruct, for the tiny model's byte-level vocabulary.
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """Byte-level tokenizer: ids 0..255 are bytes; 256 <|endoftext|>, 257 <|im_start|>,
    258 <|im_end|> (end of sequence). No merges, so every byte is one token."""
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

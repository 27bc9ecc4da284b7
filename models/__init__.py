"""Flax NNX LLaMA-family models, weight loaders (GGUF, Hugging Face safetensors), tokenizers.

import models
model, tokenizer, config = models.load("smollm2-135m-instruct")
logits = model.logits(token_ids)      # [B, T] int32 -> [B, T, vocab] float32
"""

from models.config import LlamaConfig, RopeScaling
from models.llama import JittedLlama, LlamaForCausalLM, default_dtype
from models.loaders import DEFAULT_MODEL, EMBEDDED, ModelLoadError, load
from models.tokenizer import StreamDecoder, Tokenizer

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED",
    "JittedLlama",
    "LlamaConfig",
    "LlamaForCausalLM",
    "ModelLoadError",
    "RopeScaling",
    "StreamDecoder",
    "Tokenizer",
    "default_dtype",
    "load",
]

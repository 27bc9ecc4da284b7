"""Tokenizers for the models: GGUF metadata or a Hugging Face tokenizer.json, plus chat templates.

Built on the ``tokenizers`` library. A GGUF file carries no tokenizer.json, only llama.cpp's
``tokenizer.ggml.*`` metadata (vocabulary, merges or scores, token types, special ids); we
rebuild the equivalent ``tokenizers`` pipeline from it:

- ``gpt2`` (byte-level BPE: SmolLM2, LLaMA-3): vocabulary + merges, the pre-tokenizer split that
  ``tokenizer.ggml.pre`` names, byte-level decoding;
- ``llama`` (SentencePiece BPE: LLaMA-2, Longchat): vocabulary + merges derived from the token
  scores, "▁" for spaces, byte fallback.

Chat templates are rendered with jinja2 in a sandbox with the helpers Hugging Face templates use
(``raise_exception``, ``tojson``, ``strftime_now``).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers

# llama.cpp token types (tokenizer.ggml.token_type).
_CONTROL = 3
_USER_DEFINED = 4

# Pre-tokenizer splits, by the value of tokenizer.ggml.pre (llama.cpp's names). A vocabulary's
# merges were learned on text split this way, so encoding must split the same way.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = ("default", "gpt2", "gpt-2", "")
# StarCoder-style vocabularies (SmolLM, SmolLM2): digits always split one by one, then GPT-2.
_DIGITS_PRE = ("smollm", "starcoder", "refact", "codeshell")
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3")


def _byte_level_pre_tokenizer(pre: str):
    if pre in _GPT2_PRE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _LLAMA3_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    known = _GPT2_PRE[:-1] + _DIGITS_PRE + _LLAMA3_PRE
    raise ValueError(
        f"GGUF tokenizer.ggml.pre={pre!r} is not supported (expected one of {known}); "
        "encoding with another split would silently produce different tokens"
    )


def _spm_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two
    tokens of the vocabulary, ordered by the merged token's score (higher merges first)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        local = [
            (token[:i], token[i:], score)
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _render_template(template: str, **context) -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which templates do not expect.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template).render(**context)


class Tokenizer:
    """Text <-> token ids for one model.

    ``encode(text)`` adds the BOS token when the model expects it (``add_bos``) and
    ``add_special_tokens`` is True; special tokens written in the text (``<|im_start|>``) map to
    their ids. ``decode`` drops special tokens unless asked not to.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        add_bos: bool = False,
        chat_template: str | None = None,
    ):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        self.add_bos = add_bos
        self.chat_template = chat_template

    # ---------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    # ---------------------------------------------------------------- encode / decode

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """text -> token ids (list of int)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True):
        return [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        **kwargs,
    ):
        """Renders ``messages`` ([{"role": ..., "content": ...}, ...]) with the model's template.

        Returns the prompt text, or its token ids when ``tokenize`` (the template writes its own
        special tokens, so none are added: this matches transformers).
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (chat mode is not available)")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise ValueError(
                    f"messages[{i}] must be a mapping with 'role' and 'content', got {m!r}"
                )
        text = _render_template(
            self.chat_template,
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token_text(self.bos_token_id),
            eos_token=self._token_text(self.eos_token_id),
            **kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.backend.id_to_token(token_id) or "")

    def stream_decoder(self, *, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- builders

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """From GGUF metadata (``tokenizer.ggml.*`` and ``tokenizer.chat_template``)."""
        kind = metadata.get("tokenizer.ggml.model")
        tokens = metadata.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError(
                "GGUF metadata has no tokenizer.ggml.tokens: no tokenizer in this file"
            )
        tokens = list(tokens)
        types = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        if kind == "gpt2":
            backend = _gguf_byte_level(metadata, tokens)
        elif kind == "llama":
            backend = _gguf_sentencepiece(metadata, tokens, types)
        else:
            raise ValueError(
                f"GGUF tokenizer.ggml.model={kind!r} is not supported (expected 'gpt2' or 'llama')"
            )
        special = [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == _CONTROL and t
        ]
        backend.add_special_tokens(special)
        user = [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == _USER_DEFINED and t
        ]
        if user:
            backend.add_tokens(user)
        bos = metadata.get("tokenizer.ggml.bos_token_id")
        eos = [
            metadata.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
        ]
        # llama.cpp's default: SentencePiece vocabularies add BOS unless the file says otherwise.
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama"))
        return cls(
            backend,
            bos_token_id=int(bos) if bos is not None else None,
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
            add_bos=add_bos,
            chat_template=metadata.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path, eos_token_ids: Sequence[int] = ()) -> Tokenizer:
        """From a Hugging Face model directory: tokenizer.json, tokenizer_config.json (special
        tokens, chat template) and chat_template.jinja / chat_template.json if present.

        ``eos_token_ids``: extra end ids (from config.json / generation_config.json).
        """
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(
                f"{tj} not found: a Hugging Face model directory needs tokenizer.json "
                "(a SentencePiece tokenizer.model alone is not supported; convert it with "
                "transformers' AutoTokenizer(...).save_pretrained)"
            )
        backend = tokenizers.Tokenizer.from_file(str(tj))
        tc = _read_json(path / "tokenizer_config.json")
        template = tc.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        elif (path / "chat_template.json").is_file():
            template = _read_json(path / "chat_template.json").get("chat_template", template)
        if isinstance(template, list):  # named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)

        def token_id(name):
            tok = tc.get(name)
            if isinstance(tok, Mapping):
                tok = tok.get("content")
            return backend.token_to_id(tok) if isinstance(tok, str) else None

        eos = [token_id("eos_token"), *eos_token_ids]
        return cls(
            backend,
            bos_token_id=token_id("bos_token"),
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
            # tokenizer.json's post-processor adds BOS where the model wants it.
            add_bos=False,
            chat_template=template,
        )


def _gguf_byte_level(metadata, tokens) -> tokenizers.Tokenizer:
    merges = metadata.get("tokenizer.ggml.merges")
    if merges is None:
        raise ValueError("GGUF byte-level tokenizer has no tokenizer.ggml.merges")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=pairs))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(str(metadata.get("tokenizer.ggml.pre", "")))
    backend.decoder = decoders.ByteLevel()
    return backend


def _gguf_sentencepiece(metadata, tokens, types) -> tokenizers.Tokenizer:
    scores = metadata.get("tokenizer.ggml.scores")
    if scores is None:
        raise ValueError("GGUF SentencePiece tokenizer has no tokenizer.ggml.scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else None
    backend = tokenizers.Tokenizer(
        tokenizers.models.BPE(
            vocab=vocab,
            merges=_spm_merges(tokens, scores),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    # llama.cpp puts the "▁" of a leading space in front of the text only, not after every
    # special token: Metaspace with prepend_scheme "first" (transformers' non-legacy LLaMA).
    add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False
    )
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(dec)
    return backend


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


class StreamDecoder:
    """Turns a stream of token ids into text pieces, emitting text only once it is complete.

    Byte-level tokens can end inside a multi-byte UTF-8 character, and SentencePiece decoders
    treat a leading space differently at the start of a string, so text is decoded over a short
    window of previous tokens and the new suffix is emitted only when it does not end in an
    incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0  # tokens up to here have been emitted

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_ids: int | Sequence[int]) -> str:
        """Adds tokens; returns the newly completed text (possibly "")."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        self.ids.extend(int(t) for t in token_ids)
        before = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is left (an incomplete character decodes as U+FFFD)."""
        before = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(before) :]

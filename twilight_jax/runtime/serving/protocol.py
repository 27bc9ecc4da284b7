"""OpenAI-compatible request parsing and response bodies.

Parsing is separate from serving: ``parse_completion`` and ``parse_chat`` turn a decoded JSON
body into prompts (token ids) and ``SamplingParams``, or raise ``APIError`` with the HTTP
status, the offending parameter and an OpenAI-style message. Nothing here touches the engine.

Beyond the OpenAI fields, requests may set ``top_k``, ``ignore_eos``, ``stop_token_ids`` and
``sparsity_top_p`` (Twilight's attention p for this request), e.g. through the openai
client's ``extra_body``.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

from twilight_jax.runtime.serving.requests import InvalidRequestError, SamplingParams

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_PROMPTS = 64  # prompts in one /v1/completions request

# Fields the OpenAI API defines that we accept only at their neutral value.
_NEUTRAL = {
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "echo": (None, False),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "modalities": (None, ["text"]),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "reasoning_effort": (None,),
    "prediction": (None,),
    "audio": (None,),
}
_IGNORED = ("user", "metadata")
_COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "top_k",
    "ignore_eos",
    "stop_token_ids",
    "sparsity_top_p",
    *_NEUTRAL,
    *_IGNORED,
}
COMPLETION_FIELDS = frozenset(_COMMON | {"prompt"})
CHAT_FIELDS = frozenset(_COMMON | {"messages", "max_completion_tokens", "response_format"})
ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or {
            400: "invalid_request_error",
            404: "invalid_request_error",
            429: "rate_limit_error",
            503: "server_error",
        }.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    """A validated request: one prompt per choice, shared sampling parameters."""

    model: str
    prompts: list[list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool


def _bad(message: str, param: str | None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _type_name(x) -> str:
    return "null" if x is None else type(x).__name__


def _get_int(body, name, default=None, *, lo=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"'{name}' must be an integer, got {_type_name(v)} {v!r}", name)
    if lo is not None and v < lo:
        raise _bad(f"'{name}' must be >= {lo}, got {v}", name)
    return v


def _get_float(body, name, default, lo, hi):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(f"'{name}' must be a number, got {_type_name(v)} {v!r}", name)
    if not lo <= v <= hi:
        raise _bad(f"'{name}' must be in [{lo}, {hi}], got {v}", name)
    return float(v)


def _get_bool(body, name, default=False):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(f"'{name}' must be a boolean, got {_type_name(v)} {v!r}", name)
    return v


def _check_fields(body: Mapping, allowed: frozenset) -> None:
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise _bad(f"Unrecognized request argument supplied: {', '.join(unknown)}", unknown[0])
    for name, neutral in _NEUTRAL.items():
        if name in body and body[name] not in neutral:
            raise _bad(
                f"'{name}' is not supported by this server (got {body[name]!r}; leave it out)",
                name,
            )


def check_model(body: Mapping, served: Sequence[str]) -> str:
    model = body.get("model")
    if model is None:
        raise _bad("you must provide a model parameter", "model")
    if not isinstance(model, str):
        raise _bad(f"'model' must be a string, got {_type_name(model)}", "model")
    if model not in served:
        raise APIError(
            404,
            f"The model '{model}' does not exist. Available: {', '.join(served)}",
            param="model",
            code="model_not_found",
        )
    return model


def _common_params(body: Mapping, max_tokens: int | None) -> dict:
    n = _get_int(body, "n", 1)
    if n != 1:
        raise _bad(f"'n' must be 1 (one choice per prompt), got {n}", "n")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad(f"'stop' must be a string or a list of strings, got {stop!r}", "stop")
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise _bad(f"'stop' takes at most {MAX_STOP} non-empty strings, got {stop!r}", "stop")
    stop_ids = body.get("stop_token_ids")
    if stop_ids is None:
        stop_ids = []
    if not isinstance(stop_ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in stop_ids
    ):
        raise _bad(
            f"'stop_token_ids' must be a list of integers, got {stop_ids!r}", "stop_token_ids"
        )
    top_k = _get_int(body, "top_k", 0, lo=-1)
    sample_top_p = _get_float(body, "top_p", 1.0, 0.0, 1.0)  # OpenAI's nucleus field
    sparsity_p = body.get("sparsity_top_p")
    if sparsity_p is not None:
        sparsity_p = _get_float(body, "sparsity_top_p", None, 0.0, 1.0)
        if sparsity_p == 0.0:
            raise _bad("'sparsity_top_p' must be in (0, 1], got 0", "sparsity_top_p")
    seed = _get_int(body, "seed")
    return dict(
        max_tokens=max_tokens,
        temperature=_get_float(body, "temperature", 1.0, 0.0, 2.0),
        # OpenAI accepts top_p = 0: keep only the most likely token.
        sample_top_p=max(sample_top_p, 1e-6),
        top_k=max(top_k, 0),  # -1 (vLLM's "off") and 0 both disable top-k
        seed=None if seed is None else seed & 0xFFFFFFFF,
        stop=tuple(stop),
        stop_token_ids=tuple(stop_ids),
        ignore_eos=_get_bool(body, "ignore_eos"),
        sparsity_top_p=sparsity_p,
    )


def _stream_flags(body: Mapping) -> tuple[bool, bool]:
    stream = _get_bool(body, "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise _bad(f"'stream_options' must be an object, got {opts!r}", "stream_options")
        if not stream:
            raise _bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        include_usage = _get_bool(opts, "include_usage")
    return stream, include_usage


def _max_tokens(body: Mapping, names: Sequence[str]) -> int | None:
    for name in names:
        v = body.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise _bad(f"'{name}' must be an integer, got {_type_name(v)} {v!r}", name)
        if v <= 0:
            raise _bad(f"'{name}' must be >= 1, got {v}", name)
        return v
    return None


def _sampling(common: dict, prompt_len: int, context: int, default_max: int | None):
    """SamplingParams with max_tokens defaulted (and bounded by the context when defaulted)."""
    if common["max_tokens"] is None:
        room = max(context - prompt_len, 1)
        common = dict(common, max_tokens=room if default_max is None else min(default_max, room))
    try:
        return SamplingParams(**common)
    except InvalidRequestError as e:
        raise _bad(str(e), e.param) from None


def _encode_prompt(tokenizer, prompt) -> list[list[int]]:
    def ids_ok(x):
        return isinstance(x, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in x
        )

    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            texts = prompt
            if len(texts) > MAX_PROMPTS:
                raise _bad(
                    f"'prompt' holds at most {MAX_PROMPTS} prompts, got {len(texts)}", "prompt"
                )
            return [tokenizer.encode(t) for t in texts]
        if ids_ok(prompt):
            return [list(prompt)]
        if all(ids_ok(p) for p in prompt):
            if len(prompt) > MAX_PROMPTS:
                raise _bad(
                    f"'prompt' holds at most {MAX_PROMPTS} prompts, got {len(prompt)}", "prompt"
                )
            return [list(p) for p in prompt]
    raise _bad(
        "'prompt' must be a string, a list of strings, a list of token ids or a list of lists "
        f"of token ids, got {_type_name(prompt)}",
        "prompt",
    )


def parse_completion(body: Any, tokenizer, served: Sequence[str], context: int) -> ParsedRequest:
    """/v1/completions body -> ParsedRequest (raises APIError)."""
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {_type_name(body)}", None)
    model = check_model(body, served)
    _check_fields(body, COMPLETION_FIELDS)
    if "prompt" not in body:
        raise _bad("you must provide a prompt parameter", "prompt")
    common = _common_params(body, _max_tokens(body, ("max_tokens",)))
    stream, include_usage = _stream_flags(body)
    prompts = _encode_prompt(tokenizer, body["prompt"])
    params = [_sampling(common, len(p), context, 16) for p in prompts]
    if len({p.max_tokens for p in params}) != 1:
        # Defaulted max_tokens bounded by different prompt lengths: keep the smallest so every
        # choice shares one SamplingParams.
        params = [min(params, key=lambda p: p.max_tokens)]
    return ParsedRequest(model, prompts, params[0], stream, include_usage)


def _message_text(i: int, m: Mapping) -> str:
    content = m.get("content")
    if content is None and m.get("role") == "assistant":
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise _bad(
                    f"messages[{i}].content[{j}] must be a text part "
                    f"{{'type': 'text', 'text': ...}}, got {part!r}",
                    f"messages[{i}].content",
                )
            if not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content[{j}].text must be a string", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(
        f"messages[{i}].content must be a string or a list of text parts, got "
        f"{_type_name(content)}",
        f"messages[{i}].content",
    )


def parse_chat(body: Any, tokenizer, served: Sequence[str], context: int) -> ParsedRequest:
    """/v1/chat/completions body -> ParsedRequest (raises APIError)."""
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {_type_name(body)}", None)
    model = check_model(body, served)
    _check_fields(body, CHAT_FIELDS)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise _bad(f"'response_format' must be {{'type': 'text'}}, got {fmt!r}", "response_format")
    messages = body.get("messages")
    if messages is None:
        raise _bad("you must provide a messages parameter", "messages")
    if not isinstance(messages, list) or not messages:
        raise _bad(
            f"'messages' must be a non-empty list, got {_type_name(messages)} {messages!r}"[:200],
            "messages",
        )
    rendered = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object, got {_type_name(m)}", f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(
                f"messages[{i}].role must be one of {ROLES}, got {role!r}", f"messages[{i}].role"
            )
        rendered.append({"role": role, "content": _message_text(i, m)})
    common = _common_params(body, _max_tokens(body, ("max_completion_tokens", "max_tokens")))
    stream, include_usage = _stream_flags(body)
    try:
        prompt = tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=True)
    except ValueError as e:
        raise _bad(f"could not render the chat template: {e}", "messages") from None
    params = _sampling(common, len(prompt), context, None)
    return ParsedRequest(model, [list(prompt)], params, stream, include_usage)


# ---------------------------------------------------------------------- response bodies


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(rid, created, model, choices: list[dict], usage_: dict | None) -> dict:
    """choices: [{"index", "text", "finish_reason"}]."""
    body = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [dict(c, logprobs=None) for c in choices],
    }
    if usage_ is not None:
        body["usage"] = usage_
    return body


def chat_body(rid, created, model, text: str, finish_reason: str, usage_: dict) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage_,
    }


def chat_chunk(rid, created, model, delta: dict | None, finish_reason=None, usage_=None) -> dict:
    """A chat.completion.chunk; delta None = the usage-only chunk (empty choices)."""
    body = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage_ is not None:
        body["usage"] = usage_
    return body

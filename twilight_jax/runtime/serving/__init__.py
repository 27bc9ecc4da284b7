"""Serving: a continuous-batching engine and an OpenAI-compatible HTTP server over it."""

from twilight_jax.runtime.serving.engine import Engine
from twilight_jax.runtime.serving.metrics import ServingMetrics
from twilight_jax.runtime.serving.requests import (
    Completion,
    EngineStoppedError,
    InvalidRequestError,
    QueueFullError,
    RequestOutput,
    SamplingParams,
)
from twilight_jax.runtime.serving.server import OpenAIServer, ServerThread, serve
from twilight_jax.runtime.serving.sizing import EngineConfig, page_bytes

__all__ = [
    "Completion",
    "Engine",
    "EngineConfig",
    "EngineStoppedError",
    "InvalidRequestError",
    "OpenAIServer",
    "QueueFullError",
    "RequestOutput",
    "SamplingParams",
    "ServerThread",
    "ServingMetrics",
    "page_bytes",
    "serve",
]

"""The engine's static sizes: its configuration, the page pool sized from memory, and the
power-of-two buckets its compiled shapes round up to."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Static sizes of the engine; each one is a compiled shape or a host-side bound.

    max_batch: decoding requests at most (the largest decode batch bucket).
    max_seq_len: context length: prompt + generated tokens of one request; at most the
      model's max_position_embeddings.
    num_pages: physical KV pages in the shared pool, null page included. None: sized from
      memory (``memory_fraction``), at most enough for every request to hold a full context
      (1 + max_batch * ceil(max_seq_len / page_size)).
    memory_fraction: with num_pages None, the share of free memory the pool may take: free
      device memory after the weights where the device reports it (GPU, TPU), else the host's
      available memory (CPU); the rest is left to activations and compiled programs.
    max_queue: requests waiting for a slot; more are refused with ``QueueFullError``.
    prefill_batch: requests prefilled together (padded to a power of two rows). 1 makes a
      request's prefill independent of what arrives with it, bit for bit.
    min_prefill_len: smallest prefill length bucket (buckets are powers of two).
    prefill_chunk: None, or a token count: prompts longer than it are prefilled in chunks of
      it, one chunk per engine iteration between the running batch's decode steps, so a long
      prompt delays the others' next token by one chunk's prefill instead of its whole
      prefill.
    """

    max_batch: int = 8
    max_seq_len: int = 2048
    num_pages: int | None = None
    memory_fraction: float = 0.9
    max_queue: int = 256
    prefill_batch: int = 1
    min_prefill_len: int = 16
    prefill_chunk: int | None = None

    def __post_init__(self):
        for name in ("max_batch", "max_seq_len", "max_queue", "prefill_batch", "min_prefill_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be an int >= 1, got {value!r}")
        if self.num_pages is not None and (
            isinstance(self.num_pages, bool) or not isinstance(self.num_pages, int)
        ):
            raise ValueError(
                f"EngineConfig.num_pages must be None or an int, got {self.num_pages!r}"
            )
        f = self.memory_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
            raise ValueError(f"EngineConfig.memory_fraction must be in (0, 1], got {f!r}")
        chunk = self.prefill_chunk
        if chunk is not None and (
            isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1
        ):
            raise ValueError(
                f"EngineConfig.prefill_chunk must be None or an int >= 1, got {chunk!r}"
            )


def page_bytes(
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype,
    ds_channels=0,
    quest_metadata: str = "int8",
) -> int:
    """Bytes one physical page of a ``PagedKVCache`` costs across all layers and KV heads:
    K and V pages (dtype), INT4 K (head_dim / 2 bytes a token) with its float32 scale and zero
    per token, Quest's per-page min and max (int8 codes and a float32 scale, or dtype with
    quest_metadata "native"), and the Double Sparsity labels (dtype, ds_channels a token) when
    there are any."""
    item = np.dtype(dtype).itemsize
    per_token = 2 * head_dim * item + head_dim // 2 + 2 * 4 + ds_channels * item
    quest = 2 * head_dim * item if quest_metadata == "native" else 2 * head_dim + 4
    return num_layers * num_kv_heads * (page_size * per_token + quest)


def free_device_bytes(stats: Sequence[dict | None]) -> int | None:
    """Bytes free for a cache split evenly over devices, from each device's ``memory_stats()``:
    the smallest (bytes_limit - bytes_in_use) times the device count. None when a device
    reports no limit (CPU)."""
    free = []
    for s in stats:
        if not s or "bytes_limit" not in s:
            return None
        free.append(int(s["bytes_limit"]) - int(s.get("bytes_in_use", 0)))
    return len(free) * max(0, min(free)) if free else None


def host_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def bucket(n: int, cap: int) -> int:
    """The power of two >= n, or cap when that is smaller (cap >= n)."""
    return min(next_pow2(n), cap)


def size_pool(
    ec: EngineConfig, pb: int, max_pages: int, page_size: int, memory_stats
) -> tuple[int, str]:
    """(pages of the pool with the null page, a line saying how it was sized) for pages of pb
    bytes holding page_size tokens, max_pages of them a full context; memory_stats() returns
    the ``memory_stats()`` of each device the cache lives on."""
    full = 1 + ec.max_batch * max_pages  # more than this can never be in use at once
    device_free = free_device_bytes(memory_stats())
    if ec.num_pages is not None:
        n, note = ec.num_pages, "set by num_pages"
        if device_free is not None and (n - 1) * pb > device_free:
            raise ValueError(
                f"EngineConfig.num_pages={n} needs {gib((n - 1) * pb)} of KV cache "
                f"({pb} bytes a page) but the device has {gib(device_free)} free"
            )
    else:
        free, where = device_free, "free device memory"
        if free is None:
            free, where = host_available_bytes(), "available host memory"
        if free is None:
            n, note = full, "no memory figures: every request a full context"
        else:
            fit = 1 + int(ec.memory_fraction * free) // pb
            n = min(full, fit)
            note = (
                f"{ec.memory_fraction:g} of {gib(free)} {where} holds {fit - 1} pages; "
                f"{full - 1} give every request a full context"
            )
    if n - 1 < max_pages:
        how = (
            f"EngineConfig.num_pages={n}"
            if ec.num_pages is not None
            else f"the pool that fits ({note})"
        )
        raise ValueError(
            f"{how} cannot hold one full context: EngineConfig.max_seq_len="
            f"{ec.max_seq_len} needs 1 + {max_pages} pages of {page_size} tokens "
            f"({pb} bytes each)"
        )
    return n, note

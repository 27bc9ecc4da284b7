"""Paged KV cache for decode attention, and the host-side page allocator for serving.

Layout per layer is docs/kernel_api.md (head-major pages, page 0 = null page); all layers live
in one pytree (docs/runtime_api.md). Updates are functional and write straight into the full
arrays, so under ``jax.jit`` with the cache donated they happen in place: prefill by XLA
scatters, a decode step's token by ``pallas_kernels.append.cache_append_decode`` (one kernel
for pages, INT4 K and Quest metadata on a GPU; the same scatters elsewhere), handed each layer
as the all-layer page pool of ``layer_view``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.append import cache_append_decode
from pallas_kernels.int4 import quantize_int4
from pallas_kernels.quest import quantize_page_bounds, widen_page_bounds
from twilight_jax.config import QUEST_METADATA

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_shape(name: str, x, expected: tuple, layout: str) -> None:
    if tuple(np.shape(x)) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {tuple(expected)} ({layout}), got {tuple(np.shape(x))}"
        )


def _check_float(name: str, x) -> None:
    if not any(np.dtype(x.dtype) == np.dtype(d) for d in _FLOAT_DTYPES):
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {np.dtype(x.dtype)}")


def _check_int(name: str, x) -> None:
    if not jnp.issubdtype(np.dtype(x.dtype), jnp.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {np.dtype(x.dtype)}")


def _check_layer(layer, num_layers: int) -> None:
    if isinstance(layer, (int, np.integer)) and not 0 <= int(layer) < num_layers:
        raise ValueError(f"layer must be in [0, {num_layers}), got {layer}")


def gather_tokens(pages, page_table, positions):
    """Rows of logical positions from a page pool: pages [Hkv, P, S, X], page_table
    [B, max_pages], positions [N] int (each < max_pages * S) -> [B, Hkv, N, X] in pages.dtype.
    """
    s = pages.shape[2]
    phys = page_table[:, positions // s]  # [B, N]
    g = jnp.arange(pages.shape[0])[None, :, None]
    return pages[g, phys[:, None, :], (positions % s)[None, None, :]]


class LayerView(NamedTuple):
    """One layer of a PagedKVCache in the kernels' layout (docs/kernel_api.md): arrays
    [Hkv, L * P, ...] shared by all layers, and page_table [B, max_pages] already pointing into
    this layer's pages."""

    k_pages: jax.Array
    v_pages: jax.Array
    k_int4: jax.Array
    k_scale: jax.Array
    k_zero: jax.Array
    k_min: jax.Array
    k_max: jax.Array
    ds_labels: jax.Array | None
    page_table: jax.Array
    k_mm_scale: jax.Array | None = None


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "k_pages",
        "v_pages",
        "k_int4",
        "k_scale",
        "k_zero",
        "k_min",
        "k_max",
        "page_table",
        "lengths",
        "ds_labels",
        "ds_channel_idx",
        "k_mm_scale",
    ],
    meta_fields=["page_size"],
)
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """K/V pages of every layer plus the metadata the sparse selectors read.

    k_pages, v_pages: [Hkv, L, P, S, D] float (S = page_size, P physical pages per layer,
      page 0 null)
    k_int4: [Hkv, L, P, S, D//2] uint8 (split-halves nibbles, docs/kernel_api.md)
    k_scale, k_zero: [Hkv, L, P, S] float32
    k_min, k_max: [Hkv, L, P, D] Quest per-page elementwise min / max: dtype of k_pages
      (quest_metadata "native"), or int8 codes (quest_metadata "int8", pallas_kernels.quest:
      min = k_min * k_mm_scale, rounded outward)
    page_table: [B, max_pages] int32, logical page -> physical page (the same in every layer)
    lengths: [B] int32, tokens valid per sequence
    ds_labels: [Hkv, L, P, S, C] Double Sparsity label cache (K at C heavy channels), or None
    ds_channel_idx: [L, Hkv, C] int32 heavy channels per layer and KV head, or None
    k_mm_scale: [Hkv, L, P] float32 scale of the INT8 k_min / k_max of each page, or None
      (native metadata)

    The layer axis sits after the KV-head axis so that ``layer_view`` can hand the kernels all
    layers as one [Hkv, L * P, ...] page pool (a free reshape) with ``layer * P`` added to the
    page table: slicing one layer out of a [L, ...] array would make XLA copy that layer before
    every Pallas call (measured: 5x the byte floor of a decode step, docs/attention.md).
    """

    k_pages: jax.Array
    v_pages: jax.Array
    k_int4: jax.Array
    k_scale: jax.Array
    k_zero: jax.Array
    k_min: jax.Array
    k_max: jax.Array
    page_table: jax.Array
    lengths: jax.Array
    ds_labels: jax.Array | None
    ds_channel_idx: jax.Array | None
    page_size: int
    k_mm_scale: jax.Array | None = None

    # ------------------------------------------------------------------ shape properties
    @property
    def num_layers(self) -> int:
        return self.k_pages.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k_pages.shape[0]

    @property
    def num_pages(self) -> int:
        return self.k_pages.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k_pages.shape[4]

    @property
    def batch(self) -> int:
        return self.page_table.shape[0]

    @property
    def max_pages(self) -> int:
        return self.page_table.shape[1]

    @property
    def max_seq_len(self) -> int:
        """Tokens one sequence can hold: max_pages * page_size (``create``'s max_seq_len
        rounded up to whole pages)."""
        return self.max_pages * self.page_size

    @property
    def quest_metadata(self) -> str:
        """The form of the Quest metadata: "int8" (codes and a scale per page) or "native"."""
        return "native" if self.k_mm_scale is None else "int8"

    @property
    def ds_channels(self) -> int:
        return 0 if self.ds_channel_idx is None else self.ds_channel_idx.shape[-1]

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        max_seq_len: int,
        page_size: int = 16,
        num_pages: int | None = None,
        dtype=jnp.float32,
        ds_channels: int = 0,
        quest_metadata: str = "int8",
    ) -> PagedKVCache:
        """An empty cache (lengths 0) with sequence b owning pages 1 + b*max_pages, ....

        max_pages = ceil(max_seq_len / page_size); num_pages defaults to 1 + batch*max_pages
        (page 0 is the null page). A serving engine that allocates pages itself passes its own
        num_pages and replaces the table with ``with_page_table``. ds_channels > 0 allocates
        the Double Sparsity label cache with placeholder channels 0..C-1 until
        ``with_ds_channels`` installs a calibration. quest_metadata: "int8" (Quest min / max
        as int8 codes with a float32 scale per page: half the bytes the Quest selector reads,
        bounds looser by at most one step of the scale) or "native" (in dtype).
        """
        if quest_metadata not in QUEST_METADATA:
            raise ValueError(
                f"quest_metadata must be one of {QUEST_METADATA}, got {quest_metadata!r}"
            )
        for name, value, lo in (
            ("num_layers", num_layers, 1),
            ("batch", batch, 1),
            ("num_kv_heads", num_kv_heads, 1),
            ("head_dim", head_dim, 2),
            ("max_seq_len", max_seq_len, 1),
            ("page_size", page_size, 1),
            ("ds_channels", ds_channels, 0),
        ):
            if not isinstance(value, (int, np.integer)) or value < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even (two INT4 nibbles a byte), got {head_dim}")
        if ds_channels > head_dim:
            raise ValueError(f"ds_channels must be <= head_dim={head_dim}, got {ds_channels}")
        max_pages = -(-max_seq_len // page_size)
        if num_pages is None:
            num_pages = 1 + batch * max_pages
        if not isinstance(num_pages, (int, np.integer)) or num_pages < 2:
            raise ValueError(f"num_pages must be an int >= 2 (page 0 is null), got {num_pages!r}")
        if not any(np.dtype(dtype) == np.dtype(d) for d in _FLOAT_DTYPES):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        table = 1 + np.arange(batch * max_pages, dtype=np.int32).reshape(batch, max_pages)
        if table.max() >= num_pages:
            table = np.zeros_like(table)  # too few pages to lay out contiguously: all null
        lhp = (num_kv_heads, num_layers, num_pages)
        meta_dtype = dtype if quest_metadata == "native" else jnp.int8
        ds_idx = ds_labels = None
        if ds_channels:
            ds_idx = jnp.broadcast_to(
                jnp.arange(ds_channels, dtype=jnp.int32), (num_layers, num_kv_heads, ds_channels)
            )
            ds_labels = jnp.zeros((*lhp, page_size, ds_channels), dtype)
        return cls(
            k_pages=jnp.zeros((*lhp, page_size, head_dim), dtype),
            v_pages=jnp.zeros((*lhp, page_size, head_dim), dtype),
            k_int4=jnp.zeros((*lhp, page_size, head_dim // 2), jnp.uint8),
            k_scale=jnp.zeros((*lhp, page_size), jnp.float32),
            k_zero=jnp.zeros((*lhp, page_size), jnp.float32),
            k_min=jnp.zeros((*lhp, head_dim), meta_dtype),
            k_max=jnp.zeros((*lhp, head_dim), meta_dtype),
            page_table=jnp.asarray(table),
            lengths=jnp.zeros((batch,), jnp.int32),
            ds_labels=ds_labels,
            ds_channel_idx=ds_idx,
            page_size=page_size,
            k_mm_scale=None if quest_metadata == "native" else jnp.zeros(lhp, jnp.float32),
        )

    @classmethod
    def from_dense(
        cls,
        k,
        v,
        lengths,
        page_size: int = 16,
        *,
        ds_channel_idx=None,
        backend: str = "auto",
        chunk_tokens: int = 8192,
        quest_metadata: str = "int8",
    ) -> PagedKVCache:
        """A cache holding the first lengths[b] tokens of dense K/V.

        k, v: [B, T, Hkv, D] (one layer) or [L, B, T, Hkv, D], post-RoPE; lengths: [B] int
        (<= T); ds_channel_idx: optional [L, Hkv, C] int heavy channels (allocates labels).
        The cache has dtype k.dtype, max_pages = ceil(T / page_size). Each layer is written
        in chunks of chunk_tokens positions (rounded down to whole pages), so the write's
        temporaries (INT4 codes, scatter indices, float32 copies of the chunk) stay a chunk's
        size rather than the whole prompt's. quest_metadata as in ``create``.
        """
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}")
        if np.ndim(k) == 4:  # one layer
            k = k[None]
            v = v[None] if np.ndim(v) == 4 else v
        if np.ndim(k) != 5:
            raise ValueError(
                f"k must have shape [B, T, Hkv, D] or [L, B, T, Hkv, D], got {np.shape(k)}"
            )
        _check_shape("v", v, np.shape(k), "same as k")
        _check_float("k", k)
        _check_float("v", v)
        num_layers, batch, t, hkv, d = np.shape(k)
        _check_shape("lengths", lengths, (batch,), "[B]")
        _check_int("lengths", lengths)
        if _is_concrete(lengths):
            ln = np.asarray(lengths)
            if ln.min(initial=0) < 0 or ln.max(initial=0) > t:
                raise ValueError(f"lengths must lie in [0, T={t}], got {ln.tolist()}")
        c = 0
        if ds_channel_idx is not None:
            c = np.shape(ds_channel_idx)[-1]
        cache = cls.create(
            num_layers,
            batch,
            hkv,
            d,
            max_seq_len=t,
            page_size=page_size,
            dtype=k.dtype,
            ds_channels=c,
            quest_metadata=quest_metadata,
        )
        if ds_channel_idx is not None:
            cache = cache.with_ds_channels(ds_channel_idx)
        lengths = jnp.asarray(lengths, jnp.int32)
        chunk = max(page_size, chunk_tokens // page_size * page_size)
        for layer in range(num_layers):
            for c0 in range(0, max(t, 1), chunk):
                c1 = min(t, c0 + chunk)
                start = jnp.full((batch,), c0, jnp.int32)
                count = jnp.clip(lengths - c0, 0, c1 - c0)
                cache = cache.write_prefill(
                    layer, k[layer][:, c0:c1], v[layer][:, c0:c1], start, count, backend=backend
                )
        return cache.with_lengths(lengths)

    # ------------------------------------------------------------------ functional updates
    def with_lengths(self, lengths) -> PagedKVCache:
        """The same cache with lengths [B] replaced."""
        _check_shape("lengths", lengths, (self.batch,), "[B]")
        _check_int("lengths", lengths)
        if _is_concrete(lengths):
            ln = np.asarray(lengths)
            if ln.min(initial=0) < 0 or ln.max(initial=0) > self.max_seq_len:
                raise ValueError(
                    f"lengths must lie in [0, max_seq_len={self.max_seq_len}], got {ln.tolist()}"
                )
        return dataclasses.replace(self, lengths=jnp.asarray(lengths, jnp.int32))

    def with_page_table(self, page_table) -> PagedKVCache:
        """The same cache with page_table [B, max_pages] replaced (serving: allocator rows)."""
        _check_shape("page_table", page_table, self.page_table.shape, "[B, max_pages]")
        _check_int("page_table", page_table)
        if _is_concrete(page_table):
            pt = np.asarray(page_table)
            if pt.min(initial=0) < 0 or pt.max(initial=0) >= self.num_pages:
                raise ValueError(
                    f"page_table entries must lie in [0, num_pages={self.num_pages}), "
                    f"got range [{pt.min()}, {pt.max()}]"
                )
        return dataclasses.replace(self, page_table=jnp.asarray(page_table, jnp.int32))

    def with_ds_channels(self, channel_idx) -> PagedKVCache:
        """Installs Double Sparsity channels [L, Hkv, C] and rebuilds the labels from k_pages."""
        if self.ds_channel_idx is None:
            raise ValueError("with_ds_channels needs a cache created with ds_channels > 0")
        _check_shape("channel_idx", channel_idx, self.ds_channel_idx.shape, "[L, Hkv, C]")
        _check_int("channel_idx", channel_idx)
        if _is_concrete(channel_idx):
            ci = np.asarray(channel_idx)
            if ci.min() < 0 or ci.max() >= self.head_dim:
                raise ValueError(
                    f"channel_idx entries must lie in [0, head_dim={self.head_dim}), "
                    f"got range [{ci.min()}, {ci.max()}]"
                )
        idx = jnp.asarray(channel_idx, jnp.int32)
        labels = jnp.take_along_axis(
            self.k_pages, idx.transpose(1, 0, 2)[:, :, None, None, :], axis=-1
        )
        return dataclasses.replace(self, ds_channel_idx=idx, ds_labels=labels)

    def with_quest_metadata(self, quest_metadata: str) -> PagedKVCache:
        """The same cache with its Quest metadata in the form quest_metadata: native -> int8
        quantizes every page's min / max once (what a prefill of the same tokens writes); the
        form it has: the cache itself. int8 -> native is refused: the codes are bounds, not
        the min / max, which only the keys can give back."""
        if quest_metadata not in QUEST_METADATA:
            raise ValueError(
                f"quest_metadata must be one of {QUEST_METADATA}, got {quest_metadata!r}"
            )
        if quest_metadata == self.quest_metadata:
            return self
        if quest_metadata == "native":
            raise ValueError(
                "with_quest_metadata cannot turn int8 Quest metadata back into the exact min / "
                "max; build the cache with quest_metadata='native' instead"
            )
        lo, hi, scale = quantize_page_bounds(self.k_min, self.k_max)
        return dataclasses.replace(self, k_min=lo, k_max=hi, k_mm_scale=scale)

    def begin_decode_step(self, active=None) -> PagedKVCache:
        """lengths += 1 for active sequences ([B] bool; None = all): the token about to be
        written belongs to this step's attention."""
        if active is None:
            return dataclasses.replace(self, lengths=self.lengths + 1)
        _check_shape("active", active, (self.batch,), "[B] bool")
        return dataclasses.replace(self, lengths=self.lengths + jnp.asarray(active, jnp.int32))

    def _slots(self, pos, ok):
        """Logical positions [B, ...] -> (physical page, slot); page num_pages where not ok, so
        scatters with mode="drop" skip those entries."""
        logical = jnp.clip(pos // self.page_size, 0, self.max_pages - 1)
        b = jnp.arange(self.batch).reshape((-1,) + (1,) * (pos.ndim - 1))
        phys = jnp.where(ok, self.page_table[b, logical], self.num_pages)
        return phys, pos % self.page_size

    def _at(self, layer, phys, slot=None):
        """Advanced index of the rows (layer, phys[...], slot[...]) of every KV head in a
        [Hkv, L, P, ...] array: selects [*phys.shape, Hkv, ...]."""
        heads = jnp.arange(self.num_kv_heads).reshape((1,) * phys.ndim + (-1,))
        if slot is None:
            return heads, layer, phys[..., None]
        return heads, layer, phys[..., None], slot[..., None]

    def layer_view(self, layer) -> LayerView:
        """One layer as the kernels take it, with no copy: every array viewed as one
        [Hkv, L * P, ...] page pool and the page table offset by layer * P (layer may be
        traced)."""

        def pool(x):
            return None if x is None else x.reshape(x.shape[0], -1, *x.shape[3:])

        return LayerView(
            k_pages=pool(self.k_pages),
            v_pages=pool(self.v_pages),
            k_int4=pool(self.k_int4),
            k_scale=pool(self.k_scale),
            k_zero=pool(self.k_zero),
            k_min=pool(self.k_min),
            k_max=pool(self.k_max),
            ds_labels=pool(self.ds_labels),
            page_table=self.page_table + jnp.asarray(layer, jnp.int32) * self.num_pages,
            k_mm_scale=pool(self.k_mm_scale),
        )

    def _write_tokens(self, layer, k, v, phys, slot, backend):
        """Writes K/V rows [B, ..., Hkv, D] to (phys, slot) [B, ...] of one layer: bf16 pages,
        INT4 K and DS labels (Quest metadata is the caller's)."""
        k = k.astype(self.k_pages.dtype)
        idx = self._at(layer, phys, slot)
        packed, scale, zero = quantize_int4(k.astype(jnp.float32), backend=backend)
        updates = dict(
            k_pages=self.k_pages.at[idx].set(k, mode="drop"),
            v_pages=self.v_pages.at[idx].set(v.astype(self.v_pages.dtype), mode="drop"),
            k_int4=self.k_int4.at[idx].set(packed, mode="drop"),
            k_scale=self.k_scale.at[idx].set(scale, mode="drop"),
            k_zero=self.k_zero.at[idx].set(zero, mode="drop"),
        )
        if self.ds_labels is not None:
            updates["ds_labels"] = self._written_labels(layer, k, idx)
        return dataclasses.replace(self, **updates)

    def _written_labels(self, layer, k, idx):
        """ds_labels with the Double Sparsity labels (K at the layer's heavy channels) of the
        rows k [..., Hkv, D] (k_pages dtype) written at the index idx of ``_at``."""
        ch = self.ds_channel_idx[layer]  # [Hkv, C]
        labels = jnp.take_along_axis(k, jnp.broadcast_to(ch, k.shape[:-1] + ch.shape[-1:]), -1)
        return self.ds_labels.at[idx].set(labels, mode="drop")

    def _check_write(self, layer, k, v, lead: tuple, layout: str) -> None:
        _check_layer(layer, self.num_layers)
        expected = (*lead, self.num_kv_heads, self.head_dim)
        _check_shape("k", k, expected, layout)
        _check_shape("v", v, expected, layout)
        _check_float("k", k)
        _check_float("v", v)

    def write_prefill(self, layer, k, v, start, count, *, backend: str = "auto") -> PagedKVCache:
        """Bulk write of one layer: token t < count[b] of k, v [B, T, Hkv, D] goes to position
        start[b] + t (start, count: [B] int). Updates pages, INT4 K, Quest min/max of every
        touched page (over all its tokens up to start + count) and DS labels. Lengths are left
        alone; positions past max_seq_len are dropped."""
        self._check_write(layer, k, v, (self.batch, np.shape(k)[1]), "[B, T, Hkv, D]")
        for name, x in (("start", start), ("count", count)):
            _check_shape(name, x, (self.batch,), "[B]")
            _check_int(name, x)
        if _is_concrete(start) and _is_concrete(count):
            end = np.asarray(start) + np.asarray(count)
            if np.asarray(start).min() < 0 or np.asarray(count).min() < 0:
                raise ValueError("start and count must be >= 0")
            if end.max(initial=0) > self.max_seq_len:
                raise ValueError(
                    f"start + count must be <= max_seq_len={self.max_seq_len}, got {end.tolist()}"
                )
        return _write_prefill(
            self,
            jnp.asarray(layer, jnp.int32),
            k,
            v,
            jnp.asarray(start, jnp.int32),
            jnp.asarray(count, jnp.int32),
            backend,
        )

    def _update_quest(self, layer, k, start, count) -> PagedKVCache:
        """Quest min/max of the pages that positions [start, start + count) fall in, from the
        written keys k [B, T, Hkv, D] (no read of k_pages: a read of the pages that nothing
        downstream depends on would make XLA copy the whole page pool to order it before the
        next layer's in-place write). A page the chunk enters mid-way (start not on a page
        boundary) keeps the min/max of its earlier tokens; any other touched page starts afresh.
        """
        s = self.page_size
        b, t = k.shape[:2]
        n_touched = -(-t // s) + 1  # an unaligned start spans one extra page
        first = start // s  # [B] logical page of the first written token
        rel = (start[:, None] + jnp.arange(t, dtype=jnp.int32)) // s - first[:, None]  # [B, T]
        written = jnp.arange(t) < count[:, None]
        rel = jnp.where(written, rel, n_touched)  # out of range: dropped by the scatters
        kc = k.astype(self.k_pages.dtype)
        shape = (b, n_touched, *k.shape[2:])  # [B, NT, Hkv, D]
        rows = jnp.arange(b)[:, None]
        inf = jnp.asarray(jnp.inf, kc.dtype)
        kmin = jnp.full(shape, inf).at[rows, rel].min(kc, mode="drop")
        kmax = jnp.full(shape, -inf).at[rows, rel].max(kc, mode="drop")
        logical = first[:, None] + jnp.arange(n_touched, dtype=jnp.int32)  # [B, NT]
        ok = (logical * s < (start + count)[:, None]) & (count > 0)[:, None]
        ok &= logical < self.max_pages
        phys, _ = self._slots(logical * s, ok)
        # The entered page's earlier tokens (positions below start) keep counting.
        entered = (start % s != 0)[:, None, None, None] & (jnp.arange(n_touched) == 0)[
            None, :, None, None
        ]
        old = self._at(layer, jnp.minimum(phys, self.num_pages - 1))
        idx = self._at(layer, phys)
        if self.k_mm_scale is None:
            kmin = jnp.where(entered, jnp.minimum(kmin, self.k_min[old]), kmin)
            kmax = jnp.where(entered, jnp.maximum(kmax, self.k_max[old]), kmax)
            return dataclasses.replace(
                self,
                k_min=self.k_min.at[idx].set(kmin, mode="drop"),
                k_max=self.k_max.at[idx].set(kmax, mode="drop"),
            )
        # INT8: an entered page is widened like a decode append; the others are quantized once
        # from the float min / max of their tokens.
        lo, hi, scale = widen_page_bounds(
            self.k_min[old], self.k_max[old], self.k_mm_scale[old][..., None], kmin, kmax, ~entered
        )
        return dataclasses.replace(
            self,
            k_min=self.k_min.at[idx].set(lo.astype(jnp.int8), mode="drop"),
            k_max=self.k_max.at[idx].set(hi.astype(jnp.int8), mode="drop"),
            k_mm_scale=self.k_mm_scale.at[idx].set(scale[..., 0], mode="drop"),
        )

    def write_decode(self, layer, k, v, *, active=None, backend: str = "auto") -> PagedKVCache:
        """One token per sequence: k, v [B, Hkv, D] at position lengths[b] - 1 (after
        begin_decode_step); sequences with length 0 are skipped, and so are those where
        active [B] bool is False (pass the mask given to begin_decode_step, or the last token
        of a paused sequence is overwritten). Quest min/max of the page restart at slot 0 and
        widen otherwise."""
        self._check_write(layer, k, v, (self.batch,), "[B, Hkv, D]")
        if active is None:
            active = jnp.ones((self.batch,), bool)
        _check_shape("active", active, (self.batch,), "[B] bool")
        return _write_decode(
            self, jnp.asarray(layer, jnp.int32), k, v, jnp.asarray(active, bool), backend
        )


# One compiled program per write instead of dozens of eager ops; layer is traced so all layers
# share it. Inside a caller's jit these simply inline.
@functools.partial(jax.jit, static_argnums=6)
def _write_prefill(cache, layer, k, v, start, count, backend):
    t = k.shape[1]
    pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)
    ok = (jnp.arange(t) < count[:, None]) & (pos < cache.max_seq_len)
    phys, slot = cache._slots(pos, ok)
    cache = cache._write_tokens(layer, k, v, phys, slot, backend)
    return cache._update_quest(layer, k, start, count)


@functools.partial(jax.jit, static_argnums=5)
def _write_decode(cache, layer, k, v, active, backend):
    pos = cache.lengths - 1
    ok = active & (pos >= 0) & (pos < cache.max_seq_len)
    view = cache.layer_view(layer)
    pools = cache_append_decode(
        view.k_pages,
        view.v_pages,
        view.k_int4,
        view.k_scale,
        view.k_zero,
        view.k_min,
        view.k_max,
        k,
        v,
        view.page_table,
        jnp.where(ok, pos, -1).astype(jnp.int32),
        k_mm_scale=view.k_mm_scale,
        backend=backend,
    )
    names = ("k_pages", "v_pages", "k_int4", "k_scale", "k_zero", "k_min", "k_max", "k_mm_scale")
    # The [Hkv, L * P, ...] pools back to [Hkv, L, P, ...]: free reshapes.
    updates = {n: x.reshape(getattr(cache, n).shape) for n, x in zip(names, pools)}
    if cache.ds_labels is not None:
        phys, slot = cache._slots(pos, ok)
        kc = k.astype(cache.k_pages.dtype)
        updates["ds_labels"] = cache._written_labels(layer, kc, cache._at(layer, phys, slot))
    return dataclasses.replace(cache, **updates)


class OutOfPagesError(RuntimeError):
    """The allocator has fewer free pages than a request asked for."""


class PageAllocator:
    """Host-side free list of physical pages for a serving engine.

    Pages 1..num_pages-1 are handed out; page 0 is the null page and never is. A request's
    pages are kept in order (logical page i of the request = its i-th page) so its page-table
    row is ``table_row``. Allocation is all-or-nothing.
    """

    def __init__(self, num_pages: int):
        if not isinstance(num_pages, (int, np.integer)) or num_pages < 2:
            raise ValueError(f"num_pages must be an int >= 2 (page 0 is null), got {num_pages!r}")
        self.num_pages = int(num_pages)
        # Popping from the end hands out low page ids first.
        self._free = list(range(self.num_pages - 1, 0, -1))
        self._owned: dict = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def pages(self, request_id) -> list[int]:
        """The pages a request holds, in logical order (empty if it holds none)."""
        return list(self._owned.get(request_id, ()))

    def alloc(self, request_id, num_pages: int) -> list[int]:
        """Appends num_pages new pages to the request; returns the new ones."""
        if not isinstance(num_pages, (int, np.integer)) or num_pages < 0:
            raise ValueError(f"num_pages must be an int >= 0, got {num_pages!r}")
        if num_pages > len(self._free):
            raise OutOfPagesError(
                f"request {request_id!r} asked for {num_pages} pages, {len(self._free)} free"
            )
        new = [self._free.pop() for _ in range(num_pages)]
        self._owned.setdefault(request_id, []).extend(new)
        return new

    def ensure(self, request_id, num_tokens: int, page_size: int) -> list[int]:
        """Grows the request to hold num_tokens tokens; returns the newly added pages."""
        need = -(-num_tokens // page_size) - len(self._owned.get(request_id, ()))
        return self.alloc(request_id, max(need, 0))

    def free(self, request_id) -> None:
        """Returns every page of the request to the free list."""
        if request_id not in self._owned:
            raise ValueError(f"request_id {request_id!r} holds no pages")
        self._free.extend(reversed(self._owned.pop(request_id)))

    def table_row(self, request_id, max_pages: int) -> np.ndarray:
        """[max_pages] int32 page-table row of the request, padded with the null page 0."""
        pages = self._owned.get(request_id, [])
        if len(pages) > max_pages:
            raise ValueError(
                f"max_pages={max_pages} is smaller than the {len(pages)} pages of request "
                f"{request_id!r}"
            )
        row = np.zeros((max_pages,), np.int32)
        row[: len(pages)] = pages
        return row

"""Dense paged and sparse decode attention: kernels vs the jnp reference, reference vs softmax.

Caches are built from dense logical K/V with pages in random physical order; every slot that
holds no valid token (null page, tails of last pages, unused pages) is NaN, and page-table
entries past a sequence's pages and list entries past the count are garbage (out of range), so
anything read that should not be shows up as NaN or a wrong value. The TPU interpreter also
fills unwritten output with NaN and raises on out-of-bounds reads.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _export import export_cuda, export_tpu

from pallas_kernels import attention
from pallas_kernels.attention import AttentionGpuConfig, AttentionTpuConfig

NUM_KV_HEADS = 2
TOL = {jnp.float32: dict(rtol=2e-5, atol=2e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}
# Small tiles so the tiny test shapes still cover several splits and tiles per program.
GPU_SMALL = AttentionGpuConfig(block_tokens=16, target_programs=64)
TPU_SMALL = AttentionTpuConfig(block_tokens=16)


def _cache(seed, *, lengths, group, head_dim, page_size, dtype):
    """Random q and paged cache; returns (arrays, dense logical K/V in float64)."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    batch = len(lengths)
    max_pages = -(-int(lengths.max()) // page_size) + 1  # one spare entry left on the null page
    num_pages = 1 + batch * max_pages
    k_dense = rng.standard_normal((batch, max_pages * page_size, NUM_KV_HEADS, head_dim))
    v_dense = rng.standard_normal((batch, max_pages * page_size, NUM_KV_HEADS, head_dim))
    q = rng.standard_normal((batch, NUM_KV_HEADS * group, head_dim))
    # Round through the kernel dtype so the float64 check sees the same numbers.
    k_dense, v_dense, q = (
        np.asarray(jnp.asarray(x, dtype), np.float64) for x in (k_dense, v_dense, q)
    )

    k_pages = np.full((NUM_KV_HEADS, num_pages, page_size, head_dim), np.nan)
    v_pages = np.full_like(k_pages, np.nan)
    # Unused page-table entries are garbage, not the null page: kernels must never follow them.
    page_table = rng.choice(np.array([-7, 0, 10**6], np.int32), (batch, max_pages))
    physical = iter(rng.permutation(num_pages - 1) + 1)
    for b in range(batch):
        for p in range(-(-int(lengths[b]) // page_size)):
            page_table[b, p] = phys = next(physical)
            n = min(page_size, int(lengths[b]) - p * page_size)
            tokens = slice(p * page_size, p * page_size + n)
            k_pages[:, phys, :n] = np.swapaxes(k_dense[b, tokens], 0, 1)
            v_pages[:, phys, :n] = np.swapaxes(v_dense[b, tokens], 0, 1)
    arrays = dict(
        q=jnp.asarray(q, dtype),
        k_pages=jnp.asarray(k_pages, dtype),
        v_pages=jnp.asarray(v_pages, dtype),
        page_table=jnp.asarray(page_table),
        lengths=jnp.asarray(lengths),
    )
    return arrays, (q, k_dense, v_dense), rng


def _lists(rng, lengths, rows, capacity):
    """token_pos [B, rows, capacity], counts [B, rows]: counts cycle through capacity, 1, 0 and a
    random value (each capped by the sequence length); unique positions; garbage past counts."""
    batch = len(lengths)
    token_pos = rng.integers(-(10**6), 10**6, (batch, rows, capacity)).astype(np.int32)
    counts = np.zeros((batch, rows), np.int32)
    for b in range(batch):
        for i in range(rows):
            wanted = (capacity, 1, 0, int(rng.integers(2, capacity)))[(b + i) % 4]
            n = min(wanted, int(lengths[b]))
            token_pos[b, i, :n] = rng.choice(int(lengths[b]), n, replace=False)
            counts[b, i] = n
    return jnp.asarray(token_pos), jnp.asarray(counts)


def _softmax_attention(q, k_dense, v_dense, positions, scale):
    """float64 softmax of one query row over the given rows of dense K/V; zeros if empty."""
    if len(positions) == 0:
        return np.zeros_like(q)
    logits = k_dense[positions] @ q * scale
    w = np.exp(logits - logits.max())
    return (w / w.sum()) @ v_dense[positions]


def _close(out, ref, dtype):
    assert out.dtype == jnp.dtype(dtype)
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(out)), "non-finite output"
    np.testing.assert_allclose(out, ref, **TOL[dtype])


# Ragged lengths with 0 and 1; 37 leaves a partly filled last page.
LENGTHS = (37, 0, 1, 26)
CAPACITY = 24  # neither a power of two nor a multiple of the TPU tile


# ---------------------------------------------------------------------------------------------
# The reference itself, against a direct softmax on the dense logical K/V
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim,page_size", [(64, 1), (128, 16), (64, 16)])
def test_reference_matches_direct_softmax(group, head_dim, page_size):
    seed = group * 1000 + head_dim + page_size
    a, (q, k_dense, v_dense), rng = _cache(
        seed,
        lengths=LENGTHS,
        group=group,
        head_dim=head_dim,
        page_size=page_size,
        dtype=jnp.float32,
    )
    scale = 1.0 / math.sqrt(head_dim)
    cache = (a["q"], a["k_pages"], a["v_pages"], a["page_table"])
    dense = np.asarray(attention.paged_decode_attention_reference(*cache, a["lengths"]))
    want = np.zeros_like(q)
    for b, length in enumerate(LENGTHS):
        for h in range(q.shape[1]):
            kv = (k_dense[b, :, h // group], v_dense[b, :, h // group])
            want[b, h] = _softmax_attention(q[b, h], *kv, np.arange(length), scale)
    np.testing.assert_allclose(dense, want, rtol=1e-5, atol=1e-5)
    for rows in (NUM_KV_HEADS, q.shape[1]):
        token_pos, counts = _lists(rng, LENGTHS, rows, CAPACITY)
        sparse = attention.sparse_decode_attention_reference(*cache, token_pos, counts)
        token_pos, counts = np.asarray(token_pos), np.asarray(counts)
        for b in range(len(LENGTHS)):
            for h in range(q.shape[1]):
                i = h // (q.shape[1] // rows)
                kv = (k_dense[b, :, h // group], v_dense[b, :, h // group])
                pos = token_pos[b, i, : counts[b, i]]
                want[b, h] = _softmax_attention(q[b, h], *kv, pos, scale)
        np.testing.assert_allclose(np.asarray(sparse), want, rtol=1e-5, atol=1e-5)


def test_reference_custom_scale():
    a, (q, k_dense, v_dense), _ = _cache(
        5, lengths=(9,), group=4, head_dim=64, page_size=16, dtype=jnp.float32
    )
    out = attention.paged_decode_attention_reference(
        a["q"], a["k_pages"], a["v_pages"], a["page_table"], a["lengths"], scale=0.5
    )
    want = _softmax_attention(q[0, 3], k_dense[0, :, 0], v_dense[0, :, 0], np.arange(9), 0.5)
    np.testing.assert_allclose(out[0, 3], want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Kernels (interpret mode) against the reference
# ---------------------------------------------------------------------------------------------

# (group, head_dim, page_size, dtype): each GQA ratio, head_dim, page size and dtype at least
# once. Every distinct shape costs a few seconds of interpreter compilation, hence no product.
KERNEL_CASES = [
    (1, 64, 16, jnp.float32),
    (4, 128, 1, jnp.bfloat16),
    (8, 64, 16, jnp.bfloat16),
]
DENSE = {"gpu": attention.paged_decode_attention_gpu, "tpu": attention.paged_decode_attention_tpu}
SPARSE = {
    "gpu": attention.sparse_decode_attention_gpu,
    "tpu": attention.sparse_decode_attention_tpu,
}


@pytest.mark.parametrize("group,head_dim,page_size,dtype", KERNEL_CASES)
@pytest.mark.parametrize("impl", ["gpu", "tpu"])
def test_kernels(impl, group, head_dim, page_size, dtype):
    """Dense and per-group lists (and per-head lists) on one ragged cache."""
    seed = 10 + group * 100 + head_dim + page_size
    a, _, rng = _cache(
        seed, lengths=LENGTHS, group=group, head_dim=head_dim, page_size=page_size, dtype=dtype
    )
    config = GPU_SMALL if impl == "gpu" else TPU_SMALL
    cache = (a["q"], a["k_pages"], a["v_pages"], a["page_table"])
    out = DENSE[impl](*cache, a["lengths"], config=config, interpret=True)
    _close(out, attention.paged_decode_attention_reference(*cache, a["lengths"]), dtype)
    # Per-head lists once per backend (G = 4); G = 1 has nothing to add and G = 8 would cost
    # another interpreter compilation.
    for rows in (NUM_KV_HEADS, NUM_KV_HEADS * group) if group == 4 else (NUM_KV_HEADS,):
        lists = _lists(rng, LENGTHS, rows, CAPACITY)
        out = SPARSE[impl](*cache, *lists, config=config, interpret=True)
        _close(out, attention.sparse_decode_attention_reference(*cache, *lists), dtype)
    if group == 1:
        # Counts past the capacity are clamped to it (same shapes: no new compilation).
        token_pos, counts = lists
        full = counts[0] == CAPACITY
        assert bool(full.any())
        over = counts.at[0].set(jnp.where(full, CAPACITY + 7, counts[0]))
        out = SPARSE[impl](*cache, token_pos, over, config=config, interpret=True)
        _close(out, attention.sparse_decode_attention_reference(*cache, *lists), dtype)


def test_gpu_kernel_group_of_three():
    """G = 3 query heads a KV head (LLaMA-3.2-3B's 24 / 8): the GPU kernel pads them to its
    16-row dot inside the kernel; the partials of the real rows alone are stored and merged."""
    a, _, rng = _cache(61, lengths=LENGTHS, group=3, head_dim=64, page_size=16, dtype=jnp.float32)
    cache = (a["q"], a["k_pages"], a["v_pages"], a["page_table"])
    out = DENSE["gpu"](*cache, a["lengths"], config=GPU_SMALL, interpret=True)
    _close(out, attention.paged_decode_attention_reference(*cache, a["lengths"]), jnp.float32)
    lists = _lists(rng, LENGTHS, NUM_KV_HEADS, CAPACITY)
    out = SPARSE["gpu"](*cache, *lists, config=GPU_SMALL, interpret=True)
    _close(out, attention.sparse_decode_attention_reference(*cache, *lists), jnp.float32)


def test_dispatch_default_config_scale_mixed_dtype():
    """Public entries on every backend with the shipped tile sizes (one split, tiles longer
    than the lists), a custom scale, and a float32 query on a bfloat16 cache."""
    a, _, rng = _cache(31, lengths=LENGTHS, group=4, head_dim=128, page_size=16, dtype=jnp.bfloat16)
    q = a["q"].astype(jnp.float32)
    dense = (q, a["k_pages"], a["v_pages"], a["page_table"], a["lengths"])
    sparse = (q, a["k_pages"], a["v_pages"], a["page_table"]) + _lists(
        rng, LENGTHS, NUM_KV_HEADS, CAPACITY
    )
    ref_dense = attention.paged_decode_attention_reference(*dense, scale=0.3)
    ref_sparse = attention.sparse_decode_attention_reference(*sparse, scale=0.3)
    for backend in ("auto", "reference", "pallas", "pallas_tpu"):
        out = attention.paged_decode_attention(*dense, scale=0.3, backend=backend)
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(out, ref_dense, **TOL[jnp.bfloat16])
        out = attention.sparse_decode_attention(*sparse, scale=0.3, backend=backend)
        np.testing.assert_allclose(out, ref_sparse, **TOL[jnp.bfloat16])


def test_gpu_splits_cover_uneven_counts():
    """Many splits over short and long counts: empty splits must not disturb the merge."""
    lengths = (70, 3, 16, 0, 33)
    a, _, _ = _cache(41, lengths=lengths, group=4, head_dim=64, page_size=16, dtype=jnp.float32)
    config = AttentionGpuConfig(block_tokens=16, target_programs=10**6, max_splits=8)
    assert config.num_splits(len(lengths), NUM_KV_HEADS, a["page_table"].shape[1] * 16) == 6
    args = (a["q"], a["k_pages"], a["v_pages"], a["page_table"], a["lengths"])
    out = attention.paged_decode_attention(*args, backend="pallas_gpu", config=config)
    _close(out, attention.paged_decode_attention_reference(*args), jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_one_split_writes_the_output(dtype):
    """One split a row: the kernel normalizes and stores the output in q's dtype itself (no
    partials, no merge); empty rows give zeros; dense and sparse lists. Exported for CUDA."""
    a, _, rng = _cache(43, lengths=(70, 0, 33), group=4, head_dim=64, page_size=16, dtype=dtype)
    config = AttentionGpuConfig(block_tokens=16, max_splits=1)
    cache = (a["q"], a["k_pages"], a["v_pages"], a["page_table"])
    out = attention.paged_decode_attention(
        *cache, a["lengths"], backend="pallas_gpu", config=config
    )
    assert out.dtype == dtype
    _close(out, attention.paged_decode_attention_reference(*cache, a["lengths"]), dtype)
    np.testing.assert_array_equal(np.asarray(out[1], np.float32), 0.0)
    lists = _lists(rng, (70, 0, 33), NUM_KV_HEADS, CAPACITY)
    out = attention.sparse_decode_attention(*cache, *lists, backend="pallas_gpu", config=config)
    _close(out, attention.sparse_decode_attention_reference(*cache, *lists), dtype)
    dense, sparse = _shapes(16, 32, 8, 128, 4097, 16, 2048, 256, 8, jnp.bfloat16)
    export_cuda(functools.partial(attention.paged_decode_attention_gpu, config=config), *dense)
    export_cuda(functools.partial(attention.sparse_decode_attention_gpu, config=config), *sparse)


def test_jit_no_retrace_on_counts():
    a, _, rng = _cache(53, lengths=LENGTHS, group=4, head_dim=64, page_size=16, dtype=jnp.float32)
    token_pos, counts = _lists(rng, LENGTHS, NUM_KV_HEADS, CAPACITY)
    traces = []

    @jax.jit
    def step(q, counts):
        traces.append(1)
        return attention.sparse_decode_attention(
            q, a["k_pages"], a["v_pages"], a["page_table"], token_pos, counts, backend="pallas"
        )

    step(a["q"], counts)
    out = step(a["q"], jnp.minimum(counts, 1))
    assert len(traces) == 1
    ref = attention.sparse_decode_attention_reference(
        a["q"], a["k_pages"], a["v_pages"], a["page_table"], token_pos, jnp.minimum(counts, 1)
    )
    _close(out, ref, jnp.float32)


# ---------------------------------------------------------------------------------------------
# Lowering for CUDA (Triton IR) and TPU (Mosaic), at shapes the interpreters are too slow for
# ---------------------------------------------------------------------------------------------


def _shapes(
    batch,
    num_q_heads,
    num_kv_heads,
    head_dim,
    num_pages,
    page_size,
    max_pages,
    capacity,
    rows,
    dtype,
):
    s = jax.ShapeDtypeStruct
    cache = (
        s((batch, num_q_heads, head_dim), dtype),
        s((num_kv_heads, num_pages, page_size, head_dim), dtype),
        s((num_kv_heads, num_pages, page_size, head_dim), dtype),
        s((batch, max_pages), jnp.int32),
    )
    dense = cache + (s((batch,), jnp.int32),)
    sparse = cache + (s((batch, rows, capacity), jnp.int32), s((batch, rows), jnp.int32))
    return dense, sparse


EXPORT_CASES = [
    # batch, Hq, Hkv, D, num_pages, page_size, max_pages, capacity, per_head, dtype
    (16, 32, 8, 128, 4097, 16, 2048, 8192, False, jnp.bfloat16),  # LLaMA-3-8B at 32K
    (3, 12, 3, 64, 1000, 16, 37, 300, False, jnp.bfloat16),  # nothing a power of two
    (2, 8, 8, 128, 257, 1, 100, 64, False, jnp.float32),  # MHA, page size 1
    (4, 16, 2, 64, 513, 16, 64, 256, True, jnp.bfloat16),  # GQA 8, per-head lists
]


@pytest.mark.parametrize("case", EXPORT_CASES, ids=lambda c: "x".join(map(str, c[:8])))
def test_export_cuda(case):
    *dims, per_head, dtype = case
    rows = dims[1] if per_head else dims[2]
    dense, sparse = _shapes(*dims, rows, dtype)
    export_cuda(attention.paged_decode_attention_gpu, *dense)
    export_cuda(attention.sparse_decode_attention_gpu, *sparse)


@pytest.mark.parametrize("case", EXPORT_CASES, ids=lambda c: "x".join(map(str, c[:8])))
def test_export_tpu(case):
    *dims, per_head, dtype = case
    rows = dims[1] if per_head else dims[2]
    dense, sparse = _shapes(*dims, rows, dtype)
    export_tpu(attention.paged_decode_attention_tpu, *dense)
    export_tpu(attention.sparse_decode_attention_tpu, *sparse)


# ---------------------------------------------------------------------------------------------
# Bad input: ValueError naming the argument, before any tracing
# ---------------------------------------------------------------------------------------------


def _good(dtype=jnp.bfloat16):
    z = jnp.zeros
    return dict(
        q=z((2, 8, 64), dtype),
        k_pages=z((2, 5, 16, 64), dtype),
        v_pages=z((2, 5, 16, 64), dtype),
        page_table=z((2, 3), jnp.int32),
        lengths=z((2,), jnp.int32),
        token_pos=z((2, 2, 7), jnp.int32),
        counts=z((2, 2), jnp.int32),
    )


def _bad(name, value):
    g = _good()
    g[name] = value
    return g


DENSE_BAD = [
    ("q", jnp.zeros((2, 8), jnp.bfloat16), "q must have rank 3"),
    ("q", jnp.zeros((2, 8, 64), jnp.int32), "q must have dtype"),
    ("q", jnp.zeros((2, 7, 64), jnp.bfloat16), "num_q_heads=7"),
    ("q", jnp.zeros((2, 8, 32), jnp.bfloat16), "k_pages dimension 3"),
    ("k_pages", jnp.zeros((2, 5, 16, 64), jnp.int8), "k_pages must have dtype"),
    ("v_pages", jnp.zeros((2, 5, 8, 64), jnp.bfloat16), "v_pages must have the shape"),
    ("v_pages", jnp.zeros((2, 5, 16, 64), jnp.float32), "v_pages must have the dtype"),
    ("page_table", jnp.zeros((3, 3), jnp.int32), "page_table dimension 0"),
    ("page_table", jnp.zeros((2, 3), jnp.float32), "page_table must have dtype"),
    ("lengths", jnp.zeros((3,), jnp.int32), "lengths dimension 0"),
    ("lengths", jnp.zeros((2,), jnp.uint32), "lengths must have dtype"),
]


@pytest.mark.parametrize("name,value,message", DENSE_BAD)
@pytest.mark.parametrize("backend", ["reference", "pallas", "pallas_tpu"])
def test_dense_bad_input(backend, name, value, message):
    g = _bad(name, value)
    with pytest.raises(ValueError, match=message):
        attention.paged_decode_attention(
            g["q"], g["k_pages"], g["v_pages"], g["page_table"], g["lengths"], backend=backend
        )


SPARSE_BAD = [
    ("token_pos", jnp.zeros((2, 2), jnp.int32), "token_pos must have rank 3"),
    ("token_pos", jnp.zeros((3, 2, 7), jnp.int32), "token_pos dimension 0"),
    ("token_pos", jnp.zeros((2, 3, 7), jnp.int32), r"token_pos dimension 1 \(Hi\)"),
    ("token_pos", jnp.zeros((2, 2, 0), jnp.int32), "token_pos capacity"),
    ("token_pos", jnp.zeros((2, 2, 7), jnp.float32), "token_pos must have dtype"),
    ("counts", jnp.zeros((2, 8), jnp.int32), "counts must have shape"),
    ("counts", jnp.zeros((2, 2), jnp.float32), "counts must have dtype"),
    ("q", jnp.zeros((2, 8, 64), jnp.int32), "q must have dtype"),
]


@pytest.mark.parametrize("name,value,message", SPARSE_BAD)
@pytest.mark.parametrize("backend", ["reference", "pallas", "pallas_tpu"])
def test_sparse_bad_input(backend, name, value, message):
    g = _bad(name, value)
    with pytest.raises(ValueError, match=message):
        attention.sparse_decode_attention(
            g["q"],
            g["k_pages"],
            g["v_pages"],
            g["page_table"],
            g["token_pos"],
            g["counts"],
            backend=backend,
        )


def test_bad_scale_backend_and_gpu_head_dim():
    g = _good()
    dense = (g["q"], g["k_pages"], g["v_pages"], g["page_table"], g["lengths"])
    with pytest.raises(ValueError, match="scale must be a Python number"):
        attention.paged_decode_attention(*dense, scale=jnp.float32(1.0))
    with pytest.raises(ValueError, match="backend must be one of"):
        attention.paged_decode_attention(*dense, backend="cuda")
    with pytest.raises(
        ValueError, match="config is a AttentionGpuConfig, but backend='pallas_tpu'"
    ):
        attention.paged_decode_attention(*dense, backend="pallas_tpu", config=GPU_SMALL)
    with pytest.raises(ValueError, match="config must be None or a AttentionGpuConfig or"):
        attention.paged_decode_attention(*dense, backend="reference", config=(16, 64))
    g = _bad("q", jnp.zeros((2, 8, 48), jnp.bfloat16))
    g["k_pages"] = g["v_pages"] = jnp.zeros((2, 5, 16, 48), jnp.bfloat16)
    with pytest.raises(ValueError, match="head_dim=48 must be a power of two"):
        attention.paged_decode_attention_gpu(
            g["q"], g["k_pages"], g["v_pages"], g["page_table"], g["lengths"]
        )


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: AttentionGpuConfig(block_tokens=48), "block_tokens must be a power of two"),
        (lambda: AttentionGpuConfig(max_splits=0), "max_splits must be an int >= 1"),
        (lambda: AttentionGpuConfig(num_warps=3), "num_warps must be a power of two"),
        (lambda: AttentionTpuConfig(block_tokens=20), "block_tokens must be a positive multiple"),
    ],
)
def test_bad_config(make, message):
    with pytest.raises(ValueError, match=message):
        make()

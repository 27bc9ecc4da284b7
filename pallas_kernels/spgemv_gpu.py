"""Block SpGEMV on GPU: the Pallas Triton kernel (semantics: pallas_kernels.spgemv).

Grid (B, Hkv, splits). A program loops over its share of the tiles of candidate blocks holding
entries below cand_count (the trip count follows the count, so work is proportional to it);
per tile it gathers the page ids of the blocks, then the packed rows of all their tokens in one
masked vector gather, as [T, D / (2 W)] words of W bytes (the cache bitcast to uint32 in the
wrapper, W = 4, or to uint16 / uint8 where head_dim is too small for Triton's dot: Triton emits
one load per gathered element, so wider words mean fewer loads), multiplies them by the G query
rows of the KV head (padded to 16 for the MMA, loaded once per program, their columns permuted
to match the nibble order inside the words), so the INT4 bytes are read once for the whole
group, and stores the tile's logits. The cand -> page-table lookups of the next tile are issued
in the current step (carried in the loop), so a tile's row gather does not wait behind two
dependent loads. Then the program writes -inf over its share of the tiles past the count.

The kernel turns a nibble into the bf16 value 128 + n with bit operations only and folds the
offset into the zero term (see _unpack_nibbles). On the GPU, 4-byte words unpack in inline PTX
(_unpack_nibbles_asm, two words a 32-bit register): the jnp unpack's four instructions a
nibble cost more issue slots than the dots (docs/kernels.md); interpret mode runs the jnp form,
which computes the same values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import _common

# Gather word width in bytes -> the unsigned dtype the packed rows are bitcast to.
_WORD_DTYPES = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
_MAX_WORD_BYTES = 4


def _word_bytes(head_dim: int) -> int:
    """Gather word width of the GPU kernel: the largest w <= 4 with head_dim // (2 * w) >= 16
    (the dots contract over that many words; Triton's dot needs >= 16). head_dim // 2 is a power
    of two >= 16 on the GPU path, so w = 1 always qualifies."""
    w = _MAX_WORD_BYTES
    while w > 1 and head_dim // (2 * w) < 16:
        w //= 2
    return w


# bf16 bit pattern 0x4300 is 128.0 and its 7 mantissa bits count in units of 1, so
# (0x4300 | n) is exactly 128 + n for a nibble n: an unpack with two integer ops and a free
# bitcast, no int->float conversion instructions (those run at a fraction of ALU rate).
_BF16_128 = 0x4300
_NIBBLE_OFFSET = 128.0


def _unpack_nibbles(words, word_bytes: int):
    """words [T, Dw] uint(8 * word_bytes) -> [(lo_k, hi_k) for k < word_bytes], [T, Dw] bf16.

    Dw = D / (2 * word_bytes). Byte k of word w is byte word_bytes * w + k of the packed row
    (little-endian), so lo_k holds elements {word_bytes * w + k} and hi_k elements
    {D/2 + word_bytes * w + k}, as 128 + nibble. Columns are not reordered here: the caller
    gathers the matching q columns instead (see _q_columns).
    """
    out = []
    for k in range(word_bytes):
        pair = []
        for shift in (8 * k, 8 * k + 4):
            x = words >> shift if shift else words
            if shift + 4 < 8 * word_bytes:  # the top nibble needs no mask
                x = x & 15
            x = x.astype(jnp.uint16) | _BF16_128
            pair.append(jax.lax.bitcast_convert_type(x, jnp.bfloat16))
        out.append(tuple(pair))
    return out


def _unpack_nibbles_asm(words):
    """_unpack_nibbles for 4-byte words (uint32 [T, Dw]) in inline PTX, two words per 32-bit
    result register: prmt gathers byte k of both words into the two 16-bit halves, one lop3
    masks the nibble and ORs in the bf16 exponent of 128 (0x4300), shr first for the high
    nibble: about 1.25 instructions a nibble where the jnp form takes about 4, and the unpack
    is the kernel's largest instruction cost. Same values as _unpack_nibbles. Native GPU only:
    the interpreter cannot run inline assembly."""
    out_type = [jax.ShapeDtypeStruct(words.shape, jnp.bfloat16)]
    mask_or = "lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA;"  # (t & mask) | 0x4300 pairs
    out = []
    for k in range(4):
        gather = f"prmt.b32 t, $1, $2, {_common.prmt_selector(k):#06x};"
        pair = []
        for shift in ("", "shr.b32 t, t, 4;"):
            asm = "{ .reg .b32 t; " + gather + " " + shift + " " + mask_or + " }"
            [x] = plt.elementwise_inline_asm(
                asm, args=[words], constraints="=r,r,r", pack=2, result_shape_dtypes=out_type
            )
            pair.append(x)
        out.append(tuple(pair))
    return out


def _q_columns(half: int, word_bytes: int):
    """q column index vectors [(lo_k, hi_k) for k < word_bytes], each [D / (2 * word_bytes)],
    matching the nibble blocks of _unpack_nibbles."""
    w = jnp.arange(half // word_bytes) * word_bytes
    return [(w + k, w + k + half) for k in range(word_bytes)]


def _gpu_kernel(
    cand_count_ref,  # [B, Hkv] int32 (whole array), or None: the count follows the length
    lengths_ref,  # [B] int32 (whole array)
    page_table_ref,  # [max_pages] int32: row b
    cand_ref,  # [C] int32: candidate blocks of (b, g)
    q_ref,  # [G, D] q dtype: the query heads of KV head g
    k_ref,  # [P * S, Dw] uint(8 W): all INT4 rows of KV head g, Dw = D / (2 W) words
    ks_ref,  # [P * S] f32
    kz_ref,  # [P * S] f32
    o_ref,  # [G, C * bs] f32: the logits row block of (b, g)
    *,
    group: int,
    group_pad: int,
    block_size: int,
    page_size: int,
    tile_blocks: int,
    num_cand: int,
    num_splits: int,
    num_pages: int,
    attn_scale: float,
    split_f32: bool,
    word_bytes: int,
    asm_unpack: bool,
):
    b, g, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bs, cb = block_size, tile_blocks
    tokens = cb * bs
    half = q_ref.shape[1] // 2
    max_pages = page_table_ref.shape[0]
    num_tiles = pl.cdiv(num_cand, cb)  # static: tiles of the C * bs output columns
    length = lengths_ref[b]
    if cand_count_ref is None:  # min(ceil(length / block_size), C), as spgemv.counts_from_lengths
        count = jnp.minimum(
            jax.lax.div(jnp.maximum(length, 0) + block_size - 1, block_size), num_cand
        )
    else:
        count = jnp.clip(cand_count_ref[b, g], 0, num_cand)

    # Tiles holding an entry below the count are split evenly over the splits (the trip
    # count follows the count, not the capacity); the remaining tiles only get -inf, split
    # the same way. Splits cover contiguous, tile-aligned ranges.
    live = jax.lax.div(count + cb - 1, cb)
    per_split = jax.lax.div(live + num_splits - 1, num_splits)
    first = s * per_split
    num_live = jnp.clip(live - first, 0, per_split)
    dead = num_tiles - live
    per_split_dead = jax.lax.div(dead + num_splits - 1, num_splits)
    first_dead = live + s * per_split_dead
    num_dead = jnp.clip(num_tiles - first_dead, 0, per_split_dead)

    # The logits tile is [Gp, T]; these place a per-head or per-token vector along its axes.
    def per_head(v):
        return v[:, None]

    def per_token(v):
        return v[None, :]

    # Triton's dot needs every dim >= 16, so the G query heads are padded to group_pad; padded
    # heads are masked on load and store. Every ref access indexes each dim with an index
    # array (not a slice): the interpreter supports masked gathers/scatters only in that form,
    # and Triton still sees unit-stride columns.
    heads = jnp.arange(group_pad)
    tok = jnp.arange(tokens)
    tile_shape = (group_pad, tokens)
    head_mask = jnp.broadcast_to(per_head(heads < group), tile_shape)

    def store(tile, logits):
        col = tile * tokens + tok
        mask = head_mask
        if num_cand % cb:  # the last tile overhangs the C * bs columns
            mask = mask & per_token(col < num_cand * bs)
        plt.store(o_ref.at[per_head(heads), per_token(col)], logits, mask=mask)

    def rows_of(tile):
        """Cache row of every token of a tile, -1 where the logit is -inf."""
        # Per-token indices (bs is a power of two: shifts and masks) rather than a [cb, bs]
        # grid reshaped to [T]: a reshape can cost Triton a layout shuffle.
        entry = tile * cb + jax.lax.div(tok, bs)
        in_count = entry < count
        blk = plt.load(cand_ref.at[jnp.minimum(entry, num_cand - 1)], mask=in_count, other=0)
        ok = in_count & (blk >= 0)
        # Invalid entries point at block 0 so every address below stays in bounds.
        pos = jnp.where(ok, blk, 0) * bs + jax.lax.rem(tok, bs)
        lpage = jnp.minimum(jax.lax.div(pos, page_size), max_pages - 1)
        phys = jnp.clip(page_table_ref[lpage], 0, num_pages - 1)
        rows = phys * page_size + jax.lax.rem(pos, page_size)
        return jnp.where(ok & (pos < length), rows, -1)

    # Loop invariants: the G query rows (one read per program) split into bf16 terms. The
    # nibble blocks of a word tile are strided columns of the row (see _unpack_nibbles), so
    # q is gathered in the same order, 2 W blocks of [Gp, Dw]: q is read once per program,
    # the cache once per tile, so permuting q is the cheap side.
    word = jnp.arange(half // word_bytes)[None, :]
    q_idx, q_mask = heads[:, None], (heads < group)[:, None]
    q_terms = []  # (bf16 term [Gp, Dw], index of its nibble block)
    for i, col in enumerate(c for pair in _q_columns(half, word_bytes) for c in pair):
        q_cols = plt.load(q_ref.at[q_idx, col[None, :]], mask=q_mask, other=0)  # [Gp, Dw]
        q_terms += [(t, i) for t in _common.bf16_terms(q_cols, split_f32)]
    # dot = q . (128 + n) summed over both halves; q_sum from the same bf16 terms so the
    # offset cancels exactly: s * (q . n) + z * sum(q) = s * dot + (z - 128 s) * sum(q).
    q_sum = _common.add_all([jnp.sum(t.astype(jnp.float32), axis=1) for t, _ in q_terms])  # [Gp]

    def logits_of(rows):
        tok_ok = rows >= 0
        safe = jnp.maximum(rows, 0)
        # One gather of the packed rows serves all G heads; masked rows are not read.
        words = plt.load(k_ref.at[safe[:, None], word], mask=tok_ok[:, None], other=0)
        k_s = plt.load(ks_ref.at[safe], mask=tok_ok, other=0.0)  # [T]
        k_z = plt.load(kz_ref.at[safe], mask=tok_ok, other=0.0)
        # 2 W blocks of [T, Dw] bf16 (128 + nibble), in the order of _q_columns' pairs.
        unpacked = _unpack_nibbles_asm(words) if asm_unpack else _unpack_nibbles(words, word_bytes)
        nibbles = [n for pair in unpacked for n in pair]
        # [Gp, K] . [T, K]^T
        dot = _common.add_all([_common.dot_nt(t, nibbles[i]) for t, i in q_terms])
        zero_term = per_token(k_z - _NIBBLE_OFFSET * k_s) * per_head(q_sum)
        logits = attn_scale * (per_token(k_s) * dot + zero_term)
        return jnp.where(per_token(tok_ok), logits, -jnp.inf)

    # The cand -> page table lookups of tile t + 1 are issued in step t, so the row gather of
    # each step does not wait behind two dependent loads. The lookup past the last live tile
    # is harmless: its entries are past the count, so nothing is read.
    def live_body(t, rows):
        nxt = rows_of(first + t + 1)
        store(first + t, logits_of(rows))
        return nxt

    jax.lax.fori_loop(0, num_live, live_body, rows_of(first))

    def dead_body(t, carry):
        store(first_dead + t, jnp.full(tile_shape, -jnp.inf, jnp.float32))
        return carry

    jax.lax.fori_loop(0, num_dead, dead_body, jnp.int32(0))


def launch(
    q,
    k_int4,
    k_scale,
    k_zero,
    page_table,
    lengths,
    cand_blocks,
    cand_count,
    *,
    block_size: int,
    attn_scale: float,
    config,
    interpret: bool,
):
    """The Triton kernel; arguments as `block_spgemv` (checked by pallas_kernels.spgemv;
    cand_count may be None), attn_scale the logit scale, config a SpGEMVGpuConfig. Result as
    `block_spgemv`.

    Grid (B, Hkv, splits); each split loops over its share of the candidate tiles, then writes
    -inf over its share of the tiles past cand_count.
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, half = k_int4.shape
    max_pages = page_table.shape[1]
    num_cand = cand_blocks.shape[2]
    group = num_q_heads // num_kv_heads
    tokens = min(config.tokens_per_chunk, max(16, pl.next_power_of_2(num_cand * block_size)))
    tokens = max(tokens, block_size)
    cb = tokens // block_size
    splits = config.num_splits(batch * num_kv_heads, pl.cdiv(num_cand, cb))
    group_pad = max(16, pl.next_power_of_2(group))
    word_bytes = _word_bytes(head_dim)
    words_per_row = half // word_bytes
    # Free in XLA: a row's D/2 bytes viewed as Dw little-endian words (byte k of word w is
    # byte W w + k), so the kernel gathers W times fewer elements.
    k_words = k_int4.reshape(num_kv_heads, num_pages * page_size, words_per_row, word_bytes)
    if word_bytes == 1:
        _common.check_triton_offsets(
            "k_int4", k_int4, "a head_dim of 64 or more lets the kernel read 2- or 4-byte words"
        )
        k_words = k_words[..., 0]
    else:
        k_words = jax.lax.bitcast_convert_type(k_words, _WORD_DTYPES[word_bytes])

    kernel = functools.partial(
        _gpu_kernel,
        group=group,
        group_pad=group_pad,
        block_size=block_size,
        page_size=page_size,
        tile_blocks=cb,
        num_cand=num_cand,
        num_splits=splits,
        num_pages=num_pages,
        attn_scale=attn_scale,
        split_f32=q.dtype == jnp.float32,
        word_bytes=word_bytes,
        # Inline PTX needs a GPU; the interpreter runs the same math as jnp.
        asm_unpack=word_bytes == 4 and not interpret,
    )

    # Without a count operand the kernel gets None for its ref and derives the count.
    count_args, count_specs = (), []
    if cand_count is not None:
        count_args = (cand_count,)
        count_specs = [pl.BlockSpec((batch, num_kv_heads), lambda b, g, s: (0, 0))]
    else:
        kernel = functools.partial(kernel, None)

    out = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, splits),
        in_specs=[
            *count_specs,
            pl.BlockSpec((batch,), lambda b, g, s: (0,)),
            pl.BlockSpec((None, max_pages), lambda b, g, s: (b, 0)),
            pl.BlockSpec((None, None, num_cand), lambda b, g, s: (b, g, 0)),
            pl.BlockSpec((None, None, group, head_dim), lambda b, g, s: (b, g, 0, 0)),
            pl.BlockSpec((None, num_pages * page_size, words_per_row), lambda b, g, s: (g, 0, 0)),
            pl.BlockSpec((None, num_pages * page_size), lambda b, g, s: (g, 0)),
            pl.BlockSpec((None, num_pages * page_size), lambda b, g, s: (g, 0)),
        ],
        out_specs=pl.BlockSpec(
            (None, None, group, num_cand * block_size), lambda b, g, s: (b, g, 0, 0)
        ),
        out_shape=jax.ShapeDtypeStruct(
            (batch, num_kv_heads, group, num_cand * block_size), jnp.float32
        ),
        compiler_params=plt.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="block_spgemv_gpu",
    )(
        *count_args,
        lengths,
        page_table,
        cand_blocks,
        q.reshape(batch, num_kv_heads, group, head_dim),
        k_words,
        k_scale.reshape(num_kv_heads, num_pages * page_size),
        k_zero.reshape(num_kv_heads, num_pages * page_size),
    )
    return out.reshape(batch, num_q_heads, num_cand * block_size)

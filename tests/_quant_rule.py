"""The documented min-max quantization rule in numpy float32, shared by the CPU and GPU tests.

numpy divides with IEEE float32 division and never rewrites it, so this is the rule exactly:
zero = min(x), scale = (max(x) - min(x)) / levels, code = clip(floor((x - zero) / scale + 1/2),
0, levels), with scale 1 standing in for 0 in the division of a constant row.
"""

import numpy as np

# Row of bfloat16 values whose second element lands on an exact half:
#   zero = -1.9609375, max = 2.53125, scale = (2.53125 + 1.9609375) / 15 = 4.4921875 / 15
#   x = -0.61328125: x - zero = 1.34765625 = 4.5 * scale, and float32 (x - zero) / scale is 4.5
#   exactly, so the nibble is floor(4.5 + 0.5) = 5 (a multiply by 1 / scale gives 4).
HALF_ROW = (-1.9609375, -0.61328125, 2.53125, 0.0)
HALF_ROW_NIBBLES = (0, 5, 15, 7)  # 1.9609375 / scale = 6.547...


def quantize_rule(x, levels: int = 15):
    """x [..., D] -> (codes uint8 [..., D], scale f32 [...], zero f32 [...])."""
    x = np.asarray(x, np.float32)
    zero = x.min(-1)
    scale = (x.max(-1) - zero) / np.float32(levels)
    safe = np.where(scale > 0, scale, np.float32(1))
    codes = np.floor((x - zero[..., None]) / safe[..., None] + np.float32(0.5))
    return np.clip(codes, 0, levels).astype(np.uint8), scale, zero


def int4_rule(x):
    """x [..., D] -> (packed uint8 [..., D/2] split halves, scale, zero) as quantize_int4."""
    codes, scale, zero = quantize_rule(x, 15)
    half = codes.shape[-1] // 2
    return codes[..., :half] | (codes[..., half:] << 4), scale, zero


def halves_rows(rng, rows: int, head_dim: int):
    """bfloat16-valued float32 rows [rows, head_dim]: random normal rows (about one nibble in
    700 lands on an exact half there) with HALF_ROW tiled into row 0."""
    import jax.numpy as jnp

    x = np.asarray(jnp.asarray(rng.standard_normal((rows, head_dim)), jnp.bfloat16), np.float32)
    x[0] = np.resize(np.asarray(HALF_ROW, np.float32), head_dim)
    return x


def page_bounds_rule(min_q, max_q, scale, new_min, new_max, fresh):
    """Quest INT8 page bounds widened by float bounds new_min, new_max [..., D]: (min codes,
    max codes int8 [..., D], scale f32 [...]). min_q, max_q, scale: the page's metadata (ignored
    where fresh [...] bool). New scale max(scale, max|new| / 127) (fresh: max|new| / 127); codes
    floor / ceil of the float bound / new scale, where the old bound is code * old scale, kept
    as the old code when the scale is unchanged; clipped to [-127, 127]."""
    f32 = np.float32
    new_min, new_max = np.asarray(new_min, f32), np.asarray(new_max, f32)
    fresh = np.asarray(fresh, bool)[..., None]
    scale = np.asarray(scale, f32)[..., None]
    top = np.maximum(np.abs(new_min).max(-1), np.abs(new_max).max(-1))[..., None] / f32(127)
    s_new = np.where(fresh, top, np.maximum(scale, top))
    safe = np.where(s_new > 0, s_new, f32(1))
    same = s_new == scale
    old_lo = np.asarray(min_q, f32)
    old_hi = np.asarray(max_q, f32)
    old_lo = np.where(same, old_lo, np.floor(old_lo * scale / safe))
    old_hi = np.where(same, old_hi, np.ceil(old_hi * scale / safe))
    lo = np.floor(new_min / safe)
    hi = np.ceil(new_max / safe)
    lo = np.where(fresh, lo, np.minimum(lo, old_lo))
    hi = np.where(fresh, hi, np.maximum(hi, old_hi))
    codes = (np.clip(c, -127, 127).astype(np.int8) for c in (lo, hi))
    return (*codes, s_new[..., 0])

"""Reading XLA's optimized HLO text in tests: which instructions materialize an array."""

from __future__ import annotations

import re

# Instructions that name an existing buffer rather than write a new one.
_NO_WRITE = ("parameter", "get-tuple-element", "bitcast", "tuple", "constant")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]\S* ([\w\-]+)\(")
_HEADER = re.compile(r"^\s*(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{\s*$")
_CALLED = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")


def materialized(hlo_text: str) -> list[tuple[str, str, tuple[int, ...], str]]:
    """(name, dtype, shape, opcode) of every instruction that writes an array, in the entry
    computation and in the computations it runs (while bodies, calls, branches), but not
    inside fusions or reducers, whose values stay in registers."""
    fused = set(_CALLED.findall(hlo_text))
    out, current = [], None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            continue
        m = _INSTR.match(line)
        if not m or current in fused:
            continue
        name, dtype, dims, opcode = m.groups()
        if opcode in _NO_WRITE:
            continue
        shape = tuple(int(d) for d in dims.split(",") if d)
        out.append((name, dtype, shape, opcode))
    return out


def weight_shaped(hlo_text: str, shapes) -> list[str]:
    """Instructions whose result has one of ``shapes`` (leading / trailing 1s ignored): where
    a program copies a weight (a slice of stacked weights, a layout change)."""

    def squeeze(s):
        return tuple(d for d in s if d != 1)

    wanted = {squeeze(s) for s in shapes}
    return [
        f"{name} = {dtype}{list(shape)} {opcode}"
        for name, dtype, shape, opcode in materialized(hlo_text)
        if squeeze(shape) in wanted
    ]

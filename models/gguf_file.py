"""A small GGUF reader: metadata and tensor views, dequantized with the ``gguf`` package.

``gguf.GGUFReader`` builds a numpy view per metadata element, which takes seconds for a 50k
token vocabulary; this parser reads the same header with ``struct`` in a fraction of that and
memory-maps the tensor data. Dequantization is ``gguf.quants.dequantize``. Little-endian
GGUF v2/v3 only (what llama.cpp writes).
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any

import numpy as np

_MAGIC = b"GGUF"
# GGUF value types: struct format of the scalar types; 8 = string, 9 = array.
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
_PLAIN = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": None}


class GGUFError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str  # GGMLQuantizationType name: "F32", "Q4_1", ...
    type_id: int
    shape: tuple[int, ...]  # numpy order (outermost first): [out, in] for a weight matrix
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str):
        vals = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def string(self) -> str:
        n = self.unpack("Q")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("I"), self.unpack("Q")
            if etype in _SCALARS and etype != 7:
                dt = np.dtype("<" + _SCALARS[etype])
                arr = np.frombuffer(self.buf, dt, count, self.pos)
                self.pos += dt.itemsize * count
                return arr.tolist()
            return [self.value(etype) for _ in range(count)]
        raise GGUFError(f"unknown GGUF value type {vtype} at byte {self.pos}")


class GGUFFile:
    """metadata: dict of Python values; tensors: name -> TensorInfo; ``array(name)`` gives the
    tensor as float32 (dequantized)."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        self._data = np.memmap(self.path, mode="r")
        cur = _Cursor(memoryview(self._data))
        try:
            if bytes(self._data[:4]) != _MAGIC:
                raise GGUFError(f"{self.path} is not a GGUF file (bad magic)")
            cur.pos = 4
            version = cur.unpack("I")
            if version not in (2, 3):
                raise GGUFError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
            n_tensors, n_kv = cur.unpack("QQ")
            self.metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = cur.string()
                self.metadata[key] = cur.value(cur.unpack("I"))
            infos = []
            for _ in range(n_tensors):
                name = cur.string()
                n_dims = cur.unpack("I")
                dims = [cur.unpack("Q") for _ in range(n_dims)]
                infos.append((name, dims, cur.unpack("I"), cur.unpack("Q")))
        except struct.error as e:
            raise GGUFError(f"{self.path} is truncated or corrupt: {e}") from e
        align = int(self.metadata.get("general.alignment", 32))
        start = -(-cur.pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, type_id, offset in infos:
            try:
                qtype = gguf.GGMLQuantizationType(type_id)
            except ValueError:
                raise GGUFError(f"GGUF tensor {name!r} has unknown type id {type_id}") from None
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            n = int(np.prod(dims)) if dims else 1
            nbytes = n // block * size
            if start + offset + nbytes > self._data.size:
                raise GGUFError(f"{self.path} is truncated: tensor {name!r} runs past the end")
            shape = tuple(reversed([int(d) for d in dims]))
            self.tensors[name] = TensorInfo(
                name, qtype.name, type_id, shape, start + offset, nbytes
            )

    def raw(self, name: str) -> np.ndarray:
        """Bytes of a tensor: [*shape[:-1], row_bytes] uint8."""
        t = self.tensors[name]
        flat = self._data[t.offset : t.offset + t.nbytes]
        return flat.reshape(*t.shape[:-1], -1)

    def array(self, name: str) -> np.ndarray:
        """A tensor as float32, shape ``TensorInfo.shape``."""
        import gguf

        t = self.tensors[name]
        raw = self.raw(name)
        if t.type_name in ("F32", "F16", "F64"):
            return raw.view(_PLAIN[t.type_name]).reshape(t.shape).astype(np.float32)
        qtype = gguf.GGMLQuantizationType(t.type_id)
        try:
            out = gguf.quants.dequantize(np.ascontiguousarray(raw), qtype)
        except NotImplementedError as e:
            raise GGUFError(
                f"GGUF tensor {name!r} has type {t.type_name}, which cannot be dequantized ({e})"
            ) from e
        return np.asarray(out, np.float32).reshape(t.shape)

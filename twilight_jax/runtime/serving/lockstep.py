"""One engine over several processes: process 0 decides, every process makes the same calls.

Under jax.distributed, with the model split over a mesh that holds every process's devices,
each jitted program of the engine (prefill, decode step, sampling, reading back the step's
attention counts) is one program over all the devices: every process must launch it, in the
same order, with the same host inputs. Process 0 runs the engine as usual (queue, page
allocator, HTTP server); before each device call it sends the call's name and host arrays to
the other processes with ``multihost_utils.broadcast_one_to_all``, JAX's own collective (gloo
between CPU processes, NCCL between GPUs). The other processes (``Engine.follow``) receive each
message and make the same call on their part of the engine's device state. No transport of ours.

A message is bytes: a little-endian uint32 length of a JSON header (the call, and the name,
dtype and shape of each array), the header, then the arrays' raw bytes. It goes out as one
broadcast of a fixed ``BLOCK`` of bytes (the first 8 bytes give the message length), plus, for a
longer message (a new page table), one more broadcast of the rest padded to a power of two, so
a decode step costs one collective and the padded sizes compile a handful of programs at most.
"""

from __future__ import annotations

import json
import struct

import jax
import numpy as np
from jax.experimental import multihost_utils

BLOCK = 4096
_LEN = struct.Struct("<Q")
_META = struct.Struct("<I")


def encode(op: str, arrays: dict[str, np.ndarray | None]) -> bytes:
    """The message for ``op`` with its arguments (numpy arrays or None)."""
    names = [k for k, v in arrays.items() if v is not None]
    values = [np.ascontiguousarray(arrays[k]) for k in names]
    meta = {
        "op": op,
        "arrays": [[k, v.dtype.str, list(v.shape)] for k, v in zip(names, values)],
        "none": [k for k, v in arrays.items() if v is None],
    }
    head = json.dumps(meta).encode()
    return b"".join([_META.pack(len(head)), head, *(v.tobytes() for v in values)])


def decode(data: bytes) -> tuple[str, dict[str, np.ndarray | None]]:
    """(op, arguments) of a message made by ``encode``."""
    (n,) = _META.unpack_from(data)
    meta = json.loads(data[_META.size : _META.size + n])
    pos = _META.size + n
    args: dict[str, np.ndarray | None] = dict.fromkeys(meta["none"])
    for name, dtype, shape in meta["arrays"]:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        args[name] = np.frombuffer(data, dt, count, pos).reshape(shape).copy()
        pos += count * dt.itemsize
    return meta["op"], args


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class Lockstep:
    """The channel of one engine across the processes of a jax.distributed job.

    ``send`` on process 0 and ``receive`` on every other process must be called the same
    number of times, in the same order (each is a collective).
    """

    def __init__(self):
        self.process = jax.process_index()
        self.processes = jax.process_count()
        self.leader = self.process == 0
        self.stopped = False  # "stop" went out: the other processes follow no more

    def send(self, op: str, arrays: dict[str, np.ndarray | None]) -> None:
        """Process 0: broadcasts one call to the other processes."""
        if not self.leader:
            raise RuntimeError(f"process {self.process} follows process 0 and cannot send")
        data = _LEN.pack(0) + encode(op, arrays)
        data = _LEN.pack(len(data)) + data[_LEN.size :]
        buf = np.frombuffer(data, np.uint8)
        block = np.zeros(BLOCK, np.uint8)
        block[: min(BLOCK, buf.size)] = buf[:BLOCK]
        multihost_utils.broadcast_one_to_all(block, is_source=True)
        self.stopped = op == "stop"
        if buf.size > BLOCK:
            rest = np.zeros(_pow2(buf.size - BLOCK), np.uint8)
            rest[: buf.size - BLOCK] = buf[BLOCK:]
            multihost_utils.broadcast_one_to_all(rest, is_source=True)

    def receive(self) -> tuple[str, dict[str, np.ndarray | None]]:
        """Every other process: waits for process 0's next call."""
        if self.leader:
            raise RuntimeError("process 0 sends; it does not receive")
        block = multihost_utils.broadcast_one_to_all(np.zeros(BLOCK, np.uint8), is_source=False)
        (size,) = _LEN.unpack_from(block.tobytes())
        data = block.tobytes()[: min(size, BLOCK)]
        if size > BLOCK:
            rest = multihost_utils.broadcast_one_to_all(
                np.zeros(_pow2(size - BLOCK), np.uint8), is_source=False
            )
            data += rest.tobytes()[: size - BLOCK]
        return decode(data[_LEN.size :])

    def agree_min(self, value: int) -> int:
        """The smallest of every process's value (each process calls it once)."""
        values = multihost_utils.process_allgather(np.asarray(value, np.int64))
        return int(np.min(values))

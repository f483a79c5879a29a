"""Binary frames: a small JSON header followed by raw bytes (tensors or file chunks).

Tensors never travel as JSON lists: a 224x224x3 float image is 600 kB raw and
several MB as JSON text. A frame is:

    b"EWF1" | uint32 big-endian header length | header (UTF-8 JSON) | body

The header lists each tensor's name, dtype, shape and byte range in the body.
Decoding checks every length against the payload before touching the bytes, so a
hostile or truncated frame is a ProtocolError, never a crash or a huge allocation.
"""

from __future__ import annotations

import json
import struct

from .errors import ProtocolError
from .schema import load_json
from .tensors import ITEMSIZE, dtype_name, from_frame, from_numpy, to_numpy

MAGIC = b"EWF1"
MAX_HEADER_BYTES = 64 * 1024
# dtypes that may cross the wire; anything else (object, void, ...) is refused
WIRE_DTYPES = set(ITEMSIZE)


def pack(header: dict, body: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack(">I", len(head)) + head + body


def unpack(payload: bytes, max_bytes: int | None = None) -> tuple[dict, memoryview]:
    if max_bytes is not None and len(payload) > max_bytes:
        raise ProtocolError(f"message of {len(payload)} bytes is over the {max_bytes}-byte limit",
                            "send smaller requests or raise mqtt.max_payload_kb on the device")
    if len(payload) < 8 or payload[:4] != MAGIC:
        raise ProtocolError("not an edgeward binary frame (missing EWF1 magic)")
    (head_len,) = struct.unpack(">I", payload[4:8])
    if head_len > MAX_HEADER_BYTES or 8 + head_len > len(payload):
        raise ProtocolError(f"frame header length {head_len} does not fit a {len(payload)}-byte payload")
    try:
        header = load_json(bytes(payload[8:8 + head_len]))
    except ValueError as exc:
        raise ProtocolError(f"frame header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("frame header must be a JSON object")
    return header, memoryview(payload)[8 + head_len:]


def frame_parts(tensors: dict, **header) -> list:
    """Frame named numpy arrays as [head bytes, each array's buffer]: C-contiguous little-endian
    arrays are not copied, so a scatter-gather send (agent.localapi.send_message) moves large
    tensors as they are."""
    import numpy as np

    specs, buffers, offset = [], [], 0
    for name, arr in tensors.items():
        dtype = dtype_name(arr.dtype) if isinstance(arr, np.ndarray) else None
        if dtype in ITEMSIZE and arr.flags.c_contiguous and arr.dtype.byteorder != ">":
            buf, shape = memoryview(arr).cast("B"), arr.shape
        else:  # a contiguous little-endian copy, or a clear error
            t = from_numpy(name, arr)
            buf, dtype, shape = t.data, t.dtype, t.shape
        specs.append({"name": name, "dtype": dtype, "shape": list(shape), "offset": offset, "nbytes": len(buf)})
        buffers.append(buf)
        offset += len(buf)
    head = json.dumps({**header, "tensors": specs}, separators=(",", ":")).encode()
    return [MAGIC + struct.pack(">I", len(head)) + head, *buffers]


def pack_tensors(tensors: dict, **header) -> bytes:
    """Frame named numpy arrays (sent C-contiguous, little-endian) with any extra header fields."""
    return b"".join(frame_parts(tensors, **header))


def unpack_tensors(payload: bytes, max_bytes: int | None = None) -> tuple[dict, dict]:
    """Inverse of pack_tensors (numpy arrays); every spec is checked against the body before use."""
    header, body = unpack(payload, max_bytes)
    return header, {t.name: to_numpy(t) for t in from_frame(header, body)}

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

import numpy as np

from .errors import ProtocolError

MAGIC = b"EWF1"
MAX_HEADER_BYTES = 64 * 1024
# dtypes that may cross the wire; anything else (object, void, ...) is refused
WIRE_DTYPES = {"float32", "float16", "float64", "int8", "uint8", "int16", "uint16", "int32",
               "int64", "bool"}


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
        header = json.loads(bytes(payload[8:8 + head_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"frame header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ProtocolError("frame header must be a JSON object")
    return header, memoryview(payload)[8 + head_len:]


def pack_tensors(tensors: dict[str, np.ndarray], **header) -> bytes:
    """Frame named arrays (C-contiguous, little-endian) with any extra header fields."""
    specs, chunks, offset = [], [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        if arr.dtype.name not in WIRE_DTYPES:
            raise ProtocolError(f"tensor {name!r}: dtype {arr.dtype} cannot be sent",
                                f"use one of {', '.join(sorted(WIRE_DTYPES))}")
        raw = arr.tobytes()
        specs.append({"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape),
                      "offset": offset, "nbytes": len(raw)})
        chunks.append(raw)
        offset += len(raw)
    return pack({**header, "tensors": specs}, b"".join(chunks))


def unpack_tensors(payload: bytes, max_bytes: int | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Inverse of pack_tensors; every spec is checked against the body before use."""
    header, body = unpack(payload, max_bytes)
    specs = header.get("tensors", [])
    if not isinstance(specs, list):
        raise ProtocolError("frame 'tensors' must be a list")
    out: dict[str, np.ndarray] = {}
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise ProtocolError(f"tensors[{i}] must be an object")
        name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
        offset, nbytes = spec.get("offset"), spec.get("nbytes")
        if not isinstance(name, str) or dtype not in WIRE_DTYPES:
            raise ProtocolError(f"tensors[{i}]: needs a name and a dtype in {sorted(WIRE_DTYPES)}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool)
                                                and 0 <= d < 2**31 for d in shape)):
            raise ProtocolError(f"tensors[{i}] {name!r}: shape must be a list of non-negative integers")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, nbytes)):
            raise ProtocolError(f"tensors[{i}] {name!r}: offset and nbytes must be non-negative integers")
        itemsize = np.dtype(dtype).itemsize
        count = 1
        for d in shape:
            count *= d
        if count * itemsize != nbytes or offset + nbytes > len(body):
            raise ProtocolError(f"tensor {name!r}: shape {shape} x {dtype} is {count * itemsize} bytes, "
                                f"the frame holds {nbytes} at offset {offset} of {len(body)}")
        out[name] = np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(shape)
    header["tensors"] = specs
    return header, out

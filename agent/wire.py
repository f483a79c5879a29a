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
from .tensors import ITEMSIZE, Tensor, dtype_name, from_frame, from_numpy, to_numpy

MAGIC = b"EWF1"
MAX_HEADER_BYTES = 64 * 1024
# dtypes that may cross the wire; anything else (object, void, ...) is refused
WIRE_DTYPES = set(ITEMSIZE)


def pack(header: dict, body: bytes = b"") -> bytes:
    return head_bytes(header) + body


def head_bytes(header: dict) -> bytes:
    """A frame's bytes up to its body: magic, header length, header."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack(">I", len(head)) + head


def unpack(payload: bytes, max_bytes: int | None = None) -> tuple[dict, memoryview]:
    if max_bytes is not None and len(payload) > max_bytes:
        raise ProtocolError(f"message of {len(payload)} bytes is over the {max_bytes}-byte limit",
                            "send smaller requests or raise mqtt.max_payload_kb on the device")
    head_len = _header_length(payload)
    try:
        header = load_json(bytes(payload[8:8 + head_len]))
    except ValueError as exc:
        raise ProtocolError(f"frame header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("frame header must be a JSON object")
    return header, memoryview(payload)[8 + head_len:]


def _header_length(payload) -> int:
    """The header's length, once the magic and the length itself are checked against the payload."""
    if len(payload) < 8 or payload[:4] != MAGIC:
        raise ProtocolError("not an edgeward binary frame (missing EWF1 magic)")
    (head_len,) = struct.unpack(">I", payload[4:8])
    if head_len > MAX_HEADER_BYTES or 8 + head_len > len(payload):
        raise ProtocolError(f"frame header length {head_len} does not fit a {len(payload)}-byte payload")
    return head_len


def remember(cache: dict, key, value, entries: int = 64):
    """Keep `value` under `key`, emptying `cache` first when it holds `entries` already: a bound
    that costs nothing per hit, for caches whose keys repeat (one shape, one header)."""
    if len(cache) >= entries:
        cache.clear()
    cache[key] = value
    return value


class HeaderCache:
    """Frame headers parsed once per distinct header: a connection's requests of one shape (and
    the answers to them) carry byte-identical headers, and parsing one cost as much as a tiny
    model's run. Keyed by the exact bytes, so a sender can only thrash the cache, never poison
    it; bounded in entries and key size. The headers it returns are shared: read them only."""

    def __init__(self, entries: int = 64, max_key: int = 2048):
        self.entries, self.max_key = entries, max_key
        self._parsed: dict[bytes, dict] = {}

    def unpack(self, payload) -> tuple[dict, memoryview, bytes]:
        """As unpack(), plus the header's bytes (the key for what callers derive from it)."""
        head_len = _header_length(payload)
        raw = bytes(payload[8:8 + head_len])
        header = self._parsed.get(raw)
        if header is None:
            header, _ = unpack(payload)
            if head_len <= self.max_key:
                remember(self._parsed, raw, header, self.entries)
        return header, memoryview(payload)[8 + head_len:], raw


class TensorFrames(HeaderCache):
    """A HeaderCache that also keeps where each header's tensors lie, checked once (from_frame's
    checks, and the caller's own `check`): the next frame with that header only has its body
    sliced; a body too short for the header goes through the checks again, which refuse it."""

    def __init__(self, entries: int = 64, max_key: int = 2048):
        super().__init__(entries, max_key)
        self._layouts: dict[bytes, tuple[int, list]] = {}

    def tensors(self, header: dict, body: memoryview, key: bytes, check=None) -> list:
        """The frame's tensors, as from_frame(header, body) gives them, or as `check` (a function
        of those tensors that depends on the header alone: names, dtypes, shapes) returns them.
        `check` may reorder them and rename a lone tensor, not make new bytes."""
        layout = self._layouts.get(key)
        if layout is not None and len(body) >= layout[0]:
            return [Tensor(name, dtype, shape, body[o:o + n]) for name, dtype, shape, o, n in layout[1]]
        found = from_frame(header, body)
        out = check(found) if check else found
        if len(key) <= self.max_key:
            specs = header["tensors"] if found else []
            if out is found:
                pairs = list(zip(found, specs))
            else:  # checked: by name, or the lone tensor under the model's input name
                where = {t.name: spec for t, spec in zip(found, specs)}
                pairs = [(t, specs[0] if len(found) == 1 else where[t.name]) for t in out]
            entries = [(t.name, t.dtype, t.shape, spec["offset"], spec["nbytes"]) for t, spec in pairs]
            remember(self._layouts, key, (max((o + n for *_, o, n in entries), default=0), entries), self.entries)
        return out


def frame_parts(tensors: dict, heads: dict | None = None, **header) -> list:
    """Frame named numpy arrays as [head bytes, each array's buffer]: C-contiguous little-endian
    arrays are not copied, so a scatter-gather send (agent.localapi.send_message) moves large
    tensors as they are. `heads`, a dict the caller keeps, holds the head bytes made for each
    header and set of shapes, so a caller sending one shape again and again encodes it once."""
    import numpy as np

    if heads is not None:
        try:
            key = (tuple(header.items()), tuple((name, arr.dtype.str, arr.shape) for name, arr in tensors.items()
                                                if arr.flags.c_contiguous))
        except (AttributeError, TypeError):  # not arrays, or unhashable header values: made afresh
            key = None
        head = heads.get(key) if key is not None and len(key[1]) == len(tensors) else None
        if head is not None:
            return [head, *(memoryview(arr).cast("B") for arr in tensors.values())]
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
    head = head_bytes({**header, "tensors": specs})
    if heads is not None and key is not None and len(key[1]) == len(tensors) and all(
            isinstance(b, memoryview) for b in buffers):  # only arrays sent as they are: their bytes are the body
        remember(heads, key, head)
    return [head, *buffers]


def pack_tensors(tensors: dict, **header) -> bytes:
    """Frame named numpy arrays (sent C-contiguous, little-endian) with any extra header fields."""
    return b"".join(frame_parts(tensors, **header))


def unpack_tensors(payload: bytes, max_bytes: int | None = None) -> tuple[dict, dict]:
    """Inverse of pack_tensors (numpy arrays); every spec is checked against the body before use."""
    header, body = unpack(payload, max_bytes)
    return header, {t.name: to_numpy(t) for t in from_frame(header, body)}

"""Tensors as the agent's main process handles them: name, dtype, shape and raw bytes — no numpy.

The daemon only routes tensors: it checks them against a model's input specs, joins
requests into a batch and splits the outputs back, all of which is metadata and byte
slicing along the first axis of C-contiguous data. Keeping numpy out of the main process
saves ~13 MB of idle RSS on the board; the model worker (agent/worker.py) is where
numbers are looked at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, NamedTuple

from .errors import InferenceError, ProtocolError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

ITEMSIZE = {"float32": 4, "float16": 2, "float64": 8, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2,
            "int32": 4, "int64": 8, "bool": 1}


class InputSpec(NamedTuple):
    """What `check_inputs` needs to know of a model input (agent.bundle.TensorSpec also has it).
    The model worker uses this one: importing agent.bundle would cost it 5 MB (hashlib's
    OpenSSL, tarfile, lzma) that it has no use for."""
    name: str
    dtype: str
    shape: list


@dataclass
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    def spec(self, offset: int) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "offset": offset,
                "nbytes": len(self.data)}


# ---------------------------------------------------------------- frames <-> tensors

def from_frame(header: dict, body: memoryview) -> list[Tensor]:
    """The tensors a frame header describes, each checked against the body before use."""
    specs = header.get("tensors", [])
    if not isinstance(specs, list):
        raise ProtocolError("frame 'tensors' must be a list")
    out = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise ProtocolError(f"tensors[{i}] must be an object")
        name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
        offset, nbytes = spec.get("offset"), spec.get("nbytes")
        if not isinstance(name, str) or dtype not in ITEMSIZE:
            raise ProtocolError(f"tensors[{i}]: needs a name and a dtype in {sorted(ITEMSIZE)}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool)
                                                and 0 <= d < 2**31 for d in shape)):
            raise ProtocolError(f"tensors[{i}] {name!r}: shape must be a list of non-negative integers")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, nbytes)):
            raise ProtocolError(f"tensors[{i}] {name!r}: offset and nbytes must be non-negative integers")
        t = Tensor(name, dtype, tuple(shape), body[offset:offset + nbytes])
        if t.nbytes != nbytes or offset + nbytes > len(body):
            raise ProtocolError(f"tensor {name!r}: shape {shape} x {dtype} is {t.nbytes} bytes, "
                                f"the frame holds {nbytes} at offset {offset} of {len(body)}")
        out.append(t)
    return out


def to_frame(tensors: Iterable[Tensor]) -> tuple[list[dict], bytes]:
    """Specs for a frame header and the body they describe."""
    specs, parts, offset = [], [], 0
    for t in tensors:
        specs.append(t.spec(offset))
        parts.append(t.data)
        offset += len(t.data)
    return specs, b"".join(parts)


# ---------------------------------------------------------------- checks against a model

def check_inputs(model: str, specs: list, tensors: list[Tensor], max_rows: int | None = None) -> list[Tensor]:
    """Match request tensors to the model's inputs (by name; a one-input model takes any name)
    and check dtype and shape; returns them in the model's input order. With `max_rows`
    (a batching model) the first axis may hold 1..max_rows rows whatever the model's own size."""
    by_name = {t.name: t for t in tensors}
    if len(specs) == 1 and len(tensors) == 1:
        only = tensors[0]
        by_name = {specs[0].name: Tensor(specs[0].name, only.dtype, only.shape, only.data)}
    names = [s.name for s in specs]
    if set(by_name) != set(names) or len(by_name) != len(tensors):
        raise InferenceError(f"model {model!r} takes inputs {sorted(names)}, got {sorted(t.name for t in tensors)}")
    out = []
    for spec in specs:
        t = by_name[spec.name]
        if t.dtype != spec.dtype:
            raise InferenceError(f"input {spec.name!r}: dtype {t.dtype}, the model takes {spec.dtype}",
                                 f"send {spec.dtype} data")
        shape = list(spec.shape)
        if max_rows is not None and shape:
            shape[0] = -1
        if len(t.shape) != len(shape) or any(s not in (-1, a) for s, a in zip(shape, t.shape)):
            want = "x".join("N" if s == -1 else str(s) for s in shape)
            raise InferenceError(f"input {spec.name!r}: shape {list(t.shape)}, the model takes {want}")
        if max_rows is not None and not 1 <= t.rows <= max_rows:
            raise InferenceError(f"input {spec.name!r}: {t.rows} rows, this model takes 1 to {max_rows} per request")
        out.append(t)
    rows = {t.rows for t in out}
    if len(rows) > 1:
        raise InferenceError(f"model {model!r}: inputs disagree on the batch size ({sorted(rows)})")
    return out


# ---------------------------------------------------------------- batching along the first axis

def zeros(name: str, dtype: str, shape: list[int]) -> Tensor:
    """A zero tensor of a spec's shape (dynamic axes taken as 1): the initial recurrent state."""
    dims = tuple(1 if d < 0 else d for d in shape)
    t = Tensor(name, dtype, dims, b"")
    t.data = bytes(t.nbytes)
    return t


def concat(parts: list[Tensor]) -> Tensor:
    first = parts[0]
    rows = sum(t.rows for t in parts)
    return Tensor(first.name, first.dtype, (rows, *first.shape[1:]), b"".join(t.data for t in parts))


def pad_rows(t: Tensor, rows: int) -> Tensor:
    """Zero rows appended up to `rows` (for models whose batch size is fixed)."""
    extra = rows - t.rows
    if extra <= 0:
        return t
    row_bytes = len(t.data) // t.rows if t.rows else 0
    return Tensor(t.name, t.dtype, (rows, *t.shape[1:]), bytes(t.data) + bytes(extra * row_bytes))


def split(t: Tensor, counts: list[int]) -> list[Tensor]:
    """Inverse of concat: consecutive row ranges of `t`, one per count (padding rows dropped)."""
    row_bytes = len(t.data) // t.rows if t.rows else 0
    out, start = [], 0
    data = memoryview(t.data) if not isinstance(t.data, memoryview) else t.data
    for n in counts:
        out.append(Tensor(t.name, t.dtype, (n, *t.shape[1:]), data[start * row_bytes:(start + n) * row_bytes]))
        start += n
    return out


# ---------------------------------------------------------------- JSON lists, for MQTT pipelines

_ARRAY_CODES = {"float32": "f", "float64": "d", "int8": "b", "uint8": "B", "int16": "h", "uint16": "H",
                "int32": "i", "int64": "q", "bool": "B"}


def from_json(name: str, value, dtype: str) -> Tensor:
    """A tensor from a nested JSON list (rectangular), packed as `dtype` without numpy."""
    import array

    shape, level = [], value
    while isinstance(level, list):
        shape.append(len(level))
        level = level[0] if level else None
    flat: list = []

    def walk(v, depth: int) -> None:
        if depth == len(shape):
            if isinstance(v, list) or isinstance(v, str) or v is None:
                raise InferenceError(f"input {name!r}: not a rectangular list of numbers")
            flat.append(v)
            return
        if not isinstance(v, list) or len(v) != shape[depth]:
            raise InferenceError(f"input {name!r}: not a rectangular list of numbers")
        for item in v:
            walk(item, depth + 1)

    walk(value, 0)
    code = _ARRAY_CODES.get(dtype)
    if code is None:
        raise InferenceError(f"input {name!r}: {dtype} inputs cannot come as JSON", "send a binary frame")
    try:
        data = array.array(code, [float(x) if code in "fd" else int(x) for x in flat]).tobytes()
    except (OverflowError, TypeError, ValueError) as exc:
        raise InferenceError(f"input {name!r}: values do not fit {dtype} ({exc})") from exc
    return Tensor(name, dtype, tuple(shape), data)


def to_json(t: Tensor):
    """The nested list of a tensor's values (for JSON answers)."""
    import array

    code = _ARRAY_CODES.get(t.dtype)
    if code is None:
        raise InferenceError(f"output {t.name!r}: {t.dtype} cannot be sent as JSON", "use binary frames")
    flat = array.array(code)
    flat.frombytes(bytes(t.data))
    values = flat.tolist()
    for dim in reversed(t.shape[1:]):
        values = [values[i:i + dim] for i in range(0, len(values), dim)]
    return values if t.shape else values[0]


def encoded_image(tensors: list[Tensor]) -> bytes:
    """The file bytes of an image request (MQTT or the local API): one 1-D uint8 tensor."""
    if len(tensors) != 1 or tensors[0].dtype != "uint8" or len(tensors[0].shape) != 1:
        from .errors import ProtocolError

        raise ProtocolError("an image request carries one 1-D uint8 tensor: the file's bytes",
                            "send the JPEG or PNG file as it is, as a uint8 tensor of its length")
    return bytes(tensors[0].data)


def labels(outputs: list[Tensor], classes: list, detections: list[str]) -> dict:
    """What an answer to one image says in words (protocol.ANSWER_LABELS): a detector's
    "detections" (`detections` names its boxes, classes, scores and count outputs), else a
    classifier's "top1" and "class"."""
    return detected(outputs, detections, classes) or top1(outputs, classes)


def detected(outputs: list[Tensor], detections: list[str], classes: list) -> dict:
    """A detector's answer to one image as {"detections": [{"box", "class_id", "class"?, "score"}]},
    best first: the first `count` rows of its outputs ({} for other models or other batches)."""
    by_name = {t.name: t for t in outputs}
    if len(detections) != 4 or any(n not in by_name for n in detections) or by_name[detections[3]].rows != 1:
        return {}
    try:
        boxes, ids, scores, count = (to_json(by_name[n])[0] for n in detections)
    except (InferenceError, TypeError, IndexError):  # a dtype JSON cannot carry, or not a detector's shapes
        return {}
    return {"detections": detection_list(boxes, ids, scores, count, classes)}


def detection_list(boxes: list, ids: list, scores: list, count, classes: list) -> list[dict]:
    """One image's detections from its rows of a detector's four outputs (nested lists): box as
    [ymin, xmin, ymax, xmax] in the image's 0..1 coordinates, class by index and, where the
    bundle names its classes, by name."""
    n = float(count if isinstance(count, (int, float)) else (count[0] if count else 0))
    n = int(min(max(n, 0.0), len(scores))) if math.isfinite(n) else 0  # NaN or inf from a model: none
    found = []
    finite = lambda v: float(v) if math.isfinite(v) else 0.0  # noqa: E731  (a model's garbage stays valid JSON)
    for box, cls, score in zip(boxes[:n], ids[:n], scores[:n]):
        i = int(cls) if math.isfinite(cls) else -1
        found.append({"box": [round(finite(v), 5) for v in box], "class_id": i,
                      **({"class": classes[i]} if 0 <= i < len(classes) and classes[i] else {}),
                      "score": round(finite(score), 5)})
    return found


def top1(outputs: list[Tensor], classes: list) -> dict:
    """For a classifier's answer to one image: the index of its first output's largest value
    ("top1") and, where the bundle names its classes, the class ("class"), as batch jobs give."""
    first = outputs[0] if outputs else None
    if first is None or len(first.shape) != 2 or first.shape[0] != 1 or first.shape[1] < 2:
        return {}
    try:
        row = to_json(first)[0]
    except InferenceError:  # a dtype JSON cannot carry: no class to name
        return {}
    i = max(range(len(row)), key=row.__getitem__)
    return {"top1": i, **({"class": classes[i]} if i < len(classes) and classes[i] else {})}


# ---------------------------------------------------------------- numpy, for callers that have it

_DTYPE_NAMES: dict = {}


def dtype_name(dtype) -> str:
    """numpy's name for a dtype, remembered: `dtype.name` costs microseconds per call, and
    every request asks it of each tensor both ways."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        _DTYPE_NAMES[dtype] = dtype.name
        return _DTYPE_NAMES[dtype]


def from_numpy(name: str, arr: "np.ndarray") -> Tensor:
    import numpy as np

    arr = np.ascontiguousarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    dtype = dtype_name(arr.dtype)
    if dtype not in ITEMSIZE:
        raise ProtocolError(f"tensor {name!r}: dtype {arr.dtype} cannot be sent",
                            f"use one of {', '.join(sorted(ITEMSIZE))}")
    return Tensor(name, dtype, tuple(arr.shape), arr.tobytes())


def to_numpy(t: Tensor) -> "np.ndarray":
    import numpy as np

    return np.frombuffer(t.data, dtype=t.dtype).reshape(t.shape)

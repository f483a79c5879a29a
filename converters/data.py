"""Calibration and evaluation data: .npz files or image folders, checked against the model before any work starts.

An .npz holds one array per model input (named like the input; a single-input
model takes any one array), plus optionally `labels` (class ids) for accuracy.
A folder of images feeds a single-input image model through an explicit
preprocessing spec (agent/images.py); sub-folders name the classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from agent.bundle import TensorSpec
from agent.errors import ConversionError

LABEL_KEYS = ("labels", "y")
MIN_CALIBRATION_SAMPLES = 16


@dataclass
class Dataset:
    inputs: dict[str, np.ndarray]
    labels: Optional[np.ndarray]
    source: str
    image: Optional[dict] = None    # the preprocessing spec, when the data came from image files
    classes: Optional[list] = None  # class names by label id (an image folder's sub-folders)

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, idx) -> dict[str, np.ndarray]:
        return {k: v[idx] for k, v in self.inputs.items()}


MAX_IMAGES = {"calibration": 512, "evaluation": 1000}  # read from an image folder unless --max-images says


def load_dataset(path: str | Path, specs: list[TensorSpec], what: str, min_samples: int = 1,
                 preprocess: str | None = None, progress=None, max_images: int | None = None) -> Dataset:
    path = Path(path)
    if path.is_dir():
        return _load_images(path, specs, what, min_samples, preprocess, progress,
                            max_images or MAX_IMAGES.get(what))
    try:
        npz = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise ConversionError(f"{what} data {path}: no such file") from exc
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{what} data {path} is not a .npz/.npy file ({exc})",
                              "save it with numpy.savez(path, input=array, labels=ids)") from exc
    arrays = dict(npz) if isinstance(npz, np.lib.npyio.NpzFile) else {"input": npz}
    labels = next((arrays.pop(k) for k in LABEL_KEYS if k in arrays), None)
    names = [s.name for s in specs]
    if len(specs) == 1 and len(arrays) == 1:
        arrays = {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ConversionError(f"{what} data {path.name} lacks input(s) {missing}; it has {sorted(arrays)}",
                              f"save one array per model input, named {names}")
    inputs = {}
    counts = set()
    for spec in specs:
        arr = arrays[spec.name]
        if arr.dtype.name != spec.dtype:
            raise ConversionError(f"{what} data {spec.name!r} is {arr.dtype.name}, the model takes {spec.dtype}",
                                  f"convert it with array.astype(np.{spec.dtype})")
        want = spec.shape
        if arr.ndim != len(want) or any(w not in (-1, a) for w, a in zip(want[1:], arr.shape[1:])):
            shown = "x".join("N" if d == -1 else str(d) for d in want)
            raise ConversionError(f"{what} data {spec.name!r} has shape {list(arr.shape)}, the model takes {shown} "
                                  "(first axis: samples)", "reshape the data to the model's input shape")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ConversionError(f"{what} data {spec.name!r} holds NaN or infinity")
        counts.add(arr.shape[0])
        inputs[spec.name] = np.ascontiguousarray(arr)
    if len(counts) != 1:
        raise ConversionError(f"{what} data inputs have different sample counts {sorted(counts)}")
    n = counts.pop()
    if n < min_samples:
        raise ConversionError(f"{what} data has {n} samples, at least {min_samples} are needed",
                              "give a few hundred representative samples for a reliable calibration")
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != n or labels.dtype.kind not in "iu":
            raise ConversionError(f"{what} data labels must be {n} integer class ids, got {labels.dtype} x {len(labels)}")
    return Dataset(inputs, labels, str(path))


def _load_images(folder: Path, specs: list[TensorSpec], what: str, min_samples: int, preprocess: str | None,
                 progress=None, limit: int | None = None) -> Dataset:
    from agent import images

    if len(specs) != 1:
        raise ConversionError(f"{what} data {folder} is a folder of images, but the model takes {len(specs)} inputs",
                              "save one array per input in a .npz instead")
    spec = images.parse(preprocess or "", specs[0].shape, specs[0].dtype)
    tick = (lambda done, total: progress(f"reading {what} images", done, total)) if progress else None
    samples, labels, classes = images.load_folder(folder, spec, tick, limit)
    if len(samples) < min_samples:
        raise ConversionError(f"{what} data has {len(samples)} images, at least {min_samples} are needed",
                              "give a few hundred representative images for a reliable calibration")
    found = len(images.files_in(folder))
    source = f"{folder} ({len(samples)} of {found} images)" if found > len(samples) else str(folder)
    return Dataset({specs[0].name: samples}, labels, source, image=spec.to_dict(), classes=classes or None)


MAX_LABELS = 100_000
UNKNOWN_LABEL = "???"


class Labels(NamedTuple):
    """Class names by output index, and where they came from (for reports and errors)."""
    names: list[str]
    source: str


def read_labels(path: str | Path) -> Labels:
    """The label file given with --labels."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConversionError(f"cannot read the label file {path}: {getattr(exc, 'strerror', None) or exc}",
                              "give a UTF-8 text file with one class name per line") from None
    return Labels(parse_labels(text, f"the label file {path}"), f"the label file {path}")


def parse_labels(text: str, where: str) -> list[str]:
    """Class names by output index: one name per line, or lines of "INDEX NAME" (as Coral's and
    MediaPipe's label maps are written), where indices not listed stay unnamed. "???" names no
    class; a first line of "???" (the background placeholder in the label maps that ship with
    TensorFlow's SSD examples, whose class outputs count from the first real class) is dropped,
    as TensorFlow's own example code drops it."""
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not any(lines):
        raise ConversionError(f"{where} names no classes", "write one class name per line")
    indexed = [line.split(None, 1) for line in lines if line]
    if all(len(p) == 2 and p[0].rstrip(":").isdigit() for p in indexed):  # "0 person" / "0: person"
        by_index = {int(p[0].rstrip(":")): p[1].strip() for p in indexed}
        if len(by_index) != len(indexed):
            raise ConversionError(f"{where} gives one index twice", "give each class index once")
        if max(by_index) >= MAX_LABELS:
            raise ConversionError(f"{where} names class {max(by_index)}, over {MAX_LABELS - 1}")
        names = [""] * (max(by_index) + 1)
        for i, name in by_index.items():
            names[i] = name
    else:
        names = lines[1:] if lines[0] == UNKNOWN_LABEL else lines
        if len(names) > MAX_LABELS:
            raise ConversionError(f"{where} names {len(names)} classes, over {MAX_LABELS}")
    return ["" if n == UNKNOWN_LABEL else n for n in names]


def check_labels(labels: Labels, outputs: dict[str, np.ndarray], detections: list[str]) -> None:
    """Refuse a label map that cannot be this model's: a classifier's (first output [N, C]) must
    name C classes, a detector's must name every class its detections use."""
    names, where = labels
    if detections:
        from agent.detections import per_image

        used = max((cls for image in per_image(outputs, detections) for _, cls, _ in image), default=0)
        if used >= len(names):
            raise ConversionError(f"{where} names {len(names)} classes, and the detector finds class {used} in "
                                  "the evaluation data", "give the label map the model was trained with (--labels)")
        return
    first = next(iter(outputs.values()))
    if first.ndim == 2 and first.shape[1] > 1 and first.shape[1] != len(names):
        raise ConversionError(f"{where} names {len(names)} classes, and the model scores {first.shape[1]}",
                              "give the label map the model was trained with (--labels)")


def preprocessing_of(*datasets: Dataset) -> dict:
    """What the bundle's manifest says of how its inputs were prepared: the image spec and
    class names of whichever data came from image files ({} for .npz data)."""
    out: dict = {}
    for d in datasets:
        if d.image and "image" not in out:
            out["image"] = d.image
        if d.classes and "classes" not in out:
            out["classes"] = d.classes
    return out

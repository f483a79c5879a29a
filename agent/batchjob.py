"""Offline batch jobs: run a model on the board over files, through the running agent.

`edgeward infer --model NAME --input DIR --batch 32 --output results.jsonl` reads every
.npy / .npz file under DIR (or one file), cuts the samples into batches, sends them to the
agent's local API and writes one JSON line per sample: where it came from, the outputs
and, for classifiers, the top-1 class; for detectors, the list of detections, their boxes on
the photo as it is (a letterbox's bars or a crop's edges undone). Progress goes to stderr.
The results file appears only when the job has finished (written beside it, then renamed):
a failed job leaves nothing half-written.

Files: a .npy holds one input's samples along the first axis (a single sample without
that axis is accepted); a .npz holds one array per input name, with the same number of
samples each. Image files (.jpg, .png, ...) feed a one-input image model, prepared as its
bundle says (the converter's --preprocess, agent/images.py) or as --preprocess says here;
where the bundle names its classes, each result gives the class name too. For a stateful
model each file is one stream, its samples in order, so results do not depend on --batch.
A model written for a fixed batch size gets exactly that many samples a request, whatever
--batch says (a short last batch padded, the padding's answers not written).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from .client import LocalClient
from .errors import EdgewardError
from .images import is_image
from .tensors import detection_list


NUMPY_SUFFIXES = (".npy", ".npz")


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and (p.suffix in NUMPY_SUFFIXES or is_image(p)))
        if not files:
            raise EdgewardError(f"{path} holds no .npy, .npz or image files",
                                "save inputs with numpy.save / numpy.savez, or point at a folder of images")
        if len({is_image(p) for p in files}) > 1:
            raise EdgewardError(f"{path} holds both arrays and images", "run one job on each kind")
        return files
    if not path.is_file():
        raise EdgewardError(f"{path} does not exist")
    return [path]


def _image_spec(info: dict, preprocess: str | None):
    """How this model's images become its input: --preprocess if given, else what its bundle says."""
    from . import images

    return images.spec_for(f"{info['name']} v{info['version']}", info["inputs"], info.get("preprocessing"),
                           preprocess)


def _image_batches(files: list[Path], name: str, spec, batch: int, box_maps: dict | None = None):
    """Batches of prepared images; with `box_maps`, each photo's images.photo_box by its path
    (a detector's boxes are given on the photo, as the agent gives them for one image)."""
    from . import images

    for lo in range(0, len(files), batch):
        chunk = files[lo:lo + batch]
        photos = [images.load_photo(p, spec) for p in chunk]
        if box_maps is not None:
            box_maps.update((str(p), images.photo_box(size, spec)) for p, (_, size) in zip(chunk, photos))
        yield [(str(p), 0) for p in chunk], {name: np.stack([x for x, _ in photos])}


def _on_photos(outputs: dict, detections: list[str], sources: list, box_maps: dict) -> np.ndarray:
    """A batch's boxes on the photos they were found in (detections.in_photo), not on the
    letterboxed or cropped inputs."""
    from .detections import in_photo

    boxes = np.array(outputs[detections[0]])  # (the client's arrays are read-only)
    for row, (source, _) in enumerate(sources):
        if box_maps.get(source):
            boxes[row:row + 1] = in_photo(boxes[row:row + 1], outputs[detections[3]][row:row + 1], box_maps[source])
    return boxes


def _draw(source: str, found: list[dict], root: Path, folder: Path) -> None:
    """The photo again under `folder`, at its place under the job's input folder, boxes drawn."""
    from . import images

    out = folder / (Path(source).relative_to(root) if root.is_dir() else Path(source).name)
    out.parent.mkdir(parents=True, exist_ok=True)
    images.draw_detections(source, found, out)


def _samples(path: Path, inputs: list[dict]) -> dict[str, np.ndarray]:
    """The arrays of one file, named by the model's inputs, each with a leading sample axis."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise EdgewardError(f"cannot read {path}: {exc}", "save inputs with numpy.save / numpy.savez") from exc
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            arrays = {k: loaded[k] for k in loaded.files}
    else:
        if len(inputs) != 1:
            raise EdgewardError(f"{path}: a .npy holds one array, the model takes {len(inputs)} inputs",
                                f"save a .npz with arrays named {', '.join(i['name'] for i in inputs)}")
        arrays = {inputs[0]["name"]: loaded}
    out = {}
    for spec in inputs:
        arr = arrays.get(spec["name"])
        if arr is None and len(arrays) == 1 and len(inputs) == 1:
            arr = next(iter(arrays.values()))
        if arr is None:
            raise EdgewardError(f"{path}: no array named {spec['name']!r}", f"arrays found: {', '.join(arrays)}")
        if arr.ndim == len(spec["shape"]) - 1:
            arr = arr[None]  # one sample without its batch axis
        out[spec["name"]] = arr
    counts = {len(a) for a in out.values()}
    if len(counts) != 1:
        raise EdgewardError(f"{path}: inputs hold different numbers of samples ({sorted(counts)})")
    return out


def _batches(files: list[Path], inputs: list[dict], batch: int) -> Iterator[tuple[list[tuple[str, int]], dict]]:
    """(sources, feeds) batches of up to `batch` samples, never mixing files (their shapes may differ)."""
    for path in files:
        arrays = _samples(path, inputs)
        n = len(next(iter(arrays.values())))
        for lo in range(0, n, batch):
            hi = min(lo + batch, n)
            yield [(str(path), i) for i in range(lo, hi)], {k: v[lo:hi] for k, v in arrays.items()}


def fixed_batch(inputs: list[dict]) -> int | None:
    """The batch size a model takes, where its first input's first axis is fixed (a model written
    for batches of one, as a Keras transformer is), else None."""
    shape = (inputs[0].get("shape") or []) if inputs else []
    return int(shape[0]) if len(shape) > 1 and isinstance(shape[0], int) and shape[0] > 0 else None


def padded(batches, rows: int):
    """Batches of exactly `rows` samples, a short last one padded with copies of its last sample
    (whose answers are not written: each batch's sources name its real samples only)."""
    for sources, feeds in batches:
        if len(sources) < rows:
            feeds = {k: np.concatenate([v, np.repeat(v[-1:], rows - len(sources), axis=0)]) for k, v in feeds.items()}
        yield sources, feeds


def _count(files: list[Path], inputs: list[dict]) -> int:
    total = 0
    for path in files:
        total += len(next(iter(_samples(path, inputs).values())))
    return total


class _FileStreams:
    """A stateful model (a voice activity detector over recordings, say) reads each file as one
    stream, its samples in order, whatever the batch size: the file's batches continue one
    stream, which is forgotten when the next file starts, and at the end."""

    def __init__(self, client: LocalClient, model: str):
        self.client, self.model = client, model
        self.path: str | None = None
        self.stream: str | None = None

    def of(self, path: str) -> str:
        if path != self.path:
            self.close()
            self.path, self.stream = path, f"infer-{os.getpid()}-{time.monotonic_ns()}"
        return self.stream

    def close(self) -> None:
        if self.stream is not None:
            try:
                self.client.reset(self.model, self.stream)
            except (EdgewardError, OSError):  # the job's own error, if any, is the one to report
                pass
            self.stream = None


def run_job(socket_path: str, model: str, input_path: str, output: str, batch: int = 32,
            progress=sys.stderr, preprocess: str | None = None, draw: str | None = None) -> dict:
    """Run the job; returns a summary (samples, seconds, version). `draw`: a folder where each
    photo a detector ran on is written again with its detections drawn (images.draw_detections)."""
    files = _files(Path(input_path))
    out_path = Path(output)
    with LocalClient(socket_path) as client:
        info = next((m for m in client.models() if m["name"] == model), None)
        if info is None:
            raise EdgewardError(f"no model named {model!r} is serving on this board",
                                "see `edgeward agent status` for what is loaded")
        fixed = fixed_batch(info["inputs"])
        if fixed is not None and fixed != batch:  # the model takes that many rows a request, no other number
            if progress is not None:
                progress.write(f"  {model} takes batches of {fixed} sample(s): --batch {batch} becomes {fixed}\n")
            batch = fixed
        detections = info.get("detections") or []  # a detector's four outputs: each record lists its detections
        if draw and not (detections and is_image(files[0])):
            raise EdgewardError(f"--draw shows a detector's boxes on photos, and {model} is "
                                f"{'a detector' if detections else 'no detector'} run on "
                                f"{'photos' if is_image(files[0]) else 'arrays'}",
                                "drop --draw, or run a detector over a folder of photos")
        box_maps: dict = {}
        if is_image(files[0]):
            spec = _image_spec(info, preprocess)
            total, batches = len(files), _image_batches(files, info["inputs"][0]["name"], spec, batch,
                                                        box_maps if detections else None)
        else:
            if preprocess:
                raise EdgewardError("--preprocess describes image files, but the inputs are arrays",
                                    "drop --preprocess, or point --input at images")
            total, batches = _count(files, info["inputs"]), _batches(files, info["inputs"], batch)
        classes = (info.get("preprocessing") or {}).get("classes") or []
        done, t0 = 0, time.monotonic()
        tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
        streams = _FileStreams(client, model) if info.get("mode") == "stateful" else None
        if fixed is not None and streams is None:  # a stream's padding rows would move its state on
            batches = padded(batches, fixed)
        try:
            with open(tmp, "w") as f:
                for sources, feeds in batches:
                    stream = streams.of(sources[0][0]) if streams is not None else None
                    outputs = client.infer(model, feeds, stream=stream)
                    if any(box_maps.get(source) for source, _ in sources):  # boxes on the photos, not the inputs
                        outputs[detections[0]] = _on_photos(outputs, detections, sources, box_maps)
                    for row, (source, index) in enumerate(sources):
                        record = {"source": source, "index": index,
                                  "outputs": {k: v[row].tolist() for k, v in outputs.items()}}
                        first = next(iter(outputs.values()))
                        if len(detections) == 4 and all(n in outputs for n in detections):
                            record["detections"] = detection_list(*(outputs[n][row].tolist() for n in detections),
                                                                  classes)
                            if draw:
                                _draw(source, record["detections"], Path(input_path), Path(draw))
                        elif first.ndim == 2 and first.shape[1] > 1:
                            record["top1"] = top1 = int(first[row].argmax())
                            if top1 < len(classes) and classes[top1]:
                                record["class"] = classes[top1]
                        f.write(json.dumps(record) + "\n")
                    done += len(sources)
                    if progress is not None:
                        rate = done / max(time.monotonic() - t0, 1e-9)
                        eta = (total - done) / rate if rate else 0
                        progress.write(f"\r  {done}/{total} samples  {rate:.0f}/s  ETA {eta:.0f}s ")
                        progress.flush()
            os.replace(tmp, out_path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            if streams is not None:
                streams.close()
        if progress is not None:
            progress.write("\n")
    return {"samples": done, "seconds": round(time.monotonic() - t0, 2), "model": model, "version": info.get("version")}

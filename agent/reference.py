"""The self-test's reference data (reference.npz in a bundle): how it is stored, read back and
run (a model whose batch size is fixed takes the samples that many at a time).

Keys: ``input.NAME`` (what the model is fed), ``expected.NAME`` (the quantized model's outputs
on the host), ``atol.NAME`` (how far the board's output NAME may stray from it) and
``fp32.NAME`` (the FP32 model's, for people who inspect a bundle); a detector's also
``detections``, the names of its boxes, classes, scores and count outputs, which the self-test
matches as detections (agent/detections.py) rather than element by element, and
``detections_score_threshold``, its post-processing's score threshold. (The images with the
most detections are the reference samples.)

Each output has its own tolerance because a detector's outputs differ in scale: one tolerance
for boxes in pixels (0..700) and scores (0..1) let a board whose scores were all wrong pass
its self-test. They travel here, not in the manifest, whose schema is strict: an agent that
predates them reads this file as before and holds every output to the manifest's one
tolerance (the widest output's).

A float input that the model quantizes first thing (onnxruntime QDQ's QuantizeLinear, a
TFLite model's QUANTIZE op) only ever sees values on that op's grid. The converter snaps
such a reference input to the grid and stores its 8-bit codes, with ``input_scale.NAME``
and ``input_zero_point.NAME`` beside them: a quarter of the bytes, and what the model
computes is unchanged. One 128x128x3 image goes from 196 kB to 49 kB, which is most of
a small CNN's bundle. Host and board turn codes into floats with the same function
(`values`), so the board feeds exactly what the host ran.

The converter and the model worker import this module; the agent's main process does not
(it imports numpy).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import SelfTestError

Grid = tuple[float, int, str]  # (scale, zero point, code dtype: "int8" or "uint8")


def values(codes: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """The float32 values that 8-bit codes stand for; the same arithmetic on host and board."""
    return (codes.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)


def snap(x: np.ndarray, grid: Grid) -> np.ndarray:
    """A float input's codes on a quantize op's grid (saturating, as the op does)."""
    scale, zero_point, dtype = grid
    info = np.iinfo(dtype)
    q = np.round(x.astype(np.float64) / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def encode(inputs: dict[str, np.ndarray], grids: dict[str, Grid]) -> tuple[dict, dict]:
    """(arrays to store, the float inputs they stand for): inputs with a grid as codes."""
    stored, fed = {}, {}
    for name, x in inputs.items():
        grid = grids.get(name)
        if grid is None or x.dtype != np.float32:
            stored[f"input.{name}"], fed[name] = x, x
            continue
        codes = snap(x, grid)
        stored[f"input.{name}"] = codes
        stored[f"input_scale.{name}"] = np.float32(grid[0])
        stored[f"input_zero_point.{name}"] = np.int32(grid[1])
        fed[name] = values(codes, grid[0], grid[1])
    return stored, fed


TOLERANCE_OF_SPAN = 0.05       # of the output's range on the reference inputs
TOLERANCE_OF_MAGNITUDE = 0.01  # of its largest magnitude: room for a rounding step where the range is ~0
TOLERANCE_FLOOR = 1e-4


def tolerance(expected: np.ndarray) -> float:
    """How far a board's output may stray from the host's: 5 % of the output's span, or 1 % of its
    largest magnitude where that is more (an output that is (nearly) constant on the reference
    inputs still gets room for a rounding step of another CPU's kernels)."""
    if not expected.size:
        return TOLERANCE_FLOOR
    v = expected.astype(np.float64)
    return max(TOLERANCE_FLOOR, TOLERANCE_OF_SPAN * float(np.ptp(v)), TOLERANCE_OF_MAGNITUDE * float(np.abs(v).max()))


def tolerances(path: str | Path, what: str) -> dict[str, float]:
    """The per-output tolerances a bundle's reference data holds (none in bundles made before them);
    SelfTestError where one is not a single non-negative number."""
    try:
        with np.load(path, allow_pickle=False) as ref:
            found = {k[len("atol."):]: ref[k] for k in ref.files if k.startswith("atol.")}
    except (OSError, ValueError) as exc:
        raise SelfTestError(f"{what}: reference data unreadable ({exc})") from exc
    out = {}
    for name, v in found.items():
        if v.size != 1 or v.dtype.kind not in "fiu" or not np.isfinite(v).all() or float(v.reshape(())) < 0:
            raise SelfTestError(f"{what}: reference data's tolerance for output {name!r} is not a number >= 0")
        out[name] = float(v.reshape(()))
    return out


def detection_outputs(path: str | Path, outputs: list[str], what: str) -> tuple[list[str], float | None]:
    """(the four outputs a detector's reference data names: boxes, classes, scores, count; the op's
    score threshold), agent/detections.py; ([], None) for other models. SelfTestError where they
    are not four of the model's outputs."""
    from .detections import KEY, THRESHOLD_KEY

    try:
        with np.load(path, allow_pickle=False) as ref:
            if KEY not in ref.files:
                return [], None
            raw = ref[KEY]
            threshold = ref[THRESHOLD_KEY] if THRESHOLD_KEY in ref.files else None
    except (OSError, ValueError) as exc:
        raise SelfTestError(f"{what}: reference data unreadable ({exc})") from exc
    names = [str(n) for n in raw.reshape(-1)] if raw.dtype.kind == "U" else []
    if len(names) != 4 or len(set(names)) != 4 or not set(names) <= set(outputs):
        raise SelfTestError(f"{what}: reference data's detection outputs {names} are not four of the model's outputs")
    if threshold is not None and (threshold.size != 1 or threshold.dtype.kind != "f" or not np.isfinite(threshold).all()):
        raise SelfTestError(f"{what}: reference data's detection score threshold is not a number")
    return names, None if threshold is None else float(threshold.reshape(()))


def load(path: str | Path, input_names: list[str], what: str) -> tuple[dict, dict]:
    """(feeds, expected outputs) from a bundle's reference data; SelfTestError if unusable."""
    try:
        with np.load(path, allow_pickle=False) as ref:
            data = {k: ref[k] for k in ref.files}
    except (OSError, ValueError) as exc:
        raise SelfTestError(f"{what}: reference data unreadable ({exc})") from exc
    feeds = {}
    for name in input_names:
        x = data.get(f"input.{name}")
        if x is None:
            raise SelfTestError(f"{what}: reference data lacks input {name!r}")
        scale, zero_point = data.get(f"input_scale.{name}"), data.get(f"input_zero_point.{name}")
        if scale is not None and zero_point is not None:
            if x.dtype not in (np.int8, np.uint8) or scale.size != 1 or zero_point.size != 1:
                raise SelfTestError(f"{what}: reference input {name!r} has codes but no valid grid")
            x = values(x, float(scale), int(zero_point))
        feeds[name] = x
    expected = {k[len("expected."):]: v for k, v in data.items() if k.startswith("expected.")}
    return feeds, expected


def run_in_batches(run, feeds: dict, batch: int | None) -> dict:
    """Run samples through a model whose batch size is fixed, `batch` rows at a time (the last
    run padded with zeros, whose outputs are dropped): a bundle's reference holds several
    samples, and a model exported at batch 1 takes one at a time."""
    sizes = {len(v) if np.ndim(v) else 0 for v in feeds.values()}
    if not batch or len(sizes) != 1 or sizes == {batch}:
        return run(feeds)
    n, parts = sizes.pop(), []
    for start in range(0, n, batch):
        chunk = {k: v[start:start + batch] for k, v in feeds.items()}
        rows = len(next(iter(chunk.values())))
        if rows < batch:
            chunk = {k: np.concatenate([v, np.zeros((batch - rows, *v.shape[1:]), v.dtype)]) for k, v in chunk.items()}
        parts.append({k: v[:rows] for k, v in run(chunk).items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

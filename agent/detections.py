"""A detector's final detections (an SSD's TFLite_Detection_PostProcess outputs) compared as
sets of boxes, not as arrays.

The op writes, per image, up to N detections sorted by score: boxes [1, N, 4] (ymin, xmin,
ymax, xmax), classes [1, N], scores [1, N] and their count [1]. Two faithful runs can list
the same detections in another order (equal int8 scores, a near tie in the suppression), and
the rows past the count are whatever the buffer held before: LiteRT leaves them unwritten. So
the converter's quality figures and the board's self-test match detections by class and
overlap instead of comparing element by element, and the converter stores its reference
outputs with the unwritten rows zeroed (`cleaned`).

The converter and the model worker import this module; the agent's main process does not
(it imports numpy).
"""

from __future__ import annotations

import numpy as np

KEY = "detections"
"""reference.npz's key naming a detector's four outputs (boxes, classes, scores, count), in that order."""
THRESHOLD_KEY = "detections_score_threshold"
"""reference.npz's key holding the op's score threshold, below which it drops a detection."""

MATCH_IOU = 0.5  # the overlap at which two boxes of one class are the same detection (as in COCO's AP50)

Detection = tuple[np.ndarray, int, float]  # (box, class, score)


def counts(count: np.ndarray, slots: int) -> np.ndarray:
    """Each image's number of detections as the count output says it, read as a row count: NaN
    or out of range from a model (the op's, or a confused one's) held to 0..slots."""
    count = np.asarray(count)
    return np.clip(np.nan_to_num(count.reshape(len(count), -1)[:, 0]), 0, slots).astype(int)


def per_image(outputs: dict[str, np.ndarray], names: list[str]) -> list[list[Detection]]:
    """Each image's detections, the first `count` rows of its outputs."""
    boxes, classes, scores, count = (np.asarray(outputs[n]) for n in names)
    return [[(boxes[i, k].astype(np.float64), int(classes[i, k]), float(scores[i, k])) for k in range(n)]
            for i, n in enumerate(counts(count, scores.shape[-1]))]


def cleaned(outputs: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """The outputs with every row past each image's count zeroed (the op leaves them unwritten)."""
    out = dict(outputs)
    for name in names[:3]:
        v = np.array(outputs[name], copy=True)
        for i, n in enumerate(counts(outputs[names[3]], v.shape[1])):
            v[i, n:] = 0
        out[name] = v
    return out


def in_photo(boxes: np.ndarray, count: np.ndarray, box_map: tuple[float, float, float, float]) -> np.ndarray:
    """Boxes as fractions of the photo an image was prepared from instead of the model's input
    (images.photo_box's (ky, oy, kx, ox)), clipped to it; rows past each count stay as they are."""
    ky, oy, kx, ox = box_map
    out = np.array(boxes, dtype=np.float32, copy=True)
    for i, n in enumerate(counts(count, out.shape[1])):
        out[i, :n, 0::2] = np.clip(out[i, :n, 0::2] * ky + oy, 0.0, 1.0)
        out[i, :n, 1::2] = np.clip(out[i, :n, 1::2] * kx + ox, 0.0, 1.0)
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (ymin, xmin, ymax, xmax) boxes."""
    h = min(a[2], b[2]) - max(a[0], b[0])
    w = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(h, 0.0) * max(w, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    if union <= 0:  # a box of no area (a confused model's): the same detection only where it is the same box
        return 1.0 if np.array_equal(a, b) else 0.0
    return inter / union


def match(want: list[Detection], have: list[Detection]) -> list[tuple[int, int]]:
    """Pairs (i in want, k in have) of one class overlapping by at least MATCH_IOU, greedily from
    the highest score in `want`, each detection in at most one pair."""
    pairs, taken = [], set()
    for i in sorted(range(len(want)), key=lambda i: -want[i][2]):
        box, cls, _ = want[i]
        best, best_iou = None, MATCH_IOU
        for k, (other, other_cls, _) in enumerate(have):
            if k not in taken and other_cls == cls:
                overlap = iou(box, other)
                if overlap >= best_iou:
                    best, best_iou = k, overlap
        if best is not None:
            taken.add(best)
            pairs.append((i, best))
    return pairs


def agreement(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], names: list[str]) -> dict:
    """How far the candidate's detections are the reference's: `detection_agreement` is the matched
    share of the larger list (missed and extra detections both count), 1.0 where both found none."""
    total_ref = total_cand = 0
    overlaps, score_errs = [], []
    for want, have in zip(per_image(reference, names), per_image(candidate, names)):
        pairs = match(want, have)
        total_ref, total_cand = total_ref + len(want), total_cand + len(have)
        overlaps += [iou(want[i][0], have[k][0]) for i, k in pairs]
        score_errs += [abs(want[i][2] - have[k][2]) for i, k in pairs]
    larger = max(total_ref, total_cand)
    return {"detection_agreement": round(len(overlaps) / larger, 5) if larger else 1.0,
            "detections_fp32": total_ref, "detections_int8": total_cand, "detections_matched": len(overlaps),
            "matched_iou_mean": round(float(np.mean(overlaps)), 4) if overlaps else 1.0,
            "matched_score_max_err": round(max(score_errs, default=0.0), 5)}


def mismatch(expected: dict[str, np.ndarray], got: dict[str, np.ndarray], names: list[str],
             score_tolerance: float, threshold: float | None = None) -> str | None:
    """Why a board's detections are not the host's, or None. Each detection must be found again
    (same class, overlap >= MATCH_IOU, score within the tolerance); one may appear or vanish only
    at an edge, where a rounding step moves its score across the op's score `threshold`, or
    across the lowest score of a list the op cut at its maximum count. (Without the threshold,
    the lowest score of either list stands for it.)"""
    slots = np.asarray(expected[names[2]]).shape[-1]
    for image, (want, have) in enumerate(zip(per_image(expected, names), per_image(got, names))):
        pairs = match(want, have)
        for i, k in pairs:
            if abs(want[i][2] - have[k][2]) > score_tolerance:
                return (f"image {image}: a class {want[i][1]} detection scores {have[k][2]:.4g} against the host's "
                        f"{want[i][2]:.4g} (allowed {score_tolerance:.4g})")
        scores = [d[2] for d in want + have]
        edges = [threshold if threshold is not None else min(scores, default=0.0)]
        edges += [min(d[2] for d in found) for found in (want, have) if found and len(found) == slots]
        edge = max(edges) + score_tolerance
        lost = [want[i] for i in sorted(set(range(len(want))) - {i for i, _ in pairs})]
        extra = [have[k] for k in sorted(set(range(len(have))) - {k for _, k in pairs})]
        for what, (box, cls, score) in [("missing", d) for d in lost] + [("extra", d) for d in extra]:
            if score > edge:
                return (f"image {image}: a class {cls} detection (score {score:.4g}) is {what} on this device "
                        f"({len(have)} found, {len(want)} on the host)")
    return None

"""A detector's final detections are compared as sets (agent/detections.py): by class and overlap,
in any order, with the unwritten rows past the count ignored."""

import numpy as np
import pytest

from agent import detections
from converters import guard

NAMES = ["boxes", "classes", "scores", "count"]


def _outputs(rows: list[list[tuple]], slots: int = 4, garbage: float = 3.0e38) -> dict:
    """One image per list of (box, class, score); the rows past the count hold garbage, as LiteRT leaves them."""
    n = len(rows)
    boxes = np.full((n, slots, 4), garbage, np.float32)
    classes = np.full((n, slots), garbage, np.float32)
    scores = np.full((n, slots), np.nan, np.float32)
    count = np.zeros(n, np.float32)
    for i, found in enumerate(rows):
        for k, (box, cls, score) in enumerate(found):
            boxes[i, k], classes[i, k], scores[i, k] = box, cls, score
        count[i] = len(found)
    return dict(zip(NAMES, (boxes, classes, scores, count)))


A = ([0.1, 0.1, 0.5, 0.5], 1, 0.9)
B = ([0.5, 0.5, 0.9, 0.9], 2, 0.8)
C = ([0.2, 0.6, 0.4, 0.8], 1, 0.35)


def test_the_same_detections_in_another_order_agree_and_unwritten_rows_are_ignored():
    want = _outputs([[A, B, C]])
    have = _outputs([[B, C, A]], garbage=-7.0)
    q = detections.agreement(want, have, NAMES)
    assert q["detection_agreement"] == 1.0 and q["detections_matched"] == 3
    assert q["matched_iou_mean"] == 1.0 and q["matched_score_max_err"] == 0.0
    assert detections.mismatch(want, have, NAMES, score_tolerance=0.01) is None


def test_cleaned_zeroes_the_rows_past_each_images_count():
    out = detections.cleaned(_outputs([[A], []]), NAMES)
    assert np.isfinite(out["scores"]).all() and out["scores"][0, 0] == np.float32(0.9)
    assert not out["boxes"][0, 1:].any() and not out["boxes"][1].any() and not out["classes"][1].any()


def test_missed_extra_or_moved_detections_lower_the_agreement():
    want = _outputs([[A, B], [A]])
    moved = ([0.6, 0.6, 0.95, 0.95], 1, 0.9)   # A's class, elsewhere (IoU 0)
    other_class = (A[0], 2, 0.9)
    have = _outputs([[moved, B], [other_class, C]])
    q = detections.agreement(want, have, NAMES)
    assert q["detections_matched"] == 1 and q["detections_fp32"] == 3 and q["detections_int8"] == 4
    assert q["detection_agreement"] == pytest.approx(1 / 4)
    assert guard.broken(q).startswith("only 25% of its detections match the float model's")
    assert guard.quality_drop(q) == pytest.approx(0.75)


def test_none_found_by_either_is_full_agreement():
    q = detections.agreement(_outputs([[], []]), _outputs([[], []]), NAMES)
    assert q["detection_agreement"] == 1.0 and guard.broken(q) is None


def test_the_self_test_allows_only_a_detection_at_the_edge_to_appear_or_vanish():
    """At the op's score threshold (0.34 here: C scores 0.35), or at the lowest score of a list cut
    at the op's maximum count."""
    want = _outputs([[A, B, C]])
    assert detections.mismatch(want, _outputs([[A, B]]), NAMES, 0.02, threshold=0.34) is None  # C fell below it
    missing = detections.mismatch(want, _outputs([[A, C]]), NAMES, 0.02, threshold=0.34)
    assert missing == "image 0: a class 2 detection (score 0.8) is missing on this device (2 found, 3 on the host)"
    extra = detections.mismatch(_outputs([[A]]), _outputs([[A, B]]), NAMES, 0.02, threshold=0.34)
    assert extra == "image 0: a class 2 detection (score 0.8) is extra on this device (2 found, 1 on the host)"
    shifted = detections.mismatch(want, _outputs([[A, (B[0], 2, 0.7), C]]), NAMES, 0.02, threshold=0.34)
    assert shifted is not None and "scores 0.7" in shifted
    assert detections.mismatch(want, _outputs([[A, (B[0], 2, 0.79), C]]), NAMES, 0.02, threshold=0.34) is None
    # a full list (max_detections reached) loses its last detection to another of the same score
    full, swapped = _outputs([[A, B]], slots=2), _outputs([[A, ([0.6, 0.0, 0.9, 0.3], 1, 0.795)]], slots=2)
    assert detections.mismatch(full, swapped, NAMES, 0.02, threshold=0.3) is None
    assert detections.mismatch(_outputs([[A, B]]), swapped, NAMES, 0.02, threshold=0.3) is not None


def test_a_count_past_the_slots_or_not_a_number_reads_as_what_the_outputs_hold():
    """The count comes from the model: it may not index past its rows or crash the comparison."""
    bad = _outputs([[A, B]])
    bad["count"][:] = 99
    assert len(detections.per_image(bad, NAMES)[0]) == 4
    bad["count"][:] = np.nan
    assert detections.per_image(bad, NAMES) == [[]]


def test_an_answer_lists_the_detections_up_to_the_count_named_by_the_bundles_classes():
    """What pipelines, the local API and devices add to a detector's answer (agent/tensors.py):
    the first `count` rows as {box, class_id, class, score}; the garbage past them never read."""
    from agent.tensors import from_numpy, labels

    out = [from_numpy(k, v) for k, v in _outputs([[A, B]]).items()]
    got = labels(out, ["", "cat"], NAMES)  # class 2 has no name in this bundle
    assert got == {"detections": [{"box": [0.1, 0.1, 0.5, 0.5], "class_id": 1, "class": "cat", "score": 0.9},
                                  {"box": [0.5, 0.5, 0.9, 0.9], "class_id": 2, "score": 0.8}]}
    assert labels(out, [], []) == {}  # not known as a detector: its [1, 4, 4] boxes are no classifier's scores


@pytest.mark.parametrize("count", [np.nan, np.inf, -3.0])
def test_a_count_a_model_cannot_mean_lists_no_detections(count):
    from agent.tensors import from_numpy, labels

    arrays = _outputs([[A, B]])
    arrays["count"][0] = count
    assert labels([from_numpy(k, v) for k, v in arrays.items()], [], NAMES) == {"detections": []}


def test_values_a_model_cannot_mean_in_a_listed_row_stay_valid_json():
    import json

    from agent.tensors import from_numpy, labels

    arrays = _outputs([[A, B]])
    arrays["classes"][0, 0], arrays["scores"][0, 1], arrays["boxes"][0, 1, 2] = np.nan, np.inf, np.nan
    got = labels([from_numpy(k, v) for k, v in arrays.items()], ["", "cat"], NAMES)["detections"]
    assert got[0]["class_id"] == -1 and "class" not in got[0] and got[1]["score"] == 0.0 and got[1]["box"][2] == 0.0
    json.loads(json.dumps(got, allow_nan=False))


def test_a_batch_of_images_is_not_listed_as_one_images_detections():
    from agent.tensors import from_numpy, labels

    assert labels([from_numpy(k, v) for k, v in _outputs([[A], [B]]).items()], [], NAMES) == {}


def test_a_box_of_no_area_matches_only_the_same_box():
    point = np.array([0.3, 0.3, 0.3, 0.3])
    assert detections.iou(point, point.copy()) == 1.0  # two runs that agree, agree
    assert detections.iou(point, point + 0.1) == 0.0
    assert detections.iou(np.array([0.1, 0.1, 0.5, 0.5]), np.array([0.1, 0.1, 0.5, 0.5])) == pytest.approx(1.0)

"""--nms: a YOLO detector converted with non-maximum suppression appended (TFLite's detection
post-processing, or ONNX's NonMaxSuppression; converters/nms.py), so the bundle answers with
detections. The float model's detections are
checked against a non-maximum suppression written here in numpy on the PyTorch module's own
output; the INT8 bundle is served and self-tested by the real agent in LiteRT."""

from __future__ import annotations

import numpy as np
import pytest

from agent.budget import Budget
from agent.bundle import open_bundle
from agent.detections import agreement
from agent.engine import Engine
from agent.errors import ConversionError
from agent.signing import load_public_key
from agent.store import Store
from agent.tensors import from_numpy, labels
from converters.convert import ConvertOptions, convert_onnx
from converters.nms import NmsSpec, parse_nms

SIZE, SCORE, IOU, MAX = 32, 0.5, 0.7, 20


@pytest.fixture(scope="module")
def yolo(tmp_path_factory):
    """(onnx path, calibration, evaluation, PyTorch's raw outputs for the evaluation images)."""
    import torch

    from converters.from_torch import to_onnx

    from yolokit import decoded_yolo

    tmp = tmp_path_factory.mktemp("yolo")
    net = decoded_yolo()
    x = torch.rand(96, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)).numpy()
    path, _ = to_onnx(net, {"input": x[:2]}, tmp / "yolo.onnx")
    np.savez(tmp / "calib.npz", input=x[:64])
    np.savez(tmp / "eval.npz", input=x[64:])
    with torch.no_grad():
        raw = net(torch.from_numpy(x[64:])).numpy()
    return path, tmp / "calib.npz", tmp / "eval.npz", x[64:], raw


def _suppressed(raw: np.ndarray) -> dict[str, np.ndarray]:
    """TFLite's fast non-maximum suppression, written out: each anchor's best class, kept from
    SCORE up, greedily best first, dropping any box that overlaps a kept one by more than IOU
    (whatever its class); at most MAX. Boxes as fractions of the image, (ymin, xmin, ymax, xmax)."""
    n = len(raw)
    boxes, classes, scores, count = np.zeros((n, MAX, 4)), np.zeros((n, MAX)), np.zeros((n, MAX)), np.zeros(n)
    for i, rows in enumerate(raw):
        cx, cy, w, h = rows[:4]
        corners = np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], 1) / SIZE
        best, cls = rows[4:].max(0), rows[4:].argmax(0)
        kept = _greedy(corners, best, SCORE, IOU, MAX)
        count[i] = len(kept)
        for j, a in enumerate(kept):
            boxes[i, j], classes[i, j], scores[i, j] = corners[a], cls[a], best[a]
    return {"boxes": boxes, "classes": classes, "scores": scores, "count": count}


def _greedy(corners: np.ndarray, scores: np.ndarray, score: float, iou: float, most: int) -> list[int]:
    """The boxes kept, best first: from `score` up, none overlapping a kept one by more than `iou`."""
    kept: list[int] = []
    for a in np.argsort(-scores, kind="stable"):
        if scores[a] < score or len(kept) == most:
            break
        if all(_iou(corners[a], corners[k]) <= iou for k in kept):
            kept.append(a)
    return kept


def _iou(a, b) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _serve(bundle, assets, tmp_path, x, feed: str = "input"):
    """(model, the detections it answers for each image of x, one request each, as four arrays)."""
    engine = Engine(Budget(4096, reserve_mb=0))
    model = engine.load(Store(tmp_path / "store").install(open_bundle(bundle, [load_public_key(assets.pub)])))
    model.self_test()
    engine.activate(model)
    order = model.detections
    runs = [engine.infer_arrays(model.name, {feed: row[None]})[1] for row in x]
    engine.close()
    return model, order, runs


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_the_float_model_with_nms_answers_what_the_suppression_written_out_gives(yolo, assets, tmp_path, fmt):
    """TFLite's TFLite_Detection_PostProcess and ONNX's NonMaxSuppression, each fed as
    converters/nms.py feeds it, give the same detections as the suppression written out."""
    path, calib, evaluation, x, raw = yolo
    report = convert_onnx(path, calib, tmp_path / "f.ewb", assets.key, evaluation,
                          ConvertOptions(name="yolo", format=fmt, precision="fp32",
                                         nms=f"yolo,score={SCORE},iou={IOU},max={MAX}"))
    if fmt == "tflite":
        assert report["graph"]["ops"]["TFLite_Detection_PostProcess"] == 1
    model, order, runs = _serve(tmp_path / "f.ewb", assets, tmp_path, x)
    assert sorted(o.shape for o in model.manifest.outputs) == sorted([[1, MAX, 4], [1, MAX], [1, MAX], [1]])
    assert model.manifest.inputs[0].shape == [1, 3, SIZE, SIZE]  # one image a call: the op's batch
    served = {k: np.concatenate([r[k] for r in runs]) for k in order}
    want = _suppressed(raw)
    q = agreement(dict(zip(order, want.values())), served, order)
    assert q["detections_fp32"] >= 3 * len(x) and q["detection_agreement"] >= 0.99, q
    assert q["matched_iou_mean"] >= 0.999 and q["matched_score_max_err"] <= 1e-4, q


def test_an_int8_yolo_with_nms_is_measured_self_tested_and_answers_with_detections(yolo, assets, tmp_path):
    from tflitekit import op_dtypes

    path, calib, evaluation, x, _ = yolo
    report = convert_onnx(path, calib, tmp_path / "q.ewb", assets.key, evaluation,
                          ConvertOptions(name="yolo", format="tflite", nms=f"yolo,score={SCORE},max={MAX}"))
    q = report["quality"]
    assert q["detections_fp32"] >= 3 * len(x) and q["detection_agreement"] >= 0.6, q  # random weights: near ties
    assert report["broken"] is None
    model, order, runs = _serve(tmp_path / "q.ewb", assets, tmp_path, x)  # (no LayerNorm: said as it is)
    assert model.manifest.producer.endswith("full-integer INT8, with non-maximum suppression appended)")
    import tarfile

    with tarfile.open(tmp_path / "q.ewb") as tar:
        (tmp_path / "q.tflite").write_bytes(tar.extractfile("model.tflite").read())
    dtypes = op_dtypes(tmp_path / "q.tflite")
    assert dtypes["CONV_2D"] == {"int8"} and dtypes["CUSTOM"] == {"float32"} and dtypes["LOG"] == {"float32"}
    listed = labels([from_numpy(k, v) for k, v in runs[0].items()], [], order)["detections"]
    n = int(runs[0][order[3]][0])
    assert len(listed) == n >= 1 and [d["score"] for d in listed] == sorted((d["score"] for d in listed),
                                                                             reverse=True)
    assert all(d["score"] >= SCORE and 0 <= d["class_id"] < 3 for d in listed)


def test_an_int8_onnx_yolo_with_nms_keeps_the_suppression_and_the_joined_output_in_float(yolo, assets, tmp_path):
    """onnxruntime's quantizer leaves the appended nodes and YOLO's [boxes, scores] join in float
    (one int8 scale for pixels and probabilities made every score 0: no detections at all)."""
    path, calib, evaluation, x, _ = yolo
    report = convert_onnx(path, calib, tmp_path / "o.ewb", assets.key, evaluation,
                          ConvertOptions(name="yolo", format="onnx", allow_worse=True,
                                         nms=f"yolo,score={SCORE},max={MAX}"))
    q = report["quality"]
    assert q["detections_fp32"] >= 3 * len(x) and q["detection_agreement"] >= 0.6, q
    assert report["graph"]["ops"]["NonMaxSuppression"] == 1 and report["graph"]["int8_weight_tensors"] >= 10
    pruned = convert_onnx(path, calib, tmp_path / "p.ewb", assets.key, evaluation,
                          ConvertOptions(name="yolo", format="onnx", allow_worse=True, prune=0.3,
                                         nms=f"yolo,score={SCORE},max={MAX}"))
    assert pruned["pruning"]["layers"] and not any(n.startswith("nms/") for n in pruned["pruning"]["layers"])
    assert pruned["quality"]["matched_iou_mean"] >= 0.8  # the box arithmetic is not a layer to prune
    model, order, runs = _serve(tmp_path / "o.ewb", assets, tmp_path, x[:8])
    assert order == ["detection_boxes", "detection_classes", "detection_scores", "num_detections"]
    listed = labels([from_numpy(k, v) for k, v in runs[0].items()], [], order)["detections"]
    assert len(listed) == int(runs[0]["num_detections"][0]) >= 1
    assert not runs[0]["detection_scores"][0, len(listed):].any()  # padded with zeros past the count


def test_nms_specs_are_read_and_refused_with_the_form_to_use():
    assert parse_nms("yolo") == NmsSpec()
    assert parse_nms("yolo, score=0.4, iou=0.5, max=50") == NmsSpec(0.4, 0.5, 50)
    for text, fragment in (("ssd", "'ssd' is not a detector layout"), ("yolo,score=2", "out of range"),
                           ("yolo,max=0", "out of range"), ("yolo,top=3", "unknown setting 'top'"),
                           ("yolo,iou=x", "out of range")):
        with pytest.raises(ConversionError, match=fragment) as err:
            parse_nms(text)
        assert "yolo" in err.value.fix


def test_nms_on_a_model_that_is_no_yolo_or_for_onnx_is_one_clear_error(assets, tmp_path):
    with pytest.raises(ConversionError, match=r"--nms yolo takes a YOLO output \[1, 4 \+ classes, anchors\]"):
        convert_onnx(assets.fp32_v1, assets.calib, tmp_path / "d.ewb", None, None,
                     ConvertOptions(name="digits", format="tflite", nms="yolo"))
    with pytest.raises(ConversionError, match=r"--nms takes a YOLO output \[1, 4 \+ classes, anchors\] from images"):
        convert_onnx(assets.fp32_v1, assets.calib, tmp_path / "d.ewb", None, None,
                     ConvertOptions(name="digits", nms="yolo"))
    with pytest.raises(ConversionError, match="convert once per format"):
        convert_onnx(assets.fp32_v1, assets.calib, tmp_path / "d.ewb", None, None,
                     ConvertOptions(name="digits", format="both", nms="yolo"))
    assert not (tmp_path / "d.ewb").exists()


def test_a_float_tflite_yolo_takes_nms_too(yolo, assets, tmp_path):
    """A YOLO already in float TFLite (as ultralytics' TFLite export gives it): the same
    suppression, and the boxes and scores it is fed checked against the file's own."""
    import onnx

    from converters.from_tflite import convert_tflite
    from converters.onnx_to_tflite import lower
    from converters.tflite_graph import write_tflite

    path, calib, evaluation, x, raw = yolo
    write_tflite(lower(onnx.load(str(path))), tmp_path / "yolo.tflite")
    report = convert_tflite(tmp_path / "yolo.tflite", calib, tmp_path / "t.ewb", assets.key, evaluation,
                            ConvertOptions(name="yolo", precision="fp32", nms=f"yolo,score={SCORE},iou={IOU},max={MAX}"))
    assert report["graph"]["ops"]["TFLite_Detection_PostProcess"] == 1
    _, order, runs = _serve(tmp_path / "t.ewb", assets, tmp_path, x)
    q = agreement(dict(zip(order, _suppressed(raw).values())),
                  {k: np.concatenate([r[k] for r in runs]) for k in order}, order)
    assert q["detection_agreement"] >= 0.99 and q["matched_iou_mean"] >= 0.999, q


def _mediapipe_suppressed(reg: np.ndarray, logits: np.ndarray, size: int, score: float, iou: float,
                          most: int) -> dict[str, np.ndarray]:
    """MediaPipe's own decoding, written out: anchors of strides 8:16:16:16 (2 per layer and
    cell, fixed size), centre = offset / size + the anchor's, size = width / size; sigmoid
    scores; then the op's hard suppression, best first."""
    anchors = []
    for stride, layers in ((8, 1), (16, 3)):
        n = size // stride
        anchors += [((y + 0.5) / n, (x + 0.5) / n) for y in range(n) for x in range(n) for _ in range(2 * layers)]
    anchors = np.array(anchors)
    out = {k: [] for k in ("boxes", "classes", "scores", "count")}
    for r, s in zip(reg, logits):
        cy, cx = r[:, 1] / size + anchors[:, 0], r[:, 0] / size + anchors[:, 1]
        h, w = r[:, 3] / size, r[:, 2] / size
        corners = np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], 1)
        p = 1 / (1 + np.exp(-s[:, 0]))
        kept = _greedy(corners, p, score, iou, most)
        rows = np.zeros((most, 4))
        rows[:len(kept)] = corners[kept]
        out["boxes"].append(rows)
        out["classes"].append(np.zeros(most))
        out["scores"].append(np.r_[p[kept], np.zeros(most - len(kept))])
        out["count"].append(len(kept))
    return {k: np.array(v) for k, v in out.items()}


def test_a_mediapipe_ssd_answers_with_detections_decoded_as_mediapipe_decodes_them(assets, tmp_path):
    """--nms mediapipe: the face and palm detectors' layout (regressors and class logits, anchors
    computed by the graph around them) gets the same post-processing op, fed so that it decodes
    boxes as MediaPipe's TensorsToDetectionsCalculator does."""
    from ai_edge_litert.interpreter import Interpreter

    from converters.from_tflite import convert_tflite
    from converters.zoo import build_mediapipe_ssd_tflite

    source = build_mediapipe_ssd_tflite(tmp_path / "blaze.tflite", size=64)
    rng = np.random.default_rng(4)
    low = rng.random((48, 8, 8, 3)).astype(np.float32)
    x = np.repeat(np.repeat(low, 8, 1), 8, 2)  # blocks of one anchor cell each
    np.savez(tmp_path / "calib.npz", input=x[:32])
    np.savez(tmp_path / "eval.npz", input=x[32:])
    spec = "mediapipe,score=0.5,iou=0.3,max=10"
    report = convert_tflite(source, tmp_path / "calib.npz", tmp_path / "f.ewb", assets.key, tmp_path / "eval.npz",
                            ConvertOptions(name="blaze", precision="fp32", nms=spec))
    assert report["graph"]["ops"]["TFLite_Detection_PostProcess"] == 1
    it = Interpreter(model_path=str(source))  # the source file's own outputs, told apart by their width
    it.allocate_tensors()
    reg_out, cls_out = sorted(it.get_output_details(), key=lambda d: -d["shape"][-1])
    raw = []
    for row in x[32:]:
        it.set_tensor(it.get_input_details()[0]["index"], row[None])
        it.invoke()
        raw.append((it.get_tensor(reg_out["index"]).copy(), it.get_tensor(cls_out["index"]).copy()))
    want = _mediapipe_suppressed(np.concatenate([r for r, _ in raw]), np.concatenate([c for _, c in raw]),
                                 64, 0.5, 0.3, 10)
    _, order, runs = _serve(tmp_path / "f.ewb", assets, tmp_path, x[32:], feed="input")
    q = agreement(dict(zip(order, want.values())), {k: np.concatenate([r[k] for r in runs]) for k in order}, order)
    assert q["detections_fp32"] >= 2 * 16 and q["detection_agreement"] >= 0.99, q
    assert q["matched_iou_mean"] >= 0.999 and q["matched_score_max_err"] <= 1e-4, q

    report = convert_tflite(source, tmp_path / "calib.npz", tmp_path / "q.ewb", assets.key, tmp_path / "eval.npz",
                            ConvertOptions(name="blaze", nms=spec, allow_worse=True))
    assert report["quality"]["detection_agreement"] >= 0.6, report["quality"]
    _serve(tmp_path / "q.ewb", assets, tmp_path / "q", x[32:34], feed="input")  # self-tests and serves
    with pytest.raises(ConversionError, match=r"224 boxes do not fit anchors of strides 8:16:32:32:32"):
        convert_tflite(source, tmp_path / "calib.npz", tmp_path / "s.ewb", None, None,
                       ConvertOptions(name="blaze", nms="mediapipe,strides=8:16:32:32:32"))
    with pytest.raises(ConversionError, match="for the .tflite files MediaPipe ships"):
        convert_onnx(assets.fp32_v1, assets.calib, tmp_path / "m.ewb", None, None,
                     ConvertOptions(name="digits", nms="mediapipe"))
    assert not (tmp_path / "s.ewb").exists() and not (tmp_path / "m.ewb").exists()

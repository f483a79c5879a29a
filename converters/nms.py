"""Non-maximum suppression appended to a YOLO detector (`--nms`), so the board answers with
detections instead of thousands of candidate boxes.

A YOLOv8 (or v5u, v11) as ultralytics exports it ends in [1, 4 + classes, anchors]: each
anchor's box (centre x, centre y, width, height, in input pixels) and its class scores, 705,600
numbers for 80 classes at 640x640. Every caller would have to run its own non-maximum
suppression. Instead the model gets TensorFlow's own TFLite_Detection_PostProcess (which stock
LiteRT and tflite-runtime 2.14 register, as SSD exports use it), fed so that its box decoding
passes YOLO's boxes through:

    encodings = (cy, cx, log(h / H), log(w / W)), anchors (0, 0, 1, 1), y_scale H, x_scale W,
    h_scale = w_scale = 1  ->  centre cy / H, cx / W; size h / H, w / W

so its boxes are YOLO's, as fractions of the image in (ymin, xmin, ymax, xmax), with the class
scores as they are (no background column). From then on the model is a detector like an SSD:
measured as matched detections, self-tested as sets, answered as lists (agent/detections.py).
The boxes and scores come from the two parts of YOLO's last concat, each at its own int8 scale;
the few ops between them and the post-processing run in float.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agent.errors import ConversionError

from .tflite_graph import CUSTOM, Graph, Op

PREFIX = "nms/"  # the names of the tensors and ops appended
HOW = "yolo, optionally with score=0.25, iou=0.7 and max=100 (e.g. --nms yolo,score=0.4)"


@dataclass(frozen=True)
class NmsSpec:
    """What the appended suppression keeps: detections scoring at least `score`, none
    overlapping a better one of its class by more than `iou`, at most `max` of them
    (ultralytics' own defaults for conf and iou)."""
    score: float = 0.25
    iou: float = 0.7
    max: int = 100

    def options(self, classes: int, height: int, width: int) -> dict:
        """The op's options, as TensorFlow's converter writes them (a flexbuffer map)."""
        return {"max_detections": self.max, "max_classes_per_detection": 1, "detections_per_class": self.max,
                "use_regular_nms": False, "nms_score_threshold": self.score, "nms_iou_threshold": self.iou,
                "num_classes": classes, "y_scale": float(height), "x_scale": float(width),
                "h_scale": 1.0, "w_scale": 1.0}


def parse_nms(text: str) -> NmsSpec:
    """`--nms yolo[,score=S][,iou=I][,max=N]`."""
    kind, *pairs = [p.strip() for p in text.split(",")]
    if kind != "yolo":
        raise ConversionError(f"--nms {text}: {kind!r} is not a detector layout edgeward knows", f"use {HOW}")
    values: dict = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            if key in ("score", "iou"):
                values[key] = float(value)
                if not 0 <= values[key] <= 1:
                    raise ValueError
            elif key == "max":
                values[key] = int(value)
                if not 1 <= values[key] <= 1000:
                    raise ValueError
            else:
                raise ConversionError(f"--nms {text}: unknown setting {key!r}", f"use {HOW}")
        except ValueError:
            raise ConversionError(f"--nms {text}: {pair!r} is out of range (score and iou 0..1, max 1..1000)",
                                  f"use {HOW}") from None
    return NmsSpec(**values)


def append_nms(graph: Graph, spec: NmsSpec) -> None:
    """Make `graph` (a YOLO detector: one output [1, 4 + classes, anchors] joined from boxes and
    scores) end in TFLite_Detection_PostProcess, for batches of one image."""
    if len(graph.outputs) != 1 or len(graph.inputs) != 1:
        raise ConversionError("--nms takes a YOLO detector: one image in, one [1, 4 + classes, anchors] out",
                              "export the model with its Detect head (yolo export format=onnx), or drop --nms")
    out = graph.outputs[0]
    shape = graph.shapes.get(out, [])
    join = next((op for op in graph.ops if out in op.outputs), None)
    parts = join.inputs if join is not None and join.kind == "CONCATENATION" else []
    part_shapes = [graph.shapes.get(p, []) for p in parts]
    if len(shape) != 3 or len(parts) != 2 or join.options.get("axis") not in (1, -2) \
            or [s[1] if len(s) == 3 else 0 for s in part_shapes] != [4, shape[1] - 4] or shape[1] < 5:
        raise ConversionError(f"--nms takes a YOLO output [1, 4 + classes, anchors] joined from boxes and scores; "
                              f"this model's output {out!r} is {shape} made by {join.kind if join else 'nothing'}",
                              "export the model with its Detect head (yolo export format=onnx), or drop --nms")
    if shape[0] not in (1, -1):
        raise ConversionError(f"--nms takes one image a call (the post-processing's batch); this model's output "
                              f"is {shape}", "export the detector for a batch of 1, or with a dynamic batch")
    if any(out in o.inputs for o in graph.ops):
        raise ConversionError(f"--nms needs the model to end at its output {out!r}, and the model reads it further",
                              "drop --nms")
    image = graph.shapes[graph.inputs[0]]
    if len(image) != 4:
        raise ConversionError(f"--nms takes a model of images; its input is {image}")
    channels_first = image[1] in (1, 3) and image[3] not in (1, 3)  # an ONNX model's NCHW, a .tflite's NHWC
    height, width = (image[2], image[3]) if channels_first else (image[1], image[2])
    anchors, classes = shape[2], shape[1] - 4
    for name in graph.shapes:  # the op takes one image a call: the batch is fixed at 1
        if graph.shapes[name] and graph.shapes[name][0] == -1:
            graph.shapes[name] = [1, *graph.shapes[name][1:]]
    boxes, scores = parts
    graph.ops.remove(join)  # nothing else reads the joined output
    new: list[Op] = []

    def const(name: str, value) -> str:
        graph.consts[PREFIX + name] = value
        return PREFIX + name

    def op(kind: str, inputs: list[str], name: str, shape: list[int], **options) -> str:
        graph.shapes[PREFIX + name] = shape
        new.append(Op(kind, inputs, [PREFIX + name], options, name=PREFIX + name))
        return PREFIX + name

    perm = const("perm", np.array([0, 2, 1], np.int32))
    box_rows = op("TRANSPOSE", [boxes, perm], "boxes", [1, anchors, 4])
    score_rows = op("TRANSPOSE", [scores, perm], "scores", [1, anchors, classes])
    size = const("one_column", np.array([1, anchors, 1], np.int32))
    cx, cy, w, h = (op("SLICE", [box_rows, const(f"from_{i}", np.array([0, 0, i], np.int32)), size], col,
                       [1, anchors, 1]) for i, col in enumerate(("cx", "cy", "w", "h")))
    hw = op("CONCATENATION", [h, w], "hw", [1, anchors, 2], axis=2, activation="NONE")
    relative = op("MUL", [hw, const("per_image", np.array([1 / height, 1 / width], np.float32))], "hw_relative",
                  [1, anchors, 2], activation="NONE")
    log_hw = op("LOG", [relative], "log_hw", [1, anchors, 2])
    encodings = op("CONCATENATION", [cy, cx, log_hw], "encodings", [1, anchors, 4], axis=2, activation="NONE")
    from flatbuffers import flexbuffers

    options = spec.options(classes, height, width)
    outs = ["detection_boxes", "detection_classes", "detection_scores", "num_detections"]
    new.append(Op("DETECTION_POSTPROCESS",
                  [encodings, score_rows, const("anchors", np.tile(np.array([[0, 0, 1, 1]], np.float32),
                                                                   (anchors, 1)))],
                  outs, {"custom": flexbuffers.Dumps(options), "score_threshold": spec.score},
                  name=CUSTOM["DETECTION_POSTPROCESS"]))
    for name, dims in zip(outs, ([1, spec.max, 4], [1, spec.max], [1, spec.max], [1])):
        graph.shapes[name] = dims
    graph.ops.extend(new)
    graph.outputs = outs
    graph.float_layers |= {o.name for o in new if o.kind in ("CONCATENATION", "MUL", "LOG")}
    graph.nms_from = [boxes, scores]


def check_feed(source_output: np.ndarray, written, graph: Graph, inputs: dict[str, np.ndarray],
               samples: int = 8) -> None:
    """The boxes and scores the float model edgeward wrote feeds its post-processing must be the
    source model's output (`source_output`, [N, 4 + classes, anchors] from onnxruntime): a misread
    layer would otherwise pass unseen, the INT8 model's detections compared with a float model's
    just as wrong. Checked on a few samples, on LiteRT's own kernels."""
    from .from_tflite import READ_BACK_TOLERANCE
    from .tflite_reader import run_keeping_tensors

    boxes, scores = graph.nms_from
    got: dict[str, list] = {}
    for _, _, _, tensors in run_keeping_tensors(written, None, inputs, lambda found: {
            i: n for i, n in found.items() if n in (boxes, scores)}, samples, limit=samples):
        for name, v in tensors.items():
            got.setdefault(name, []).append(v)
    for what, name, want in (("boxes", boxes, source_output[:, :4]), ("scores", scores, source_output[:, 4:])):
        ours = np.concatenate(got[name]).astype(np.float64)
        want = want[:len(ours)].astype(np.float64)
        err = float(np.abs(ours - want).max())
        if err > READ_BACK_TOLERANCE * max(1.0, float(np.abs(want).max(initial=0.0))):
            raise ConversionError(f"edgeward's TFLite reading of the model computes other {what} than the model: "
                                  f"they differ by {err:.4g} on the data",
                                  "report this model; convert it without --nms, or with --format onnx")

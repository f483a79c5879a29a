"""Non-maximum suppression appended to a detector (`--nms`), so the board answers with
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

`--nms mediapipe` feeds the same op from MediaPipe's SSD heads (box offsets from anchors its
graph computes, and class logits through a sigmoid), with those anchors as constants: the
same decoding, their centres instead of (0, 0). An ONNX YOLO (--format onnx) gets ONNX's own
NonMaxSuppression instead, its picks padded to the same four outputs (append_to_onnx).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agent.errors import ConversionError

from .tflite_graph import CUSTOM, Graph, Op

PREFIX = "nms/"  # the names of the tensors and ops appended
OUTPUTS = ["detection_boxes", "detection_classes", "detection_scores", "num_detections"]  # as SSD exports name them
HOW = ("yolo or mediapipe, optionally with score=, iou=, max= (and for mediapipe strides=8:16:16:16), "
       "e.g. --nms yolo,score=0.4")
DEFAULTS = {"yolo": {"score": 0.25, "iou": 0.7},  # ultralytics' conf and iou
            "mediapipe": {"score": 0.5, "iou": 0.3}}  # MediaPipe's face and palm graphs' own


@dataclass(frozen=True)
class NmsSpec:
    """What the appended suppression keeps: detections scoring at least `score`, none
    overlapping a better one of its class by more than `iou`, at most `max` of them. `kind`
    is the detector's layout; `strides`, a MediaPipe SSD's anchor strides, one per layer (its
    SsdAnchorsCalculator's: 8:16:16:16 for the face and palm detectors, 8:16:32:32:32 for pose)."""
    score: float = 0.25
    iou: float = 0.7
    max: int = 100
    kind: str = "yolo"
    strides: tuple[int, ...] = (8, 16, 16, 16)

    def output_shapes(self) -> list[list[int]]:
        """The shapes of OUTPUTS: boxes, classes, scores for `max` detections, and their count."""
        return [[1, self.max, 4], [1, self.max], [1, self.max], [1]]

    def options(self, classes: int, height: int, width: int) -> dict:
        """The op's options, as TensorFlow's converter writes them (a flexbuffer map)."""
        return {"max_detections": self.max, "max_classes_per_detection": 1, "detections_per_class": self.max,
                "use_regular_nms": False, "nms_score_threshold": self.score, "nms_iou_threshold": self.iou,
                "num_classes": classes, "y_scale": float(height), "x_scale": float(width),
                "h_scale": 1.0, "w_scale": 1.0}


def parse_nms(text: str) -> NmsSpec:
    """`--nms yolo[,score=S][,iou=I][,max=N]`, `--nms mediapipe[,...][,strides=8:16:16:16]`."""
    kind, *pairs = [p.strip() for p in text.split(",")]
    if kind not in DEFAULTS:
        raise ConversionError(f"--nms {text}: {kind!r} is not a detector layout edgeward knows", f"use {HOW}")
    values: dict = {**DEFAULTS[kind], "kind": kind}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            if key == "strides" and kind == "mediapipe":
                values[key] = tuple(int(v) for v in value.split(":"))
                if not values[key] or min(values[key]) < 1:
                    raise ValueError
            elif key in ("score", "iou"):
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
            raise ConversionError(f"--nms {text}: {pair!r} is out of range (score and iou 0..1, max 1..1000, "
                                  "strides whole numbers)", f"use {HOW}") from None
    return NmsSpec(**values)


def append_nms(graph: Graph, spec: NmsSpec) -> None:
    """Make `graph` end in TFLite_Detection_PostProcess, for batches of one image: a YOLO
    detector (one output [1, 4 + classes, anchors] joined from boxes and scores) or, with
    `--nms mediapipe`, an SSD as MediaPipe ships its face, palm and pose detectors (box
    regressors [1, anchors, 4 + keypoints] and class logits [1, anchors, classes], decoded
    against anchors its graph computes)."""
    if len(graph.inputs) != 1:
        raise ConversionError("--nms takes a detector of one image input", "drop --nms")
    image = graph.shapes[graph.inputs[0]]
    if len(image) != 4:
        raise ConversionError(f"--nms takes a model of images; its input is {image}")
    channels_first = image[1] in (1, 3) and image[3] not in (1, 3)  # an ONNX model's NCHW, a .tflite's NHWC
    height, width = (image[2], image[3]) if channels_first else (image[1], image[2])
    for name in graph.shapes:  # the op takes one image a call: the batch is fixed at 1
        if graph.shapes[name] and graph.shapes[name][0] == -1:
            graph.shapes[name] = [1, *graph.shapes[name][1:]]
    new: list[Op] = []

    def const(name: str, value) -> str:
        graph.consts[PREFIX + name] = value
        return PREFIX + name

    def op(kind: str, inputs: list[str], name: str, shape: list[int], **options) -> str:
        graph.shapes[PREFIX + name] = shape
        new.append(Op(kind, inputs, [PREFIX + name], options, name=PREFIX + name))
        return PREFIX + name

    if spec.kind == "mediapipe":
        boxes, scores, anchors, classes = _mediapipe_parts(graph, spec, height, width)
        box_rows = op("SLICE", [boxes, const("box_from", np.array([0, 0, 0], np.int32)),
                                const("box_size", np.array([1, len(anchors), 4], np.int32))],
                      "boxes", [1, len(anchors), 4])  # x, y offsets from the anchor, width, height
        score_rows = op("LOGISTIC", [scores], "scores", [1, len(anchors), classes])
    else:
        boxes, scores, anchors, classes = _yolo_parts(graph)
        perm = const("perm", np.array([0, 2, 1], np.int32))
        box_rows = op("TRANSPOSE", [boxes, perm], "boxes", [1, len(anchors), 4])  # centre x, y, width, height
        score_rows = op("TRANSPOSE", [scores, perm], "scores", [1, len(anchors), classes])
    count = len(anchors)
    size = const("one_column", np.array([1, count, 1], np.int32))
    cx, cy, w, h = (op("SLICE", [box_rows, const(f"from_{i}", np.array([0, 0, i], np.int32)), size], col,
                       [1, count, 1]) for i, col in enumerate(("cx", "cy", "w", "h")))
    hw = op("CONCATENATION", [h, w], "hw", [1, count, 2], axis=2, activation="NONE")
    relative = op("MUL", [hw, const("per_image", np.array([1 / height, 1 / width], np.float32))], "hw_relative",
                  [1, count, 2], activation="RELU")  # a negative size (a confused model's) is none: no NaN box
    positive = op("ADD", [relative, const("least", np.array([1e-6], np.float32))], "hw_positive", [1, count, 2],
                  activation="NONE")
    log_hw = op("LOG", [positive], "log_hw", [1, count, 2])
    encodings = op("CONCATENATION", [cy, cx, log_hw], "encodings", [1, count, 4], axis=2, activation="NONE")
    from flatbuffers import flexbuffers

    options = spec.options(classes, height, width)
    outs = list(OUTPUTS)
    new.append(Op("DETECTION_POSTPROCESS", [encodings, score_rows, const("anchors", anchors)],
                  outs, {"custom": flexbuffers.Dumps(options), "score_threshold": spec.score},
                  name=CUSTOM["DETECTION_POSTPROCESS"]))
    graph.shapes.update(zip(outs, spec.output_shapes()))
    graph.ops.extend(new)
    graph.outputs = outs
    graph.float_layers |= {o.name for o in new if o.kind in ("CONCATENATION", "MUL", "ADD", "LOG")}
    graph.nms_from = [boxes, scores]


def _yolo_parts(graph: Graph) -> tuple[str, str, np.ndarray, int]:
    """(boxes [1, 4, A], scores [1, C, A], anchors, C) of a YOLO output, its join removed: the
    anchors (0, 0, 1, 1) let the op's decoding pass YOLO's own boxes through."""
    out = graph.outputs[0] if len(graph.outputs) == 1 else ""
    shape = graph.shapes.get(out, [])
    join = next((op for op in graph.ops if out in op.outputs), None)
    parts = join.inputs if join is not None and join.kind == "CONCATENATION" else []
    part_shapes = [graph.shapes.get(p, []) for p in parts]
    if len(graph.outputs) != 1 or len(shape) != 3 or len(parts) != 2 or join.options.get("axis") not in (1, -2) \
            or [s[1] if len(s) == 3 else 0 for s in part_shapes] != [4, shape[1] - 4] or shape[1] < 5:
        raise ConversionError(f"--nms yolo takes a YOLO output [1, 4 + classes, anchors] joined from boxes and "
                              f"scores; this model's outputs are {[graph.shapes.get(o) for o in graph.outputs]}",
                              "export the model with its Detect head (yolo export format=onnx), or drop --nms")
    if shape[0] not in (1, -1):
        raise ConversionError(f"--nms takes one image a call (the post-processing's batch); this model's output "
                              f"is {shape}", "export the detector for a batch of 1, or with a dynamic batch")
    if any(out in o.inputs for o in graph.ops):
        raise ConversionError(f"--nms needs the model to end at its output {out!r}, and the model reads it further",
                              "drop --nms")
    graph.ops.remove(join)  # nothing else reads the joined output
    return parts[0], parts[1], np.tile(np.array([[0, 0, 1, 1]], np.float32), (shape[2], 1)), shape[1] - 4


def _mediapipe_parts(graph: Graph, spec: NmsSpec, height: int, width: int) -> tuple[str, str, np.ndarray, int]:
    """(regressors, class logits, anchors, classes) of a MediaPipe SSD. The anchors are its
    SsdAnchorsCalculator's with a fixed anchor size: one centre per cell of each stride's grid,
    repeated for each layer of that stride and each anchor a layer puts there (1 or 2, read
    off the number of boxes), and (1, 1) sizes, so that a box's offsets and size, divided by
    the input size, are the box (MediaPipe's own decoding with x_scale ... = the input size)."""
    shapes = {o: graph.shapes.get(o, []) for o in graph.outputs}
    if len(shapes) != 2 or any(len(s) != 3 or s[0] not in (1, -1) for s in shapes.values()):
        raise ConversionError(f"--nms mediapipe takes box regressors [1, anchors, 4 + keypoints] and class scores "
                              f"[1, anchors, classes]; this model's outputs are {list(shapes.values())}",
                              "drop --nms, or use --nms yolo for a YOLO")
    boxes, scores = sorted(shapes, key=lambda o: -shapes[o][2])
    count, classes = shapes[boxes][1], shapes[scores][2]
    if shapes[scores][1] != count or shapes[boxes][2] < 4 or shapes[boxes][2] == classes:
        raise ConversionError(f"--nms mediapipe cannot tell the box regressors from the class scores in "
                              f"{list(shapes.values())}", "drop --nms")
    groups: list[tuple[int, int]] = []  # (stride, layers of that stride), in order
    for stride in spec.strides:
        if groups and groups[-1][0] == stride:
            groups[-1] = (stride, groups[-1][1] + 1)
        else:
            groups.append((stride, 1))
    cells = [(-(-height // s)) * (-(-width // s)) * layers for s, layers in groups]
    per_cell = count // sum(cells) if sum(cells) and count % sum(cells) == 0 else 0
    if per_cell not in (1, 2):
        raise ConversionError(f"--nms mediapipe: {count} boxes do not fit anchors of strides "
                              f"{':'.join(map(str, spec.strides))} on a {height}x{width} input",
                              "give the strides of the model's SsdAnchorsCalculator, e.g. strides=8:16:32:32:32")
    anchors = []
    for stride, layers in groups:
        rows, cols = -(-height // stride), -(-width // stride)
        for y in range(rows):
            for x in range(cols):
                anchors += [[(y + 0.5) / rows, (x + 0.5) / cols, 1.0, 1.0]] * (layers * per_cell)
    return boxes, scores, np.array(anchors, np.float32), classes


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


def _output_dims(model, image: list[int]) -> list[int]:
    """The output's shape for one image, as onnxruntime computes it (exporters often leave it
    symbolic: torch.onnx names every axis of a decoded output)."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        feed = session.get_inputs()[0]
        dtype = np.uint8 if "uint8" in feed.type else np.float32
        return list(session.run(None, {feed.name: np.zeros(image, dtype)})[0].shape)
    except Exception:  # onnxruntime's own types: a model that does not run on one image has no YOLO output
        return []


def append_to_onnx(model, spec: NmsSpec):
    """The same for an ONNX YOLO (--format onnx): ONNX's own NonMaxSuppression on each anchor's
    best class, its picks gathered and padded to `max` rows, so the ONNX bundle answers with the
    same four outputs as the TFLite one (boxes as fractions of the image, ymin first). The model
    is fixed to batches of one image; the appended nodes (named nms/...) stay in float."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if spec.kind != "yolo":
        raise ConversionError(f"--nms {spec.kind} is for the .tflite files MediaPipe ships", "add --format tflite")
    g = model.graph
    if len(g.output) != 1 or len(g.input) - len({i.name for i in g.initializer} & {i.name for i in g.input}) != 1:
        raise ConversionError("--nms takes a YOLO detector: one image in, one [1, 4 + classes, anchors] out",
                              "export the model with its Detect head (yolo export format=onnx), or drop --nms")
    out = g.output[0]
    image = next(i for i in g.input if i.name not in {t.name for t in g.initializer})
    idims = [d.dim_value if d.HasField("dim_value") else -1 for d in image.type.tensor_type.shape.dim]
    dims = _output_dims(model, [1, *idims[1:]]) if len(idims) == 4 and min(idims[1:]) > 0 else []
    if len(dims) != 3 or dims[1] < 5 or dims[2] < 1 or dims[0] not in (1, -1) or len(idims) != 4 \
            or idims[2] < 1 or idims[3] < 1:
        raise ConversionError(f"--nms takes a YOLO output [1, 4 + classes, anchors] from images [1, 3, H, W]; this "
                              f"model's output {out.name!r} is {dims}, its input {idims}",
                              "export the model with its Detect head and a fixed image size, or drop --nms")
    classes, height, width = dims[1] - 4, idims[2], idims[3]
    for vi in (image, out):  # one image a call
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    nodes, consts = [], []

    def const(name: str, value: np.ndarray) -> str:
        consts.append(numpy_helper.from_array(value, PREFIX + name))
        return PREFIX + name

    def node(kind: str, inputs: list[str], name: str, output: str | None = None, **attrs) -> str:
        """A node named nms/NAME, its output nms/NAME (or `output`, for a model output)."""
        nodes.append(helper.make_node(kind, inputs, [output or PREFIX + name], name=PREFIX + name, **attrs))
        return output or PREFIX + name

    y, axis1 = out.name, const("axis1", np.array([1], np.int64))
    boxes = node("Slice", [y, const("b0", np.array([0], np.int64)), const("b1", np.array([4], np.int64)), axis1],
                 "boxes")
    scores = node("Slice", [y, const("s0", np.array([4], np.int64)), const("s1", np.array([4 + classes], np.int64)),
                            axis1], "scores")
    rows = node("Transpose", [boxes], "box_rows", perm=[0, 2, 1])  # [1, A, 4]: cx, cy, w, h
    corners = np.array([[0, 1, 0, 1], [1, 0, 1, 0], [0, -0.5, 0, 0.5], [-0.5, 0, 0.5, 0]], np.float32)
    corners = corners * np.array([1 / height, 1 / width, 1 / height, 1 / width], np.float32)
    boxes_yx = node("MatMul", [rows, const("to_corners", corners)], "corners")  # ymin, xmin, ymax, xmax
    if opset >= 18:
        best = node("ReduceMax", [scores, const("axes", np.array([1], np.int64))], "best", keepdims=1)
    else:
        best = node("ReduceMax", [scores], "best", axes=[1], keepdims=1)  # [1, 1, A]
    cls = node("ArgMax", [scores], "class", axis=1, keepdims=0)  # [1, A]
    picked = node("NonMaxSuppression", [boxes_yx, best, const("max", np.array([spec.max], np.int64)),
                                        const("iou", np.array([spec.iou], np.float32)),
                                        const("score", np.array([spec.score], np.float32))], "picked")
    index = node("Gather", [picked, const("col2", np.array(2, np.int64))], "index", axis=1)  # [K]
    zero = const("zero", np.array(0, np.int64))
    kept_boxes = node("Gather", [node("Gather", [boxes_yx, zero], "boxes0", axis=0), index], "kept_boxes", axis=0)
    flat_best = node("Reshape", [best, const("flat", np.array([-1], np.int64))], "best_flat")
    kept_scores = node("Gather", [flat_best, index], "kept_scores", axis=0)
    kept_class = node("Cast", [node("Gather", [node("Gather", [cls, zero], "class0", axis=0), index],
                                    "kept_class_i", axis=0)], "kept_class", to=TensorProto.FLOAT)
    count = node("Shape", [index], "count_i")  # [1]: K
    missing = node("Sub", [const("max_rows", np.array([spec.max], np.int64)), count], "missing")
    z1 = const("z1", np.array([0], np.int64))
    pads2 = node("Concat", [z1, z1, missing, z1], "pads2", axis=0)  # [K, 4] -> [max, 4]
    pads1 = node("Concat", [z1, missing], "pads1", axis=0)  # [K] -> [max]
    axis0 = const("axis0", np.array([0], np.int64))

    def batch_of_one(x: str, output: str) -> str:  # [max, ...] -> [1, max, ...], a model output
        if opset >= 13:
            return node("Unsqueeze", [x, axis0], output, output)
        return node("Unsqueeze", [x], output, output, axes=[0])

    # the outputs by the names (OUTPUTS) and in the order the TFLite form gives them
    batch_of_one(node("Pad", [kept_boxes, pads2], "boxes_padded"), OUTPUTS[0])
    batch_of_one(node("Pad", [kept_class, pads1], "classes_padded"), OUTPUTS[1])
    batch_of_one(node("Pad", [kept_scores, pads1], "scores_padded"), OUTPUTS[2])
    node("Cast", [count], OUTPUTS[3], OUTPUTS[3], to=TensorProto.FLOAT)
    g.node.extend(nodes)
    g.initializer.extend(consts)
    del g.output[:]
    g.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)
                    for name, dims in zip(OUTPUTS, spec.output_shapes()))
    del g.value_info[:]  # shapes inferred for a free batch no longer hold
    onnx.checker.check_model(model)
    return model

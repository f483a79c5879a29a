"""A float .tflite file -> the TFLite op graph, and calibration ranges from running it in LiteRT.

This is how a float TFLite model (yours, or one TensorFlow's converter made from a
Keras/SavedModel model) becomes full-integer INT8: the graph is read op by op into
`tflite_graph.Graph`, calibrated by running the float model with every intermediate
tensor kept, and written again by `write_tflite` with int8 tensors. Tensor names and
the model's I/O stay as they were, so callers see the same inputs and outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from agent.errors import ConversionError, first_line

from .data import Labels, parse_labels
from .subpixel import transpose_convs_as_subpixel
from .tflite_graph import CUSTOM, SUPPORTED, Graph, Op
from .tflite_simplify import readers, simplify

UNREAD_FIX = ("export the model from its framework to ONNX and convert that (--format onnx or tflite), or replace "
              "the layer")
"""What a user can do about a TFLite source edgeward cannot read: every form of it, --precision fp32
included, is written from the graph read, so only another source helps."""

PERCENTILE = 99.999  # the share of values the percentile method keeps inside the range
_SAMPLES_PER_TENSOR = 200_000


def _schema():
    from ai_edge_litert import schema_py_generated as s

    return s


def _names(obj) -> dict[int, str]:
    return {v: k for k, v in vars(obj).items() if not k.startswith("_")}


def read_tflite(path: str | Path, cut_at: list[str] | None = None) -> tuple[Graph, dict[int, str]]:
    """(graph, tensor index -> graph name) for a float .tflite model, ending at the tensors
    `cut_at` names where given (`--cut-at`: they become its outputs, what only led elsewhere is
    dropped, a detector's post-processing op among it). A file whose structure is damaged
    (indices out of range, missing fields) is one ConversionError, never a traceback."""
    try:
        return _read(path, cut_at or [])
    except ConversionError:
        raise
    except Exception as exc:  # a flatbuffer parses lazily: damage shows up wherever it is read
        raise ConversionError(f"{path} is not a readable TFLite model ({exc.__class__.__name__}: "
                              f"{first_line(exc)})", "give a .tflite file written by a TFLite converter") from exc


def _needed_ops(sub, names: dict[int, str], cut_at: list[str]) -> set[int]:
    """The indices of the ops the tensors `cut_at` are computed from."""
    import difflib

    index = {name: i for i, name in names.items()}
    for name in cut_at:
        if name not in index:
            near = difflib.get_close_matches(name, list(index), n=3, cutoff=0.5)
            raise ConversionError(f"--cut-at {name}: the model has no tensor {name!r}",
                                  f"name a tensor{' such as ' + ', '.join(near) if near else ''} (Netron shows them)")
    producer = {t: k for k, op in enumerate(sub.operators) for t in (op.outputs if op.outputs is not None else [])}
    needed, todo = set(), [index[name] for name in cut_at]
    while todo:
        k = producer.get(todo.pop())
        if k is not None and k not in needed:
            needed.add(k)
            todo.extend(i for i in (sub.operators[k].inputs if sub.operators[k].inputs is not None else []) if i >= 0)
    return needed


def _read(path: str | Path, cut_at: list[str]) -> tuple[Graph, dict[int, str]]:
    s = _schema()
    path = Path(path)
    try:
        buf = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConversionError(f"{path}: no such file") from exc
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise ConversionError(f"{path} is not a TFLite model (no TFL3 identifier)",
                              "give a .tflite file written by a TFLite converter")
    try:
        model = s.ModelT.InitFromPackedBuf(buf, 0)
    except Exception as exc:
        raise ConversionError(f"{path} is not a readable TFLite model ({first_line(exc)})") from exc
    if not model.subgraphs or not model.subgraphs[0].tensors or not model.buffers:
        raise ConversionError(f"{path} is not a readable TFLite model (no graph in it)",
                              "give a .tflite file written by a TFLite converter")
    if len(model.subgraphs) != 1:
        raise ConversionError(f"{path.name} has {len(model.subgraphs)} subgraphs (control flow)",
                              "edgeward reads single-graph models; " + UNREAD_FIX)
    sub = model.subgraphs[0]
    ops_by_code, types = _names(s.BuiltinOperator), _names(s.TensorType)
    pads, acts = _names(s.Padding), _names(s.ActivationFunctionType)

    def decode(b):
        return b.decode() if isinstance(b, bytes) else str(b)

    def kind_of(op) -> str:  # files from older converters fill only the deprecated field
        code = model.operatorCodes[op.opcodeIndex]
        return ops_by_code.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")

    # constants stored sparse, and what a DENSIFY makes of them, are constants too
    densified = {op.outputs[0] for op in sub.operators if op.inputs is not None and len(op.inputs) == 1
                 and kind_of(op) == "DENSIFY" and sub.tensors[op.inputs[0]].sparsity is not None}
    taken: dict[str, int] = {}
    names: dict[int, str] = {}
    for sig in (model.signatureDefs or [])[:1]:  # I/O named as the signature names them ("pixels", not
        for m in list(sig.inputs or []) + list(sig.outputs or []):  # "serving_default_pixels:0")
            if decode(m.name) not in taken:
                names[m.tensorIndex] = decode(m.name)
                taken[decode(m.name)] = m.tensorIndex
    for i, t in enumerate(sub.tensors):
        if i in names:
            name = names[i]
        else:
            name = decode(t.name) or f"tensor{i}"
        if taken.get(name, i) != i:
            name = f"{name}#{i}"
        taken[name] = i
        names[i] = name
        kind = types[t.type]
        has_data = t.buffer < len(model.buffers) and model.buffers[t.buffer].data is not None \
            and len(model.buffers[t.buffer].data)
        if kind not in ("FLOAT32", "INT32") and not (kind == "FLOAT16" and (has_data or i in densified)):
            raise ConversionError(f"{path.name} is already quantized or holds {kind.lower()} tensors ({name!r})",
                                  "give the float (FP32) .tflite model; edgeward quantizes it itself")

    graph = Graph(inputs=[names[i] for i in sub.inputs], outputs=list(cut_at) or [names[i] for i in sub.outputs])
    needed = _needed_ops(sub, names, cut_at) if cut_at else None
    dtypes = {"FLOAT32": np.float32, "INT32": np.int32, "FLOAT16": np.float16}
    for i, t in enumerate(sub.tensors):
        data = model.buffers[t.buffer].data if t.buffer < len(model.buffers) else None
        shape = list(t.shapeSignature) if t.shapeSignature is not None and len(t.shapeSignature) else list(t.shape)
        if data is not None and len(data):
            raw = np.frombuffer(bytes(np.asarray(data, np.uint8)), dtypes[types[t.type]])
            raw = _densify(raw, list(t.shape), t.sparsity, names[i]) if t.sparsity is not None else raw.reshape(t.shape)
            graph.consts[names[i]] = raw.astype(np.float32) if raw.dtype == np.float16 else raw.copy()
        else:
            graph.shapes[names[i]] = [int(d) for d in shape]
    # float16 weights (TFLite's "float16 quantization": MediaPipe's models, for one) reach their
    # layers through a DEQUANTIZE each: its output is that constant in float32
    halves = {names[i] for i, t in enumerate(sub.tensors) if types[t.type] == "FLOAT16"}

    # Shape arithmetic (SHAPE -> STRIDED_SLICE -> PACK, as Keras' Flatten writes it for a dynamic
    # batch) only feeds RESHAPE's shape input: it is dropped, and RESHAPE takes its output's static
    # shape (-1 on the batch axis) instead.
    computed_int = {names[i] for i, t in enumerate(sub.tensors)
                    if types[t.type] == "INT32" and names[i] not in graph.consts}
    for k, op in enumerate(sub.operators):
        kind = kind_of(op)
        if needed is not None and k not in needed:  # past --cut-at
            continue
        if op.outputs is not None and len(op.outputs) and all(names[i] in computed_int for i in op.outputs):
            continue
        if kind in ("DEQUANTIZE", "DENSIFY") and op.inputs is not None and len(op.inputs) == 1 \
                and names[op.inputs[0]] in graph.consts and (kind == "DENSIFY" or names[op.inputs[0]] in halves):
            out = names[op.outputs[0]]  # a constant's float32 or dense form: the constant itself
            graph.consts[out] = graph.consts[names[op.inputs[0]]]
            graph.shapes.pop(out, None)
            continue
        for pos, i in enumerate(op.inputs if op.inputs is not None else []):
            if i >= 0 and names[i] in computed_int and not (kind == "RESHAPE" and pos == 1):
                raise ConversionError(f"TFLite op {kind} (op {k}) takes a computed integer tensor",
                                      UNREAD_FIX)
        if kind in ("EXPAND_DIMS", "SQUEEZE"):  # a RESHAPE to the output's shape (Keras' Conv1D expands so)
            graph.ops.append(_as_reshape(graph, names[op.inputs[0]], names[op.outputs[0]], kind, k))
            continue
        if kind == "STRIDED_SLICE":  # with steps of 1 it is a SLICE (MediaPipe crops channels so)
            graph.ops.append(_strided_as_slice(graph, op, names, k))
            continue
        if kind in ("SPLIT", "SPLIT_V", "UNPACK"):  # a recurrent layer's gates and steps, as SLICEs
            graph.ops.extend(_split_as_slices(graph, kind, op, names, k))
            continue
        if kind == "PACK":  # a recurrent layer's steps stacked: CONCATENATION, then RESHAPE
            graph.ops.extend(_pack_as_concatenation(graph, op, names, k))
            continue
        if kind == "CUSTOM":  # named by its code: MediaPipe's Convolution2DTransposeBias, for one
            custom = model.operatorCodes[op.opcodeIndex].customCode
            custom = custom.decode() if isinstance(custom, bytes) else custom
            if custom == "Convolution2DTransposeBias" and op.customOptions is not None:
                graph.ops.append(_transpose_conv_bias(graph, op, names, k))
                continue
            if custom == CUSTOM["DETECTION_POSTPROCESS"] and op.customOptions is not None:
                graph.ops.append(_detection_postprocess(graph, sub, op, names, k))
                continue
            before = " ".join(f"--cut-at {names[i]}" for i in (op.inputs if op.inputs is not None else [])
                              if i >= 0 and names[i] not in graph.consts)
            raise ConversionError(f"TFLite custom op {custom or '?'} (op {k}) has no form in edgeward's writer (and "
                                  "most custom ops, MediaPipe's among them, none in stock LiteRT either)",
                                  f"end the model before it with {before} and do its work on the board, or run the "
                                  "model with the framework that defines the op")
        if kind in _DILATION_STEPS:  # a dilated Conv1D's, for a batch of any size: read, then rewritten
            graph.ops.append(Op(kind, [names[i] for i in op.inputs], [names[op.outputs[0]]], {}, f"{kind.lower()}_{k}"))
            continue
        if kind not in SUPPORTED:
            raise ConversionError(f"TFLite op {kind} (op {k}) is not supported by edgeward's INT8 writer",
                                  UNREAD_FIX)
        o = op.builtinOptions
        options: dict = {}
        if o is not None:
            if hasattr(o, "padding"):
                options["padding"] = pads[o.padding]
            if hasattr(o, "strideH"):
                options["stride"] = (o.strideH, o.strideW)
            if hasattr(o, "filterHeight"):
                options["filter"] = (o.filterHeight, o.filterWidth)
            if hasattr(o, "dilationHFactor"):
                options["dilation"] = (o.dilationHFactor, o.dilationWFactor)
            if hasattr(o, "fusedActivationFunction"):
                options["activation"] = acts[o.fusedActivationFunction]
            if hasattr(o, "depthMultiplier"):
                options["depth_multiplier"] = o.depthMultiplier
            if kind == "CONCATENATION":
                options["axis"] = o.axis
            if hasattr(o, "keepDims"):
                options["keep_dims"] = bool(o.keepDims)
            if hasattr(o, "beta"):
                options["beta"] = o.beta
            if kind in ("RESIZE_NEAREST_NEIGHBOR", "RESIZE_BILINEAR"):
                options["align_corners"], options["half_pixel_centers"] = bool(o.alignCorners), bool(o.halfPixelCenters)
            if kind == "DEPTH_TO_SPACE":
                options["block_size"] = int(o.blockSize)
            if kind == "MIRROR_PAD":
                options["mode"] = _names(_schema().MirrorPadMode)[o.mode]
            if kind == "LEAKY_RELU":
                options["alpha"] = float(o.alpha)
            if kind == "BATCH_MATMUL":  # Q Kᵀ may be written with K's transpose as an option
                options["adj_x"], options["adj_y"] = bool(o.adjX), bool(o.adjY)
            if kind == "GELU":
                options["approximate"] = bool(o.approximate)
            if getattr(o, "keepNumDims", False):  # a Keras Dense on tokens: [N, T, D] -> [N, T, E]
                options["keep_num_dims"] = True
        inputs = [names[i] if i >= 0 else "" for i in op.inputs]
        if kind in ("LEAKY_RELU", "DEPTH_TO_SPACE") and o is None:
            raise ConversionError(f"{kind} op {k} has no options", UNREAD_FIX)
        if kind == "TRANSPOSE_CONV":  # TFLite's order (output shape, weights, input, bias) -> the graph's
            if options.get("activation", "NONE") != "NONE":
                raise ConversionError(f"TRANSPOSE_CONV op {k} has a fused activation",
                                      UNREAD_FIX)
            inputs = [inputs[2], inputs[1], inputs[3] if len(inputs) > 3 else "", inputs[0]]
        if kind == "RESHAPE":
            shape = graph.consts.get(inputs[1]) if len(inputs) > 1 and inputs[1] else None
            if shape is None and len(inputs) > 1 and inputs[1] in computed_int:
                static = graph.shapes[names[op.outputs[0]]]
                shape = np.array(static, np.int32) if sum(d == -1 for d in static) <= 1 else None
                inputs = inputs[:1]
            written = getattr(o, "newShape", None)  # a numpy array when the file has one
            new_shape = shape if shape is not None else np.array([] if written is None else written, np.int32)
            if not len(new_shape):
                raise ConversionError(f"RESHAPE op {k} has a computed shape", UNREAD_FIX)
            options["new_shape"] = np.asarray(new_shape, np.int32)
            if len(inputs) < 2 or not inputs[1]:
                graph.consts[f"op{k}/shape"] = options["new_shape"]
                inputs = [inputs[0], f"op{k}/shape"]
        if kind in ("MAX_POOL_2D", "AVERAGE_POOL_2D") and options.get("activation", "NONE") != "NONE":
            raise ConversionError(f"{kind} op {k} has a fused activation", UNREAD_FIX)
        if kind in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV"):
            if inputs[1] not in graph.consts or (len(inputs) > 2 and inputs[2] and inputs[2] not in graph.consts):
                raise ConversionError(f"{kind} op {k} has computed (non-constant) weights",
                                      UNREAD_FIX)
        graph.ops.append(Op(kind, inputs, [names[i] for i in op.outputs], options, name=f"{kind.lower()}_{k}"))
    _layer_norms_in_float(graph)
    transpose_convs_as_subpixel(graph)
    _dilated_conv1ds(graph)
    left = next((op for op in graph.ops if op.kind in _DILATION_STEPS), None)
    if left is not None:
        raise ConversionError(f"TFLite op {left.kind} ({left.name}) is not supported by edgeward's INT8 writer "
                              "(only as a dilated Conv1D's)", UNREAD_FIX)
    return simplify(graph), names


_DILATION_STEPS = ("SPACE_TO_BATCH_ND", "BATCH_TO_SPACE_ND")


def _dilated_conv1ds(graph: Graph) -> None:
    """A dilated Conv1D as TensorFlow writes it for a batch of any size (WaveNet-style and TCN
    audio models): SPACE_TO_BATCH_ND by the dilation, the conv as a plain 1xk CONV_2D between
    two RESHAPEs, BATCH_TO_SPACE_ND back. It is the conv with that dilation, after a PAD by the
    first op's paddings, and a crop by the last one's: written so, the batch stays free and every
    op runs in XNNPACK. Each tensor kept holds the values it held (rearranged), so its range from
    the source file still holds; the rest are refused (read_tflite)."""
    users = readers(graph)

    def only_reader(t: str, kind: str) -> Op | None:
        found = users.get(t, [])
        return found[0] if len(found) == 1 and found[0].kind == kind and t not in graph.outputs else None

    for s2b in [op for op in graph.ops if op.kind == "SPACE_TO_BATCH_ND"]:
        x, block, pads = s2b.inputs
        expand = only_reader(s2b.outputs[0], "RESHAPE")
        conv = expand and only_reader(expand.outputs[0], "CONV_2D")
        squeeze = conv and only_reader(conv.outputs[0], "RESHAPE")
        b2s = squeeze and only_reader(squeeze.outputs[0], "BATCH_TO_SPACE_ND")
        shape = graph.shapes.get(x, [])
        if not b2s or len(shape) != 3 or block not in graph.consts or pads not in graph.consts \
                or b2s.inputs[1] not in graph.consts or b2s.inputs[2] not in graph.consts:
            continue
        b, (p0, p1) = graph.consts[block].reshape(-1), graph.consts[pads].reshape(-1)
        crops = graph.consts[b2s.inputs[2]].reshape(-1)
        kh, kw = graph.consts[conv.inputs[1]].shape[1:3]
        o = conv.options
        if b.size != 1 or crops.size != 2 or np.any(graph.consts[b2s.inputs[1]].reshape(-1) != b) or kh != 1 \
                or o.get("padding") != "VALID" or tuple(o.get("stride", (1, 1))) != (1, 1) \
                or tuple(o.get("dilation", (1, 1))) != (1, 1) or graph.shapes[expand.outputs[0]][1] != 1:
            continue
        n, t, c = shape
        b, tp = int(b[0]), t + int(p0) + int(p1)
        tq, out_c = tp - (kw - 1) * b, graph.consts[conv.inputs[1]].shape[0]
        ops: list[Op] = []
        if p0 or p1:
            graph.consts[f"{conv.name}/dilated/paddings"] = np.array([[0, 0], [p0, p1], [0, 0]], np.int32)
            graph.shapes[f"{conv.name}/dilated/padded"] = [n, tp, c]
            ops.append(Op("PAD", [x, f"{conv.name}/dilated/paddings"], [f"{conv.name}/dilated/padded"], {}, conv.name))
            x = f"{conv.name}/dilated/padded"
        y = b2s.outputs[0]
        cropped = bool(crops[0] or crops[1])
        for name, new_shape in ((expand.outputs[0], [n, 1, tp, c]), (conv.outputs[0], [n, 1, tq, out_c]),
                                (squeeze.outputs[0] if cropped else y, [n, tq, out_c])):
            graph.shapes[name] = new_shape
        for r, target in ((expand, [n, 1, tp, c]), (squeeze, [n, tq, out_c])):
            graph.consts[f"{r.name}/dilated/shape"] = np.array(target, np.int32)
            r.inputs = [r.inputs[0], f"{r.name}/dilated/shape"]
            r.options = {"new_shape": np.array(target, np.int32)}
        expand.inputs[0] = x
        conv.options = {**o, "dilation": (1, b)}
        if cropped:
            graph.consts[f"{conv.name}/dilated/begin"] = np.array([0, crops[0], 0], np.int32)
            graph.consts[f"{conv.name}/dilated/size"] = np.array([-1, tq - crops[0] - crops[1], out_c], np.int32)
            crop = Op("SLICE", [squeeze.outputs[0], f"{conv.name}/dilated/begin", f"{conv.name}/dilated/size"], [y],
                      {}, conv.name)
        else:
            graph.shapes.pop(squeeze.outputs[0], None)
            squeeze.outputs = [y]
        graph.shapes.pop(s2b.outputs[0], None)
        at = graph.ops.index(s2b)
        graph.ops[at:at + 1] = ops
        at = graph.ops.index(b2s)
        graph.ops[at:at + 1] = [crop] if cropped else []


def _as_reshape(graph: Graph, x: str, y: str, kind: str, k: int) -> Op:
    """EXPAND_DIMS or SQUEEZE as the RESHAPE it is: to y's shape as the file holds it, the batch
    (or any one free axis) as -1."""
    shape = graph.shapes[y]
    if sum(d < 0 for d in shape) > 1:
        raise ConversionError(f"{kind} op {k} has more than one free axis in its output {shape}", UNREAD_FIX)
    graph.consts[f"op{k}/shape"] = np.array(shape, np.int32)
    return Op("RESHAPE", [x, f"op{k}/shape"], [y], {"new_shape": np.array(shape, np.int32)},
              name=f"{kind.lower()}_{k}")


def _transpose_conv_bias(graph: Graph, op, names: dict[int, str], k: int) -> Op:
    """MediaPipe's custom Convolution2DTransposeBias (its selfie segmenter's last upsampling) as
    the TRANSPOSE_CONV with a bias it is: inputs (x, weights [cout, kh, kw, cin], bias); its
    options are a C struct of padding (1 SAME, 2 VALID), stride width, stride height."""
    import struct

    raw = bytes(np.asarray(op.customOptions, np.uint8))
    if len(raw) < 12 or op.inputs is None or len(op.inputs) != 3:
        raise ConversionError(f"custom op Convolution2DTransposeBias (op {k}) is not in MediaPipe's form", UNREAD_FIX)
    padding, stride_w, stride_h = struct.unpack("<iii", raw[:12])
    x, w, b = (names[i] for i in op.inputs)
    y = names[op.outputs[0]]
    if min(stride_w, stride_h) < 1:
        raise ConversionError(f"custom op Convolution2DTransposeBias (op {k}) has strides {stride_h}x{stride_w}",
                              UNREAD_FIX)
    if w not in graph.consts or b not in graph.consts or padding not in (1, 2) or min(graph.shapes[y][1:3]) <= 0:
        raise ConversionError(f"custom op Convolution2DTransposeBias (op {k}) has computed weights or shapes",
                              UNREAD_FIX)
    shape = f"op{k}/output_shape"
    graph.consts[shape] = np.array([max(graph.shapes[y][0], 1), *graph.shapes[y][1:]], np.int32)
    return Op("TRANSPOSE_CONV", [x, w, b, shape], [y], {"padding": "SAME" if padding == 1 else "VALID",
                                                        "stride": (stride_h, stride_w)}, name=f"transpose_conv_{k}")


def _detection_postprocess(graph: Graph, sub, op, names: dict[int, str], k: int) -> Op:
    """An SSD's TFLite_Detection_PostProcess (box decoding against its anchors, then non-max
    suppression), which stock LiteRT and tflite-runtime register: kept as it is, in float, at the
    end of the INT8 model, so a bundle answers with boxes, classes, scores and their count as the
    float model did. Its options (a flexbuffer of thresholds and scales) travel as read. It must
    end the model: its inputs are the box encodings, the class scores and constant anchors, and
    only the model's outputs read what it writes."""
    ins = [names[i] for i in (op.inputs if op.inputs is not None else [])]
    outs = [names[i] for i in (op.outputs if op.outputs is not None else [])]
    name = CUSTOM["DETECTION_POSTPROCESS"]
    if len(ins) != 3 or len(outs) != 4 or ins[2] not in graph.consts or ins[0] in graph.consts \
            or ins[1] in graph.consts:
        raise ConversionError(f"custom op {name} (op {k}) is not in the form TensorFlow writes (box encodings, "
                              "class scores, constant anchors in; boxes, classes, scores, count out)", UNREAD_FIX)
    read = {names[i] for o in sub.operators if o is not op for i in (o.inputs if o.inputs is not None else [])
            if i >= 0}
    model_outputs = {names[i] for i in sub.outputs}
    if any(t in read or t not in model_outputs for t in outs):
        raise ConversionError(f"custom op {name} (op {k}) does not end the model: other ops read its detections",
                              f"end the model before it with --cut-at {ins[0]} --cut-at {ins[1]} and decode the "
                              "boxes on the board")
    if any(graph.shapes.get(n, [0])[0] not in (1, -1) for n in ins[:2]):
        raise ConversionError(f"custom op {name} (op {k}) reads a batch of more than one image",
                              "export the detector for batches of one image, as TensorFlow's detection API does")
    raw = bytes(np.asarray(op.customOptions, np.uint8))
    try:
        from flatbuffers import flexbuffers

        options = flexbuffers.Loads(raw)
        threshold = float(options["nms_score_threshold"])
    except Exception as exc:  # bytes from the file
        raise ConversionError(f"custom op {name} (op {k}) has options edgeward cannot read ({first_line(exc)})",
                              UNREAD_FIX) from exc
    return Op("DETECTION_POSTPROCESS", ins, outs, {"custom": raw, "score_threshold": threshold},
              name=f"detection_postprocess_{k}")


def _layer_norms_in_float(graph: Graph) -> None:
    """Keep each LayerNorm in float (Graph.float_layers), as the ONNX path does, in the form
    TensorFlow writes it: mean = MEAN(x); var = MEAN(SQUARED_DIFFERENCE(x, mean));
    RSQRT(var + eps); then MULs, a NEG and ADDs that scale, centre and shift.
    The layer is every op from the first MEAN on that reads only x, constants and the layer's
    own tensors; its ops share one name, so the manifest counts it once."""
    producer = {out: op for op in graph.ops for out in op.outputs}

    def made_by(name: str, *kinds: str):
        op = producer.get(name)
        return op if op is not None and op.kind in kinds else None

    def data_inputs(op: Op) -> list[str]:
        return [n for n in op.inputs if n and n not in graph.consts]

    for n, rsqrt in enumerate([op for op in graph.ops if op.kind == "RSQRT"]):
        shift = made_by(rsqrt.inputs[0], "ADD")
        var = shift and len(data_inputs(shift)) == 1 and made_by(data_inputs(shift)[0], "MEAN")
        square = var and made_by(var.inputs[0], "SQUARED_DIFFERENCE")
        mean = square and made_by(square.inputs[1], "MEAN")
        if not mean or mean.inputs[0] != square.inputs[0]:
            continue
        x, steps = square.inputs[0], [mean, square, var, shift, rsqrt]
        inside = {out for op in steps for out in op.outputs}
        for op in graph.ops[graph.ops.index(mean):]:
            ins = data_inputs(op)
            if op not in steps and op.kind in ("MUL", "ADD", "SUB", "NEG") and ins and \
                    set(ins) <= inside | {x} and set(ins) & inside:
                steps.append(op)
                inside.update(op.outputs)
        name = f"layer_norm_{n}"
        for op in steps:
            op.name = name
        graph.float_layers.add(name)


def _strided_as_slice(graph: Graph, op, names: dict[int, str], k: int) -> Op:
    """A STRIDED_SLICE whose strides are all 1, with no axes added, dropped or elided, as the SLICE
    it is: begin and size constants (begin_mask: from 0; end_mask: to the end)."""
    x, y = names[op.inputs[0]], names[op.outputs[0]]
    parts = [graph.consts.get(names[i]) for i in op.inputs[1:4]]
    o = op.builtinOptions
    if any(p is None for p in parts) or o is None or o.ellipsisMask or o.newAxisMask or o.shrinkAxisMask \
            or getattr(o, "offset", False) or np.any(parts[2] != 1):
        raise ConversionError(f"TFLite op STRIDED_SLICE (op {k}) is not a plain slice (steps other than 1, or axes "
                              "added, dropped or elided)", UNREAD_FIX)
    shape = graph.shapes[x]
    begin, size = [], []
    for axis, (b, e) in enumerate(zip(parts[0].tolist(), parts[1].tolist())):
        dim = shape[axis]
        b = 0 if o.beginMask >> axis & 1 else b
        if axis == 0 and dim < 0 and b != 0:
            raise ConversionError(f"TFLite op STRIDED_SLICE (op {k}) slices the free batch axis",
                                  UNREAD_FIX)
        if o.endMask >> axis & 1 or (dim > 0 and e >= dim) or (axis == 0 and dim < 0):  # the batch: whole
            end = -1
        elif dim > 0 or e >= 0:
            end = e + dim if e < 0 else e
        else:
            raise ConversionError(f"TFLite op STRIDED_SLICE (op {k}) ends relative to an axis of unknown size",
                                  UNREAD_FIX)
        b = b + dim if b < 0 and dim > 0 else b
        begin.append(b)
        size.append(-1 if end == -1 else end - b)
    graph.consts[f"op{k}/begin"], graph.consts[f"op{k}/size"] = np.array(begin, np.int32), np.array(size, np.int32)
    return Op("SLICE", [x, f"op{k}/begin", f"op{k}/size"], [y], {}, name=f"strided_slice_{k}")


def _split_as_slices(graph: Graph, kind: str, op, names: dict[int, str], k: int) -> list[Op]:
    """SPLIT (axis, x), SPLIT_V (x, sizes, axis) and UNPACK (x; options: axis) as one SLICE per
    part, which keeps the input's int8 scale; an UNPACK's parts then lose their axis (RESHAPE).
    TensorFlow writes an unrolled Keras LSTM or GRU with them: the steps taken apart, each step's
    gates cut from one projection."""
    ins = [names[i] if i >= 0 else "" for i in op.inputs]
    o = op.builtinOptions
    if kind == "SPLIT":
        axis_name, x = ins[0], ins[1]
    elif kind == "SPLIT_V":
        x, axis_name = ins[0], ins[2]
    else:
        x, axis_name = ins[0], None
    if axis_name is not None and axis_name not in graph.consts:
        raise ConversionError(f"TFLite op {kind} (op {k}) splits along a computed axis", UNREAD_FIX)
    shape = graph.shapes[x]
    axis = int(graph.consts[axis_name].reshape(-1)[0]) if axis_name is not None else int(getattr(o, "axis", 0))
    axis = axis + len(shape) if axis < 0 else axis
    outs = [names[i] for i in op.outputs]
    if kind == "SPLIT_V":
        sizes = [int(v) for v in graph.consts[ins[1]].reshape(-1)] if ins[1] in graph.consts else None
    else:
        sizes = [shape[axis] // len(outs)] * len(outs) if shape[axis] > 0 else None
    if sizes is None or -1 in sizes or sum(sizes) != shape[axis] or (axis == 0 and shape[0] < 0):
        raise ConversionError(f"TFLite op {kind} (op {k}) splits an axis of unknown size or the free batch",
                              UNREAD_FIX)
    ops, start = [], 0
    for n, (y, size) in enumerate(zip(outs, sizes)):
        begin = [start if a == axis else 0 for a in range(len(shape))]
        cut = [size if a == axis else (-1 if d < 0 else d) for a, d in enumerate(shape)]
        part = f"{y}/part" if kind == "UNPACK" else y
        graph.consts[f"op{k}/begin{n}"], graph.consts[f"op{k}/size{n}"] = np.array(begin, np.int32), np.array(cut, np.int32)
        if kind == "UNPACK":  # (the part holds the values of the file's output: calibrated as it)
            graph.shapes[part] = [size if a == axis else d for a, d in enumerate(shape)]
            graph.derived[part] = (y, 1.0, 0.0, -np.inf, np.inf)
        ops.append(Op("SLICE", [x, f"op{k}/begin{n}", f"op{k}/size{n}"], [part], {}, name=f"{kind.lower()}_{k}"))
        if kind == "UNPACK":
            ops.append(_as_reshape(graph, part, y, f"{kind}_part{n}", k))
        start += size
    return ops


def _pack_as_concatenation(graph: Graph, op, names: dict[int, str], k: int) -> list[Op]:
    """PACK (tensors of one shape stacked along a new axis) as CONCATENATION along that axis, then
    RESHAPE: part i lands in block i of the joined axis, which the reshape splits into [n, size]."""
    xs, y = [names[i] for i in op.inputs], names[op.outputs[0]]
    shape = graph.shapes[xs[0]]
    axis = int(getattr(op.builtinOptions, "axis", 0))
    axis = axis + len(shape) + 1 if axis < 0 else axis
    if axis >= len(shape) or (axis == 0 and shape[0] < 0) or any(x in graph.consts for x in xs):
        raise ConversionError(f"TFLite op PACK (op {k}) stacks along its last or the free batch axis, or stacks "
                              "constants", UNREAD_FIX)
    joined = f"{y}/joined"  # (the values of the file's output: calibrated as it)
    graph.shapes[joined] = [d * len(xs) if a == axis and d > 0 else d for a, d in enumerate(shape)]
    graph.derived[joined] = (y, 1.0, 0.0, -np.inf, np.inf)
    return [Op("CONCATENATION", xs, [joined], {"axis": axis, "activation": "NONE"}, name=f"pack_{k}"),
            _as_reshape(graph, joined, y, "PACK", k)]


def _densify(values: np.ndarray, shape: list[int], sparsity, name: str) -> np.ndarray:
    """A constant TFLite stores sparse (its non-zero values, and per dimension in traversal order
    either a dense size or CSR segments and indices) as the dense array it stands for. Blocked
    sparsity (a block map) is refused by name."""
    if sparsity.blockMap is not None and len(sparsity.blockMap):
        raise ConversionError(f"constant {name!r} is stored block-sparse", UNREAD_FIX)
    order = [int(v) for v in sparsity.traversalOrder] if sparsity.traversalOrder is not None else list(range(len(shape)))
    dims = list(sparsity.dimMetadata or [])
    if sorted(order) != list(range(len(shape))) or len(dims) != len(shape):
        raise ConversionError(f"constant {name!r} has sparsity metadata that does not match its shape {shape}",
                              "give a .tflite file written by a TFLite converter")
    dense = np.zeros(shape, values.dtype)
    flat_index = [0]

    def walk(level: int, position: int, coords: list[int]) -> None:
        if level == len(dims):
            dense[tuple(coords[order.index(axis)] for axis in range(len(shape)))] = values[flat_index[0]]
            flat_index[0] += 1
            return
        d = dims[level]
        if d.format == 0:  # DENSE
            for i in range(int(d.denseSize)):
                walk(level + 1, position * int(d.denseSize) + i, coords + [i])
        else:  # SPARSE_CSR
            segments, indices = d.arraySegments.values, d.arrayIndices.values
            for j in range(int(segments[position]), int(segments[position + 1])):
                walk(level + 1, j, coords + [int(indices[j])])

    walk(0, 0, [])
    if flat_index[0] != len(values):
        raise ConversionError(f"constant {name!r} holds {len(values)} values where its sparsity metadata "
                              f"places {flat_index[0]}", "give a .tflite file written by a TFLite converter")
    return dense


MAX_LABEL_MAP_BYTES = 4 << 20


def embedded_labels(path: str | Path) -> Labels | None:
    """The label map a .tflite carries among its metadata's associated files (TFLite and
    MediaPipe Model Maker exports, TF Hub's *_metadata_* models: a zip appended to the
    flatbuffer), or None. Only a text file named like a label map is taken."""
    import zipfile

    path = Path(path)
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as z:
            found = sorted((i for i in z.infolist() if "label" in i.filename.lower()
                            and i.filename.lower().endswith(".txt") and i.file_size <= MAX_LABEL_MAP_BYTES),
                           key=lambda i: i.filename)
            if not found:
                return None
            text = z.read(found[0]).decode("utf-8")
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, NotImplementedError, RuntimeError):
        return None  # metadata that cannot be read names nothing: the model converts without names
    where = f"the label map in {path.name} ({found[0].filename})"
    return Labels(parse_labels(text, where), where)


def litert_runs(path: str | Path) -> bool:
    """Whether LiteRT runs the file as run_keeping_tensors does (its own kernels, no delegate):
    not one with an op of MediaPipe's own, which edgeward reads as builtins (its float write is
    then what calibration runs)."""
    try:
        _interpreter_keeping_tensors(path).allocate_tensors()
    except (RuntimeError, ValueError):
        return False
    return True


def _interpreter_keeping_tensors(path: str | Path):
    """A LiteRT interpreter of the file that keeps every tensor, with no delegate to hide them."""
    import sys
    import warnings

    from agent.runtimes.tflite import interpreter_class

    cls, _ = interpreter_class()
    resolver = sys.modules[cls.__module__].OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    with warnings.catch_warnings():  # keeping every tensor is the point
        warnings.simplefilter("ignore")
        return cls(model_path=str(path), num_threads=1, experimental_preserve_all_tensors=True,
                   experimental_op_resolver_type=resolver)


def run_keeping_tensors(path: str | Path, names: dict[int, str] | None,
                        data: dict[str, np.ndarray] | list[dict[str, np.ndarray]],
                        wanted: Callable[[dict[int, str]], dict[int, str]], batch: int = 16, limit: int | None = None):
    """Run a float .tflite file in LiteRT over `data` (graph input name -> array), `batch` rows at a
    time (or the file's own fixed batch), every intermediate tensor kept and no delegate to hide
    them, and yield (first row, rows a run takes, rows in all, {graph name: array}) for each run,
    with the tensors `wanted` picks from the file's tensor index -> graph name map. `names` is that
    map (None: a file edgeward wrote, whose tensors carry the graph's names); `limit` stops after
    that many rows. `data` may instead be a list of whole feeds, one run each (a stateful model's
    steps, each with its state: converters/stateful.py). Calibration and the read-back check of a
    TFLite source both run files so."""
    it = _interpreter_keeping_tensors(path)
    inputs = it.get_input_details()
    if names is None:
        names = {d["index"]: d["name"] for d in it.get_tensor_details()}
    picked = wanted(names)
    steps = data if isinstance(data, list) else None
    n = len(steps) if steps is not None else len(next(iter(data.values())))
    n = min(n, limit) if limit else n
    fixed = int(inputs[0]["shape"][0]) if inputs[0]["shape_signature"][0] != -1 else None
    step = 1 if steps is not None else fixed or batch
    shape_of = None
    for start in range(0, n - (n % step if fixed else 0), step):
        if steps is not None:
            feeds = {d["index"]: steps[start][names[d["index"]]].astype(d["dtype"]) for d in inputs}
        else:
            feeds = {d["index"]: data[names[d["index"]]][start:start + step].astype(d["dtype"]) for d in inputs}
        shapes = tuple(v.shape for v in feeds.values())
        if shapes != shape_of:
            for index, v in feeds.items():
                it.resize_tensor_input(index, list(v.shape))
            it.allocate_tensors()
            shape_of = shapes
        for index, v in feeds.items():
            it.set_tensor(index, v)
        it.invoke()
        yield start, step, n, {name: it.get_tensor(index) for index, name in picked.items()}


CALIBRATION_METHODS = ("minmax", "percentile")
"""What a TFLite source can be calibrated with (entropy needs onnxruntime's histogram collector)."""


def calibration_ranges(path: str | Path, graph: Graph, names: dict[int, str] | None,
                       data: dict[str, np.ndarray] | list[dict[str, np.ndarray]],
                       method: str = "minmax", batch: int = 16,
                       progress: Callable[[int, int], None] | None = None) -> dict[str, tuple[float, float]]:
    """Activation ranges for every tensor, seen by running the float model in LiteRT with every
    intermediate tensor kept (run_keeping_tensors). minmax: the extremes; percentile: the central
    99.999 % of values."""
    if method not in CALIBRATION_METHODS:
        raise ConversionError(f"calibration method {method!r} is not available for TFLite sources",
                              "use --method minmax or percentile")
    activations = set(graph.activations())
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    samples: dict[str, list[np.ndarray]] = {}
    wanted = lambda names: {i: name for i, name in names.items() if name in activations}  # noqa: E731
    for start, step, n, tensors in run_keeping_tensors(path, names, data, wanted, batch):
        for name, v in tensors.items():
            lo[name] = min(lo.get(name, np.inf), float(v.min()))
            hi[name] = max(hi.get(name, -np.inf), float(v.max()))
            if method == "percentile":
                flat = v.reshape(-1)
                keep = max(1, _SAMPLES_PER_TENSOR * step // max(n, 1))
                if flat.size > keep:
                    flat = flat[np.random.default_rng(start).choice(flat.size, keep, replace=False)]
                samples.setdefault(name, []).append(flat.astype(np.float32))
        if progress:
            progress(min(start + step, n), n)
    if method == "percentile":
        for name, parts in samples.items():
            allv = np.concatenate(parts)
            lo[name] = float(np.percentile(allv, 100 - PERCENTILE))
            hi[name] = float(np.percentile(allv, PERCENTILE))
    ranges = {name: (lo[name], hi[name]) for name in lo}
    graph.derive_ranges(ranges)  # tensors the source file lacks (a rewritten TRANSPOSE_CONV's conv)
    return ranges

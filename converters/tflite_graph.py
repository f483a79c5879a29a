"""A small graph of TFLite builtin ops (NHWC, float constants), and its writer.

Every TFLite path of the converter goes through this graph: the ONNX lowering
(`onnx_to_tflite`) and the float-.tflite reader (`tflite_reader`) build one, and
`write_tflite` emits it as a flatbuffer with LiteRT's own schema, either in float
or as full-integer INT8 following the TFLite quantization spec:

- activations int8, per tensor, asymmetric: real = scale * (q - zero_point);
- conv / depthwise / transposed-conv weights int8 per output channel, symmetric (zero point 0);
  fully-connected weights int8 per tensor (the form tflite-runtime 2.14 runs);
- biases int32 with scale = input scale * weight scale, zero point 0;
- pooling, reshape, transpose, pad, slice, depth-to-space and resizing keep their input's scale; softmax and
  logistic outputs use the fixed 1/256 scale the kernels require;
- constant operands of elementwise ops (x + 3, x / 6) int8 per tensor, on their own grid.

Ops named in `float_ops` stay in float: their inputs are dequantized and their
outputs quantized again, so the accuracy guard can keep a sensitive layer in float.
Model I/O is float (QUANTIZE/DEQUANTIZE inside the model) or int8, by choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.errors import ConversionError

# ops that compute new values (their outputs get their own calibrated scale) ...
WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")
REQUANTIZING = WEIGHTED + ("ADD", "RELU", "RELU6", "MEAN", "MUL", "SUB", "HARD_SWISH", "LEAKY_RELU", "PRELU",
                           "GELU", "BATCH_MATMUL")
# ... ops whose int8 output must reuse the input's scale and zero point ...
SAME_SCALE = ("MAX_POOL_2D", "AVERAGE_POOL_2D", "RESHAPE", "TRANSPOSE", "PAD", "MIRROR_PAD", "RESIZE_NEAREST_NEIGHBOR",
              "RESIZE_BILINEAR", "SLICE", "DEPTH_TO_SPACE")
# ... and ops whose int8 output scale is fixed by the kernel.
FIXED_SCALE = {"SOFTMAX": (1 / 256, -128), "LOGISTIC": (1 / 256, -128), "TANH": (1 / 128, 0)}
# ... and CONCATENATION, whose int8 inputs are brought to its output's scale first (requantized
# with an int8 -> int8 QUANTIZE where they differ), the form every runtime and XNNPACK take.
# ... and ops written in float only, with their inputs dequantized (an INT8 model's LayerNorm).
FLOAT_ONLY = ("RSQRT", "NEG", "SQUARED_DIFFERENCE",  # these two: LayerNorm as TensorFlow writes it
              "SQRT",  # a spectrogram's magnitude, √(re² + im²), whose values span decades
              "LOG")  # --nms: a YOLO box's log size, as the post-processing's decoding takes it (converters/nms.py)
# ... and custom ops that stock LiteRT and tflite-runtime register, written in float with their
# options as read: an SSD's box decoding and non-max suppression, whose outputs (boxes, classes,
# scores, count) stay float in an INT8 model and with int8 I/O alike
CUSTOM = {"DETECTION_POSTPROCESS": "TFLite_Detection_PostProcess"}
SUPPORTED = REQUANTIZING + SAME_SCALE + tuple(FIXED_SCALE) + FLOAT_ONLY + ("CONCATENATION",) + tuple(CUSTOM)

# op versions the runtimes register for these kernels: (float, int8)
_VERSIONS = {"CONV_2D": (1, 3), "DEPTHWISE_CONV_2D": (1, 3), "FULLY_CONNECTED": (1, 4), "ADD": (1, 2),
             "RELU": (1, 2), "RELU6": (1, 2), "MEAN": (1, 2), "MUL": (1, 2), "SUB": (1, 2),
             "MAX_POOL_2D": (1, 2), "AVERAGE_POOL_2D": (1, 2), "RESHAPE": (1, 1), "TRANSPOSE": (1, 2),
             "PAD": (1, 2), "MIRROR_PAD": (1, 2), "SQRT": (1, 1), "SOFTMAX": (1, 2), "LOGISTIC": (1, 2), "TANH": (1, 2), "QUANTIZE": (2, 2),
             "CONCATENATION": (1, 2), "HARD_SWISH": (1, 1),
             "DEQUANTIZE": (2, 2), "RESIZE_NEAREST_NEIGHBOR": (1, 2), "RESIZE_BILINEAR": (1, 2),
             "TRANSPOSE_CONV": (1, 2), "SLICE": (1, 2),
             "DEPTH_TO_SPACE": (1, 2), "LEAKY_RELU": (1, 2), "PRELU": (1, 1), "GELU": (1, 2),
             "BATCH_MATMUL": (1, 2), "RSQRT": (1, 1), "NEG": (1, 1), "SQUARED_DIFFERENCE": (1, 1), "LOG": (1, 1),
             "STRIDED_SLICE": (1, 2)}


def _version(kind: str, int8: bool, op: "Op | None") -> int:
    """The op version a runtime must register for this op (TFLite's op_version rules): newer
    options need newer kernels, which tflite-runtime 2.14 and ai-edge-litert both have."""
    version = _VERSIONS.get(kind, (1, 1))[1 if int8 else 0]
    o = op.options if op is not None else {}
    if kind == "RESIZE_BILINEAR" and o.get("half_pixel_centers"):
        return 3
    if kind == "RESIZE_NEAREST_NEIGHBOR" and (o.get("half_pixel_centers") or o.get("align_corners")):
        return 3
    if kind == "TRANSPOSE_CONV" and op is not None and len(op.inputs) > 2 and op.inputs[2]:
        return 3  # with a bias input
    if kind == "FULLY_CONNECTED" and o.get("keep_num_dims"):
        return 5
    return version


@dataclass
class Op:
    """One TFLite builtin op. `inputs` name tensors ("" for an absent optional input);
    `options` hold padding ("SAME"/"VALID"), stride (h, w), filter (h, w), activation
    ("NONE"/"RELU"/"RELU6"), depth_multiplier, keep_dims, beta, as the kind needs."""

    kind: str
    inputs: list[str]
    outputs: list[str]
    options: dict = field(default_factory=dict)
    name: str = ""           # the source layer's name, for reports and --exclude-node


@dataclass
class Graph:
    """Tensors by name: `consts` hold arrays (float32 weights, int32 shapes), `shapes` the
    activations' shapes with -1 on a dynamic batch axis."""

    inputs: list[str]
    outputs: list[str]
    ops: list[Op] = field(default_factory=list)
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    # layers kept in float in an INT8 model whatever the user asks: LayerNorm, whose variance and
    # 1/sqrt span decades that one int8 scale per tensor cannot hold (a token of variance 0.01
    # beside one of 10 would read as 0, and its 1/sqrt as 316)
    float_layers: set[str] = field(default_factory=set)
    # tensors with no counterpart in the source model, whose range follows from another's:
    # name -> (source, multiplier, offset, floor, ceiling), in order of creation
    derived: dict[str, tuple[str, float, float, float, float]] = field(default_factory=dict)
    # for a detector whose post-processing edgeward appended (--nms, converters/nms.py): the
    # source model's tensors it was fed from, which the source's own runs can be compared on
    nms_from: list[str] = field(default_factory=list)

    def derive_ranges(self, ranges: dict[str, tuple[float, float]]) -> None:
        """Fill in the derived tensors' ranges from their sources' (calibrated) ones."""
        for name, (src, mul, add, floor, ceiling) in self.derived.items():
            if src in ranges:
                a, b = sorted((ranges[src][0] * mul + add, ranges[src][1] * mul + add))
                ranges[name] = (min(max(a, floor), ceiling), max(min(b, ceiling), floor))

    def activations(self) -> list[str]:
        """Every non-constant tensor, in order of appearance: what calibration must range (not the
        detections, which stay float: their rows past the count hold whatever the buffer held)."""
        seen = dict.fromkeys(self.inputs)
        for op in self.ops:
            if op.kind not in CUSTOM:
                seen.update(dict.fromkeys(op.outputs))
        return list(seen)

    def detector(self) -> Op | None:
        """A detector's post-processing op (TFLite_Detection_PostProcess), or None for other models."""
        return next((op for op in self.ops if op.kind == "DETECTION_POSTPROCESS"), None)

    def detections(self) -> list[str]:
        """A detector's four final outputs (boxes, classes, scores, count), or [] for other models."""
        post = self.detector()
        return list(post.outputs) if post else []

    def detection_threshold(self) -> float | None:
        """The score below which a detector's post-processing drops a detection (None: no detector)."""
        post = self.detector()
        return post.options["score_threshold"] if post else None

    def compared_outputs(self) -> list[str]:
        """The tensors that say whether two readings of the model compute the same: its outputs, or
        for a detector the scores and box encodings its post-processing op reads (that op's own
        outputs list the same detections in an order a rounding step can change)."""
        post = self.detector()
        if post is None:
            return list(self.outputs)
        if self.nms_from:
            return list(self.nms_from)
        return [n for n in post.inputs if n not in self.consts] + \
            [n for n in self.outputs if n not in post.outputs]

    def layers(self) -> list[str]:
        """Names of the weighted layers, as the accuracy guard may keep them in float."""
        return [op.name for op in self.ops if op.kind in WEIGHTED and op.name]


MIN_ACTIVATION_RANGE = 1e-6
"""The narrowest activation range written. A layer calibration saw as (near) zero would get a
scale so small that LiteRT's kernels cannot place a fused RELU6's 6.0 on its int8 grid within
an int32 (6 / scale must stay under 2**31: scale > 2.8e-9), and refuse to load the model."""


def activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric int8 scale and zero point for a real range (which always includes 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < MIN_ACTIVATION_RANGE:
        hi = lo + MIN_ACTIVATION_RANGE
    scale = (hi - lo) / 255.0
    zero = int(np.clip(round(-128 - lo / scale), -128, 127))
    return scale, zero


def _weight_scales(w: np.ndarray, axis: int | None) -> np.ndarray:
    """Symmetric int8 scales, per channel along `axis` or one for the tensor; a channel
    that pruning emptied borrows the largest scale so its bias stays representable."""
    if axis is None:
        m = np.array([np.abs(w).max()])
    else:
        m = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)
    scales = m / 127.0
    if not scales.any():
        return np.ones_like(scales, dtype=np.float64)
    return np.where(scales > 0, scales, scales.max()).astype(np.float64)


BIAS_LIMIT = 2**31 - 1
"""An int8 layer's bias is an int32 on the grid of input scale x weight scale."""


def _bias_fitting(scales: np.ndarray, bias: np.ndarray, in_scale: float) -> np.ndarray:
    """Weight scales widened where the bias would not fit its int32 on the grid in_scale x
    scale. A layer whose input calibration saw (almost) all zero has a tiny input scale (down
    to MIN_ACTIVATION_RANGE / 255): a bias of 2.0 then needs ~5e11 steps, and clipped to int32
    the layer put out 0.008 where it should put out 2.0. Its input being ~0, its weights add
    little, and coarser steps for them cost little; the bias is kept exact."""
    need = np.abs(bias.astype(np.float64)) / (in_scale * BIAS_LIMIT * 0.99)
    if len(scales) == 1:
        need = np.array([need.max(initial=0.0)])
    return np.maximum(scales, need)


MIXED_OUTPUT_SPANS = 8.0
"""A model output concatenated from parts whose ranges differ by more than this is joined in
float: one int8 scale for all of YOLOv8's [boxes in pixels (0..700), class scores (0..1)]
made every score 0 or 2.9. Each part keeps its own int8 scale up to the DEQUANTIZE before it."""

CONCAT_FAN_IN = 5
"""The most inputs a CONCATENATION is written with: XNNPACK takes up to five, and a larger one (an
unrolled recurrent layer's steps joined) ran outside it, splitting the model in two. A larger
join is written as joins of joins, each at the output's scale."""

REQUANTIZE_MAX = 128.0
"""The largest input x weight / output scale ratio written for a weighted layer. XNNPACK refuses
a model whose ratio reaches 256 ("failed to prepare")."""


def _output_qparams(lo_hi: tuple[float, float], product_scale: float) -> tuple[float, int]:
    """A weighted layer's output scale and zero point, its range widened where calibration saw it
    (almost) constant: a layer whose output is dead on all the data (a ReLU of negatives) would
    get the narrowest scale, a ratio of thousands, and a model the runtime will not load."""
    scale, zero = activation_qparams(*lo_hi)
    floor = product_scale / REQUANTIZE_MAX
    if scale >= floor:
        return scale, zero
    lo, hi = min(float(lo_hi[0]), 0.0), max(float(lo_hi[1]), 0.0)
    if hi - lo < MIN_ACTIVATION_RANGE:  # all zero: a range above it
        return activation_qparams(0.0, floor * 255.0)
    grow = floor * 255.0 / (hi - lo)  # the same range, stretched about 0
    return activation_qparams(lo * grow, hi * grow)


def _quantize_weights(w: np.ndarray, scales: np.ndarray, axis: int | None) -> np.ndarray:
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    return np.clip(np.round(w / scales.reshape(shape)), -127, 127).astype(np.int8)


class _Emitter:
    """Collects tensors, buffers and op codes while the graph is written."""

    def __init__(self, schema):
        self.s = schema
        self.tensors, self.buffers, self.index = [], [self._buffer(None)], {}
        self.codes, self.code_index = [], {}

    def _buffer(self, data: np.ndarray | None):
        b = self.s.BufferT()
        b.data = None if data is None else np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
        return b

    def tensor(self, name, shape, ttype, data=None, scale=None, zero=None, axis=0) -> int:
        s = self.s
        t = s.TensorT()
        t.name, t.type = name, ttype
        fixed = [1 if d == -1 else int(d) for d in shape]
        t.shape = fixed
        t.shapeSignature = [int(d) for d in shape] if any(d == -1 for d in shape) else None
        t.buffer = 0
        if data is not None:
            self.buffers.append(self._buffer(data))
            t.buffer = len(self.buffers) - 1
        if scale is not None:
            q = s.QuantizationParametersT()
            # numpy vectors: the builder writes each distinct one once (see _aligned_builder)
            q.scale = np.atleast_1d(np.asarray(scale, np.float32))
            q.zeroPoint = np.atleast_1d(np.asarray(zero, np.int64))
            q.quantizedDimension = axis
            t.quantization = q
        self.tensors.append(t)
        self.index[name] = len(self.tensors) - 1
        return self.index[name]

    def code(self, kind: str, int8: bool, op: Op | None = None) -> int:
        version = _version(kind, int8, op)
        key = (kind, version)
        if key not in self.code_index:
            c = self.s.OperatorCodeT()
            c.builtinCode = getattr(self.s.BuiltinOperator, "CUSTOM" if kind in CUSTOM else kind)
            c.deprecatedBuiltinCode = min(c.builtinCode, 127)
            c.version = version
            if kind in CUSTOM:
                c.customCode = CUSTOM[kind]
            self.codes.append(c)
            self.code_index[key] = len(self.codes) - 1
        return self.code_index[key]


def _options(s, op: Op):
    """(BuiltinOptions type, options object) for an op."""
    o = op.options
    act = getattr(s.ActivationFunctionType, o.get("activation", "NONE"))
    pad = getattr(s.Padding, o.get("padding", "VALID"))
    k = op.kind
    if k == "CONV_2D":
        x = s.Conv2DOptionsT()
        x.padding, (x.strideH, x.strideW), x.fusedActivationFunction = pad, o["stride"], act
        x.dilationHFactor, x.dilationWFactor = o.get("dilation", (1, 1))
        return s.BuiltinOptions.Conv2DOptions, x
    if k == "DEPTHWISE_CONV_2D":
        x = s.DepthwiseConv2DOptionsT()
        x.padding, (x.strideH, x.strideW), x.fusedActivationFunction = pad, o["stride"], act
        x.depthMultiplier = o.get("depth_multiplier", 1)
        x.dilationHFactor, x.dilationWFactor = o.get("dilation", (1, 1))
        return s.BuiltinOptions.DepthwiseConv2DOptions, x
    if k == "FULLY_CONNECTED":
        x = s.FullyConnectedOptionsT()
        x.fusedActivationFunction, x.keepNumDims = act, bool(o.get("keep_num_dims"))
        return s.BuiltinOptions.FullyConnectedOptions, x
    if k in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
        x = s.Pool2DOptionsT()
        x.padding, (x.strideH, x.strideW), (x.filterHeight, x.filterWidth) = pad, o["stride"], o["filter"]
        x.fusedActivationFunction = act
        return s.BuiltinOptions.Pool2DOptions, x
    if k == "RESHAPE":
        x = s.ReshapeOptionsT()
        x.newShape = [int(v) for v in o["new_shape"]]
        return s.BuiltinOptions.ReshapeOptions, x
    if k == "SOFTMAX":
        x = s.SoftmaxOptionsT()
        x.beta = float(o.get("beta", 1.0))
        return s.BuiltinOptions.SoftmaxOptions, x
    if k in ("ADD", "SUB", "MUL"):
        x = getattr(s, f"{k.title()}OptionsT")()
        x.fusedActivationFunction = act
        return getattr(s.BuiltinOptions, f"{k.title()}Options"), x
    if k == "GELU":
        x = s.GeluOptionsT()
        x.approximate = bool(o.get("approximate"))
        return s.BuiltinOptions.GeluOptions, x
    if k == "BATCH_MATMUL":
        x = s.BatchMatMulOptionsT()
        x.adjX, x.adjY = bool(o.get("adj_x")), bool(o.get("adj_y"))
        return s.BuiltinOptions.BatchMatMulOptions, x
    if k == "MEAN":
        x = s.ReducerOptionsT()
        x.keepDims = bool(o.get("keep_dims", True))
        return s.BuiltinOptions.ReducerOptions, x
    if k == "CONCATENATION":
        x = s.ConcatenationOptionsT()
        x.axis, x.fusedActivationFunction = int(o["axis"]), act
        return s.BuiltinOptions.ConcatenationOptions, x
    if k == "TRANSPOSE":
        return s.BuiltinOptions.TransposeOptions, s.TransposeOptionsT()
    if k == "PAD":
        return s.BuiltinOptions.PadOptions, s.PadOptionsT()
    if k == "MIRROR_PAD":
        x = s.MirrorPadOptionsT()
        x.mode = getattr(s.MirrorPadMode, o.get("mode", "REFLECT"))
        return s.BuiltinOptions.MirrorPadOptions, x
    if k == "SLICE":
        return s.BuiltinOptions.SliceOptions, s.SliceOptionsT()
    if k == "STRIDED_SLICE":
        x = s.StridedSliceOptionsT()
        x.endMask = int(o.get("end_mask", 0))
        return s.BuiltinOptions.StridedSliceOptions, x
    if k == "LEAKY_RELU":
        x = s.LeakyReluOptionsT()
        x.alpha = float(o["alpha"])
        return s.BuiltinOptions.LeakyReluOptions, x
    if k == "DEPTH_TO_SPACE":
        x = s.DepthToSpaceOptionsT()
        x.blockSize = int(o["block_size"])
        return s.BuiltinOptions.DepthToSpaceOptions, x
    if k in ("RESIZE_NEAREST_NEIGHBOR", "RESIZE_BILINEAR"):
        x = getattr(s, "ResizeNearestNeighborOptionsT" if k == "RESIZE_NEAREST_NEIGHBOR" else "ResizeBilinearOptionsT")()
        x.alignCorners, x.halfPixelCenters = bool(o.get("align_corners")), bool(o.get("half_pixel_centers"))
        return getattr(s.BuiltinOptions, "ResizeNearestNeighborOptions" if k == "RESIZE_NEAREST_NEIGHBOR"
                       else "ResizeBilinearOptions"), x
    if k == "TRANSPOSE_CONV":
        x = s.TransposeConvOptionsT()
        x.padding, (x.strideH, x.strideW) = pad, o["stride"]
        return s.BuiltinOptions.TransposeConvOptions, x
    return s.BuiltinOptions.NONE, None


def write_tflite(graph: Graph, path: str | Path, ranges: dict[str, tuple[float, float]] | None = None,
                 per_channel: bool = True, int8_io: bool = False, float_ops: set[str] | None = None,
                 description: str = "edgeward") -> Path:
    """Write `graph` as a .tflite file: float when `ranges` is None, else full-integer INT8
    with activation scales from `ranges` (tensor name -> (min, max) seen in calibration)."""
    from ai_edge_litert import schema_py_generated as s

    em = _Emitter(s)
    shapes = dict(graph.shapes)  # plus the tensors this writing adds (conversions); the graph stays as it is
    quant = ranges is not None
    float_ops = set(float_ops or ()) | graph.float_layers
    qp: dict[str, tuple[float, int]] = {}      # int8 activation tensors' (scale, zero point)
    is_int8: dict[str, bool] = {}               # each activation's dtype as produced
    ops_out = []
    f32, i8, i32 = s.TensorType.FLOAT32, s.TensorType.INT8, s.TensorType.INT32

    def rng(name):
        if name not in ranges:
            raise ConversionError(f"calibration saw no values for tensor {name!r}",
                                  "report this model: every activation should be ranged")
        return ranges[name]

    def activation(name, int8, params=None):
        shape = shapes[name]
        if int8:
            qp[name] = params or activation_qparams(*rng(name))
            em.tensor(name, shape, i8, scale=qp[name][0], zero=qp[name][1])
        else:
            em.tensor(name, shape, f32)
        is_int8[name] = int8

    def emit(kind, inputs, outputs, opts_op=None, int8=False):
        o = s.OperatorT()
        o.opcodeIndex = em.code(kind, int8, opts_op)
        o.inputs = [em.index[n] if n else -1 for n in inputs]
        o.outputs = [em.index[n] for n in outputs]
        if kind in CUSTOM:
            o.customOptions = np.frombuffer(opts_op.options["custom"], np.uint8)
            o.customOptionsFormat = s.CustomOptionsFormat.FLEXBUFFERS
        elif opts_op is not None:
            o.builtinOptionsType, o.builtinOptions = _options(s, opts_op)
        ops_out.append(o)

    derived: dict[tuple[str, str], str] = {}
    written: dict[tuple, str] = {}  # (constant, its int8 form's scales) -> the tensor written for it

    def quantized_const(name: str, data: np.ndarray, ttype, scales: np.ndarray, axis: int) -> str:
        """A weight or bias in its int8 / int32 form, written once however many ops read it with the
        same scales (an unrolled recurrent layer's steps share theirs): each further set of scales
        (a bias on another step's input scale) is a tensor of its own."""
        key = (name, scales.tobytes())
        if key not in written:
            new = f"{name}/q" + (str(len(written)) if f"{name}/q" in em.index else "")
            em.tensor(new, list(data.shape), ttype, data=data, scale=scales,
                      zero=np.zeros(len(scales), np.int64), axis=axis)
            written[key] = new
        return written[key]

    def convert_once(name, tag, int8, params, kind) -> str:
        """`name` turned by one QUANTIZE/DEQUANTIZE into a new tensor, made once per tag."""
        if (name, tag) not in derived:
            new = f"{name}/{tag}"
            shapes[new] = shapes[name]
            activation(new, int8, params)
            emit(kind, [name], [new], int8=True)
            derived[(name, tag)] = new
        return derived[(name, tag)]

    def as_dtype(name, int8) -> str:
        """The tensor in the dtype a consumer needs."""
        if is_int8[name] == int8:
            return name
        if int8:
            return convert_once(name, "int8", True, activation_qparams(*rng(name)), "QUANTIZE")
        return convert_once(name, "float", False, None, "DEQUANTIZE")

    def at_scale(name, params) -> str:
        """An int8 tensor at the given (scale, zero point): requantized (int8 -> int8) where it differs."""
        if qp[name] == params:
            return name
        return convert_once(name, f"rq{params[0]:.8g}_{params[1]}", True, params, "QUANTIZE")

    def const_int8(name: str, c: np.ndarray) -> str:
        """A constant operand (x + 3, a per-channel scale) in int8, per tensor, on a grid of its own
        (which holds 0 and the values exactly)."""
        if name not in em.index:
            scale, zero = activation_qparams(float(c.min()), float(c.max()))
            em.tensor(name, list(c.shape), i8, scale=scale, zero=zero,
                      data=np.clip(np.round(c / scale) + zero, -128, 127).astype(np.int8))
        return name

    def relu_int8(x: str, y: str, kind: str) -> None:
        """A RELU or RELU6 that no layer before it could take as its fused activation, as MUL by 1 with
        that activation fused: XNNPACK takes no standalone int8 RELU or RELU6, and eight conv + RELU
        layers ran at 1.45x their FP32 time that way, at 0.28x this way (tflite_simplify fuses what
        it can first)."""
        emit("MUL", [x, const_int8("relu/one", np.array([1.0], np.float32))], [y],
             Op("MUL", [], [], {"activation": kind}), int8=True)

    def joined_in_groups(op: Op, inputs: list[str], out: str, int8: bool) -> list[str]:
        """A CONCATENATION's inputs joined CONCAT_FAN_IN at a time until that many are left (joins
        along one axis nest), each join at the output's dtype and scale."""
        level = 0
        while len(inputs) > CONCAT_FAN_IN:
            grouped = []
            for i in range(0, len(inputs), CONCAT_FAN_IN):
                group = inputs[i:i + CONCAT_FAN_IN]
                if len(group) == 1:
                    grouped.append(group[0])
                    continue
                name = f"{out}/joined{level}_{i // CONCAT_FAN_IN}"
                shape = list(shapes[group[0]])
                axis = op.options["axis"] % len(shape)
                sizes = [shapes[n][axis] for n in group]
                shape[axis] = -1 if min(sizes) < 0 else sum(sizes)
                shapes[name] = shape
                activation(name, int8, qp[out] if int8 else None)
                emit("CONCATENATION", group, [name], op, int8=int8)
                grouped.append(name)
            inputs, level = grouped, level + 1
        return inputs

    def slice_to_the_end(op: Op) -> tuple:
        """(kind, inputs, outputs, options) of a SLICE whose size runs to the end of an axis (-1:
        the batch, whatever its size) as the STRIDED_SLICE it is, with that axis's end masked:
        XNNPACK takes no SLICE with a -1 size, and each one split a model between it and TFLite's
        own kernels (YOLOv8's C2f blocks split their channels so: a part per block)."""
        x, begin, size = op.inputs
        b, n = graph.consts[begin].astype(np.int64), graph.consts[size].astype(np.int64)
        end, strides = f"{op.outputs[0]}/end", f"{op.outputs[0]}/strides"
        em.tensor(end, [len(n)], i32, data=np.where(n < 0, 0, b + n).astype(np.int32))
        em.tensor(strides, [len(n)], i32, data=np.ones(len(n), np.int32))
        mask = sum(1 << i for i, v in enumerate(n) if v < 0)
        return ("STRIDED_SLICE", [ins.get(x, x), begin, end, strides], list(op.outputs),
                Op("STRIDED_SLICE", [], [], {"end_mask": mask}))

    def global_pool_int8(op: Op, x: str) -> bool:
        """An AVERAGE_POOL_2D over the whole image (a classifier's global pool, a squeeze-excite
        block's) as MEAN over height and width at the same scale: XNNPACK takes no int8
        AVERAGE_POOL_2D, and each one split a MobileNetV3-style model between XNNPACK and
        TFLite's own kernels (five partitions for four pools; one this way, 0.70x -> 0.68x its
        FP32 time). Other pools stay as they are; False where this one is not global."""
        n, h, w, c = shapes[x]
        o = op.options
        if tuple(o.get("filter", ())) != (h, w) or o.get("padding") != "VALID" or \
                o.get("activation", "NONE") != "NONE":
            return False
        if "mean/hw" not in em.index:
            em.tensor("mean/hw", [2], i32, data=np.array([1, 2], np.int32))
        activation(op.outputs[0], True, qp[x])
        emit("MEAN", [x, "mean/hw"], op.outputs, Op("MEAN", [], [], {"keep_dims": True}), int8=True)
        return True

    def hard_swish_int8(op: Op, x: str) -> None:
        """HARD_SWISH as x * relu6(x + 3) / 6: ADD with RELU6 fused, MUL, MUL by 1/6, as the ONNX
        path lowers it. XNNPACK has no int8 HARD_SWISH: MediaPipe's selfie segmenter, whose float
        file holds eleven, ran at 1.78x its FP32 time in INT8 with them. The steps' ranges follow
        from x's grid; the output keeps its calibrated one."""
        scale, zero = qp[x]
        grid = np.append(np.linspace(scale * (-128 - zero), scale * (127 - zero), 256), -1.5)
        product = grid * np.clip(grid + 3, 0, 6)  # x * relu6(x + 3) over x's range (its least at x = -1.5)
        tag = f"{op.outputs[0]}/hard_swish"
        parts = {f"{tag}/relu6": (0.0, 6.0), f"{tag}/x6": (float(product.min()), float(product.max()))}
        for name, (a, b) in parts.items():
            shapes[name] = shapes[x]
            activation(name, True, activation_qparams(a, b))
        clipped, product_name = parts
        emit("ADD", [x, const_int8(f"{tag}/three", np.array([3.0], np.float32))], [clipped],
             Op("ADD", [], [], {"activation": "RELU6"}), int8=True)
        emit("MUL", [x, clipped], [product_name], Op("MUL", [], [], {"activation": "NONE"}), int8=True)
        activation(op.outputs[0], True)
        emit("MUL", [product_name, const_int8("hard_swish/sixth", np.array([1 / 6], np.float32))], op.outputs,
             Op("MUL", [], [], {"activation": "NONE"}), int8=True)

    def average_pool_int8(op: Op, x: str) -> bool:
        """A VALID AVERAGE_POOL_2D over a window (Keras' AveragePooling1D/2D) as the depthwise conv
        it is, each weight 1/(window size), at the input's scale: XNNPACK runs no int8
        AVERAGE_POOL_2D, and each one split the model. A SAME pool averages over the window's
        inside only, which a conv over zero padding does not: it stays as it is (False)."""
        o = op.options
        if o.get("padding") != "VALID" or o.get("activation", "NONE") != "NONE" or min(o["filter"]) < 1:
            return False
        (kh, kw), c, tag = o["filter"], shapes[x][3], f"{op.outputs[0]}/average"
        w_scale = 1.0 / (kh * kw) / 127  # every weight is 127 steps: 1/(kh kw) exactly
        em.tensor(f"{tag}/weights", [1, kh, kw, c], i8, data=np.full((1, kh, kw, c), 127, np.int8),
                  scale=[w_scale], zero=[0], axis=3)
        em.tensor(f"{tag}/bias", [c], i32, data=np.zeros(c, np.int32), scale=[qp[x][0] * w_scale], zero=[0])
        activation(op.outputs[0], True, qp[x])
        emit("DEPTHWISE_CONV_2D", [x, f"{tag}/weights", f"{tag}/bias"], op.outputs,
             Op("DEPTHWISE_CONV_2D", [], [], {"padding": "VALID", "stride": o["stride"], "depth_multiplier": 1,
                                              "activation": "NONE"}), int8=True)
        return True

    def prelu_int8(op: Op, x: str) -> None:
        """PRELU in ops XNNPACK runs in int8 (it has no int8 PRELU: eight conv + PRELU layers ran
        at 1.64x their FP32 time, and at 0.36x in the four-op form; MediaPipe's face and palm
        models are full of them). With every slope at most 1 (as trained slopes are), two ops:
        x + (1 - slope) * relu(-x), the second term one MUL by -(1 - slope) with a RELU fused.
        Otherwise relu(x) + slope * min(x, 0): the RELU as above, MUL by -1 with a fused RELU,
        MUL by -slope, ADD. The steps' ranges follow from x's grid; the output keeps its
        calibrated one."""
        scale, zero = qp[x]
        lo, hi = scale * (-128 - zero), scale * (127 - zero)
        slope = graph.consts[op.inputs[1]].astype(np.float32)
        rank = len(shapes[x])
        slope = slope.reshape((1,) * (rank - slope.ndim) + slope.shape) if slope.ndim < rank else slope
        tag = f"{op.outputs[0]}/prelu"
        if float(slope.max()) <= 1.0:
            gap = f"{tag}/lifted"  # (1 - slope) * relu(-x): what takes x's negative part to slope * x
            shapes[gap] = shapes[x]
            activation(gap, True, activation_qparams(0.0, max(0.0, -lo) * float((1 - slope).max())))
            emit("MUL", [x, const_int8(f"{tag}/minus_gap", slope - 1)], [gap],
                 Op("MUL", [], [], {"activation": "RELU"}), int8=True)
            activation(op.outputs[0], True)
            emit("ADD", [x, gap], op.outputs, Op("ADD", [], [], {"activation": "NONE"}), int8=True)
            return
        ends = (lo * float(slope.max()), lo * float(slope.min()))  # slope * min(x, 0) at x's lowest
        parts = {f"{tag}/positive": (0.0, hi), f"{tag}/negated": (0.0, -lo),
                 f"{tag}/negative": (min(0.0, *ends), max(0.0, *ends))}
        for name, (a, b) in parts.items():
            shapes[name] = shapes[x]
            activation(name, True, activation_qparams(a, b))
        positive, negated, negative = parts
        relu_int8(x, positive, "RELU")
        emit("MUL", [x, const_int8(f"{tag}/minus_one", np.array([-1.0], np.float32))], [negated],
             Op("MUL", [], [], {"activation": "RELU"}), int8=True)
        emit("MUL", [negated, const_int8(f"{tag}/minus_slope", -slope)], [negative],
             Op("MUL", [], [], {"activation": "NONE"}), int8=True)
        activation(op.outputs[0], True)
        emit("ADD", [positive, negative], op.outputs, Op("ADD", [], [], {"activation": "NONE"}), int8=True)

    for name in graph.inputs:
        if quant and int8_io:
            activation(name, True)
        else:
            activation(name, False)
    same: dict[tuple, int] = {}  # non-weight constants (shapes, perms, paddings) as they are, each value
    for name, arr in graph.consts.items():  # once: an unrolled recurrent layer's steps repeat theirs
        if arr.dtype == np.int32:
            key = (arr.shape, arr.tobytes())
            if key in same:
                em.index[name] = same[key]
            else:
                em.tensor(name, list(arr.shape), i32, data=arr)
                same[key] = em.index[name]

    for op in graph.ops:
        if op.kind not in SUPPORTED:
            raise ConversionError(f"TFLite op {op.kind} is not supported by edgeward's TFLite writer",
                                  "use --format onnx for this model")
        src = op.inputs[0]
        if op.kind in SAME_SCALE:          # follows its input's dtype and scale (inputs: quantized at once)
            int8 = quant and (is_int8[src] or src in graph.inputs)
        else:
            int8 = quant and op.name not in float_ops and op.kind not in FLOAT_ONLY and op.kind not in CUSTOM
        if int8 and op.kind == "CONCATENATION" and op.outputs[0] in graph.outputs:
            spans = [qp[n][0] * 255 if is_int8.get(n) else float(np.subtract(*rng(n)[::-1])) for n in op.inputs]
            if max(spans) > MIXED_OUTPUT_SPANS * max(min(spans), MIN_ACTIVATION_RANGE):
                int8 = False  # see MIXED_OUTPUT_SPANS
        data_inputs = [n for n in op.inputs if n and n not in graph.consts]
        ins = {n: as_dtype(n, int8) for n in data_inputs}
        if op.kind in WEIGHTED:
            w_name, b_name = op.inputs[1], op.inputs[2] if len(op.inputs) > 2 else ""
            w = graph.consts[w_name].astype(np.float32)
            wq_name = w_name
            if int8:
                axis = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": 3, "TRANSPOSE_CONV": 0}.get(op.kind) if per_channel else None
                in_scale = qp[ins[src]][0]
                scales = _weight_scales(w, axis)
                if b_name:
                    scales = _bias_fitting(scales, graph.consts[b_name], in_scale)
                wq_name = quantized_const(w_name, _quantize_weights(w, scales, axis), i8, scales, axis or 0)
                if b_name:
                    b_scales = in_scale * scales
                    b = graph.consts[b_name].astype(np.float64)
                    bq = np.clip(np.round(b / b_scales), -BIAS_LIMIT, BIAS_LIMIT).astype(np.int32)
                    b_name = quantized_const(b_name, bq, i32, b_scales, 0)
            else:
                if w_name not in em.index:
                    em.tensor(w_name, list(w.shape), f32, data=w)
                if b_name and b_name not in em.index:
                    em.tensor(b_name, list(graph.consts[b_name].shape), f32,
                              data=graph.consts[b_name].astype(np.float32))
            inputs = [ins[src], wq_name, b_name]
            if op.kind == "TRANSPOSE_CONV":  # TFLite's order: output shape, weights, input, bias
                inputs = [op.inputs[3], wq_name, ins[src], b_name]
        else:
            if int8 and op.kind == "AVERAGE_POOL_2D" and (global_pool_int8(op, ins[src]) or
                                                          average_pool_int8(op, ins[src])):
                continue
            if int8 and op.kind == "PRELU":
                prelu_int8(op, ins[src])
                continue
            if int8 and op.kind == "HARD_SWISH":
                hard_swish_int8(op, ins[src])
                continue
            if int8 and op.kind in ("RELU", "RELU6"):
                activation(op.outputs[0], True)
                relu_int8(ins[src], op.outputs[0], op.kind)
                continue
            inputs = []
            for n in op.inputs:
                if n in graph.consts and graph.consts[n].dtype != np.int32:  # an operand such as x + 3
                    c = graph.consts[n].astype(np.float32)
                    if int8:
                        n = const_int8(f"{n}/operand", c)
                    elif n not in em.index:
                        em.tensor(n, list(c.shape), f32, data=c)
                inputs.append(ins.get(n, n))
        out = op.outputs[0]
        if op.kind in CUSTOM:
            for name in op.outputs:
                activation(name, False)
            emit(op.kind, inputs, op.outputs, op)
            continue
        if int8 and op.kind == "CONCATENATION":
            params = activation_qparams(*rng(out))
            inputs = [at_scale(n, params) for n in inputs]
            activation(out, True, params)
        elif int8 and op.kind in SAME_SCALE:
            activation(out, True, qp[ins[src]])
        elif int8 and op.kind in FIXED_SCALE:
            activation(out, True, FIXED_SCALE[op.kind])
        elif int8 and op.kind in WEIGHTED:
            activation(out, True, _output_qparams(rng(out), in_scale * float(scales.max())))
        else:
            activation(out, int8)
        if op.kind == "CONCATENATION" and len(inputs) > CONCAT_FAN_IN:
            inputs = joined_in_groups(op, inputs, out, int8)
        if op.kind == "SLICE" and op.inputs[2] in graph.consts and np.any(graph.consts[op.inputs[2]] < 0):
            emit(*slice_to_the_end(op), int8=int8)
            continue
        emit(op.kind, inputs, [out], op, int8=int8)

    outputs, detections = [], set(graph.detections())
    for name in graph.outputs:
        want_int8 = quant and int8_io and name not in detections
        if is_int8[name] != want_int8:  # the model's output in the dtype promised: rename, then convert
            inner = f"{name}/{'int8' if is_int8[name] else 'float'}"
            em.tensors[em.index[name]].name = inner
            em.index[inner] = em.index.pop(name)
            is_int8[inner] = is_int8.pop(name)
            if name in qp:
                qp[inner] = qp[name]
            shapes[inner] = shapes[name]
            if want_int8:
                activation(name, True, qp.get(inner) or activation_qparams(*rng(name)))
                emit("QUANTIZE", [inner], [name], int8=True)
            else:
                activation(name, False)
                emit("DEQUANTIZE", [inner], [name], int8=True)
        outputs.append(em.index[name])

    sub = s.SubGraphT()
    sub.tensors, sub.operators, sub.name = em.tensors, ops_out, "main"
    sub.inputs, sub.outputs = [em.index[n] for n in graph.inputs], outputs
    sig = s.SignatureDefT()
    sig.signatureKey, sig.subgraphIndex = "serving_default", 0

    def tensor_map(name):
        m = s.TensorMapT()
        m.name, m.tensorIndex = name, em.index[name]
        return m

    sig.inputs = [tensor_map(n) for n in graph.inputs]
    sig.outputs = [tensor_map(n) for n in graph.outputs]
    model = s.ModelT()
    model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, em.codes, [sub], em.buffers
    model.signatureDefs, model.description = [sig], description
    builder = _aligned_builder(1024 + sum(len(b.data) for b in em.buffers if b.data is not None))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path = Path(path)
    path.write_bytes(bytes(builder.Output()))
    return path


def _aligned_builder(size: int):
    """A flatbuffers Builder that aligns buffers' bytes to 16, as the schema asks (force_align: 16)
    and TensorFlow's converter writes them: runtimes may read weights in place with vector loads.

    It also writes each distinct quantization vector once and points every tensor that has it
    at that copy (flatbuffers allows shared vectors, as it does shared strings). Per-channel
    zero points are all zero and int64 in the schema: a conv's weights and bias each carry
    one per output channel, so without sharing they are a third of a small CNN's overhead."""
    import flatbuffers

    class AlignedBuilder(flatbuffers.Builder):
        def __init__(self, initial_size: int):
            super().__init__(initial_size)
            self.shared: dict = {}  # (dtype, bytes) -> offset of the vector already written

        def CreateNumpyVector(self, x):
            if x.dtype != np.uint8:
                key = (x.dtype.str, x.tobytes())
                if key not in self.shared:
                    self.shared[key] = super().CreateNumpyVector(x)
                return self.shared[key]
            self.StartVector(1, x.size, 16)
            payload = x.tobytes()
            self.head = self.head - len(payload)
            self.Bytes[self.head:self.head + len(payload)] = payload
            self.vectorNumElems = x.size
            return self.EndVector()

    return AlignedBuilder(size)


def op_counts(path: str | Path) -> dict:
    """What a .tflite file holds: ops by kind (a custom op by its name) and tensors by dtype (how
    INT8 it really is)."""
    from ai_edge_litert import schema_py_generated as s

    model = s.ModelT.InitFromPackedBuf(Path(path).read_bytes(), 0)
    names = {v: k for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k.lower() for k, v in vars(s.TensorType).items() if not k.startswith("_")}
    ops: dict[str, int] = {}
    dtypes: dict[str, int] = {}
    for sub in model.subgraphs:
        for op in sub.operators:
            code = model.operatorCodes[op.opcodeIndex]
            kind = names[code.builtinCode]
            if kind == "CUSTOM" and code.customCode:  # by its name: TFLite_Detection_PostProcess
                kind = code.customCode.decode() if isinstance(code.customCode, bytes) else str(code.customCode)
            ops[kind] = ops.get(kind, 0) + 1
        for t in sub.tensors:
            dtypes[types[t.type]] = dtypes.get(types[t.type], 0) + 1
    return {"ops": ops, "tensor_dtypes": dtypes}


def input_grids(path: str | Path) -> dict[str, tuple[float, int, str]]:
    """Float input -> (scale, zero point, "int8") where only QUANTIZE ops read it, all to one
    per-tensor grid: the only values the model sees (see agent/reference.py)."""
    from ai_edge_litert import schema_py_generated as s

    model = s.ModelT.InitFromPackedBuf(Path(path).read_bytes(), 0)
    sub = model.subgraphs[0]
    grids = {}
    for index in sub.inputs:
        if sub.tensors[index].type != s.TensorType.FLOAT32:
            continue
        readers = [op for op in sub.operators if index in list(op.inputs)]
        found = set()
        for op in readers:
            out = sub.tensors[op.outputs[0]]
            q = out.quantization
            if model.operatorCodes[op.opcodeIndex].builtinCode != s.BuiltinOperator.QUANTIZE \
                    or out.type != s.TensorType.INT8 or q is None or q.scale is None or len(q.scale) != 1:
                break
            found.add((float(q.scale[0]), int(q.zeroPoint[0]), "int8"))
        else:
            if len(found) == 1:
                grids[sub.tensors[index].name.decode()] = found.pop()
    return grids

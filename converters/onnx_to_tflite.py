"""FP32 ONNX -> the TFLite op graph (NHWC), and calibration ranges for it from onnxruntime.

Why our own lowering: the usual ONNX->TFLite route (onnx2tf) needs ~2.6 GB of exact
pins in its own environment and fetches calibration data from the network. The
models that run on small boards are built from a short list of layers, which map
one to one onto TFLite builtins; this module maps that list, says plainly which
operator it cannot map, and keeps the model's I/O exactly as the ONNX file has it
(NCHW images go through one TRANSPOSE inside the model), so the same calibration
and evaluation data, and the same callers, work for both formats.

Mapped: Conv (plain and depthwise, with folded BatchNormalization), ConvTranspose, Gemm,
MatMul (+ Add as its bias; of two activations as BATCH_MATMUL), Relu and Clip(0, 6) (fused where
they follow a layer), MaxPool, AveragePool, GlobalAveragePool, ReduceMean, Flatten, Reshape,
Squeeze, Unsqueeze, Transpose, Split, Slice, Pad, Concat, Add, Mul, Sub (of two tensors that
broadcast, or with a constant), Div (by a constant), Max (with a constant), BatchNormalization,
LayerNormalization (kept in float), Softmax, Sigmoid, Tanh, GELU, HardSwish, HardSigmoid,
LeakyRelu, PRelu, Resize (nearest and bilinear, 2-D), Identity and Dropout. docs/CONVERTER.md
has the table, with the forms each takes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np

from agent.errors import ConversionError, runtime_message

from .onnx_graph import consumers, inline_constant_ifs, name_nodes, node_attrs, value_shapes
from .conv1d import LIFTED, lift_conv1d
from .recurrent import GATES, NeedsFixedSteps, lower_recurrent
from .subpixel import subpixel_weights
from .tflite_graph import SAME_SCALE, Graph, Op
from .tflite_simplify import simplify

TO_NHWC, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]
BATCH_PROBE = 7  # a free batch's stand-in when a constant made from a Shape is computed again (see _fold)
_ELEMENTWISE = {"Relu": "RELU", "Sigmoid": "LOGISTIC", "Tanh": "TANH",      # one input, same shape out
                "Sqrt": "SQRT"}  # (SQRT stays float inside an INT8 model: a magnitude's values span decades)
_POOLS = {"MaxPool": "MAX_POOL_2D", "AveragePool": "AVERAGE_POOL_2D"}
_BINARY = {"Add": "ADD", "Sub": "SUB", "Mul": "MUL", "Div": "DIV"}  # DIV: by a constant, as a MUL


class _NeedsFixedBatch(Exception):
    """A layer that needs the batch size fixed met a free one."""


def _unsupported(node, why: str = "") -> ConversionError:
    before = node.input[0] if node.input and node.input[0] else "TENSOR"  # what the layer reads: a place to end
    return ConversionError(f"ONNX operator {node.op_type} (node {node.name or '?'}){why} has no TFLite mapping "
                           "in edgeward", f"convert with --format onnx, end the model before it with --cut-at {before}, "
                                          "or replace the layer with a supported one (see docs/CONVERTER.md)")


class _Lowering:
    def __init__(self, model, fixed_batch: bool = False):
        from onnx import numpy_helper

        self.model = model
        g = model.graph
        self.consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        for node in g.node:  # Constant nodes are constants too
            if node.op_type == "Constant":
                self.consts[node.output[0]] = numpy_helper.to_array(node_attrs(node)["value"])
        self.shapes = value_shapes(model)
        self.consumers = consumers(g)
        self.graph_outputs = {o.name for o in g.output}
        self.g = Graph(inputs=[i.name for i in g.input if i.name not in self.consts],
                       outputs=[o.name for o in g.output])
        self.alias: dict[str, str] = {}     # ONNX tensor -> the graph tensor that holds it
        self.nhwc: set[str] = set()         # graph tensors stored NHWC (ONNX has them NCHW)
        self.flat_perm: dict[str, np.ndarray] = {}  # flattened NHWC tensor -> NCHW order of its features
        self.done: set[int] = set()
        self.nonneg: set[str] = set()       # graph tensors that cannot be negative (after ReLU and such)
        # constants computed from a Shape that depend on the free batch (written as 0 in them) -> the
        # same computed with the batch as BATCH_PROBE (None where that could not be computed)
        self.from_shape: dict[str, np.ndarray | None] = {}
        self.fixed_batch = fixed_batch  # lowered again for batches of one (lower)

    # -- helpers -----------------------------------------------------------------------------------
    def shape(self, name: str) -> list[int]:
        if name not in self.shapes or not self.shapes[name]:
            raise ConversionError(f"the shape of tensor {name!r} is unknown",
                                  "export the model with static shapes (a dynamic batch axis is fine)")
        return list(self.shapes[name])

    def src(self, name: str) -> str:
        return self.alias.get(name, name)

    def const(self, name: str, node) -> np.ndarray:
        if name not in self.consts:
            raise _unsupported(node, f" with a computed (non-constant) {name!r}")
        return self.consts[name]

    def new(self, name: str, shape: list[int], nhwc: bool = False) -> str:
        self.g.shapes[name] = shape
        if nhwc:
            self.nhwc.add(name)
        return name

    def add_const(self, name: str, arr: np.ndarray) -> str:
        self.g.consts[name] = arr
        return name

    def op(self, kind, inputs, output, name="", **options) -> None:
        self.g.ops.append(Op(kind, inputs, [output], options, name))
        if options.get("activation") in ("RELU", "RELU6") or kind in ("RELU", "RELU6") or \
                (kind in ("MAX_POOL_2D", "AVERAGE_POOL_2D", "PAD", "RESHAPE", "TRANSPOSE", "RESIZE_NEAREST_NEIGHBOR",
                         "RESIZE_BILINEAR", "SLICE") and inputs[0] in self.nonneg):
            self.nonneg.add(output)  # never negative: zero padding is then as good as -inf for max pooling

    def fuse_activation(self, out: str) -> tuple[str, str]:
        """(activation, output tensor): a Relu/Clip(0,6) that alone consumes tensor `out` is fused."""
        users = self.consumers.get(out, [])
        if len(users) == 1 and out not in self.graph_outputs:
            nxt = users[0]
            act = self.activation_of(nxt)
            if act:
                self.done.add(id(nxt))
                return act, nxt.output[0]
        return "NONE", out

    def activation_of(self, node) -> str | None:
        if node.op_type == "Relu":
            return "RELU"
        if node.op_type == "Clip":
            lo, hi = self.clip_bounds(node)
            if lo == 0 and hi == 6:
                return "RELU6"
            if lo == 0 and hi == math.inf:
                return "RELU"
        return None

    def clip_bounds(self, node) -> tuple[float, float]:
        a = node_attrs(node)
        lo, hi = a.get("min", -math.inf), a.get("max", math.inf)
        if len(node.input) > 1 and node.input[1]:
            lo = float(self.const(node.input[1], node))
        if len(node.input) > 2 and node.input[2]:
            hi = float(self.const(node.input[2], node))
        return lo, hi

    @staticmethod
    def padding(in_hw, kernel, stride, dilation, pads, auto_pad) -> str | None:
        """SAME or VALID when the ONNX padding is exactly that, else None (needs an explicit PAD)."""
        if auto_pad in ("SAME_UPPER",):
            return "SAME"
        if auto_pad == "VALID" or not any(pads):
            return "VALID"
        for i in range(2):
            if in_hw[i] <= 0:
                return None
            out = -(-in_hw[i] // stride[i])
            total = max((out - 1) * stride[i] + (kernel[i] - 1) * dilation[i] + 1 - in_hw[i], 0)
            if (pads[i], pads[i + 2]) != (total // 2, total - total // 2):
                return None
        return "SAME"

    # -- the walk ----------------------------------------------------------------------------------
    def run(self) -> Graph:
        for name in self.g.inputs:
            shape = self.shape(name)
            self.g.shapes[name] = shape
            if len(shape) == 4:  # NCHW in, NHWC inside
                self.alias[name] = self.transpose(name, TO_NHWC, f"{name}/nhwc", nhwc=True)
        for node in self.model.graph.node:
            if id(node) in self.done or node.op_type == "Constant":
                continue
            op = node.op_type
            if op == "If" and not self.fixed_batch:  # its condition may be the batch's size: fixed, then
                raise _NeedsFixedBatch()             # inline_constant_ifs takes its branch
            if any(node.input) and all(i in self.consts for i in node.input if i):
                self._fold(node)
            elif op in _ELEMENTWISE:
                self._unary(node, _ELEMENTWISE[op])
            elif op in _POOLS:
                self._pool(node, _POOLS[op])
            elif op in ("Div", "Mul") and self._gelu_from_erf(node):
                continue
            elif op == "ReduceMean" and self._layer_norm_from_parts(node):
                continue
            elif op in _BINARY:
                self._binary(node, _BINARY[op])
            elif op in ("Identity", "Dropout"):
                self.alias[node.output[0]] = self.src(node.input[0])
            elif op in GATES:
                self._recurrent(node)
            elif hasattr(self, f"lower_{op}"):
                getattr(self, f"lower_{op}")(node)
            else:
                raise _unsupported(node)
        for i, name in enumerate(self.g.outputs):
            inner = self.src(name)
            if inner in self.nhwc:
                self.transpose(inner, TO_NCHW, name)
            elif inner != name:
                self.g.outputs[i] = name
                self._rename(inner, name)
        return self.g

    def _recurrent(self, node) -> None:
        """RNN, GRU, LSTM: unrolled over their steps (converters/recurrent.py), which needs their
        number of steps and batch fixed."""
        try:
            lower_recurrent(self, node, _unsupported)
        except NeedsFixedSteps:
            raise _NeedsFixedBatch() from None

    def _fold(self, node) -> None:
        """A node of constants only is a constant: Paddle2ONNX writes each conv bias as
        Reshape(bias, shape) before its Add, for one. Computed once with onnx's reference
        evaluator, on the host."""
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(node)
        try:
            values = evaluator.run(None, {i: self.consts[i] for i in node.input if i})
        except Exception as exc:  # the evaluator's own errors: an operator it does not know
            raise _unsupported(node, f" of constants that could not be computed ({exc})") from exc
        self.consts.update({name: np.asarray(v) for name, v in zip(node.output, values) if name})
        if not any(i in self.from_shape for i in node.input):
            return
        # from a Shape: computed again with the batch as another number, it depends on the batch
        # only where it changes (an anchor grid made of the height and width does not)
        probe = {i: self.from_shape.get(i, self.consts[i]) for i in node.input if i}
        probed = None
        if all(v is not None for v in probe.values()):
            try:
                probed = evaluator.run(None, probe)
            except Exception:  # the probe made no sense to the operator: count it as depending on the batch
                pass
        for k, (name, v) in enumerate(zip(node.output, values)):
            if name and (probed is None or not np.array_equal(np.asarray(v), np.asarray(probed[k]))):
                self.from_shape[name] = None if probed is None else np.asarray(probed[k])

    def lower_Shape(self, node):
        """A tensor's shape is a constant but for a free batch, written as 0: what Reshape reads
        as "the input's own size" (Paddle2ONNX flattens with Reshape(x, [Shape(x)[0], -1])), and
        Resize's sizes as the input's own batch (torch's F.interpolate(x, size=skip.shape[2:])).
        A constant made from it may only reach those two (see from_shape)."""
        x = self.src(node.input[0])
        shape = self.g.shapes[x]
        shape = [shape[i] for i in TO_NCHW] if x in self.nhwc else list(shape)
        if any(d < 0 for d in shape[1:]):
            raise _unsupported(node, f" of a tensor whose shape {shape} is not fixed")
        a = node_attrs(node)
        span = slice(a.get("start", 0), a.get("end", len(shape)))
        self.consts[node.output[0]] = np.array([0 if d < 0 else d for d in shape][span], np.int64)
        if shape[0] < 0 and span.indices(len(shape))[0] == 0:  # the free batch is in it
            self.from_shape[node.output[0]] = np.array([BATCH_PROBE if d < 0 else d for d in shape][span], np.int64)

    def _rename(self, old: str, new: str) -> None:
        for op in self.g.ops:
            op.inputs = [new if n == old else n for n in op.inputs]
            op.outputs = [new if n == old else n for n in op.outputs]
        self.g.shapes[new] = self.g.shapes.pop(old)

    def reader_of(self, name: str, op_type: str):
        """The one node that reads tensor `name`, where it is of `op_type` and `name` is no model
        output; else None. (The patterns matched here are chains of such nodes.)"""
        users = self.consumers.get(name, [])
        ok = len(users) == 1 and users[0].op_type == op_type and name not in self.graph_outputs
        return users[0] if ok else None

    def axes_of(self, node) -> list[int] | None:
        """A node's axes as ONNX numbers them: its attribute (older opsets) or its second input
        (opset 13 on for Squeeze, 18 on for ReduceMean), which must be a constant; None if it has none."""
        axes = node_attrs(node).get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = self.const(node.input[1], node).reshape(-1)
        return None if axes is None else [int(v) for v in axes]

    def scalar(self, name: str) -> float | None:
        """The value of a one-element constant, else None."""
        c = self.consts.get(name)
        return float(np.asarray(c).reshape(-1)[0]) if c is not None and np.asarray(c).size == 1 else None

    def out_name(self, onnx_name: str, nhwc: bool) -> str:
        name = f"{onnx_name}/nhwc" if nhwc else onnx_name
        self.alias[onnx_name] = name
        return name

    def transpose(self, x: str, perm: list[int], y: str, nhwc: bool = False, name: str = "") -> str:
        """y: x with its axes in the order `perm`, by one TRANSPOSE (which keeps x's int8 scale)."""
        self.new(y, [self.g.shapes[x][i] for i in perm], nhwc=nhwc)
        self.op("TRANSPOSE", [x, self.add_const(f"perm/{''.join(map(str, perm))}", np.array(perm, np.int32))], y,
                name=name)
        return y

    def in_onnx_layout(self, x: str) -> str:
        """Tensor x as ONNX lays it out: a feature map (NHWC inside) transposed back to NCHW, once,
        for the layers that read its axes as ONNX numbers them (a detector's decoding reshapes
        its maps to [N, C, H*W]). A TRANSPOSE keeps its input's int8 scale and runs in XNNPACK."""
        if x not in self.nhwc:
            return x
        plain = f"{x}/nchw"
        return plain if plain in self.g.shapes else self.transpose(x, TO_NCHW, plain)

    def in_nhwc(self, x: str) -> str:
        """A 4-D tensor held as ONNX lays it out (NCHW), transposed once to NHWC for a conv."""
        if x in self.nhwc:
            return x
        inner = f"{x}/as_nhwc"
        return inner if inner in self.g.shapes else self.transpose(x, TO_NHWC, inner, nhwc=True)

    # -- layers ------------------------------------------------------------------------------------
    def _conv_operands(self, node, out_axis: int):
        """(attributes, NHWC input, float 4-D weights as ONNX holds them, bias) of a conv-like layer;
        its output channels are the weights' axis `out_axis` (a missing bias is zeros)."""
        x = self.src(node.input[0])
        if x not in self.nhwc:
            if len(self.g.shapes[x]) != 4:
                raise _unsupported(node, " on a non-4D input")
            x = self.in_nhwc(x)  # a map a decoding reshaped (YOLOv8's DFL: a 1x1 conv over [N, 16, 4, A])
        w = self.const(node.input[1], node).astype(np.float32)
        if w.ndim != 4:
            raise _unsupported(node, f" with {w.ndim - 2}-D kernels")
        b = self.const(node.input[2], node).astype(np.float32) if len(node.input) > 2 and node.input[2] \
            else np.zeros(w.shape[out_axis], np.float32)
        return node_attrs(node), x, w, b

    def lower_Conv(self, node):
        a, x, w, b = self._conv_operands(node, out_axis=0)
        cout, cin_g, kh, kw = w.shape
        w, b, node_out = self.fold_channel_affine(node, w, b)
        n, h, wd, cin = self.g.shapes[x]
        group = a.get("group", 1)
        stride = tuple(a.get("strides", [1, 1]))
        dilation = tuple(a.get("dilations", [1, 1]))
        pads = list(a.get("pads", [0, 0, 0, 0]))
        mode = self.padding((h, wd), (kh, kw), stride, dilation, pads, a.get("auto_pad", "NOTSET"))
        if a.get("auto_pad", "NOTSET") == "SAME_LOWER":
            raise _unsupported(node, " with auto_pad=SAME_LOWER")
        if mode is None:  # explicit zero padding, then a VALID convolution
            x, mode, (h, wd) = self._explicit_pad(node, x, pads), "VALID", (h + pads[0] + pads[2], wd + pads[1] + pads[3])
        act, out = self.fuse_activation(node_out)
        oh = self._out_dim(h, kh, stride[0], dilation[0], mode)
        ow = self._out_dim(wd, kw, stride[1], dilation[1], mode)
        y = self.new(self.out_name(out, True), [n, oh, ow, cout], nhwc=True)
        wname, bname = f"{node.name}/weights", f"{node.name}/bias"
        if group == 1:
            self.add_const(wname, np.ascontiguousarray(w.transpose(0, 2, 3, 1)))        # OHWI
            kind, extra = "CONV_2D", {}
        elif group == cin and cin_g == 1:
            self.add_const(wname, np.ascontiguousarray(w.transpose(1, 2, 3, 0)))        # 1HWO
            kind, extra = "DEPTHWISE_CONV_2D", {"depth_multiplier": cout // cin}
        else:
            raise _unsupported(node, f" with groups={group}")
        self.add_const(bname, b)
        self.op(kind, [x, wname, bname], y, name=node.name, padding=mode, stride=stride, dilation=dilation,
                activation=act, **extra)

    def lower_ConvTranspose(self, node):
        """The learned upsampling of a segmentation or text-detection head (DBNet's, in PP-OCR;
        U-Net's): a sub-pixel convolution (CONV_2D, DEPTH_TO_SPACE). Only strides that differ
        between height and width take TFLite's TRANSPOSE_CONV, whose output shape is a constant
        input of the op, so a model with one is written with its batch fixed at 1 (see lower())."""
        a, x, w, b = self._conv_operands(node, out_axis=1)
        if a.get("group", 1) != 1:
            raise _unsupported(node, f" with groups={a['group']}")
        if list(a.get("dilations", [1, 1])) != [1, 1]:
            raise _unsupported(node, f" with dilations {list(a['dilations'])}")
        if "output_shape" in a or a.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET", "VALID", b"VALID"):
            raise _unsupported(node, " with output_shape or auto_pad (give pads instead)")
        cin, cout, kh, kw = w.shape
        w = np.ascontiguousarray(w.transpose(1, 0, 2, 3))                                 # [out, in, kh, kw]
        w, b, node_out = self.fold_channel_affine(node, w, b)
        n, h, wd, _ = self.g.shapes[x]
        stride = tuple(a.get("strides", [1, 1]))
        pads = list(a.get("pads", [0, 0, 0, 0]))
        extra = list(a.get("output_padding", [0, 0]))
        out = [(size - 1) * s + k - pads[i] - pads[i + 2] + extra[i]
               for i, (size, s, k) in enumerate(zip((h, wd), stride, (kh, kw)))]
        taps = [-(-k // s) for k, s in zip((kh, kw), stride)]  # input pixels one output pixel reads, per axis
        if stride[0] == stride[1] and all(pads[i] + out[i] <= ((h, wd)[i] + taps[i] - 1) * stride[i] for i in range(2)):
            return self._upsample_by_depth_to_space(node, x, w, b, node_out, stride[0], pads, out)
        # TFLite pads a transposed conv by its padding type alone: VALID puts nothing in front, SAME
        # puts half of what the output size leaves over in front (the rest, and output_padding, at the
        # end). Other paddings are a VALID one cropped by a SLICE.
        full = [(size - 1) * s + k for size, s, k in zip((h, wd), stride, (kh, kw))]
        crop = None
        if pads[0] == pads[1] == 0:
            mode = "VALID"
        elif all(-(-o // s) == size and pads[i] == ((size - 1) * s + k - o) // 2
                 for i, (o, s, k, size) in enumerate(zip(out, stride, (kh, kw), (h, wd)))):
            mode = "SAME"
        elif all(pads[i] + out[i] <= full[i] for i in range(2)):
            mode, crop = "VALID", out
            out = full
        else:
            raise _unsupported(node, f" with pads {pads} and output_padding {extra}")
        if n <= 0:  # TRANSPOSE_CONV's output shape is a constant: lower() tries again with batch 1
            raise _NeedsFixedBatch()
        final = self.out_name(node_out, True)
        y = self.new(f"{node.name}/full" if crop else final, [n, *out, cout], nhwc=True)
        wname = self.add_const(f"{node.name}/weights", np.ascontiguousarray(w.transpose(0, 2, 3, 1)))  # OHWI
        bname = self.add_const(f"{node.name}/bias", b)
        shape = self.add_const(f"{node.name}/output_shape", np.array([n, *out, cout], np.int32))
        self.op("TRANSPOSE_CONV", [x, wname, bname, shape], y, name=node.name, padding=mode, stride=stride)
        if crop:
            self._crop(node, y, final, pads[:2], [n, *crop, cout])

    def _upsample_by_depth_to_space(self, node, x, w, b, node_out, s, pads, out):
        """A transposed conv of stride s as the sub-pixel convolution it equals (converters/subpixel.py):
        CONV_2D, DEPTH_TO_SPACE, and a SLICE that crops ONNX's padding. These ops have int8
        kernels in XNNPACK, where TRANSPOSE_CONV has float ones only, and leave the batch free."""
        cout = w.shape[0]
        n, h, wd, _ = self.g.shapes[x]
        wc, (th, tw) = subpixel_weights(w, s)
        final = self.out_name(node_out, True)
        if th > 1 or tw > 1:  # every tap reads inside the zero-padded input
            x = self._explicit_pad(node, x, [th - 1, tw - 1, th - 1, tw - 1])
        grid = [h + th - 1, wd + tw - 1]
        full = [grid[0] * s, grid[1] * s]
        cropped = pads[0] or pads[1] or out != full
        y = f"{node.name}/full" if cropped else final
        weights = self.add_const(f"{node.name}/weights", wc)
        bias = self.add_const(f"{node.name}/bias", np.tile(b, s * s).astype(np.float32))
        conv_out = self.new(f"{node.name}/phases" if s > 1 else y, [n, *grid, s * s * cout], nhwc=True)
        self.op("CONV_2D", [x, weights, bias], conv_out, name=node.name, padding="VALID", stride=(1, 1),
                dilation=(1, 1), activation="NONE")
        if s > 1:
            self.g.derived[conv_out] = (final, 1.0, 0.0, -math.inf, math.inf)  # the output's values, rearranged
            self.op("DEPTH_TO_SPACE", [conv_out], self.new(y, [n, *full, cout], nhwc=True), name=node.name,
                    block_size=s)
        if cropped:
            self._crop(node, y, final, pads[:2], [n, *out, cout])

    def _crop(self, node, y: str, final: str, start: list[int], shape: list[int]) -> None:
        """`final` (NHWC, of `shape`) as the window of `y` from row start[0], column start[1]:
        ONNX's padding of a transposed conv, cut from the whole output the TFLite ops make."""
        self.g.derived[y] = (final, 1.0, 0.0, -math.inf, math.inf)  # its values and its margins': one range
        self.slice(node, y, [0, *start, 0], shape, final, node.name)

    def lower_Resize(self, node):
        """The 2x/4x upsampling of a feature pyramid (detectors, segmentation):
        RESIZE_NEAREST_NEIGHBOR or RESIZE_BILINEAR, where ONNX's coordinate mode is one TFLite has."""
        a = {k: v.decode() if isinstance(v, bytes) else v for k, v in node_attrs(node).items()}
        x = self.src(node.input[0])
        if x not in self.nhwc:
            raise _unsupported(node, " on a non-4D input")
        n, h, w, c = self.g.shapes[x]
        if h <= 0 or w <= 0:
            raise _unsupported(node, " of an input of unknown height/width")
        if a.get("axes") is not None or a.get("antialias", 0) or \
                a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
            raise _unsupported(node, " with axes, antialias or keep_aspect_ratio_policy")
        inputs = list(node.input) + [""] * 4
        if self.model.opset_import[0].version < 11:              # Resize(X, scales)
            scales, sizes = inputs[1], ""
        else:                                                     # Resize(X, roi, scales, sizes)
            scales, sizes = inputs[2], inputs[3]
        scales = self.const(scales, node).astype(np.float64) if scales else np.zeros(0)
        if sizes:
            size = self.const(sizes, node).astype(np.int64).tolist()
            if sizes in self.from_shape and size and size[0] == 0:  # torch's size=skip.shape[2:]: the own batch
                size[0] = n
            if len(size) != 4 or size[1] != c or size[0] not in (n, 1):
                raise _unsupported(node, f" to sizes {size}")
            out = size[2:]
        elif scales.size == 4 and scales[0] == scales[1] == 1:
            out = [int(math.floor(h * scales[2])), int(math.floor(w * scales[3]))]
        else:
            raise _unsupported(node, f" with scales {scales.tolist()} (only height and width may change)")
        mode = a.get("mode", "nearest")
        old = self.model.opset_import[0].version < 11  # opset 10's Resize: asymmetric, floor
        coords = a.get("coordinate_transformation_mode", "asymmetric" if old else "half_pixel")
        rounding = a.get("nearest_mode", "floor" if old else "round_prefer_floor")
        if any(float(o) != float(size) * f for o, size, f in zip(out, (h, w), scales[2:])):
            raise _unsupported(node, f" by a scale that does not give whole sizes ({scales.tolist()})")
        if mode == "nearest":  # the first TFLite form that picks the same source pixel for every output one
            kind = "RESIZE_NEAREST_NEIGHBOR"
            forms = [(align, half) for align in (False, True) for half in (False, True) if not (align and half)
                     if all(np.array_equal(_onnx_nearest(o, i, coords, rounding), _tflite_nearest(o, i, align, half))
                            for o, i in zip(out, (h, w)))]
        elif mode == "linear":
            kind = "RESIZE_BILINEAR"
            if coords == "pytorch_half_pixel" and min(out) > 1:
                coords = "half_pixel"
            forms = {"asymmetric": [(False, False)], "half_pixel": [(False, True)],
                     "align_corners": [(True, False)]}.get(coords, [])
        else:
            forms = []
        if not forms:
            raise _unsupported(node, f" with mode={mode}, coordinate_transformation_mode={coords}"
                                     + (f", nearest_mode={rounding}" if mode == "nearest" else ""))
        align, half = forms[0]
        y = self.new(self.out_name(node.output[0], True), [n, *out, c], nhwc=True)
        size_name = self.add_const(f"{node.name}/size", np.array(out, np.int32))
        self.op(kind, [x, size_name], y, name=node.name, align_corners=align, half_pixel_centers=half)

    def _explicit_pad(self, node, x: str, pads: list[int]) -> str:
        """A PAD op (zeros) in front of a layer whose ONNX padding is not TF's SAME."""
        n, h, w, c = self.g.shapes[x]
        padded = self.new(f"{node.name}/pad", [n, h + pads[0] + pads[2], w + pads[1] + pads[3], c], nhwc=True)
        paddings = np.array([[0, 0], [pads[0], pads[2]], [pads[1], pads[3]], [0, 0]], np.int32)
        self.op("PAD", [x, self.add_const(f"{node.name}/paddings", paddings)], padded)
        return padded

    def lower_Pad(self, node):
        """Zeros around a tensor (tf2onnx writes Keras' ZeroPadding2D so): PAD, at the input's int8
        scale (its grid holds 0 exactly). Constant mode with 0 only, not along the batch axis."""
        a = node_attrs(node)
        mode = a.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        pads = a.get("pads")
        if pads is None and len(node.input) > 1 and node.input[1]:
            pads = self.const(node.input[1], node).astype(np.int64).reshape(-1).tolist()
        value = self.scalar(node.input[2]) if len(node.input) > 2 and node.input[2] else a.get("value", 0.0)
        if len(node.input) > 3 and node.input[3]:
            raise _unsupported(node, " with axes")
        x = self.src(node.input[0])
        rank = len(self.g.shapes[x])
        if mode not in ("constant", "reflect") or (mode == "constant" and value != 0.0) or pads is None \
                or len(pads) != 2 * rank or min(pads) < 0 or pads[0] or pads[rank]:
            raise _unsupported(node, f" of mode {mode}, value {value}, pads {pads} (zeros, or a reflection, around "
                                     "non-batch axes only)")
        onnx_pairs = list(zip(pads[:rank], pads[rank:]))
        pairs = [onnx_pairs[TO_NHWC[i]] for i in range(rank)] if x in self.nhwc else onnx_pairs  # graph axis i: ONNX's TO_NHWC[i]
        shape = [d if d < 0 else d + b + e for d, (b, e) in zip(self.g.shapes[x], pairs)]
        y = self.new(self.out_name(node.output[0], x in self.nhwc), shape, nhwc=x in self.nhwc)
        paddings = self.add_const(f"{node.name}/paddings", np.array(pairs, np.int32))
        if mode == "reflect":  # the samples mirrored about the edge, the edge once (an STFT's centring)
            self.op("MIRROR_PAD", [x, paddings], y, name=node.name, mode="REFLECT")
        else:
            self.op("PAD", [x, paddings], y, name=node.name)

    def lower_Pow(self, node):
        """x² (a spectrogram's power, re² + im²) as MUL of x by itself; x^0.5 as Sqrt is. Other
        exponents are refused."""
        exponent = self.scalar(node.input[1]) if node.input[1] in self.consts else None
        if exponent == 0.5:
            return self._unary(node, "SQRT")
        if exponent != 2.0:
            raise _unsupported(node, f" with exponent {exponent} (2 and 0.5 are mapped)")
        x = self.src(node.input[0])
        y = self.new(self.out_name(node.output[0], x in self.nhwc), list(self.g.shapes[x]), nhwc=x in self.nhwc)
        self.op("MUL", [x, x], y, name=node.name, activation="NONE")
        self.nonneg.add(y)

    def lower_Cast(self, node):
        """A Cast to float32 of a float32 tensor (exporters write them around shape arithmetic) is
        no op; other casts of computed tensors are refused."""
        if node_attrs(node).get("to") != 1:
            raise _unsupported(node, f" to type {node_attrs(node).get('to')}")
        self.alias[node.output[0]] = self.src(node.input[0])

    def lower_BatchNormalization(self, node):
        """A batch norm no conv before it could take (after a ReLU, say) on a feature map: its scale
        and shift per channel as a 1x1 DEPTHWISE_CONV_2D, one int8 op (as tflite_simplify writes
        such pairs). On other tensors it is refused."""
        a = node_attrs(node)
        x = self.src(node.input[0])
        if x not in self.nhwc:
            raise _unsupported(node, " of a tensor that is not a feature map")
        gamma, beta, mean, var = (self.const(n, node).astype(np.float64) for n in node.input[1:5])
        scale = gamma / np.sqrt(var + a.get("epsilon", 1e-5))
        shift = beta - mean * scale
        act, out = self.fuse_activation(node.output[0])
        y = self.new(self.out_name(out, True), self.g.shapes[x], nhwc=True)
        weights = self.add_const(f"{node.name}/scale", scale.astype(np.float32).reshape(1, 1, 1, -1))
        self.op("DEPTHWISE_CONV_2D", [x, weights, self.add_const(f"{node.name}/shift", shift.astype(np.float32))], y,
                name=node.name, padding="VALID", stride=(1, 1), dilation=(1, 1), depth_multiplier=1,
                activation=act)

    def lower_Max(self, node):
        """max(x, c) for a constant c (a clamp from below: tf2onnx's tf.maximum(x, -0.4)) as
        relu(x - c) + c: an ADD with a fused RELU and an ADD, both of which XNNPACK runs in int8.
        The max of two tensors is refused."""
        if len(node.input) != 2 or sum(i in self.consts for i in node.input) != 1:
            raise _unsupported(node, " other than of a tensor and one constant")
        data, const = node.input if node.input[1] in self.consts else node.input[::-1]
        c = self.scalar(const)
        if c is None:
            raise _unsupported(node, " with a constant of more than one value")
        x = self.src(data)
        nhwc, shape = x in self.nhwc, self.g.shapes[x]
        lifted = self.new(f"{node.output[0]}/lifted", shape, nhwc=nhwc)
        self.op("ADD", [x, self.add_const(f"{node.name}/minus_c", np.array([-c], np.float32))], lifted,
                name=node.name, activation="RELU")
        y = self.new(self.out_name(node.output[0], nhwc), shape, nhwc=nhwc)
        self.g.derived[lifted] = (onnx_tensor(y), 1.0, -c, 0.0, math.inf)
        self.op("ADD", [lifted, self.add_const(f"{node.name}/c", np.array([c], np.float32))], y, name=node.name,
                activation="NONE")

    @staticmethod
    def _out_dim(size, k, stride, dilation, mode):
        if size <= 0:
            return size
        if mode == "SAME":
            return -(-size // stride)
        return (size - (k - 1) * dilation - 1) // stride + 1

    def fold_channel_affine(self, node, w, b):
        """(weights, bias, output tensor) of a conv with the per-channel scale-and-shift layers that
        alone consume its output folded in: BatchNormalization; Add, Sub, Mul or Div of a per-channel
        or scalar constant (Paddle2ONNX writes every bias as such an Add, and PP-OCR's blocks end in a
        learned Mul and Add after each conv). `w` is [out channels, ...]."""
        out = node.output[0]
        while len(users := self.consumers.get(out, [])) == 1 and out not in self.graph_outputs:
            user = users[0]
            if user.op_type == "BatchNormalization":
                scale, bias, mean, var = (self.const(user.input[i], user).astype(np.float64) for i in range(1, 5))
                k = scale / np.sqrt(var + node_attrs(user).get("epsilon", 1e-5))
                shift = bias - mean * k
            elif user.op_type in ("Mul", "Add", "Sub", "Div"):
                other = user.input[1] if user.input[0] == out else user.input[0]
                if other not in self.consts or other in self.from_shape or \
                        (user.op_type in ("Sub", "Div") and user.input[1] != other):
                    break
                c = self.consts[other].astype(np.float64)
                if c.ndim > 4 or c.size not in (1, len(b)) or \
                        c.reshape((1,) * (4 - c.ndim) + c.shape).shape[1] != c.size:
                    break  # not one value per output channel
                c = np.broadcast_to(c.reshape(-1), b.shape)
                if user.op_type == "Div" and not np.all(c):
                    break
                k = {"Mul": c, "Div": 1.0 / c}.get(user.op_type, np.ones_like(c))
                shift = {"Add": c, "Sub": -c}.get(user.op_type, np.zeros_like(c))
            else:
                break
            w = (w * k.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
            b = (b * k + shift).astype(np.float32)
            self.done.add(id(user))
            out = user.output[0]
        return w, b, out

    def _fully_connected(self, node, x, w_in_out, bias, out_node):
        """FULLY_CONNECTED from a [in, out] weight (ONNX's layout), permuted for NHWC flattening."""
        x_shape = self.g.shapes[x]
        if len(x_shape) < 2 or x in self.nhwc:
            raise _unsupported(node, f" on a {len(x_shape)}-D {'feature map' if x in self.nhwc else 'input'}")
        if x in self.flat_perm:
            w_in_out = w_in_out[self.flat_perm[x]]
        act, out = self.fuse_activation(out_node.output[0])
        y = self.new(self.out_name(out, False), x_shape[:-1] + [w_in_out.shape[1]])
        wname = self.add_const(f"{node.name}/weights", np.ascontiguousarray(w_in_out.T.astype(np.float32)))
        bname = self.add_const(f"{node.name}/bias", bias.astype(np.float32)) if bias is not None else ""
        # a sequence's tokens ([N, T, D] @ [D, E]) keep their axes: keep_num_dims
        self.op("FULLY_CONNECTED", [x, wname, bname], y, name=node.name, activation=act,
                keep_num_dims=len(x_shape) > 2)

    def lower_Gemm(self, node):
        a = node_attrs(node)
        if a.get("transA", 0):
            raise _unsupported(node, " with transA=1")
        w = self.const(node.input[1], node).astype(np.float32) * a.get("alpha", 1.0)
        if a.get("transB", 0):
            w = w.T
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = np.broadcast_to(self.const(node.input[2], node).astype(np.float32) * a.get("beta", 1.0),
                                   (w.shape[1],)).copy()
        self._fully_connected(node, self.src(node.input[0]), w, bias, node)

    def lower_MatMul(self, node):
        if node.input[1] not in self.consts:
            return self._batch_matmul(node)
        w = self.const(node.input[1], node).astype(np.float32)
        if w.ndim != 2:
            raise _unsupported(node, " with a non-2-D weight")
        out, bias, out_node = node.output[0], None, node
        users = self.consumers.get(out, [])
        if len(users) == 1 and users[0].op_type == "Add" and out not in self.graph_outputs:
            add = users[0]
            other = add.input[1] if add.input[0] == out else add.input[0]
            if other in self.consts and self.consts[other].size == w.shape[1]:
                bias, out_node = self.consts[other].reshape(-1), add
                self.done.add(id(add))
        self._fully_connected(node, self.src(node.input[0]), w, bias, out_node)

    def _batch_matmul(self, node):
        """Two activations multiplied (attention's Q Kᵀ and its weights times V): BATCH_MATMUL, int8
        on both sides with its own output scale. Both as ONNX lays them out, of one rank (3 or 4)
        and the same leading axes: the [N, heads, T, d] of multi-head attention."""
        a, b = (self.in_onnx_layout(self.src(n)) for n in node.input[:2])
        sa, sb = self.g.shapes[a], self.g.shapes[b]
        if len(sa) != len(sb) or len(sa) not in (3, 4) or sa[1:-2] != sb[1:-2] or sa[-1] != sb[-2] \
                or (sa[0] != sb[0] and -1 not in (sa[0], sb[0])):
            raise _unsupported(node, f" of two tensors shaped {sa} and {sb}")
        y = self.new(self.out_name(node.output[0], False), sa[:-1] + [sb[-1]])
        self.op("BATCH_MATMUL", [a, b], y, name=node.name)

    def lower_LayerNormalization(self, node):
        """LayerNormalization (opset 17): see _layer_norm."""
        a = node_attrs(node)
        if len(node.output) > 1 and any(node.output[1:]):
            raise _unsupported(node, " with its mean or inverse deviation as outputs (training graphs)")
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        self._layer_norm(node, self.src(node.input[0]), a.get("axis", -1), a.get("epsilon", 1e-5),
                         self.const(node.input[1], node), bias and self.const(bias, node), node.output[0])

    def _layer_norm(self, node, x: str, axis: int, epsilon: float, scale, bias, out: str) -> None:
        """(x - mean) / sqrt(var + eps) * scale + bias over the axes from `axis` on, kept in float
        inside an INT8 model (Graph.float_layers): MEAN, SUB, MUL, MEAN, ADD, RSQRT, MUL, then the
        scale and the bias where given. Its input is dequantized once, its output quantized for
        the next layer."""
        x = self.in_onnx_layout(x)
        shape = self.g.shapes[x]
        rank = len(shape)
        axis = axis + rank if axis < 0 else axis
        if axis < 1 or any(d <= 0 for d in shape[axis:]):
            raise _unsupported(node, f" over axis {axis} of a tensor shaped {shape}")
        name, inner = node.name, shape[axis:]
        self.g.float_layers.add(name)
        axes = self.add_const(f"{name}/axes", np.arange(axis, rank, dtype=np.int32))
        kept = shape[:axis] + [1] * (rank - axis)
        last = "shifted" if bias is not None else "scaled" if scale is not None else "normed"  # writes `out`

        def step(kind, inputs, tag, out_shape=shape, **options) -> str:
            y = self.new(self.out_name(out, False) if tag == last else f"{out}/{tag}", out_shape)
            self.op(kind, inputs, y, name=name, **options)
            return y

        def const(tag, value):
            return self.add_const(f"{name}/{tag}", np.asarray(value, np.float32))

        mean = step("MEAN", [x, axes], "mean", kept, keep_dims=True)
        centred = step("SUB", [x, mean], "centred", activation="NONE")
        square = step("MUL", [centred, centred], "square", activation="NONE")
        var = step("MEAN", [square, axes], "var", kept, keep_dims=True)
        shifted = step("ADD", [var, const("epsilon", [epsilon])], "var_eps", kept, activation="NONE")
        inverse = step("RSQRT", [shifted], "rsqrt", kept)
        y = step("MUL", [centred, inverse], "normed", activation="NONE")
        if scale is not None:
            y = step("MUL", [y, const("scale", np.asarray(scale, np.float32).reshape(inner))], "scaled",
                     activation="NONE")
        if bias is not None:
            step("ADD", [y, const("bias", np.asarray(bias, np.float32).reshape(inner))], "shifted",
                 activation="NONE")

    def _layer_norm_from_parts(self, node) -> bool:
        """LayerNorm as older exporters write it (torch below opset 17, tf2onnx, Paddle2ONNX's
        PP-OCR recognisers): ReduceMean, Sub, Pow 2, ReduceMean, Add eps, Sqrt, Div, and the
        Mul and Add of a scale and a bias where they follow. Lowered as _layer_norm; False where
        the ReduceMean at `node` starts no such chain."""
        def users(name):
            return [] if name in self.graph_outputs else self.consumers.get(name, [])

        sole = self.reader_of

        def constant(n, data):
            c = [i for i in n.input if i != data]
            return self.consts.get(c[0]) if len(c) == 1 and len(n.input) == 2 else None

        x, mean = node.input[0], node.output[0]
        shape = self.g.shapes.get(self.src(x), [])  # as lowered: known where ONNX's inference gave up
        if self.src(x) in self.nhwc:
            shape = [shape[i] for i in TO_NCHW]
        axes, rank = self.axes_of(node), len(shape)
        if not rank or axes is None or not node_attrs(node).get("keepdims", 1) or \
                sorted(v % rank for v in axes) != list(range(rank - len(axes), rank)):
            return False
        sub = sole(mean, "Sub")
        if sub is None or list(sub.input) != [x, mean]:
            return False
        d = sub.output[0]
        pow_ = next((u for u in users(d) if u.op_type == "Pow"), None)
        div = next((u for u in users(d) if u.op_type == "Div" and list(u.input[:1]) == [d]), None)
        if pow_ is None or div is None or len(users(d)) != 2 or self.scalar(pow_.input[1]) != 2.0:
            return False
        var = sole(pow_.output[0], "ReduceMean")
        add = var is not None and sorted(self.axes_of(var) or []) == sorted(axes) and sole(var.output[0], "Add")
        eps = add and constant(add, var.output[0])
        sqrt = eps is not None and add and sole(add.output[0], "Sqrt")
        if not sqrt or np.asarray(eps).size != 1 or sole(sqrt.output[0], "Div") is not div:
            return False
        chain, out, scale, bias = [node, sub, pow_, var, add, sqrt, div], div.output[0], None, None
        mul = sole(out, "Mul")
        if mul is not None and constant(mul, out) is not None:
            scale, out = constant(mul, out), mul.output[0]
            chain.append(mul)
        plus = sole(out, "Add")
        if plus is not None and constant(plus, out) is not None:
            bias, out = constant(plus, out), plus.output[0]
            chain.append(plus)
        inner = shape[rank - len(axes):]
        for c in (scale, bias):  # one value per normalised element, or one for all
            if c is not None and np.asarray(c).size not in (1, int(np.prod(inner))):
                return False
        self.done.update(id(n) for n in chain)
        size = int(np.prod(inner))
        fit = lambda c: None if c is None else np.broadcast_to(np.asarray(c, np.float32).reshape(-1), (size,))  # noqa: E731
        self._layer_norm(node, self.src(x), rank - len(axes), float(np.asarray(eps).reshape(-1)[0]), fit(scale),
                         fit(bias), out)
        return True

    def _gelu_from_erf(self, node) -> bool:
        """x * 0.5 * (1 + erf(x / sqrt 2)), as torch exports nn.GELU (Div, Erf, Add, Mul, Mul; or a
        Mul by 1/sqrt 2): one GELU op, which has an int8 kernel. False where `node` starts no such
        chain."""
        def other(n, name):  # a two-input node's input that is not `name`
            return n.input[1] if n.input[0] == name else n.input[0]

        def near(value, want):
            return value is not None and bool(np.isclose(value, want, rtol=1e-4))

        x = node.input[0]
        if not near(self.scalar(node.input[1]), math.sqrt(2) if node.op_type == "Div" else 1 / math.sqrt(2)):
            return False
        erf = self.reader_of(node.output[0], "Erf")
        plus = erf and self.reader_of(erf.output[0], "Add")
        if not plus or not near(self.scalar(other(plus, erf.output[0])), 1.0):
            return False
        first = self.reader_of(plus.output[0], "Mul")  # then times x and times 0.5, in either order
        second = first and self.reader_of(first.output[0], "Mul")
        if not second:
            return False
        chain = [first, second]
        factors = [other(first, plus.output[0]), other(second, first.output[0])]
        halves = [f for f in factors if f in self.consts]
        if len(halves) != 1 or not near(self.scalar(halves[0]), 0.5) or x not in factors:
            return False
        self.done.update(id(n) for n in (erf, plus, *chain))
        self._unary(chain[-1], "GELU", source=x, approximate=False)
        return True

    def lower_Gelu(self, node):
        """GELU (ONNX opset 20), exact or by its tanh approximation."""
        self._unary(node, "GELU", approximate=node_attrs(node).get("approximate", "none") == "tanh")

    def _unary(self, node, kind, source: str | None = None, **options):
        x = self.src(source or node.input[0])
        y = self.new(self.out_name(node.output[0], x in self.nhwc), self.g.shapes[x], nhwc=x in self.nhwc)
        self.op(kind, [x], y, name=node.name, **options)

    def lower_LeakyRelu(self, node):
        """max(x, alpha x) (YOLO's and many detectors' activation): LEAKY_RELU."""
        self._unary(node, "LEAKY_RELU", alpha=float(node_attrs(node).get("alpha", 0.01)))

    def lower_PRelu(self, node):
        """max(x, slope x) with a learned slope per channel (face detectors' activation): PRELU,
        the slope in the tensor's layout (a [C, 1, 1] slope of a feature map as [1, 1, C])."""
        x = self.src(node.input[0])
        slope = self._const_like(node, self.const(node.input[1], node).astype(np.float32), x)
        slope = slope.reshape(slope.shape[1:])  # PRELU's alpha broadcasts against one row
        y = self.new(self.out_name(node.output[0], x in self.nhwc), self.g.shapes[x], nhwc=x in self.nhwc)
        self.op("PRELU", [x, self.add_const(f"{node.name}/slope", slope)], y, name=node.name)

    def lower_Clip(self, node):
        act = self.activation_of(node)
        if act is None:
            raise _unsupported(node, f" with bounds {self.clip_bounds(node)} (only 0..6 and 0..inf)")
        self._unary(node, act)

    def lower_Softmax(self, node):
        """SOFTMAX works over the last axis: a feature map's channels are that axis already
        (NHWC); another axis of a plain tensor (YOLOv8's DFL: axis 1 of [N, 16, 4, A]) is moved
        there and back by TRANSPOSEs."""
        x = self.src(node.input[0])
        rank = len(self.g.shapes[x])
        axis = node_attrs(node).get("axis", -1 if self.model.opset_import[0].version >= 13 else 1)
        axis = axis + rank if axis < 0 else axis
        if self.model.opset_import[0].version < 13 and axis != rank - 1:
            raise _unsupported(node, " of opset < 13 over an axis other than the last (it flattens the axes after it)")
        if x in self.nhwc and axis != 1:
            x = self.in_onnx_layout(x)
        if x in self.nhwc or axis == rank - 1:
            y = self.new(self.out_name(node.output[0], x in self.nhwc), self.g.shapes[x], nhwc=x in self.nhwc)
            return self.op("SOFTMAX", [x], y, name=node.name, beta=1.0)
        perm = [i for i in range(rank) if i != axis] + [axis]
        moved = self.transpose(x, perm, f"{node.output[0]}/moved", name=node.name)
        soft = self.new(f"{node.output[0]}/softmax", self.g.shapes[moved])
        self.op("SOFTMAX", [moved], soft, name=node.name, beta=1.0)
        self.transpose(soft, [perm.index(i) for i in range(rank)], self.out_name(node.output[0], False), name=node.name)

    def _softmax_of_an_old_opset(self, node) -> bool:
        """Flatten(x, axis) -> Softmax -> Reshape back to Shape(x): how onnx's version converter
        writes an opset 11/12 Softmax (which flattened the axes from `axis` on) at opset 13. Over the
        last axis, as attention's is, it is one SOFTMAX of x; False for any other form."""
        x = self.src(node.input[0])
        rank, axis = len(self.g.shapes[x]), node_attrs(node).get("axis", 1)
        soft = self.reader_of(node.output[0], "Softmax")
        back = soft and self.reader_of(soft.output[0], "Reshape")
        shape_of = back and next((n for n in self.model.graph.node if back.input[1] in n.output), None)
        if not shape_of or shape_of.op_type != "Shape" or shape_of.input[0] != node.input[0] or \
                axis % rank != rank - 1 or node_attrs(soft).get("axis", 1) % 2 != 1:
            return False
        x = self.in_onnx_layout(x)
        self.done.update((id(soft), id(back)))
        y = self.new(self.out_name(back.output[0], False), self.g.shapes[x])
        self.op("SOFTMAX", [x], y, name=soft.name, beta=1.0)
        return True

    def lower_Transpose(self, node):
        """A permutation of a tensor's axes as ONNX numbers them: TRANSPOSE (a feature map is
        first read in ONNX's layout, the two permutations made one)."""
        x = self.src(node.input[0])
        rank = len(self.g.shapes[x])
        perm = list(node_attrs(node).get("perm", list(range(rank))[::-1]))
        if perm[0] != 0 and x not in self.nhwc and self._unbind_after_transpose(node, x, perm):
            return
        if perm[0] != 0 and not self.along_first_axis(x):
            raise _unsupported(node, f" with perm {perm}, which moves the batch axis")
        if x in self.nhwc:  # ONNX's axis i of x is the graph's axis TO_NHWC.index(i)
            perm = [TO_NHWC.index(p) for p in perm]
        self.transpose(x, perm, self.out_name(node.output[0], False), name=node.name)

    def _unbind_after_transpose(self, node, x: str, perm: list[int]) -> bool:
        """A transpose that brings an axis to the front only to take its parts one by one (timm's
        and PP-OCR's attention: qkv reshaped to [N, T, 3, heads, d], permuted [2, 0, 3, 1, 4], then
        q, k, v taken at index 0, 1, 2 of the new first axis, by Slice and Squeeze or by Gather):
        each part is cut from x along that axis instead (SLICE), the axis dropped (RESHAPE) and the
        rest permuted with the batch first (TRANSPOSE). False where the consumers differ."""
        axis, parts = perm[0], []
        for user in self.consumers.get(node.output[0], []):
            index = self._taken_index(user, node.output[0])
            if index is None:
                return False
            parts.append(index)
        rest = [p - (p > axis) for p in perm[1:]]
        shape = self.g.shapes[x]
        if not parts or node.output[0] in self.graph_outputs or rest[0] != 0 or shape[axis] <= 0:
            return False
        for first, last, index, tag in parts:
            self.done.update((id(first), id(last)))
            begin = [0] * len(shape)
            begin[axis] = index
            part = f"{node.output[0]}/{tag}"
            self.slice(node, x, begin, [1 if i == axis else d for i, d in enumerate(shape)], part, part)
            flat_shape = [d for i, d in enumerate(shape) if i != axis]
            flat = self.new(f"{part}/squeezed", flat_shape)
            target = np.array([-1 if flat_shape[0] < 0 else flat_shape[0]] + flat_shape[1:], np.int32)
            self.op("RESHAPE", [part, self.add_const(f"{part}/shape", target)], flat, name=node.name,
                    new_shape=target)
            self.transpose(flat, rest, self.out_name(last.output[0], False), name=node.name)
        return True

    def _taken_index(self, user, t: str) -> tuple[object, object, int, str] | None:
        """(`user`, the node that ends the taking, index, a tag) where `user` takes one index of tensor t's first axis
        and drops that axis: Slice [i, i+1) on axis 0 then Squeeze of axis 0, or Gather of a scalar."""
        if user.op_type == "Gather" and node_attrs(user).get("axis", 0) == 0 and user.input[0] == t:
            i = self.consts.get(user.input[1])
            return (user, user, int(i), f"part{int(i)}") if i is not None and np.ndim(i) == 0 else None
        if user.op_type != "Slice" or len(user.input) < 3:
            return None
        operands = [self.consts.get(n) if n else None for n in list(user.input[1:]) + [""] * (5 - len(user.input))]
        starts, ends, axes, steps = operands
        if starts is None or ends is None or np.size(starts) != 1 or (axes is not None and int(np.reshape(axes, -1)[0]) != 0) \
                or (steps is not None and int(np.reshape(steps, -1)[0]) != 1):
            return None
        start, end = int(np.reshape(starts, -1)[0]), int(np.reshape(ends, -1)[0])
        squeeze = self.reader_of(user.output[0], "Squeeze")
        if end != start + 1 or start < 0 or squeeze is None:
            return None
        if self.axes_of(squeeze) != [0]:
            return None
        return user, squeeze, start, f"part{start}"

    def _pool(self, node, kind):
        a = node_attrs(node)
        x = self.src(node.input[0])
        if x not in self.nhwc:
            raise _unsupported(node, " on a non-4D input")
        if a.get("ceil_mode", 0):
            raise _unsupported(node, " with ceil_mode=1")
        n, h, w, c = self.g.shapes[x]
        k = tuple(a["kernel_shape"])
        stride = tuple(a.get("strides", [1, 1]))
        pads = list(a.get("pads", [0, 0, 0, 0]))
        mode = self.padding((h, w), k, stride, (1, 1), pads, a.get("auto_pad", "NOTSET"))
        if mode is None and kind == "MAX_POOL_2D" and x in self.nonneg:  # e.g. ResNet's stem after a ReLU
            x, (h, w) = self._explicit_pad(node, x, pads), (h + pads[0] + pads[2], w + pads[1] + pads[3])
            mode = "VALID"
        if mode is None or (mode == "SAME" and kind == "AVERAGE_POOL_2D" and a.get("count_include_pad", 0)):
            raise _unsupported(node, " with padding other than SAME or VALID (or of a possibly negative input)")
        shape = [n, self._out_dim(h, k[0], stride[0], 1, mode), self._out_dim(w, k[1], stride[1], 1, mode), c]
        y = self.new(self.out_name(node.output[0], True), shape, nhwc=True)
        self.op(kind, [x], y, name=node.name, padding=mode, stride=stride, filter=k)

    def lower_GlobalAveragePool(self, node):
        self._average_over_image(node, self.src(node.input[0]), self.out_name(node.output[0], True))

    def _average_over_image(self, node, x: str, y: str) -> str:
        n, h, w, c = self.g.shapes[x]
        if h <= 0 or w <= 0:
            raise _unsupported(node, " on an input of unknown height/width")
        y = self.new(y, [n, 1, 1, c], nhwc=True)
        self.op("AVERAGE_POOL_2D", [x], y, name=node.name, padding="VALID", stride=(1, 1), filter=(h, w))
        return y

    def lower_ReduceMean(self, node):
        """The mean over an image's height and width (torch's AdaptiveAvgPool2d(1) and x.mean((2, 3)),
        as exporters write them): a global average pool, then [N, C] unless keepdims. The axes are
        an attribute up to opset 17 and an input from opset 18 (torch.onnx.export's default now)."""
        a = node_attrs(node)
        axes = self.axes_of(node)
        x = self.src(node.input[0])
        if x not in self.nhwc or axes is None or sorted(v % 4 for v in axes) != [2, 3]:
            return self._mean(node, x, axes, bool(a.get("keepdims", 1)))
        if a.get("keepdims", 1):
            self._average_over_image(node, x, self.out_name(node.output[0], True))
            return
        self._flatten_to_2d(node, self._average_over_image(node, x, f"{node.output[0]}/pooled"))

    def _mean(self, node, x: str, axes: list[int] | None, keep: bool) -> None:
        """The mean over any other axes (a transformer's tokens: [N, T, D] -> [N, D]) as ONNX numbers
        them: MEAN, int8 with its own output scale. Not over the batch."""
        x = self.in_onnx_layout(x)
        shape = self.g.shapes[x]
        rank = len(shape)
        axes = sorted({int(v) % rank for v in (range(rank) if axes is None else axes)})
        if 0 in axes or any(shape[i] <= 0 for i in axes):
            raise _unsupported(node, f" over axes {axes} of a tensor shaped {shape}")
        out_shape = [1 if i in axes else d for i, d in enumerate(shape)] if keep else \
            [d for i, d in enumerate(shape) if i not in axes]
        y = self.new(self.out_name(node.output[0], False), out_shape)
        self.op("MEAN", [x, self.add_const(f"{node.name}/axes", np.array(axes, np.int32))], y, name=node.name,
                keep_dims=keep)

    def _flatten_to_2d(self, node, x):
        """[N, features]. A feature map's features come in NHWC order: where only Gemm/MatMul
        layers read them, their weights are permuted to match (flat_perm); elsewhere the map
        is transposed back to ONNX's NCHW first."""
        shape = self.g.shapes[x]
        batch = shape[0]
        feats = int(np.prod([d for d in shape[1:]]))
        if any(d <= 0 for d in shape[1:]):
            raise _unsupported(node, " of an input with unknown dimensions")
        perm = None
        if x in self.nhwc and shape[1] * shape[2] > 1:
            _, h, w, c = shape
            users = self.consumers.get(node.output[0], [])
            if users and all(u.op_type in ("Gemm", "MatMul") and u.input[0] == node.output[0] for u in users) \
                    and node.output[0] not in self.graph_outputs:
                perm = np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).reshape(-1)
            else:
                x = self.in_onnx_layout(x)
        y = self.new(self.out_name(node.output[0], False), [batch, feats])
        new_shape = np.array([-1 if batch == -1 else batch, feats], np.int32)
        self.op("RESHAPE", [x, self.add_const(f"{node.name}/shape", new_shape)], y, name=node.name,
                new_shape=new_shape)
        if perm is not None:
            self.flat_perm[y] = perm

    def lower_Flatten(self, node):
        if node_attrs(node).get("axis", 1) != 1 and self._softmax_of_an_old_opset(node):
            return
        if node_attrs(node).get("axis", 1) != 1:
            raise _unsupported(node, " with axis other than 1")
        self._flatten_to_2d(node, self.src(node.input[0]))

    def lower_Reshape(self, node):
        x = self.src(node.input[0])
        target = self.const(node.input[1], node).astype(np.int64)
        if node_attrs(node).get("allowzero", 0) and 0 in target:
            raise _unsupported(node, " with allowzero and a 0 in its shape")
        if len(target) == 2 and target[1] in (-1, int(np.prod(self.g.shapes[x][1:]))):
            return self._flatten_to_2d(node, x)
        x = self.in_onnx_layout(x)
        shape = [int(d) for d in target]
        if any(d < 0 for d in self.g.shapes[x][1:]) and (-1 in shape[1:] or 0 in shape[1:]):
            raise _unsupported(node, f" to {target.tolist()} of a tensor whose shape {self.g.shapes[x]} is not fixed")
        if 0 in shape[1:]:  # ONNX's 0: the input's own size on that axis
            shape = [self.g.shapes[x][i] if d == 0 and i else d for i, d in enumerate(shape)]
        if -1 in shape[1:]:
            known = int(np.prod([d for d in shape[1:] if d != -1]))
            shape[shape.index(-1, 1)] = int(np.prod(self.g.shapes[x][1:])) // known
        if shape[0] == -1 and self.fixed_first_axis(x) and all(d > 0 for d in shape[1:]):
            shape[0] = int(np.prod(self.g.shapes[x])) // int(np.prod(shape[1:]))  # [T, B, H] -> [T*B, H]
        shape[0] = self.g.shapes[x][0] if shape[0] in (0, -1) else shape[0]
        self._reshape(node, x, shape)

    def _reshape(self, node, x: str, shape: list[int]) -> None:
        """node's output as x (in ONNX's layout) reshaped to `shape`, the batch kept free (-1)."""
        y = self.new(self.out_name(node.output[0], False), shape)
        new_shape = np.array([-1 if shape[0] == -1 else shape[0]] + shape[1:], np.int32)
        self.op("RESHAPE", [x, self.add_const(f"{node.name}/shape", new_shape)], y, name=node.name,
                new_shape=new_shape)

    def lower_Squeeze(self, node):
        """Axes of size 1 dropped (a recogniser's [N, C, 1, W] map to [N, C, W]): RESHAPE in ONNX's
        layout, which keeps the int8 scale. Not the batch axis."""
        x = self.in_onnx_layout(self.src(node.input[0]))
        shape = self.g.shapes[x]
        axes = self.axes_of(node)
        axes = [i for i, d in enumerate(shape) if d == 1 and i] if axes is None else sorted(a % len(shape) for a in axes)
        if (0 in axes and not self.along_first_axis(x)) or any(shape[i] != 1 for i in axes):
            raise _unsupported(node, f" of axes {axes} of a tensor shaped {shape}")
        self._reshape(node, x, [d for i, d in enumerate(shape) if i not in axes])

    def lower_Unsqueeze(self, node):
        """Axes of size 1 put in: RESHAPE in ONNX's layout. Not before the batch axis."""
        x = self.in_onnx_layout(self.src(node.input[0]))
        shape = list(self.g.shapes[x])
        axes = self.axes_of(node) or []
        axes = sorted(a % (len(shape) + len(axes)) for a in axes)
        if not axes or (0 in axes and not self.along_first_axis(x)):
            raise _unsupported(node, f" of axes {axes}")
        for a in axes:
            shape.insert(a, 1)
        self._reshape(node, x, shape)

    def lower_Split(self, node):
        """A tensor cut into parts along one axis: YOLOv8's C2f blocks split a feature map's
        channels in two (torch's x.chunk(2, 1)). One SLICE per part: it keeps the input's int8
        scale and runs in XNNPACK. Sizes come from the `split` input (opset 13+), the attribute
        (older), or equal parts, the last one smaller where they do not divide (opset 18)."""
        a = node_attrs(node)
        x = self.src(node.input[0])
        axis = self._graph_axis(node, x, a.get("axis", 0))
        total = self.g.shapes[x][axis]
        if total <= 0:
            raise _unsupported(node, " along an axis of unknown size")
        if len(node.input) > 1 and node.input[1]:
            sizes = [int(v) for v in self.const(node.input[1], node).reshape(-1)]
        elif "split" in a:
            sizes = [int(v) for v in a["split"]]
        else:
            part = -(-total // len(node.output))
            sizes = [min(part, total - i * part) for i in range(len(node.output))]
        if len(sizes) != len(node.output) or sum(sizes) != total or min(sizes) <= 0:
            raise _unsupported(node, f" into parts {sizes} of an axis of {total}")
        start = 0
        for out, size in zip(node.output, sizes):
            if out:  # an output nobody reads has no name
                self._window(node, x, {axis: (start, size)}, out)
            start += size

    def lower_Gather(self, node):
        """One index of an axis taken (a recurrent classifier's last step, y[:, -1]): a SLICE, then a
        RESHAPE without that axis where the index is a scalar. A constant index only."""
        x = self.in_onnx_layout(self.src(node.input[0]))
        index = self.const(node.input[1], node)
        if index.size != 1 or index.ndim > 1:
            raise _unsupported(node, f" of indices shaped {list(index.shape)}")
        axis = self._graph_axis(node, x, node_attrs(node).get("axis", 0))
        shape = list(self.g.shapes[x])
        i = int(index.reshape(-1)[0])
        i = i + shape[axis] if i < 0 else i
        if shape[axis] <= 0 or not 0 <= i < shape[axis]:
            raise _unsupported(node, f" of index {int(index.reshape(-1)[0])} along an axis of {shape[axis]}")
        begin, size = [0] * len(shape), [1 if k == axis else d for k, d in enumerate(shape)]
        begin[axis] = i
        if index.ndim == 1:
            return self.slice(node, x, begin, size, self.out_name(node.output[0], False), node.output[0])
        part = f"{node.output[0]}/taken"
        self.slice(node, x, begin, size, part, part)
        self._reshape(node, part, [d for k, d in enumerate(shape) if k != axis])

    def lower_Slice(self, node):
        """A window of a tensor along non-batch axes with step 1 (a crop; a head's box and class
        columns): SLICE. Starts, ends and axes must be constants."""
        a = node_attrs(node)
        x = self.src(node.input[0])
        if len(node.input) > 1:  # opset 10 on: inputs
            def operand(i):
                return self.const(node.input[i], node).astype(np.int64).reshape(-1).tolist() \
                    if len(node.input) > i and node.input[i] else None
            starts, ends, axes, steps = operand(1), operand(2), operand(3), operand(4)
        else:
            starts, ends, axes, steps = list(a["starts"]), list(a["ends"]), a.get("axes"), None
        axes = list(range(len(starts))) if axes is None else list(axes)
        if any(step != 1 for step in steps or []):
            raise _unsupported(node, f" with steps {steps}")  # TFLite's STRIDED_SLICE: not mapped yet
        window = {}
        for start, end, onnx_axis in zip(starts, ends, axes):
            if start == 0 and end >= 2**31 - 1:  # the whole axis (x[:, :129, :] names every axis): nothing to cut
                continue
            axis = self._graph_axis(node, x, onnx_axis)
            dim = self.g.shapes[x][axis]
            if dim <= 0:
                raise _unsupported(node, " along an axis of unknown size")
            start, end = (min(max(v + dim if v < 0 else v, 0), dim) for v in (start, end))
            if end <= start:
                raise _unsupported(node, " that selects nothing")
            window[axis] = (start, end - start)
        self._window(node, x, window, node.output[0])

    def _graph_axis(self, node, x: str, axis: int) -> int:
        """ONNX's axis `axis` of tensor x, as the graph holds x (a feature map's channels are
        NHWC's last axis). The batch axis stays whole: the batch is the caller's."""
        rank = len(self.g.shapes[x])
        axis = axis + rank if axis < 0 else axis
        if axis == 0 and self.along_first_axis(x):
            return 0
        if not 0 < axis < rank:
            raise _unsupported(node, " along the batch axis" if axis == 0 else f" along axis {axis}")
        if x in self.flat_perm:
            raise _unsupported(node, " of a flattened feature map")
        return TO_NHWC.index(axis) if x in self.nhwc else axis

    def fixed_first_axis(self, x: str) -> bool:
        """Whether an op may work along x's first axis: one of known size in ONNX's layout (a
        recurrent model's time steps or layers, or a batch the model fixes). A free batch is the
        caller's, which the agent may fill with several requests' rows."""
        return x not in self.nhwc and x not in self.flat_perm and all(d > 0 for d in self.g.shapes[x])

    def along_first_axis(self, x: str) -> bool:
        """Whether an op may work along x's first axis (fixed_first_axis). Where that axis is the
        free batch, the model is lowered again for batches of one (_NeedsFixedBatch), as it is for a
        recurrent layer: a PyTorch GRU with batch_first=True transposes its input to time-major."""
        if self.fixed_first_axis(x):
            return True
        if x not in self.nhwc and x not in self.flat_perm and self.g.shapes[x][:1] == [-1] \
                and all(d > 0 for d in self.g.shapes[x][1:]):
            raise _NeedsFixedBatch()
        return False

    def _window(self, node, x: str, window: dict[int, tuple[int, int]], onnx_out: str) -> None:
        """`onnx_out` as a SLICE of x: {graph axis: (start, size)}, the other axes whole."""
        shape = list(self.g.shapes[x])
        begin = [0] * len(shape)
        for axis, (start, size) in window.items():
            begin[axis], shape[axis] = start, size
        self.slice(node, x, begin, shape, self.out_name(onnx_out, x in self.nhwc), f"{node.name}/{onnx_out}")

    def slice(self, node, x: str, begin: list[int], shape: list[int], y: str, tag: str) -> None:
        """y, of `shape`, as the window of x from `begin`: one SLICE (which keeps x's int8 scale),
        the batch and unknown sizes written as -1 ("to the end")."""
        self.new(y, shape, nhwc=x in self.nhwc)
        whole_first = begin[0] == 0 and shape[0] == self.g.shapes[x][0]
        size = [-1 if (i == 0 and whole_first) or d < 0 else d for i, d in enumerate(shape)]
        self.op("SLICE", [x, self.add_const(f"{tag}/begin", np.array(begin, np.int32)),
                          self.add_const(f"{tag}/size", np.array(size, np.int32))], y, name=node.name)

    def lower_Concat(self, node):
        xs = [self.src(n) for n in node.input]
        if any(n in self.consts for n in node.input):
            raise _unsupported(node, " with a constant input")
        if len({x in self.nhwc for x in xs}) != 1:  # maps beside tensors in ONNX's layout: all in ONNX's
            xs = [self.in_onnx_layout(x) for x in xs]
        shape0 = self.g.shapes[xs[0]]
        rank = len(shape0)
        axis = node_attrs(node).get("axis", 1)
        axis = axis + rank if axis < 0 else axis
        nhwc = xs[0] in self.nhwc
        if nhwc:
            if axis != 1:
                raise _unsupported(node, " of feature maps along an axis other than channels")
            axis = 3
        elif axis == 0 and not all(self.along_first_axis(x) for x in xs):
            raise _unsupported(node, " along the batch axis")
        shape = list(shape0)
        shape[axis] = sum(self.g.shapes[x][axis] for x in xs)
        # no fused activation: TFLite's CONCATENATION kernels ignore it (a Relu after it is its own op)
        y = self.new(self.out_name(node.output[0], nhwc), shape, nhwc=nhwc)
        self.op("CONCATENATION", xs, y, name=node.name, axis=axis, activation="NONE")
        if all(x in self.nonneg for x in xs):
            self.nonneg.add(y)

    def _binary(self, node, kind):
        """Two tensors, or a tensor and a constant (x + 3, x / 6, a per-channel scale), where
        numpy's broadcasting gives the tensor's own shape or one of the two's (a squeeze-excite
        block's [N, 1, 1, C] times [N, H, W, C])."""
        a, b = node.input[:2]
        if a in self.consts and b in self.consts:
            raise _unsupported(node, " of two constants")
        if a in self.from_shape or b in self.from_shape:
            raise _unsupported(node, " computed from a tensor's shape")
        if a in self.consts or b in self.consts:
            const_first = a in self.consts
            x = self.src(b if const_first else a)
            c = self.consts[a if const_first else b].astype(np.float32)
            if kind == "DIV":
                if const_first or not np.all(c):
                    raise _unsupported(node, " other than by a non-zero constant")
                c, kind = (1.0 / c).astype(np.float32), "MUL"
            c = self.add_const(f"{node.name}/const", self._const_like(node, c, x))
            pair = [c, x] if const_first else [x, c]
            shape = self.g.shapes[x]
        else:
            if kind == "DIV":
                raise _unsupported(node, " other than by a non-zero constant")
            pair = [self.src(a), self.src(b)]
            if (pair[0] in self.nhwc) != (pair[1] in self.nhwc):  # a map and a tensor in ONNX's layout
                pair = [self.in_onnx_layout(t) for t in pair]
            x, z = pair
            shape = self._broadcast(node, self.g.shapes[x], self.g.shapes[z])
        nhwc = pair[0] in self.nhwc or pair[1] in self.nhwc
        act, out = self.fuse_activation(node.output[0])
        y = self.new(self.out_name(out, nhwc), shape, nhwc=nhwc)
        self.op(kind, pair, y, name=node.name, activation=act)

    def _broadcast(self, node, s1: list[int], s2: list[int]) -> list[int]:
        """The shape two tensors broadcast to (-1, a free batch, broadcasts as itself)."""
        if len(s1) != len(s2):
            raise _unsupported(node, f" broadcasting {s1} with {s2}")
        out = []
        for d1, d2 in zip(s1, s2):
            if d1 == d2 or d2 == 1:
                out.append(d1)
            elif d1 == 1:
                out.append(d2)
            else:
                raise _unsupported(node, f" broadcasting {s1} with {s2}")
        return out

    def _const_like(self, node, c: np.ndarray, x: str) -> np.ndarray:
        """A constant operand of tensor `x` in the graph's layout: rank-matched (NCHW-broadcastable
        constants of a feature map, such as a [C, 1, 1] scale, go to NHWC as [1, 1, 1, C]), and
        refused where it would change the tensor's shape."""
        onnx_shape = self.g.shapes[x] if x not in self.nhwc else [self.g.shapes[x][i] for i in TO_NCHW]
        if c.ndim > len(onnx_shape):
            raise _unsupported(node, f" with a constant of rank {c.ndim} on a tensor of rank {len(onnx_shape)}")
        c = c.reshape((1,) * (len(onnx_shape) - c.ndim) + c.shape)
        if c.shape[0] != 1 or any(cd not in (1, xd) for cd, xd in zip(c.shape, onnx_shape)):
            raise _unsupported(node, f" with a constant of shape {list(c.shape)} on {onnx_shape}")
        return np.ascontiguousarray(c.transpose(TO_NHWC)) if x in self.nhwc else c

    def lower_HardSigmoid(self, node):
        """max(0, min(1, alpha x + beta)): a MobileNetV3 squeeze-excite block ends in one."""
        a = node_attrs(node)
        x = self.src(node.input[0])
        self._hard_sigmoid(node, x, float(a.get("alpha", 0.2)), float(a.get("beta", 0.5)),
                           self.out_name(node.output[0], x in self.nhwc))

    def lower_HardSwish(self, node):
        """x * relu6(x + 3) / 6, as ADD (fused RELU6), MUL and MUL by 1/6: TFLite's HARD_SWISH has
        no int8 kernel in XNNPACK, and seven of them in a small MobileNetV3 made its INT8 model 5x
        slower than FP32; these ops all run there, and the next conv absorbs the last one
        (tflite_simplify)."""
        x = self.src(node.input[0])
        nhwc, shape = x in self.nhwc, self.g.shapes[x]
        clipped = self._hard_sigmoid(node, x, 1 / 6, 0.5, None)
        y = self.out_name(node.output[0], nhwc)
        product = self.new(f"{node.output[0]}/x6", shape, nhwc=nhwc)
        self.op("MUL", [x, clipped], product, name=node.name, activation="NONE")
        self.g.derived[product] = (y, 6.0, 0.0, -math.inf, math.inf)
        self.new(y, shape, nhwc=nhwc)
        self.op("MUL", [product, self.add_const(f"{node.name}/sixth_out", np.array([1 / 6], np.float32))], y,
                name=node.name, activation="NONE")

    def _hard_sigmoid(self, node, x: str, alpha: float, beta: float, out: str | None) -> str:
        """relu6(6 alpha x + 6 beta) / 6 into tensor `out` (TFLite has no hard-sigmoid), or without
        the / 6 where `out` is None: the tensor then returned holds 6x the hard-sigmoid. The steps
        have no ONNX tensor to calibrate; their ranges follow from x's (Graph.derived), as does
        `out`'s where it is not an ONNX tensor either."""
        nhwc, shape = x in self.nhwc, self.g.shapes[x]
        scalar = lambda tag, v: self.add_const(f"{node.name}/{tag}", np.array([v], np.float32))  # noqa: E731
        if abs(6 * alpha - 1) > 1e-6:
            scaled = self.new(f"{node.output[0]}/scaled", shape, nhwc=nhwc)
            self.op("MUL", [x, scalar("alpha6", 6 * alpha)], scaled, name=node.name, activation="NONE")
            self.g.derived[scaled] = (x, 6 * alpha, 0.0, -math.inf, math.inf)
            x = scaled
        clipped = self.new(f"{node.output[0]}/relu6", shape, nhwc=nhwc)
        self.op("ADD", [x, scalar("beta6", 6 * beta)], clipped, name=node.name, activation="RELU6")
        self.g.derived[clipped] = (x, 1.0, 6 * beta, 0.0, 6.0)
        if out is None:
            return clipped
        y = self.new(out, shape, nhwc=nhwc)
        self.op("MUL", [clipped, scalar("sixth", 1 / 6)], y, name=node.name, activation="NONE")
        if onnx_tensor(out) != node.output[0]:
            self.g.derived[y] = (clipped, 1 / 6, 0.0, 0.0, 1.0)
        return y


def _onnx_nearest(out: int, size: int, coords: str, rounding: str) -> np.ndarray:
    """The source index ONNX's Resize (mode nearest) reads for each output index along one axis."""
    x = np.arange(out, dtype=np.float64)
    scale = out / size
    v = {"half_pixel": (x + 0.5) / scale - 0.5,
         "pytorch_half_pixel": (x + 0.5) / scale - 0.5 if out > 1 else np.zeros_like(x),
         "asymmetric": x / scale,
         "tf_half_pixel_for_nn": (x + 0.5) / scale,
         "align_corners": x * (size - 1) / (out - 1) if out > 1 else np.zeros_like(x)}.get(coords)
    if v is None:
        return np.full(out, -1)
    picked = {"round_prefer_floor": np.ceil(v - 0.5), "round_prefer_ceil": np.floor(v + 0.5),
              "floor": np.floor(v), "ceil": np.ceil(v)}[rounding]
    return np.clip(picked, 0, size - 1).astype(np.int64)


def _tflite_nearest(out: int, size: int, align: bool, half: bool) -> np.ndarray:
    """The source index TFLite's RESIZE_NEAREST_NEIGHBOR reads (its reference kernel, in float32)."""
    x = np.arange(out, dtype=np.float32)
    scale = np.float32((size - 1) / (out - 1) if align and out > 1 else size / out)
    v = (x + np.float32(0.5 if half else 0.0)) * scale
    picked = np.where(v >= 0, np.floor(v + np.float32(0.5)), np.ceil(v - np.float32(0.5))) if align else np.floor(v)
    return np.clip(picked, 0, size - 1).astype(np.int64)


def lower(model) -> Graph:
    """The ONNX model as a TFLite op graph; one ConversionError naming the first unmappable layer."""
    for vi in model.graph.input:
        if vi.type.tensor_type.elem_type != 1 and vi.name not in {i.name for i in model.graph.initializer}:
            raise ConversionError(f"input {vi.name!r} is not float32", "TFLite conversion takes float models")
    name_nodes(model)  # as the converter's named copy names them
    try:
        return _lowered(model, fixed_batch=False)
    except _NeedsFixedBatch:
        pass
    for vi in model.graph.input:  # the model is then written for batches of one (agents run those); a
        for d in vi.type.tensor_type.shape.dim:  # state's batch axis too (Silero's [2, batch, 128])
            if not d.HasField("dim_value"):
                d.dim_value = 1
    try:
        return _lowered(model, fixed_batch=True)
    except _NeedsFixedBatch:
        raise ConversionError("a layer of this model needs an axis of free size fixed (a recurrent layer's number "
                              "of steps: TFLite runs it unrolled)", "export the model with a fixed number of steps, "
                                                                   "or convert with --format onnx") from None


def _lowered(model, fixed_batch: bool) -> Graph:
    model = inline_constant_ifs(model)  # an If on a constant (a sample rate fixed with --fix-input): its branch
    model = lift_conv1d(model)  # Conv1d stacks as the 2-D ones they equal
    return simplify(_Lowering(model, fixed_batch).run())


def onnx_tensor(name: str) -> str:
    """The ONNX tensor a graph tensor was made from (the NHWC copy, and a 1-D model's input or
    output lifted to 2-D, hold the same values)."""
    name = name[: -len("/nhwc")] if name.endswith("/nhwc") else name
    return name[: -len(LIFTED)] if name.endswith(LIFTED) else name


def calibration_ranges(model_path: str | Path, graph: Graph, data: dict[str, np.ndarray] | list[dict[str, np.ndarray]],
                       method: str = "minmax",
                       progress: Callable[[int, int], None] | None = None) -> dict[str, tuple[float, float]]:
    """Activation ranges for every graph tensor, computed by onnxruntime's own calibrators
    (MinMax, Entropy or Percentile) on the FP32 ONNX model. `data`: arrays by input name, or a
    stateful model's steps, each a whole feed with its state (converters/stateful.py)."""
    import tempfile

    from onnxruntime.quantization.calibrate import create_calibrator

    from .onnx_int8 import _Reader, _Steps, fixed_batch_of, ort_calibration_method, quiet_quantizer

    cm = ort_calibration_method(method)
    with tempfile.TemporaryDirectory(prefix="edgeward-calib-") as tmp, quiet_quantizer():
        extra = {"symmetric": False} if method != "minmax" else {}
        calibrator = create_calibrator(str(model_path), op_types_to_calibrate=None,
                                       augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=cm, extra_options=extra)
        # non-MinMax calibrators feed one sample at a time into histograms
        try:
            calibrator.collect_data(_Steps(data, progress) if isinstance(data, list) else
                                    _Reader(data, 16 if method == "minmax" else 1, progress, fixed_batch_of(model_path)))
            computed = calibrator.compute_data()
        except ConversionError:
            raise
        except Exception as exc:  # onnxruntime's own types, from running the model on the data
            raise ConversionError(f"calibration failed running the model on the data: {runtime_message(exc)}",
                                  "check that the calibration data matches the model's inputs") from exc
    found = {k: (float(np.asarray(v.range_value[0]).min()), float(np.asarray(v.range_value[1]).max()))
             for k, v in computed.items()}
    ranges = {}
    for name in graph.activations() + [src for src, *_ in graph.derived.values()]:  # sources may be gone
        src = onnx_tensor(name)
        if src in found:
            ranges[name] = found[src]
    for name in graph.inputs:  # graph inputs: the data itself (calibrators may leave them out)
        values = [f[name] for f in data if name in f] if isinstance(data, list) else [data[name]] if name in data else []
        if name not in ranges and values:
            ranges[name] = (min(float(v.min()) for v in values), max(float(v.max()) for v in values))
    graph.derive_ranges(ranges)
    for op in graph.ops:  # tensors a layout op made (a reshape of a float LayerNorm's output): their input's
        if op.kind in SAME_SCALE and op.outputs[0] not in ranges and op.inputs[0] in ranges:
            ranges[op.outputs[0]] = ranges[op.inputs[0]]
    missing = [name for name in graph.activations() if name not in ranges]
    if missing:  # an unrolled recurrent layer's steps (converters/recurrent.py), which ONNX does not hold
        ranges.update(_ranges_in_float_graph(graph, data, method, missing))
    return ranges


def _ranges_in_float_graph(graph: Graph, data: dict[str, np.ndarray] | list[dict[str, np.ndarray]], method: str,
                           names: list[str]) -> dict[str, tuple[float, float]]:
    """Ranges for graph tensors the ONNX model has no counterpart of, from running the graph
    written in float in LiteRT over the same data (entropy, which LiteRT's run cannot feed
    histograms to, falls back to minmax there)."""
    import tempfile

    from .tflite_graph import write_tflite
    from .tflite_reader import CALIBRATION_METHODS
    from .tflite_reader import calibration_ranges as tflite_ranges

    with tempfile.TemporaryDirectory(prefix="edgeward-calib-") as tmp:
        path = write_tflite(graph, Path(tmp) / "float.tflite")
        found = tflite_ranges(path, graph, None, data, method if method in CALIBRATION_METHODS else "minmax")
    return {name: found[name] for name in names if name in found}

"""A transposed convolution as the sub-pixel convolution it equals: CONV_2D, then DEPTH_TO_SPACE.

XNNPACK has int8 kernels for CONV_2D and DEPTH_TO_SPACE and float ones only for TRANSPOSE_CONV,
whose int8 form ran 7x slower than FP32 (docs/CONVERTER.md): the learned upsampling of a
segmentation or text-detection head (U-Net's, DBNet's, MediaPipe's selfie segmenter) would
otherwise be the slowest layer of its INT8 model. The ONNX lowering writes ConvTranspose this
way; a float .tflite's TRANSPOSE_CONV (Keras' Conv2DTranspose) is rewritten here.
"""

from __future__ import annotations

import math

import numpy as np

from .tflite_graph import Graph, Op


def subpixel_weights(w: np.ndarray, s: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(CONV_2D weights [s*s*cout, th, tw, cin], taps (th, tw)) for transposed-conv weights
    w [cout, cin, kh, kw] of stride s: output pixel q*s + r (phase r) is a plain conv of the input
    with the kernel taps r, r + s, r + 2s, ... reversed, so one conv computes all s*s phases as
    s*s*cout channels, phase (rh, rw) in channels (rh*s + rw)*cout ... A kernel the size of its
    stride is a 1x1 conv."""
    cout, cin, kh, kw = w.shape
    th, tw = -(-kh // s), -(-kw // s)  # input pixels one output pixel reads, per axis
    wc = np.zeros((s, s, cout, th, tw, cin), np.float32)
    for rh in range(s):
        for rw in range(s):
            for jh in range(th):
                for jw in range(tw):
                    kr, kc = (th - 1 - jh) * s + rh, (tw - 1 - jw) * s + rw
                    if kr < kh and kc < kw:
                        wc[rh, rw, :, jh, jw, :] = w[:, :, kr, kc]
    return wc.reshape(s * s * cout, th, tw, cin), (th, tw)


def _tflite_pad_before(out: int, k: int, s: int, padding: str) -> int:
    """Rows (or columns) TFLite's TRANSPOSE_CONV cuts from the front of the whole transposed
    output: the padding of the forward conv from its output size back (its kernel's rule)."""
    n = -(-out // s) if padding == "SAME" else (out + s - k) // s
    return max(((n - 1) * s + k - out) // 2, 0)


def transpose_convs_as_subpixel(graph: Graph) -> None:
    """Rewrite each TRANSPOSE_CONV of one stride for both axes, in place: (PAD,) CONV_2D,
    DEPTH_TO_SPACE (, SLICE where TFLite's padding crops the whole output). Exact in float; the
    conv's int8 range is the output's (Graph.derived): the same values, rearranged."""
    for op in [op for op in graph.ops if op.kind == "TRANSPOSE_CONV"]:
        x, w_name, b_name, shape_name = op.inputs
        sh, sw = op.options["stride"]
        out_shape = graph.consts.get(shape_name)
        if sh != sw or sh < 1 or out_shape is None or w_name not in graph.consts or \
                op.options.get("activation", "NONE") != "NONE":
            continue
        s, (n, h, wd, _) = sh, graph.shapes[x]
        w = graph.consts[w_name].astype(np.float32)                            # [cout, kh, kw, cin]
        cout, kh, kw, _ = w.shape
        out = [int(out_shape[1]), int(out_shape[2])]
        pads = [_tflite_pad_before(o, k, s, op.options["padding"]) for o, k in zip(out, (kh, kw))]
        wc, (th, tw) = subpixel_weights(np.ascontiguousarray(w.transpose(0, 3, 1, 2)), s)
        grid = [h + th - 1, wd + tw - 1]
        if any(p + o > g * s for p, o, g in zip(pads, out, grid)):
            continue
        final, tag = op.outputs[0], f"{op.name}/subpixel"
        bias = graph.consts[b_name].astype(np.float32) if b_name else np.zeros(cout, np.float32)
        graph.consts[f"{tag}/weights"], graph.consts[f"{tag}/bias"] = wc, np.tile(bias, s * s)
        ops: list[Op] = []

        def step(kind: str, inputs: list[str], shape: list[int], name: str, **options) -> str:
            graph.shapes[name] = shape
            if kind == "CONV_2D" and name != final:  # the output's values (and its margins'), rearranged
                graph.derived[name] = (final, 1.0, 0.0, -math.inf, math.inf)
            ops.append(Op(kind, inputs, [name], options, op.name))
            return name

        if th > 1 or tw > 1:  # every tap reads inside the zero-padded input
            graph.consts[f"{tag}/paddings"] = np.array([[0, 0], [th - 1, th - 1], [tw - 1, tw - 1], [0, 0]], np.int32)
            x = step("PAD", [x, f"{tag}/paddings"], [n, *grid, graph.shapes[x][3]], f"{tag}/padded")
        whole = [g * s for g in grid]
        cropped = pads != [0, 0] or out != whole
        y = step("CONV_2D", [x, f"{tag}/weights", f"{tag}/bias"], [n, *grid, s * s * cout],
                 f"{tag}/phases" if s > 1 or cropped else final, padding="VALID", stride=(1, 1), dilation=(1, 1),
                 activation="NONE")
        if s > 1:
            y = step("DEPTH_TO_SPACE", [y], [n, *whole, cout], f"{tag}/whole" if cropped else final, block_size=s)
        if cropped:
            graph.consts[f"{tag}/begin"] = np.array([0, *pads, 0], np.int32)
            graph.consts[f"{tag}/size"] = np.array([-1, *out, cout], np.int32)  # the batch: to the end
            step("SLICE", [y, f"{tag}/begin", f"{tag}/size"], [n, *out, cout], final)
        at = graph.ops.index(op)
        graph.ops[at:at + 1] = ops
        if not any(shape_name in o.inputs for o in graph.ops):
            graph.consts.pop(shape_name, None)

"""Structured pruning: remove whole output channels of convolutions from an FP32 ONNX model.

Unlike zeroed weights, removed channels make every later layer smaller: fewer filters in
the pruned convolution, fewer input channels in the layer that reads it, less memory
traffic and less arithmetic, on every runtime, with no sparse kernels needed.

A convolution's channels can go when its output reaches the next weighted layer only
through channel-wise ops (BatchNormalization, Relu, Clip, pooling, depthwise convolution,
Flatten): then filter c of the convolution, channel c of those ops and input channel c of
the next layer (or the rows of a Gemm that read it) are removed together. Convolutions
whose output meets an Add, a Concat or the graph's output are left whole. Filters are
ranked by L1 norm (as torch.nn.utils.prune.ln_structured with n=1 does), per layer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.errors import ConversionError

from .onnx_graph import consumers as consumers_of
from .onnx_graph import node_attrs, value_shapes

_CHANNELWISE = ("Relu", "Clip", "BatchNormalization", "MaxPool", "AveragePool", "GlobalAveragePool",
                "Identity", "Dropout")


def _attr(node, name, default=None):
    return node_attrs(node).get(name, default)


def _set_attr(node, name, value) -> None:
    from onnx import helper

    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


class _Plan:
    """What removing channels of one convolution touches: (node, role) pairs and the spatial size
    at a Flatten, found by following its output to the next weighted layers."""

    def __init__(self, conv):
        self.conv = conv
        self.channelwise: list = []        # BatchNormalization / depthwise Conv nodes to slice
        self.readers: list = []            # (node, kind, spatial): Conv input channels, Gemm/MatMul rows


def _plan(conv, consumers, inits, outputs, shapes) -> _Plan | None:
    plan = _Plan(conv)
    frontier = [(conv.output[0], None)]
    channels = inits[conv.input[1]].shape[0]
    while frontier:
        tensor, spatial = frontier.pop()
        if tensor in outputs:
            return None
        users = consumers.get(tensor, [])
        if not users:
            return None
        for node in users:
            op = node.op_type
            if op in _CHANNELWISE and node.input[0] == tensor:
                if op == "BatchNormalization":
                    plan.channelwise.append(node)
                frontier.append((node.output[0], spatial))
            elif op == "Conv" and node.input[0] == tensor and node.input[1] in inits:
                group = _attr(node, "group", 1)
                w = inits[node.input[1]]
                if group == 1:
                    plan.readers.append((node, "conv", None))
                elif group == channels and w.shape[0] == channels and w.shape[1] == 1:
                    plan.channelwise.append(node)  # depthwise, multiplier 1: its channel c is our channel c
                    frontier.append((node.output[0], spatial))
                else:
                    return None
            elif op == "Flatten" and node.input[0] == tensor and _attr(node, "axis", 1) == 1:
                shape = shapes.get(tensor)
                if not shape or len(shape) != 4 or any(d <= 0 for d in shape[2:]):
                    return None
                for user in consumers.get(node.output[0], []):
                    if user.op_type in ("Gemm", "MatMul") and user.input[0] == node.output[0] \
                            and user.input[1] in inits and not _attr(user, "transA", 0):
                        plan.readers.append((user, "rows", shape[2] * shape[3]))
                    else:
                        return None
                if node.output[0] in outputs or not consumers.get(node.output[0]):
                    return None
            else:
                return None
    return plan if plan.readers else None


def prune_channels(src: str | Path, dst: str | Path, ratio: float) -> dict:
    """Write `src` with `ratio` of the output channels of every prunable convolution removed
    (the lowest-L1 filters); returns the layers pruned, their channel counts and the sizes."""
    import onnx
    from onnx import numpy_helper

    if not 0 < ratio < 1:
        raise ConversionError(f"--prune-channels {ratio}: give a fraction of channels between 0 and 1, e.g. 0.25")
    model = onnx.load(str(src))
    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    shapes = value_shapes(model)
    consumers = consumers_of(g)
    outputs = {o.name for o in g.output}

    layers = []
    for conv in list(g.node):
        if conv.op_type != "Conv" or _attr(conv, "group", 1) != 1 or conv.input[1] not in inits:
            continue
        plan = _plan(conv, consumers, inits, outputs, shapes)
        w = inits[conv.input[1]]
        if plan is None or w.shape[0] < 2:
            continue
        touched = [conv.input[1]] + [n.input[1] for n, _, _ in plan.readers] + \
                  [i for n in plan.channelwise for i in n.input[1:] if i]
        if any(len(consumers.get(t, [])) > 1 for t in touched):  # a weight shared with another layer stays whole
            continue
        keep_n = max(1, w.shape[0] - int(round(w.shape[0] * ratio)))  # as torch's ln_structured counts
        l1 = np.abs(w.reshape(w.shape[0], -1)).sum(axis=1)
        keep = np.sort(np.argsort(-l1, kind="stable")[:keep_n])
        inits[conv.input[1]] = w[keep]
        if len(conv.input) > 2 and conv.input[2]:
            inits[conv.input[2]] = inits[conv.input[2]][keep]
        for node in plan.channelwise:
            for name in node.input[1:]:
                if name and name in inits and inits[name].shape and inits[name].shape[0] == w.shape[0]:
                    inits[name] = inits[name][keep]
            if node.op_type == "Conv":
                _set_attr(node, "group", int(keep_n))
        for node, kind, spatial in plan.readers:
            rw = inits[node.input[1]]
            if kind == "conv":
                inits[node.input[1]] = rw[:, keep]
            else:
                rows = (keep[:, None] * spatial + np.arange(spatial)[None, :]).reshape(-1)
                trans_b = node.op_type == "Gemm" and _attr(node, "transB", 0)
                inits[node.input[1]] = rw[:, rows] if trans_b else rw[rows]
        layers.append({"layer": conv.name or conv.output[0], "channels": int(w.shape[0]), "kept": int(keep_n)})
    if not layers:
        raise ConversionError("no convolution's channels can be removed in this model (each feeds an Add, a Concat, "
                              "the output, or another layer that needs all of them)",
                              "use unstructured pruning (--prune) instead")
    for i, init in enumerate(g.initializer):
        g.initializer[i].CopyFrom(numpy_helper.from_array(inits[init.name], init.name))
    del g.value_info[:]  # shapes changed: let them be inferred again
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    before = sum(x["channels"] for x in layers)
    after = sum(x["kept"] for x in layers)
    return {"kind": "channels", "ratio": ratio, "layers": layers, "channels_before": before, "channels_after": after,
            "bytes_before": Path(src).stat().st_size, "bytes_after": Path(dst).stat().st_size}

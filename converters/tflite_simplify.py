"""Fewer elementwise ops in a lowered TFLite graph: each one an INT8 model runs costs a pass over
the tensor and a requantization (a rounding step), and the layers small boards run are full of
them. A MobileNetV3 block ends in x * relu6(x + 3) / 6; PP-OCR's blocks then scale and shift the
result (Mul, Add) before the next conv. The rewrites, all exact in float:

- a chain of multiplications and additions by per-channel (or scalar) constants becomes one op:
  a*x + b as a MUL, an ADD, or a 1x1 DEPTHWISE_CONV_2D that does both;
- a multiplication by such a constant that feeds a convolution (through a zero PAD or not) is
  folded into the convolution's weights: scaling commutes with zero padding, shifting does not;
- a lone RELU or RELU6 becomes the fused activation of the layer before it;
- a RESHAPE of a RESHAPE becomes one, or none; a one-slope PRELU becomes a LEAKY_RELU.
"""

from __future__ import annotations

import numpy as np

from .tflite_graph import Graph, Op

_AFFINE = ("MUL", "ADD", "SUB")
# conv kinds and the axis of their weights (as the graph holds them) that runs over input channels
_INPUT_AXIS = {"CONV_2D": 3, "TRANSPOSE_CONV": 3, "FULLY_CONNECTED": 1}


def simplify(graph: Graph) -> Graph:
    """`graph`, rewritten in place (see the module's docstring); returns it."""
    _collapse_reshapes(graph)
    _merge_affine_chains(graph)
    _fold_scales_into_convs(graph)
    _fuse_activations(graph)
    _one_slope_prelus_as_leaky(graph)
    return graph


def _collapse_reshapes(graph: Graph) -> None:
    """A RESHAPE of a RESHAPE's output (read by it alone) is one RESHAPE, and one back to its
    input's shape is none: TensorFlow writes a Keras Conv1D stack as each layer's squeeze to
    [N, T, C], then the next one's expand to [N, 1, T, C], two copies of the tensor per layer."""
    while True:
        users, keep = readers(graph), _sources(graph)
        producer = {out: op for op in graph.ops for out in op.outputs}
        for op in graph.ops:
            t = op.inputs[0] if op.kind == "RESHAPE" else None
            prev = producer.get(t)
            if prev is not None and prev.kind == "RESHAPE" and len(users.get(t, [])) == 1 \
                    and t not in graph.outputs and t not in keep:
                break
        else:
            return
        x, y = prev.inputs[0], op.outputs[0]
        op.inputs = [x, *op.inputs[1:]]
        graph.ops.remove(prev)
        graph.shapes.pop(t, None)
        graph.derived.pop(t, None)
        if graph.shapes.get(y) == graph.shapes.get(x) and y not in graph.outputs and y not in keep:
            for reader in graph.ops:  # the identity: its readers read its input
                reader.inputs = [x if n == y else n for n in reader.inputs]
            graph.ops.remove(op)
            graph.shapes.pop(y, None)
            graph.derived.pop(y, None)


def _one_slope_prelus_as_leaky(graph: Graph) -> None:
    """A PRELU whose slope is one value for all channels (torch's nn.PReLU() by default) is a
    LEAKY_RELU, one op XNNPACK runs in int8, where an int8 PRELU is written as two ops or four."""
    for i, op in enumerate(graph.ops):
        slope = graph.consts.get(op.inputs[1]) if op.kind == "PRELU" and len(op.inputs) > 1 else None
        if slope is not None and slope.size and np.all(slope == slope.reshape(-1)[0]):
            graph.ops[i] = Op("LEAKY_RELU", [op.inputs[0]], list(op.outputs), {"alpha": float(slope.reshape(-1)[0])},
                              op.name)


# ops whose kernels apply a fused activation (CONCATENATION's options carry one, which its float
# kernels ignore: a RELU fused into it was lost)
_FUSING = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "SUB", "MUL")


# ops that only move values, which an activation commutes with (a sub-pixel upsampling's, a
# Conv1D's squeeze)
_MOVES = ("DEPTH_TO_SPACE", "SLICE", "RESHAPE", "TRANSPOSE")


def _fuse_activations(graph: Graph) -> None:
    """A RELU or RELU6 that alone reads a conv's, ADD's, SUB's or MUL's output becomes its fused
    activation (a float TFLite source writes BlazeFace's residual ADD, then RELU): one op fewer,
    and XNNPACK takes no standalone int8 RELU (the writer's fallback for the rest costs a MUL).
    So does one after ops that only move values (a sub-pixel conv's DEPTH_TO_SPACE and SLICE, a
    Conv1D's squeeze to [N, T, C]): into the conv before them (a U-Net decoder's ReLU, at the
    upsampled size); the moved tensors' ranges then follow the activation's output."""
    users = readers(graph)
    producer = {out: op for op in graph.ops for out in op.outputs}
    keep = _sources(graph)

    def alone(t: str) -> bool:  # read by one op only, and by nothing outside the graph
        return len(users.get(t, [])) == 1 and t not in graph.outputs and t not in keep

    for op in list(graph.ops):
        if op.kind not in ("RELU", "RELU6") or op.name in graph.float_layers:
            continue
        x = t = op.inputs[0]
        moves = []  # the value-moving ops between the layer and the activation, last first
        prev = producer.get(t)
        while prev is not None and prev.kind in _MOVES and alone(t):
            moves.append(prev)
            t = prev.inputs[0]
            prev = producer.get(t)
        if prev is None or prev.kind not in _FUSING or prev.options.get("activation", "NONE") != "NONE" \
                or not alone(t) or prev.name in graph.float_layers:
            continue
        prev.options = {**prev.options, "activation": op.kind}
        last = moves[0] if moves else prev
        last.outputs = list(op.outputs)
        producer[op.outputs[0]] = last
        graph.ops.remove(op)
        graph.shapes.pop(x, None)
        graph.derived.pop(x, None)
        for name, (src, *rest) in list(graph.derived.items()):  # they now hold the activation's values
            if src == x:
                graph.derived[name] = (op.outputs[0], *rest)


def readers(graph: Graph) -> dict[str, list[Op]]:
    """Each tensor -> the ops that read it."""
    users: dict[str, list[Op]] = {}
    for op in graph.ops:
        for name in op.inputs:
            users.setdefault(name, []).append(op)
    return users


def _affine(graph: Graph, op: Op) -> tuple[str, np.ndarray, np.ndarray] | None:
    """(data input, a, b) where `op` computes a*x + b with a, b one value per channel (the last
    axis) or one for all, else None."""
    if op.kind not in _AFFINE or len(op.inputs) != 2 or op.name in graph.float_layers:
        return None  # (a float layer's inner tensors have no int8 range: they must stay inside it)
    consts = [n for n in op.inputs if n in graph.consts and graph.consts[n].dtype != np.int32]
    data = [n for n in op.inputs if n not in graph.consts]
    if len(consts) != 1 or len(data) != 1:
        return None
    c = graph.consts[consts[0]].astype(np.float64)
    shape = graph.shapes[data[0]]
    if c.ndim > len(shape) or any(d != 1 for d in c.shape[:-1]) or (c.ndim and c.shape[-1] not in (1, shape[-1])):
        return None
    c = c.reshape(-1)
    one, zero = np.ones_like(c), np.zeros_like(c)
    if op.kind == "MUL":
        return data[0], c, zero
    if op.kind == "ADD":
        return data[0], one, c
    const_first = op.inputs[0] == consts[0]
    return (data[0], -one, c) if const_first else (data[0], one, -c)


def _sources(graph: Graph) -> set[str]:
    """Derived tensors other tensors' ranges are derived from: they must stay. (A source that
    is a source-model tensor is ranged by calibration whether or not the graph still holds it.)"""
    return {src for src, *_ in graph.derived.values() if src in graph.derived}


def _merge_affine_chains(graph: Graph) -> None:
    i, users, keep = 0, None, set()
    while i < len(graph.ops):
        op = graph.ops[i]
        first = _affine(graph, op)
        if first is None or op.options.get("activation", "NONE") != "NONE":
            i += 1
            continue
        if users is None:  # made again only after a merge has changed the graph
            users, keep = readers(graph), _sources(graph)
        x, a, b = first
        chain, out = [op], op.outputs[0]
        while len(users.get(out, [])) == 1 and out not in graph.outputs and out not in keep:
            nxt = users[out][0]
            step = _affine(graph, nxt)
            if step is None or step[0] != out:
                break
            a, b = step[1] * a, step[1] * b + step[2]
            chain.append(nxt)
            out = nxt.outputs[0]
            if nxt.options.get("activation", "NONE") != "NONE":
                break  # a fused activation ends the chain
        merged = _affine_op(graph, x, a, b, chain[-1]) if len(chain) > 1 else None
        if merged is None:
            i += 1
            continue
        graph.ops[i] = merged
        users = None
        for dropped in chain[1:]:
            graph.ops.remove(dropped)
        for op_ in chain[:-1]:
            graph.shapes.pop(op_.outputs[0], None)
            graph.derived.pop(op_.outputs[0], None)
        i += 1


def _affine_op(graph: Graph, x: str, a: np.ndarray, b: np.ndarray, last: Op) -> Op | None:
    """a*x + b as one op (with `last`'s output and activation), or None where TFLite has none
    (a scale and a shift of a tensor that is not a feature map)."""
    out, name, act = last.outputs[0], last.name, last.options.get("activation", "NONE")
    shape = graph.shapes[x]
    tag = f"{name}/affine"
    per_channel = (1,) * (len(shape) - 1) + (-1,)
    if not b.any():
        graph.consts[f"{tag}/a"] = a.astype(np.float32).reshape(per_channel)
        return Op("MUL", [x, f"{tag}/a"], [out], {"activation": act}, name)
    if np.all(a == 1):
        graph.consts[f"{tag}/b"] = b.astype(np.float32).reshape(per_channel)
        return Op("ADD", [x, f"{tag}/b"], [out], {"activation": act}, name)
    if len(shape) != 4 or shape[-1] <= 0:
        return None
    graph.consts[f"{tag}/weights"] = np.broadcast_to(a, (shape[-1],)).astype(np.float32).reshape(1, 1, 1, -1)
    graph.consts[f"{tag}/bias"] = np.broadcast_to(b, (shape[-1],)).astype(np.float32).copy()
    return Op("DEPTHWISE_CONV_2D", [x, f"{tag}/weights", f"{tag}/bias"], [out],
              {"padding": "VALID", "stride": (1, 1), "dilation": (1, 1), "depth_multiplier": 1,
               "activation": act}, name)


def _fold_scales_into_convs(graph: Graph) -> None:
    users, keep = readers(graph), _sources(graph)
    for op in list(graph.ops):
        step = _affine(graph, op)
        if step is None or op.kind != "MUL" or op.options.get("activation", "NONE") != "NONE":
            continue
        x, a, _ = step
        out = op.outputs[0]
        path, pad = [out], None
        consumer = users.get(out, [])
        if len(consumer) == 1 and consumer[0].kind == "PAD" and consumer[0].inputs[0] == out:
            pad = consumer[0]
            path.append(pad.outputs[0])
            consumer = users.get(pad.outputs[0], [])
        if len(consumer) != 1 or any(t in graph.outputs or t in keep for t in path):
            continue
        conv = consumer[0]
        if conv.kind not in (*_INPUT_AXIS, "DEPTHWISE_CONV_2D"):
            continue
        if conv.inputs[0] != path[-1] or not _fold_input_scale(graph, conv, a):  # the data, not the weights
            continue
        if pad is not None:  # MUL -> PAD -> conv: the PAD now reads x
            pad.inputs[0] = x
        else:
            conv.inputs[0] = x
        graph.ops.remove(op)
        graph.shapes.pop(out, None)
        graph.derived.pop(out, None)
        users = readers(graph)


def _fold_input_scale(graph: Graph, conv: Op, a: np.ndarray) -> bool:
    """Scale `conv`'s weights per input channel by `a` (one value, or one per channel)."""
    w_name = conv.inputs[1]
    w = graph.consts.get(w_name)
    if w is None:
        return False
    if conv.kind == "DEPTHWISE_CONV_2D":  # output channel o reads input channel o // multiplier
        mult = conv.options.get("depth_multiplier", 1)
        scale = np.repeat(np.broadcast_to(a, (w.shape[3] // mult,)), mult)
        axis = 3
    else:
        axis = _INPUT_AXIS[conv.kind]
        scale = np.broadcast_to(a, (w.shape[axis],))
    shape = [1] * w.ndim
    shape[axis] = -1
    graph.consts[w_name] = (w * scale.reshape(shape)).astype(np.float32)
    return True

"""A 1-D conv model (PyTorch's Conv1d stacks: keyword spotting, sensor and vibration classifiers)
lifted to the 2-D one it equals, for the TFLite writer, whose layers are 2-D.

Every [N, C, T] map the convs work on becomes [N, C, 1, T]: convs and pools take a 1 x k window,
constants that broadcast against such a tensor take the new axis, pads (a causal conv's F.pad)
none along it, reductions, concatenations and slices (a TCN's chomp) their axes renumbered. The
lift grows from each Conv through the ops lifted here and stops at any other op (a Transpose to
[N, T, C], a GRU, an Unsqueeze that makes a map): a map read there is squeezed back to
[N, C, T], and a map made there is lifted as it comes in (an Unsqueeze), as the model's inputs
and frame-wise outputs are. Every tensor keeps its name (its lifted twin, where both exist, takes
a suffix), so the calibration ranges onnxruntime measures on the user's file still hold.
"""

from __future__ import annotations

import numpy as np

from .onnx_graph import constants_folded, consumers

# ops on [N, C, T] maps lifted here: no attribute to change ...
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "PRelu", "Pow"}  # (a constant operand takes the new axis)
_AS_THEY_ARE = {"BatchNormalization", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "Clip",
                "Elu", "Identity", "Dropout", "GlobalAveragePool", "GlobalMaxPool", "Sqrt", "Cast"} | _ELEMENTWISE
# ... windows to widen to 1 x k, axes to renumber
_WINDOWED = {"Conv", "MaxPool", "AveragePool"}
_REDUCING = {"ReduceMean", "ReduceMax", "ReduceSum"}
_LIFTABLE = _AS_THEY_ARE | _WINDOWED | _REDUCING | {"Concat", "Flatten", "Pad", "Slice"}


LIFTED = "/lifted"  # the suffix of a model input's or output's lifted copy (onnx_to_tflite.onnx_tensor)


def _axis(a: int) -> int:
    """Axis a of [N, C, T] in [N, C, 1, T]."""
    a = a % 3
    return a if a < 2 else 3


def lift_conv1d(model):
    """The model with its 1-D maps lifted to 2-D (see the module's docstring), or the model itself
    where it has no 1-D conv."""
    import onnx
    from onnx import helper, numpy_helper

    if not any(n.op_type == "Conv" for n in model.graph.node):
        return model
    original, model = model, constants_folded(model)
    g = model.graph
    inits = {i.name for i in g.initializer}
    rank: dict[str, int] = {i.name: len(i.dims) for i in g.initializer}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - onnx raises its own types; an unreadable model stays as it is
        return original
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.tensor_type.HasField("shape"):
            rank.setdefault(vi.name, len(vi.type.tensor_type.shape.dim))
    weights = {i.name: i for i in g.initializer}
    nodes = list(g.node)  # held: a node's id names it below only while its wrapper lives
    maps, members = _region(nodes, {n for n, r in rank.items() if r == 3 and n not in inits}, inits, rank, weights)
    if not maps:
        return original
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)

    def const(name: str, array: np.ndarray) -> str:  # once: two convs may share one weight
        if name not in weights:
            weights[name] = numpy_helper.from_array(array, name)
            g.initializer.append(weights[name])
        return name

    def attr(node, name: str, value) -> None:
        for a in node.attribute:
            if a.name == name:
                node.attribute.remove(a)
                break
        node.attribute.append(helper.make_attribute(name, value))

    def reshaping(kind: str, src: str, dst: str) -> object:  # Unsqueeze / Squeeze of the lifted axis 2
        inputs = [src] if opset < 13 else [src, const(f"{dst}/lift_axes", np.array([2], np.int64))]
        return helper.make_node(kind, inputs, [dst], name=f"{dst}/{kind.lower()}", **({"axes": [2]} if opset < 13 else {}))

    for node in nodes:
        if id(node) in members:
            _lift_node(node, weights, const, attr)

    # the region's edges: a map made outside it is lifted as it enters (an Unsqueeze); a map the
    # region makes that is read outside it (or is a model output) is brought back to [N, C, T]
    produced = {o: node for node in nodes for o in node.output}
    readers = consumers(g)
    outputs = {o.name for o in g.output}
    after: dict[int | None, list] = {}  # id of a node (None: the start) -> the edge nodes that follow it
    for t in sorted(maps):
        source = produced.get(t)
        inside = source is not None and id(source) in members
        if inside and all(id(n) in members for n in readers.get(t, [])) and t not in outputs:
            continue  # made and read inside: [N, C, 1, T] under its own name
        lifted = f"{t}{LIFTED}"
        for node in readers.get(t, []):
            if id(node) in members:
                node.input[:] = [lifted if n == t else n for n in node.input]
        if inside:
            source.output[:] = [lifted if n == t else n for n in source.output]
            after.setdefault(id(source), []).append(reshaping("Squeeze", lifted, t))
        else:
            after.setdefault(id(source) if source is not None else None, []).append(reshaping("Unsqueeze", t, lifted))
    ordered = list(after.get(None, []))
    for node in nodes:
        ordered += [node] + after.get(id(node), [])
    del g.node[:]
    g.node.extend(ordered)
    del g.value_info[:]  # the inferred shapes were of the 1-D model
    return model


def _lift_node(node, weights: dict, const, attr) -> None:
    """One node of the region rewritten for [N, C, 1, T] maps."""
    from onnx import helper, numpy_helper

    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    if node.op_type in _WINDOWED:
        for key, wide in (("kernel_shape", 1), ("strides", 1), ("dilations", 1)):
            if key in a:
                attr(node, key, [wide, *a[key]])
        if "pads" in a:
            attr(node, "pads", [0, a["pads"][0], 0, a["pads"][1]])
        if node.op_type == "Conv":
            w = numpy_helper.to_array(weights[node.input[1]])
            node.input[1] = const(f"{node.input[1]}/lifted", w.reshape(w.shape[0], w.shape[1], 1, w.shape[2]))
            if "kernel_shape" not in a:
                attr(node, "kernel_shape", [1, w.shape[2]])
    elif node.op_type in _REDUCING:
        axes = _reduce_axes(node, weights)
        if axes is not None:
            lifted = sorted({_axis(v) for v in axes} | {2})  # the time axis's reduction takes the 1 along
            if "axes" in a:
                attr(node, "axes", lifted)
            else:
                node.input[1] = const(f"{node.input[1]}/{node.output[0]}/lifted", np.array(lifted, np.int64))
    elif node.op_type == "Concat":
        attr(node, "axis", _axis(a["axis"]))
    elif node.op_type == "Pad":  # a causal conv's padding (F.pad): none along the new axis
        if len(node.input) > 3 and node.input[3]:  # opset 18's axes: renumbered
            axes = numpy_helper.to_array(weights[node.input[3]]).reshape(-1)
            node.input[3] = const(f"{node.input[3]}/{node.output[0]}/lifted",
                                  np.array([_axis(int(v)) for v in axes], np.int64))
        elif "pads" in a:
            attr(node, "pads", _lift_pads(a["pads"]))
        else:
            pads = numpy_helper.to_array(weights[node.input[1]]).reshape(-1).tolist()
            node.input[1] = const(f"{node.input[1]}/{node.output[0]}/lifted", np.array(_lift_pads(pads), np.int64))
    elif node.op_type == "Slice":  # a TCN's chomp, x[:, :, :-p]: its axes renumbered
        starts = numpy_helper.to_array(weights[node.input[1]]).reshape(-1)
        axes = numpy_helper.to_array(weights[node.input[3]]).reshape(-1).tolist() \
            if len(node.input) > 3 and node.input[3] else list(range(len(starts)))
        lifted = const(f"{node.output[0]}/lift_axes", np.array([_axis(int(v)) for v in axes], np.int64))
        if len(node.input) > 3:
            node.input[3] = lifted
        else:
            node.input.append(lifted)
    elif node.op_type in _ELEMENTWISE:
        for i, name in enumerate(node.input):
            if name in weights and len(weights[name].dims) >= 1:  # broadcast from the right: a 1 before T
                c = numpy_helper.to_array(weights[name])
                node.input[i] = const(f"{name}/{node.output[0]}/lifted", c.reshape(*c.shape[:-1], 1, c.shape[-1]))


def _lift_pads(pads: list[int]) -> list[int]:
    """ONNX pads of a [N, C, T] tensor (begins, then ends) for [N, C, 1, T]."""
    begins, ends = list(pads[:3]), list(pads[3:])
    return [*begins[:2], 0, begins[2], *ends[:2], 0, ends[2]]


def _reduce_axes(node, weights: dict) -> list[int] | None:
    """A reduction's axes, from its attribute or its constant input (None: all of them)."""
    from onnx import helper, numpy_helper

    for x in node.attribute:
        if x.name == "axes":
            return list(helper.get_attribute_value(x))
    if len(node.input) > 1 and node.input[1]:
        return numpy_helper.to_array(weights[node.input[1]]).reshape(-1).tolist()
    return None


def _region(nodes: list, three: set[str], inits: set[str], rank: dict[str, int], weights: dict) -> tuple[set[str], set[int]]:
    """(the 1-D maps to lift, the ids of the nodes that work on them): grown from each Conv of
    a [N, C, T] tensor through the ops this module lifts exactly. An op on a map that is not one of
    them (a GRU, a Transpose to [N, T, C], an Unsqueeze that makes one) stays outside, at the edge."""
    candidates = [node for node in nodes if _lifts(node, three, inits, rank, weights)]
    maps: set[str] = set()
    members: set[int] = set()
    grown = True
    while grown:
        grown = False
        for node in candidates:
            if id(node) in members:
                continue
            touched = {n for n in list(node.input) + list(node.output) if n in three}
            if (node.op_type == "Conv" and node.input[0] in three) or touched & maps:
                members.add(id(node))
                maps |= touched
                grown = True
    return maps, members


def _lifts(node, three: set[str], inits: set[str], rank: dict[str, int], weights: dict) -> bool:
    """Whether this module lifts the node exactly, were its [N, C, T] tensors lifted."""
    if node.op_type not in _LIFTABLE:
        return False
    a = {x.name: x for x in node.attribute}
    if node.op_type in _ELEMENTWISE:
        for name in node.input:  # the other operand: a map, a constant, or a scalar
            if name and name not in three and name not in inits and rank.get(name, 0) > 0:
                return False
    if node.op_type == "Flatten" and ("axis" in a and a["axis"].i != 1):
        return False
    if node.op_type in _REDUCING:
        if len(node.input) > 1 and node.input[1] and node.input[1] not in inits:
            return False  # computed axes
        axes = _reduce_axes(node, weights)
        keep = a["keepdims"].i if "keepdims" in a else 1
        if axes is not None and 2 not in [v % 3 for v in axes] and not keep:
            return False  # [N, C, T] -> [N, T] would keep the 1 the lift put in
    if node.op_type in _WINDOWED and node.input[0] not in three:
        return False
    if node.op_type == "Pad":
        if "pads" not in a and (len(node.input) < 2 or node.input[1] not in inits) \
                or len(node.input) > 3 and node.input[3] and node.input[3] not in inits:
            return False  # computed pads or axes
        if node.input[0] not in three:
            return False
    if node.op_type == "Slice" and (len(node.input) < 3 or any(n and n not in inits for n in node.input[1:])):
        return False  # computed bounds (or opset 1's attributes)
    return True

"""A 1-D conv model (PyTorch's Conv1d stacks: keyword spotting, sensor and vibration classifiers)
lifted to the 2-D one it equals, for the TFLite writer, whose layers are 2-D.

Every [N, C, T] tensor becomes [N, C, 1, T]: convs and pools take a 1 x k window, constants
that broadcast against such a tensor take the new axis, pads (a causal conv's F.pad) none
along it, reductions, concatenations and slices (a TCN's chomp) their axes renumbered. The model's inputs and outputs stay [N, C, T] (an Unsqueeze lifts an input,
a Squeeze brings a frame-wise output back) and every other tensor keeps its name, so the
calibration ranges onnxruntime measures on the user's file still hold (an input's or output's
lifted copy takes its own). A model with any other op on a 1-D map is left as it is (and the
lowering then names the layer it cannot map).
"""

from __future__ import annotations

import copy

import numpy as np

# ops on [N, C, T] maps lifted here: no attribute to change ...
_AS_THEY_ARE = {"BatchNormalization", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "Clip",
                "Elu", "Identity", "Dropout", "GlobalAveragePool", "GlobalMaxPool", "Add", "Sub", "Mul", "Div",
                "PRelu"}
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
    where it has no 1-D conv or holds what cannot be lifted."""
    import onnx
    from onnx import helper, numpy_helper

    if not any(n.op_type == "Conv" for n in model.graph.node):
        return model
    original, model = model, _constants_folded(model)
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
    maps = {name for name, r in rank.items() if r == 3 and name not in inits}
    if not any(n.op_type == "Conv" and n.input[0] in maps for n in g.node):
        return original
    if not _liftable(g, maps, inits, rank):
        return original
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    weights = {i.name: i for i in g.initializer}

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

    for node in g.node:
        if not any(n in maps for n in list(node.input) + list(node.output)):
            continue
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
        elif node.op_type in ("Add", "Sub", "Mul", "Div", "PRelu"):
            for i, name in enumerate(node.input):
                if name in weights and len(weights[name].dims) >= 1:  # broadcast from the right: a 1 before T
                    c = numpy_helper.to_array(weights[name])
                    node.input[i] = const(f"{name}/{node.output[0]}/lifted",
                                          c.reshape(*c.shape[:-1], 1, c.shape[-1]))

    for vi in g.input:
        if vi.name not in maps:
            continue
        lifted = f"{vi.name}{LIFTED}"
        for node in g.node:
            node.input[:] = [lifted if n == vi.name else n for n in node.input]
        inputs = [vi.name] if opset < 13 else [vi.name, const(f"{vi.name}/lift_axes", np.array([2], np.int64))]
        unsqueeze = helper.make_node("Unsqueeze", inputs, [lifted], name=f"{vi.name}/lift",
                                     **({"axes": [2]} if opset < 13 else {}))
        g.node.insert(0, unsqueeze)
    for vo in g.output:  # a frame-wise output: made lifted, squeezed back to [N, C, T] at the end
        if vo.name not in maps:
            continue
        lifted = f"{vo.name}{LIFTED}"
        for node in g.node:
            node.input[:] = [lifted if n == vo.name else n for n in node.input]
            node.output[:] = [lifted if n == vo.name else n for n in node.output]
        inputs = [lifted] if opset < 13 else [lifted, const(f"{vo.name}/unlift_axes", np.array([2], np.int64))]
        g.node.append(helper.make_node("Squeeze", inputs, [vo.name], name=f"{vo.name}/unlift",
                                       **({"axes": [2]} if opset < 13 else {})))
    del g.value_info[:]  # the inferred shapes were of the 1-D model
    return model


def _constants_folded(model):
    """A copy of the model with every node of constants only computed into an initializer: torch
    writes F.pad's pads and a chomp's bounds as small graphs of Constant nodes (the lowering
    folds them alike, later)."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    model = copy.deepcopy(model)
    g = model.graph
    values = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    kept = []
    for node in g.node:
        ins = [i for i in node.input if i]
        if node.op_type != "Constant" and not (ins and all(i in values for i in ins)):
            kept.append(node)
            continue
        try:
            outs = ReferenceEvaluator(node).run(None, {i: values[i] for i in ins})
        except Exception:  # noqa: BLE001 - an operator the evaluator does not know stays a node
            kept.append(node)
            continue
        for name, v in zip(node.output, outs):
            if name:
                values[name] = np.asarray(v)
                g.initializer.append(numpy_helper.from_array(values[name], name))
    del g.node[:]
    g.node.extend(kept)
    return model


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


def _liftable(g, maps: set[str], inits: set[str], rank: dict[str, int]) -> bool:
    """Whether every op that reads or writes a 1-D map is one this module lifts, and lifts exactly."""
    weights = {i.name: i for i in g.initializer}
    for node in g.node:
        touched = [n for n in list(node.input) + list(node.output) if n in maps]
        if not touched:
            continue
        if node.op_type not in _LIFTABLE:
            return False
        a = {x.name: x for x in node.attribute}
        if node.op_type in ("Add", "Sub", "Mul", "Div", "PRelu"):
            for name in node.input:  # the other operand: a map, a constant, or a scalar
                if name and name not in maps and name not in inits and rank.get(name, 0) > 0:
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
        if node.op_type in _WINDOWED and node.input[0] not in maps:
            return False
        if node.op_type == "Pad" and ("pads" not in a and (len(node.input) < 2 or node.input[1] not in inits)
                                      or len(node.input) > 3 and node.input[3] and node.input[3] not in inits):
            return False  # computed pads or axes
        if node.op_type == "Slice" and (len(node.input) < 3 or any(n and n not in inits for n in node.input[1:])):
            return False  # computed bounds (or opset 1's attributes)
        if any(o in maps for o in node.output) and not any(i in maps for i in node.input):
            return False  # a 1-D map made from something else (an Unsqueeze of [N, T], a Reshape)
    return True

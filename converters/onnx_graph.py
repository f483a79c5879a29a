"""Small views of an ONNX graph that the lowering, the pruning and the converter all read:
node attributes, who consumes a tensor, the shapes shape inference knows, node names; and the
few edits the converter makes to a source before quantizing and to what it ships."""

from __future__ import annotations


def node_attrs(node) -> dict:
    """A node's attributes as plain Python values."""
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def consumers(graph) -> dict[str, list]:
    """Tensor name -> the nodes that read it, in graph order."""
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def value_shapes(model) -> dict[str, list[int]]:
    """Tensor name -> shape (-1 for a symbolic or unknown dim), after ONNX shape inference where
    it succeeds (otherwise what the file declares)."""
    from onnx import shape_inference

    try:
        model = shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shapes are then taken from what the file declares
        pass
    g = model.graph
    return {vi.name: [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
            for vi in list(g.input) + list(g.value_info) + list(g.output)}


def name_nodes(model) -> bool:
    """Give every unnamed node a name (`Conv_3`), as exporters often leave them empty, so layers
    can be kept in float by name and reports can point at them. True if any was renamed."""
    taken = {n.name for n in model.graph.node if n.name}
    renamed = False
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
            renamed = True
    return renamed


QDQ_OPSET = 13  # DequantizeLinear's `axis`, which per-channel weights need, came with opset 13


def upgrade_opset(model, least: int = QDQ_OPSET):
    """(the model at opset `least` where it is older, whether it changed). onnxruntime's quantizer
    writes per-channel DequantizeLinear nodes (with `axis`) into an opset 11 or 12 model all the
    same, which onnx's checker and other runtimes refuse; Paddle2ONNX and older tf2onnx export
    at those opsets. Where onnx's version converter cannot upgrade a model, it stays as it is."""
    from onnx import version_converter

    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if current is None or current >= least:
        return model, False
    try:
        upgraded = version_converter.convert_version(model, least)
    except Exception:  # the converter's own errors: the quantizer then names what fails
        return model, False
    if current < 11:
        _keep_resize_coordinates(upgraded)
    return upgraded, True


def _keep_resize_coordinates(model) -> None:
    """Upsample and Resize before opset 11 sample at x / scale (and nearest takes the floor);
    onnx's version converter writes them as Resize without saying so, and Resize 11 and later
    default to half-pixel coordinates: a bilinear upsampling moved by half a pixel (errors of
    3 in a range of 9 on a conv's features). Said explicitly here, the model computes as before."""
    from onnx import helper

    for node in model.graph.node:
        if node.op_type != "Resize" or node.domain not in ("", "ai.onnx"):
            continue
        have = {a.name for a in node.attribute}
        if "coordinate_transformation_mode" not in have:
            node.attribute.append(helper.make_attribute("coordinate_transformation_mode", "asymmetric"))
        if "nearest_mode" not in have:
            node.attribute.append(helper.make_attribute("nearest_mode", "floor"))


def lift_constants(model) -> bool:
    """Move the tensors of top-level Constant nodes into the graph's initializers. Some exporters
    (torch.export programs, whose weights are traced in as constants) write every weight as a
    Constant node, and onnxruntime's quantizer only quantizes initializers: such weights would
    stay float and the "INT8" model would grow. True if any was moved."""
    g = model.graph
    outputs = {o.name for o in g.output}
    keep, lifted = [], False
    for node in g.node:
        value = next((a for a in node.attribute if a.name == "value" and a.HasField("t")), None)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None \
                and node.output[0] not in outputs:
            tensor = g.initializer.add()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            lifted = True
        else:
            keep.append(node)
    if lifted:
        del g.node[:]
        g.node.extend(keep)
    return lifted


def fix_inputs(model, values: dict[str, str]) -> None:
    """Make graph inputs constants: `--fix-input sr=16000` for a model that takes its sample rate
    (or a mode flag) as an input, which the board would otherwise need sent with every call.
    Each value fills the input's shape, which must be fixed, in the input's own dtype."""
    import numpy as np
    from onnx import helper, numpy_helper

    from agent.errors import ConversionError

    initializers = {t.name for t in model.graph.initializer}
    by_name = {i.name: i for i in model.graph.input if i.name not in initializers}
    for name, text in values.items():
        vi = by_name.get(name)
        if vi is None:
            raise ConversionError(f"--fix-input {name}={text}: the model has no input {name!r}",
                                  f"name one of its inputs: {', '.join(by_name)}")
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if -1 in dims:
            raise ConversionError(f"--fix-input {name}={text}: input {name!r} has dynamic axes {dims}",
                                  "only an input of fixed shape (a scalar, a flag) can be made a constant")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        try:
            if dtype.kind == "b":
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                value = text.lower() in ("true", "1")
            else:
                value = int(text, 0) if dtype.kind in "iu" else float(text)
            array = np.full(dims, value, dtype)
        except (ValueError, OverflowError) as exc:
            raise ConversionError(f"--fix-input {name}={text}: not a {dtype.name} value",
                                  f"input {name!r} takes {dtype.name}") from exc
        model.graph.initializer.append(numpy_helper.from_array(array, name))
        model.graph.input.remove(vi)


def cut_at(model, names: list[str]) -> None:
    """End the model at tensors `names` (`--cut-at`): they become its outputs, and the nodes,
    weights and inputs that only led elsewhere are dropped. For a model whose tail the TFLite
    writer does not map (a TopK, non-maximum suppression): the rest is converted, the tail is
    left to the board. Outputs keep the types shape inference gives."""
    import difflib

    from onnx import shape_inference

    from agent.errors import ConversionError

    g = model.graph
    weights = {t.name for t in g.initializer}
    producers = {o: node for node in g.node for o in node.output if o}
    inputs = [i for i in g.input if i.name not in weights]
    known = set(producers) | {i.name for i in inputs}
    for name in names:
        if name not in known:
            near = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
            raise ConversionError(f"--cut-at {name}: the model has no tensor {name!r}",
                                  f"name a node's output{' such as ' + ', '.join(near) if near else ''} "
                                  "(Netron shows them)")
    kept, needed, todo = set(), set(), list(names)
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producers.get(name)
        if node is not None and id(node) not in kept:
            kept.add(id(node))
            todo.extend(_reads(node))
    typed = {vi.name: vi for vi in (*shape_inference.infer_shapes(model, strict_mode=False).graph.value_info,
                                    *g.input, *g.output)}
    missing = [n for n in names if n not in typed]
    if missing:
        raise ConversionError(f"--cut-at {missing[0]}: shape inference cannot tell this tensor's type",
                              "cut at a tensor nearer the input, or export the model with static shapes")
    outputs = [type(typed[n])() for n in names]  # copies: the originals may sit in g.output, emptied below
    for out, name in zip(outputs, names):
        out.CopyFrom(typed[name])
    nodes = [node for node in g.node if id(node) in kept]
    del g.node[:]
    g.node.extend(nodes)
    for t in [t for t in g.initializer if t.name not in needed]:  # needed: the names and all the kept nodes read
        g.initializer.remove(t)
    for i in [i for i in g.input if i.name not in needed]:
        g.input.remove(i)
    del g.output[:]
    g.output.extend(outputs)
    for vi in [vi for vi in g.value_info if vi.name not in needed]:
        g.value_info.remove(vi)


def _reads(node) -> set[str]:
    """The tensors a node reads, with those its subgraphs (If, Loop) read from outside them."""
    from onnx import AttributeProto

    names = {i for i in node.input if i}
    for a in node.attribute:
        graphs = [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs) if a.type == AttributeProto.GRAPHS else []
        for sub in graphs:
            for inner in sub.node:
                names |= _reads(inner)
    return names


def model_bytes(path) -> int:
    """A model's size on disk. For ONNX, the file and the external data files its tensors name:
    torch.onnx.export writes the weights of every model to NAME.onnx.data by default, so the
    .onnx file alone is the graph and would make any quantized model look larger."""
    from pathlib import Path

    path = Path(path)
    size = path.stat().st_size
    if path.suffix != ".onnx":
        return size
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    files = {e.value for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL
             for e in t.external_data if e.key == "location"}
    return size + sum((path.parent / f).stat().st_size for f in files if (path.parent / f).is_file())


def input_grids(model) -> dict[str, tuple[float, int, str]]:
    """Graph input -> (scale, zero point, code dtype) for float inputs that every reader
    quantizes first, with one per-tensor QuantizeLinear: the only values the model sees."""
    from onnx import numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    users = consumers(model.graph)
    grids = {}
    for vi in model.graph.input:
        readers = users.get(vi.name, [])
        if vi.type.tensor_type.elem_type != 1 or not readers:  # 1: FLOAT
            continue
        found = set()
        for node in readers:
            scale = consts.get(node.input[1]) if node.op_type == "QuantizeLinear" and len(node.input) > 2 else None
            zero = consts.get(node.input[2]) if scale is not None else None
            if scale is None or zero is None or scale.size != 1 or zero.size != 1 \
                    or zero.dtype.name not in ("int8", "uint8"):
                break
            found.add((float(scale.reshape(())), int(zero.reshape(())), zero.dtype.name))
        else:
            if len(found) == 1:
                grids[vi.name] = found.pop()
    return grids


def _walk(graph, domains: set[str], types: set[int]) -> None:
    """The operator domains a graph's nodes use and the tensor element types it holds,
    subgraphs (If, Loop, Scan bodies) included."""
    from onnx import AttributeProto

    for vi in list(graph.input) + list(graph.output) + list(getattr(graph, "value_info", [])):
        if not isinstance(vi, str):  # a function's inputs and outputs are bare names
            types.add(vi.type.tensor_type.elem_type)
    types.update(t.data_type for t in getattr(graph, "initializer", []))
    for node in graph.node:
        domains.add(node.domain or "ai.onnx")
        for a in node.attribute:
            if a.type == AttributeProto.TENSOR:
                types.add(a.t.data_type)
            elif a.type == AttributeProto.GRAPH:
                _walk(a.g, domains, types)
            elif a.type == AttributeProto.GRAPHS:
                for g in a.graphs:
                    _walk(g, domains, types)


# element types that came after IR 8 (float8: IR 9; 4-bit: IR 10; ...): a model holding any keeps its IR
_NEWEST_IR8_TYPE = 16  # BFLOAT16


def stamp_for_old_runtimes(model) -> bool:
    """Stamp a model as the oldest onnxruntime that has its operators can read it; True if changed.

    Tools stamp what *they* know, not what the model needs: onnxruntime's quantizer imports nine
    operator domains (ai.onnx.ml at opset 5, training, aten, ...) that no node uses, and a new
    onnx writes its newest IR version. onnxruntime 1.17 (Jetson's JetPack 6 ships it) refuses
    both ("ai.onnx.ml is till opset 4", "max supported IR version: 9"). So: drop the imports no
    node uses, and lower the IR version to the least one its operator sets need, unless the
    model holds tensors of a newer type (float8, 4-bit), which need their own IR version.
    """
    from onnx import helper

    domains: set[str] = set()
    types: set[int] = set()
    _walk(model.graph, domains, types)
    for f in model.functions:
        domains.add(f.domain or "ai.onnx")
        _walk(f, domains, types)
    keep = [o for o in model.opset_import if (o.domain or "ai.onnx") in domains]
    changed = len(keep) != len(model.opset_import)
    if changed:
        del model.opset_import[:]
        model.opset_import.extend(keep)
    least = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    if least < model.ir_version and max(types, default=0) <= _NEWEST_IR8_TYPE:
        model.ir_version = least
        changed = True
    return changed


def stamp_file_for_old_runtimes(path) -> None:
    """`stamp_for_old_runtimes` on a file, rewritten in place only when that changes it."""
    import onnx

    model = onnx.load(str(path))
    if stamp_for_old_runtimes(model):
        onnx.save(model, str(path))


def constants_folded(model):
    """A copy of the model with every node of constants only computed into an initializer: torch
    writes F.pad's pads and a chomp's bounds as small graphs of Constant nodes (the lowering
    folds them alike, later)."""
    import copy

    import numpy as np
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


def inline_constant_ifs(model):
    """The model with each If whose condition is a constant replaced by the branch it takes, or the
    model itself where there is none: the TFLite writer has no control flow, and Silero VAD's
    sample-rate switch is such an If once `--fix-input sr=16000` has made sr a constant. An If
    whose branch would bring a weight under a name the graph already uses otherwise stays. The
    Shapes of tensors whose shape is static are constants here (an If on a map's size: Silero's
    decoder), so a model with a free batch is inlined only once it is written for batches of one."""
    from onnx import helper, numpy_helper

    if not any(n.op_type == "If" for n in model.graph.node):
        return model
    model = constants_folded(_static_shapes_folded(constants_folded(model)))  # (shapes are inferred from constants)
    g = model.graph
    values = {i.name: i for i in g.initializer}
    kept, inlined = [], False
    for node in g.node:
        if node.op_type != "If" or node.input[0] not in values:
            kept.append(node)
            continue
        taken = bool(numpy_helper.to_array(values[node.input[0]]).reshape(-1)[0])
        branch = node_attrs(node)["then_branch" if taken else "else_branch"]
        if any(i.name in values for i in branch.initializer):
            kept.append(node)
            continue
        for init in branch.initializer:
            g.initializer.append(init)
            values[init.name] = init
        kept.extend(branch.node)
        kept.extend(helper.make_node("Identity", [inner.name], [outer], name=f"{node.name}/{outer}")
                    for inner, outer in zip(branch.output, node.output) if outer)
        inlined = True
    del g.node[:]
    g.node.extend(kept)
    return inline_constant_ifs(model) if inlined else model


def _static_shapes_folded(model):
    """A copy of the model whose Shape nodes of tensors with a static shape are constants."""
    import copy

    import numpy as np
    from onnx import numpy_helper

    shapes = value_shapes(model)
    model = copy.deepcopy(model)
    g = model.graph
    kept = []
    for node in g.node:
        shape = shapes.get(node.input[0]) if node.op_type == "Shape" else None
        if not shape or min(shape) <= 0:
            kept.append(node)
            continue
        a = node_attrs(node)
        dims = np.array(shape, np.int64)[a.get("start", 0):a.get("end", len(shape))]
        g.initializer.append(numpy_helper.from_array(dims, node.output[0]))
    del g.node[:]
    g.node.extend(kept)
    return model

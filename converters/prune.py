"""Magnitude pruning of an FP32 ONNX model, before quantization.

Unstructured: the smallest-magnitude weights of every Conv, MatMul and Gemm are set to zero
until the target sparsity is reached, either over all those weights together (`global`,
which spares the layers whose weights matter most) or in each layer alike (`layer`). Zeros
do not make the ONNX file smaller or faster by themselves; they pay off once the bundle is
compressed for transport and storage (`write_bundle(..., compress="xz")`), where runs of
zero bytes cost next to nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.errors import ConversionError

from .nms import PREFIX as NMS_PREFIX

PRUNABLE = {"Conv": 1, "MatMul": 1, "Gemm": 1}  # op type -> index of its weight input


def prune_unstructured(src: str | Path, dst: str | Path, sparsity: float, scope: str = "global") -> dict:
    """Write `src` with its weights pruned to `sparsity`; returns what was pruned, per layer."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    weights: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        idx = PRUNABLE.get(node.op_type)
        if node.name.startswith(NMS_PREFIX):  # --nms's box arithmetic (converters/nms.py) is no layer
            continue
        if idx is not None and len(node.input) > idx and node.input[idx] in inits:
            arr = numpy_helper.to_array(inits[node.input[idx]])
            if arr.ndim >= 2 and arr.dtype == np.float32:
                weights[node.input[idx]] = arr
    if not weights:
        raise ConversionError("the model has no Conv, MatMul or Gemm weights to prune",
                              "leave out --prune for this model")
    pruned, result = prune_arrays(weights, sparsity, scope)
    for name, arr in pruned.items():
        inits[name].CopyFrom(numpy_helper.from_array(arr, name))
    onnx.save(model, str(dst))
    return result


def prune_arrays(weights: dict[str, np.ndarray], sparsity: float, scope: str = "global") -> tuple[dict, dict]:
    """(pruned weights, report): the smallest-magnitude entries set to zero, ranked over all the
    weights together (global) or within each (layer). Shared by the ONNX and TFLite sources."""
    if not 0 < sparsity < 1:
        raise ConversionError(f"--prune {sparsity}: give a sparsity between 0 and 1, e.g. 0.5")
    if scope not in ("global", "layer"):
        raise ConversionError(f"--prune-scope {scope!r}: use global or layer")
    if scope == "global":
        magnitudes = np.concatenate([np.abs(w).ravel() for w in weights.values()])
        threshold = np.partition(magnitudes, int(sparsity * (magnitudes.size - 1)))[int(sparsity * (magnitudes.size - 1))]
    out, report, zeros, total = {}, {}, 0, 0
    for name, w in weights.items():
        if scope == "layer":
            flat = np.abs(w).ravel()
            threshold = np.partition(flat, int(sparsity * (flat.size - 1)))[int(sparsity * (flat.size - 1))]
        pruned = np.where(np.abs(w) <= threshold, np.float32(0), w).astype(np.float32)
        out[name] = pruned
        n0 = int((pruned == 0).sum())
        report[name] = round(n0 / pruned.size, 4)
        zeros += n0
        total += pruned.size
    return out, {"sparsity": round(zeros / total, 4), "scope": scope, "layers": report}

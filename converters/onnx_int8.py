"""FP32 ONNX -> INT8 ONNX with onnxruntime.quantization: static QDQ, per-channel weights.

QDQ keeps the graph readable (QuantizeLinear/DequantizeLinear pairs around float
ops), which onnxruntime fuses into integer kernels at load time, and it is the
format other toolchains (TensorRT on Jetson, onnx2tf) understand.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from agent.bundle import TensorSpec
from agent.errors import ConversionError, first_line

log = logging.getLogger("edgeward.convert")

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")

_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
                10: "float16", 11: "float64", 12: "uint32", 13: "uint64"}


def load_onnx(path: str | Path):
    """Read and check an ONNX file; anything that is not a valid model is a one-line ConversionError."""
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except FileNotFoundError as exc:
        raise ConversionError(f"{path}: no such file") from exc
    except Exception as exc:  # onnx raises DecodeError, ValidationError, ... for bad files
        first = first_line(exc)
        raise ConversionError(f"{path} is not a valid ONNX model ({first})",
                              "export the model with torch.onnx.export / tf2onnx and check it with onnx.checker") from exc
    if not model.graph.node:
        raise ConversionError(f"{path} has an empty graph")
    return model


def describe(model) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output specs of a model's graph; symbolic or unknown dims become -1."""
    initializers = {i.name for i in model.graph.initializer}

    def spec(vi) -> TensorSpec:
        tt = vi.type.tensor_type
        dtype = _ONNX_DTYPES.get(tt.elem_type)
        if dtype is None:
            raise ConversionError(f"tensor {vi.name!r} has element type {tt.elem_type}, which edgeward cannot serve")
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        return TensorSpec(name=vi.name, dtype=dtype, shape=shape, batch_axis=0 if shape and shape[0] == -1 else None)

    inputs = [spec(i) for i in model.graph.input if i.name not in initializers]
    outputs = [spec(o) for o in model.graph.output]
    return inputs, outputs


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over in-memory arrays, with progress. For a
    model whose batch size is fixed, batches of that size only (the few samples past the last
    whole batch are left out: calibration needs no padding rows in its ranges)."""

    def __init__(self, data: dict[str, np.ndarray], batch: int, progress: Callable[[int, int], None] | None,
                 fixed: int | None = None):
        self.data, self.batch, self.progress = data, fixed or batch, progress
        self.n = len(next(iter(data.values())))
        if fixed:
            if self.n < fixed:
                raise ConversionError(f"the calibration data holds {self.n} samples, fewer than the model's fixed "
                                      f"batch size {fixed}", f"give at least {fixed} samples")
            self.n -= self.n % fixed
        self._it = self._batches()

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(0, self.n, self.batch):
            if self.progress:
                self.progress(min(i + self.batch, self.n), self.n)
            yield {k: v[i:i + self.batch] for k, v in self.data.items()}

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = self._batches()


class _Steps(_Reader):
    """The same protocol over whole feeds, one call each: a stateful model's samples, each with
    the state it runs on (converters/stateful.py)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], progress: Callable[[int, int], None] | None):
        self.feeds, self.progress, self.n = feeds, progress, len(feeds)
        self._it = self._batches()

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for i, feed in enumerate(self.feeds):
            if self.progress:
                self.progress(i + 1, self.n)
            yield feed


def fixed_batch_of(model_path: str | Path) -> int | None:
    """The batch size the model's first input is fixed at, or None when it is free."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    inputs, _ = describe(model)
    first = inputs[0].shape[0] if inputs and inputs[0].shape else -1
    return first if first > 0 else None


def ort_calibration_method(method: str):
    """onnxruntime's CalibrationMethod for one of CALIBRATION_METHODS (an unknown one is refused)."""
    from onnxruntime.quantization import CalibrationMethod

    if method not in CALIBRATION_METHODS:
        raise ConversionError(f"calibration method {method!r} is unknown", f"use one of {', '.join(CALIBRATION_METHODS)}")
    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]


def quantize_static(fp32_path: str | Path, out_path: str | Path,
                    calibration: dict[str, np.ndarray] | list[dict[str, np.ndarray]],
                    per_channel: bool = True, method: str = "minmax", batch: int = 1,
                    exclude_nodes: list[str] | None = None, reduce_range: bool = True,
                    progress: Callable[[int, int], None] | None = None) -> Path:
    """Static INT8 QDQ quantization (int8 weights and activations) calibrated on `calibration`:
    arrays with the samples on the first axis, or whole feeds run one at a time (a stateful model).

    `reduce_range` keeps weights to 7 bits: onnxruntime's int8 kernels on x86 CPUs without VNNI
    (AVX2's VPMADDUBSW) saturate with full 8-bit weights, which cost the digits CNN 2 points of
    top-1 here and would make the host's self-test reference disagree with an ARM board's
    results. 7-bit weights give the same answers on every CPU; pass False for VNNI/ARM-only use."""
    from onnxruntime.quantization import QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    calibrate_method = ort_calibration_method(method)
    with tempfile.TemporaryDirectory(prefix="edgeward-quant-") as tmp:
        prepared = _pre_process(fp32_path, Path(tmp) / "prepared.onnx")
        try:
            with quiet_quantizer():
                ort_quantize_static(
                    str(prepared), str(out_path), _Steps(calibration, progress) if isinstance(calibration, list)
                    else _Reader(calibration, batch, progress, fixed_batch_of(fp32_path)),
                    quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=calibrate_method, nodes_to_exclude=exclude_nodes or [],
                    reduce_range=reduce_range,
                    # keep ReLU/Clip in the graph: folded into a range calibration saw as all zero (written
                    # as scale 1, zero point 0), a dead ReLU let negatives through; onnxruntime still
                    # drops them at run time where the next quantization clamps the same
                    extra_options={"CalibTensorRangeSymmetric": False, "QDQKeepRemovableActivations": True},
                )
        except ConversionError:
            raise
        except Exception as exc:
            raise _failed(out_path, exc, "", ", or report the operator") from exc
    return _checked(out_path, "static INT8")


def _pre_process(fp32_path: str | Path, out: Path) -> Path:
    """onnxruntime's pre-processing (shape inference and graph optimisation, which lets the
    quantizer see fused layers), without its symbolic shape inference where that gives up on
    the model (it asserts on reshapes whose target rank it cannot tell, as in attention blocks).
    It is an optimisation only: where it fails altogether, the model is quantized as given.
    It runs inside `out`'s scratch folder: where symbolic inference gives up, onnxruntime saves
    what it had as "sym_shape_infer_temp.onnx" plus external-data files in the working
    directory, which would leave them in the user's folder (a segmentation head did)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, out = Path(fp32_path).resolve(), out.resolve()
    for skip_symbolic in (False, True):
        try:
            with quiet_quantizer(), _working_directory(out.parent):
                quant_pre_process(str(source), str(out), skip_symbolic_shape=skip_symbolic)
            return out
        except Exception as exc:  # its own and onnx's types; the last one is reported below
            failure = exc
    log.warning("onnxruntime's quantization pre-processing failed on this model (%s); quantizing it as given",
                first_line(failure))
    return Path(fp32_path)


@contextlib.contextmanager
def _working_directory(folder: Path):
    """contextlib.chdir, which Python 3.10 lacks. The converter runs on one thread."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def quiet_quantizer():
    """onnxruntime's quantizer talks through the root logger (`logging.warning`): notes on its
    own internals ("Please consider to run pre-processing", "Axis 1 is out-of-range for weight
    ...") reached the user as bare "WARNING:root:" lines they could do nothing about, and its
    first call left a handler on the root logger for the rest of the process. While it runs, its
    root-logger records go to edgeward.convert at debug level, and nothing is installed."""
    root = logging.getLogger()

    def divert(record: logging.LogRecord) -> bool:
        log.debug("onnxruntime: %s", record.getMessage())
        return False

    placeholder = logging.NullHandler()  # with a handler present, logging.warning() does not call basicConfig()
    root.addHandler(placeholder)
    root.addFilter(divert)
    try:
        yield
    finally:
        root.removeFilter(divert)
        root.removeHandler(placeholder)


def _failed(out_path: str | Path, exc: Exception, how: str, more_fix: str = "") -> ConversionError:
    """onnxruntime's quantizer failed: remove what it may have written, say why in one line."""
    Path(out_path).unlink(missing_ok=True)
    return ConversionError(f"onnxruntime could not quantize the model{how}: {first_line(exc)}",
                           f"exclude the failing node with --exclude-node NAME{more_fix}")


def _checked(out_path: str | Path, what: str) -> Path:
    """The quantizer's output, if it is a valid model: onnxruntime's quantizer can write an
    invalid one (for graphs with If/Loop branches, for one), which is its failure, not a fault
    of the user's file, and is named as such."""
    import onnx

    try:
        onnx.checker.check_model(str(out_path))  # by path: a model over 2 GB cannot be checked in memory
    except Exception as exc:
        try:
            branches = any(n.op_type in ("If", "Loop", "Scan")
                           for n in onnx.load(str(out_path), load_external_data=False).graph.node)
        except Exception:
            branches = False
        Path(out_path).unlink(missing_ok=True)
        why = "its quantizer does not handle this graph's If/Loop branches: " if branches else ""
        raise ConversionError(f"onnxruntime's quantizer wrote an invalid {what} model ({first_line(exc)[:160]})",
                              why + "ship the float model with --precision fp32, or try the other INT8 "
                                    "precision") from exc
    return Path(out_path)


def quantize_dynamic(fp32_path: str | Path, out_path: str | Path, exclude_nodes: list[str] | None = None,
                     reduce_range: bool = True) -> Path:
    """Dynamic INT8: int8 weights, activations quantized at run time (no calibration). For
    transformer- and RNN-like models, where activation ranges vary too much per input."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    try:
        with quiet_quantizer():
            ort_quantize_dynamic(str(fp32_path), str(out_path), weight_type=QuantType.QInt8,
                                 nodes_to_exclude=exclude_nodes or [], reduce_range=reduce_range)
    except Exception as exc:
        raise _failed(out_path, exc, " dynamically") from exc
    return _checked(out_path, "dynamic INT8")


def quantizable_layers(model) -> list[str]:
    """Names of the layers whose weights quantization touches (Conv, MatMul, Gemm), the last
    and the first first: they are the ones most often sensitive to it."""
    names = [n.name for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm") and n.name]
    if len(names) > 2:
        names = [names[-1], names[0]] + names[1:-1]
    return names


def int8_summary(path: str | Path) -> dict:
    """What quantization did to the graph: node counts, and how many weight tensors (2-D and up)
    are stored as int8 and as float."""
    import onnx

    model = onnx.load(str(path))
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    int8_inits = sum(1 for i in model.graph.initializer if i.data_type in (2, 3))  # uint8, int8 (zero points too)
    int8_weights = sum(1 for i in model.graph.initializer if i.data_type in (2, 3) and len(i.dims) >= 2)
    float_weights = sum(1 for i in model.graph.initializer if i.data_type == 1 and len(i.dims) >= 2)
    return {"ops": ops, "int8_initializers": int8_inits, "int8_weight_tensors": int8_weights,
            "float_weight_tensors": float_weights}

"""Output formats of the converter: how each writes a candidate model, runs it and names it.

`convert_onnx` does the same steps for every format (quantize with some settings,
measure against FP32, pack); a target is the part that differs. ONNX candidates are
written by onnxruntime.quantization and run in onnxruntime; TFLite candidates are
written by edgeward's own TFLite writer and run in LiteRT (ai-edge-litert or
tflite-runtime, as the agent runs them), against a float .tflite of the same graph.
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path
from typing import Callable

from agent.errors import ConversionError

from . import measure
from .guard import METHODS, Settings
from .nms import OUTPUTS as NMS_OUTPUTS
from .nms import PREFIX as NMS_PREFIX
from .nms import append_nms

FORMATS = ("onnx", "tflite", "both")
Say = Callable[[str, int, int], None]


def _self_contained_copy(src: Path, dst: Path) -> None:
    """The ONNX file byte for byte, or, when its weights lie in external data files beside it
    (torch.onnx.export's default), one file holding them: a bundle carries one model file."""
    from .onnx_graph import model_bytes

    if model_bytes(src) == src.stat().st_size:
        shutil.copyfile(src, dst)
        return
    import onnx

    onnx.save(onnx.load(str(src)), str(dst))


class OnnxTarget:
    format, runtime, suffix = "onnx", "onnxruntime", ".onnx"
    producers = {"int8": "onnxruntime.quantization static QDQ", "int8-dynamic": "onnxruntime.quantization dynamic",
                 "fp32": "FP32, not quantized"}

    def __init__(self, work: Path, source: Path, original: Path, pruned: bool, calib: dict, say: Say,
                 reduce_range: bool = True, nms=None):
        """`nms`: the source ends in the suppression converters/nms.py appended, which stays float."""
        self.path, self.source, self.original, self.pruned = work / "model.onnx", source, original, pruned
        self.reduce_range = reduce_range
        self.calib, self.say = calib, say
        self.fp32_path = original
        self.methods = METHODS  # the calibration methods the accuracy search may try
        # a YOLO's detections with --nms; other ONNX detectors end in their own NMS (or are cut before it)
        self.detections: list[str] = list(NMS_OUTPUTS) if nms else []
        self.detection_threshold: float | None = nms.score if nms else None
        self.producers = _with_suppression(self.producers) if nms else self.producers
        self.float_nodes = _float_nodes(source) if nms else []  # appended by --nms: kept in float

    def layers(self) -> list[str]:
        from .onnx_int8 import load_onnx, quantizable_layers

        return [n for n in quantizable_layers(load_onnx(self.source)) if not n.startswith(NMS_PREFIX)]

    def build(self, precision: str, s: Settings) -> None:
        from .onnx_graph import stamp_file_for_old_runtimes
        from .onnx_int8 import quantize_dynamic, quantize_static

        if precision == "fp32":  # the user's file as it is, unless it was pruned
            _self_contained_copy(self.source if self.pruned else self.original, self.path)
        elif precision == "int8-dynamic":
            quantize_dynamic(self.source, self.path, exclude_nodes=s.exclude + self.float_nodes,
                             reduce_range=self.reduce_range)
        else:
            quantize_static(self.source, self.path, self.calib, per_channel=s.per_channel, method=s.method,
                            exclude_nodes=s.exclude + self.float_nodes, reduce_range=self.reduce_range,
                            progress=lambda d, t: self.say("calibrating", d, t))
        stamp_file_for_old_runtimes(self.path)  # boards run older onnxruntimes than the workstation

    def session(self, path: Path | None = None, threads: int = 1):
        return measure.session(path or self.path, threads)

    def fp32_session(self, threads: int = 1):
        return measure.session(self.fp32_path, threads)

    def input_grids(self) -> dict:
        """Float inputs the model quantizes first thing: their grids (agent/reference.py)."""
        import onnx

        from .onnx_graph import input_grids

        return input_grids(onnx.load(str(self.path)))

    def memory(self, sample: dict, threads: int) -> dict:
        return measure.memory_cost(self.path, sample, threads=threads, runtime="onnxruntime")

    def specs(self):
        from .onnx_int8 import describe, load_onnx

        return describe(load_onnx(self.path))

    def summary(self) -> dict:
        from .onnx_int8 import int8_summary

        return int8_summary(self.path)

    def judges_latency(self) -> bool:
        return True

    def board_io(self, session, inputs: dict, outputs: dict) -> tuple[dict, dict]:
        """The self-test's inputs and expected outputs as the board feeds and compares them."""
        return inputs, outputs


class TfliteTarget:
    """Full-integer INT8 TFLite (float or int8 I/O) from the FP32 ONNX graph, with a float
    TFLite of the same graph as the latency and size baseline in the same runtime."""

    format, runtime, suffix = "tflite", "tflite", ".tflite"
    producers = {"int8": "edgeward TFLite writer, full-integer INT8", "fp32": "edgeward TFLite writer, FP32"}

    def __init__(self, work: Path, source: Path, calib: dict, say: Say, int8_io: bool = False,
                 graph=None, ranges_fn=None, original: Path | None = None, baseline=None,
                 methods: tuple[str, ...] = METHODS, nms=None):
        """`source` is the ONNX model to quantize; `original`, when given, the user's FP32 model
        before pruning, lowered as it is for the FP32 baseline. For a TFLite source: `graph` and
        `ranges_fn` instead, with `baseline` the graph before pruning and `methods` the calibration
        methods `ranges_fn` knows. `nms` (converters.nms.NmsSpec): a YOLO detector gets its
        non-maximum suppression appended, in both the INT8 and the float model."""
        from .tflite_graph import write_tflite

        self.path, self.fp32_path = work / "model.tflite", work / "fp32.tflite"
        self.source, self.calib, self.say, self.int8_io = source, calib, say, int8_io
        if graph is None:
            from .onnx_int8 import load_onnx
            from .onnx_to_tflite import calibration_ranges, lower

            shapes = calib[0] if isinstance(calib, list) else calib  # a stateful model's steps: shaped as one
            graph = lower(fix_dims(load_onnx(source), shapes))
            baseline = lower(fix_dims(load_onnx(original), shapes)) if original else None
            ranges_fn = ranges_fn or (lambda method: calibration_ranges(
                source, graph, calib, method, progress=lambda d, t: say("calibrating", d, t)))
        if nms is not None:
            for g in {id(g): g for g in (graph, baseline) if g is not None}.values():
                append_nms(g, nms)
        self.graph, self.ranges_fn, self._ranges, self.methods = graph, ranges_fn, {}, methods
        self.detections = graph.detections()  # an SSD's boxes, classes, scores, count: compared as detections
        self.detection_threshold = graph.detection_threshold()
        norms = [n for n in graph.float_layers if not n.startswith(NMS_PREFIX)]  # (--nms's few ops: said below)
        if norms:  # not full-integer: say which layers are not, and why
            self.producers = {**self.producers, "int8": f"edgeward TFLite writer, INT8 with its "
                              f"{len(norms)} LayerNorm layer(s) in float"}
        if nms is not None:
            self.producers = _with_suppression(self.producers)
        write_tflite(baseline or graph, self.fp32_path, description="edgeward fp32")
        self.pruned_fp32 = self.fp32_path  # the float model of what is quantized: pruned, if it was
        if baseline is not None and baseline is not graph:
            self.pruned_fp32 = work / "pruned-fp32.tflite"
            write_tflite(graph, self.pruned_fp32, description="edgeward fp32")

    def layers(self) -> list[str]:
        names = self.graph.layers()
        return [names[-1], names[0]] + names[1:-1] if len(names) > 2 else names

    def build(self, precision: str, s: Settings) -> None:
        from .tflite_graph import write_tflite

        if precision == "fp32":  # the float model, pruned if it was
            shutil.copyfile(self.pruned_fp32, self.path)
            return
        if precision != "int8":
            raise ConversionError(f"precision {precision} has no TFLite form",
                                  "use --precision int8 or fp32 with --format tflite")
        if s.method not in self._ranges:
            self._ranges[s.method] = self.ranges_fn(s.method)
        write_tflite(self.graph, self.path, self._ranges[s.method], per_channel=s.per_channel,
                     int8_io=self.int8_io, float_ops=set(s.exclude), description="edgeward int8")

    def session(self, path: Path | None = None, threads: int = 1):
        return measure.TfliteSession(path or self.path, threads)

    def fp32_session(self, threads: int = 1):
        return measure.TfliteSession(self.fp32_path, threads)

    def memory(self, sample: dict, threads: int) -> dict:
        fed = measure.TfliteSession(self.path).quantize_inputs(sample)  # int8 I/O takes int8
        return measure.memory_cost(self.path, fed, threads=threads, runtime="tflite")

    def specs(self):
        return measure.TfliteSession(self.path).specs()

    def summary(self) -> dict:
        from .tflite_graph import op_counts

        return op_counts(self.path)

    def input_grids(self) -> dict:
        """Float inputs the model quantizes first thing: their grids (agent/reference.py)."""
        from .tflite_graph import input_grids

        return input_grids(self.path)

    def board_io(self, session, inputs: dict, outputs: dict) -> tuple[dict, dict]:
        """int8-I/O models are fed int8 and answer int8: the board's self-test compares those."""
        fed = session.quantize_inputs(inputs)
        return fed, session.raw_run(fed)

    def judges_latency(self) -> bool:
        """INT8 kernels on x86 without VNNI (XNNPACK's AVX2 path) are often slower than FP32,
        while the ARM boards this targets run them faster: only an ARM host's timing decides."""
        return platform.machine().lower() in ("aarch64", "arm64")


def _with_suppression(producers: dict) -> dict:
    """What made each precision's model, saying that --nms appended its suppression."""
    return {k: f"{v}, with non-maximum suppression appended" for k, v in producers.items()}


def _float_nodes(source: Path) -> list[str]:
    """An ONNX model's nodes never quantized: the suppression --nms appended (boxes, scores and
    indices), and the node joining YOLO's boxes (in pixels) and scores (0..1), which one int8
    scale would make all 0 (as the TFLite writer joins it in float)."""
    from .onnx_int8 import load_onnx

    nodes = load_onnx(source).graph.node
    appended = [n for n in nodes if n.name.startswith(NMS_PREFIX)]
    joined = {n.input[0] for n in appended if n.name == f"{NMS_PREFIX}boxes"}
    return [n.name for n in appended] + [n.name for n in nodes if set(n.output) & joined]


def fix_dims(model, calib: dict):
    """A TFLite graph needs every axis but the batch fixed: dynamic ones (-1, "height") take the
    calibration data's size, so `--calibration` with 96x96 images makes a 96x96 model."""
    for vi in model.graph.input:
        if vi.name not in calib:
            continue
        dims = vi.type.tensor_type.shape.dim
        for axis, d in enumerate(dims):
            if axis > 0 and not d.HasField("dim_value") and axis < calib[vi.name].ndim:
                d.dim_value = int(calib[vi.name].shape[axis])
    return model

"""Float .tflite in: quantized to INT8 TFLite by edgeward's writer, measured against
the float model in the same runtime, packed like every other bundle.

The same steps as `convert_onnx` (checks first, a temporary folder, the bundle written last);
only the source differs: the graph is read from the flatbuffer and calibrated in LiteRT.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

from agent.errors import ConversionError
from agent.signing import load_private_key

from . import measure
from .convert import ConvertOptions, Progress, _check_options, _finish, _model_name, load_data
from .nms import parse_nms
from .prune import prune_arrays
from .targets import TfliteTarget
from .tflite_graph import WEIGHTED, write_tflite
from .tflite_reader import CALIBRATION_METHODS, calibration_ranges, embedded_labels, litert_runs, read_tflite


def convert_tflite(model_path: str | Path, calibration: str | Path, out_path: str | Path,
                   key_path: str | Path | None = None, evaluation: str | Path | None = None,
                   options: ConvertOptions | None = None, progress: Progress | None = None,
                   source_label: str = "tflite") -> dict:
    """Quantize a float .tflite model to INT8 TFLite (or keep it float) and write a bundle."""
    opts = options or ConvertOptions(format="tflite")
    say = progress or (lambda stage, done, total: None)
    model_path, out_path = Path(model_path), Path(out_path)
    if opts.format == "onnx":
        opts.format = "tflite"  # the default format follows the source
    if opts.format != "tflite":
        raise ConversionError(f"a TFLite source converts to TFLite only, not --format {opts.format}",
                              "use --format tflite, or convert the original (ONNX/PyTorch) model for ONNX")
    if opts.prune_channels:
        raise ConversionError("--prune-channels works on ONNX and PyTorch sources",
                              "remove channels before exporting to TFLite, or use --prune (unstructured)")
    if opts.state:
        raise ConversionError("--state works on ONNX and PyTorch sources (their recurrent layers become TFLite ops "
                              "with the state as inputs)", "export the model to ONNX and convert that with --state")
    _check_options(opts, out_path)
    nms = parse_nms(opts.nms) if opts.nms else None
    key = load_private_key(key_path) if key_path else None
    graph, names = read_tflite(model_path, opts.cut_at)
    source_names = names  # the file's tensor indices -> graph names (names is None once a copy is calibrated)
    name = _model_name(opts.name, model_path)
    with tempfile.TemporaryDirectory(prefix="edgeward-convert-") as tmp:
        original, calibrated_file, pruning = graph, model_path, None
        if opts.cut_at or not litert_runs(model_path):  # calibrated as read: the file (or its tail) holds
            calibrated_file, names = write_tflite(graph, Path(tmp) / "read-float.tflite"), None  # ops LiteRT lacks
        if opts.prune:  # unstructured: the smallest weights of the weighted layers, calibrated as pruned
            say("pruning", 0, 1)
            graph = copy.deepcopy(graph)
            weights = {op.inputs[1]: graph.consts[op.inputs[1]] for op in graph.ops if op.kind in WEIGHTED}
            pruned, pruning = prune_arrays(weights, opts.prune, opts.prune_scope)
            graph.consts.update(pruned)
            calibrated_file, names = write_tflite(graph, Path(tmp) / "pruned-float.tflite"), None
            say("pruning", 1, 1)
        data: dict = {}

        def ranges(method: str) -> dict:
            return calibration_ranges(calibrated_file, graph, names, data, method,
                                      progress=lambda d, t: say("calibrating", d, t))

        # the float model as edgeward writes it (I/O named by the signature) is the FP32 reference
        target = TfliteTarget(Path(tmp), model_path, data, say, int8_io=opts.tflite_int8_io,
                              graph=graph, ranges_fn=ranges, baseline=original, methods=CALIBRATION_METHODS,
                              nms=nms)
        inputs, _ = target.fp32_session().specs()
        calib, evalset = load_data(calibration, evaluation, inputs, opts, say)
        data.update(calib.inputs)
        ref_out = measure.run_all(target.fp32_session(opts.threads), evalset.inputs, what="the float model")
        _check_read_back(model_path, source_names, evalset.inputs, target.fp32_path, graph.compared_outputs())
        report = _finish(target, name, opts, calib, evalset, evaluation is not None, ref_out, pruning,
                         model_path, out_path, key, say, labels=embedded_labels(model_path))
    report["source"] = source_label
    return report


READ_BACK_SAMPLES = 8
READ_BACK_TOLERANCE = 1e-3  # of the output's largest magnitude (at least 1): float32 rounding, not a different model


def _check_read_back(model_path: Path, names: dict[int, str], inputs: dict, written: Path,
                     outputs: list[str]) -> None:
    """The float model edgeward writes from the graph it read (the FP32 reference every INT8 number
    is measured against) must compute what the source file computes: a misread layer would
    otherwise pass unseen, its INT8 model compared with a float model just as wrong. Checked on a
    few samples where LiteRT runs the source itself (a file with ops it lacks is not checked), on
    the graph's outputs as the file holds them (the tensors of --cut-at, kept for the check). Both
    run on LiteRT's own kernels: XNNPACK's float kernels round otherwise, and a sensitive model
    (MediaPipe's pose landmarker) answered 0.3 % apart through them, its reading exact. A detector
    is checked on what its post-processing reads (Graph.compared_outputs)."""
    import numpy as np

    from .tflite_reader import run_keeping_tensors

    def answers(path: Path, file_names: dict[int, str] | None) -> dict[str, list]:
        wanted = lambda found: {i: name for i, name in found.items() if name in outputs}  # noqa: E731
        got: dict[str, list] = {}
        for _, _, _, tensors in run_keeping_tensors(path, file_names, inputs, wanted, READ_BACK_SAMPLES,
                                                    limit=READ_BACK_SAMPLES):
            for name, v in tensors.items():
                got.setdefault(name, []).append(v)
        return got

    try:
        got = answers(model_path, names)
    except (RuntimeError, ValueError, KeyError):  # LiteRT cannot run the source (an op it lacks): nothing to check
        return
    written = {name: np.concatenate(parts) for name, parts in answers(written, None).items()}
    for name, parts in got.items():
        if name not in written:
            continue
        source = np.concatenate(parts).astype(np.float64)
        ours = written[name][:len(source)].astype(np.float64)
        err = float(np.abs(source - ours).max()) if source.size else 0.0
        if err > READ_BACK_TOLERANCE * max(1.0, float(np.abs(source).max(initial=0.0))):
            raise ConversionError(f"edgeward's reading of {model_path.name} computes something else than the file: "
                                  f"output {name!r} differs by {err:.4g} on the data",
                                  "report this model (its float TFLite and a sample); ship it with --format onnx "
                                  "from its original, if you have one")

"""PyTorch in: an nn.Module (Python API), a TorchScript file or an exported program (CLI),
exported to ONNX with a dynamic batch axis and then converted like any ONNX model.

Needs `torch` (the `torch` extra: about 750 MB for the CPU build). Install the CPU build on
purpose (`pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu`):
a plain `torch` requirement pulls several GB of CUDA packages on x86_64.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from agent.errors import ConversionError, first_line

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")
EXPORTED_SUFFIXES = (".pt2",)


def _torch():
    try:
        import torch
    except ImportError:
        raise ConversionError("PyTorch input needs torch, which is not installed",
                              "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu "
                              "(or edgeward[torch])") from None
    return torch


class _Frozen:
    """An exported program's module behind a plain nn.Module: it refuses train()/eval(), which
    the ONNX exporter calls; its weights are traced in as constants."""

    def __new__(cls, inner):
        torch = _torch()

        class Frozen(torch.nn.Module):
            def forward(self, *args):
                return self.__dict__["_inner"](*args)

        for param in inner.parameters():
            param.requires_grad_(False)
        wrapper = Frozen()
        wrapper.__dict__["_inner"] = inner  # not a registered submodule: train() does not reach it
        return wrapper


def load_torch_file(path: str | Path):
    """A TorchScript (.pt/.pth/.ts) or torch.export (.pt2) file as a callable module in eval mode."""
    torch = _torch()
    path = Path(path)
    try:
        if path.suffix in EXPORTED_SUFFIXES:
            module = _Frozen(torch.export.load(str(path)).module())
        else:
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises many kinds for files it cannot read
        first = first_line(exc)
        raise ConversionError(f"{path} is not a model torch can load ({first})",
                              "save it with torch.jit.save(torch.jit.trace(model, x)) or torch.export.save") from exc
    return _eval_mode(module)


def _eval_mode(module):
    """Inference mode where the module has one (an exported program's module is already fixed)."""
    try:
        module.eval()
    except (AttributeError, NotImplementedError):
        pass
    return module


def to_onnx(module: Any, example: dict[str, np.ndarray], out_path: str | Path,
            opset: int = 17, state: dict[str, str] | None = None) -> tuple[Path, str | None]:
    """Export `module` called with the example inputs (numpy arrays, in call order) to ONNX, with
    the first axis of every input and output dynamic, and check the export against the module.

    Returns the path and a note for the report when the batch could not stay dynamic: a module
    traced at one batch size (torch.export, a traced reshape) can carry that size in its graph,
    and such an export breaks or mixes rows at any other; it is then exported at the example's
    batch size, as a fixed axis, which the board serves one batch at a time.

    `state` (input -> output, a recurrent module's hidden state) keeps those tensors' axes as
    traced ([layers, batch, hidden] has no free first axis), and skips the row check: a
    stateful module's rows are time steps, or share the state, and are not independent."""
    torch = _torch()
    names = list(example)
    args = tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in example.values())
    try:
        with torch.no_grad():
            out = module(*args)
    except Exception as exc:
        raise ConversionError(f"the model does not run on the example inputs {[a.shape for a in args]}: {exc}",
                              "check the calibration data's shapes against the model's forward()") from exc
    want = [o.detach().numpy() for o in (out if isinstance(out, (tuple, list)) else [out])
            if isinstance(o, torch.Tensor)]
    outputs = ["logits"] if len(want) == 1 else [f"output{i}" for i in range(len(want))]
    from .measure import session

    state = state or {}
    fixed = set(state) | set(state.values())
    missing = sorted(fixed - set(names) - set(outputs))
    if missing:
        raise ConversionError(f"state {missing[0]!r} names no input or output of the exported model",
                              f"its inputs: {', '.join(names)}; its outputs: {', '.join(outputs)}")
    _export(torch, module, args, out_path, names, outputs, opset, dynamic=True, fixed=fixed)
    sess, note = session(out_path), None
    if not fixed and not _rows_are_independent(sess, example):
        _export(torch, module, args, out_path, names, outputs, opset, dynamic=False)
        sess, batch = session(out_path), len(next(iter(example.values())))
        note = (f"the exported graph holds the batch size it was traced at, so it is exported with a fixed "
                f"batch of {batch}: the board runs {batch} row(s) per call. For batches, give the batch axis a "
                "free size (torch.export's dynamic_shapes; x.reshape(x.shape[0], -1) in forward)")
    _check_export(sess, example, want)
    return Path(out_path), note


def _export(torch, module, args, out_path, names, outputs, opset: int, dynamic: bool,
            fixed: set[str] = frozenset()) -> None:
    axes = {n: {0: "batch"} for n in names + outputs if n not in fixed} if dynamic else None
    try:
        with warnings.catch_warnings(), _stdout_to_nowhere():
            warnings.simplefilter("ignore")  # the exporter's deprecation notices are not the user's problem
            torch.onnx.export(module, args, str(out_path), dynamo=False, input_names=names, output_names=outputs,
                              dynamic_axes=axes, opset_version=opset)
    except Exception as exc:
        first = first_line(exc).split(" [Caused by")[0].rstrip(" .")  # the rest is the exporter's own graph
        raise ConversionError(f"torch could not export the model to ONNX: {first}",
                              "replace the layer it names, export to ONNX yourself (torch.onnx.export on the "
                              "nn.Module, not a loaded TorchScript file), or save it with torch.export.save") from exc


@contextlib.contextmanager
def _stdout_to_nowhere():
    """torch's ONNX exporter prints its whole internal graph to the process's stdout when it
    fails ("Torch IR graph at exception"), from C++: that is file descriptor 1, which would break
    `--json` and bury the one-line error. Point the descriptor elsewhere while it runs."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as nowhere:
            os.dup2(nowhere.fileno(), 1)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to float32 rounding in another order of operations: within 1e-3 of the output's
    scale (its largest magnitude, at least 1)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(1.0, float(np.max(np.abs(b))) if b.size else 0.0)
    return a.shape == b.shape and (a.size == 0 or float(np.max(np.abs(a - b))) <= 1e-3 * scale)


def _rows_are_independent(sess, example: dict[str, np.ndarray]) -> bool:
    """Two different rows run together give what each gives alone: the batch axis is real."""
    one = {k: np.ascontiguousarray(v[:1]) for k, v in example.items()}
    other = {k: np.ascontiguousarray(np.flip(v[:1])) for k, v in example.items()}  # same values, another row
    both = {k: np.concatenate([one[k], other[k]]) for k in example}
    try:
        alone = [sess.run(None, one), sess.run(None, other)]
        together = sess.run(None, both)
    except Exception:  # the runtime's own types: the graph cannot run two rows at all
        return False
    if any(t.ndim == 0 or len(t) != 2 for t in together):
        return False
    return all(_close(t[i:i + 1], alone[i][j]) for j, t in enumerate(together) for i in range(2))


def _check_export(sess, example: dict[str, np.ndarray], want: list[np.ndarray]) -> None:
    """The ONNX file (in an onnxruntime session) computes what the module does on the example:
    the converter measures INT8 against this file, so an exporter mistake would otherwise pass
    unseen."""
    got = sess.run(None, {k: np.ascontiguousarray(v) for k, v in example.items()})
    for i, (g, w) in enumerate(zip(got, want)):
        if not _close(g, w):
            diff = float(np.max(np.abs(np.asarray(g, np.float64) - w))) if g.shape == w.shape else None
            what = f"max abs difference {diff:.3g}" if diff is not None else f"shape {list(g.shape)}, not {list(w.shape)}"
            raise ConversionError(f"the ONNX export of the model does not compute what the module does on the "
                                  f"example (output {i}: {what})",
                                  "export it with torch.onnx.export yourself and compare, or replace the layer")


def example_from_npz(path: str | Path) -> dict[str, np.ndarray]:
    """One sample of each array in a calibration file, as the example inputs for the export."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k][:1] for k in data.files if k != "labels"}
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read calibration data {path}: {exc}") from exc
    if not arrays:
        raise ConversionError(f"calibration data {path} holds no input arrays")
    return arrays


def prune_for_fine_tuning(module: Any, fine_tune: Callable[[Any], None], sparsity: float | None,
                          channels: float | None, scope: str = "global") -> dict:
    """Prune in torch with masks (torch.nn.utils.prune), let `fine_tune(module)` train with the masks
    held, then make them permanent. The ONNX stage's pruning at the same settings then finds the
    same zeros: the weights the fine-tuning learned to do without are the ones that go.

    channels: each plain convolution loses that share of its output filters (ln_structured, L1),
    bias included, so a removed channel was really silent while fine-tuning. sparsity: the
    smallest weights of Conv/Linear layers are zeroed (globally or per layer, as --prune-scope)."""
    torch = _torch()
    import torch.nn.utils.prune as tprune
    layers = [m for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    if channels:
        for m in layers:
            if isinstance(m, torch.nn.Conv2d) and m.groups == 1 and m.out_channels > 1:
                tprune.ln_structured(m, "weight", amount=channels, n=1, dim=0)
                if m.bias is not None:
                    alive = (m.weight_mask.reshape(m.out_channels, -1).sum(1) > 0).to(m.bias.dtype)
                    tprune.custom_from_mask(m, "bias", alive)
    if sparsity:
        if scope == "global":
            tprune.global_unstructured([(m, "weight") for m in layers], pruning_method=tprune.L1Unstructured,
                                       amount=sparsity)
        else:
            for m in layers:
                tprune.l1_unstructured(m, "weight", amount=sparsity)
    module.train()
    try:
        fine_tune(module)
    finally:
        module.eval()
        for m in layers:
            for name in ("weight", "bias"):
                if tprune.is_pruned(m) and hasattr(m, f"{name}_mask"):
                    tprune.remove(m, name)
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    total = sum(m.weight.numel() for m in layers)
    return {"fine_tuned": True, "weight_sparsity_after_fine_tune": round(zeros / max(total, 1), 4)}


def convert_torch(module: Any, example: dict[str, np.ndarray] | np.ndarray, calibration: str | Path,
                  out_path: str | Path, key_path: str | Path | None = None, evaluation: str | Path | None = None,
                  options=None, progress=None, fine_tune: Callable[[Any], None] | None = None) -> dict:
    """Convert a PyTorch nn.Module: `example` names the inputs (a dict of arrays) or is the one input
    (named "input"); calibration and evaluation .npz files use the same names.

    With pruning asked for (options.prune / options.prune_channels) and training data at hand,
    `fine_tune(module)` is called with the pruning masks in place (the module in train mode) to
    win back what pruning cost; see `prune_for_fine_tuning`."""
    from .convert import ConvertOptions, convert_onnx

    opts = options or ConvertOptions()
    if not isinstance(example, dict):
        example = {"input": np.asarray(example)}
    if opts.name is None:
        opts.name = type(module).__name__
    tuned = None
    if fine_tune is not None:
        if not (opts.prune or opts.prune_channels):
            raise ConversionError("fine_tune is given but no pruning is asked for",
                                  "set ConvertOptions.prune and/or prune_channels, or leave fine_tune out")
        tuned = prune_for_fine_tuning(module, fine_tune, opts.prune, opts.prune_channels, opts.prune_scope)
    _eval_mode(module)
    with tempfile.TemporaryDirectory(prefix="edgeward-torch-") as tmp:
        onnx_path, note = to_onnx(module, example, Path(tmp) / f"{opts.name}.onnx", state=opts.state)
        report = convert_onnx(onnx_path, calibration, out_path, key_path, evaluation, opts, progress)
    report["source"] = "pytorch"
    if note:
        report.setdefault("notes", []).append(note)
    if tuned:
        report["fine_tune"] = tuned
    return report

"""Converted ONNX bundles for the oldest-board tests, made once by the main environment.

The oldest board edgeward supports (scripts/test-oldest-board.sh: onnxruntime 1.17, numpy < 2,
Python 3.10 where the machine has it) has no onnx package and no converter, and must run
what today's converter writes. The digits CNN is saved at the newest IR version this onnx
writes, as a new exporter would; the converter must stamp it down for old runtimes."""

from __future__ import annotations

import sys
from pathlib import Path

CASES = {  # bundle stem -> (source model, precision)
    "digits-qdq": ("digits", "int8"),
    "mobilenet-qdq": ("mobilenet", "int8"),
    "mlp-dynamic": ("mlp", "int8-dynamic"),
    "yolo-nms-qdq": ("yolo", "int8"),  # --nms: NonMaxSuppression, Gather, Pad after a float join
}


def build(folder: str | Path) -> Path:
    import onnx

    from agent.signing import generate_keypair
    from converters import zoo
    from converters.convert import ConvertOptions, convert_onnx

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key, _, _ = generate_keypair(folder / "signing")
    zoo.build_digits_cnn(folder / "digits.onnx", epochs=4)
    newest = onnx.load(str(folder / "digits.onnx"))
    newest.ir_version = onnx.IR_VERSION  # as this onnx writes by default: newer than old runtimes read
    onnx.save(newest, str(folder / "digits.onnx"))
    zoo.build_mobilenet_like(folder / "mobilenet.onnx", size=32)
    zoo.build_wide_mlp(folder / "mlp.onnx", hidden=128)
    from tflitekit import _decoded_yolo

    data = {"digits": zoo.write_digits_npz(folder), "mobilenet": zoo.write_image_npz(folder, size=32),
            "mlp": zoo.write_digits_npz(folder, flat=True), "yolo": _decoded_yolo(folder)}
    for name, ir, domain in (("ir-too-new", 99, None), ("opset-too-new", 8, "ai.onnx.ml")):
        future = onnx.load(str(folder / "digits.onnx"))  # what no onnxruntime of today reads
        future.ir_version = ir
        if domain:
            future.opset_import.append(onnx.helper.make_opsetid(domain, 99))
        onnx.save(future, str(folder / f"{name}.onnx"))
    for stem, (model, precision) in CASES.items():
        calib, evaluation = data[model]
        convert_onnx(folder / f"{model}.onnx", calib, folder / f"{stem}.ewb", key, evaluation,
                     ConvertOptions(name=stem, precision=precision, allow_worse=True,
                                    nms="yolo,score=0.5,max=20" if "nms" in stem else None))
    return folder


if __name__ == "__main__":
    build(sys.argv[1])

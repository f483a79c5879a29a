"""Converted TFLite bundles for the runtime tests, made once by the main environment.

The tflite-runtime 2.14 environment (scripts/test-tflite-runtime.sh) has neither onnx nor
LiteRT's schema, so the bundles it must run are converted here and handed over in a folder,
with the inputs and the outputs ai-edge-litert gave for them."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

CASES = {  # bundle stem -> (model builder, data writer, input name, int8 I/O)
    "digits-int8": ("digits", "input", False),
    "digits-int8io": ("digits", "input", True),
    "mobilenet-int8": ("mobilenet", "image", False),
}


def build(folder: str | Path) -> Path:
    from agent.signing import generate_keypair
    from converters import zoo
    from converters.convert import ConvertOptions, convert_onnx
    from converters.measure import TfliteSession

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key, _, _ = generate_keypair(folder / "signing")
    zoo.build_digits_cnn(folder / "digits.onnx", epochs=6)
    zoo.build_mobilenet_like(folder / "mobilenet.onnx", size=32)
    data = {"digits": zoo.write_digits_npz(folder), "mobilenet": zoo.write_image_npz(folder, size=32)}
    expected = {}
    for stem, (model, name, int8_io) in CASES.items():
        calib, evaluation = data[model]
        bundle = folder / f"{stem}.ewb"
        convert_onnx(folder / f"{model}.onnx", calib, bundle, key, evaluation,
                     ConvertOptions(name=stem, format="tflite", tflite_int8_io=int8_io, allow_worse=True))
        import tarfile

        with tarfile.open(bundle) as tar:
            (folder / f"{stem}.tflite").write_bytes(tar.extractfile("model.tflite").read())
        session = TfliteSession(folder / f"{stem}.tflite")
        with np.load(evaluation) as d:
            x = session.quantize_inputs({name: d[name][:16]})
        expected[f"{stem}.input"] = x[name]
        out_name, out = next(iter(session.raw_run(x).items()))
        expected[f"{stem}.output"] = out
        # one quantization step of the output: the int8 tensor the float output is dequantized from
        details = {d["name"]: d for d in session.rt._it.get_tensor_details()}
        expected[f"{stem}.step"] = np.float64((details.get(f"{out_name}/int8") or details[out_name])["quantization"][0])
    np.savez(folder / "converted.npz", **expected)
    return folder


if __name__ == "__main__":
    build(sys.argv[1])

"""Shared fixtures: a real Mosquitto per test, real models trained once per session, signed bundles.

Nothing here is downloaded: the digits CNN is trained by converters.zoo from
scikit-learn's bundled data, and converted by the real converter.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import REFERENCE, open_bundle, parse_manifest, write_bundle
from agent.devbroker import LocalBroker
from agent.signing import generate_keypair, load_private_key


@pytest.fixture
def broker(tmp_path):
    """A private Mosquitto on a free 127.0.0.1 port with its own config; never the system broker."""
    b = LocalBroker(workdir=tmp_path / "broker").start()
    yield b
    b.stop()


@dataclass
class Assets:
    root: Path
    fp32_v1: Path
    fp32_v2: Path
    calib: Path
    eval: Path
    key: Path
    pub: Path
    other_key: Path
    other_pub: Path
    v1: Path          # signed bundle, digits v1
    v2: Path          # signed bundle, digits v2 (a better-trained model)
    unsigned_v2: Path
    accuracy_v1: float
    accuracy_v2: float

    def eval_inputs(self, n: int = 8) -> np.ndarray:
        with np.load(self.eval) as d:
            return d["input"][:n]

    def eval_labels(self, n: int = 8) -> np.ndarray:
        with np.load(self.eval) as d:
            return d["labels"][:n]


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Assets:
    """Built here, or read from EDGEWARD_ASSETS: the oldest-board environment has no converter,
    and scripts/test-oldest-board.sh builds them in the main one (`python tests/conftest.py DIR`)."""
    made = os.environ.get("EDGEWARD_ASSETS")
    if made:
        return load_assets(Path(made))
    return build_assets(tmp_path_factory.mktemp("assets"))


def load_assets(root: Path) -> Assets:
    accuracy = json.loads((root / "accuracy.json").read_text())
    return Assets(root, root / "digits_v1.onnx", root / "digits_v2.onnx", root / "calib.npz", root / "eval.npz",
                  root / "signing.key", root / "signing.pub", root / "intruder.key", root / "intruder.pub",
                  root / "digits-v1.ewb", root / "digits-v2.ewb", root / "digits-v2-unsigned.ewb",
                  accuracy["v1"], accuracy["v2"])


def build_assets(root: Path) -> Assets:
    from converters import zoo
    from converters.convert import ConvertOptions, convert_onnx

    root.mkdir(parents=True, exist_ok=True)
    acc1 = zoo.build_digits_cnn(root / "digits_v1.onnx", epochs=4, seed=0)
    acc2 = zoo.build_digits_cnn(root / "digits_v2.onnx", epochs=12, seed=1)
    calib, evaluation = zoo.write_digits_npz(root)
    key, pub, _ = generate_keypair(root / "signing")
    other_key, other_pub, _ = generate_keypair(root / "intruder")
    v1, v2, unsigned = root / "digits-v1.ewb", root / "digits-v2.ewb", root / "digits-v2-unsigned.ewb"
    convert_onnx(root / "digits_v1.onnx", calib, v1, key, evaluation, ConvertOptions(name="digits", version=1))
    convert_onnx(root / "digits_v2.onnx", calib, v2, key, evaluation, ConvertOptions(name="digits", version=2))
    convert_onnx(root / "digits_v2.onnx", calib, unsigned, None, evaluation, ConvertOptions(name="digits", version=2))
    (root / "accuracy.json").write_text(json.dumps({"v1": acc1, "v2": acc2}))
    return load_assets(root)


def fp32_onnx_bundle(tmp: Path, key: Path, name: str, onnx_path: Path, inputs, outputs, reference: dict,
                     state: dict | None = None) -> Path:
    """A signed bundle of an FP32 ONNX file the test built, with its reference arrays."""
    from agent.bundle import Manifest, SelfTest

    ref = tmp / f"{name}-reference.npz"
    np.savez(ref, **reference)
    m = Manifest(name=name, version=1, format="onnx", model_file="model.onnx", runtime="onnxruntime",
                 precision="fp32", inputs=inputs, outputs=outputs, state=state or {},
                 selftest=SelfTest(atol=1e-4, min_top1_agreement=1.0))
    return write_bundle(tmp / f"{name}.ewb", m, {"model.onnx": onnx_path, "reference.npz": ref},
                        load_private_key(key))


@pytest.fixture(scope="session")
def rnn_bundle(assets, tmp_path_factory) -> Path:
    """A keyword-spotting-shaped RNN ("kws") that keeps its hidden state h between calls."""
    import onnxruntime as ort

    from agent.bundle import TensorSpec
    from converters.zoo import build_stateful_rnn

    tmp = tmp_path_factory.mktemp("rnn")
    path = build_stateful_rnn(tmp / "rnn.onnx")
    frames = np.random.default_rng(1).random((6, 1, 8), dtype=np.float32)
    h = np.zeros((1, 1, 16), np.float32)
    scores, _ = ort.InferenceSession(str(path)).run(None, {"frames": frames, "h": h})
    return fp32_onnx_bundle(tmp, assets.key, "kws", path,
                            [TensorSpec("frames", "float32", [-1, 1, 8]), TensorSpec("h", "float32", [1, 1, 16])],
                            [TensorSpec("scores", "float32", [-1, 1, 4]), TensorSpec("h_out", "float32", [1, 1, 16])],
                            {"input.frames": frames, "input.h": h, "expected.scores": scores}, state={"h": "h_out"})


def repack(src: Path, out: Path, key: Path | None, manifest_edit=None, reference_edit=None,
           model_edit=None) -> Path:
    """Rebuild a bundle with an edited manifest and/or reference data, signed with `key`.

    This is how the tests make bundles that are well-formed and properly signed but
    must still be refused for what they say (over budget, failing self-test, old version).
    """
    opened = open_bundle(src, verify_signature=False)
    manifest = parse_manifest(opened.manifest_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with tarfile.open(src) as tar:
            for name in manifest.files:
                (tmp / name).write_bytes(tar.extractfile(name).read())
        if manifest_edit:
            manifest_edit(manifest)
        if model_edit:
            model_edit(tmp / manifest.model_file)
        if reference_edit:
            with np.load(tmp / REFERENCE) as ref:
                arrays = {k: ref[k] for k in ref.files}
            reference_edit(arrays)
            np.savez(tmp / REFERENCE, **arrays)
        files = {name: tmp / name for name in manifest.files}
        write_bundle(out, manifest, files, load_private_key(key) if key else None)
    return out


def flip_byte_in_member(src: Path, out: Path, member: str) -> Path:
    """Copy a bundle and corrupt one byte inside `member`, leaving the tar structure valid."""
    shutil.copy(src, out)
    with tarfile.open(out) as tar:
        info = tar.getmember(member)
        offset = info.offset_data + info.size // 2
    with open(out, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    return out


if __name__ == "__main__":
    build_assets(Path(sys.argv[1]))


DEAD_RELU_BIAS = np.array([2.0, -1.5, 0.75, 3.0], np.float32)


@pytest.fixture
def dead_relu_onnx(tmp_path) -> tuple[Path, np.ndarray]:
    """A conv whose ReLU is dead on every input in [0, 1) (its bias is -100), then a 1x1 conv
    that therefore puts out its own bias, DEAD_RELU_BIAS; and 48 such inputs (calibration: the
    first 32). The degenerate case of quantization: an activation range of exactly zero."""
    from onnx import TensorProto, helper, numpy_helper

    import onnx

    rng = np.random.default_rng(13)
    inits = [numpy_helper.from_array(np.abs(rng.standard_normal((4, 3, 3, 3))).astype(np.float32) * 0.1, "w1"),
             numpy_helper.from_array(np.full(4, -100.0, np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((4, 4, 1, 1)) * 0.3).astype(np.float32), "w2"),
             numpy_helper.from_array(DEAD_RELU_BIAS, "b2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["dead"]),
             helper.make_node("Conv", ["dead", "w2", "b2"], ["y"], kernel_shape=[1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "dead.onnx"))
    return tmp_path / "dead.onnx", rng.random((48, 3, 8, 8)).astype(np.float32)

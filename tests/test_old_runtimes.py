"""Bundles from today's converter run on the oldest board edgeward supports.

Boards lag workstations: Jetson's JetPack 6 ships onnxruntime 1.17, Ubuntu 22.04 Python 3.10.
scripts/test-oldest-board.sh runs this file there (bundles converted by the main environment,
EDGEWARD_ONNX_FIXTURE); the main suite runs it against its own onnxruntime and also checks
the stamp that makes the files readable by old runtimes."""

import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from agent.budget import Budget
from agent.bundle import open_bundle
from agent.engine import Engine
from agent.signing import load_public_key
from agent.store import Store

FIXTURE = os.environ.get("EDGEWARD_ONNX_FIXTURE")
EXPECT_ORT = os.environ.get("EDGEWARD_EXPECT_ORT")  # e.g. 1.17.3: that version must serve
sys.path.insert(0, str(Path(__file__).parent))
from onnxkit import CASES  # noqa: E402


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    if FIXTURE:
        return Path(FIXTURE)
    from onnxkit import build

    return build(tmp_path_factory.mktemp("onnx-bundles"))


@pytest.mark.parametrize("stem", list(CASES))
def test_converted_onnx_bundles_pass_their_self_test_on_this_onnxruntime(converted, stem, tmp_path):
    """The board's install path (verify, unpack, load in a worker, self-test against the
    outputs the workstation shipped), then a batch of requests."""
    engine = Engine(Budget(4096, reserve_mb=0))
    model = engine.load(Store(tmp_path).install(open_bundle(converted / f"{stem}.ewb",
                                                            [load_public_key(converted / "signing.pub")])))
    result = model.self_test()
    assert result["max_abs_err"] <= model.manifest.selftest.atol
    worker, _ = model.proc.call({"op": "inspect"})
    assert worker["runtime"] == "onnxruntime"
    if EXPECT_ORT:
        assert worker["versions"]["onnxruntime"] == EXPECT_ORT
    engine.activate(model)
    spec = model.manifest.inputs[0]
    rows = spec.shape[0] if spec.shape[0] > 0 else 4  # a detector with --nms takes one image a call
    x = np.random.default_rng(0).random([rows] + spec.shape[1:], dtype=np.float32)
    out = next(iter(engine.infer_arrays(stem, {spec.name: x})[1].values()))
    assert out.shape[0] == rows and np.isfinite(out).all()
    engine.close()


def test_the_converter_stamps_each_onnx_file_for_old_runtimes(converted):
    """onnxruntime 1.17 reads IR versions up to 9 and no operator set it does not know: the
    quantizer's unused imports (ai.onnx.ml opset 5, ...) and a new exporter's IR are gone."""
    import onnx  # the main environment's: the oldest board's has none (its script deselects this test)

    for stem in CASES:
        with tarfile.open(converted / f"{stem}.ewb") as tar:
            model = onnx.load_from_string(tar.extractfile("model.onnx").read())
        assert model.ir_version <= 9, stem
        assert {o.domain for o in model.opset_import} <= {"", "ai.onnx", "com.microsoft"}, stem
        assert all(o.version <= 20 for o in model.opset_import if o.domain in ("", "ai.onnx")), stem


@pytest.mark.parametrize("name, says", [("ir-too-new", "Unsupported model IR version: 99"),
                                        ("opset-too-new", "support for domain ai.onnx.ml is till opset")])
def test_a_model_newer_than_the_boards_onnxruntime_is_refused_with_the_fix(converted, name, says):
    import onnxruntime

    from agent.errors import BundleError
    from agent.runtimes.onnx import OnnxRuntime

    with pytest.raises(BundleError) as caught:
        OnnxRuntime(str(converted / f"{name}.onnx"))
    assert caught.value.message.startswith(f"this board's onnxruntime {onnxruntime.__version__} is older than")
    assert says in caught.value.message and "upgrade onnxruntime on the board" in caught.value.fix

"""PyTorch in: an nn.Module through the Python API, TorchScript and exported-program files
through the CLI, each converted end to end and served by a real agent engine."""

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")

from agent.budget import Budget  # noqa: E402
from agent.bundle import open_bundle  # noqa: E402
from agent.engine import Engine  # noqa: E402
from agent.errors import ConversionError  # noqa: E402
from agent.signing import load_public_key  # noqa: E402
from agent.store import Store  # noqa: E402
from converters.convert import ConvertOptions  # noqa: E402
from converters.from_torch import convert_torch  # noqa: E402


def _trained_digits_cnn(assets):
    """A small CNN trained for a few epochs on the digits, in torch."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 8 * 8, 10))
    with np.load(assets.calib) as d:
        x = torch.from_numpy(d["input"])
    with np.load(assets.eval) as d:
        y_all = d["labels"]
    # train on the calibration inputs with labels from a reference model: the FP32 digits ONNX
    import onnxruntime as ort

    y = torch.from_numpy(ort.InferenceSession(str(assets.fp32_v1)).run(None, {"input": x.numpy()})[0].argmax(1))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    assert len(y_all) > 0
    return net.eval()


def _serve(bundle, assets, tmp_path):
    engine = Engine(Budget(4096, reserve_mb=0))
    model = engine.load(Store(tmp_path / "store").install(open_bundle(bundle, [load_public_key(assets.pub)])))
    selftest = model.self_test()
    engine.activate(model)
    return engine, model, selftest


def test_an_nn_module_converts_end_to_end_and_serves(tmp_path, assets):
    net = _trained_digits_cnn(assets)
    x = assets.eval_inputs(1)
    report = convert_torch(net, {"input": x}, assets.calib, tmp_path / "t.ewb", assets.key, assets.eval,
                           ConvertOptions(name="torch-digits"))
    assert report["source"] == "pytorch" and report["graph"]["ops"].get("QuantizeLinear", 0) > 0
    assert report["graph"]["int8_initializers"] >= 2 and report["quality"]["accuracy_drop_pp"] <= 2.0
    engine, model, selftest = _serve(tmp_path / "t.ewb", assets, tmp_path)
    assert model.manifest.inputs[0].shape == [-1, 1, 8, 8]  # the batch axis stayed dynamic
    batch = assets.eval_inputs(32)
    with torch.no_grad():
        want = net(torch.from_numpy(batch)).numpy()
    got = engine.infer_arrays("torch-digits", {"input": batch})[1]["logits"]
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95  # INT8 against the torch FP32 model
    assert np.abs(got - want).max() < 0.1 * (want.max() - want.min())
    engine.close()


@pytest.mark.parametrize("kind", ["torchscript", "exported"])
def test_torch_files_convert_through_the_cli(tmp_path, assets, kind):
    net = _trained_digits_cnn(assets)
    example = torch.from_numpy(assets.eval_inputs(1))
    if kind == "torchscript":
        path = tmp_path / "digits.pt"
        torch.jit.trace(net, example).save(str(path))
    else:
        path = tmp_path / "digits.pt2"
        torch.export.save(torch.export.export(net, (example,)), str(path))
    r = subprocess.run([sys.executable, "-m", "agent.cli", "convert", str(path), "--calibration", str(assets.calib),
                        "--eval", str(assets.eval), "--key", str(assets.key), "-o", str(tmp_path / "c.ewb"), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)  # stdout holds the JSON report alone
    # an exported program's weights come as Constant nodes; they are quantized all the same
    assert report["graph"]["int8_initializers"] >= 2 and report["graph"]["float_weight_tensors"] == 0
    engine, model, selftest = _serve(tmp_path / "c.ewb", assets, tmp_path)
    assert model.name == "digits" and selftest["top1_agreement"] == 1.0
    print(kind, model.manifest.inputs[0].shape, report.get("notes"))
    engine.close()


def test_torch_input_errors_name_the_problem(tmp_path, assets):
    bad = tmp_path / "nonsense.pt"
    bad.write_bytes(b"not a torch file")
    r = subprocess.run([sys.executable, "-m", "agent.cli", "convert", str(bad), "--calibration", str(assets.calib),
                        "-o", str(tmp_path / "x.ewb")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "is not a model torch can load" in r.stderr and not (tmp_path / "x.ewb").exists()
    net = torch.nn.Linear(5, 2)
    with pytest.raises(ConversionError, match="does not run on the example inputs"):
        convert_torch(net, {"input": assets.eval_inputs(1)}, assets.calib, tmp_path / "y.ewb")
    assert not (tmp_path / "y.ewb").exists()


class _BakedBatch(torch.nn.Module):
    """Flattens with a literal batch of 1, as traced code often does: its ONNX export works at
    batch 1 only, whatever axes it declares."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(x.reshape(1, 16))


def test_a_module_traced_at_one_batch_size_is_exported_with_that_batch_fixed(tmp_path, assets):
    torch.manual_seed(0)
    net = _BakedBatch().eval()
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((64, 4, 4)).astype(np.float32))
    report = convert_torch(net, {"x": rng.standard_normal((1, 4, 4)).astype(np.float32)}, tmp_path / "calib.npz",
                           tmp_path / "b.ewb", assets.key, options=ConvertOptions(name="baked", allow_worse=True))
    assert any("fixed batch of 1" in n for n in report["notes"]) and report["quality"]["top1_agreement"] >= 0.9
    engine, model, selftest = _serve(tmp_path / "b.ewb", assets, tmp_path)
    assert model.manifest.inputs[0].shape == [1, 4, 4] and selftest["top1_agreement"] == 1.0
    rows = rng.standard_normal((3, 4, 4)).astype(np.float32)
    got = np.concatenate([engine.infer_arrays("baked", {"x": r[None]})[1]["logits"] for r in rows])
    with torch.no_grad():
        want = np.concatenate([net(torch.from_numpy(r[None])).numpy() for r in rows])
    assert got.shape == (3, 4) and np.abs(got - want).max() < 0.05 * (want.max() - want.min())
    engine.close()


def test_an_export_that_computes_something_else_is_refused(tmp_path):
    from converters.from_torch import _check_export, to_onnx
    from converters.measure import session

    net = torch.nn.Linear(8, 3).eval()
    x = np.ones((1, 8), np.float32)
    path, note = to_onnx(net, {"input": x}, tmp_path / "l.onnx")
    assert note is None
    with torch.no_grad():
        right = net(torch.from_numpy(x)).numpy()
    _check_export(session(path), {"input": x}, [right])
    with pytest.raises(ConversionError, match="does not compute what the module does .*output 0: max abs difference"):
        _check_export(session(path), {"input": x}, [right + 1.0])


def _digits_train_split():
    from converters import zoo

    x_tr, y_tr, _, _ = zoo.digits_dataset()
    return torch.from_numpy(x_tr), torch.from_numpy(y_tr)


def _cnn_with_batchnorm():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 32),
                               torch.nn.ReLU(), torch.nn.Linear(32, 10))


def _train(net, steps=150, lr=0.01):
    x, y = _digits_train_split()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    return net


def test_an_nn_module_with_batchnorm_converts_to_int8_tflite(tmp_path, assets):
    net = _train(_cnn_with_batchnorm()).eval()
    report = convert_torch(net, {"input": assets.eval_inputs(1)}, assets.calib, tmp_path / "t.ewb", assets.key,
                           assets.eval, ConvertOptions(name="bn-digits", format="tflite"))
    ops = report["graph"]["ops"]
    assert report["format"] == "tflite" and ops["CONV_2D"] == 1 and ops["FULLY_CONNECTED"] == 2
    assert "MUL" not in ops and "ADD" not in ops          # BatchNormalization folded into the convolution
    assert report["graph"]["tensor_dtypes"]["float32"] == 2 and report["quality"]["accuracy_drop_pp"] <= 1.0
    engine, model, _ = _serve(tmp_path / "t.ewb", assets, tmp_path)
    batch = assets.eval_inputs(32)
    with torch.no_grad():
        want = net(torch.from_numpy(batch)).numpy()
    got = engine.infer_arrays("bn-digits", {"input": batch})[1]["logits"]
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95
    engine.close()


def test_fine_tuning_with_the_pruning_masks_wins_back_accuracy(tmp_path, assets):
    """Half the conv channels removed: without fine-tuning the model loses accuracy; a fine_tune
    callback trained with the masks in place wins most of it back, and the channels that go are
    exactly the ones it learned to do without (the ONNX model equals the fine-tuned one)."""
    def plain():
        torch.manual_seed(2)
        return _train(torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                          torch.nn.Flatten(), torch.nn.Linear(128, 10)), steps=200)

    opts = dict(prune_channels=0.5, allow_worse=True)
    blunt = convert_torch(plain().eval(), {"input": assets.eval_inputs(1)}, assets.calib, tmp_path / "a.ewb",
                          assets.key, assets.eval, ConvertOptions(name="blunt", **opts))
    tuned_net = plain()
    tuned = convert_torch(tuned_net, {"input": assets.eval_inputs(1)}, assets.calib, tmp_path / "b.ewb",
                          assets.key, assets.eval, ConvertOptions(name="tuned", **opts),
                          fine_tune=lambda m: _train(m, steps=150, lr=0.005))
    assert tuned["channel_pruning"]["channels_after"] == 4 == blunt["channel_pruning"]["channels_after"]
    assert tuned["fine_tune"]["fine_tuned"] and not tuned_net.training
    assert tuned["quality"]["accuracy_int8"] > blunt["quality"]["accuracy_int8"]
    engine, model, _ = _serve(tmp_path / "b.ewb", assets, tmp_path)
    batch = assets.eval_inputs(64)
    with torch.no_grad():
        want = tuned_net(torch.from_numpy(batch)).numpy()
    got = engine.infer_arrays("tuned", {"input": batch})[1]["logits"]
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95   # INT8 of the pruned graph vs the fine-tuned net
    engine.close()
    with pytest.raises(ConversionError, match="no pruning is asked for"):
        convert_torch(plain(), {"input": assets.eval_inputs(1)}, assets.calib, tmp_path / "c.ewb",
                      fine_tune=lambda m: None)


class _TinyResNet(torch.nn.Module):
    """ResNet's shape in miniature: a BN+ReLU stem with a padded 3x3/2 max pool (not TF's SAME, so it
    needs an explicit PAD), a residual block whose Add is fused with its ReLU, average pool, Linear."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        y = self.stem(x)
        return self.head(torch.relu(y + self.block(y)))


def test_a_resnet_shaped_module_lowers_exactly_and_quantizes(tmp_path, assets):
    import onnx

    from converters.from_torch import to_onnx
    from converters.measure import TfliteSession
    from converters.onnx_to_tflite import lower
    from converters.tflite_graph import write_tflite

    torch.manual_seed(3)
    net = _train(_TinyResNet(), steps=150).eval()
    x = assets.eval_inputs(64)
    assert to_onnx(net, {"input": x[:1]}, tmp_path / "r.onnx") == (tmp_path / "r.onnx", None)
    graph = lower(onnx.load(str(tmp_path / "r.onnx")))
    kinds = [op.kind for op in graph.ops]
    assert kinds.count("PAD") == 1 and "MAX_POOL_2D" in kinds and "ADD" in kinds
    assert next(op for op in graph.ops if op.kind == "ADD").options["activation"] == "RELU"
    write_tflite(graph, tmp_path / "r.tflite")
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(TfliteSession(tmp_path / "r.tflite").run(None, {"input": x})[0], want, atol=1e-4)
    report = convert_torch(net, {"input": x[:1]}, assets.calib, tmp_path / "r.ewb", assets.key, assets.eval,
                           ConvertOptions(name="resnetish", format="tflite"))
    assert report["quality"]["top1_agreement"] >= 0.97 and report["graph"]["tensor_dtypes"]["float32"] == 2

"""Pruning before quantization, and the xz-compressed bundles that make its zeros pay off:
converted for real, installed and served by a real agent engine; hostile archives refused."""

import io
import tarfile

import numpy as np
import pytest

from agent.budget import Budget
from agent.bundle import open_bundle
from agent.engine import Engine
from agent.errors import ConversionError, UnsafeArchiveError
from agent.signing import load_public_key
from agent.store import Store
from converters.convert import ConvertOptions, convert_onnx
from converters.prune import prune_unstructured
from converters.zoo import build_wide_mlp, write_digits_npz


def _weights(path):
    import onnx
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer
            if len(i.dims) >= 2}


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_pruning_zeroes_the_smallest_weights(tmp_path, scope):
    src = build_wide_mlp(tmp_path / "m.onnx", hidden=128)
    report = prune_unstructured(src, tmp_path / "p.onnx", 0.5, scope)
    before, after = _weights(src), _weights(tmp_path / "p.onnx")
    total = sum(w.size for w in after.values())
    zeros = sum(int((w == 0).sum()) for w in after.values())
    assert abs(zeros / total - 0.5) < 0.01 and report["sparsity"] == pytest.approx(zeros / total, abs=1e-4)
    dropped, survived = [], []
    for name, w in after.items():
        kept = w != 0
        np.testing.assert_array_equal(w[kept], before[name][kept])  # survivors untouched
        if scope == "layer":
            assert abs(report["layers"][name] - 0.5) < 0.02
            assert np.abs(before[name][~kept]).max() <= np.abs(before[name][kept]).min()  # smallest went, per layer
        dropped.append(np.abs(before[name][~kept]))
        survived.append(np.abs(before[name][kept]))
    if scope == "global":  # the smallest went, over all layers together
        assert np.concatenate(dropped).max() <= np.concatenate(survived).min()


def test_a_pruned_model_ships_as_a_smaller_compressed_bundle_and_serves(tmp_path, assets):
    model = build_wide_mlp(tmp_path / "wide.onnx", hidden=512)
    calib, evaluation = write_digits_npz(tmp_path, flat=True)
    plain = convert_onnx(model, calib, tmp_path / "plain.ewb", assets.key, evaluation, ConvertOptions(name="wide"))
    pruned = convert_onnx(model, calib, tmp_path / "pruned.ewb", assets.key, evaluation,
                          ConvertOptions(name="wide", version=2, prune=0.5))
    assert pruned["pruning"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert (tmp_path / "pruned.ewb").read_bytes()[:6] == b"\xfd7zXZ\x00"
    assert pruned["bundle_bytes"] < 0.7 * plain["bundle_bytes"]  # the zeros cost next to nothing compressed
    opened = open_bundle(tmp_path / "pruned.ewb", [load_public_key(assets.pub)])
    assert opened.manifest.sparsity == pytest.approx(0.5, abs=0.01)
    engine = Engine(Budget(4096, reserve_mb=0))
    m = engine.load(Store(tmp_path / "store").install(opened))
    assert m.self_test()["top1_agreement"] == 1.0
    with np.load(evaluation) as d:
        out = m.infer_arrays({"features": d["features"][:4]})
    assert out["logits"].shape == (4, 10)
    m.close()


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1])
def test_a_sparsity_out_of_range_is_refused(tmp_path, bad):
    src = build_wide_mlp(tmp_path / "m.onnx", hidden=16)
    with pytest.raises(ConversionError, match="between 0 and 1"):
        prune_unstructured(src, tmp_path / "p.onnx", bad)


def _xz_tar(path, members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return path


def test_compressed_archives_cannot_unpack_beyond_their_limits(tmp_path):
    many = _xz_tar(tmp_path / "many.ewb", [(f"f{i}.bin", b"x") for i in range(40)])
    with pytest.raises(UnsafeArchiveError, match="more than 16 files"):
        open_bundle(many, verify_signature=False)
    bomb = _xz_tar(tmp_path / "bomb.ewb", [("model.onnx", bytes(8 << 20))])  # 8 MB of zeros, ~1 kB packed
    assert bomb.stat().st_size < 64 << 10
    with pytest.raises(UnsafeArchiveError, match="over the"):
        open_bundle(bomb, verify_signature=False, max_bytes=1 << 20)
    sneaky = _xz_tar(tmp_path / "sneaky.ewb", [("../escape.onnx", b"x")])
    with pytest.raises(UnsafeArchiveError, match="not a plain file name"):
        open_bundle(sneaky, verify_signature=False)

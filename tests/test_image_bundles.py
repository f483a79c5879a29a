"""Image folders end to end: converted from PNG files, the spec in the bundle, the board's batch
job preparing photos the same way (real converter, real agent, real onnxruntime)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from agent import images, wire
from agent.bundle import open_bundle
from agent.client import LocalClient
from agent.signing import load_public_key
from converters import zoo

from mqttkit import offline_agent


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "agent.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def digit_pngs(tmp_path_factory):
    """The digits as 8-bit PNGs: calibration flat, evaluation in one sub-folder per class ("3_three")."""
    root = tmp_path_factory.mktemp("pngs")
    x_tr, _, x_te, y_te = zoo.digits_dataset()
    names = "zero one two three four five six seven eight nine".split()
    for i, x in enumerate(x_tr[:64]):
        (root / "calib").mkdir(exist_ok=True)
        Image.fromarray(np.round(x[0] * 255).astype(np.uint8)).save(root / "calib" / f"{i:04d}.png")
    for i, (x, y) in enumerate(zip(x_te[:200], y_te[:200])):
        folder = root / "eval" / f"{y}_{names[y]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(x[0] * 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def image_bundle(assets, digit_pngs):
    out = digit_pngs / "digits-img.ewb"
    r = _cli("convert", assets.fp32_v1, "--calibration", digit_pngs / "calib", "--eval", digit_pngs / "eval",
             "--preprocess", "unit", "--name", "digits", "--key", assets.key, "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)


def test_a_model_converted_from_image_folders_carries_its_spec_and_classes(image_bundle, assets, digit_pngs):
    out, report = image_bundle
    m = open_bundle(out, [load_public_key(assets.pub)]).manifest
    image = m.preprocessing["image"]
    assert (image["height"], image["width"], image["color"], image["layout"]) == (8, 8, "gray", "nchw")
    assert image["scale"] == pytest.approx(1 / 255)
    assert m.preprocessing["classes"] == [f"{i}_{n}" for i, n in
                                          enumerate("zero one two three four five six seven eight nine".split())]
    assert report["calibration_samples"] == 64 and report["evaluation_samples"] == 200
    # labels came from the folders: the accuracy is the model's real one on those digits, not chance
    assert report["quality"]["accuracy_fp32"] > 0.85 and report["quality"]["accuracy_drop_pp"] <= 1.0
    r = _cli("inspect", out, "--pubkey", assets.pub)
    assert r.returncode == 0 and "images: 8x8 gray NCHW float32, resize stretch" in r.stdout


def test_image_data_without_a_spec_or_a_spec_without_images_is_refused_and_nothing_is_written(assets, digit_pngs,
                                                                                              tmp_path):
    out = tmp_path / "x.ewb"
    r = _cli("convert", assets.fp32_v1, "--calibration", digit_pngs / "calib", "-o", out)
    assert r.returncode == 2 and "image data needs --preprocess" in r.stderr
    r = _cli("convert", assets.fp32_v1, "--calibration", assets.calib, "--preprocess", "unit", "-o", out)
    assert r.returncode == 2 and "--preprocess describes image files, but the data given are .npz" in r.stderr
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted((digit_pngs / "calib").iterdir())[:5]:
        (few / p.name).write_bytes(p.read_bytes())
    r = _cli("convert", assets.fp32_v1, "--calibration", few, "--preprocess", "unit", "-o", out)
    assert r.returncode == 2 and "has 5 images, at least 16 are needed" in r.stderr
    r = _cli("convert", assets.fp32_v1, "--calibration", digit_pngs / "calib", "--preprocess", "unit,color=rgb",
             "-o", out)
    assert r.returncode == 2 and "color=rgb does not fit a model input with 1 channel" in r.stderr
    assert list(tmp_path.iterdir()) == [few]


def test_the_board_prepares_photos_as_the_bundle_says_and_names_the_classes(image_bundle, assets, digit_pngs,
                                                                            tmp_path):
    out, _ = image_bundle
    ra, sock = offline_agent(tmp_path / "store", assets.pub, "pi-cam", [out])
    try:
        results = tmp_path / "r.jsonl"
        r = _cli("infer", "--model", "digits", "--input", digit_pngs / "eval", "--batch", "16",
                 "--output", results, "--socket", sock)
        assert r.returncode == 0, r.stderr
        assert "200 samples through digits v1" in r.stdout
        lines = [json.loads(line) for line in results.read_text().splitlines()]
        # the same pixels as the converter measured: the same answers as the arrays they came from
        _, _, x_te, y_te = zoo.digits_dataset()
        pixels = (np.round(x_te[:200] * 255) / 255).astype(np.float32)
        with LocalClient(sock) as client:
            want = client.infer("digits", pixels)["logits"]
        order = sorted(range(200), key=lambda i: (f"{y_te[i]}", f"{i:04d}"))  # the files' order: class, name
        assert [rec["top1"] for rec in lines] == want[order].argmax(1).tolist()
        np.testing.assert_allclose([rec["outputs"]["logits"] for rec in lines], want[order], atol=1e-5)
        names = "zero one two three four five six seven eight nine".split()
        assert all(rec["class"] == f"{rec['top1']}_{names[rec['top1']]}" for rec in lines)
        right = sum(rec["top1"] == y_te[i] for rec, i in zip(lines, order))
        assert right >= 170  # the folder's labels and the model agree: no mixed-up channels or scale
        # arrays with --preprocess, and a spec that does not fit, are one-line errors
        np.save(tmp_path / "x.npy", pixels[:2])
        r = _cli("infer", "--model", "digits", "--input", tmp_path / "x.npy", "--preprocess", "unit",
                 "--output", tmp_path / "r2.jsonl", "--socket", sock)
        assert r.returncode == 2 and "--preprocess describes image files" in r.stderr
        r = _cli("infer", "--model", "digits", "--input", digit_pngs / "eval", "--preprocess", "unit,size=16x16",
                 "--output", tmp_path / "r3.jsonl", "--socket", sock)
        assert r.returncode == 2 and "--preprocess prepares images as [1, 16, 16], digits v1's input takes " \
            "[1, 8, 8]: leave size= out of --preprocess" in r.stderr
        assert not (tmp_path / "r2.jsonl").exists() and not (tmp_path / "r3.jsonl").exists()
    finally:
        ra.stop()


def test_a_bundle_without_a_spec_takes_photos_only_with_preprocess(assets, digit_pngs, tmp_path):
    ra, sock = offline_agent(tmp_path / "store", assets.pub, "pi-npz", [assets.v1])
    try:
        cmd = ["infer", "--model", "digits", "--input", digit_pngs / "calib", "--output", tmp_path / "r.jsonl",
               "--socket", sock]
        r = _cli(*cmd)
        assert r.returncode == 2 and "bundle does not say how images become its input" in r.stderr
        r = _cli(*cmd, "--preprocess", "unit")
        assert r.returncode == 0, r.stderr
        lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
        assert len(lines) == 64 and "class" not in lines[0]  # no class names in that bundle
    finally:
        ra.stop()


def test_agent_check_warns_when_an_image_model_cannot_read_images_here(image_bundle, assets, tmp_path, monkeypatch):
    import importlib.util

    from agent.check import FAIL, OK, WARN, run_checks
    from agent.config import PipelineConfig, load_config
    from agent.store import Store

    store = Store(tmp_path / "store")
    store.install(open_bundle(image_bundle[0], [load_public_key(assets.pub)]))
    store.set_current("digits", 1)
    cfg = load_config(None, {"mqtt.url": "mqtt://127.0.0.1:9", "store.path": str(tmp_path / "store"),
                             "trust.keys": [str(assets.pub)]}, check_files=False)
    models = [(f.level, f.detail) for f in run_checks(cfg) if f.check == "models"]
    assert models == [(OK, "digits v1 (onnx, onnxruntime)")]  # Pillow is here
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "PIL" else real(name, *a))
    found = [f for f in run_checks(cfg) if f.check == "models"]
    assert [f.level for f in found] == [OK, WARN] and "need Pillow" in found[1].detail
    assert found[1].fix == "pip install 'edgeward[images]'"
    cfg.pipelines = [PipelineConfig("cam/+/jpeg", "digits", "seen/digits", format="image")]
    found = [f for f in run_checks(cfg) if f.check == "pipelines"]
    assert [(f.level, f.fix) for f in found][0] == (WARN, "pip install 'edgeward[images]'")
    assert "cam/+/jpeg take(s) images, and Pillow is not installed" in found[0].detail
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert [(f.level, f.detail) for f in run_checks(cfg) if f.check == "pipelines"] == [
        (OK, "cam/+/jpeg -> digits (image) -> seen/digits")]
    # a pipeline to a model that is not installed, and a spec that does not fit the model
    cfg.pipelines = [PipelineConfig("cam/a", "digitz", "seen/a", format="image"),
                     PipelineConfig("cam/b", "digits", "seen/b", format="image", preprocess="unit,color=rgb")]
    found = [f for f in run_checks(cfg) if f.check == "pipelines"]
    assert [f.level for f in found] == [WARN, FAIL]
    assert "no model 'digitz' is installed" in found[0].detail
    assert "color=rgb does not fit a model input with 1 channel" in found[1].detail


def test_a_large_folder_is_read_up_to_max_images_evenly_over_its_classes(assets, digit_pngs, tmp_path):
    out = tmp_path / "few.ewb"
    r = _cli("convert", assets.fp32_v1, "--calibration", digit_pngs / "calib", "--eval", digit_pngs / "eval",
             "--preprocess", "unit", "--max-images", "40", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "data: calibration" in r.stdout and "(40 of 64 images), evaluation" in r.stdout
    assert "(40 of 200 images)" in r.stdout
    from agent import images

    picked = images.spread(images.files_in(digit_pngs / "eval"), 40)
    assert len({p.parent.name for p in picked}) == 10  # every class keeps its share
    r = _cli("convert", assets.fp32_v1, "--calibration", digit_pngs / "calib", "--preprocess", "unit",
             "--max-images", "0", "-o", out)
    assert r.returncode == 2 and "--max-images 0" in r.stderr


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few bytes whose header says width x height: a decompression bomb's shape."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.integration
def test_a_camera_pipeline_takes_encoded_images_and_answers_with_the_class(broker, image_bundle, assets, digit_pngs,
                                                                            tmp_path):
    """format: image: a JPEG or PNG per message, as an ESP32-CAM publishes it; the model's worker
    decodes it as the bundle says and the answer names the class. Anything that is not a
    sane image gets an error answer and the pipeline goes on."""
    import io

    from agent import images

    from mqttkit import RawClient, RunningAgent, wait_for

    ra = RunningAgent({"mqtt.url": broker.url, "device.id": "pi-cam", "store.path": str(tmp_path / "store"),
                       "trust.keys": [str(assets.pub)], "memory.budget_mb": 4096, "memory.reserve_mb": 0,
                       "models": {"digits": {"mode": "batched", "max_batch": 8, "max_delay_ms": 2}},
                       "pipelines": [
                           {"input_topic": "cam/+/png", "model": "digits", "output_topic": "seen/digits",
                            "format": "image"},
                           {"input_topic": "cam/crop", "model": "digits", "output_topic": "seen/crop",
                            "format": "image", "preprocess": "unit,resize=crop"}]},
                      install=[image_bundle[0]])
    raw = RawClient(broker.port)
    try:
        wait_for(ra.agent.connected.is_set, what="agent connected")
        raw.subscribe("seen/#")

        def answer(topic, payload, out="seen/digits"):
            raw.publish(topic, payload)
            got = []
            wait_for(lambda: got.extend(raw.collect(lambda t: t == out, 0.2)) or got, what=f"an answer on {out}")
            return json.loads(got[0].payload)

        files = sorted(images.files_in(digit_pngs / "eval"))[::20]
        spec = images.ImageSpec.from_dict(open_bundle(image_bundle[0], verify_signature=False)
                                          .manifest.preprocessing["image"])
        names = "zero one two three four five six seven eight nine".split()
        for path in files:  # the same answers as the same pixels prepared here and sent as an array
            a = answer("cam/0/png", path.read_bytes())
            want = ra.agent.infer("digits", {"input": images.load(path, spec)[None]})["logits"]
            assert a["status"] == "ok" and a["model"] == "digits", a
            np.testing.assert_allclose(a["outputs"]["logits"], want, atol=1e-5)
            assert a["top1"] == int(want.argmax()) and a["class"] == f"{a['top1']}_{names[a['top1']]}"
        jpeg = io.BytesIO()  # a larger colour photo, as a camera sends it: resized and made gray as the bundle says
        Image.open(files[0]).convert("RGB").resize((64, 48)).save(jpeg, "JPEG", quality=95)
        assert answer("cam/1/png", jpeg.getvalue())["status"] == "ok"
        assert answer("cam/crop", jpeg.getvalue(), "seen/crop")["status"] == "ok"  # the pipeline's own spec
        tiff = io.BytesIO()
        Image.open(files[0]).save(tiff, "TIFF")
        for payload, fragment in ((b"not an image", "cannot be decoded: not an image in a format this agent opens"),
                                  (_png_claiming(5000, 5000), "is 5000x5000 pixels, over the limit of 16777216"),
                                  (_png_claiming(100_000, 100_000), "over the limit of 16777216"),
                                  (tiff.getvalue(), "cannot be decoded")):  # a format cameras do not send
            bad = answer("cam/0/png", payload)
            assert bad["status"] == "error" and bad["code"] == "bad_image" and fragment in bad["error"], bad
        assert answer("cam/0/png", files[0].read_bytes())["status"] == "ok"  # and it goes on
        stats = ra.agent.engine.get("digits").snapshot()
        assert stats.errors >= 4 and stats.requests >= len(files) + 4
    finally:
        raw.close()
        ra.stop()


@pytest.mark.integration
def test_an_image_pipeline_on_a_model_whose_bundle_has_no_spec_needs_preprocess(broker, assets, digit_pngs, tmp_path):
    from mqttkit import RawClient, RunningAgent, wait_for

    png = sorted((digit_pngs / "calib").iterdir())[0].read_bytes()
    ra = RunningAgent({"mqtt.url": broker.url, "device.id": "pi-npz", "store.path": str(tmp_path / "store"),
                       "trust.keys": [str(assets.pub)], "memory.budget_mb": 4096, "memory.reserve_mb": 0,
                       "pipelines": [
                           {"input_topic": "cam/plain", "model": "digits", "output_topic": "seen/plain",
                            "format": "image"},
                           {"input_topic": "cam/unit", "model": "digits", "output_topic": "seen/unit",
                            "format": "image", "preprocess": "unit"}]},
                      install=[assets.v1])
    raw = RawClient(broker.port)
    try:
        wait_for(ra.agent.connected.is_set, what="agent connected")
        raw.subscribe("seen/#")
        got = {}
        for topic in ("plain", "unit"):
            raw.publish(f"cam/{topic}", png)
            msgs = []
            wait_for(lambda: msgs.extend(raw.collect(lambda t: t == f"seen/{topic}", 0.2)) or msgs,
                     what=f"an answer on seen/{topic}")
            got[topic] = json.loads(msgs[0].payload)
        assert got["plain"]["status"] == "error" and "does not say how images become its input" in got["plain"]["error"]
        assert got["unit"]["status"] == "ok" and "class" not in got["unit"] and "top1" in got["unit"]
    finally:
        raw.close()
        ra.stop()


def test_preprocess_belongs_to_image_pipelines(assets, tmp_path):
    from agent.config import load_config
    from agent.errors import ConfigError

    with pytest.raises(ConfigError, match="preprocess is for format: image"):
        load_config(None, {"mqtt.url": "mqtt://127.0.0.1:9", "store.path": str(tmp_path), "trust.keys": [str(assets.pub)],
                           "pipelines": [{"input_topic": "a", "model": "m", "output_topic": "b", "preprocess": "unit"}]})


@pytest.mark.integration
def test_a_photo_sent_to_a_device_over_mqtt_is_prepared_there_and_named(broker, image_bundle, assets, digit_pngs,
                                                                         tmp_path):
    """`edgeward infer --device D --model M --input photo.png`: the file goes as it is, and the
    device answers as its batch job would for the same file."""
    from agent import images

    from mqttkit import RunningAgent, wait_for

    ra = RunningAgent({"mqtt.url": broker.url, "device.id": "pi-door", "store.path": str(tmp_path / "store"),
                       "trust.keys": [str(assets.pub)], "memory.budget_mb": 4096, "memory.reserve_mb": 0},
                      install=[image_bundle[0]])
    try:
        wait_for(ra.agent.connected.is_set, what="agent connected")
        photo = sorted(images.files_in(digit_pngs / "eval"))[37]
        spec = images.ImageSpec.from_dict(open_bundle(image_bundle[0], verify_signature=False)
                                          .manifest.preprocessing["image"])
        want = ra.agent.infer("digits", {"input": images.load(photo, spec)[None]})["logits"]
        r = _cli("infer", "--device", "pi-door", "--model", "digits", "--input", photo, "--broker", broker.url,
                 "--json", timeout=60)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        np.testing.assert_allclose(got["outputs"]["logits"], want, atol=1e-5)
        names = "zero one two three four five six seven eight nine".split()
        assert got["top1"] == int(want.argmax()) and got["class"] == f"{got['top1']}_{names[got['top1']]}"
        r = _cli("infer", "--device", "pi-door", "--model", "digits", "--input", photo, "--broker", broker.url,
                 timeout=60)
        assert r.returncode == 0 and f"class: {got['class']}" in r.stdout
        r = _cli("infer", "--device", "pi-door", "--model", "digits", "--input", photo, "--broker", broker.url,
                 "--draw", tmp_path / "boxes.png", timeout=60)  # a classifier has no boxes to draw
        assert r.returncode != 0 and "answered with no detections list (not a detector)" in r.stderr
        assert not (tmp_path / "boxes.png").exists()
        fake = tmp_path / "broken.png"
        fake.write_bytes(b"not really a png")
        r = _cli("infer", "--device", "pi-door", "--model", "digits", "--input", fake, "--broker", broker.url,
                 timeout=60)
        assert r.returncode != 0 and "cannot be decoded" in r.stderr and "Traceback" not in r.stderr
        r = _cli("infer", "--device", "pi-door", "--model", "digits", "--input", photo, "--broker", broker.url,
                 "--preprocess", "unit,color=rgb", timeout=60)  # a spec that does not fit the model
        assert r.returncode != 0 and "color=rgb does not fit a model input with 1 channel" in r.stderr
    finally:
        ra.stop()


@pytest.mark.integration
def test_home_assistant_shows_what_a_camera_pipeline_last_saw(broker, image_bundle, assets, digit_pngs, tmp_path):
    """With discovery on, each image pipeline is a sensor read from its own output topic: its
    template (rendered with Jinja2, as Home Assistant does) gives the class, or "error"."""
    import jinja2

    from mqttkit import RawClient, RunningAgent, wait_for

    raw = RawClient(broker.port)
    raw.subscribe("homeassistant/#")
    raw.subscribe("seen/#")
    ra = RunningAgent({"mqtt.url": broker.url, "device.id": "pi-ha-cam", "store.path": str(tmp_path / "store"),
                       "trust.keys": [str(assets.pub)], "memory.budget_mb": 4096, "memory.reserve_mb": 0,
                       "homeassistant.enabled": True,
                       "pipelines": [{"input_topic": "cam/door", "model": "digits", "output_topic": "seen/door",
                                      "format": "image"},
                                     {"input_topic": "sensor/x", "model": "digits", "output_topic": "seen/x"}]},
                      install=[image_bundle[0]])
    try:
        topic = "homeassistant/sensor/edgeward_pi_ha_cam/seen_seen_door/config"
        config = wait_for(lambda: [json.loads(m.payload) for m in raw.collect(lambda t: t == topic, 0.5)],
                          timeout=10, what="the camera sensor's config")[-1]
        assert config["state_topic"] == "seen/door" and config["device"]["identifiers"] == ["edgeward_pi_ha_cam"]
        assert not [m for m in raw.collect(lambda t: "seen_seen_x" in t, 0.5)]  # arrays: no sensor

        def render(template, payload):
            return jinja2.Environment().from_string(template).render(value_json=json.loads(payload)).strip()

        photo = sorted(images.files_in(digit_pngs / "eval"))[5]
        for payload in (photo.read_bytes(), b"not an image"):
            raw.publish("cam/door", payload)
            answer = wait_for(lambda: [m.payload for m in raw.collect(lambda t: t == "seen/door", 0.3)],
                              what="the camera pipeline's answer")[-1]
            shown = render(config["value_template"], answer)
            assert shown == (json.loads(answer).get("class") or "error")
        assert shown == "error" and json.loads(answer)["status"] == "error"
        assert json.loads(render(config["json_attributes_template"], answer)).keys() == {"model_version", "ts"}
    finally:
        ra.stop()
        raw.close()


def test_a_local_app_sends_a_photo_and_the_agent_prepares_it(image_bundle, assets, digit_pngs, tmp_path):
    """LocalClient.infer_image (or any app speaking the local API, in any language): the file's
    bytes go to the agent's socket, the model's worker prepares them as the bundle says."""
    from agent.errors import ImageError, ProtocolError

    ra, sock = offline_agent(tmp_path / "store", assets.pub, "pi-app", [image_bundle[0]])
    try:
        photo = sorted(images.files_in(digit_pngs / "eval"))[11]
        spec = images.ImageSpec.from_dict(open_bundle(image_bundle[0], verify_signature=False)
                                          .manifest.preprocessing["image"])
        names = "zero one two three four five six seven eight nine".split()
        with LocalClient(sock) as client:
            want = client.infer("digits", images.load(photo, spec)[None])["logits"]
            for image in (photo, photo.read_bytes()):  # a path or the bytes
                got = client.infer_image("digits", image)
                np.testing.assert_allclose(got["outputs"]["logits"], want, atol=1e-5)
                assert got["top1"] == int(want.argmax()) and got["class"] == f"{got['top1']}_{names[got['top1']]}"
            assert client.infer_image("digits", photo, preprocess="unit,resize=crop")["top1"] == got["top1"]
            with pytest.raises(ImageError, match="cannot be decoded"):
                client.infer_image("digits", b"no image here")
            with pytest.raises(ImageError, match="color=rgb does not fit"):
                client.infer_image("digits", photo, preprocess="unit,color=rgb")
            with pytest.raises(ImageError, match=r"--preprocess prepares images as \[1, 4000, 4000\], digits v1's "
                                                 r"input takes \[1, 8, 8\]"):  # refused before any decoding
                client.infer_image("digits", photo, preprocess="unit,size=4000x4000")
            # the worker's own socket takes tensors only, and says where images go
            direct = client._route("digits")
            with pytest.raises(ProtocolError, match="encoded images go to the agent's socket"):
                client._call(wire.pack_tensors({"image": np.frombuffer(photo.read_bytes(), np.uint8)}, v=1,
                                               op="infer", model="digits", image=True), direct)
            assert client.infer("digits", images.load(photo, spec)[None])["logits"].shape == (1, 10)  # goes on
    finally:
        ra.stop()


def test_edgeward_bench_times_camera_frames_prepared_on_the_board(image_bundle, assets, digit_pngs, tmp_path):
    """`edgeward bench --model M --image photo.jpg`: frames per second a board keeps up with."""
    ra, sock = offline_agent(tmp_path / "store", assets.pub, "pi-bench", [image_bundle[0]])
    try:
        photo = sorted(images.files_in(digit_pngs / "eval"))[3]
        before = ra.agent.engine.get("digits").snapshot().requests
        r = _cli("bench", "--model", "digits", "--image", photo, "--clients", "1,2", "--seconds", "0.5",
                 "--socket", sock, "--json")
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout)
        assert result["image_bytes"] == photo.stat().st_size
        assert [s["clients"] for s in result["steps"]] == [1, 2]
        assert all(s["errors"] == 0 and s["requests"] > 5 for s in result["steps"])
        assert ra.agent.engine.get("digits").snapshot().requests - before >= sum(s["requests"] for s in result["steps"])
        r = _cli("bench", "--model", "digits", "--image", photo, "--seconds", "0.3", "--socket", sock)
        assert r.returncode == 0 and "kB photo per request, prepared on the board" in r.stdout
        junk = tmp_path / "junk.jpg"
        junk.write_bytes(b"nope")
        r = _cli("bench", "--model", "digits", "--image", junk, "--seconds", "0.3", "--socket", sock)
        assert r.returncode != 0 and "cannot be decoded" in r.stderr and "Traceback" not in r.stderr
        r = _cli("bench", "--model", "digits", "--image", photo, "--bare", "--socket", sock)
        assert r.returncode == 2 and "leave out --bare, or --image" in r.stderr
    finally:
        ra.stop()

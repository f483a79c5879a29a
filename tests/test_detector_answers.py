"""A detector's answers list what it found, wherever the image comes from: a camera pipeline
over a real Mosquitto, a photo sent to a device, a local app's photo, a batch job over a
folder. Each list holds the served boxes, classes and scores up to the count, best first,
with the class names of the label file the converter took (--labels). Real converter,
real agent, real LiteRT."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from agent import images
from agent.bundle import open_bundle
from agent.client import LocalClient
from agent.errors import ConversionError, EdgewardError
from converters.convert import ConvertOptions
from converters.data import read_labels

from mqttkit import RawClient, RunningAgent, offline_agent, wait_for

NAMES = ["red", "green", "blue"]  # the zoo detector's classes: which colour channel stands out


def _blocks(rng, n: int, size: int = 32) -> np.ndarray:
    """RGB photos of 4x4-pixel coloured blocks: each block a detection of its colour's class."""
    low = (rng.random((n, size // 4, size // 4, 3)) * 255).astype(np.uint8)
    return np.repeat(np.repeat(low, 4, 1), 4, 2)


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """(bundle, public key, photo folder, detection output names): the zoo's SSD, its label map
    embedded as TFLite metadata does it, converted from a folder of PNG photos (--preprocess unit)."""
    from agent.signing import generate_keypair
    from converters.from_tflite import convert_tflite
    from converters.zoo import build_ssd_tflite

    tmp = tmp_path_factory.mktemp("detector")
    source = build_ssd_tflite(tmp / "ssd.tflite", width=64, nms_score_threshold=0.9)  # lists of 0..10
    photos = tmp / "photos"
    photos.mkdir()
    for i, pixels in enumerate(_blocks(np.random.default_rng(5), 40)):
        Image.fromarray(pixels).save(photos / f"{i:03d}.png")
    (tmp / "plain.tflite").write_bytes(source.read_bytes())
    with zipfile.ZipFile(source, "a") as z:  # the label map as model metadata carries it: a zip after the model
        z.writestr("labelmap.txt", "???\n" + "\n".join(NAMES) + "\n")  # TensorFlow's SSD examples' form
    key, pub, _ = generate_keypair(tmp / "signing")
    report = convert_tflite(source, photos, tmp / "ssd.ewb", key, None, ConvertOptions(name="ssd", preprocess="unit"))
    assert report["preprocessing"]["classes"] == NAMES
    assert report["labels_from"] == "the label map in ssd.tflite (labelmap.txt)"
    with np.load(_reference(tmp / "ssd.ewb")) as ref:
        order = [str(n) for n in ref["detections"]]
    return tmp / "ssd.ewb", pub, photos, order


def _reference(bundle):
    import io
    import tarfile

    with tarfile.open(bundle) as tar:
        return io.BytesIO(tar.extractfile("reference.npz").read())


def _listed(outputs: dict, order: list[str]) -> list[dict]:
    """What the answer must say: image 0's rows of the served arrays, up to its count."""
    boxes, classes, scores, count = (np.asarray(outputs[n], np.float64) for n in order)
    n = int(count.reshape(-1)[0])
    return [{"box": [round(float(v), 5) for v in boxes.reshape(-1, 4)[k]], "class_id": int(classes.reshape(-1)[k]),
             "class": NAMES[int(classes.reshape(-1)[k])], "score": round(float(scores.reshape(-1)[k]), 5)}
            for k in range(n)]


def _home_assistant(config: dict, answer: dict) -> tuple[str, dict]:
    """(state, attributes) of the camera's sensor, its templates rendered as Home Assistant
    renders them: in Jinja's immutable sandbox."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment()
    attrs = json.loads(env.from_string(config["json_attributes_template"]).render(value_json=answer))
    assert attrs.pop("model_version") == answer["version"] and attrs.pop("ts") == answer["ts"]
    return env.from_string(config["value_template"]).render(value_json=answer).strip(), attrs


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "agent.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.integration
def test_a_camera_pipeline_and_a_device_request_answer_with_the_detections(broker, detector, tmp_path):
    bundle, pub, photos, order = detector
    ra = RunningAgent({"mqtt.url": broker.url, "device.id": "pi-yard", "store.path": str(tmp_path / "store"),
                       "trust.keys": [str(pub)], "memory.budget_mb": 4096, "memory.reserve_mb": 0,
                       "homeassistant.enabled": True,
                       "pipelines": [
                           {"input_topic": "cam/yard", "model": "ssd", "output_topic": "seen/yard", "format": "image"},
                           {"input_topic": "arrays/yard", "model": "ssd", "output_topic": "seen/arrays"}]},
                      install=[bundle])
    raw = RawClient(broker.port)
    try:
        wait_for(ra.agent.connected.is_set, what="agent connected")
        raw.subscribe("seen/#")
        raw.subscribe("homeassistant/#")
        topic = "homeassistant/sensor/edgeward_pi_yard/seen_seen_yard/config"
        ha = wait_for(lambda: [json.loads(m.payload) for m in raw.collect(lambda t: t == topic, 0.5)],
                      timeout=10, what="the camera sensor's config")[-1]

        def answer(topic, payload, out):
            raw.publish(topic, payload)
            got = []
            wait_for(lambda: got.extend(raw.collect(lambda t: t == out, 0.2)) or got, what=f"an answer on {out}")
            return json.loads(got[0].payload)

        manifest = open_bundle(bundle, verify_signature=False).manifest
        spec = images.ImageSpec.from_dict(manifest.preprocessing["image"])
        feed = manifest.inputs[0].name
        seen, most = [], (0, None)
        for path in images.files_in(photos)[:8]:
            pixels = images.load(path, spec)[None]
            want = _listed(ra.agent.infer("ssd", {feed: pixels}), order)
            a = answer("cam/yard", path.read_bytes(), "seen/yard")
            assert a["status"] == "ok" and a["detections"] == want and "top1" not in a, a
            assert [d["score"] for d in want] == sorted((d["score"] for d in want), reverse=True)
            assert all(d["score"] >= 0.9 for d in want)  # the op's own threshold
            b = answer("arrays/yard", json.dumps({"inputs": {feed: pixels.tolist()}}).encode(), "seen/arrays")
            assert b["detections"] == want  # a JSON pipeline of arrays lists them too
            shown = _home_assistant(ha, a)  # as Home Assistant shows the camera: its best detection
            assert shown == (want[0]["class"] if want else "nothing", {"count": len(want),
                                                                        "classes": [d["class"] for d in want]})
            seen += want
            most = max(most, (len(want), path))
        assert len(seen) >= 8 and {d["class"] for d in seen} == set(NAMES)  # every class named somewhere
        unnamed = {"box": [0.1, 0.1, 0.2, 0.2], "class_id": 7, "score": 0.95}  # an index the label file left out
        assert _home_assistant(ha, {**a, "detections": [unnamed]}) == ("7", {"count": 1, "classes": [""]})
        assert _home_assistant(ha, {**a, "detections": []}) == ("nothing", {"count": 0, "classes": []})
        assert _home_assistant(ha, {"v": 1, "status": "error", "error": "x", "ts": 1.0, "version": None})[0] == "error"

        photo = most[1]  # a photo sent to the device: the same answer
        want = _listed(ra.agent.infer("ssd", {feed: images.load(photo, spec)[None]}), order)
        assert len(want) >= 2
        r = _cli("infer", "--device", "pi-yard", "--model", "ssd", "--input", photo, "--broker", broker.url,
                 "--json", timeout=60)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["detections"] == want
        r = _cli("infer", "--device", "pi-yard", "--model", "ssd", "--input", photo, "--broker", broker.url,
                 "--draw", tmp_path / "seen.png", timeout=60)
        assert r.returncode == 0 and "box (ymin xmin ymax xmax)" in r.stdout, r.stdout
        _boxes_are_drawn_where_they_are(photo, tmp_path / "seen.png", want)  # the device's answer, on the photo
        rows = re.findall(r"^  (red|green|blue) +([0-9.]+) ", r.stdout, re.M)  # one row per detection, best first
        assert rows == [(d["class"], f"{d['score']:.3f}") for d in want] and "top-1 per row" not in r.stdout
    finally:
        raw.close()
        ra.stop()


def test_a_local_app_and_a_batch_job_get_the_detections(detector, tmp_path):
    from agent.batchjob import run_job

    bundle, pub, photos, order = detector
    ra, sock = offline_agent(tmp_path / "store", pub, "pi-shed", [bundle])
    try:
        with LocalClient(sock) as client:
            assert next(m for m in client.models() if m["name"] == "ssd")["detections"] == order
            by_photo = {}
            for path in images.files_in(photos)[:6]:
                got = client.infer_image("ssd", path)
                assert got["detections"] == _listed(got["outputs"], order) and "top1" not in got
                by_photo[path.name] = got["detections"]
        out = tmp_path / "found.jsonl"
        summary = run_job(sock, "ssd", str(photos), str(out), batch=8, progress=None)
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert summary["samples"] == len(records) == 40
        for r in records:
            assert r["detections"] == _listed({k: np.asarray(v)[None] for k, v in r["outputs"].items()}, order)
            assert "top1" not in r  # a detector's classes output is not a classifier's scores
            name = r["source"].rsplit("/", 1)[-1]
            if name in by_photo:  # the batch job prepares photos as the local API does
                assert r["detections"] == by_photo[name]
        assert sum(len(r["detections"]) for r in records) >= 20
        _wide_photos_are_answered_on_the_photo(sock, order, tmp_path)
    finally:
        ra.stop()


def _wide_photos_are_answered_on_the_photo(sock, order, tmp_path):
    """A 64x32 photo letterboxed into the 32x32 input: its boxes come back as fractions of the
    photo (the black bars undone), from the local API and from a batch job alike."""
    from agent.batchjob import run_job

    wide = tmp_path / "wide"
    wide.mkdir()
    rng = np.random.default_rng(9)
    for i in range(4):  # blocks of 8x8 pixels: the input's 4x4 cells once the photo is halved
        low = (rng.random((4, 8, 3)) * 255).astype(np.uint8)
        Image.fromarray(np.repeat(np.repeat(low, 8, 0), 8, 1)).save(wide / f"{i}.png")
    letterbox = "unit,resize=letterbox"
    spec = images.parse(letterbox, [1, 32, 32, 3])
    with LocalClient(sock) as client:
        answers = {}
        for path in images.files_in(wide):
            x, size = images.load_photo(path, spec)
            ky, oy, kx, ox = images.photo_box(size, spec)
            assert (ky, oy, kx, ox) == (2.0, -0.5, 1.0, 0.0)  # 16 rows of image between 8-row bars
            on_input = _listed(client.infer("ssd", x[None]), order)
            got = client.infer_image("ssd", path, preprocess=letterbox)
            assert len(got["detections"]) == len(on_input)
            for d, e in zip(got["detections"], on_input):
                y0, x0, y1, x1 = e["box"]
                want = np.clip([y0 * ky + oy, x0 * kx + ox, y1 * ky + oy, x1 * kx + ox], 0, 1)
                np.testing.assert_allclose(d["box"], want, atol=2e-5)
                assert (d["class"], d["score"]) == (e["class"], e["score"])
            answers[path.name] = got["detections"]
        assert sum(len(a) for a in answers.values()) >= 4
    run_job(sock, "ssd", str(wide), str(tmp_path / "wide.jsonl"), preprocess=letterbox, progress=None,
            draw=str(tmp_path / "drawn"))
    for line in (tmp_path / "wide.jsonl").read_text().splitlines():
        r = json.loads(line)
        name = r["source"].rsplit("/", 1)[-1]
        assert r["detections"] == answers[name]
        _boxes_are_drawn_where_they_are(wide / name, tmp_path / "drawn" / name, r["detections"])
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == sorted(answers)  # no temporary files left
    np.save(tmp_path / "arrays.npy", np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(EdgewardError, match=r"--draw shows a detector's boxes on photos, and ssd is a detector run "
                                            r"on arrays"):
        run_job(sock, "ssd", str(tmp_path / "arrays.npy"), str(tmp_path / "a.jsonl"), progress=None,
                draw=str(tmp_path / "no"))
    assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "no").exists()
    r = _cli("infer", "--device", "pi-x", "--model", "ssd", "--input", tmp_path / "arrays.npy", "--draw",
             tmp_path / "d.png")
    assert r.returncode != 0 and "--draw shows a detector's boxes on a photo, and the input is an array file" in \
        r.stderr and "Traceback" not in r.stderr


def _boxes_are_drawn_where_they_are(photo, drawn, found):
    """--draw: the photo as it was, each box's outline in its class's colour where the box is."""
    before = np.asarray(Image.open(photo).convert("RGB")).astype(int)
    after = np.asarray(Image.open(drawn).convert("RGB")).astype(int)
    assert after.shape == before.shape
    h, w = before.shape[:2]
    changed = np.abs(after - before).sum(-1) > 0
    for d in found:
        ymin, xmin, ymax, xmax = d["box"]
        top, left = min(int(ymin * h), h - 1), min(int(xmin * w), w - 1)
        assert changed[top, left:int(xmax * w)].any() or changed[top:int(ymax * h), left].any(), d
    drawn_on = np.zeros_like(changed)
    for d in found:  # nothing changed but the boxes and their labels ("red 0.93": a line of text at the top left)
        ymin, xmin, ymax, xmax = d["box"]
        top, left = int(ymin * h), int(xmin * w)
        drawn_on[max(top - 2, 0):int(ymax * h) + 3, max(left - 2, 0):int(xmax * w) + 3] = True
        drawn_on[max(top - 2, 0):top + 14, max(left - 2, 0):left + 8 * 12] = True
    assert not (changed & ~drawn_on).any()


@pytest.mark.parametrize("text, names", [
    ("person\nbicycle\ncar\n", ["person", "bicycle", "car"]),
    ("???\nperson\nbicycle\n\n", ["person", "bicycle"]),  # TensorFlow's SSD label map: the placeholder dropped
    ("0  person\n2  car\n", ["person", "", "car"]),  # Coral's: "INDEX NAME", gaps unnamed
    ("0: cat\n1: dog\n", ["cat", "dog"]),
    ("cat\n\ndog\n", ["cat", "", "dog"]),  # a blank line is an unnamed class, not a shift
    ("???\nperson\n???\ncar\n", ["person", "", "car"]),  # COCO's unused ids: unnamed
])
def test_label_files_are_read_as_the_common_label_maps_write_them(tmp_path, text, names):
    (tmp_path / "labels.txt").write_text(text)
    assert read_labels(tmp_path / "labels.txt").names == names


@pytest.mark.parametrize("text, fragment", [
    ("", "names no classes"),
    ("0 cat\n0 dog\n", "gives one index twice"),
    (None, "cannot read the label file"),
    (b"\xff\xfe\x00", "cannot read the label file"),
])
def test_a_label_file_that_cannot_be_read_is_one_clear_error(tmp_path, text, fragment):
    path = tmp_path / "labels.txt"
    if isinstance(text, str):
        path.write_text(text)
    elif text is not None:
        path.write_bytes(text)
    with pytest.raises(ConversionError, match=fragment):
        read_labels(path)


def test_a_classifiers_label_file_goes_into_the_bundle_and_the_reports(assets, tmp_path):
    names = "zero one two three four five six seven eight nine".split()
    (tmp_path / "digits.txt").write_text("\n".join(f"{i}: {n}" for i, n in enumerate(names)) + "\n")
    r = _cli("convert", assets.fp32_v1, "--calibration", assets.calib, "-o", tmp_path / "d.ewb",
             "--labels", tmp_path / "digits.txt", "--name", "digits")
    assert r.returncode == 0, r.stderr
    assert f"labels: 10 classes (zero, one, two, three, ... nine), from the label file {tmp_path / 'digits.txt'} " \
           "(stored in the bundle)" in r.stdout
    assert open_bundle(tmp_path / "d.ewb", verify_signature=False).manifest.preprocessing == {"classes": names}
    r = _cli("inspect", tmp_path / "d.ewb")
    assert r.returncode == 0 and "labels: 10 classes (zero, one, two, three, ... nine)" in r.stdout, r.stdout


def test_labels_that_cannot_be_the_models_are_refused_or_left_out(assets, detector, tmp_path):
    """A classifier's label file must name as many classes as it scores; a detector's every
    class it finds. Checked against the float model before quantizing: a --labels file that
    does not fit is refused and no bundle is left; a model's own map is left out, and said."""
    from converters.convert import convert_onnx
    from converters.from_tflite import convert_tflite

    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    with pytest.raises(ConversionError, match="names 3 classes, and the model scores 10"):
        convert_onnx(assets.fp32_v1, assets.calib, tmp_path / "d.ewb", assets.key, assets.eval,
                     ConvertOptions(name="digits", labels=str(tmp_path / "three.txt")))
    assert not (tmp_path / "d.ewb").exists()
    (tmp_path / "two.txt").write_text("red\ngreen\n")
    with pytest.raises(ConversionError, match=r"names 2 classes, and the detector finds class 2"):
        convert_tflite(detector[0].parent / "ssd.tflite", detector[2], tmp_path / "s.ewb", None, None,
                       ConvertOptions(name="ssd", preprocess="unit", labels=str(tmp_path / "two.txt")))
    assert not (tmp_path / "s.ewb").exists()
    plain = detector[0].parent / "plain.tflite"  # a model whose own label map is short: converted unnamed
    (tmp_path / "short.tflite").write_bytes(plain.read_bytes())
    with zipfile.ZipFile(tmp_path / "short.tflite", "a") as z:
        z.writestr("labels.txt", "red\n")
    report = convert_tflite(tmp_path / "short.tflite", detector[2], tmp_path / "s.ewb", None, None,
                            ConvertOptions(name="ssd", preprocess="unit"))
    assert "classes" not in report["preprocessing"] and report["labels_from"] is None
    assert report["labels_note"].startswith("the label map in short.tflite (labels.txt) names 1 classes, and the "
                                            "detector finds class ") and "(name the classes with --labels)" in \
        report["labels_note"]
    (tmp_path / "three.txt").write_text("\n".join(NAMES))  # --labels wins over the file's own
    report = convert_tflite(tmp_path / "short.tflite", detector[2], tmp_path / "s.ewb", None, None,
                            ConvertOptions(name="ssd", preprocess="unit", labels=str(tmp_path / "three.txt")))
    assert report["preprocessing"]["classes"] == NAMES and "three.txt" in report["labels_from"]
    r = _cli("convert", assets.fp32_v1, "--calibration", assets.calib, "-o", tmp_path / "m.ewb",
             "--labels", tmp_path / "missing.txt")
    assert r.returncode != 0 and "cannot read the label file" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m.ewb").exists()

#!/usr/bin/env python3
"""Camera images through the agent: one JPEG per request over MQTT, decoded and prepared on
the board as the bundle says, beside the same work done in one bare process.

The model is the MobileNet-style CNN (INT8 ONNX, 128x128, converted from a folder of JPEGs
with --preprocess imagenet). For each photo size it prints, in one run:
  - bare: Pillow decode + the bundle's preprocessing (agent/images.py), and onnxruntime's run,
    p50 of each, in a process that does only that;
  - agent: the round trip of `edgeward infer --device D --input photo.jpg` (Fleet.infer with
    image=...): client -> Mosquitto -> agent -> its model worker (decode, prepare, run) -> back.

    .venv/bin/python scripts/bench_images.py [--requests 200] [--sizes 320x240,640x480,1280x960]
"""

from __future__ import annotations

import argparse
import io
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent import images  # noqa: E402
from agent.config import MqttConfig  # noqa: E402
from agent.devbroker import LocalBroker  # noqa: E402
from agent.fleet import Fleet  # noqa: E402
from agent.polling import wait_until  # noqa: E402
from agent.signing import generate_keypair  # noqa: E402
from agent.tables import format_table  # noqa: E402
from converters import zoo  # noqa: E402
from converters.convert import ConvertOptions, convert_onnx  # noqa: E402


def photo(width: int, height: int, seed: int) -> bytes:
    """A smooth synthetic colour photo as a JPEG (quality 85, as cameras send)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    low = rng.random((height // 16 + 1, width // 16 + 1, 3))
    pixels = np.repeat(np.repeat(low, 16, axis=0), 16, axis=1)[:height, :width]
    pixels = np.clip(pixels * 255 + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=85)
    return out.getvalue()


def p50(fn, n: int) -> float:
    for _ in range(5):
        fn()
    times = np.empty(n)
    for i in range(n):
        t = time.perf_counter()
        fn()
        times[i] = (time.perf_counter() - t) * 1000
    return float(np.percentile(times, 50))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200, help="per photo size (default %(default)s)")
    ap.add_argument("--sizes", default="320x240,640x480,1280x960", help="photo sizes, WxH (default %(default)s)")
    args = ap.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="edgeward-bench-images-"))
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        say("preparing: a folder of JPEGs, the INT8 bundle ...")
        calib = work / "calib"
        calib.mkdir()
        for i in range(32):
            (calib / f"{i:03d}.jpg").write_bytes(photo(320, 240, i))
        key, pub, _ = generate_keypair(work / "signing")
        zoo.build_mobilenet_like(work / "cam.onnx", size=128)
        bundle = work / "cam.ewb"
        convert_onnx(work / "cam.onnx", calib, bundle, key, None,
                     ConvertOptions(name="cam", preprocess="imagenet", allow_worse=True))
        import tarfile

        import onnxruntime as ort

        with tarfile.open(bundle) as tar:
            (work / "cam-int8.onnx").write_bytes(tar.extractfile("model.onnx").read())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        session = ort.InferenceSession(str(work / "cam-int8.onnx"), sess_options=opts,
                                       providers=["CPUExecutionProvider"])
        spec = images.parse("imagenet", [-1, 3, 128, 128])
        jpegs = {size: photo(*size, seed=100) for size in sizes}
        bare = {}
        for size, data in jpegs.items():
            x = images.decode(data, spec)[None]
            bare[size] = (p50(lambda: images.decode(data, spec), args.requests),
                          p50(lambda: session.run(None, {"image": x}), args.requests))
        broker = LocalBroker(workdir=work / "broker", tcp_nodelay=True).start()
        agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "--broker", broker.url, "--device-id",
                                  "cam", "--store", str(work / "store"), "--trust-key", str(pub), "--install",
                                  str(bundle), "--log-level", "warning"], cwd=ROOT)
        rows = []
        try:
            with Fleet(MqttConfig(url=broker.url)) as fleet:
                wait_until(lambda: [s for s in fleet.devices() if s.online and s.models], 60, "the agent", 0.5)
                for size, data in jpegs.items():
                    say(f"{size[0]}x{size[1]}: through the agent ...")
                    rtt = p50(lambda: fleet.infer("cam", "cam", image=data), args.requests)
                    decode, run = bare[size]
                    rows.append([f"{size[0]}x{size[1]}", f"{len(data) / 1024:.0f}", f"{decode:.2f}", f"{run:.2f}",
                                 f"{decode + run:.2f}", f"{rtt:.2f}", f"{rtt - decode - run:+.2f}"])
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(30)
            broker.stop()
        print("MobileNet-style CNN, INT8 ONNX, 128x128, --preprocess imagenet (resize=crop); onnxruntime "
              f"{ort.__version__}, 1 thread; p50 of {args.requests} requests per size.\n")
        print(format_table(["photo", "JPEG kB", "bare decode ms", "bare run ms", "bare total ms",
                            "agent over MQTT ms", "agent - bare ms"], rows, align="lrrrrrr"))
        print("(agent over MQTT: Fleet.infer(image=...) round trip on loopback: client -> Mosquitto -> agent -> "
              "its worker decodes, prepares and runs -> back)")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

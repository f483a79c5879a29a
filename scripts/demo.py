#!/usr/bin/env python3
"""edgeward end to end, on this machine, with the same commands a user types.

Trains two versions of a small CNN on scikit-learn's bundled digits, converts
version 1 to a signed INT8 bundle, starts a private Mosquitto and an agent,
answers an inference over MQTT, converts version 2 to INT8 TFLite, deploys it over MQTT and shows it
switched, shows telemetry, then stops everything cleanly. Exits non-zero if any
step does not do what it should.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.devbroker import LocalBroker  # noqa: E402
from agent.polling import wait_until  # noqa: E402
from converters import zoo  # noqa: E402

EDGEWARD = str(Path(sys.executable).parent / "edgeward")
DEVICE = "demo-pi"


def step(n: int, total: int, text: str) -> None:
    print(f"\n\033[1m[{n}/{total}] {text}\033[0m" if sys.stdout.isatty() else f"\n[{n}/{total}] {text}", flush=True)


def edgeward(*args: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess:
    shown = " ".join(shlex.quote(a) for a in args)
    print(f"$ edgeward {shown}", flush=True)
    r = subprocess.run([EDGEWARD, *args], capture_output=True, text=True, timeout=300)
    if not quiet and r.stdout.strip():
        print(r.stdout.rstrip())
    if check and r.returncode != 0:
        print(r.stderr.rstrip(), file=sys.stderr)
        raise SystemExit(f"demo: `edgeward {shown}` failed with exit code {r.returncode}")
    return r


def fleet_state(broker: str) -> list[dict]:
    r = subprocess.run([EDGEWARD, "fleet", "ls", "--json", "--broker", broker], capture_output=True, text=True, timeout=60)
    return json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(ROOT / "demo-run"), help="where models, bundles and the store go")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    total = 10
    t_start = time.monotonic()

    step(1, total, "Train two versions of a digits CNN (scikit-learn's bundled 8x8 digits, plain numpy)")
    acc1 = zoo.build_digits_cnn(work / "digits_v1.onnx", epochs=4, seed=0)
    acc2 = zoo.build_digits_cnn(work / "digits_v2.onnx", epochs=12, seed=1)
    calib, evaluation = zoo.write_digits_npz(work)
    print(f"digits_v1.onnx: FP32 test accuracy {acc1:.2%}   digits_v2.onnx: {acc2:.2%}")

    step(2, total, "Make a signing key pair (the board will trust only the public half)")
    edgeward("keys", "gen", str(work / "keys" / "signing"))
    key, pub = work / "keys" / "signing.key", work / "keys" / "signing.pub"

    step(3, total, "Convert v1 to a signed INT8 bundle, measured against FP32")
    edgeward("convert", str(work / "digits_v1.onnx"), "--calibration", str(calib), "--eval", str(evaluation),
             "--name", "digits", "--version", "1", "--key", str(key), "-o", str(work / "digits-v1.ewb"))

    broker = LocalBroker(workdir=work / "broker")
    agent = None
    try:
        step(4, total, "Start a private Mosquitto and the agent (budget 256 MB, trusts the demo key)")
        broker.start()
        print(f"mosquitto on {broker.url}")
        agent_cmd = [EDGEWARD, "agent", "--broker", broker.url, "--device-id", DEVICE, "--store", str(work / "store"),
                     "--budget-mb", "256", "--trust-key", str(pub), "--install", str(work / "digits-v1.ewb"),
                     "--telemetry-interval", "1"]
        print("$ " + " ".join(shlex.quote(a if a != EDGEWARD else "edgeward") for a in agent_cmd) + " &")
        agent_log = open(work / "agent.log", "w")
        agent = subprocess.Popen(agent_cmd, stdout=agent_log, stderr=subprocess.STDOUT)
        wait_until(lambda: any(d["online"] and d["models"] for d in fleet_state(broker.url)), 30,
                   "the agent's birth message", interval=0.3)
        edgeward("fleet", "ls", "--broker", broker.url)

        step(5, total, "Ask the board for an inference over MQTT (binary tensors, MQTT v5 request/response)")
        with np.load(evaluation) as d:
            x, y = d["input"][:8], d["labels"][:8]
        np.save(work / "eight-digits.npy", x)
        r = edgeward("infer", "--device", DEVICE, "--model", "digits", "--input", str(work / "eight-digits.npy"),
                     "--broker", broker.url, "--json", quiet=True)
        pred = np.array(json.loads(r.stdout)["outputs"]["logits"]).argmax(1)
        print(f"predicted {pred.tolist()}\ntrue      {y.tolist()}   ({(pred == y).sum()}/8 right, v1)")

        step(6, total, "Convert v2 to full-integer INT8 TFLite and deploy it over MQTT: chunks, verify, self-test, "
                       "atomic switch (from onnxruntime to LiteRT)")
        edgeward("convert", str(work / "digits_v2.onnx"), "--calibration", str(calib), "--eval", str(evaluation),
                 "--format", "tflite", "--name", "digits", "--version", "2", "--key", str(key),
                 "-o", str(work / "digits-v2.ewb"), quiet=True)
        edgeward("fleet", "deploy", str(work / "digits-v2.ewb"), "--device", DEVICE, "--chunk-kb", "8",
                 "--broker", broker.url)
        states = fleet_state(broker.url)
        versions = [m["version"] for d in states for m in d["models"]]
        if versions != [2]:
            raise SystemExit(f"demo: expected digits v2 serving after the deploy, the fleet shows {versions}")
        edgeward("fleet", "ls", "--broker", broker.url)

        step(7, total, "A bundle the board does not trust is refused, and v2 keeps serving")
        edgeward("keys", "gen", str(work / "keys" / "stranger"))
        edgeward("convert", str(work / "digits_v2.onnx"), "--calibration", str(calib), "--name", "digits",
                 "--version", "3", "--key", str(work / "keys" / "stranger.key"), "-o", str(work / "digits-v3-stranger.ewb"),
                 quiet=True)
        r = edgeward("fleet", "deploy", str(work / "digits-v3-stranger.ewb"), "--device", DEVICE, "--broker", broker.url,
                     check=False)
        print(r.stderr.strip().splitlines()[-1])
        if r.returncode == 0:
            raise SystemExit("demo: the untrusted bundle was accepted")
        r = edgeward("infer", "--device", DEVICE, "--model", "digits", "--input", str(work / "eight-digits.npy"),
                     "--broker", broker.url)
        if "digits v2" not in r.stdout:
            raise SystemExit("demo: v2 is not serving after the refused deploy")

        step(8, total, "Apps on the board: the local API (Unix socket, binary tensors) and an offline batch job")
        from agent.client import LocalClient

        sock = str(work / "store" / "agent.sock")
        with LocalClient(sock) as client:
            local = client.infer("digits", x)["logits"].argmax(1)
        print(f"LocalClient({sock!r}).infer('digits', x) -> {local.tolist()}")
        batch_dir = work / "batch"
        batch_dir.mkdir()
        with np.load(evaluation) as d:
            for i in range(4):
                np.save(batch_dir / f"part{i}.npy", d["input"][i * 50:(i + 1) * 50])
        edgeward("infer", "--model", "digits", "--input", str(batch_dir), "--batch", "32", "--output",
                 str(work / "results.jsonl"), "--socket", sock)
        lines = (work / "results.jsonl").read_text().splitlines()
        if len(lines) != 200:
            raise SystemExit(f"demo: the batch job wrote {len(lines)} results for 200 samples")
        print(f"first result: {lines[0][:100]}...")

        step(9, total, "Telemetry and events, as the fleet sees them")
        edgeward("fleet", "watch", "--device", DEVICE, "--kind", "telemetry", "--count", "1", "--seconds", "10",
                 "--broker", broker.url)

        step(10, total, "Stop the agent (SIGTERM): it finishes its work and publishes its offline state")
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=20)
        agent = None
        if code != 0:
            raise SystemExit(f"demo: the agent exited with code {code}; see {work / 'agent.log'}")
        edgeward("fleet", "ls", "--broker", broker.url)
        if any(d["online"] for d in fleet_state(broker.url)):
            raise SystemExit("demo: the device still shows online after a clean stop")
    finally:
        if agent is not None:
            agent.kill()
            agent.wait()
        broker.stop()

    print(f"\ndemo finished in {time.monotonic() - t_start:.0f} s. Everything it made is in {work}/ "
          f"(bundles, store, agent.log).")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TimeoutError as exc:
        sys.exit(f"demo: {exc}")

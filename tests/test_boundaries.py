"""The board installs `edgeward[device]` only: agent/ must never import converters/ or host libraries."""

import ast
import json
import subprocess
import sys
from pathlib import Path

AGENT = Path(__file__).resolve().parents[1] / "agent"
HOST_ONLY = {"converters", "onnx", "sklearn", "scipy", "sympy", "torch", "tensorflow", "tf2onnx", "onnx2tf",
             "litert_torch", "ai_edge_quantizer", "keras"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_no_agent_module_imports_a_host_library():
    offenders = {}
    for path in sorted(AGENT.rglob("*.py")):
        bad = {m for m in _imports(path) if m.split(".")[0] in HOST_ONLY or m.startswith("onnxruntime.quantization")}
        if bad:
            offenders[str(path.relative_to(AGENT.parent))] = sorted(bad)
    assert offenders == {}


PROBE = r"""
import importlib, json, pkgutil, sys
import numpy as np
import agent
for m in pkgutil.walk_packages(agent.__path__, "agent."):
    importlib.import_module(m.name)
from agent.budget import Budget
from agent.bundle import open_bundle
from agent.engine import Engine
from agent.signing import load_public_key
from agent.store import Store
store = Store(sys.argv[3])
folder = store.install(open_bundle(sys.argv[1], [load_public_key(sys.argv[2])]))
engine = Engine(Budget(2048))
model = engine.load(folder)
model.self_test()
out = model.infer_arrays({"input": np.zeros((1, 1, 8, 8), np.float32)})
worker, _ = model.proc.call({"op": "inspect"})
print(json.dumps({"agent": sorted({name.split(".")[0] for name in sys.modules}), "worker": worker["modules"]}))
"""


def test_a_running_agent_loads_no_host_library(assets, tmp_path):
    r = subprocess.run([sys.executable, "-c", PROBE, str(assets.v1), str(assets.pub), str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert "onnxruntime" in loaded["worker"]          # it did really load and run a model, in its worker
    assert set(loaded["agent"]) & HOST_ONLY == set() and set(loaded["worker"]) & HOST_ONLY == set()


def test_idle_agent_imports_no_runtime_no_numpy_and_no_cryptography():
    """Runtimes and numpy live in model workers; signatures are checked in a child process."""
    code = ("import sys, agent.daemon, agent.cli, agent.localapi; "
            "print(sorted(m for m in ('onnxruntime', 'numpy', 'cryptography', 'ai_edge_litert', 'tflite_runtime')"
            " if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


VERIFY = r"""
import json, sys
from agent.bundle import open_bundle
from agent.errors import SignatureError
from agent.signing import load_public_key
opened = open_bundle(sys.argv[1], [load_public_key(sys.argv[2])])
try:
    open_bundle(sys.argv[3], [load_public_key(sys.argv[2])])
    tampered = "accepted"
except SignatureError as exc:
    tampered = exc.message
print(json.dumps({"signer": opened.signer, "tampered": tampered,
                  "loaded": sorted(m for m in ("cryptography", "hashlib", "tarfile") if m in sys.modules)}))
"""


def test_the_agent_checks_signatures_in_a_child_and_never_holds_cryptography(assets, tmp_path):
    """cryptography would cost the daemon ~6 MB for the rest of its life; the check runs in a
    short-lived child, and a bad signature is refused all the same."""
    from conftest import repack

    from agent.signing import generate_keypair

    other, _, _ = generate_keypair(tmp_path / "someone-else")
    tampered = repack(assets.v1, tmp_path / "other-signer.ewb", other)
    r = subprocess.run([sys.executable, "-c", VERIFY, str(assets.v1), str(assets.pub), str(tampered)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["signer"] and len(out["signer"]) == 16
    assert "does not verify" in out["tampered"]
    assert out["loaded"] == ["hashlib", "tarfile"]  # the agent's own; cryptography stayed out

"""`edgeward agent check`: every check on a board set up right, and each problem named with its fix."""

import json
import subprocess
import sys

import psutil

from agent.check import FAIL, OK, run_checks
from agent.config import load_config


def _check(*args):
    return subprocess.run([sys.executable, "-m", "agent.cli", "agent", "check", *args],
                          capture_output=True, text=True, timeout=120)


def test_a_board_set_up_right_passes_every_check(broker, assets, tmp_path):
    r = _check("--broker", broker.url, "--store", str(tmp_path / "store"), "--trust-key", str(assets.pub),
               "--budget-mb", "256")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all checks passed" in r.stdout
    for check in ("config", "trust", "runtime", "memory", "store", "local API", "models", "broker"):
        assert any(line.startswith(check) and " ok " in line for line in r.stdout.splitlines()), check
    assert "onnxruntime" in r.stdout and "connected (MQTT v5" in r.stdout
    assert not (tmp_path / "store").exists()  # a check changes nothing


def test_each_problem_is_named_with_its_fix_and_the_exit_code_says_so(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    too_much = int(psutil.virtual_memory().total / 2**20) + 1024
    r = _check("--broker", "mqtt://127.0.0.1:9", "--store", str(blocker / "store"), "--socket", str(blocker / "a.sock"),
               "--trust-key", str(tmp_path / "missing.pub"), "--budget-mb", str(too_much), "--json")
    assert r.returncode == 1
    found = {f["check"]: f for f in json.loads(r.stdout)}
    assert found["trust"]["level"] == FAIL and "missing.pub" in found["trust"]["detail"]
    assert found["memory"]["level"] == FAIL and "set memory.budget_mb to at most" in found["memory"]["fix"]
    assert found["store"]["level"] == FAIL and "no folder to create it in" in found["store"]["detail"]
    assert found["local API"]["level"] == FAIL
    assert found["broker"]["level"] == FAIL and "Connection refused" in found["broker"]["detail"]
    assert found["runtime"]["level"] == OK  # the rest still ran


def test_an_installed_model_is_read_from_the_store_and_its_runtime_checked(broker, assets, tmp_path):
    from agent.bundle import open_bundle
    from agent.signing import load_public_key
    from agent.store import Store

    store = Store(tmp_path / "store")
    path = store.install(open_bundle(assets.v1, [load_public_key(assets.pub)]))
    store.set_current("digits", 1)
    cfg = load_config(None, {"mqtt.url": broker.url, "store.path": str(tmp_path / "store"),
                             "trust.keys": [str(assets.pub)]}, check_files=False)
    models = [f for f in run_checks(cfg) if f.check == "models"]
    assert [(f.level, f.detail) for f in models] == [(OK, "digits v1 (onnx, onnxruntime)")]
    (path / "manifest.json").write_text("{")  # damaged on disk
    models = [f for f in run_checks(cfg) if f.check == "models"]
    assert models[0].level == FAIL and "cannot be read" in models[0].detail


def test_execution_providers_this_onnxruntime_lacks_are_a_warning_naming_what_models_run_on(tmp_path):
    import onnxruntime

    from agent.check import WARN, _runtimes

    have = onnxruntime.get_available_providers()
    cfg = load_config(None, {"store.path": str(tmp_path / "store"), "inference.providers":
                             ["TensorrtExecutionProvider", "CPUExecutionProvider"]}, check_files=False)
    found = [f for f in _runtimes(cfg) if "onnxruntime" in f.detail]
    assert found[0].level == OK and found[0].detail == f"onnxruntime {onnxruntime.__version__} ({', '.join(have)})"
    assert "TensorrtExecutionProvider" not in have  # this machine's CPU build
    assert found[1].level == WARN and found[1].detail.startswith("inference.providers asks for TensorrtExecutionProvider,")
    assert "onnxruntime-gpu" in found[1].fix
    cfg = load_config(None, {"store.path": str(tmp_path / "store"), "inference.providers": have}, check_files=False)
    assert [f.level for f in _runtimes(cfg) if "onnxruntime" in f.detail] == [OK]


def test_a_runtime_built_for_numpy_1_is_named_with_the_numpy_fix(monkeypatch):
    """onnxruntime before 1.19 (JetPack 6 has 1.17) and tflite-runtime 2.14 fail to import beside
    numpy 2 with numpy's own message; the fix is numpy<2, not a reinstall that changes nothing.
    (The probe stands in for the import, printing what onnxruntime 1.17.3 prints beside numpy 2.)"""
    from agent import check

    says = ("A module that was compiled using NumPy 1.x cannot be run in NumPy 2.4.6 as it may crash. "
            "To support both 1.x and 2.x versions of NumPy, modules must be compiled with NumPy 2.0.")
    monkeypatch.setattr(check, "_RUNTIME_PROBES", {
        "onnxruntime": f"import sys; sys.stderr.write({says!r} + '\\nImportError\\n'); sys.exit(1)",
        "ai-edge-litert": "import sys; sys.stderr.write('ImportError: libfoo.so: cannot open\\n'); sys.exit(1)"})
    found = check._runtimes(load_config(None, {}, check_files=False))
    by_detail = {f.detail.split()[0]: f for f in found}
    assert by_detail["onnxruntime"].level == FAIL
    assert by_detail["onnxruntime"].fix == "this onnxruntime build was compiled for numpy 1: pip install 'numpy<2'"
    assert by_detail["ai-edge-litert"].fix == "reinstall it: pip install --force-reinstall ai-edge-litert"

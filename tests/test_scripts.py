"""The shell scripts users run: they parse, teach with --help, and say clearly what they need."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("scripts/*.sh"), *ROOT.glob("scripts/board/*.sh"), ROOT / ".ci" / "run"])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_parses(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _as_nobody(*cmd):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop to an unprivileged user")
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd],
                          capture_output=True, text=True, timeout=60, cwd="/")


@pytest.fixture
def readable_scripts():
    """A copy of scripts/ that an unprivileged user can read, wherever this checkout lives."""
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="edgeward-scripts-"))
    os.chmod(top, 0o755)
    shutil.copytree(ROOT / "scripts", top / "scripts")
    for p in [top / "scripts", *top.joinpath("scripts").rglob("*")]:
        os.chmod(p, 0o755)
    yield top / "scripts"
    shutil.rmtree(top)


@pytest.mark.parametrize("script", ["board-image.sh", "board-test.sh", "arm64-smoke.sh", "install-board.sh"])
def test_root_only_scripts_say_so_and_change_nothing(script, readable_scripts):
    r = _as_nobody("bash", str(readable_scripts / script))
    assert r.returncode != 0
    assert "run as root" in r.stderr, r.stderr
    assert r.stderr.count("\n") <= 2  # one clear line, not a traceback


def test_install_board_help_teaches_every_flag():
    r = subprocess.run(["bash", str(ROOT / "scripts" / "install-board.sh"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for flag in ("--device-id", "--broker", "--trust-key", "--budget-mb", "--root", "--uninstall", "--purge",
                 "--reconfigure", "--no-start", "--source"):
        assert flag in r.stdout, flag


def test_the_yolo_benchmark_says_what_it_needs_where_ultralytics_is_missing():
    """scripts/bench_yolo.py measures with ultralytics, which edgeward does not depend on: without it,
    one line names the package and where the set-up is written, and the exit code says it did not run."""
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_yolo.py")], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "bench_yolo: the ultralytics package is not installed; see this script's docstring for how"


def test_the_ocr_benchmark_says_what_it_needs_where_the_recogniser_is_missing(tmp_path):
    """scripts/bench_ocr.py reads PP-OCRv4's recogniser from rapidocr-onnxruntime, which edgeward does
    not depend on: with a --model that is not there (or without the package), one line says how to get it."""
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_ocr.py"), "--model", str(tmp_path / "no.onnx")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == ("bench_ocr: no ch_PP-OCRv4_rec_infer.onnx: install rapidocr-onnxruntime (see this "
                                "script's docstring) or pass --model")


def test_the_public_models_benchmark_says_what_it_needs_where_the_models_are_missing(tmp_path):
    """scripts/bench_public_models.py reads the models MediaPipe and openWakeWord ship, which edgeward
    does not depend on: given a folder without any, one line says how to get them."""
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_public_models.py"), "--models", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == ("bench_public_models: no .tflite or .onnx models: install mediapipe==0.10.14 and "
                                "openwakeword==0.4.0 (see this script's docstring) or pass --models DIR")

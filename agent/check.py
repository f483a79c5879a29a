"""`edgeward agent check`: what stands between this board and a working agent, checked in one go.

The daemon stops at the first problem it meets, and some (a broker that refuses the
credentials, a runtime built for another numpy, a budget larger than the board's memory)
only show once it runs. This runs every check, changes nothing, and says for each one
OK, WARN or FAIL with one line and, where it is not OK, the fix.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .config import AgentConfig, TrustConfig, _check_semantics
from .errors import EdgewardError

OK, WARN, FAIL = "ok", "WARN", "FAIL"

# what importing each runtime takes, run in a child so that a broken build cannot take this process down
_RUNTIME_PROBES = {
    "onnxruntime": "import onnxruntime as m; print(m.__version__, *m.get_available_providers())",
    "ai-edge-litert": "from ai_edge_litert.interpreter import Interpreter; import ai_edge_litert as m; "
                      "print(getattr(m, '__version__', '?'))",
    "tflite-runtime": "from tflite_runtime.interpreter import Interpreter; import tflite_runtime as m; "
                      "print(m.__version__)",
}
_RUNTIME_MODULES = {"onnxruntime": "onnxruntime", "ai-edge-litert": "ai_edge_litert", "tflite-runtime": "tflite_runtime"}


@dataclass
class Finding:
    check: str
    level: str  # OK, WARN or FAIL
    detail: str
    fix: str | None = None


def run_checks(cfg: AgentConfig, broker_timeout_s: float = 5.0) -> list[Finding]:
    out: list[Finding] = []
    for check in (_config, _trust, _runtimes, _memory, _store, _socket, _models, _pipelines):
        try:
            out.extend(check(cfg))
        except EdgewardError as exc:  # a check that cannot go on says why, and the others still run
            out.append(Finding(check.__name__.strip("_"), FAIL, exc.message, exc.fix))
    out.append(_broker(cfg, broker_timeout_s))
    return out


def _config(cfg: AgentConfig) -> list[Finding]:
    try:  # the trusted keys are left to the trust check below, which says more about them
        _check_semantics(dataclasses.replace(cfg, trust=TrustConfig(keys=[], allow_unsigned=True)))
    except EdgewardError as exc:
        return [Finding("config", FAIL, exc.message, exc.fix)]
    return [Finding("config", OK, f"device {cfg.device.id}, broker {cfg.mqtt.url}, store {cfg.store.path}")]


def _trust(cfg: AgentConfig) -> list[Finding]:
    from .signing import load_public_key

    if not cfg.trust.keys:
        if cfg.trust.allow_unsigned:
            return [Finding("trust", WARN, "no trusted key; unsigned bundles are accepted",
                            "for development only: add trust.keys and set trust.allow_unsigned: false")]
        return [Finding("trust", FAIL, "no trusted key: every bundle would be refused",
                        "copy the .pub of `edgeward keys gen` to the board and list it in trust.keys")]
    out = []
    for path in cfg.trust.keys:
        try:
            key = load_public_key(path)
        except EdgewardError as exc:
            out.append(Finding("trust", FAIL, exc.message, exc.fix))
        else:
            out.append(Finding("trust", OK, f"{path}: key {key.key_id}"))
    return out


def _runtimes(cfg: AgentConfig) -> list[Finding]:
    import importlib.util

    out, usable = [], 0
    for package, probe in _RUNTIME_PROBES.items():
        if importlib.util.find_spec(_RUNTIME_MODULES[package]) is None:
            continue
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        if r.returncode == 0:
            usable += 1
            version, *providers = r.stdout.split()
            if package == "onnxruntime":
                out.extend(_providers(cfg, version, providers))
            else:
                out.append(Finding("runtime", OK, f"{package} {version}"))
        else:
            last = (r.stderr.strip().splitlines() or ["it exited with " + str(r.returncode)])[-1]
            if "numpy" in r.stderr.lower():  # tflite-runtime 2.14, onnxruntime before 1.19 (JetPack 6's 1.17)
                fix = f"this {package} build was compiled for numpy 1: pip install 'numpy<2'"
            elif package == "onnxruntime":  # a board's own build (onnxruntime-gpu) must not become PyPI's CPU one
                fix = ("reinstall the same build: scripts/install-board.sh --onnxruntime WHEEL for a board's own "
                       "(onnxruntime-gpu), else pip install --force-reinstall onnxruntime")
            else:
                fix = f"reinstall it: pip install --force-reinstall {package}"
            out.append(Finding("runtime", FAIL, f"{package} is installed but does not import: {last[:160]}", fix))
    if not out:
        out.append(Finding("runtime", FAIL, "no model runtime is installed",
                           "pip install 'edgeward[device]' (or 'edgeward[device-legacy]' without an ai-edge-litert wheel)"))
    elif not usable:
        out.append(Finding("runtime", FAIL, "no runtime that imports: no model can load"))
    return out


def _providers(cfg: AgentConfig, version: str, have: list[str]) -> list[Finding]:
    """onnxruntime's execution providers against inference.providers: a Jetson configured for
    TensorRT with a CPU-only onnxruntime would otherwise run every model on the CPU, slowly."""
    found = [Finding("runtime", OK, f"onnxruntime {version} ({', '.join(have)})")]
    missing = [p for p in cfg.inference.providers if p not in have]
    if missing:
        found.append(Finding("runtime", WARN, f"inference.providers asks for {', '.join(missing)}, which this "
                             f"onnxruntime build does not have: ONNX models run on {', '.join(have)}",
                             "install the onnxruntime-gpu build for this board's CUDA/JetPack, or drop them from "
                             "inference.providers"))
    return found


def _memory(cfg: AgentConfig) -> list[Finding]:
    import psutil

    from .engine import WORKER_BASE_MB_GUESS

    vm = psutil.virtual_memory()
    total, available = vm.total / 2**20, vm.available / 2**20
    budget, reserve = cfg.memory.budget_mb, cfg.memory.reserve_mb
    detail = f"budget {budget} MB; this board has {total:.0f} MB, {available:.0f} MB available"
    if budget + reserve > total:
        return [Finding("memory", FAIL, f"{detail}: the budget and reserve ({reserve} MB) exceed the board's memory",
                        f"set memory.budget_mb to at most {max(0, int(total - reserve))}")]
    if budget > available - reserve:
        return [Finding("memory", WARN, f"{detail}: less is free now than the budget allows for",
                        "models may be refused for memory while other programs run")]
    if budget < WORKER_BASE_MB_GUESS + 35:
        return [Finding("memory", WARN, f"{detail}: a model worker alone takes ~{WORKER_BASE_MB_GUESS:.0f} MB "
                        "plus its runtime", "raise memory.budget_mb, or no model may fit")]
    return [Finding("memory", OK, detail)]


def _writable(folder: Path) -> str | None:
    """Why this user cannot create files in `folder` (or in the nearest folder above it that
    exists, where it would be created), or None if it can. Tried, not guessed from the mode
    bits: root passes those everywhere, /proc included."""
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is None or not existing.is_dir():
        return f"{folder}: no folder to create it in"
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".edgeward-check-"):
            pass
    except OSError as exc:
        return f"cannot create files in {existing}: {exc.strerror}"
    return None


def _store(cfg: AgentConfig) -> list[Finding]:
    root = Path(cfg.store.path)
    problem = _writable(root)
    if problem:
        return [Finding("store", FAIL, problem,
                        "run as the agent's user, or give it the folder (the systemd unit's StateDirectory does)")]
    existing = next(p for p in [root, *root.parents] if p.exists())
    free = shutil.disk_usage(existing).free / 2**20
    need = 2 * cfg.store.max_bundle_mb  # a download and its unpacked copy
    if free < need:
        return [Finding("store", WARN, f"{root}: {free:.0f} MB free on its disk; a bundle of "
                        f"store.max_bundle_mb needs up to {need} MB", "free disk space, or lower store.max_bundle_mb")]
    return [Finding("store", OK, f"{root}{'' if existing == root else ' (created on start)'}, {free:.0f} MB free")]


def _socket(cfg: AgentConfig) -> list[Finding]:
    if not cfg.api_socket:
        return [Finding("local API", OK, "off (api.socket: off)")]
    problem = _writable(Path(cfg.api_socket).parent)
    if problem:
        return [Finding("local API", FAIL, f"{cfg.api_socket}: {problem}",
                        "set api.socket to a writable path (the systemd unit uses /run/edgeward/agent.sock)")]
    return [Finding("local API", OK, f"{cfg.api_socket}, mode {cfg.api.socket_mode:o}")]


def _models(cfg: AgentConfig) -> list[Finding]:
    """What the store serves, read without touching it (the daemon tidies it when it starts)."""
    from .bundle import read_installed_manifest
    from .runtimes import available

    models_dir = Path(cfg.store.path) / "models"
    links = sorted(models_dir.glob("*/current")) if models_dir.is_dir() else []
    if not links:
        return [Finding("models", OK, "none installed yet")]
    have, out = set(available()), []
    for link in links:
        name = link.parent.name
        try:
            manifest = read_installed_manifest(link.resolve(strict=True))
        except (OSError, EdgewardError) as exc:
            out.append(Finding("models", FAIL, f"{name}: its current version cannot be read ({exc})",
                               "deploy it again, or roll it back: edgeward fleet rollback"))
            continue
        if manifest.runtime not in have:
            out.append(Finding("models", FAIL, f"{name} v{manifest.version} needs {manifest.runtime}, not installed",
                               "pip install 'edgeward[device]'"))
        else:
            out.append(Finding("models", OK, f"{name} v{manifest.version} ({manifest.format}, {manifest.runtime})"))
        if manifest.preprocessing.get("image") and importlib.util.find_spec("PIL") is None:
            out.append(Finding("models", WARN, f"{name} takes images, and batch jobs on image files need Pillow, "
                                               "which is not installed", "pip install 'edgeward[images]'"))
    return out


def _pipelines(cfg: AgentConfig) -> list[Finding]:
    """Each pipeline's model is installed, and an image pipeline can prepare images for it
    (Pillow is here, and the spec fits the model): else every message would get an error."""
    from .bundle import read_installed_manifest

    out: list[Finding] = []
    takes_images = [p.input_topic for p in cfg.pipelines if p.format == "image"]
    if takes_images and importlib.util.find_spec("PIL") is None:
        out.append(Finding("pipelines", WARN, f"{', '.join(takes_images)} take(s) images, and Pillow is not "
                                              "installed: every image would be answered with an error",
                           "pip install 'edgeward[images]'"))
    models = Path(cfg.store.path) / "models"
    for pipe in cfg.pipelines:
        what = f"{pipe.input_topic} -> {pipe.model}"
        try:
            manifest = read_installed_manifest((models / pipe.model / "current").resolve(strict=True))
        except (OSError, EdgewardError):
            out.append(Finding("pipelines", WARN, f"{what}: no model {pipe.model!r} is installed; its messages "
                                                  "are answered with an error until one is",
                               f"deploy {pipe.model}, or fix the pipeline's model name"))
            continue
        if pipe.format == "image":
            from .images import spec_for

            inputs = [{"name": s.name, "shape": s.shape, "dtype": s.dtype}
                      for s in manifest.inputs if s.name not in manifest.state]
            try:
                spec_for(f"{pipe.model} v{manifest.version}", inputs, manifest.preprocessing, pipe.preprocess)
            except EdgewardError as exc:
                out.append(Finding("pipelines", FAIL, f"{what}: {exc.message}", exc.fix))
                continue
        out.append(Finding("pipelines", OK, f"{what} ({pipe.format}) -> {pipe.output_topic}"))
    return out


def _broker(cfg: AgentConfig, timeout_s: float) -> Finding:
    """A real MQTT connection with the agent's own settings: address, TLS and credentials."""
    from .link import make_client, new_client_id

    try:
        client = make_client(new_client_id("check"), cfg.mqtt)
    except EdgewardError as exc:
        return Finding("broker", FAIL, exc.message, exc.fix)
    answer: dict = {}
    done = threading.Event()

    def on_connect(_c, _u, _flags, reason_code, _props) -> None:
        answer["rc"], answer["ms"] = reason_code, 1000 * (time.monotonic() - started)
        done.set()

    client.on_connect = on_connect
    started = time.monotonic()
    try:
        client.connect(cfg.mqtt.host, cfg.mqtt.port, keepalive=max(5, int(timeout_s)))
        client.loop_start()
        done.wait(timeout_s)
    except (OSError, ValueError) as exc:  # refused, unknown host, TLS verification failed
        return Finding("broker", FAIL, f"cannot reach {cfg.mqtt.url}: {exc}",
                       "is the broker running and the address right? for mqtts://, is mqtt.tls.ca_file its CA?")
    finally:
        client.loop_stop()
        client.disconnect()
    rc = answer.get("rc")
    if rc is None:
        return Finding("broker", FAIL, f"{cfg.mqtt.url}: no answer to CONNECT within {timeout_s:g} s",
                       "check the port, and that the broker speaks MQTT (and TLS for mqtts://)")
    if rc.is_failure:
        return Finding("broker", FAIL, f"{cfg.mqtt.url} refused the connection: {rc}",
                       "check mqtt.username and mqtt.password_file, and the broker's ACL for this device")
    tls = "TLS, " if cfg.mqtt.uses_tls else ""
    return Finding("broker", OK, f"{cfg.mqtt.url}: connected ({tls}MQTT v5, {answer['ms']:.0f} ms)")


def render(findings: list[Finding]) -> str:
    from .tables import format_table

    lines = [format_table(["CHECK", "RESULT", "DETAIL"], [[f.check, f.level, f.detail] for f in findings])]
    fixes = [f for f in findings if f.level != OK and f.fix]
    if fixes:
        lines.append("")
        lines += [f"{f.level} {f.check}: {f.fix}" for f in fixes]
    failed = sum(f.level == FAIL for f in findings)
    warned = sum(f.level == WARN for f in findings)
    lines.append("")
    lines.append("all checks passed" if not (failed or warned) else f"{failed} failed, {warned} warnings")
    return "\n".join(lines)

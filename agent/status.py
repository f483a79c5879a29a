"""The agent's local status file, and `edgeward agent status` that reads it.

The running agent rewrites `<store>/status.json` (atomically) on each telemetry
tick and after each change, so an operator on the board can see what it is doing
with no broker and no IPC: models, versions, budget, last update, broker link.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from .tables import format_table

STATUS_FILE = "status.json"


def write_status(store_root: str | os.PathLike, status: dict) -> None:
    root = Path(store_root)
    fd, tmp = tempfile.mkstemp(prefix=".status.", dir=root)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(status, f, indent=1)
        os.chmod(tmp, 0o644)
        os.replace(tmp, root / STATUS_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_status(store_root: str | os.PathLike) -> dict | None:
    try:
        return json.loads((Path(store_root) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user (DynamicUser)
        return True
    return True


def _ago(ts: float | None) -> str:
    if not ts:
        return "never"
    s = max(0.0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def runs_on(model: dict) -> str:
    """What a model runs on, short: onnxruntime's execution providers ("TensorRT+CPU"), or the format."""
    providers = model.get("providers") or []
    if providers:
        return "+".join(p.removesuffix("ExecutionProvider") for p in providers)
    return {"tflite": "LiteRT"}.get(model.get("format"), model.get("format") or "-")


def render_status(status: dict | None, store_root: str) -> str:
    if status is None:
        return f"no agent has run with the store {store_root} (no {STATUS_FILE} there)"
    running = status.get("running") and _alive(int(status.get("pid", 0)))
    head = (f"agent {status['device']}: running (pid {status['pid']}, up {_ago(status.get('started'))[:-4]})"
            if running else f"agent {status['device']}: NOT running (last seen {_ago(status.get('ts'))})")
    broker = status.get("broker", {})
    mem = status.get("memory", {})
    lines = [head,
             f"broker   {broker.get('url')}  {'connected' if broker.get('connected') and running else 'not connected'}",
             f"memory   {mem.get('used_mb', mem.get('rss_mb'))} MB of a {mem.get('budget_mb')} MB budget "
             f"(PSS; RSS {mem.get('rss_mb')} MB); system available {mem.get('available_mb')} MB",
             f"store    {store_root}"]
    update = status.get("last_update")
    if update:
        result = "ok" if update.get("ok") else f"FAILED: {update.get('error')}"
        lines.append(f"update   {update.get('model') or '?'} v{update.get('version') or '?'} {_ago(update.get('ts'))}: {result}")
    else:
        lines.append("update   none since start")
    models = status.get("models", [])
    lines.append("")
    if models:
        head = ["MODEL", "VERSION", "RUNS ON", "COST MB", "REQUESTS", "ERRORS", "P50 MS"]
        rows = [[m["name"], m["version"], runs_on(m), m.get("cost_mb"), m.get("requests"), m.get("errors"),
                 m.get("p50_ms") or "-"] for m in models]
        if any(m.get("streams") is not None for m in models):  # a stateful model serves: its streams
            head.append("STREAMS")
            for row, m in zip(rows, models):
                row.append("-" if m.get("streams") is None else m["streams"])
        lines.append(format_table(head, rows, align="llrrrrr" + "r" * (len(head) - 7)))
    else:
        lines.append("no model is serving")
    return "\n".join(lines)

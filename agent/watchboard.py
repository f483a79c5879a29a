"""The live table behind `edgeward fleet watch`: state, telemetry and events folded into one row per model.

Fed the same (device, kind, message) stream the line mode prints; knows nothing of MQTT,
so it is tested with plain dicts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .tables import format_table

HEADERS = ["DEVICE", "STATE", "MODEL", "REQ/S", "REQS", "ERRS", "P50 MS", "P95 MS", "MEM/BUDGET MB", "CPU%",
           "TEMP", "SEEN", "LAST EVENT"]


@dataclass
class _Device:
    online: bool | None = None
    models: dict[str, int] = field(default_factory=dict)  # name -> version, from the state
    telemetry: dict = field(default_factory=dict)
    previous: dict = field(default_factory=dict)          # the telemetry before, for request rates
    last_event: str = ""
    seen: float = 0.0


class WatchBoard:
    def __init__(self) -> None:
        self.devices: dict[str, _Device] = {}

    def update(self, device: str, kind: str, msg: dict) -> None:
        d = self.devices.setdefault(device, _Device())
        d.seen = max(d.seen, float(msg.get("ts") or time.time()))
        if kind == "state":
            d.online = bool(msg.get("online"))
            d.models = {m.get("name"): m.get("version") for m in msg.get("models", []) if isinstance(m, dict)}
        elif kind == "telemetry":
            d.previous, d.telemetry = d.telemetry, msg
            d.online = True if d.online is None else d.online
        elif kind == "events":
            level = msg.get("level", "info")
            mark = "" if level == "info" else f"{level.upper()} "
            d.last_event = f"{mark}{msg.get('kind')}: {msg.get('message', '')}"

    def _rate(self, d: _Device, model: str) -> str:
        now, before = d.telemetry, d.previous
        try:
            dt = float(now["ts"]) - float(before["ts"])
            dn = now["models"][model]["requests"] - before["models"][model]["requests"]
        except (KeyError, TypeError, ValueError):
            return ""
        return f"{max(dn, 0) / dt:.1f}" if dt > 0 else ""

    def rows(self, now: float | None = None) -> list[list[object]]:
        now = time.time() if now is None else now
        out = []
        for name in sorted(self.devices):
            d = self.devices[name]
            t = d.telemetry
            state = "?" if d.online is None else ("online" if d.online else "OFFLINE")
            mem = f"{t.get('memory_mb') or t.get('rss_mb', 0):.0f}/{t.get('budget_mb', 0)}" if t else ""
            cpu = f"{t.get('cpu_percent', 0):.0f}" if t else ""
            temp = f"{t['temperature_c']:.0f}°C" if t.get("temperature_c") is not None else ""
            seen = f"{max(now - d.seen, 0):.0f}s ago" if d.seen else ""
            stats = t.get("models", {}) if t else {}
            models = sorted(set(d.models) | set(stats)) or [""]
            for i, model in enumerate(models):
                s = stats.get(model, {})
                version = s.get("version", d.models.get(model))
                label = f"{model} v{version}" if model else "-"
                first = i == 0
                out.append([name if first else "", state if first else "", label, self._rate(d, model) if s else "",
                            s.get("requests", ""), s.get("errors", ""), s.get("p50_ms", ""), s.get("p95_ms", ""),
                            mem if first else "", cpu if first else "", temp if first else "",
                            seen if first else "", d.last_event[:60] if first else ""])
        return out

    def render(self, now: float | None = None) -> str:
        if not self.devices:
            return "waiting for devices to report ..."
        return format_table(HEADERS, self.rows(now), align="lllrrrrrrrrrl")

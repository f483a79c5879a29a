"""Staged rollouts: a bundle goes to a canary wave first, then to the rest in waves, each wave
passing health gates before the next starts; a failing wave halts the rollout and is rolled back.

Gates, per device of a wave:
1. the deploy itself: transfer, signature, budget, self-test on the board (the device's reply);
2. a soak window: the device keeps reporting telemetry for the new version, its error rate over
   the window stays under `max_error_rate` and its p95 latency under `max_p95_ms` (when set).

The rollout's state is written to a JSON file after every step, so a CLI that is stopped (or
crashes) can `resume` it: devices already on the new version are skipped, the current wave is
checked again.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from . import protocol
from .bundle import open_bundle, sha256_file
from .errors import EdgewardError, FleetError
from .schema import from_dict, to_dict

Progress = Callable[[str], None]


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "edgeward" / "rollouts"


def plan_waves(devices: list[str], canary: str | None, waves: int) -> list[list[str]]:
    """Canary first (`N` devices or `P%`, at least one), then the rest split into `waves` waves."""
    devices = sorted(devices)
    if not devices:
        return []
    first = 0
    if canary:
        if canary.endswith("%"):
            first = max(1, round(len(devices) * float(canary[:-1]) / 100))
        else:
            first = int(canary)
        if first < 1:
            raise FleetError(f"--canary {canary}: must be at least one device")
        first = min(first, len(devices))
    plan = [devices[:first]] if first else []
    rest = devices[first:]
    n = max(1, min(waves, len(rest))) if rest else 0
    for i in range(n):
        plan.append(rest[i * len(rest) // n:(i + 1) * len(rest) // n])
    return [w for w in plan if w]


@dataclass
class Gates:
    soak_s: float = 0.0
    max_error_rate: float = 0.05
    max_p95_ms: Optional[float] = None


@dataclass
class DeviceResult:
    status: str = "pending"          # pending, deployed, healthy, skipped, failed, rolled_back
    detail: str = ""


@dataclass
class RolloutState:
    id: str
    bundle: str
    sha256: str
    model: str
    version: int
    waves: list[list[str]]
    gates: Gates = field(default_factory=Gates)
    url: Optional[str] = None       # devices download the bundle from here instead of MQTT chunks
    state: str = "running"          # running, halted, done
    wave: int = 0                   # index of the wave in progress (== len(waves) when done)
    devices: dict[str, DeviceResult] = field(default_factory=dict)
    reason: str = ""
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)


class Rollout:
    def __init__(self, fleet, state: RolloutState, state_dir: Path, progress: Progress | None = None,
                 parallel: int = 16):
        self.fleet = fleet
        self.s = state
        self.path = Path(state_dir) / f"{state.id}.json"
        self.say = progress or (lambda msg: None)
        self.parallel = parallel

    # ------------------------------------------------------------ creation and persistence

    @classmethod
    def create(cls, fleet, bundle: str | Path, devices: list[str], canary: str | None, waves: int, gates: Gates,
               state_dir: Path, progress: Progress | None = None, url: str | None = None) -> "Rollout":
        bundle = Path(bundle).resolve()
        m = open_bundle(bundle, verify_signature=False).manifest
        plan = plan_waves(devices, canary, waves)
        if not plan:
            raise FleetError("no device to roll out to", "check the --device/--group selection with `edgeward fleet ls`")
        state = RolloutState(id=time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4], bundle=str(bundle),
                             sha256=sha256_file(bundle), model=m.name, version=m.version, waves=plan, gates=gates, url=url,
                             devices={d: DeviceResult() for w in plan for d in w})
        r = cls(fleet, state, state_dir, progress)
        r.save()
        return r

    @classmethod
    def load(cls, fleet, rollout_id: str, state_dir: Path, progress: Progress | None = None) -> "Rollout":
        path = Path(state_dir) / f"{rollout_id}.json"
        try:
            state = from_dict(RolloutState, json.loads(path.read_text()))
        except FileNotFoundError:
            raise FleetError(f"no rollout {rollout_id!r} in {state_dir}", "list them with `edgeward fleet rollout ls`") from None
        return cls(fleet, state, state_dir, progress)

    def save(self) -> None:
        self.s.updated = time.time()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(to_dict(self.s), indent=1))
        os.replace(tmp, self.path)

    # ------------------------------------------------------------ running

    def run(self) -> RolloutState:
        """Run (or resume) wave by wave until done or halted."""
        if sha256_file(self.s.bundle) != self.s.sha256:
            raise FleetError(f"{self.s.bundle} changed since the rollout started", "start a new rollout")
        if self.s.state == "halted":
            raise FleetError(f"rollout {self.s.id} halted: {self.s.reason}", "fix the cause and start a new rollout")
        while self.s.wave < len(self.s.waves):
            wave = self.s.waves[self.s.wave]
            self.say(f"wave {self.s.wave + 1}/{len(self.s.waves)}: {len(wave)} device(s)")
            failed = self._deploy_wave(wave) or self._soak(wave)
            if failed:
                self._halt(wave, failed)
                return self.s
            for d in wave:
                self.s.devices[d].status = "healthy" if self.s.devices[d].status != "skipped" else "skipped"
            self.s.wave += 1
            self.save()
        self.s.state = "done"
        self.save()
        self.say(f"rollout {self.s.id} done: {self.s.model} v{self.s.version} on {len(self.s.devices)} device(s)")
        return self.s

    def _current_versions(self) -> dict[str, int | None]:
        out = {}
        for st in self.fleet.devices():
            out[st.device] = next((m.version for m in st.models if m.name == self.s.model), None) if st.online else None
        return out

    def _deploy_wave(self, wave: list[str]) -> dict[str, str]:
        versions = self._current_versions()
        failed: dict[str, str] = {}
        lock = threading.Lock()

        def one(device: str) -> None:
            res = self.s.devices[device]
            if versions.get(device) == self.s.version:
                if res.status == "pending":
                    res.status, res.detail = "skipped", f"already on v{self.s.version}"
                return
            try:
                reply = self.fleet.deploy(self.s.bundle, device, timeout=300, url=self.s.url)
                res.status, res.detail = "deployed", f"self-test agreement {reply.data['self_test']['top1_agreement']}"
            except EdgewardError as exc:
                res.status, res.detail = "failed", str(exc)
                with lock:
                    failed[device] = f"deploy failed: {exc}"

        with ThreadPoolExecutor(min(self.parallel, len(wave))) as pool:
            list(pool.map(one, wave))
        self.save()
        return failed

    def _soak(self, wave: list[str]) -> dict[str, str]:
        """Watch the wave's telemetry for soak_s: error rate and p95 of the new version must stay in bounds."""
        g = self.s.gates
        if g.soak_s <= 0:
            return {}
        self.say(f"  soaking {g.soak_s:.0f} s (error rate <= {g.max_error_rate:.1%}"
                 + (f", p95 <= {g.max_p95_ms} ms)" if g.max_p95_ms else ")"))
        first: dict[str, protocol.ModelStats] = {}
        last: dict[str, protocol.ModelStats] = {}
        stop = threading.Event()
        timer = threading.Timer(g.soak_s, stop.set)
        timer.start()
        try:
            for device, _, msg in self.fleet.watch(stop, kinds=("telemetry",)):
                if device not in self.s.devices or device not in wave:
                    continue
                try:
                    stats = protocol.from_fields(protocol.Telemetry, msg, "telemetry").models.get(self.s.model)
                except EdgewardError:
                    continue
                if stats is None or stats.version != self.s.version:
                    continue
                first.setdefault(device, stats)
                last[device] = stats
        finally:
            timer.cancel()
        failed = {}
        for device in wave:
            if device not in last:
                failed[device] = f"no telemetry for v{self.s.version} during the {g.soak_s:.0f} s soak"
                continue
            a, b = first[device], last[device]
            requests, errors = b.requests - a.requests, b.errors - a.errors
            rate = errors / requests if requests else 0.0
            if rate > g.max_error_rate:
                failed[device] = f"error rate {rate:.1%} over the soak (limit {g.max_error_rate:.1%})"
            elif g.max_p95_ms and b.p95_ms is not None and b.p95_ms > g.max_p95_ms:
                failed[device] = f"p95 {b.p95_ms} ms (limit {g.max_p95_ms} ms)"
        return failed

    def _halt(self, wave: list[str], failed: dict[str, str]) -> None:
        """Stop the rollout and take every device of this wave that took the new version back."""
        self.s.state = "halted"
        self.s.reason = "; ".join(f"{d}: {why}" for d, why in sorted(failed.items()))
        for d, why in failed.items():
            self.s.devices[d].status, self.s.devices[d].detail = "failed", why
        self.say(f"  HALTED: {self.s.reason}")
        for device in wave:
            res = self.s.devices[device]
            if res.status in ("deployed", "failed") and not res.detail.startswith("deploy failed"):
                try:
                    self.fleet.rollback(device, self.s.model)
                    res.status = "rolled_back"
                    self.say(f"  {device}: rolled back")
                except EdgewardError as exc:
                    res.detail += f"; rollback failed: {exc}"
        self.save()


def list_rollouts(state_dir: Path) -> list[RolloutState]:
    out = []
    for p in sorted(Path(state_dir).glob("*.json")):
        try:
            out.append(from_dict(RolloutState, json.loads(p.read_text())))
        except (ValueError, EdgewardError, TypeError):
            continue
    return out

"""The inference engine: the models that are serving, how requests reach them, what they cost.

A model is loaded into a *shadow* LoadedModel first (admitted by the budget, its
real RSS cost measured), self-tested on the bundle's reference I/O, and only then
swapped in under the name callers use. No request fails because of a swap: each
request holds its model while it runs, closing a replaced model waits for the
requests still on it, and a request that picked up a model just as it was retired
simply takes the new one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from . import runtimes
from .budget import Budget
from .bundle import REFERENCE, Manifest, TensorSpec, read_installed_manifest
from .errors import InferenceError, ModelNotFound, SelfTestError
from .protocol import ModelInfo, ModelStats

log = logging.getLogger(__name__)

LATENCY_WINDOW = 2048


class Stats:
    """Request counters and a window of recent latencies, safe to update from many threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._rows = 0
        self._runs = 0

    def record(self, latency_ms: float | None, ok: bool, rows: int = 0) -> None:
        with self._lock:
            self.requests += 1
            if ok:
                self._latencies.append(latency_ms)
                self._rows += rows
                self._runs += 1
            else:
                self.errors += 1

    def snapshot(self, version: int, inflight: int = 0) -> ModelStats:
        with self._lock:
            p50 = p95 = p99 = None
            if self._latencies:
                p50, p95, p99 = (round(float(v), 3) for v in np.percentile(np.array(self._latencies), [50, 95, 99]))
            return ModelStats(version=version, requests=self.requests, errors=self.errors, p50_ms=p50, p95_ms=p95,
                              p99_ms=p99, mean_batch=round(self._rows / self._runs, 2) if self._runs else None,
                              inflight=inflight)


def _check_input(spec: TensorSpec, arr: np.ndarray) -> np.ndarray:
    if arr.dtype.name != spec.dtype:
        raise InferenceError(f"input {spec.name!r}: dtype {arr.dtype.name}, the model takes {spec.dtype}",
                             f"send {spec.dtype} data")
    if arr.ndim != len(spec.shape) or any(s not in (-1, a) for s, a in zip(spec.shape, arr.shape)):
        want = "x".join("N" if s == -1 else str(s) for s in spec.shape)
        raise InferenceError(f"input {spec.name!r}: shape {list(arr.shape)}, the model takes {want}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InferenceError(f"input {spec.name!r} holds NaN or infinity", "send finite values")
    return arr


class LoadedModel:
    def __init__(self, manifest: Manifest, folder: Path, runtime: runtimes.Runtime, cost_mb: float):
        self.manifest = manifest
        self.folder = folder
        self.runtime = runtime
        self.cost_mb = cost_mb
        self.stats = Stats()
        self._specs = {s.name: s for s in manifest.inputs}
        self._inflight = 0
        self._retired = False
        self._cv = threading.Condition()

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    def info(self) -> ModelInfo:
        return ModelInfo(name=self.name, version=self.version, format=self.manifest.format,
                         cost_mb=round(self.cost_mb, 1), sha256=self.manifest.files[self.manifest.model_file].sha256)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate, run, record. Any failure is an InferenceError for this caller alone."""
        t0 = time.perf_counter()
        try:
            if len(self._specs) == 1 and len(feeds) == 1:
                # A single-input model takes a single tensor under any name (e.g. from a bare .npy).
                feeds = {next(iter(self._specs)): next(iter(feeds.values()))}
            missing = set(self._specs) - set(feeds)
            extra = set(feeds) - set(self._specs)
            if missing or extra:
                raise InferenceError(f"model {self.name!r} takes inputs {sorted(self._specs)}, got {sorted(feeds)}")
            checked = {k: _check_input(self._specs[k], v) for k, v in feeds.items()}
            try:
                out = self.runtime.run(checked)
            except Exception as exc:
                raise InferenceError(f"model {self.name!r} failed: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
        except InferenceError:
            self.stats.record(None, ok=False)
            raise
        first = next(iter(checked.values()))
        self.stats.record((time.perf_counter() - t0) * 1000, ok=True, rows=first.shape[0] if first.ndim else 1)
        return out

    def snapshot(self) -> ModelStats:
        return self.stats.snapshot(self.version, inflight=self._inflight)

    def self_test(self) -> dict:
        """Re-run the reference inputs; the outputs must match those shipped in the bundle."""
        try:
            with np.load(self.folder / REFERENCE, allow_pickle=False) as ref:
                data = {k: ref[k] for k in ref.files}
        except (OSError, ValueError) as exc:
            raise SelfTestError(f"{self.name} v{self.version}: reference data unreadable ({exc})") from exc
        feeds = {s.name: data.get(f"input.{s.name}") for s in self.manifest.inputs}
        if any(v is None for v in feeds.values()):
            raise SelfTestError(f"{self.name} v{self.version}: reference data lacks an input")
        try:
            got = self.runtime.run(feeds)
        except Exception as exc:
            raise SelfTestError(f"{self.name} v{self.version} crashed on its reference inputs: {exc}") from exc
        st = self.manifest.selftest
        worst, agreement = 0.0, 1.0
        for spec in self.manifest.outputs:
            want = data.get(f"expected.{spec.name}")
            have = got.get(spec.name)
            if want is None or have is None or have.shape != want.shape:
                raise SelfTestError(f"{self.name} v{self.version}: output {spec.name!r} missing or of the wrong shape")
            err = float(np.max(np.abs(have.astype(np.float64) - want.astype(np.float64)))) if want.size else 0.0
            worst = max(worst, err)
            if want.ndim >= 2 and want.shape[-1] > 1:
                agreement = min(agreement, float(np.mean(have.argmax(-1) == want.argmax(-1))))
        result = {"max_abs_err": round(worst, 6), "top1_agreement": round(agreement, 4),
                  "atol": st.atol, "min_top1_agreement": st.min_top1_agreement, "samples": len(next(iter(feeds.values())))}
        if not worst <= st.atol or agreement < st.min_top1_agreement:
            raise SelfTestError(
                f"{self.name} v{self.version} failed its self-test: max abs error {worst:.4g} (allowed {st.atol:.4g}), "
                f"top-1 agreement {agreement:.3f} (needed {st.min_top1_agreement:.3f})",
                "the model does not behave on this device as it did on the host; check the runtime version")
        return result

    def acquire(self) -> bool:
        """Hold the model for one request; False once it is retired (the caller takes the new one)."""
        with self._cv:
            if self._retired:
                return False
            self._inflight += 1
            return True

    def release(self) -> None:
        with self._cv:
            self._inflight -= 1
            if self._inflight == 0:
                self._cv.notify_all()

    def close(self, timeout: float = 30.0) -> None:
        """Retire the model: no new requests, wait for those running on it, then free the runtime."""
        with self._cv:
            self._retired = True
            if not self._cv.wait_for(lambda: self._inflight == 0, timeout):
                log.warning("%s v%s: %d request(s) still running after %.0f s; closing anyway",
                            self.name, self.version, self._inflight, timeout)
        self.runtime.close()


class Engine:
    """The serving models by name, the budget that admits them, and the runtime threads."""

    def __init__(self, budget: Budget, threads: int = 1):
        self.budget = budget
        self.threads = threads
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def admit_declared(self, name: str, runtime: str, load_mb: float, runtime_mb: float) -> None:
        """Raise BudgetError unless a model of this declared cost fits now (the runtime's import
        cost counts only when that runtime is not loaded yet)."""
        self.budget.admit(name, load_mb + (0.0 if runtimes.is_imported(runtime) else runtime_mb))

    def load(self, folder: Path) -> LoadedModel:
        """Admit and load a model from an installed folder, without making it serve yet."""
        manifest = read_installed_manifest(folder)
        self.admit_declared(manifest.name, manifest.runtime, manifest.memory.load_mb, manifest.memory.runtime_mb)
        before = self.budget.rss_mb()
        runtime = runtimes.open_model(manifest.runtime, str(folder / manifest.model_file), threads=self.threads)
        model = LoadedModel(manifest, folder, runtime, cost_mb=0.0)
        model.cost_mb = max(self.budget.rss_mb() - before, 0.0)
        return model

    def activate(self, model: LoadedModel) -> LoadedModel | None:
        """Make `model` serve under its name; return the model it replaced (still open)."""
        with self._lock:
            old = self._models.get(model.name)
            self._models[model.name] = model
        return old

    def unload(self, name: str) -> None:
        with self._lock:
            model = self._models.pop(name, None)
        if model is not None:
            model.close()

    def get(self, name: str) -> LoadedModel:
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(f"no model named {name!r} is serving",
                                f"serving: {', '.join(sorted(self._models)) or 'none'}")
        return model

    def infer(self, name: str, feeds: dict[str, np.ndarray]) -> tuple[LoadedModel, dict[str, np.ndarray]]:
        for _ in range(3):  # a swap can retire the model between get() and acquire(): take the new one
            model = self.get(name)
            if model.acquire():
                try:
                    return model, model.run(feeds)
                finally:
                    model.release()
        raise InferenceError(f"model {name!r} is being replaced; retry")

    def models(self) -> list[LoadedModel]:
        with self._lock:
            return sorted(self._models.values(), key=lambda m: m.name)

    def close(self) -> None:
        for name in [m.name for m in self.models()]:
            self.unload(name)

"""The inference engine: the models that are serving, how requests reach them, what they cost.

Each model runs in its own worker process (agent/modelproc.py, agent/worker.py): the
agent's process stays small and numpy-free, unloading a model gives all of its memory
back, and a runtime crash costs that model's in-flight requests, never the agent (the
next request starts a fresh worker).

A model is loaded into a *shadow* LoadedModel first (admitted by the budget, its real
RSS cost measured), self-tested on the bundle's reference I/O, and only then swapped
in under the name callers use. No request fails because of a swap: each request holds
its model while it runs, closing a replaced model waits for the requests still on it,
and a request that picked up a model just as it was retired simply takes the new one.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Callable

from .batcher import Batcher
from .budget import Budget
from .bundle import REFERENCE, Manifest, TensorSpec, read_installed_manifest
from .config import ApiConfig, ServingConfig
from .errors import BudgetError, EdgewardError, InferenceError, ModelNotFound, WorkerCrashed
from .modelproc import ModelProcess
from .protocol import ModelInfo, ModelStats
from .runtimes import copies_for
from .stats import Stats
from .streams import no_stream_state, runs_row_by_row
from .tensors import Tensor, check_inputs, from_numpy, to_numpy

log = logging.getLogger(__name__)

WORKER_BASE_MB_GUESS = 30.0   # python + numpy in a worker, until the first worker has measured it
RESTART_MIN_INTERVAL_S = 2.0  # a model whose worker keeps dying is not restarted in a tight loop

# emit(kind, message, level="info", model=None, version=None, data=None)
Emit = Callable[..., None]


def fixed_batch(manifest: Manifest) -> int | None:
    """The batch size a model's first input is fixed at, or None when its batch axis is dynamic."""
    first = manifest.inputs[0].shape if manifest.inputs else []
    return first[0] if first and first[0] > 0 else None


def one_sample_per_call(manifest: Manifest) -> bool:
    """A stateful model whose worker runs a request's samples one at a time (agent/streams.py)."""
    return bool(manifest.state) and runs_row_by_row([s for s in manifest.inputs if s.name not in manifest.state],
                                                    [s for s in manifest.inputs if s.name in manifest.state])


def request_specs(manifest: Manifest) -> list[TensorSpec]:
    """What callers send: the inputs but the recurrent state, which stays in the worker. A stateful
    model that takes one sample per call takes any number of them per request; an input with
    context (agent/streams.py) takes only the new samples of each window."""
    specs = [s for s in manifest.inputs if s.name not in manifest.state]
    if one_sample_per_call(manifest):
        specs = [replace(s, shape=[-1, *s.shape[1:]]) if s.shape else s for s in specs]
    return [replace(s, shape=[*s.shape[:-1], s.shape[-1] - manifest.context[s.name]])
            if s.name in manifest.context and s.shape[-1] > 0 else s for s in specs]


class LoadedModel:
    def __init__(self, manifest: Manifest, folder: Path, start_worker: Callable[[], ModelProcess],
                 emit: Emit | None = None, timeout_s: float = 30.0, serving: ServingConfig | None = None):
        self.manifest = manifest
        self.serving = serving or ServingConfig()
        self.folder = folder
        self._start_worker = start_worker
        self.emit = emit or (lambda *a, **k: None)
        self.timeout_s = timeout_s
        self.proc = start_worker()
        self.cost_mb = self.proc.rss_mb
        self.stats = Stats()
        self._inflight = 0
        self.last_used = time.monotonic()
        self._retired = False
        self._cv = threading.Condition()
        self._restart_lock = threading.Lock()
        self._last_restart = 0.0
        # what callers send and get back: the recurrent state stays in the worker (agent/streams.py)
        self.request_inputs = request_specs(manifest)
        self.reply_outputs = [s for s in manifest.outputs if s.name not in manifest.state.values()]
        self.fixed_batch = fixed_batch(manifest)
        self.stateful = bool(manifest.state)
        self._batcher = None
        if self.serving.mode == "batched" and not self.stateful:
            # the worker's pipe takes one call at a time: a second thread gathers the next batch meanwhile
            self._batcher = Batcher(self.name, self._execute, self.serving.max_batch, self.serving.max_delay_ms,
                                    self.serving.preferred_batch, self.fixed_batch, self.serving.max_queue,
                                    in_flight=2)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    def info(self) -> ModelInfo:
        return ModelInfo(name=self.name, version=self.version, format=self.manifest.format,
                         cost_mb=round(self.cost_mb, 1), sha256=self.manifest.files[self.manifest.model_file].sha256,
                         providers=list(self.proc.providers or []) if self.proc else [])

    def where(self) -> dict:
        """Where and how it runs, for local tools (the local API's models answer): the runtime,
        the installed file, the worker's pid and providers, the batch size, the preprocessing."""
        return {"runtime": self.manifest.runtime, "file": str(self.folder / self.manifest.model_file),
                "pid": self.proc.pid, "providers": list(self.proc.providers or []),
                "max_batch": self.serving.max_batch if self.mode == "batched" else 1,
                "max_delay_ms": self.serving.max_delay_ms if self.mode == "batched" else 0.0,
                "preprocessing": self.manifest.preprocessing, "context": dict(self.manifest.context),
                "detections": self.detections}

    # ---------------------------------------------------------------- running

    def run(self, tensors: list[Tensor], stream: str | None = None) -> list[Tensor]:
        """Validate, run in the worker (alone, in a micro-batch, or on a stream's state), record.
        Any failure is an error for this caller alone."""
        return self._recorded(lambda: self._run(tensors, stream))

    def _run(self, tensors: list[Tensor], stream: str | None) -> list[Tensor]:
        if stream is not None and not self.stateful:
            raise no_stream_state(self.name)
        if self.stateful:
            return self._execute(check_inputs(self.name, self.request_inputs, tensors), stream)
        if self._batcher is not None:
            return self._batcher.submit(check_inputs(self.name, self.request_inputs, tensors,
                                                     max_rows=self.fixed_batch))
        return self._execute(check_inputs(self.name, self.request_inputs, tensors))

    def _recorded(self, work: Callable[[], list[Tensor]]) -> list[Tensor]:
        """A request's outputs, counted in the model's stats with its latency, or its failure."""
        t0 = time.perf_counter()
        self.last_used = time.monotonic()
        try:
            out = work()
        except EdgewardError:
            self.stats.record(None, ok=False)
            raise
        self.stats.record((time.perf_counter() - t0) * 1000, ok=True)
        return out

    @property
    def classes(self) -> list:
        """Class names by output index, where the bundle names them (image folders' sub-folders)."""
        return self.manifest.preprocessing.get("classes") or []

    @property
    def detections(self) -> list[str]:
        """A detector's boxes, classes, scores and count outputs (its worker read them from the
        bundle's reference data), so answers can list its detections; [] for other models."""
        return list(self.proc.detections) if self.proc else []

    def _execute(self, feeds: list[Tensor], stream: str | None = None) -> list[Tensor]:
        out = self._in_worker({"op": "run", "stream": stream} if stream is not None else {"op": "run"}, feeds)
        self.stats.record_run(feeds[0].rows if feeds else 1)
        return out

    def _in_worker(self, header: dict, tensors: list[Tensor]) -> list[Tensor]:
        proc = self._worker()
        try:
            _, out = proc.call(header, tensors, timeout=self.timeout_s, what="request")
        except WorkerCrashed as exc:
            self.emit("model_crashed", f"{self.name} v{self.version}: {exc.message}", level="error",
                      model=self.name, version=self.version)
            raise
        return out

    def run_image(self, data: bytes, preprocess: str | None = None) -> list[Tensor]:
        """One encoded image (JPEG, PNG, ...) from the network: decoded and prepared in the worker
        as the bundle says (or as `preprocess` says), then run at once, outside any batch."""
        header = {"op": "run_image", "what": f"{self.name} v{self.version}", "preprocess": preprocess,
                  # only the image spec: the class names, which may be a thousand, are not the worker's
                  "preprocessing": {"image": self.manifest.preprocessing.get("image")},
                  "fixed_batch": self.fixed_batch,
                  "inputs": [{"name": s.name, "shape": s.shape, "dtype": s.dtype} for s in self.request_inputs]}

        def work() -> list[Tensor]:
            out = self._in_worker(header, [Tensor("image", "uint8", (len(data),), data)])
            self.stats.record_run(1)
            return out

        return self._recorded(work)

    def _worker(self) -> ModelProcess:
        """The live worker, or a fresh one if the last one died (not more often than every few seconds)."""
        proc = self.proc
        if proc.alive():
            return proc
        with self._restart_lock:
            if self.proc.alive():
                return self.proc
            wait = RESTART_MIN_INTERVAL_S - (time.monotonic() - self._last_restart)
            if wait > 0:
                raise WorkerCrashed(f"model {self.name!r} is restarting after a crash", f"retry in {wait:.1f} s")
            self._last_restart = time.monotonic()
            self.proc.close()
            self.proc = self._start_worker()
            lost = "; its streams start over from zero state" if self.stateful else ""
            self.emit("model_restarted", f"{self.name} v{self.version}: a fresh worker serves it{lost}",
                      model=self.name, version=self.version, data={"pid": self.proc.pid})
            return self.proc

    def reset_stream(self, stream: str) -> bool:
        """Forget one stream's state (kept in the worker); True if it had one."""
        if not self.stateful or not self.proc.alive():
            return False
        return bool(self.proc.call({"op": "reset", "stream": stream}, timeout=self.timeout_s,
                                   what="stream reset")[0].get("reset"))

    def infer_arrays(self, feeds: dict, stream: str | None = None) -> dict:
        """numpy in, numpy out: for in-process callers and tests (the agent itself never needs numpy)."""
        out = self.run([from_numpy(k, v) for k, v in feeds.items()], stream)
        return {t.name: to_numpy(t) for t in out}

    def snapshot(self) -> ModelStats:
        """The model's counters: requests through the agent plus those its worker took directly,
        and for a stateful model the streams its worker keeps."""
        reply: dict = {}
        if (self.proc.direct_path or self.stateful) and self.proc.alive():
            try:
                reply = self.proc.call({"op": "stats"}, timeout=2, what="stats")[0]
            except EdgewardError:
                reply = {}
        return self.stats.snapshot(self.version, inflight=self._inflight, extra=reply.get("direct"),
                                   streams=reply.get("streams"))

    @property
    def direct_socket(self) -> str | None:
        """The worker's own socket for local apps, while the worker lives."""
        path = self.proc.direct_path
        return path if path and self.proc.alive() else None

    @property
    def mode(self) -> str:
        return "stateful" if self.stateful else ("batched" if self._batcher is not None else "streaming")

    def self_test(self) -> dict:
        """Re-run the reference inputs in the worker; the outputs must match those shipped in the bundle."""
        st = self.manifest.selftest
        reply, _ = self._worker().call({
            "op": "selftest", "reference": str(self.folder / REFERENCE), "what": f"{self.name} v{self.version}",
            "inputs": [s.name for s in self.manifest.inputs],
            "outputs": [s.name for s in self.reply_outputs], "batch": None if self.stateful else self.fixed_batch,
            "atol": st.atol, "min_top1_agreement": st.min_top1_agreement}, timeout=max(self.timeout_s, 60), what="self-test")
        self.cost_mb = max(self.cost_mb, float(reply.get("rss_mb", 0.0)))
        return reply["result"]

    # ---------------------------------------------------------------- life

    @property
    def idle(self) -> bool:
        return self._inflight == 0

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
        """Retire the model: no new requests, wait for those running on it, then end its worker."""
        with self._cv:
            self._retired = True
            if not self._cv.wait_for(lambda: self._inflight == 0, timeout):
                log.warning("%s v%s: %d request(s) still running after %.0f s; closing anyway",
                            self.name, self.version, self._inflight, timeout)
        if self._batcher is not None:
            self._batcher.close()
        self.proc.close()


class Engine:
    """The serving models by name, the budget that admits them, and how their workers start."""

    def __init__(self, budget: Budget, threads: int = 1, emit: Emit | None = None, timeout_s: float = 30.0,
                 serving_for: Callable[[str], ServingConfig] | None = None, providers: list[str] | None = None,
                 evict_idle_s: float = 0.0):
        self.budget = budget
        self.evict_idle_s = evict_idle_s
        self._evicted: dict[str, tuple[Path, ModelInfo]] = {}  # unloaded for room, reloaded on demand
        self._reload_lock = threading.Lock()
        self.providers = providers or []
        self.serving_for = serving_for or (lambda name: ServingConfig())
        self.direct_dir: str | None = None  # set when the local API runs: streaming models get a direct socket
        self.direct_mode = 0o660
        self.direct_spin_us = 0
        self.direct_max_message = ApiConfig().max_request_mb << 20  # set from the agent's config
        self.direct_max_held = ApiConfig().max_held_mb << 20
        self.threads = threads
        self.emit = emit
        self.timeout_s = timeout_s
        self.worker_base_mb = WORKER_BASE_MB_GUESS
        self._models: dict[str, LoadedModel] = {}
        self._stateful: set[str] = set()  # serving (or evicted) models that keep stream state
        self._lock = threading.Lock()

    def admit_declared(self, name: str, runtime: str, load_mb: float, runtime_mb: float, evict: bool = False) -> None:
        """Raise BudgetError unless a model of this declared cost fits now: a worker process
        (python + numpy, as measured by the last worker), its runtime, and the model. With
        `evict` (and memory.evict_idle_s set), idle models are unloaded, least recently used
        first, until it fits."""
        cost = self.worker_base_mb + runtime_mb + load_mb
        while True:
            try:
                self.budget.admit(name, cost)
                return
            except BudgetError:
                if not (evict and self._evict_one(name)):
                    raise

    def _evict_one(self, for_name: str) -> bool:
        """Unload the least recently used model idle for evict_idle_s (not `for_name`); False if none."""
        if self.evict_idle_s <= 0:
            return False
        now = time.monotonic()
        with self._lock:
            candidates = [m for m in self._models.values()
                          if m.name != for_name and m.idle and now - m.last_used >= self.evict_idle_s]
            if not candidates:
                return False
            victim = min(candidates, key=lambda m: m.last_used)
            self._models.pop(victim.name)
            info = victim.info()
            info.health = "evicted"
            self._evicted[victim.name] = (victim.folder, info)
        freed = victim.proc.rss_mb
        victim.close()
        if self.emit:
            self.emit("model_evicted", f"{victim.name} v{victim.version} unloaded to make room for {for_name} "
                      f"(~{freed:.0f} MB; idle {now - victim.last_used:.0f} s); it reloads on its next request",
                      model=victim.name, version=victim.version, data={"freed_mb": round(freed, 1)})
        return True

    def evicted(self) -> dict[str, Path]:
        """Models unloaded to make room, by name: the folders they reload from."""
        return {name: folder for name, (folder, _) in self._evicted.items()}

    def evicted_infos(self) -> list[ModelInfo]:
        """What the state message says of them: health "evicted"."""
        return [info for _, info in sorted(self._evicted.values(), key=lambda e: e[1].name)]

    def load(self, folder: Path) -> LoadedModel:
        """Admit and load a model from an installed folder into its own worker, without making it serve yet."""
        manifest = read_installed_manifest(folder)
        serving = self.serving_for(manifest.name)
        direct = bool(self.direct_dir)  # local apps reach the worker on its own socket
        batched_in_worker = direct and serving.mode == "batched" and not manifest.state
        copies = copies_for(manifest.runtime, batched_in_worker, serving.batches_in_flight)
        self.admit_declared(manifest.name, manifest.runtime, manifest.memory.load_mb * copies,
                            manifest.memory.runtime_mb, evict=True)
        path = str(folder / manifest.model_file)

        load = {"op": "load", "runtime": manifest.runtime, "path": path, "threads": self.threads,
                "providers": self.providers, "copies": copies, "reference": str(folder / REFERENCE)}
        if manifest.state:  # the worker keeps each stream's state (agent/streams.py)
            load.update(state=manifest.state, context=manifest.context, max_streams=serving.max_streams,
                        by_row=one_sample_per_call(manifest),
                        state_specs=[{"name": s.name, "dtype": s.dtype, "shape": s.shape}
                                     for s in manifest.inputs if s.name in manifest.state])

        def start_worker() -> ModelProcess:
            proc = ModelProcess()
            try:
                self.worker_base_mb = proc.base_rss_mb or self.worker_base_mb
                reply, _ = proc.call(load, timeout=120, what="load")
            except BaseException:
                proc.close()
                raise
            proc.rss_mb = float(reply.get("rss_mb", 0.0))
            proc.providers = reply.get("providers")
            proc.detections = [str(n) for n in reply.get("detections") or []]
            missing = [p for p in self.providers if proc.providers is not None and p not in proc.providers]
            if missing:
                log.warning("%s v%d runs on %s: inference.providers asks for %s, which this onnxruntime build does "
                            "not have or could not start (install the onnxruntime build for this board's "
                            "CUDA/JetPack)", manifest.name, manifest.version, ", ".join(proc.providers),
                            ", ".join(missing))
            if direct:
                sock = f"{self.direct_dir}/{uuid.uuid4().hex[:10]}.sock"
                specs = [{"name": s.name, "dtype": s.dtype, "shape": s.shape} for s in request_specs(manifest)]
                batch = None
                if batched_in_worker:  # local apps' requests are batched in the worker itself
                    batch = {"max_batch": serving.max_batch, "max_delay_ms": serving.max_delay_ms,
                             "preferred": serving.preferred_batch, "max_queue": serving.max_queue,
                             "fixed_batch": fixed_batch(manifest), "in_flight": serving.batches_in_flight}
                try:
                    proc.call({"op": "serve", "path": sock, "mode": self.direct_mode, "model": manifest.name,
                               "version": manifest.version, "specs": specs, "batch": batch,
                               "spin_us": self.direct_spin_us, "max_message": self.direct_max_message,
                               "max_held": self.direct_max_held},
                              timeout=30, what="direct socket")
                    proc.direct_path = sock
                except EdgewardError as exc:  # the agent's socket still serves the model
                    log.warning("%s: no direct socket (%s)", manifest.name, exc)
            return proc

        return LoadedModel(manifest, folder, start_worker, emit=self.emit, timeout_s=self.timeout_s,
                           serving=serving)

    def activate(self, model: LoadedModel) -> LoadedModel | None:
        """Make `model` serve under its name; return the model it replaced (still open)."""
        with self._lock:
            old = self._models.get(model.name)
            self._models[model.name] = model
            self._evicted.pop(model.name, None)
            (self._stateful.add if model.stateful else self._stateful.discard)(model.name)
        return old

    def unload(self, name: str) -> None:
        with self._lock:
            model = self._models.pop(name, None)
            self._stateful.discard(name)
        if model is not None:
            model.close()

    def keeps_streams(self, name: str) -> bool:
        """Whether the model of that name keeps stream state, without loading it (paho's thread asks)."""
        return name in self._stateful

    def get(self, name: str) -> LoadedModel:
        model = self._models.get(name)
        if model is None and name in self._evicted:
            model = self._reload(name)
        if model is None:
            raise ModelNotFound(f"no model named {name!r} is serving",
                                f"serving: {', '.join(sorted(self._models)) or 'none'}")
        return model

    def _reload(self, name: str) -> LoadedModel | None:
        """Bring an evicted model back for a request (evicting others if need be), self-tested."""
        with self._reload_lock:
            if name in self._models:
                return self._models[name]
            entry = self._evicted.get(name)
            if entry is None:
                return None
            model = self.load(entry[0])
            try:
                model.self_test()
            except BaseException:
                model.close()
                raise
            self.activate(model)
            if self.emit:
                self.emit("model_reloaded", f"{name} v{model.version} reloaded for a request", model=name,
                          version=model.version)
            return model

    def infer(self, name: str, tensors: list[Tensor], stream: str | None = None) -> tuple[LoadedModel, list[Tensor]]:
        return self._on_model(name, lambda model: model.run(tensors, stream))

    def run_image(self, name: str, data: bytes, preprocess: str | None = None) -> tuple[LoadedModel, list[Tensor]]:
        return self._on_model(name, lambda model: model.run_image(data, preprocess))

    def infer_arrays(self, name: str, feeds: dict, stream: str | None = None) -> tuple[LoadedModel, dict]:
        """numpy in, numpy out (for in-process callers and tests)."""
        return self._on_model(name, lambda model: model.infer_arrays(feeds, stream))

    def _on_model(self, name: str, work):
        for _ in range(3):  # a swap can retire the model between get() and acquire(): take the new one
            model = self.get(name)
            if model.acquire():
                try:
                    return model, work(model)
                finally:
                    model.release()
        raise InferenceError(f"model {name!r} is being replaced; retry")

    def models(self) -> list[LoadedModel]:
        with self._lock:
            return sorted(self._models.values(), key=lambda m: m.name)

    def close(self) -> None:
        for name in [m.name for m in self.models()]:
            self.unload(name)

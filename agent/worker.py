"""A model worker: one process per loaded model, started by the agent (`python -m agent.worker`).

Why a process: onnxruntime does not give all memory back when a session is deleted,
and a runtime that crashes takes its process with it. In a worker, unloading a model
returns every byte to the system (the process exits) and a crash costs one model's
requests, never the agent. The worker imports numpy and the model's runtime; the
agent's main process imports neither.

It answers requests from the agent over its stdin/stdout pipes (agent/ipc.py): ``load``,
``run`` (on a stream's state for a stateful model: the streams live here), ``run_image``
(an encoded image from the network, decoded here), ``reset``, ``serve`` (its own socket for
local apps), ``selftest``, ``stats`` and ``inspect``; it exits when the pipe closes.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

import numpy as np  # the base cost of every worker, reported before any runtime loads

from .errors import InferenceError, runtime_message
from .tensors import from_numpy, pad_rows, split, to_numpy


def rss_mb() -> float:
    """This process's resident memory, from /proc (no psutil import needed here)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Worker:
    def __init__(self) -> None:
        self.runtime = None
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.direct = None
        self.batcher = None
        self.streams = None  # agent.streams.Streams, for a model that declares recurrent state
        self._image_specs: dict = {}  # how pipeline images become the input, by what the agent sent
        self._lock = None  # set for runtimes that must not run from two threads at once
        self.threads = 1
        # a detector's boxes, classes, scores and count (agent/detections.py): the rows past each
        # image's count are whatever the runtime's buffer held (an earlier image's detections), so
        # callers get them as zeros
        self.detections: list[str] = []


    def load(self, h: dict, _body) -> tuple[dict, list]:
        from . import runtimes

        self.threads = int(h.get("threads", 1))
        self.runtime = runtimes.open_model(h["runtime"], h["path"], threads=self.threads,
                                           providers=h.get("providers") or None, copies=int(h.get("copies", 1)))
        self.inputs, self.outputs = self.runtime.input_names(), self.runtime.output_names()
        if h.get("reference") and os.path.exists(h["reference"]):  # a detector: its unwritten rows zeroed
            from . import reference

            self.detections = reference.detection_outputs(h["reference"], self.outputs, "the model")[0]
        if not getattr(self.runtime, "thread_safe", False):
            self._lock = threading.Lock()
        if h.get("state"):
            from .streams import Streams
            from .tensors import InputSpec

            specs = [InputSpec(s["name"], s["dtype"], list(s["shape"])) for s in h["state_specs"]]
            self.streams = Streams(h["state"], specs, self.run_tensors, int(h.get("max_streams", 1024)),
                                   by_row=bool(h.get("by_row")), context=h.get("context") or {})
        return {"inputs": self.inputs, "outputs": self.outputs, "rss_mb": rss_mb(),
                "providers": getattr(self.runtime, "providers", None), "detections": self.detections}, []

    def auto_in_flight(self) -> int:
        """Batches to run at once: one per core the runtime's threads leave. A runtime that runs
        one call at a time still gains a second: it gathers the next batch while one runs."""
        from .runtimes import runs_at_once

        if self._lock is not None or getattr(self.runtime, "copies", None) == 1:
            return 2
        return runs_at_once(self.threads)

    def run(self, h: dict, body) -> tuple[dict, list]:
        from .tensors import from_frame

        return {}, self.run_on(from_frame(h, body), h.get("stream"))

    def run_on(self, tensors: list, stream: str | None) -> list:
        """Run a request: on its stream's state for a stateful model (a zero state without a
        stream id); a stream id for a model without state is the caller's mistake."""
        if self.streams is not None:
            return self.streams.run(stream, tensors)
        if stream is not None:
            from .streams import no_stream_state

            raise no_stream_state()
        return self.run_tensors(tensors)

    def run_image(self, h: dict, body) -> tuple[dict, list]:
        """Decode one encoded image (a camera pipeline's message, a fleet request or a local
        app's), prepare it as the model's images are prepared (agent/images.py) and run it.
        Pillow is imported here, on the first image: the agent's daemon never decodes what
        arrives over the network itself."""
        from . import images
        from .tensors import from_frame

        (blob,) = from_frame(h, body)
        key = (h.get("preprocess"), repr(h.get("preprocessing")), repr(h["inputs"]))
        spec = self._image_specs.get(key)
        if spec is None:
            spec = images.spec_for(h["what"], h["inputs"], h.get("preprocessing"), h.get("preprocess"))
            if len(self._image_specs) >= 8:  # one per image pipeline on this model: a few at most
                self._image_specs.clear()
            self._image_specs[key] = spec
        x, size = images.decode_photo(bytes(blob.data), spec, what=f"the image for {h['what']}",
                                      max_pixels=int(h.get("max_pixels", images.MAX_MESSAGE_PIXELS)))
        rows = int(h.get("fixed_batch") or 1)  # a model whose batch size is fixed: zero rows after the image
        feed = pad_rows(from_numpy(h["inputs"][0]["name"], x[None]), rows)
        out = self.run_on([feed], None)
        out = [split(t, [1])[0] for t in out] if rows > 1 else out
        box_map = images.photo_box(size, spec) if self.detections else None
        if box_map:  # a detector's boxes on the photo as sent, not on the letterboxed or cropped input
            from .detections import in_photo

            by_name = {t.name: t for t in out}
            boxes, count = (to_numpy(by_name[n]) for n in (self.detections[0], self.detections[3]))
            moved = from_numpy(self.detections[0], in_photo(boxes, count, box_map))
            out = [moved if t.name == self.detections[0] else t for t in out]
        return {}, out

    def reset(self, h: dict, _body) -> tuple[dict, list]:
        """Forget one stream's state; says whether there was one."""
        return {"reset": bool(self.streams is not None and self.streams.reset(str(h.get("stream"))))}, []

    def run_tensors(self, tensors: list) -> list:
        """Check the values (finite floats) and run the model; outputs as Tensors. (Every request
        comes through here: its imports are the module's, not the function's.)"""
        feeds = {}
        for t in tensors:
            arr = np.frombuffer(t.data, dtype=t.dtype).reshape(t.shape)
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise InferenceError(f"input {t.name!r} holds NaN or infinity", "send finite values")
            feeds[t.name] = arr
        try:
            with self._lock or contextlib.nullcontext():
                out = self.runtime.run(feeds)
        except Exception as exc:  # the runtime's own exception types
            raise InferenceError(f"the runtime failed: {runtime_message(exc)}") from exc
        if self.detections:
            from .detections import cleaned

            out = cleaned(out, self.detections)
        return [from_numpy(name, np.asarray(arr)) for name, arr in out.items()]

    def serve(self, h: dict, _body) -> tuple[dict, list]:
        """Also take requests from local apps on a socket of this worker's own (agent/direct.py)."""
        from .tensors import InputSpec
        from .direct import DirectServer

        specs = [InputSpec(s["name"], s["dtype"], list(s["shape"])) for s in h["specs"]]

        def counted(feeds: list) -> list:  # executions for local apps' requests, for the mean batch size
            out = self.run_tensors(feeds)
            self.direct.stats.record_run(feeds[0].rows if feeds else 1)
            return out

        def on_stream(feeds: list, stream: str | None) -> list:  # a stateful model: the stream's state
            out = self.streams.run(stream, feeds)
            self.direct.stats.record_run(feeds[0].rows if feeds else 1)
            return out

        run, max_rows, submit = counted, None, None
        batch = h.get("batch")
        if batch:  # gather local apps' requests into micro-batches here, next to the runtime
            from .batcher import Batcher

            self.batcher = Batcher(h["model"], counted, int(batch["max_batch"]), float(batch["max_delay_ms"]),
                                   batch.get("preferred") or [], batch.get("fixed_batch"), int(batch["max_queue"]),
                                   in_flight=int(batch.get("in_flight") or self.auto_in_flight()))
            run, max_rows, submit = self.batcher.submit, batch.get("fixed_batch"), self.batcher.submit_async
        self.direct = DirectServer(h["path"], int(h["mode"]), h["model"], int(h["version"]), specs, run,
                                   int(h.get("max_conns", 64)), int(h.get("spin_us", 0)), max_rows=max_rows,
                                   submit=submit, max_message=int(h["max_message"]),
                                   max_held=int(h["max_held"]),
                                   run_stream=on_stream if self.streams is not None else None,
                                   cancel=self.batcher.cancel if batch else None)
        return {"path": h["path"]}, []

    def stats(self, _h: dict, _body) -> tuple[dict, list]:
        streams = len(self.streams) if self.streams is not None else None
        return {"direct": self.direct.stats.export() if self.direct is not None else None, "streams": streams}, []

    def inspect(self, _h: dict, _body) -> tuple[dict, list]:
        """What this worker holds: for diagnostics and the tests that keep host libraries off the board."""
        from . import runtimes

        return {"rss_mb": rss_mb(), "modules": sorted({m.split(".")[0] for m in sys.modules}),
                "runtime": getattr(self.runtime, "name", None),
                "versions": {m: getattr(sys.modules[m], "__version__", None) for m in runtimes.PACKAGES
                             if m in sys.modules},
                "copies": getattr(self.runtime, "copies", None)}, []

    def selftest(self, h: dict, _body) -> tuple[dict, list]:
        """Re-run the bundle's reference inputs; the outputs must match those shipped with it."""
        import numpy as np

        from . import reference
        from .errors import SelfTestError

        what = h["what"]
        feeds, data = reference.load(h["reference"], h["inputs"], what)
        try:
            got = reference.run_in_batches(self.runtime.run, feeds, h.get("batch"))
        except Exception as exc:
            raise SelfTestError(f"{what} crashed on its reference inputs: {runtime_message(exc)}") from exc
        allowed = {name: min(h["atol"], tol) for name, tol in reference.tolerances(h["reference"], what).items()}
        found, threshold = reference.detection_outputs(h["reference"], h["outputs"], what)
        worst, agreement, failed = 0.0, 1.0, None
        if found:  # a detector's detections: matched as a set (agent/detections.py)
            from .detections import mismatch

            failed = mismatch(data, got, found, allowed.get(found[2], h["atol"]), threshold)
        for name in h["outputs"]:
            want, have = data.get(name), got.get(name)
            if want is None or have is None or have.shape != want.shape:
                raise SelfTestError(f"{what}: output {name!r} missing or of the wrong shape")
            if name in found:
                continue
            err = float(np.max(np.abs(have.astype(np.float64) - want.astype(np.float64)))) if want.size else 0.0
            worst = max(worst, err)
            limit = allowed.get(name, h["atol"])
            if not err <= limit and failed is None:
                failed = f"output {name!r} strays {err:.4g} from the host's (allowed {limit:.4g})"
            if want.ndim >= 2 and want.shape[-1] > 1:
                agreement = min(agreement, float(np.mean(have.argmax(-1) == want.argmax(-1))))
        result = {"max_abs_err": round(worst, 6), "top1_agreement": round(agreement, 4), "atol": h["atol"],
                  "min_top1_agreement": h["min_top1_agreement"], "samples": len(next(iter(feeds.values())))}
        if failed or agreement < h["min_top1_agreement"]:
            raise SelfTestError(
                f"{what} failed its self-test: {failed or f'max abs error {worst:.4g}'}, "
                f"top-1 agreement {agreement:.3f} (needed {h['min_top1_agreement']:.3f})",
                "the model does not behave on this device as it did on the host; check the runtime version")
        return {"result": result, "rss_mb": rss_mb()}, []


def main() -> int:
    # the pipes to the agent get private descriptors; anything a library prints goes to stderr
    fd_in, fd_out = os.dup(0), os.dup(1)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    from . import ipc
    from .errors import EdgewardError
    from .tensors import to_frame

    reader = ipc.reader_for(fd_in)
    worker = Worker()
    ipc.send(fd_out, {"status": "ready", "rss_mb": rss_mb(), "pid": os.getpid()})
    while True:
        try:
            header, body = ipc.recv(reader)
        except ipc.PipeClosed:
            if worker.direct is not None:
                worker.direct.close()
            return 0
        op = getattr(worker, header.get("op", ""), None)
        try:
            if op is None:
                raise EdgewardError(f"unknown worker request {header.get('op')!r}")
            reply, tensors = op(header, body)
            specs, out = to_frame(tensors)
            ipc.send(fd_out, {"status": "ok", **reply, "tensors": specs}, out)
        except EdgewardError as exc:
            ipc.send(fd_out, {"status": "error", "code": exc.code, "error": exc.message, "fix": exc.fix})
        except Exception as exc:  # a bug here must reach the agent as an error, not a silent exit
            ipc.send(fd_out, {"status": "error", "code": "internal", "error": f"worker: {exc!r}", "fix": None})


if __name__ == "__main__":
    sys.exit(main())

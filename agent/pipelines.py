"""MQTT pipelines declared in the config: input topic → model → output topic.

For sensors and services that already speak MQTT: a message on `input_topic` runs `model`
(in its serving mode, so a batched model batches pipeline messages too), and the answer is
published on `output_topic`. Payloads are JSON or binary frames:

    json:   in  {"inputs": {"x": [[...]]}}  (or just the nested list, for one-input models)
            out {"model": "kws", "version": 3, "ts": 1700000000.0, "outputs": {"scores": [[...]]}}
    binary: in  an EWF1 frame of tensors (agent/wire.py); out the same, header as above
    image:  in  one encoded image (JPEG, PNG, WebP, BMP, PPM), as cameras publish them
            out as json, plus "top1" and "class" for a classifier whose bundle names its classes
    raw:    in  the bytes of the model's one input, little-endian, N rows (a microcontroller's
                buffer: no framing to build); out as json

A detector's answers (an SSD's, or a YOLO's converted with --nms: boxes, classes, scores and a
count) also list its detections, in any format: "detections": [{"box": [ymin, xmin, ymax,
xmax], "class_id", "class", "score"}], best first, boxes as fractions of the photo as sent.

An image is decoded and prepared in the model's worker, as the bundle's preprocessing says
(the converter's --preprocess) or as the pipeline's `preprocess` says, by the same code the
converter used (agent/images.py); the board needs Pillow for it (the `images` extra).

A message the model cannot take gets an answer with "status": "error", "code" and
"error" on the output topic, and nothing else happens. Inputs may carry "stream" for
stateful models, or with `stream_from_topic` the topic a message came on names its stream
(mic/kitchen/frames and mic/hall/frames: two streams). A stateful model's messages run one
at a time, in the order they arrived (agent/lanes.py), so each stream's chunks meet its
state in order.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Callable

from paho.mqtt.client import topic_matches_sub

from . import protocol, wire
from .config import PipelineConfig
from .errors import EdgewardError, InferenceError, ProtocolError
from .schema import load_json
from .streams import stream_id
from .tensors import ITEMSIZE, Tensor, detected, from_frame, from_json, labels, to_frame, to_json

log = logging.getLogger(__name__)


class Pipelines:
    def __init__(self, configs: list[PipelineConfig], engine, publish: Callable[[str, bytes, int], None],
                 max_payload: int):
        self.configs = configs
        self.engine = engine
        self.publish = publish
        self.max_payload = max_payload
        import importlib.util

        for cfg in configs:  # said once at start: every image would otherwise fail on its own
            if cfg.format == "image" and importlib.util.find_spec("PIL") is None:
                log.warning("pipeline %s -> %s takes images, and Pillow is not installed: each image is answered "
                            "with an error until it is (pip install 'edgeward[images]')", cfg.input_topic, cfg.model)

    def subscriptions(self) -> list[tuple[str, int]]:
        return [(c.input_topic, c.qos) for c in self.configs]

    def match(self, topic: str) -> list[PipelineConfig]:
        return [c for c in self.configs if topic_matches_sub(c.input_topic, topic)]

    def handle(self, cfg: PipelineConfig, payload: bytes, topic: str | None = None) -> None:
        """Run one message (received on `topic`) through the model and publish the answer (or
        the error) on the output topic."""
        try:
            if len(payload) > self.max_payload:
                raise ProtocolError(f"message of {len(payload)} bytes is over the {self.max_payload}-byte limit")
            extra = {}
            if cfg.format == "image":  # decoded and prepared in the model's worker
                model, outputs = self.engine.run_image(cfg.model, payload, cfg.preprocess)
                extra = labels(outputs, model.classes, model.detections)
            else:
                tensors, stream = self._raw(cfg, payload) if cfg.format == "raw" else self._decode(cfg, payload)
                if stream is None and cfg.stream_from_topic and topic:
                    stream = stream_id(topic)
                model, outputs = self.engine.infer(cfg.model, tensors, stream)
                extra = detected(outputs, model.detections, model.classes)
            head = {"v": protocol.VERSION, "status": "ok", "model": model.name, "version": model.version,
                    "ts": time.time(), **extra}
            if cfg.format == "binary":
                specs, body = to_frame(outputs)
                out = wire.pack({**head, "tensors": specs}, body)
            else:
                out = json.dumps({**head, "outputs": {t.name: to_json(t) for t in outputs}}).encode()
        except EdgewardError as exc:
            err = {"v": protocol.VERSION, "status": "error", "code": exc.code, "error": str(exc), "ts": time.time()}
            out = wire.pack(err) if cfg.format == "binary" else json.dumps(err).encode()
        except Exception as exc:  # a bug must not silence the pipeline
            log.exception("pipeline %s -> %s failed", cfg.input_topic, cfg.model)
            out = json.dumps({"v": protocol.VERSION, "status": "error", "code": "internal", "error": repr(exc)}).encode()
        self.publish(cfg.output_topic, out, cfg.qos)

    def _raw(self, cfg: PipelineConfig, payload: bytes):
        """A payload that is nothing but the bytes of the model's one input, little-endian, as a
        microcontroller sends a buffer: its rows are read off its length."""
        specs = self.engine.get(cfg.model).request_inputs
        if len(specs) != 1:
            raise InferenceError(f"raw payloads feed a one-input model; {cfg.model!r} takes "
                                 f"{', '.join(s.name for s in specs)}", "use format: json or binary")
        spec = specs[0]
        rest = list(spec.shape[1:])
        if not spec.shape or spec.dtype not in ITEMSIZE or any(d < 0 for d in rest):
            raise InferenceError(f"raw payloads need an input fixed but for its first axis; {spec.name!r} is "
                                 f"{spec.dtype} {spec.shape}", "use format: json or binary")
        row = ITEMSIZE[spec.dtype] * math.prod(rest)
        if not payload or len(payload) % row:
            raise InferenceError(f"a raw payload of {len(payload)} bytes is not a whole number of {spec.name!r} rows "
                                 f"({spec.dtype} {rest}: {row} bytes each)", f"send N x {row} bytes")
        rows = len(payload) // row
        if spec.shape[0] > 0 and rows != spec.shape[0]:
            raise InferenceError(f"{cfg.model!r} takes {spec.shape[0]} row(s) of {row} bytes, the payload holds {rows}",
                                 f"send {spec.shape[0] * row} bytes")
        return [Tensor(spec.name, spec.dtype, (rows, *rest), bytes(payload))], None

    def _decode(self, cfg: PipelineConfig, payload: bytes):
        if cfg.format == "binary":
            header, body = wire.unpack(payload)
            return from_frame(header, body), stream_id(header.get("stream"))
        try:
            doc = load_json(payload)
        except ValueError as exc:
            raise ProtocolError(f"not valid JSON: {exc}") from None
        specs = self.engine.get(cfg.model).request_inputs
        stream = stream_id(doc.get("stream")) if isinstance(doc, dict) else None
        inputs = doc.get("inputs") if isinstance(doc, dict) else {specs[0].name: doc} if len(specs) == 1 else None
        if isinstance(inputs, list) and len(specs) == 1:
            inputs = {specs[0].name: inputs}
        if not isinstance(inputs, dict):
            raise InferenceError(f"expected {{\"inputs\": {{name: list}}}} for {cfg.model!r} "
                                 f"(inputs: {', '.join(s.name for s in specs)})")
        by_name = {s.name: s for s in specs}
        tensors = []
        for name, value in inputs.items():
            spec = by_name.get(name)
            if spec is None:
                raise InferenceError(f"model {cfg.model!r} has no input {name!r}",
                                     f"its inputs: {', '.join(by_name)}")
            tensors.append(from_json(name, value, spec.dtype))
        return tensors, stream

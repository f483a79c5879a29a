"""Home Assistant MQTT discovery (opt-in: `homeassistant.enabled: true`).

The agent publishes retained discovery configs under `<prefix>/<component>/edgeward_<device>/<object>/config`,
so the board appears in Home Assistant as a device with sensors read straight from the
agent's own state and telemetry topics (no extra messages, nothing HA-specific in the
protocol), each model's version as an `update` entity, and for each camera pipeline
(`format: image`) a sensor whose state is the class it last saw (a detector's: the class of
its best detection, with the count and every class as attributes).
"""

from __future__ import annotations

import json
import re

from . import __version__, protocol
from .protocol import State

SENSORS = [
    # object id, name, telemetry field, unit, device class, state class
    ("rss", "Agent memory", "rss_mb", "MB", None, "measurement"),
    ("cpu", "Agent CPU", "cpu_percent", "%", None, "measurement"),
    ("available", "Memory available", "available_mb", "MB", None, "measurement"),
    ("load", "Load (1 min)", "load_1m", None, None, "measurement"),
    ("temperature", "Temperature", "temperature_c", "°C", "temperature", "measurement"),
    ("disk_free", "Store disk free", "disk_free_mb", "MB", None, "measurement"),
]


def _object_id(text: str) -> str:
    return re.sub(r"[^a-z0-9_]", "_", text.lower())


def discovery_messages(state: State, prefix: str = "homeassistant", pipelines: list | None = None) -> dict[str, bytes]:
    """topic -> retained config payload for this device, its current models and its image
    pipelines (a camera's class as a sensor, read from the pipeline's own output topic)."""
    dev = state.device
    node = f"edgeward_{_object_id(dev)}"
    device = {"identifiers": [node], "name": f"edgeward {dev}", "manufacturer": "edgeward",
              "model": state.hardware.model or state.hardware.machine or "board", "sw_version": __version__}
    availability = {"topic": protocol.state_topic(dev), "value_template": "{{ 'online' if value_json.online else 'offline' }}",
                    "payload_available": "online", "payload_not_available": "offline"}
    out: dict[str, dict] = {
        f"{prefix}/binary_sensor/{node}/online/config": {
            "name": "Online", "unique_id": f"{node}_online", "device_class": "connectivity",
            "state_topic": protocol.state_topic(dev), "value_template": "{{ 'ON' if value_json.online else 'OFF' }}",
            "device": device,
        },
    }
    for obj, name, field, unit, device_class, state_class in SENSORS:
        cfg = {"name": name, "unique_id": f"{node}_{obj}", "state_topic": protocol.telemetry_topic(dev),
               "value_template": f"{{{{ value_json.{field} }}}}", "availability": [availability], "device": device,
               "state_class": state_class}
        if unit:
            cfg["unit_of_measurement"] = unit
        if device_class:
            cfg["device_class"] = device_class
        out[f"{prefix}/sensor/{node}/{obj}/config"] = cfg
    for m in state.models:
        mid = _object_id(m.name)
        out[f"{prefix}/update/{node}/model_{mid}/config"] = {
            "name": f"Model {m.name}", "unique_id": f"{node}_model_{mid}", "state_topic": protocol.state_topic(dev),
            "value_template": ("{{ {'installed_version': ((value_json.models | selectattr('name', 'eq', '%s') | "
                               "map(attribute='version') | list | first) | default('none')) | string, "
                               "'title': '%s'} | tojson }}") % (m.name, m.name),
            "availability": [availability], "device": device, "entity_category": "diagnostic",
        }
        out[f"{prefix}/sensor/{node}/model_{mid}_p50/config"] = {
            "name": f"Model {m.name} latency p50", "unique_id": f"{node}_model_{mid}_p50",
            "state_topic": protocol.telemetry_topic(dev), "unit_of_measurement": "ms", "state_class": "measurement",
            "value_template": f"{{{{ value_json.models['{m.name}'].p50_ms if '{m.name}' in value_json.models else None }}}}",
            "availability": [availability], "device": device,
        }
    for pipe in pipelines or []:
        if pipe.format != "image":  # other pipelines answer with arrays, not one value to show
            continue
        pid = _object_id(pipe.output_topic)
        out[f"{prefix}/sensor/{node}/seen_{pid}/config"] = {
            "name": f"{pipe.model} on {pipe.input_topic}", "unique_id": f"{node}_seen_{pid}",
            "state_topic": pipe.output_topic, "icon": "mdi:camera-iris",
            # a classifier's class; a detector's best detection ("nothing" when it found none)
            "value_template": ("{% if value_json.status != 'ok' %}error"
                               "{% elif 'detections' in value_json %}{% set d = value_json.detections %}"
                               "{{ (d[0]['class'] if 'class' in d[0] else d[0].class_id) if d else 'nothing' }}"
                               "{% else %}{{ value_json['class'] if 'class' in value_json else value_json.top1 }}"
                               "{% endif %}"),
            "json_attributes_topic": pipe.output_topic,
            # and for a detector how many it found and their classes (no dict.update: HA's
            # templates run in Jinja's immutable sandbox)
            "json_attributes_template": ("{% set v, t = value_json.get('version'), value_json.get('ts') %}"
                                         "{{ ({'model_version': v, 'ts': t, "
                                         "'count': value_json.detections | length, "
                                         "'classes': value_json.detections | map(attribute='class', default='') "
                                         "| list} if value_json.get('detections') is not none "
                                         "else {'model_version': v, 'ts': t}) | tojson }}"),
            "availability": [availability], "device": device,
        }
    return {topic: json.dumps(cfg, separators=(",", ":")).encode() for topic, cfg in out.items()}

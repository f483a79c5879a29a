"""Home Assistant discovery: opt-in, retained configs whose templates (rendered with Jinja2, as Home
Assistant does) read the right values from the agent's real state and telemetry messages."""

import json

import jinja2
import pytest

from agent import protocol

from mqttkit import RawClient, RunningAgent, wait_for

pytestmark = pytest.mark.integration


def _render(template: str, payload: bytes) -> str:
    env = jinja2.Environment()
    return env.from_string(template).render(value_json=json.loads(payload)).strip()


@pytest.fixture
def ha(broker, assets, tmp_path):
    raw = RawClient(broker.port)
    raw.subscribe("homeassistant/#")
    raw.subscribe("edgeward/v1/pi-ha/#")
    ra = RunningAgent({"mqtt.url": broker.url, "device.id": "pi-ha", "store.path": str(tmp_path / "store"),
                       "trust.keys": [str(assets.pub)], "memory.budget_mb": 2048, "memory.reserve_mb": 0,
                       "telemetry.interval_s": 0.3, "homeassistant.enabled": True}, install=[assets.v1])
    yield ra, raw
    ra.stop()
    raw.close()


def test_device_sensors_and_model_update_entity_are_discovered(ha, assets):
    ra, raw = ha
    msgs = wait_for(lambda: (lambda ms: ms if any("/update/" in m.topic for m in ms) else None)(
        raw.collect(lambda t: True, 1.0)), timeout=10, what="discovery configs")
    configs = {m.topic: json.loads(m.payload) for m in msgs if m.topic.startswith("homeassistant/") and m.payload}
    late = RawClient(raw.port)  # Home Assistant started later still finds every config (retained)
    late.subscribe("homeassistant/#")
    retained = {m.topic for m in late.collect(lambda t: True, 0.5) if m.retain}
    late.close()
    assert retained == set(configs)
    state = next(m.payload for m in reversed(msgs) if m.topic == protocol.state_topic("pi-ha"))
    telemetry = next(m.payload for m in reversed(msgs) if m.topic == protocol.telemetry_topic("pi-ha"))

    online = configs["homeassistant/binary_sensor/edgeward_pi_ha/online/config"]
    assert online["device_class"] == "connectivity" and _render(online["value_template"], state) == "ON"
    rss = configs["homeassistant/sensor/edgeward_pi_ha/rss/config"]
    assert rss["state_topic"] == protocol.telemetry_topic("pi-ha")
    assert float(_render(rss["value_template"], telemetry)) == json.loads(telemetry)["rss_mb"]
    update = configs["homeassistant/update/edgeward_pi_ha/model_digits/config"]
    assert json.loads(_render(update["value_template"], state)) == {"installed_version": "1", "title": "digits"}
    avail = update["availability"][0]
    assert _render(avail["value_template"], state) == "online"
    ids = {json.dumps(c["device"]["identifiers"]) for c in configs.values()}
    assert ids == {'["edgeward_pi_ha"]'}  # one device in Home Assistant
    assert len({c["unique_id"] for c in configs.values()}) == len(configs)


def test_the_update_entity_follows_a_deploy(ha, assets):
    """The discovered template, evaluated on the state after a deploy, reports the new version."""
    from agent.config import MqttConfig
    from agent.fleet import Fleet

    ra, raw = ha
    topic = "homeassistant/update/edgeward_pi_ha/model_digits/config"
    config = wait_for(lambda: [json.loads(m.payload) for m in raw.collect(lambda t: t == topic, 0.5)],
                      timeout=10, what="the update entity's config")[-1]
    with Fleet(MqttConfig(url=ra.cfg.mqtt.url)) as fleet:
        fleet.deploy(assets.v2, "pi-ha", chunk_size=8192)
    state = wait_for(lambda: [m.payload for m in raw.collect(lambda t: t == protocol.state_topic("pi-ha"), 0.5)
                              if any(x["version"] == 2 for x in json.loads(m.payload)["models"])],
                     timeout=10, what="state with v2")[-1]
    assert json.loads(_render(config["value_template"], state))["installed_version"] == "2"


def test_discovery_is_off_by_default(broker, assets, tmp_path):
    raw = RawClient(broker.port)
    raw.subscribe("homeassistant/#")
    ra = RunningAgent({"mqtt.url": broker.url, "device.id": "pi-quiet", "store.path": str(tmp_path / "s"),
                       "trust.keys": [str(assets.pub)], "memory.budget_mb": 2048, "memory.reserve_mb": 0},
                      install=[assets.v1])
    try:
        wait_for(ra.agent.connected.is_set)
        assert raw.collect(lambda t: t.startswith("homeassistant/"), 1.0) == []
    finally:
        ra.stop()
        raw.close()

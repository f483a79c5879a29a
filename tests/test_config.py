"""Configuration: typed, validated in one place, errors that name the key path; a file is optional."""

import pytest

from agent.config import AgentConfig, load_config
from agent.errors import ConfigError


def test_quick_start_needs_no_file(tmp_path, assets):
    cfg = load_config(None, {"mqtt.url": "mqtt://10.0.0.5:1884", "store.path": str(tmp_path),
                             "trust.keys": [str(assets.pub)], "device.id": "pi-07", "memory.budget_mb": 128})
    assert cfg.mqtt.host == "10.0.0.5" and cfg.mqtt.port == 1884 and not cfg.mqtt.uses_tls
    assert cfg.device_id == "pi-07" and cfg.memory.budget_mb == 128 and cfg.store.path == str(tmp_path)


def test_flags_override_the_file(tmp_path, assets):
    f = tmp_path / "agent.yaml"
    f.write_text(f"device:\n  id: from-file\nmemory:\n  budget_mb: 200\ntrust:\n  keys: [{assets.pub}]\n")
    cfg = load_config(f, {"memory.budget_mb": 300, "device.id": None})
    assert cfg.memory.budget_mb == 300
    assert cfg.device_id == "from-file"


@pytest.mark.parametrize("yaml_text, message", [
    ("mqtt:\n  keepalive_s: abc\n", "mqtt.keepalive_s: expected an integer, got 'abc'"),
    ("mqtt:\n  keepalive_s: 1\n", "mqtt.keepalive_s: must be >= 5"),
    ("memory:\n  budget_mb: true\n", "memory.budget_mb: expected an integer"),
    ("memroy:\n  budget_mb: 100\n", "memroy: unknown key; allowed:"),
    ("mqtt:\n  tls:\n    ca_fle: x\n", "mqtt.tls.ca_fle: unknown key"),
    ("log_level: loud\n", "log_level: must be one of"),
    ("device:\n  id: 'bad id/with slash'\n", "device.id:"),
    ("- just\n- a list\n", "top level must be a mapping"),
    ("mqtt: [unclosed\n", "not valid YAML"),
])
def test_bad_values_name_the_key(tmp_path, assets, yaml_text, message):
    f = tmp_path / "agent.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(f, {"trust.keys": [str(assets.pub)]})
    assert message in str(err.value)


def test_secure_defaults_refuse_to_start_without_trust(tmp_path):
    with pytest.raises(ConfigError, match="no trusted public key"):
        load_config(None, {"store.path": str(tmp_path)})
    cfg = load_config(None, {"store.path": str(tmp_path), "trust.allow_unsigned": True})
    assert cfg.trust.allow_unsigned is True
    assert AgentConfig().trust.allow_unsigned is False


def test_missing_files_and_bad_urls_are_caught_at_start(tmp_path, assets):
    with pytest.raises(ConfigError, match=r"trust.keys\[0\]: file .* does not exist"):
        load_config(None, {"trust.keys": [str(tmp_path / "nope.pub")]})
    with pytest.raises(ConfigError, match="is not a broker URL"):
        load_config(None, {"trust.keys": [str(assets.pub)], "mqtt.url": "http://broker:80"})
    with pytest.raises(ConfigError, match="mqtt.tls.ca_file"):
        load_config(None, {"trust.keys": [str(assets.pub)], "mqtt.tls.ca_file": str(tmp_path / "ca.pem")})


def test_tls_is_one_key_away(tmp_path, assets):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    cfg = load_config(None, {"trust.keys": [str(assets.pub)], "mqtt.url": "mqtts://broker.lan",
                             "mqtt.tls.ca_file": str(ca)})
    assert cfg.mqtt.uses_tls and cfg.mqtt.port == 8883 and cfg.mqtt.tls.ca_file == str(ca)

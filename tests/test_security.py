"""Against Mosquitto configured with TLS, passwords and the documented ACL (docs/mosquitto/edgeward.acl):
the agent and the fleet connect with one config key each, and one board cannot command or watch another."""

import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent import protocol
from agent.config import MqttConfig, TlsConfig
from agent.devbroker import LocalBroker
from agent.errors import FleetError
from agent.fleet import Fleet
from agent.link import request_properties

from mqttkit import RunningAgent, wait_for
from tlskit import ThrowawayCA

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
ACL = ROOT / "docs" / "mosquitto" / "edgeward.acl"
USERS = {"fleet": "fleet-secret", "pi-01": "pi-01-secret", "pi-02": "pi-02-secret"}


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    """A Mosquitto with TLS (server verified by our CA), a password file and the fleet ACL."""
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed")
    # mosquitto started as root drops to its own user before reading these: a world-readable folder
    folder = Path(tempfile.mkdtemp(prefix="edgeward-secure-"))
    os.chmod(folder, 0o755)
    acl = folder / "edgeward.acl"
    shutil.copy(ACL, acl)  # the documented template, as is
    ca = ThrowawayCA(folder / "pki")
    os.chmod(folder / "pki", 0o755)
    server = ca.issue("broker", server=True)
    passwd = folder / "passwd"
    for i, (user, password) in enumerate(USERS.items()):
        subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(passwd), user, password], check=True)
        (folder / f"{user}.password").write_text(password + "\n")
    os.chmod(passwd, 0o644)
    broker = LocalBroker(workdir=folder / "broker", anonymous=False,
                         listener_conf=f"cafile {ca.cert_path}\ncertfile {server.cert}\nkeyfile {server.key}\n"
                                       "require_certificate false",
                         extra_conf=f"password_file {passwd}\nacl_file {acl}").start()
    yield {"broker": broker, "ca": ca, "folder": folder, "url": f"mqtts://127.0.0.1:{broker.port}"}
    broker.stop()
    shutil.rmtree(folder, ignore_errors=True)


def _mqtt(secure, user, ca_file=None, **kw) -> MqttConfig:
    return MqttConfig(url=secure["url"], username=user, password_file=str(secure["folder"] / f"{user}.password"),
                      tls=TlsConfig(ca_file=str(ca_file or secure["ca"].cert_path)), **kw)


@pytest.fixture(scope="module")
def board(secure, assets, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    ra = RunningAgent({"mqtt.url": secure["url"], "mqtt.username": "pi-01",
                       "mqtt.password_file": str(secure["folder"] / "pi-01.password"),
                       "mqtt.tls.ca_file": str(secure["ca"].cert_path), "device.id": "pi-01",
                       "store.path": str(store), "trust.keys": [str(assets.pub)], "memory.budget_mb": 2048,
                       "memory.reserve_mb": 0, "telemetry.interval_s": 0.3}, install=[assets.v1])
    wait_for(ra.agent.connected.is_set, timeout=15, what="the agent's TLS connection")
    yield ra
    ra.stop()


def test_agent_and_fleet_work_over_tls_with_passwords(board, secure, assets):
    with Fleet(_mqtt(secure, "fleet")) as fleet:
        assert [s.device for s in fleet.devices() if s.online] == ["pi-01"]
        assert fleet.infer("pi-01", "digits", {"input": assets.eval_inputs(2)})["version"] == 1


def test_a_broker_certificate_from_another_ca_is_refused(secure, tmp_path):
    stranger = ThrowawayCA(tmp_path / "other", name="some other CA")
    with pytest.raises(FleetError):
        Fleet(_mqtt(secure, "fleet", ca_file=stranger.cert_path), connect_timeout=3)


def test_a_wrong_password_is_refused(secure, tmp_path):
    bad = tmp_path / "bad.password"
    bad.write_text("guess\n")
    cfg = MqttConfig(url=secure["url"], username="fleet", password_file=str(bad),
                     tls=TlsConfig(ca_file=str(secure["ca"].cert_path)))
    with pytest.raises(FleetError, match="did not accept"):
        Fleet(cfg, connect_timeout=3)


class Intruder:
    """Another board (pi-02, with valid credentials) trying to reach pi-01."""

    def __init__(self, secure):
        self.messages = []
        self.suback = None
        self.puback = None
        done = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pi-02-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv5)
        c.username_pw_set("pi-02", USERS["pi-02"])
        c.tls_set(ca_certs=str(secure["ca"].cert_path))
        c.on_connect = lambda *a: done.set()
        c.on_message = lambda cl, u, m: self.messages.append(m)
        c.on_subscribe = lambda cl, u, mid, codes, p: setattr(self, "suback", codes)
        c.on_publish = lambda cl, u, mid, rc, p: setattr(self, "puback", rc)
        c.connect("127.0.0.1", secure["broker"].port)
        c.loop_start()
        assert done.wait(5)
        self.client = c

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def test_a_board_cannot_read_another_boards_telemetry(board, secure):
    """Mosquitto grants the subscription but delivers nothing the ACL denies; the fleet user, in the
    same window, does receive pi-01's telemetry (so the silence is the ACL, not a quiet board)."""
    intruder = Intruder(secure)
    try:
        intruder.client.subscribe([(protocol.telemetry_topic("pi-01"), 1), (protocol.state_topic("pi-01"), 1),
                                   ("edgeward/v1/+/telemetry", 1)])
        wait_for(lambda: intruder.suback is not None, timeout=5, what="SUBACK")
        with Fleet(_mqtt(secure, "fleet")) as fleet:
            stop = threading.Event()
            threading.Timer(1.5, stop.set).start()
            seen = [kind for _, kind, _ in fleet.watch(stop, kinds=("telemetry",), device="pi-01")]
        assert len(seen) >= 2  # pi-01 publishes telemetry every 0.3 s
        assert intruder.messages == []
    finally:
        intruder.close()


def test_a_board_cannot_command_another_board(board, secure):
    requests_before = board.agent.engine.get("digits").stats.requests
    intruder = Intruder(secure)
    try:
        intruder.client.subscribe("edgeward/v1/pi-02/#", qos=1)
        info = intruder.client.publish(protocol.cmd_topic("pi-01", "ping"), protocol.encode(protocol.PingRequest()),
                                       qos=1, properties=request_properties("edgeward/v1/pi-02/replies", b"x"))
        info.wait_for_publish(5)
        wait_for(lambda: intruder.puback is not None, timeout=5, what="PUBACK")
        assert intruder.puback.is_failure, intruder.puback  # "not authorized"
        intruder.client.publish(protocol.infer_topic("pi-01", "digits"), b"EWF1", qos=1).wait_for_publish(5)
        threading.Event().wait(1.0)
        assert intruder.messages == []  # no answer came back
    finally:
        intruder.close()
    assert board.agent.engine.get("digits").stats.requests == requests_before


def test_client_certificates_are_one_key_away(secure, assets, tmp_path):
    """A listener that requires client certificates: the agent presents one with mqtt.tls.cert_file/key_file."""
    ca = secure["ca"]
    server = ca.issue("broker-mtls", server=True)  # written into the world-readable folder of `secure`
    client = ca.issue("pi-01-client")
    broker = LocalBroker(workdir=secure["folder"] / "mtls", anonymous=True,
                         listener_conf=f"cafile {ca.cert_path}\ncertfile {server.cert}\nkeyfile {server.key}\n"
                                       "require_certificate true").start()
    try:
        url = f"mqtts://127.0.0.1:{broker.port}"
        with pytest.raises(FleetError):  # no client certificate: refused
            Fleet(MqttConfig(url=url, tls=TlsConfig(ca_file=str(ca.cert_path))), connect_timeout=3)
        cfg = MqttConfig(url=url, tls=TlsConfig(ca_file=str(ca.cert_path), cert_file=str(client.cert),
                                                key_file=str(client.key)))
        with Fleet(cfg) as fleet:
            assert fleet.devices() == []
    finally:
        broker.stop()


def test_agent_check_proves_tls_and_credentials_and_names_what_is_wrong(secure, assets, tmp_path):
    """`edgeward agent check` connects with the agent's own settings, so a board can be checked before it runs."""
    from agent.check import FAIL, OK, run_checks
    from agent.config import load_config

    def broker_check(**overrides):
        cfg = load_config(None, {"mqtt.url": secure["url"], "mqtt.username": "pi-01",
                                 "mqtt.password_file": str(secure["folder"] / "pi-01.password"),
                                 "mqtt.tls.ca_file": str(secure["ca"].cert_path), "store.path": str(tmp_path),
                                 "trust.keys": [str(assets.pub)], **overrides}, check_files=False)
        (finding,) = [f for f in run_checks(cfg, broker_timeout_s=5) if f.check == "broker"]
        return finding

    good = broker_check()
    assert good.level == OK and "TLS" in good.detail
    bad = tmp_path / "bad.password"
    bad.write_text("guess\n")
    wrong_password = broker_check(**{"mqtt.password_file": str(bad)})
    assert wrong_password.level == FAIL and "refused the connection" in wrong_password.detail
    assert "mqtt.password_file" in wrong_password.fix
    stranger = ThrowawayCA(tmp_path / "other", name="some other CA")
    wrong_ca = broker_check(**{"mqtt.tls.ca_file": str(stranger.cert_path)})
    assert wrong_ca.level == FAIL and "certificate verify failed" in wrong_ca.detail

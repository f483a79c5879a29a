"""Test helpers for talking to a real broker: a running in-process agent and a raw MQTT client.

The raw client deliberately bypasses protocol.py so tests can send what a broken or
hostile client would: garbage, oversized frames, retained commands.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import load_config
from agent.daemon import Agent
from agent.link import request_properties
from agent.polling import wait_until


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    return wait_until(predicate, timeout, what, interval)


class RunningAgent:
    """An Agent started in this process with its main loop in a thread."""

    def __init__(self, overrides: dict, install=()):
        self.cfg = load_config(None, overrides)
        self.agent = Agent(self.cfg)
        self.agent.start(install=list(install))
        self.thread = threading.Thread(target=self.agent.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.agent.request_stop()
        self.thread.join(10)
        self.agent.stop()


def offline_agent(store, pub, device: str, install=()) -> tuple[RunningAgent, str]:
    """An agent with no reachable broker, serving `install` on its local API: (agent, socket path),
    once the socket is up and every bundle serves."""
    from agent.client import LocalClient

    ra = RunningAgent({"mqtt.url": "mqtt://127.0.0.1:9", "device.id": device, "store.path": str(store),
                       "trust.keys": [str(pub)], "memory.budget_mb": 4096, "memory.reserve_mb": 0},
                      install=install)
    sock = store / "agent.sock"
    try:
        wait_for(lambda: sock.exists(), what="local API socket")
        with LocalClient(str(sock)) as client:
            wait_for(lambda: len(client.models()) == len(install), what="the models")
    except BaseException:
        ra.stop()
        raise
    return ra, str(sock)


class RawClient:
    def __init__(self, url_port: int):
        self.port = url_port
        self.reply_topic = f"test/replies/{uuid.uuid4().hex[:8]}"
        self.messages: queue.Queue = queue.Queue()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{uuid.uuid4().hex[:8]}",
                                  protocol=paho.MQTTv5)
        connected = threading.Event()
        subscribed = threading.Event()
        self.client.on_connect = lambda *a: connected.set()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.connect("127.0.0.1", url_port)
        self.client.loop_start()
        assert connected.wait(5)
        self.client.subscribe(self.reply_topic, qos=1)
        assert subscribed.wait(5)

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(5)

    def request(self, topic: str, payload: bytes, timeout: float = 5.0, retain: bool = False):
        """Publish with a v5 response topic; return the reply's message or None if none came."""
        corr = uuid.uuid4().bytes
        self.client.publish(topic, payload, qos=1, retain=retain,
                            properties=request_properties(self.reply_topic, corr)).wait_for_publish(5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if msg.topic == self.reply_topic and getattr(msg.properties, "CorrelationData", None) == corr:
                return msg
        return None

    def publish(self, topic: str, payload: bytes, retain: bool = False, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(5)

    def collect(self, topic_filter, seconds: float) -> list:
        out, deadline = [], time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                m = self.messages.get(timeout=0.05)
            except queue.Empty:
                continue
            if topic_filter(m.topic):
                out.append(m)
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

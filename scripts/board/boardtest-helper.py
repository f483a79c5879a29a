"""Test-only helper inside the emulated board: runs a few whitelisted systemctl actions on request.

board-test.sh writes it into the run copy of the image (never into the image itself), so the
checks can wedge the agent, read its limits and stop it while talking to the board through
MQTT only. Requests: edgeward-boardtest/cmd/<action>; answers: edgeward-boardtest/reply.
"""

import json
import subprocess
import sys

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

UNIT = "edgeward-agent.service"
ACTIONS = {
    "show": [["systemctl", "show", UNIT, "-p", "ActiveState", "-p", "SubState", "-p", "Result", "-p", "MainPID",
              "-p", "NRestarts", "-p", "MemoryMax", "-p", "MemoryHigh", "-p", "DynamicUser", "-p", "WatchdogUSec"],
             ["sh", "-c", f"cat /sys/fs/cgroup/system.slice/{UNIT}/memory.max 2>/dev/null || echo none"],
             ["sh", "-c", f"ps -o user=,pid=,rss=,args= -p $(systemctl show -p MainPID --value {UNIT}) || true"]],
    "sigstop": [["systemctl", "kill", "--kill-whom=main", "-s", "SIGSTOP", UNIT]],
    "stop": [["systemctl", "stop", UNIT]],
    "journal": [["journalctl", "-u", UNIT, "-n", "80", "--no-pager", "-o", "short-monotonic"]],
}


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="edgeward-boardtest", protocol=paho.MQTTv5)
    client.will_set("edgeward-boardtest/hello", b"", qos=1, retain=True)

    def on_connect(c, u, flags, rc, props):
        c.subscribe("edgeward-boardtest/cmd/+", qos=1)
        c.publish("edgeward-boardtest/hello", b"up", qos=1, retain=True)

    def on_message(c, u, msg):
        action = msg.topic.rsplit("/", 1)[-1]
        if msg.retain or action not in ACTIONS:
            return
        out, rc = [], 0
        for cmd in ACTIONS[action]:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            rc = rc or r.returncode
            out.append(r.stdout + r.stderr)
        c.publish("edgeward-boardtest/reply", json.dumps({"action": action, "rc": rc, "out": "".join(out),
                                                         "outputs": out}), qos=1)

    client.on_connect, client.on_message = on_connect, on_message
    client.reconnect_delay_set(1, 5)
    client.connect_async(host, port)
    client.loop_forever(retry_first_connection=True)


if __name__ == "__main__":
    main()

"""docs/LOCAL_API.md's stand-alone client (standard library only) runs against a real agent
and gets what agent.client.LocalClient gets: the page describes the wire format as built."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from agent.client import LocalClient

from mqttkit import offline_agent

DOC = Path(__file__).resolve().parents[1] / "docs" / "LOCAL_API.md"


def _example() -> str:
    text = DOC.read_text()
    section = text[text.index("## A complete client in a page"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_documented_client_talks_to_a_real_agent(assets, tmp_path):
    code = _example()
    assert "import agent" not in code and "from agent" not in code  # the wire format alone
    ra, sock = offline_agent(tmp_path / "store", assets.pub, "pi-doc", [assets.v1])
    try:
        with LocalClient(sock) as client:
            (spec,) = [m for m in client.models() if m["name"] == "digits"][0]["inputs"]
            shape = [1 if d < 0 else d for d in spec["shape"]]
            logits = client.infer("digits", np.full(shape, 0.5, np.float32))["logits"]
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "EDGEWARD_SOCKET": str(sock), "EDGEWARD_MODEL": "digits"})
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == f"digits v1: logits [1, 10], largest at index {int(np.argmax(logits))}"
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "EDGEWARD_SOCKET": str(sock), "EDGEWARD_MODEL": "nope"})
        assert run.returncode == 1 and "no model named 'nope' is serving; these are: ['digits']" in run.stderr
    finally:
        ra.stop()

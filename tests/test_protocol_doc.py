"""docs/PROTOCOL.md is generated from the code that both ends use; it must never go stale."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gen_protocol_doc  # noqa: E402

from agent import protocol  # noqa: E402


def test_protocol_doc_matches_the_code():
    assert (ROOT / "docs" / "PROTOCOL.md").read_text() == gen_protocol_doc.render(), \
        "docs/PROTOCOL.md is stale: run scripts/gen_protocol_doc.py"


def test_every_command_and_topic_kind_is_documented():
    text = (ROOT / "docs" / "PROTOCOL.md").read_text()
    for verb, cls in protocol.COMMANDS.items():
        assert f"### {cls.__name__}" in text, verb
    for kind in ("state", "telemetry", "events", "cmd/<verb>", "upload/<sha256>", "infer/<model>"):
        assert f"edgeward/v1/<device>/{kind}`" in text, kind


def test_the_generator_runs_as_a_script(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protocol_doc.py")], capture_output=True, text=True)
    assert r.returncode == 0 and "PROTOCOL.md" in r.stdout

"""Receiving bundles: per-chunk hashes, resuming after a restart, and http(s) downloads.

The Transfer unit tests run against files and a real local HTTP server; the integration
tests drive a real agent through a real Mosquitto.
"""

import hashlib
import json
import os
import time

import pytest

from agent import protocol, wire
from agent.bundle import sha256_file
from agent.errors import DownloadError, FleetError, IntegrityError
from agent.transfer import Transfer, resume_all

from conftest import repack
from httpkit import BlobServer, CannedHttpServer
from mqttkit import RunningAgent, wait_for
from test_agent_mqtt import DEVICE, agent_overrides, fleet, raw, running  # noqa: F401  (fixtures)

DATA = os.urandom(10_000)
SHA = hashlib.sha256(DATA).hexdigest()


def _transfer(tmp_path, chunk=1024) -> Transfer:
    t = Transfer(SHA, len(DATA), chunk, tmp_path / f"{SHA}.part")
    t.open()
    return t


def _chunk(i, chunk=1024):
    return DATA[i * chunk:(i + 1) * chunk]


# ------------------------------------------------------------------ chunks and resume (unit)

def test_a_chunk_that_does_not_match_its_own_hash_is_not_written(tmp_path):
    t = _transfer(tmp_path)
    with pytest.raises(IntegrityError, match="chunk 3 hashes to"):
        t.add(3, 3072, b"\x00" * 1024, sha256=hashlib.sha256(_chunk(3)).hexdigest())
    assert 3 in t.missing()
    t.add(3, 3072, _chunk(3), sha256=hashlib.sha256(_chunk(3)).hexdigest())
    assert 3 not in t.missing()


def test_a_reloaded_transfer_keeps_what_arrived_and_drops_chunks_whose_bytes_were_lost(tmp_path):
    t = _transfer(tmp_path)
    for i in (0, 1, 2, 5, 9):
        t.add(i, i * 1024, _chunk(i), sha256=hashlib.sha256(_chunk(i)).hexdigest())
    t.save()
    with open(t.part_path, "r+b") as f:  # chunk 5's bytes never reached the disk (power cut)
        f.seek(5 * 1024)
        f.write(b"\x00" * 1024)
    again = Transfer.resume(t.part_path)
    assert sorted(again.received) == [0, 1, 2, 9]
    for i in again.missing():
        again.add(i, i * 1024, _chunk(i))
    assert again.finish().read_bytes() == DATA


def test_resume_all_cleans_up_what_cannot_be_resumed(tmp_path):
    keep = _transfer(tmp_path)
    keep.add(0, 0, _chunk(0))
    keep.save()
    (tmp_path / ("ab" * 32 + ".part")).write_bytes(b"no state beside it")
    (tmp_path / ("cd" * 32 + ".json")).write_text("{}")  # state without a part file
    old = Transfer("ef" * 32, 100, 1024, tmp_path / ("ef" * 32 + ".part"))
    old.open()
    week_ago = time.time() - 8 * 24 * 3600
    os.utime(old.state_path, (week_ago, week_ago))
    found = resume_all(tmp_path)
    assert list(found) == [SHA] and sorted(found[SHA].received) == [0]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([keep.part_path.name, keep.state_path.name])


# ------------------------------------------------------------------ http(s) downloads (unit, real HTTP server)

def test_a_dropped_download_resumes_with_a_range_request(tmp_path):
    with BlobServer(DATA, drop_after=4500, drops=2) as srv:
        t = _transfer(tmp_path)
        t.download(srv.url, lambda: False)
        assert t.finish().read_bytes() == DATA
    # each retry asked only for what was missing: from the first incomplete chunk on
    assert srv.ranges == ["bytes=0-", "bytes=4096-", "bytes=8192-"]


def test_a_server_that_ignores_range_still_gives_the_whole_file(tmp_path):
    with BlobServer(DATA, drop_after=3000, ignore_range=True) as srv:
        t = _transfer(tmp_path)
        t.download(srv.url, lambda: False)
        assert t.finish().read_bytes() == DATA


@pytest.mark.parametrize("path, error, fragment", [
    ("/missing.ewb", DownloadError, "HTTP 404"),
    ("/bundle.ewb", IntegrityError, "more than the 10000 bytes"),
])
def test_a_download_that_cannot_succeed_says_why_at_once(tmp_path, path, error, fragment):
    with BlobServer(DATA, extra=b"trailing junk") as srv:
        t = _transfer(tmp_path)
        started = time.monotonic()
        with pytest.raises(error, match=fragment):
            t.download(srv.url.replace("/bundle.ewb", path), lambda: False)
        assert time.monotonic() - started < 5  # no retry loop on errors that retrying cannot fix


def test_an_unreachable_server_fails_after_its_retries(tmp_path):
    t = _transfer(tmp_path)
    with pytest.raises(DownloadError, match="failed 3 times in a row"):
        t.download("http://127.0.0.1:9/bundle.ewb", lambda: False, attempts=3)


# ------------------------------------------------------------------ through the agent (integration)

def _deploy_request(raw, bundle, chunk_size, **extra):
    data = bundle.read_bytes()
    req = protocol.DeployRequest(bundle=protocol.BundleRef(sha256=sha256_file(bundle), size=len(data)),
                                 chunk_size=chunk_size, **extra)
    first = protocol.decode(protocol.Reply, raw.request(protocol.cmd_topic(DEVICE, "deploy"),
                                                        protocol.encode(req)).payload)
    return req, data, first


def _send(raw, req, data, indexes, corrupt=()):
    size = req.chunk_size
    for i in indexes:
        body = data[i * size:(i + 1) * size]
        header = {"v": 1, "index": i, "offset": i * size, "sha256": hashlib.sha256(body).hexdigest()}
        raw.publish(protocol.upload_topic(DEVICE, req.bundle.sha256),
                    wire.pack(header, b"\x00" * len(body) if i in corrupt else body))


@pytest.mark.integration
def test_a_transfer_resumes_after_the_agent_restarts(broker, assets, tmp_path, raw, fleet):
    overrides = agent_overrides(broker.url, assets, tmp_path / "store")
    ra = RunningAgent(overrides, install=[assets.v1])
    wait_for(ra.agent.connected.is_set, what="agent connected")
    req, data, first = _deploy_request(raw, assets.v2, 4096)
    n = first.data["n_chunks"]
    assert n > 4 and first.data["missing"] == list(range(n))
    half = list(range(0, n, 2))
    _send(raw, req, data, half)
    wait_for(lambda: len(ra.agent._transfers[req.bundle.sha256].received) == len(half), what="half the chunks")
    ra.stop()

    ra = RunningAgent(overrides)  # a new process would see the same store
    try:
        wait_for(ra.agent.connected.is_set, what="agent reconnected")
        _, _, again = _deploy_request(raw, assets.v2, 4096)
        assert again.status == "progress" and again.data["missing"] == [i for i in range(n) if i not in half]
        reply = fleet.deploy(assets.v2, DEVICE, chunk_size=4096)  # sends only the missing ones
        assert reply.data["version"] == 2
        assert list(ra.agent.store.incoming.iterdir()) == []
    finally:
        ra.stop()


@pytest.mark.integration
def test_a_damaged_chunk_is_asked_for_again(running, raw, assets):
    req, data, first = _deploy_request(raw, assets.v2, 4096)
    n = first.data["n_chunks"]
    corr_topic = raw.reply_topic  # later replies to the deploy come here too
    _send(raw, req, data, range(n), corrupt={2})
    replies = wait_for(lambda: [json.loads(m.payload) for m in raw.collect(lambda t: t == corr_topic, 0.2)],
                       what="the device asking for the damaged chunk")
    assert replies[0]["status"] == "progress" and replies[0]["data"]["missing"] == [2]
    _send(raw, req, data, [2])
    final = wait_for(lambda: [json.loads(m.payload) for m in raw.collect(lambda t: t == corr_topic, 0.2)
                              if json.loads(m.payload)["status"] != "progress"], what="final reply")
    assert final[0]["status"] == "ok" and final[0]["data"]["version"] == 2


@pytest.mark.integration
def test_a_deploy_from_a_url_downloads_resumes_and_switches(running, fleet, raw, assets):
    raw.subscribe(protocol.events_topic(DEVICE))
    with BlobServer(assets.v2.read_bytes(), drop_after=5000) as srv:
        reply = fleet.deploy(assets.v2, DEVICE, chunk_size=4096, url=srv.url)
    assert reply.data["version"] == 2 and reply.data["previous_version"] == 1
    assert srv.ranges[0] == "bytes=0-" and srv.ranges[1] == "bytes=4096-"
    kinds = [json.loads(m.payload)["kind"] for m in raw.collect(lambda t: t.endswith("/events"), 0.5)]
    assert "deploy_downloading" in kinds and kinds.index("deploy_received") < kinds.index("model_switched")
    assert fleet.infer(DEVICE, "digits", {"input": assets.eval_inputs(1)})["version"] == 2


@pytest.mark.integration
def test_a_url_serving_the_wrong_bytes_is_refused_and_the_old_model_keeps_serving(running, fleet, assets):
    with BlobServer(assets.v1.read_bytes()) as srv:  # the deploy names v2's sha256
        with pytest.raises(FleetError, match="hashes to"):
            fleet.deploy(assets.v2, DEVICE, chunk_size=4096, url=srv.url)
    assert fleet.infer(DEVICE, "digits", {"input": assets.eval_inputs(1)})["version"] == 1
    assert list(running.agent.store.incoming.iterdir()) == []


def _huge(m):
    m.memory.load_mb = 100_000.0


@pytest.mark.integration
def test_budget_and_version_are_checked_before_any_byte_moves(running, fleet, raw, assets, tmp_path):
    huge = repack(assets.v2, tmp_path / "huge.ewb", assets.key, manifest_edit=_huge)
    with pytest.raises(FleetError, match=r"refused digits v2: .*short by"):
        fleet.deploy(huge, DEVICE, chunk_size=4096)
    with pytest.raises(FleetError, match=r"refused digits v1: .*not newer"):
        fleet.deploy(assets.v1, DEVICE, chunk_size=4096)
    assert list(running.agent.store.incoming.iterdir()) == []  # nothing was even allocated
    # the hint is only a hint: a sender that leaves it out is still refused, after the download
    req, data, first = _deploy_request(raw, huge, 65536)
    assert first.status == "progress"
    _send(raw, req, data, first.data["missing"])
    wait_for(lambda: running.agent.last_update and running.agent.last_update["sha256"] == req.bundle.sha256,
             what="the install attempt")
    assert not running.agent.last_update["ok"] and "short by" in running.agent.last_update["error"]
    assert running.agent.store.versions("digits") == [1]


@pytest.mark.integration
def test_a_bundle_for_a_runtime_the_device_lacks_is_refused_before_any_byte_moves(running, fleet, assets,
                                                                                  monkeypatch):
    """A TFLite bundle sent to a board with only onnxruntime (or the other way round) would move
    every chunk and then fail to load: the device says so at once, naming what it has."""
    import agent.daemon

    monkeypatch.setattr(agent.daemon.runtimes, "available", lambda: ["tflite"])
    with pytest.raises(FleetError, match=r"refused digits v2: digits v2 needs the onnxruntime runtime, which this "
                                         r"device does not have \(it has: tflite\)"):
        fleet.deploy(assets.v2, DEVICE, chunk_size=4096)
    assert list(running.agent.store.incoming.iterdir()) == []
    assert running.agent.store.versions("digits") == [1]


@pytest.mark.integration
def test_the_fleet_sends_a_rejected_chunk_again(running, fleet, assets, monkeypatch):
    import agent.fleet

    real_pack, damaged = agent.fleet.wire.pack, []

    def pack_damaging_chunk_3_once(header, body):
        if header.get("index") == 3 and not damaged:
            damaged.append(3)
            body = bytes(len(body))  # the header keeps the true sha256: the device must notice
        return real_pack(header, body)

    monkeypatch.setattr(agent.fleet.wire, "pack", pack_damaging_chunk_3_once)
    reply = fleet.deploy(assets.v2, DEVICE, chunk_size=4096, timeout=30)
    assert damaged == [3] and reply.data["version"] == 2


def _http(status: str, body: bytes, **headers) -> bytes:
    head = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return f"HTTP/1.1 {status}\r\n{head}Connection: close\r\n\r\n".encode() + body


def test_a_server_speaking_broken_http_is_retried_and_then_refused_with_a_reason(tmp_path):
    """Bad status lines and bodies cut mid-chunk raise http.client's own errors, which are not OSErrors."""
    cut_chunked = _http("200 OK", b"2710\r\n" + DATA[:100], Transfer_Encoding="chunked")
    with CannedHttpServer([b"HELLO\r\n\r\n", cut_chunked, b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n"]) as srv:
        t = _transfer(tmp_path)
        with pytest.raises(DownloadError, match="failed 3 times in a row"):
            t.download(srv.url, lambda: False, attempts=3)
    assert len(srv.ranges) == 3


def test_a_range_answered_from_another_offset_is_not_written_at_the_wrong_place(tmp_path):
    t = _transfer(tmp_path)
    t.add(0, 0, _chunk(0))
    t.add(1, 1024, _chunk(1))
    from_start = _http("206 Partial Content", DATA, Content_Range=f"bytes 0-{len(DATA) - 1}/{len(DATA)}",
                       Content_Length=len(DATA))
    elsewhere = _http("206 Partial Content", DATA[4096:], Content_Range=f"bytes 4096-{len(DATA) - 1}/{len(DATA)}",
                      Content_Length=len(DATA) - 4096)
    with CannedHttpServer([elsewhere, from_start]) as srv:
        t.download(srv.url, lambda: False, attempts=3)
        assert t.finish().read_bytes() == DATA  # the bytes from 4096 were not taken for those from 2048
    assert srv.ranges == ["bytes=2048-", "bytes=2048-"]

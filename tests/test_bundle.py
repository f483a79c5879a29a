"""The bundle: signed, self-describing, and impossible to unpack outside its folder."""

import io
import json
import tarfile

import pytest

from agent.bundle import MANIFEST, extract, open_bundle
from agent.errors import BundleError, IntegrityError, SignatureError, UnsafeArchiveError
from agent.signing import generate_keypair, load_public_key

from conftest import flip_byte_in_member, repack


def test_signed_bundle_verifies_with_the_trusted_key(assets):
    opened = open_bundle(assets.v1, [load_public_key(assets.pub)])
    m = opened.manifest
    assert (m.name, m.version, m.format, m.precision, m.runtime) == ("digits", 1, "onnx", "int8", "onnxruntime")
    assert m.inputs[0].name == "input" and m.inputs[0].shape == [-1, 1, 8, 8] and m.inputs[0].batch_axis == 0
    assert set(m.files) == {"model.onnx", "reference.npz"}
    assert m.memory.load_mb > 0 and m.memory.runtime_mb > 0
    assert opened.signer is not None


def test_a_key_the_device_does_not_trust_is_refused(assets):
    with pytest.raises(SignatureError, match="does not verify"):
        open_bundle(assets.v1, [load_public_key(assets.other_pub)])


def test_unsigned_bundle_is_refused_unless_explicitly_allowed(assets):
    with pytest.raises(SignatureError, match="unsigned"):
        open_bundle(assets.unsigned_v2, [load_public_key(assets.pub)])
    assert open_bundle(assets.unsigned_v2, [], allow_unsigned=True).signer is None


def test_tampered_model_file_fails_its_hash(assets, tmp_path):
    bad = flip_byte_in_member(assets.v1, tmp_path / "bad.ewb", "model.onnx")
    with pytest.raises(IntegrityError, match="model.onnx: sha256 does not match"):
        open_bundle(bad, [load_public_key(assets.pub)])


def test_tampered_manifest_fails_its_signature(assets, tmp_path):
    bad = flip_byte_in_member(assets.v1, tmp_path / "bad.ewb", MANIFEST)
    with pytest.raises(BundleError):
        open_bundle(bad, [load_public_key(assets.pub)])


def test_manifest_re_signed_by_an_intruder_is_refused(assets, tmp_path):
    def raise_version(m):
        m.version = 99
    forged = repack(assets.v1, tmp_path / "forged.ewb", assets.other_key, manifest_edit=raise_version)
    with pytest.raises(SignatureError):
        open_bundle(forged, [load_public_key(assets.pub)])


def _evil_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name, target, kind):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.mark.parametrize("members, fragment", [
    ([_file("../evil.txt")], "not a plain file name"),
    ([_file("/etc/evil")], "not a plain file name"),
    ([_file("sub/dir.txt")], "not a plain file name"),
    ([_link("model.onnx", "/etc/passwd", tarfile.SYMTYPE)], "link"),
    ([_link("reference.npz", "../x", tarfile.LNKTYPE)], "link"),
    ([_file("model.onnx"), _file("model.onnx")], "appears twice"),
])
def test_archives_cannot_write_outside_their_folder(tmp_path, members, fragment):
    evil = _evil_tar(tmp_path / "evil.ewb", members)
    with pytest.raises(UnsafeArchiveError) as err:
        open_bundle(evil, allow_unsigned=True)
    assert fragment in str(err.value)
    assert not (tmp_path.parent / "evil.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.ewb"]


def test_oversized_members_are_refused_before_reading(assets):
    with pytest.raises(UnsafeArchiveError, match="over the"):
        open_bundle(assets.v1, [load_public_key(assets.pub)], max_bytes=4096)


def test_a_file_that_is_not_a_bundle_says_so(tmp_path):
    junk = tmp_path / "photo.ewb"
    junk.write_bytes(b"\x89PNG not a tar at all" * 10)
    with pytest.raises(BundleError, match="not an edgeward bundle"):
        open_bundle(junk, allow_unsigned=True)


def test_extract_writes_exactly_the_listed_files_and_refuses_to_overwrite(assets, tmp_path):
    opened = open_bundle(assets.v1, [load_public_key(assets.pub)])
    dest = extract(opened, tmp_path / "v1")
    assert sorted(p.name for p in dest.iterdir()) == ["manifest.json", "manifest.sig", "model.onnx", "reference.npz"]
    assert json.loads((dest / "manifest.json").read_text())["name"] == "digits"
    with pytest.raises(BundleError, match="already exists"):
        extract(opened, dest)
    assert [p.name for p in tmp_path.iterdir()] == ["v1"]  # no staging folders left behind


def test_key_generation_never_overwrites_and_keeps_the_private_key_private(tmp_path):
    private, public, kid = generate_keypair(tmp_path / "k")
    assert private.stat().st_mode & 0o777 == 0o600
    assert len(kid) == 16
    with pytest.raises(Exception, match="already exists"):
        generate_keypair(tmp_path / "k")

"""The bundle (.ewb): the one artifact that travels from workstation to board.

A bundle is a plain (uncompressed) POSIX tar holding flat, regular files only::

    manifest.json   what the model is, what it needs, what it costs, sha256+size of every file
    manifest.sig    ed25519 signature over the exact bytes of manifest.json
    model.onnx      (or model.tflite) the model itself
    reference.npz   reference inputs with the FP32 and quantized outputs: the board's self-test
                    (its keys and the 8-bit form of inputs: agent/reference.py)

Reading is defensive: the signature is checked before the manifest is trusted,
every member must be a flat regular file named in the manifest with a size under
the cap (checked before any byte is read), and extraction writes only into a fresh
folder, file by file through a temporary name, hashing as it goes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from .errors import BundleError, IntegrityError, UnsafeArchiveError
from .schema import SchemaError, from_dict, load_json, rule, to_dict
from .protocol import NAME_PATTERN, SHA256_PATTERN

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
REFERENCE = "reference.npz"
MANIFEST_SCHEMA = 1
MAX_MANIFEST_BYTES = 1 << 20
MEMBER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_BLOCK = 1 << 20


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list[int]                 # -1 marks a dynamic axis
    batch_axis: Optional[int] = None  # which axis is the batch, if any
    scale: Optional[float] = None     # for quantized model I/O
    zero_point: Optional[int] = None


@dataclass
class FileEntry:
    sha256: str = field(metadata=rule(pattern=SHA256_PATTERN))
    size: int = field(metadata=rule(min=0))


@dataclass
class MemoryCost:
    """Measured on the host in a fresh process: what loading and running the model costs."""
    load_mb: float = field(default=0.0, metadata=rule(min=0))     # RSS growth from load + first run
    runtime_mb: float = field(default=0.0, metadata=rule(min=0))  # RSS growth from importing the runtime
    measured_on: str = ""


@dataclass
class SelfTest:
    """How close the board's outputs on the reference inputs must come to the shipped ones."""
    atol: float = field(default=1e-3, metadata=rule(min=0))
    min_top1_agreement: float = field(default=1.0, metadata=rule(min=0, max=1))


@dataclass
class Manifest:
    name: str = field(metadata=rule(pattern=NAME_PATTERN))
    version: int = field(metadata=rule(min=1))
    format: Literal["onnx", "tflite"]
    model_file: str
    runtime: str                     # e.g. "onnxruntime"
    precision: str = "int8"
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    files: dict[str, FileEntry] = field(default_factory=dict)
    memory: MemoryCost = field(default_factory=MemoryCost)
    selftest: SelfTest = field(default_factory=SelfTest)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    sparsity: float = 0.0
    # recurrent state: input name -> the output that carries it to the next call (stateful streams)
    state: dict[str, str] = field(default_factory=dict)
    # audio context: input name -> how many samples of a stream's last input the worker puts in
    # front of the next one, along the last axis (windows that overlap, as Silero VAD's do)
    context: dict[str, int] = field(default_factory=dict)
    description: str = ""
    created: str = ""
    producer: str = ""
    schema: int = MANIFEST_SCHEMA

    def to_bytes(self) -> bytes:
        d = to_dict(self)
        for key in ("state", "context"):
            if not d[key]:
                del d[key]  # models without them stay readable by agents that predate them
        return json.dumps(d, indent=2, sort_keys=True).encode() + b"\n"


def parse_manifest(raw: bytes) -> Manifest:
    try:
        data = load_json(raw)
    except ValueError as exc:
        raise BundleError(f"manifest.json is not valid JSON ({exc})") from None
    if isinstance(data, dict) and data.get("schema", MANIFEST_SCHEMA) != MANIFEST_SCHEMA:
        raise BundleError(f"manifest schema {data.get('schema')!r} is not supported (this agent reads {MANIFEST_SCHEMA})",
                          "upgrade edgeward on the device")
    try:
        manifest = from_dict(Manifest, data)
    except SchemaError as exc:
        raise BundleError(f"manifest.json: {exc}") from exc
    _check_streams(manifest)
    names = [manifest.model_file, REFERENCE]
    for name in names + list(manifest.files):
        if not MEMBER_NAME.fullmatch(name) or name in (MANIFEST, SIGNATURE):
            raise UnsafeArchiveError(f"manifest names an unsafe file {name!r}")
    for name in names:
        if name not in manifest.files:
            raise BundleError(f"manifest does not list {name!r} under files")
    return manifest


def _check_streams(m: Manifest) -> None:
    """What a stateful model declares names its own inputs and outputs."""
    inputs, outputs = {s.name: s for s in m.inputs}, {s.name for s in m.outputs}
    for i, o in m.state.items():
        if i not in inputs or o not in outputs:
            raise BundleError(f"manifest.json: state {i!r} <- {o!r} names no input or output of the model")
    for name, samples in m.context.items():
        if not m.state:
            raise BundleError("manifest.json: context is carried on a stateful model's streams; it declares no state")
        if name not in inputs or name in m.state or not isinstance(samples, int) or samples < 1 \
                or not inputs[name].shape or 0 < inputs[name].shape[-1] <= samples:
            raise BundleError(f"manifest.json: context {name!r}: {samples!r} is not a number of samples of an input")


# ---------------------------------------------------------------- writing

def write_bundle(out_path: str | os.PathLike, manifest: Manifest, files: dict[str, str | os.PathLike],
                 signing_key=None, compress: str | None = None) -> Path:
    """Hash `files` into the manifest, sign it, and write the bundle atomically (temp + rename).
    `compress="xz"` compresses the archive (worth it for pruned models: their zeros vanish)."""
    if compress not in (None, "xz"):
        raise BundleError(f"unknown bundle compression {compress!r}", "use xz or none")
    from . import signing

    out_path = Path(out_path)
    manifest.files = {}
    for name, path in files.items():
        if not MEMBER_NAME.fullmatch(name):
            raise BundleError(f"cannot pack file named {name!r}")
        manifest.files[name] = FileEntry(sha256=sha256_file(path), size=os.path.getsize(path))
    manifest_bytes = manifest.to_bytes()
    parse_manifest(manifest_bytes)  # what we write must be what we would accept
    sig_bytes = None
    if signing_key is not None:
        sig_bytes = json.dumps(signing.sign(signing_key, manifest_bytes)).encode()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:xz" if compress else "w",
                                                      format=tarfile.PAX_FORMAT,
                                                      **({"preset": 6} if compress else {})) as tar:
            _add_bytes(tar, MANIFEST, manifest_bytes)
            if sig_bytes is not None:
                _add_bytes(tar, SIGNATURE, sig_bytes)
            for name, path in files.items():
                info = _member(name, os.path.getsize(path))
                with open(path, "rb") as f:
                    tar.addfile(info, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.type = size, 0o644, 0, tarfile.REGTYPE
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_member(name, len(data)), io.BytesIO(data))


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_BLOCK):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- reading

@dataclass
class OpenedBundle:
    path: Path
    manifest: Manifest
    manifest_bytes: bytes
    signature: Optional[dict]
    signer: Optional[str] = None  # key id that verified, None if unsigned (and allowed)


MAX_MEMBERS = 16


def _members(tar: tarfile.TarFile, max_member_bytes: int) -> dict[str, tarfile.TarInfo]:
    """Every member must be a flat regular file with a safe name, once, under the size cap.

    Checked as the archive is read, so a compressed bundle cannot make the board unpack more
    than MAX_MEMBERS members or more than twice the cap in all before it is refused."""
    members: dict[str, tarfile.TarInfo] = {}
    total = 0
    for info in tar:
        name = info.name
        if not MEMBER_NAME.fullmatch(name):
            raise UnsafeArchiveError(f"bundle member {name!r} is not a plain file name (paths and '..' are refused)")
        if not info.isreg():
            raise UnsafeArchiveError(f"bundle member {name!r} is a link or special file; only regular files are allowed")
        if name in members:
            raise UnsafeArchiveError(f"bundle member {name!r} appears twice")
        if info.size > max_member_bytes:
            raise UnsafeArchiveError(f"bundle member {name!r} is {info.size} bytes, over the {max_member_bytes}-byte cap")
        total += info.size
        if len(members) >= MAX_MEMBERS or total > 2 * max_member_bytes:
            raise UnsafeArchiveError(f"bundle unpacks to more than {MAX_MEMBERS} files or {2 * max_member_bytes} bytes")
        members[name] = info
    return members


def _archive_errors() -> tuple:
    """What reading a damaged archive raises: tarfile's errors, a short read, an I/O error and,
    for xz bundles, lzma's (imported by tarfile only when it opens one)."""
    lzma = sys.modules.get("lzma")
    return (tarfile.TarError, EOFError, OSError) + ((lzma.LZMAError,) if lzma else ())


def _read_mode(path: Path) -> str:
    """Plain tar, or tar compressed with xz (bundles of pruned models); nothing else is read."""
    with open(path, "rb") as f:
        magic = f.read(6)
    return "r:xz" if magic == b"\xfd7zXZ\x00" else "r:"


def open_bundle(path: str | os.PathLike, trusted_keys: list | None = None, allow_unsigned: bool = False,
                max_bytes: int = 512 << 20, verify_files: bool = True, verify_signature: bool = True) -> OpenedBundle:
    """Open, check the signature, then check every file's size and sha256 against the manifest.

    `verify_signature=False` is for the workstation side only (inspecting or sending a bundle
    whose signature the board will judge); the agent always verifies.
    """
    from . import signing

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BundleError(f"cannot read bundle {path}: {exc.strerror}") from exc
    if size > max_bytes:
        raise UnsafeArchiveError(f"bundle is {size} bytes, over the {max_bytes}-byte cap",
                                 "raise store.max_bundle_mb if this model is expected to be that large")
    try:
        tar = tarfile.open(path, mode=_read_mode(path))
    except _archive_errors() as exc:
        raise BundleError(f"{path} is not an edgeward bundle (not a tar archive: {exc})",
                          "make bundles with `edgeward convert`") from exc
    try:
        with tar:
            members = _members(tar, max_bytes)
            if MANIFEST not in members:
                raise BundleError(f"{path} has no manifest.json", "make bundles with `edgeward convert`")
            if members[MANIFEST].size > MAX_MANIFEST_BYTES:
                raise UnsafeArchiveError("manifest.json is larger than 1 MiB")
            manifest_bytes = tar.extractfile(members[MANIFEST]).read()
            signature = None
            if SIGNATURE in members:
                if members[SIGNATURE].size > 4096:
                    raise UnsafeArchiveError("manifest.sig is larger than 4 KiB")
                try:
                    signature = load_json(tar.extractfile(members[SIGNATURE]).read())
                except ValueError as exc:
                    raise BundleError(f"manifest.sig is not valid JSON ({exc})") from None
            signer = None
            if verify_signature:
                signer = signing.verify(signature, manifest_bytes, trusted_keys or [], allow_unsigned)
            manifest = parse_manifest(manifest_bytes)
            extra = set(members) - set(manifest.files) - {MANIFEST, SIGNATURE}
            if extra:
                raise IntegrityError(f"bundle holds files the manifest does not list: {sorted(extra)}")
            for name, entry in manifest.files.items():
                info = members.get(name)
                if info is None:
                    raise IntegrityError(f"bundle is missing {name!r}, which the manifest lists")
                if info.size != entry.size:
                    raise IntegrityError(f"{name}: {info.size} bytes, the manifest says {entry.size}")
                if verify_files:
                    h = hashlib.sha256()
                    src = tar.extractfile(info)
                    while chunk := src.read(_BLOCK):
                        h.update(chunk)
                    if h.hexdigest() != entry.sha256:
                        raise IntegrityError(f"{name}: sha256 does not match the manifest (file altered or corrupt)",
                                             "rebuild the bundle or fetch it again")
    except _archive_errors() as exc:  # a damaged or truncated archive, or a read error on disk
        raise BundleError(f"{path} is damaged: {exc or type(exc).__name__}",
                          "fetch or copy the bundle again") from exc
    return OpenedBundle(path, manifest, manifest_bytes, signature, signer)


def extract(bundle: OpenedBundle, dest: str | os.PathLike) -> Path:
    """Write the bundle's files into `dest`, which must not exist yet; nothing is written elsewhere.

    Files go to a hidden sibling folder first and the folder is renamed into place at
    the end, so `dest` either holds the whole verified bundle or does not exist.
    """
    dest = Path(dest)
    if dest.exists():
        raise BundleError(f"{dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with tarfile.open(bundle.path, mode=_read_mode(bundle.path)) as tar:
            members = _members(tar, max(e.size for e in bundle.manifest.files.values()) + MAX_MANIFEST_BYTES)
            (staging / MANIFEST).write_bytes(bundle.manifest_bytes)
            if bundle.signature is not None:
                (staging / SIGNATURE).write_text(json.dumps(bundle.signature))
            for name, entry in bundle.manifest.files.items():
                target = staging / name  # name already matched MEMBER_NAME: flat, no separators
                h = hashlib.sha256()
                src = tar.extractfile(members[name])
                with open(target, "xb") as out:
                    while chunk := src.read(_BLOCK):
                        h.update(chunk)
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                if h.hexdigest() != entry.sha256:
                    raise IntegrityError(f"{name}: sha256 changed while extracting")
        os.rename(staging, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def read_installed_manifest(folder: str | os.PathLike) -> Manifest:
    return parse_manifest((Path(folder) / MANIFEST).read_bytes())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

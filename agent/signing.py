"""Ed25519 keys and signatures over bundle manifests.

The workstation holds the private key; each board trusts a list of public keys.
Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public), readable by openssl.

Verifying needs `cryptography`, whose import costs the process ~6 MB of RSS that Python
never gives back. The daemon verifies once per deploy but lives for months, so where
`cryptography` is not imported yet, `verify` runs the check in a short-lived child
process (`python -m agent.signing`, ~0.2 s) and the daemon stays at its idle size. A
child that cannot run, or answers anything but a verdict, fails the check.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from .errors import EdgewardError, SignatureError

if TYPE_CHECKING:  # pragma: no cover
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# DER header of an Ed25519 SubjectPublicKeyInfo; the 32 raw key bytes follow it
_SPKI_ED25519 = bytes.fromhex("302a300506032b6570032100")


def _raw_id(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


class PublicKey:
    """A trusted Ed25519 public key, kept as its 32 raw bytes (parsed without cryptography)."""

    def __init__(self, raw: bytes):
        self.raw = raw
        self.key_id = _raw_id(raw)


def _signer_here(sig: bytes, data: bytes, raws: list[bytes]) -> int | None:
    """Index of the first raw public key that `sig` verifies `data` against, or None."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    for i, raw in enumerate(raws):
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(sig, data)
            return i
        except (InvalidSignature, ValueError):
            continue
    return None


def _signer(sig: bytes, data: bytes, raws: list[bytes]) -> int | None:
    """`_signer_here`, in a child process unless this one has cryptography loaded already."""
    if "cryptography" in sys.modules:
        return _signer_here(sig, data, raws)
    from .modelproc import own_interpreter

    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    request = json.dumps({"sig": b64(sig), "data": b64(data), "keys": [b64(r) for r in raws]})
    try:
        r = subprocess.run([sys.executable, "-m", "agent.signing"], executable=own_interpreter(), input=request,
                           capture_output=True, text=True, timeout=60, close_fds=True)
        if r.returncode != 0:
            raise OSError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit status {r.returncode}")
        index = json.loads(r.stdout)["signer"]
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"cannot check the bundle's signature: the checking process failed ({exc})",
                             "check that the cryptography package is installed for the agent's Python") from None
    if index is not None and not (isinstance(index, int) and 0 <= index < len(raws)):
        raise SignatureError("cannot check the bundle's signature: the checking process gave no verdict")
    return index


def _check_main() -> int:
    """The child of `_signer`: a request on stdin, {"signer": index or null} on stdout."""
    req = json.loads(sys.stdin.read())
    raws = [base64.b64decode(k) for k in req["keys"]]
    signer = _signer_here(base64.b64decode(req["sig"]), base64.b64decode(req["data"]), raws)
    print(json.dumps({"signer": signer}))
    return 0


def key_id(public) -> str:
    """A short stable name for a public key: the first 16 hex digits of sha256(raw key)."""
    if isinstance(public, PublicKey):
        return public.key_id
    from cryptography.hazmat.primitives import serialization

    return _raw_id(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def generate_keypair(private_path: str | os.PathLike) -> tuple[Path, Path, str]:
    """Write NAME.key (mode 0600) and NAME.pub; refuses to overwrite an existing key."""
    private_path = Path(private_path)
    if private_path.suffix != ".key":
        private_path = private_path.with_name(private_path.name + ".key")
    public_path = private_path.with_suffix(".pub")
    for p in (private_path, public_path):
        if p.exists():
            raise EdgewardError(f"{p} already exists", "choose another name or remove the old key first")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path, key_id(key.public_key())


def load_private_key(path: str | os.PathLike) -> "Ed25519PrivateKey":
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"cannot read signing key {path}: {exc}",
                             "pass a .key file made by `edgeward keys gen`") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key", "make one with `edgeward keys gen`")
    return key


def load_public_key(path: str | os.PathLike) -> PublicKey:
    """Read a PEM public key made by `edgeward keys gen` (parsed here, without cryptography)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SignatureError(f"cannot read public key {path}: {getattr(exc, 'strerror', None) or exc}",
                             "pass the .pub file made by `edgeward keys gen`") from exc
    begin, end = "-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"
    try:
        body = text[text.index(begin) + len(begin):text.index(end)]
        der = base64.b64decode("".join(body.split()), validate=True)
    except ValueError:
        raise SignatureError(f"cannot read public key {path}: not a PEM public key",
                             "pass the .pub file made by `edgeward keys gen`") from None
    if len(der) != len(_SPKI_ED25519) + 32 or not der.startswith(_SPKI_ED25519):
        raise SignatureError(f"{path} is not an Ed25519 public key")
    return PublicKey(der[len(_SPKI_ED25519):])


def sign(key: "Ed25519PrivateKey", data: bytes) -> dict:
    return {"alg": "ed25519", "key_id": key_id(key.public_key()),
            "sig": base64.b64encode(key.sign(data)).decode()}


def verify(signature: dict | None, data: bytes, trusted: list[PublicKey], allow_unsigned: bool) -> str | None:
    """Return the key id that signed `data`, or None for an allowed unsigned bundle."""
    if signature is None:
        if allow_unsigned:
            return None
        raise SignatureError("bundle is unsigned and this device only accepts signed bundles",
                             "sign it with `edgeward convert --key` (or set trust.allow_unsigned for development)")
    if not isinstance(signature, dict) or signature.get("alg") != "ed25519":
        raise SignatureError("bundle signature is not an ed25519 signature")
    try:
        sig = base64.b64decode(str(signature.get("sig", "")), validate=True)
    except ValueError as exc:
        raise SignatureError("bundle signature is not valid base64") from exc
    signer = _signer(sig, data, [k.raw for k in trusted]) if trusted else None
    if signer is not None:
        return trusted[signer].key_id
    kid = signature.get("key_id", "?")
    if not trusted:
        raise SignatureError(f"bundle is signed by key {kid} but this device trusts no key",
                             "add the signer's .pub file to trust.keys")
    raise SignatureError(f"bundle signature (key {kid}) does not verify against the {len(trusted)} trusted key(s)",
                         "the bundle was altered or signed by another key: re-sign it or trust that key")


if __name__ == "__main__":
    sys.exit(_check_main())

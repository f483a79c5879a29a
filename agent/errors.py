"""The one exception hierarchy of edgeward.

Every error a user can meet says what went wrong *and* how to fix it, in one line,
so the CLI can print it as is and the agent can send it back over MQTT unchanged.
"""

from __future__ import annotations

import re


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception message (or its type): enough for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_ORT_NODE = re.compile(r"while running (\w+) node\. Name:'([^']*)' Status Message: (.*)")
_ORT_SOURCE = re.compile(r"^\S+\.(?:h|cc|cpp):\d+ .*? (?:was false|failed)\.\s*")


def runtime_message(exc: BaseException) -> str:
    """A runtime's failure as one readable line. onnxruntime puts its details on lines of their
    own, and a failing node's name behind a status code and a C++ source location ("... while
    running Reshape node. Name:'/r' Status Message: /onnxruntime_src/.../reshape_helper.h:91
    ...ReshapeHelper(...) input_shape_size == requested_shape_size was false. The input tensor
    cannot be reshaped ..."): keep the node and the sentences meant for people."""
    text = " ".join(str(exc).split())
    if not text.startswith("[ONNXRuntimeError]"):
        return first_line(exc)
    text = _ORT_PREFIX.sub("", text)  # its details (which index, what it got) are on the lines below
    node = _ORT_NODE.search(text)
    if node is not None:
        op, name, status = node.groups()
        text = f"{op} node {name!r}: {_ORT_SOURCE.sub('', status).strip() or status}"
    return text if len(text) <= 400 else text[:399] + "…"


class EdgewardError(Exception):
    """Base of all edgeward errors. `code` is a stable, machine-readable name."""

    code = "error"

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(f"{message}: {fix}" if fix else message)


class ConfigError(EdgewardError):
    """A configuration value is missing, of the wrong type or out of range."""

    code = "bad_config"


class ProtocolError(EdgewardError):
    """A message received over the network is malformed, oversized or of an unknown version."""

    code = "bad_message"


class BundleError(EdgewardError):
    """A bundle cannot be read or does not describe a usable model."""

    code = "bad_bundle"


class IntegrityError(BundleError):
    """A file's bytes do not match the hash or size the manifest declares."""

    code = "integrity"


class SignatureError(BundleError):
    """The bundle is unsigned, or signed by a key this device does not trust."""

    code = "signature"


class UnsafeArchiveError(BundleError):
    """The archive tries to write outside its folder, holds links, or is too large."""

    code = "unsafe_archive"


class VersionError(BundleError):
    """The bundle's version is not newer than the one installed (anti-rollback)."""

    code = "version"


class BudgetError(EdgewardError):
    """Loading the model would cross the RAM budget."""

    code = "over_budget"


class ModelNotFound(EdgewardError):
    code = "unknown_model"


class InferenceError(EdgewardError):
    """A request cannot be run: wrong shape, dtype, size, or the runtime failed."""

    code = "bad_request"


class ImageError(EdgewardError):
    """An image file cannot be read, or its preprocessing spec is invalid or does not fit the model."""

    code = "bad_image"


class SelfTestError(EdgewardError):
    """The model does not reproduce its reference outputs on this device."""

    code = "self_test_failed"


class RuntimeMissing(EdgewardError):
    """The runtime a model needs is not installed on this device."""

    code = "runtime_missing"


class ConversionError(EdgewardError):
    """The converter cannot turn this input into a working quantized model."""

    code = "conversion"


class FleetError(EdgewardError):
    """A fleet command could not be completed (no answer, device offline, refusal)."""

    code = "fleet"


class DownloadError(EdgewardError):
    """A bundle's bytes could not be fetched (server unreachable, wrong URL, agent stopping)."""

    code = "download"


class DeployRefused(EdgewardError):
    """A device refuses a deploy before downloading it: too large, no disk, or bad transfer settings."""

    code = "refused"


class BusyError(EdgewardError):
    """Too many requests are waiting: the agent pushes back instead of growing; retry later."""

    code = "busy"


class WorkerCrashed(InferenceError):
    """The model's worker process died or hung (a runtime crash, or killed for memory); a fresh one is started."""

    code = "model_crashed"


class CallerGone(InferenceError):
    """The caller closed its connection before its request ran: the request was dropped, unanswered."""

    code = "caller_gone"


def _by_code() -> dict[str, type[EdgewardError]]:
    out: dict[str, type[EdgewardError]] = {}
    todo: list[type[EdgewardError]] = [EdgewardError]
    while todo:
        cls = todo.pop(0)
        out.setdefault(cls.code, cls)
        todo.extend(cls.__subclasses__())
    return out


_BY_CODE = _by_code()


def error_class(code) -> type[EdgewardError]:
    """The exception class of an error code that came from another process (a model's worker,
    the agent's socket), so the caller catches it as if it had been raised in its own."""
    return _BY_CODE.get(code, EdgewardError) if isinstance(code, str) else EdgewardError

"""Stateful streams: per-stream recurrent state for models that carry it between calls.

A model declares its state in the manifest (`state: {input: output}`), as voice activity
detection and keyword spotting models do with an RNN's hidden state. Callers name a
stream; the model's worker feeds the stream's last state (zeros at first) with each
request and keeps the state the model returns. Streams are independent, calls on one
stream run in order, and results do not depend on how a caller chunks its input. A call
without a stream id runs from a zero state and keeps nothing. The least recently used
streams are forgotten beyond `max_streams`.

The state lives in the worker, next to the runtime: requests through the agent's socket,
its MQTT pipelines and local apps on the worker's own socket all reach the same streams,
and a local app's call is one hop. A worker that is restarted after a crash starts every
stream over from zero.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

from .errors import ProtocolError
from .tensors import Tensor, concat, split, zeros

MAX_STREAM_ID = 256  # characters: a stream id is a caller's name for one microphone, camera, ...


def stream_id(value) -> str | None:
    """A request's stream id, checked: None, or a string of 1 to MAX_STREAM_ID characters."""
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_STREAM_ID:
        raise ProtocolError(f"stream must be a string of 1 to {MAX_STREAM_ID} characters",
                            "name the stream, e.g. \"mic-0\"")
    return value


def no_stream_state(model: str | None = None) -> ProtocolError:
    """The error for a stream id sent to a model that keeps no state, on every path."""
    return ProtocolError(f"model {model!r} keeps no stream state" if model else "this model keeps no stream state",
                         "leave out the stream id")


def runs_row_by_row(request_specs: list, state_specs: list) -> bool:
    """Whether a stateful model takes one sample per call: its state has a per-row axis (a dynamic
    one, as Silero VAD's [2, batch, 128]) or its input's first axis is fixed at 1. Requests to such
    a model may still hold several samples: the worker runs them one at a time, in order, each on
    the state the one before left. A model whose first axis is time (frames [T, 1, F], a state
    of fixed shape) takes the whole request in one call, which gives the same result."""
    first = request_specs[0].shape if request_specs else []
    return any(-1 in s.shape for s in state_specs) or (bool(first) and first[0] == 1)


def with_context(feeds: list[Tensor], context: dict[str, int], tails: dict) -> list[Tensor]:
    """The request's rows as the model's windows: each row of a context input gets the last
    `k` samples of the window before it in front, along the last axis (the stream's last
    window's for the first row, zeros for a new stream), as Silero VAD's own wrapper builds
    them. `tails` moves on to this request's last window."""
    if not context:
        return feeds
    import numpy as np

    from .tensors import from_numpy

    out = []
    for t in feeds:
        k = context.get(t.name)
        if k is None:
            out.append(t)
            continue
        x = np.frombuffer(t.data, dtype=t.dtype).reshape(t.shape)
        if not x.ndim or not len(x):
            out.append(t)  # nothing to put a context in front of: the model's own check answers
            continue
        prev = tails.get(t.name)
        if prev is None or prev.shape != (*x.shape[1:-1], k):
            prev = np.zeros((*x.shape[1:-1], k), x.dtype)
        windows = []
        for row in x:
            windows.append(np.concatenate([prev, row], axis=-1))
            prev = windows[-1][..., -k:]
        tails[t.name] = prev
        out.append(from_numpy(t.name, np.stack(windows)))
    return out


class _Stream:
    def __init__(self, state: list[Tensor]):
        self.lock = threading.Lock()
        self.state = state
        self.tails: dict = {}  # input name -> the last samples of its last window (context)


class Streams:
    def __init__(self, state: dict[str, str], specs: list, execute: Callable[[list[Tensor]], list[Tensor]],
                 max_streams: int, by_row: bool = False, context: dict[str, int] | None = None):
        """`state`: input name -> the output that carries it to the next call; `specs`: the
        state inputs' specs (name, dtype, shape), whose zeros start a stream; `by_row`: the
        model takes one sample per call (runs_row_by_row); `context`: input name -> how many
        samples of each window go in front of the next one (with_context)."""
        self._execute = execute
        self._max = max_streams
        self._by_row = by_row
        self._context = context or {}
        self._input_of = {o: i for i, o in state.items()}  # output -> input
        self._initial = [zeros(s.name, s.dtype, s.shape) for s in specs if s.name in state]
        self._streams: OrderedDict[str, _Stream] = OrderedDict()
        self._lock = threading.Lock()

    def _get(self, stream_id: str) -> _Stream:
        with self._lock:
            s = self._streams.get(stream_id)
            if s is None:
                s = self._streams[stream_id] = _Stream(list(self._initial))
                while len(self._streams) > self._max:
                    self._streams.popitem(last=False)
            else:
                self._streams.move_to_end(stream_id)
            return s

    def run(self, stream_id: str | None, feeds: list[Tensor]) -> list[Tensor]:
        if stream_id is None:
            return self._steps(with_context(feeds, self._context, {}), self._initial)[0]
        s = self._get(stream_id)
        with s.lock:  # a request that fails leaves its stream as it was
            tails = dict(s.tails)
            out, state = self._steps(with_context(feeds, self._context, tails), s.state)
            s.state, s.tails = state, tails
        return out

    def _steps(self, feeds: list[Tensor], state: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """(the caller's outputs, the state after): the request on `state`, in one call, or a
        row at a time for a model that takes one sample per call."""
        rows = feeds[0].rows if feeds and feeds[0].shape else 1
        parts = [feeds] if not self._by_row or rows == 1 else \
            list(zip(*[split(t, [1] * rows) if t.shape else [t] * rows for t in feeds]))
        replies = []
        for part in parts:
            out = self._execute(list(part) + state)
            state = [Tensor(self._input_of[t.name], t.dtype, t.shape, bytes(t.data))
                     for t in out if t.name in self._input_of]
            replies.append([t for t in out if t.name not in self._input_of])
        if len(replies) == 1:
            return replies[0], state
        return [concat([r[i] for r in replies]) for i in range(len(replies[0]))], state

    def reset(self, stream_id: str) -> bool:
        with self._lock:
            return self._streams.pop(stream_id, None) is not None

    def __len__(self) -> int:
        return len(self._streams)

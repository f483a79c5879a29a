"""Converting a model that carries recurrent state from one call to the next (`--state IN=OUT`).

Voice activity detection and keyword spotting models take their last hidden state as an
input and return the next one as an output; on the board the model's worker keeps it per
stream (agent/streams.py). On the host the converter treats the calibration and evaluation
samples as one stream, in order: each sample runs alone, fed the state the model returned
for the sample before it (zeros at first). So the quantizer calibrates on the states the
model really reaches, and quality is measured as the board will run it.
"""

from __future__ import annotations

import numpy as np

from agent.bundle import TensorSpec
from agent.errors import ConversionError, runtime_message


def parse_pairs(pairs: list[str], flag: str, example: str) -> dict[str, str]:
    """NAME=VALUE pairs from a repeatable command-line flag."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value:
            raise ConversionError(f"{flag} {pair!r}: expected NAME=VALUE", f"e.g. {flag} {example}")
        if name in out:
            raise ConversionError(f"{flag} names {name!r} twice")
        out[name] = value
    return out


def check_state(state: dict[str, str], inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    """Each state input exists, is fed by an output of the same dtype and shape, and one request
    input is left for callers to send."""
    ins, outs = {s.name: s for s in inputs}, {s.name: s for s in outputs}
    for i, o in state.items():
        if i not in ins:
            raise ConversionError(f"--state {i}={o}: the model has no input {i!r}",
                                  f"name one of its inputs: {', '.join(ins)}")
        if o not in outs:
            raise ConversionError(f"--state {i}={o}: the model has no output {o!r}",
                                  f"name one of its outputs: {', '.join(outs)}")
        a, b = ins[i], outs[o]
        if a.dtype != b.dtype:
            raise ConversionError(f"--state {i}={o}: input {i!r} is {a.dtype} but output {o!r} is {b.dtype}",
                                  "pair each state input with the output that returns it")
        static = -1 not in a.shape and -1 not in b.shape
        if static and a.shape != b.shape:
            raise ConversionError(f"--state {i}={o}: input {i!r} is {a.shape} but output {o!r} is {b.shape}",
                                  "pair each state input with the output that returns it")
    if len(set(state.values())) != len(state):
        raise ConversionError("--state names one output for two inputs")
    if not [s for s in inputs if s.name not in state]:
        raise ConversionError("--state takes every input of the model: callers would have nothing to send",
                              "declare only the recurrent inputs as state")
    if not [s for s in outputs if s.name not in state.values()]:
        raise ConversionError("--state takes every output of the model: callers would get nothing back",
                              "declare only the recurrent outputs as state")


def check_context(context: dict[str, str | int], state: dict[str, str], inputs: list[TensorSpec]) -> dict[str, int]:
    """`--context NAME=K` as samples per input: an input callers send, whose last axis (when
    fixed) is longer than K, on a model that keeps state (the context is carried per stream)."""
    if context and not state:
        raise ConversionError("--context carries samples from one call of a stream to the next",
                              "declare the model's recurrent state with --state IN=OUT as well")
    ins, out = {s.name: s for s in inputs}, {}
    for name, text in context.items():
        text = str(text)
        spec = ins.get(name)
        if spec is None or name in state:
            callers = [s.name for s in inputs if s.name not in state]
            raise ConversionError(f"--context {name}={text}: {name!r} is not an input callers send",
                                  f"name one of: {', '.join(callers)}")
        if not text.isdigit() or int(text) < 1:
            raise ConversionError(f"--context {name}={text}: give a number of samples, e.g. {name}=64")
        k = int(text)
        if len(spec.shape) < 2 or any(d < 0 for d in spec.shape[1:-1]) or 0 < spec.shape[-1] <= k:
            raise ConversionError(f"--context {name}={k}: input {name!r} is {spec.shape}",
                                  "context goes in front of the last axis of a [samples, ..., time] input "
                                  "longer than it")
        out[name] = k
    return out


def data_specs(inputs: list[TensorSpec], state: dict[str, str], context: dict[str, int]) -> list[TensorSpec]:
    """What the data files hold: the inputs callers send, as they send them (the new samples of
    each window only, for an input with context)."""
    from dataclasses import replace

    return [replace(s, shape=[*s.shape[:-1], s.shape[-1] - context[s.name]])
            if s.name in context and s.shape[-1] > 0 else s for s in inputs if s.name not in state]


def zero_state(specs: list[TensorSpec], state: dict[str, str]) -> dict[str, np.ndarray]:
    """A new stream's state: zeros, dynamic axes taken as 1 (one stream), as the board starts it."""
    return {s.name: np.zeros([1 if d < 0 else d for d in s.shape], s.dtype) for s in specs if s.name in state}


class _Arg:
    def __init__(self, arg, batch_free: bool):
        self.name = arg.name
        self.shape = ["batch", *list(arg.shape)[1:]] if batch_free and arg.shape else list(arg.shape)


class StreamSession:
    """A session whose samples are one stream: each row runs alone on the state the row before
    it left. It has the few calls of onnxruntime's session that the measurements use, shows only
    what callers send and get back, and keeps the state across calls until `reset()`."""

    def __init__(self, session, state: dict[str, str], initial: dict[str, np.ndarray],
                 context: dict[str, int] | None = None):
        self.session, self.state, self.initial, self.context = session, state, initial, context or {}
        self._in = [_Arg(a, True) for a in session.get_inputs() if a.name not in state]
        self._out = [_Arg(a, False) for a in session.get_outputs() if a.name not in state.values()]
        self._all_out = [a.name for a in session.get_outputs()]
        self.current, self.tails = dict(initial), {}
        self.last_feed: dict[str, np.ndarray] = {}
        self.position = 0  # samples of the stream run since the last reset

    def get_inputs(self):
        return self._in

    def get_outputs(self):
        return self._out

    def reset(self) -> None:
        self.current, self.tails, self.position = dict(self.initial), {}, 0

    def feed(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's whole feed for one sample: the last window's end in front of an input
        with context (as the board's worker puts it, agent/streams.py), the state beside."""
        row = dict(row)
        for name, k in self.context.items():
            prev = self.tails.get(name)
            if prev is None:
                prev = np.zeros((*row[name].shape[:-1], k), row[name].dtype)
            row[name] = np.concatenate([prev, row[name]], axis=-1)
        return {**row, **self.current}

    def step(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One sample (a first axis of 1) on the current state; the state moves on."""
        fed = self.last_feed = self.feed(row)
        self.position += 1
        try:
            out = dict(zip(self._all_out, self.session.run(self._all_out, fed)))
        except Exception as exc:  # the runtime's own types: name the step that failed, as it was fed
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in fed.items())
            raise ConversionError(f"the model fails on sample {self.position} of the stream ({shapes}): "
                                  f"{runtime_message(exc)}",
                                  "check that each --state output has its input's shape and that the data's "
                                  "samples fit the model's inputs") from exc
        self.current = {i: out[o] for i, o in self.state.items()}
        self.tails = {name: fed[name][..., -k:] for name, k in self.context.items()}
        return out

    def run(self, names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        names = names or [a.name for a in self._out]
        n = len(next(iter(feeds.values())))
        rows = [self.step({k: v[i:i + 1] for k, v in feeds.items()}) for i in range(n)]
        return [np.concatenate([r[k] for r in rows]) for k in names]


def steps(session: StreamSession, inputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Every sample's whole feed, state included, in stream order from a zero state: what the
    quantizer calibrates on, and where the board's self-test step comes from."""
    session.reset()
    n = len(next(iter(inputs.values())))
    fed = []
    for i in range(n):
        session.step({k: v[i:i + 1] for k, v in inputs.items()})
        fed.append(session.last_feed)
    return fed

"""ONNX's recurrent layers (RNN, GRU, LSTM) as TFLite builtins, unrolled over their steps.

Why unrolled: TFLite has no GRU op, and its fused LSTM's integer kernel wants 16-bit cell
states and a scale for each gate's intermediate result, which few converters fill in. Unrolled,
each step is a slice of the inputs' projection (one FULLY_CONNECTED for every step at once), a
FULLY_CONNECTED of the last state, and the gates' LOGISTIC, TANH, MUL and ADD: ops the writer
already quantizes, that tflite-runtime 2.14, LiteRT and XNNPACK all run in int8, and every
step's tensors get a scale calibrated for that step (an LSTM's cell state grows along a
sequence). The cost is a graph that grows with the number of steps; the sequence length must
be fixed (a free one becomes 1: one frame a call, which is how a model whose state is declared
with `--state` streams on a board).

The unrolled steps' tensors have no counterpart in the ONNX model; their calibration ranges come
from running the float TFLite graph (`onnx_to_tflite.calibration_ranges`).
"""

from __future__ import annotations

import numpy as np

from .onnx_graph import node_attrs

GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
_DEFAULT_ACTIVATIONS = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}


class NeedsFixedSteps(Exception):
    """The layer's number of steps or batch is free: the model must be written for a fixed one."""


class _Refused(Exception):
    """A form of the layer this lowering does not write; the message completes "ONNX operator X"."""


def lower_recurrent(low, node, unsupported) -> None:
    """Lower one ONNX RNN / GRU / LSTM node onto `low` (an onnx_to_tflite._Lowering): its outputs
    Y, Y_h and Y_c as ONNX shapes them. `unsupported(node, why)` makes the refusal."""
    try:
        _unroll(low, node)
    except _Refused as exc:
        raise unsupported(node, str(exc)) from None


def _check_form(low, node, a: dict, inputs: list[str], dirs: int) -> None:
    """Refuse what the unrolled form does not compute: other activations, a cell clip, coupled
    input and forget gates, sequences of several lengths, peepholes."""
    kind = node.op_type
    acts = [x.decode() if isinstance(x, bytes) else x for x in a.get("activations", [])]
    if acts and acts != _DEFAULT_ACTIVATIONS[kind] * dirs:
        raise _Refused(f" with activations {acts}")
    if "clip" in a:
        raise _Refused(" with a cell clip")
    if a.get("input_forget", 0):
        raise _Refused(" with input_forget=1")
    if inputs[4]:
        raise _Refused(" with sequence_lens (sequences of several lengths in one batch)")
    if kind == "LSTM" and inputs[7] and np.any(low.const(inputs[7], node)):
        raise _Refused(" with peephole connections")


def _unroll(low, node) -> None:
    kind = node.op_type
    a = node_attrs(node)
    hidden = int(a["hidden_size"])
    gates = GATES[kind]
    direction = a.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    dirs = 2 if direction == "bidirectional" else 1
    layout = int(a.get("layout", 0))
    inputs = list(node.input) + [""] * (8 - len(node.input))
    _check_form(low, node, a, inputs, dirs)

    x = low.in_onnx_layout(low.src(inputs[0]))
    shape = low.g.shapes[x]
    steps, batch = (shape[0], shape[1]) if layout == 0 else (shape[1], shape[0])
    if steps <= 0 or batch <= 0:
        raise NeedsFixedSteps()
    if layout == 1 and batch != 1:
        raise _Refused(" with layout=1 and a batch of more than one")
    w = low.const(inputs[1], node).astype(np.float32)       # [dirs, gates*H, I]
    r = low.const(inputs[2], node).astype(np.float32)       # [dirs, gates*H, H]
    b = (low.const(inputs[3], node).astype(np.float32) if inputs[3]
         else np.zeros((dirs, 2 * gates * hidden), np.float32))
    before_reset = kind == "GRU" and bool(a.get("linear_before_reset", 0))
    cell = _Cell(low, node, hidden, batch)
    rows = cell.reshape(x, [steps * batch, shape[2]], "rows")  # time-major: layout 1 has a batch of one
    ys, last_h, last_c = [], [], []
    for d in range(dirs):
        cell.direction, cell.step = d, None
        wb, rb = b[d, :gates * hidden], b[d, gates * hidden:]
        bias = wb + rb
        r_bias = None
        if before_reset:  # the candidate's recurrent bias stays inside r * (h Rᵀ + Rb)
            bias = wb + np.concatenate([rb[:2 * hidden], np.zeros(hidden, np.float32)])
            r_bias = np.concatenate([np.zeros(2 * hidden, np.float32), rb[2 * hidden:]])
        projected = cell.fully_connected(rows, w[d], bias, "inputs_projected")
        h = cell.initial(inputs[5], d, dirs, layout, "h")
        c = cell.initial(inputs[6], d, dirs, layout, "c") if kind == "LSTM" else None
        outs = [None] * steps
        order = range(steps - 1, -1, -1) if direction == "reverse" or d == 1 else range(steps)
        for t in order:
            cell.step = t
            p = cell.slice(projected, [t * batch, 0], [batch, gates * hidden], "projected")
            if kind == "RNN":
                h = cell.unary("TANH", cell.plus_recurrent(p, h, r[d], None), "h")
            elif kind == "GRU":
                h = cell.gru(p, h, r[d], r_bias, before_reset)
            else:
                h, c = cell.lstm(p, h, c, r[d])
            outs[t] = h
        ys.append(outs)
        last_h.append(h)
        last_c.append(c)

    cell.step = None
    names = list(node.output) + [""] * (3 - len(node.output))
    names = [n if n and (n in low.graph_outputs or low.consumers.get(n)) else "" for n in names]
    if names[0]:  # Y: [T, dirs, B, H] (layout 0) or [B, T, dirs, H]
        parts = [ys[d][t] for t in range(steps) for d in range(dirs)]
        out_shape = [steps, dirs, batch, hidden] if layout == 0 else [batch, steps, dirs, hidden]
        cell.join(parts, out_shape, low.out_name(names[0], False))
    for name, finals in ((names[1], last_h), (names[2], last_c)):
        if name:
            out_shape = [dirs, batch, hidden] if layout == 0 else [batch, dirs, hidden]
            cell.join(finals, out_shape, low.out_name(name, False))


class _Cell:
    """Writes one recurrent layer's ops; names each tensor by the layer, direction and step."""

    def __init__(self, low, node, hidden: int, batch: int):
        self.low, self.node, self.hidden, self.batch = low, node, hidden, batch
        self.direction, self.step = 0, None

    def name(self, what: str) -> str:
        where = f"/d{self.direction}" + (f"/t{self.step}" if self.step is not None else "")
        return f"{self.node.name}{where}/{what}"

    def op(self, kind: str, inputs: list[str], what: str, shape: list[int], **options) -> str:
        y = self.low.new(self.name(what), shape)
        self.low.op(kind, inputs, y, name=self.node.name, **options)
        return y

    def const(self, what: str, value: np.ndarray) -> str:
        return self.low.add_const(self.name(what), value)

    def reshape(self, x: str, shape: list[int], what: str) -> str:
        target = np.array(shape, np.int32)
        return self.op("RESHAPE", [x, self.const(f"{what}/shape", target)], what, shape, new_shape=target)

    def slice(self, x: str, begin: list[int], size: list[int], what: str) -> str:
        """A SLICE; its begin and size constants are shared by every step that cuts the same window
        (each constant tensor costs the file more than its few bytes of values)."""
        return self.op("SLICE", [x, self.shared(begin, "begin"), self.shared(size, "size")], what, size)

    def shared(self, values: list[int], what: str) -> str:
        name = f"{self.node.name}/{what}_" + "_".join(str(v) for v in values)
        return self.low.add_const(name, np.array(values, np.int32))

    def fully_connected(self, x: str, weight: np.ndarray, bias: np.ndarray | None, what: str) -> str:
        """x [rows, in] times weight [out, in]ᵀ (ONNX's W and R are stored as FULLY_CONNECTED wants).
        Every step reads the same weight and bias constants (the writer stores them once)."""
        rows = self.low.g.shapes[x][0]
        layer = f"{self.node.name}/d{self.direction}/{what}"
        inputs = [x, self.low.add_const(f"{layer}/weights", np.ascontiguousarray(weight)),
                  self.low.add_const(f"{layer}/bias", bias.astype(np.float32)) if bias is not None else ""]
        return self.op("FULLY_CONNECTED", inputs, what, [rows, weight.shape[0]], activation="NONE")

    def unary(self, kind: str, x: str, what: str) -> str:
        return self.op(kind, [x], what, list(self.low.g.shapes[x]))

    def binary(self, kind: str, x: str, y: str, what: str) -> str:
        return self.op(kind, [x, y], what, list(self.low.g.shapes[x]), activation="NONE")

    def gate(self, x: str, k: int, what: str) -> str:
        """The k-th of the gates laid side by side in x [B, gates*H]."""
        return self.slice(x, [0, k * self.hidden], [self.batch, self.hidden], what)

    def initial(self, onnx_name: str, d: int, dirs: int, layout: int, what: str) -> str | None:
        """Direction d's initial state [B, H] (None: zeros, which the first step leaves out)."""
        if not onnx_name:
            return None
        if onnx_name in self.low.consts:  # PyTorch's exporter writes zeros expanded to the input's batch
            if np.any(self.low.consts[onnx_name]):
                raise _Refused(f" with a constant, non-zero initial {what}")
            return None
        s = self.low.in_onnx_layout(self.low.src(onnx_name))
        if dirs > 1:
            begin = [d, 0, 0] if layout == 0 else [0, d, 0]
            size = [1, self.batch, self.hidden] if layout == 0 else [self.batch, 1, self.hidden]
            s = self.slice(s, begin, size, f"initial_{what}")
        return self.reshape(s, [self.batch, self.hidden], f"initial_{what}/rows")

    def plus_recurrent(self, p: str, h: str | None, r: np.ndarray, r_bias: np.ndarray | None) -> str:
        """A step's gates before their activations: its input projection + h Rᵀ."""
        if h is None:
            return p
        return self.binary("ADD", p, self.fully_connected(h, r, r_bias, "recurrent"), "gates")

    def gru(self, p: str, h: str | None, r: np.ndarray, r_bias: np.ndarray | None, before_reset: bool) -> str:
        """z = σ(x Wzᵀ + h Rzᵀ + b), r = σ(...), ĥ = tanh(x Whᵀ + (r ⊙ h) Rhᵀ + b) or, with
        linear_before_reset, tanh(x Whᵀ + r ⊙ (h Rhᵀ + Rbh) + Wbh); h' = ĥ + z ⊙ (h − ĥ)."""
        H = self.hidden
        x_h = self.gate(p, 2, "x_candidate")
        if h is None:
            zr = p
            if before_reset and r_bias is not None and np.any(r_bias):
                reset = self.unary("LOGISTIC", self.gate(p, 1, "x_reset"), "reset")
                rb = self.const("candidate_bias", r_bias[2 * H:].astype(np.float32))
                x_h = self.binary("ADD", x_h, self.binary("MUL", reset, rb, "reset_bias"), "candidate_in")
        elif before_reset:  # the gates summed whole; the candidate's third only read from each side
            recurrent = self.fully_connected(h, r, r_bias, "recurrent")
            zr = self.binary("ADD", p, recurrent, "gates")
            reset = self.unary("LOGISTIC", self.gate(zr, 1, "reset_in"), "reset")
            h_h = self.gate(recurrent, 2, "h_candidate")
            x_h = self.binary("ADD", x_h, self.binary("MUL", reset, h_h, "reset_h"), "candidate_in")
        else:
            zr = self.binary("ADD", self.slice(p, [0, 0], [self.batch, 2 * H], "x_update_reset"),
                             self.fully_connected(h, r[:2 * H], None, "recurrent"), "update_reset")
            reset = self.unary("LOGISTIC", self.gate(zr, 1, "reset_in"), "reset")
            reset_h = self.binary("MUL", reset, h, "reset_h")
            x_h = self.binary("ADD", x_h, self.fully_connected(reset_h, r[2 * H:], None, "candidate_recurrent"),
                              "candidate_in")
        update = self.unary("LOGISTIC", self.gate(zr, 0, "update_in"), "update")
        candidate = self.unary("TANH", x_h, "candidate")
        if h is None:  # h' = ĥ − z ⊙ ĥ
            return self.binary("SUB", candidate, self.binary("MUL", update, candidate, "kept"), "h")
        moved = self.binary("MUL", update, self.binary("SUB", h, candidate, "change"), "kept")
        return self.binary("ADD", candidate, moved, "h")

    def lstm(self, p: str, h: str | None, c: str | None, r: np.ndarray) -> tuple[str, str]:
        """i, o, f = σ(x Wᵀ + h Rᵀ + b), g = tanh(...) (ONNX's gate order i, o, f, c);
        c' = f ⊙ c + i ⊙ g; h' = o ⊙ tanh(c')."""
        gates = self.plus_recurrent(p, h, r, None)
        i = self.unary("LOGISTIC", self.gate(gates, 0, "input_gate_in"), "input_gate")
        o = self.unary("LOGISTIC", self.gate(gates, 1, "output_gate_in"), "output_gate")
        g = self.unary("TANH", self.gate(gates, 3, "cell_in"), "cell_candidate")
        new = self.binary("MUL", i, g, "cell_new")
        if c is not None:
            f = self.unary("LOGISTIC", self.gate(gates, 2, "forget_gate_in"), "forget_gate")
            new = self.binary("ADD", self.binary("MUL", f, c, "cell_kept"), new, "c")
        h = self.binary("MUL", o, self.unary("TANH", new, "cell_out"), "h")
        return h, new

    def join(self, parts: list[str], shape: list[int], out: str) -> None:
        """`out` of `shape` from [B, H] parts laid one after another (a CONCATENATION, then a RESHAPE)."""
        joined = parts[0]
        if len(parts) > 1:
            joined = self.low.new(f"{out}/joined", [len(parts) * self.batch, self.hidden])
            self.low.op("CONCATENATION", parts, joined, name=self.node.name, axis=0, activation="NONE")
        target = np.array(shape, np.int32)
        self.low.new(out, shape)
        self.low.op("RESHAPE", [joined, self.low.add_const(f"{out}/shape", target)], out, name=self.node.name,
                    new_shape=target)

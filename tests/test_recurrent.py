"""Recurrent layers in INT8 TFLite: ONNX's RNN, GRU and LSTM (as PyTorch exports them) and Keras'
LSTM and GRU (as TensorFlow writes them unrolled), each step written as int8 builtins.

The forms are checked against onnxruntime in float (every direction, layout and initial state
ONNX allows), trained models against their own accuracy in INT8, and the weights are checked to
be stored once for all the steps that read them."""

import os
import tarfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.errors import ConversionError
from converters import zoo
from converters.convert import ConvertOptions, convert_onnx
from converters.onnx_to_tflite import lower
from converters.tflite_graph import write_tflite

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
STEPS, FEATURES, HIDDEN = 6, 5, 7


def _recurrent_model(path, kind: str, states: int = 0, peepholes: bool = False, steps: int = STEPS, **attrs):
    """One ONNX RNN / GRU / LSTM node with random weights (the same for the same kind and states):
    x [T, 1, F] (layout 1: [1, T, F]); the first `states` of its initial states (h, then c) as
    model inputs; all its outputs."""
    rng = np.random.default_rng(len(kind) + states)
    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[kind]
    dirs = 2 if attrs.get("direction") == "bidirectional" else 1
    layout = attrs.get("layout", 0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (dirs, gates * HIDDEN, FEATURES)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(0, 0.5, (dirs, gates * HIDDEN, HIDDEN)).astype(np.float32), "R"),
             numpy_helper.from_array(rng.normal(0, 0.3, (dirs, 2 * gates * HIDDEN)).astype(np.float32), "B")]
    state_shape = [dirs, 1, HIDDEN] if layout == 0 else [1, dirs, HIDDEN]
    names = ["x", "W", "R", "B", "", "h" if states > 0 else "", "c" if states > 1 else ""]
    if peepholes:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (dirs, 3 * HIDDEN)).astype(np.float32), "P"))
        names.append("P")
    while not names[-1]:  # an absent input at the end is left out, not named ""
        names.pop()
    outputs = ["Y", "Y_h"] + (["Y_c"] if kind == "LSTM" else [])
    x_shape = [steps, 1, FEATURES] if layout == 0 else [1, steps, FEATURES]
    y_shape = [steps, dirs, 1, HIDDEN] if layout == 0 else [1, steps, dirs, HIDDEN]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)] + \
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, state_shape) for n in ("h", "c")[:states]]
    graph = helper.make_graph([helper.make_node(kind, names, outputs, hidden_size=HIDDEN, **attrs)], kind.lower(),
                              inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, shape) for o, shape in
                                       zip(outputs, [y_shape, state_shape, state_shape])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    onnx.save(model, str(path))
    return path


FORMS = [
    ("RNN", 0, {}),
    ("RNN", 1, {"direction": "reverse"}),
    ("GRU", 1, {}),                                            # linear_before_reset=0: r ⊙ h before Rh
    ("GRU", 1, {"linear_before_reset": 1}),                    # as PyTorch exports it
    ("GRU", 0, {"linear_before_reset": 1}),                    # no initial state: the first step's r ⊙ Rbh
    ("GRU", 1, {"direction": "reverse", "linear_before_reset": 1}),
    ("GRU", 1, {"direction": "bidirectional", "linear_before_reset": 1}),
    ("LSTM", 2, {}),
    ("LSTM", 1, {"direction": "reverse"}),                     # h given, c zeros
    ("LSTM", 0, {"direction": "bidirectional"}),
    ("LSTM", 2, {"layout": 1}),
]


@pytest.mark.parametrize("kind,states,attrs", FORMS,
                         ids=[f"{k}-{s}states-" + "-".join(f"{v}" for v in a.values()) for k, s, a in FORMS])
def test_each_recurrent_form_unrolls_to_what_onnxruntime_computes(tmp_path, kind, states, attrs):
    """Every output (the sequence, the last h, the last c), in float, to float32 rounding; and the
    layer's weights are stored once per direction, not once per step."""
    from ai_edge_litert.interpreter import Interpreter

    src = _recurrent_model(tmp_path / "m.onnx", kind, states, **attrs)
    graph = lower(onnx.load(str(src)))
    assert {op.kind for op in graph.ops} <= {"FULLY_CONNECTED", "SLICE", "ADD", "SUB", "MUL", "LOGISTIC", "TANH",
                                             "RESHAPE", "CONCATENATION", "TRANSPOSE"}
    path = write_tflite(graph, tmp_path / "m.tflite")
    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    rng = np.random.default_rng(7)
    feeds = {d["name"]: rng.standard_normal(d["shape"]).astype(np.float32) for d in it.get_input_details()}
    for d in it.get_input_details():
        it.set_tensor(d["index"], feeds[d["name"]])
    it.invoke()
    want = _onnxruntime(src, feeds) if not attrs.get("layout") else _batchwise(tmp_path, kind, states, attrs, feeds)
    got = {d["name"]: it.get_tensor(d["index"]) for d in it.get_output_details()}
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=2e-6, err_msg=name)

    dirs = 2 if attrs.get("direction") == "bidirectional" else 1
    split = kind == "GRU" and not attrs.get("linear_before_reset")  # R cut in two: [z r] of h, [h] of r ⊙ h
    assert _fully_connected_weights(path) == dirs * (3 if split else 2)  # W, then R


def _onnxruntime(path, feeds: dict) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path))
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def _batchwise(tmp_path, kind: str, states: int, attrs: dict, feeds: dict) -> dict:
    """What a layout=1 (batch-first) layer computes, from its time-major twin in onnxruntime, which
    runs only layout 0: for a batch of one the same numbers, their axes swapped."""
    twin = _recurrent_model(tmp_path / "twin.onnx", kind, states, **{**attrs, "layout": 0})
    out = _onnxruntime(twin, {k: np.swapaxes(v, 0, 1) for k, v in feeds.items()})  # [1, T, F] -> [T, 1, F]
    return {k: v.transpose(2, 0, 1, 3) if k == "Y" else np.swapaxes(v, 0, 1) for k, v in out.items()}


def test_a_trained_pytorch_gru_keeps_its_accuracy_in_int8_tflite(tmp_path):
    """The digits rows as 8 steps through a GRU trained here (batch_first, last step classified):
    full-integer INT8 TFLite loses at most one point of top-1 on held-out digits, every layer of it
    runs in int8, the steps' weights are stored once, and XNNPACK takes the whole model."""
    from tflitekit import op_dtypes, xnnpack_partitions

    accuracy = zoo.build_digits_rnn(tmp_path / "gru.onnx", "GRU", epochs=8)
    assert accuracy > 0.9
    calib, evaluation = zoo.write_digits_npz(tmp_path)
    out = tmp_path / "gru.ewb"
    report = convert_onnx(tmp_path / "gru.onnx", calib, out, None, evaluation,
                          ConvertOptions(format="tflite", name="gru"))
    quality = report["quality"]
    assert quality["accuracy_drop_pp"] <= 1.0, quality
    with tarfile.open(out) as tar:
        (tmp_path / "m.tflite").write_bytes(tar.extractfile("model.tflite").read())
    kinds = op_dtypes(tmp_path / "m.tflite")
    for kind in ("FULLY_CONNECTED", "LOGISTIC", "TANH", "MUL", "ADD", "SUB"):
        assert kinds[kind] == {"int8"}, (kind, kinds)
    assert _fully_connected_weights(tmp_path / "m.tflite") == 3  # the GRU's W and R, the classifier's
    assert xnnpack_partitions(tmp_path / "m.tflite") == 1  # the 8 steps' join too (CONCAT_FAN_IN)
    assert report["int8_bytes"] < report["fp32_bytes"]


def _fully_connected_weights(path) -> int:
    """How many distinct weight tensors a file's FULLY_CONNECTED ops read."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
    fc = schema.BuiltinOperator.FULLY_CONNECTED
    return len({op.inputs[1] for op in model.subgraphs[0].operators
                if model.operatorCodes[op.opcodeIndex].builtinCode == fc})


def test_a_keras_lstm_is_unrolled_and_converts_to_int8_tflite(tmp_path, capfd):
    """Keras 3 writes an LSTM as a WHILE loop, which edgeward does not read: the converter unrolls it
    over its (fixed) steps, reads TensorFlow's SPLIT, UNPACK and PACK as slices and joins, and the
    trained model keeps its accuracy in INT8. TensorFlow's diagnostics of the first try (for a batch
    of any size, which fails) do not reach the terminal."""
    import tensorflow as tf

    from converters.from_tensorflow import convert_tensorflow

    x_tr, y_tr, x_te, y_te = zoo.digits_dataset()
    rows_tr, rows_te = x_tr.reshape(-1, 8, 8), x_te.reshape(-1, 8, 8)
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input((8, 8), name="rows"), tf.keras.layers.LSTM(32),
                                 tf.keras.layers.Dense(10)])
    model.compile(tf.keras.optimizers.Adam(1e-2), tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(rows_tr, y_tr, epochs=8, batch_size=64, verbose=0)
    model.save(tmp_path / "lstm.keras")
    np.savez(tmp_path / "calib.npz", rows=rows_tr[:200])
    np.savez(tmp_path / "eval.npz", rows=rows_te, labels=y_te)
    capfd.readouterr()
    report = convert_tensorflow(tmp_path / "lstm.keras", tmp_path / "calib.npz", tmp_path / "lstm.ewb", None,
                                tmp_path / "eval.npz", ConvertOptions(format="tflite", name="lstm"))
    quality = report["quality"]
    assert quality["accuracy_fp32"] > 0.85 and quality["accuracy_drop_pp"] <= 1.5, quality
    assert any("recurrent layer(s) unrolled" in note for note in report["notes"]), report["notes"]
    assert report["graph"]["ops"]["FULLY_CONNECTED"] > 8  # a step each, and the classifier
    assert "error" not in capfd.readouterr().err


@pytest.mark.parametrize("kind,flags,fragment", [
    ("LSTM", {"peepholes": True}, "with peephole connections"),
    ("LSTM", {"clip": 3.0}, "with a cell clip"),
    ("GRU", {"activations": ["Sigmoid", "Relu"]}, "with activations"),
])
def test_a_recurrent_form_tflite_cannot_run_is_named_and_leaves_no_file(tmp_path, kind, flags, fragment):
    flags = dict(flags)
    src = _recurrent_model(tmp_path / "m.onnx", kind, 0, peepholes=flags.pop("peepholes", False), **flags)
    np.savez(tmp_path / "calib.npz", x=np.zeros((32, 1, FEATURES), np.float32))
    out = tmp_path / "m.ewb"
    with pytest.raises(ConversionError) as err:
        convert_onnx(src, tmp_path / "calib.npz", out, None, None, ConvertOptions(format="tflite"))
    assert f"ONNX operator {kind}" in err.value.message and fragment in err.value.message
    assert "--format onnx" in str(err.value)
    assert not out.exists() and not list(tmp_path.glob("m.ewb*"))


def test_a_free_number_of_steps_becomes_one_step_a_call(tmp_path):
    """layout=1 puts the steps on the second axis: a free one is fixed to one step a call when the
    model is written for batches of one, as a time-major model's free first axis is (a model whose
    state is declared with --state then streams frame by frame)."""
    src = _recurrent_model(tmp_path / "m.onnx", "GRU", 1, layout=1, linear_before_reset=1)
    model = onnx.load(str(src))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "steps"
    graph = lower(model)
    assert graph.shapes["x"] == [1, 1, FEATURES] and graph.shapes["Y"] == [1, 1, 1, HIDDEN]
    assert [op.kind for op in graph.ops].count("TANH") == 1  # one step

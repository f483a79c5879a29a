"""Stateful models from the converter's command line to a stream on the board: `--state IN=OUT`
and `--fix-input NAME=VALUE`, on Silero VAD as its PyPI package ships it (the model a user
would bring for voice activity detection) and on the keyword-spotting-shaped RNN of the zoo.

Silero VAD runs on 512-sample windows of 16 kHz audio, each prefixed by the last 64 samples
of the window before (576 in all), and carries an LSTM state [2, batch, 128] from call to
call. Its own Python wrapper (silero_vad.utils_vad.OnnxWrapper) is the reference: what the
agent answers on a stream must be what that wrapper gives, however the windows are chunked
into requests.
"""

import importlib.resources
import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from agent.budget import Budget
from agent.bundle import open_bundle
from agent.config import ServingConfig
from agent.engine import Engine
from agent.signing import load_public_key
from agent.store import Store
from converters import zoo
from converters.stateful import StreamSession

SR, WINDOW, CONTEXT = 16000, 512, 64


def _silero(name: str) -> str:
    return str(importlib.resources.files("silero_vad") / "data" / name)


def _convert(*args):
    return subprocess.run([sys.executable, "-m", "agent.cli", "convert", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def _voice_like(seconds: float, seed: int) -> np.ndarray:
    """Syllables of a voiced, vowel-like sound (a gliding pitch, two formant bands) between
    pauses, over faint noise: it moves Silero's speech probability between ~0 and ~0.7."""
    t = np.arange(int(SR * seconds)) / SR
    rng = np.random.default_rng(seed)
    phase = 2 * np.pi * np.cumsum(120 + 30 * np.sin(2 * np.pi * (0.5 + 0.2 * seed) * t)) / SR
    voiced = sum((1 / k) * np.sin(k * phase) * (1 + (abs(k * 120 - 700) < 300) + (abs(k * 120 - 1200) < 300))
                 for k in range(1, 30))
    syllables = (np.sin(2 * np.pi * 3 * t) > 0.2) * ((t % 2) < 1.2)
    return (0.1 * voiced * syllables + 0.003 * rng.standard_normal(len(t))).astype(np.float32)


def _windows(audio: np.ndarray) -> np.ndarray:
    """The model's input rows as Silero's wrapper builds them: 64 samples of context + 512 new."""
    chunks = audio[: len(audio) // WINDOW * WINDOW].reshape(-1, WINDOW)
    context = np.concatenate([np.zeros((1, CONTEXT), np.float32), chunks[:-1, -CONTEXT:]])
    return np.concatenate([context, chunks], axis=1)


def _wrapper_probabilities(audio: np.ndarray) -> np.ndarray:
    """Speech probabilities per window from Silero's own streaming wrapper, on the package's file."""
    import torch
    from silero_vad.utils_vad import OnnxWrapper

    model = OnnxWrapper(_silero("silero_vad.onnx"), force_onnx_cpu=True)
    usable = audio[: len(audio) // WINDOW * WINDOW]
    return model.audio_forward(torch.from_numpy(usable), SR).numpy().reshape(-1)


def _engine(tmp_path, bundle, pub):
    store = Store(tmp_path / "store")
    engine = Engine(Budget(8192, reserve_mb=0), serving_for=lambda name: ServingConfig())
    model = engine.load(store.install(open_bundle(bundle, [load_public_key(pub)])))
    selftest = model.self_test()
    engine.activate(model)
    return engine, model, selftest


SILERO_STATE = {"state": "stateN"}


@pytest.mark.parametrize("source, flags, state, context", [
    # the package's default: input [N, T], state [2, N, 128], sr; one window per call, stepped
    ("silero_vad.onnx", ["--fix-input", "sr=16000"], SILERO_STATE, True),
    # the same, the client building the 576-sample windows itself
    ("silero_vad.onnx", ["--fix-input", "sr=16000"], SILERO_STATE, False),
    # a batch fixed at 1: input [1, 576], state [2, 1, 128]; stepped too
    ("silero_vad_openvino_16k.onnx", [], SILERO_STATE, True),
    # windows on the first axis and two LSTM states [1, 1, 128]: a whole request in one call
    ("silero_vad_16k_sequence.onnx", [], {"h": "hn", "c": "cn"}, True),
])
@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_silero_vad_streams_on_the_board_as_its_own_wrapper_runs_it(tmp_path, assets, source, flags, state,
                                                                     context, fmt):
    """With `--context input=64` a microphone sends 512 new samples per window, as Silero's
    wrapper takes them, and the worker puts the last window's 64 in front; without it the
    client sends the 576-sample windows. In TFLite (FP32) too: its If on the sample rate taken
    at conversion, the STFT's reflection padding a MIRROR_PAD, its 1-D convs lifted around the
    LSTM (unrolled, one window a call), the magnitude's Pow and Sqrt."""
    audio, other = _voice_like(4.0, 0), _voice_like(4.0, 1)
    rows = (lambda a: _windows(a)[:, CONTEXT:]) if context else _windows  # what the microphone sends
    np.savez(tmp_path / "data.npz", input=rows(audio))
    out = tmp_path / "vad.ewb"
    declared = [f for i, o in state.items() for f in ("--state", f"{i}={o}")]
    r = _convert(_silero(source), "--calibration", tmp_path / "data.npz", "--precision", "fp32",
                 *declared, *flags, *(["--context", "input=64"] if context else []),
                 "--format", fmt, "--name", "vad", "--key", assets.key, "-o", out)
    assert r.returncode == 0, r.stderr
    assert "state: " + ", ".join(f"{i} <- {o}" for i, o in state.items()) in r.stdout
    m = open_bundle(out, [load_public_key(assets.pub)]).manifest
    assert m.state == state and m.context == ({"input": CONTEXT} if context else {})
    assert sorted(s.name for s in m.inputs) == sorted(["input", *state])  # sr is a constant in the shipped model
    assert m.quality["max_abs_err"] == 0 and m.quality["output_range"] > 0.3  # measured as one stream

    engine, model, selftest = _engine(tmp_path, out, assets.pub)
    assert selftest["max_abs_err"] <= selftest["atol"]
    assert [s.name for s in model.request_inputs] == ["input"] and model.request_inputs[0].shape[0] == -1
    if context and m.inputs[0].shape[-1] > 0:
        assert model.request_inputs[0].shape == [-1, WINDOW]  # callers send the new samples only
    want = _wrapper_probabilities(audio)
    assert want.max() > 0.3 and want.min() < 0.05  # speech and silence both occur: the state matters
    windows, others = rows(audio), rows(other)
    def run(stream: str, rows: np.ndarray) -> np.ndarray:
        (probabilities,) = engine.infer_arrays("vad", {"input": rows}, stream=stream)[1].values()
        return probabilities

    whole = run("mic-0", windows).reshape(-1)  # many windows in one request: stepped in order in the worker
    np.testing.assert_allclose(whole, want, rtol=0, atol=1e-5)
    pieces, interleaved, edges = [], [], [0, 1, 6, 7, 30, 61, len(windows)]
    for lo, hi in zip(edges, edges[1:]):  # another chunking, interleaved with a second microphone
        pieces.append(run("mic-1", windows[lo:hi]).reshape(-1))
        interleaved.append(run("mic-2", others[lo:hi]).reshape(-1))
    np.testing.assert_allclose(np.concatenate(pieces), want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(interleaved), _wrapper_probabilities(other), rtol=0, atol=1e-5)
    # a stream continues where it stopped; a reset starts it over from silence
    again = run("mic-0", windows[:10]).reshape(-1)
    assert not np.allclose(again, want[:10], atol=1e-3)
    assert model.reset_stream("mic-0")
    np.testing.assert_allclose(run("mic-0", windows[:10]).reshape(-1), want[:10], rtol=0, atol=1e-5)
    engine.close()


def test_silero_vad_in_int8_tflite_is_measured_refused_and_shipped_only_when_asked(tmp_path, assets):
    """Silero VAD's package model in full-integer INT8 TFLite is a quarter of the FP32 file but not
    faithful: a spectrogram's magnitudes span decades, which one int8 scale per tensor rounds. The
    converter measures it on the stream and refuses it as broken (the FP32 TFLite above is exact);
    shipped anyway with --allow-worse, the board's speech decisions (probability > 0.5) still agree
    with Silero's own wrapper on at least 95 % of another stream's windows."""
    calib, other = _windows(_voice_like(8.0, 0))[:, CONTEXT:], _voice_like(8.0, 1)
    np.savez(tmp_path / "data.npz", input=calib)
    out = tmp_path / "vad.ewb"
    flags = ["--calibration", tmp_path / "data.npz", "--fix-input", "sr=16000", "--state", "state=stateN",
             "--context", "input=64", "--format", "tflite", "--name", "vad", "--key", assets.key, "-o", out]
    refused = _convert(_silero("silero_vad.onnx"), *flags)
    assert refused.returncode == 2 and "the int8 tflite model is broken" in refused.stderr and not out.exists()
    r = _convert(_silero("silero_vad.onnx"), *flags, "--allow-worse", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["precision"] == "int8" and report["int8_bytes"] < 0.3 * report["fp32_bytes"]
    engine, model, selftest = _engine(tmp_path, out, assets.pub)
    assert selftest["max_abs_err"] <= selftest["atol"]
    got = engine.infer_arrays("vad", {"input": _windows(other)[:, CONTEXT:]}, stream="mic")[1]["output"].reshape(-1)
    engine.close()
    want = _wrapper_probabilities(other)
    assert want.max() > 0.5 and want.min() < 0.05
    assert ((got > 0.5) == (want > 0.5)).mean() >= 0.95


def _stream(path, frames: np.ndarray, hidden: int) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    stream = StreamSession(sess, {"h": "h_out"}, {"h": np.zeros((1, 1, hidden), np.float32)})
    return stream.run(["scores"], {"frames": frames})[0]


def test_static_int8_of_a_stateful_model_is_measured_and_served_as_one_stream(tmp_path, assets):
    """The report's error is the stream's (each sample on the state the one before left), the
    board's self-test step runs on a state that is not zeros, and the board's stream answers
    what the host measured."""
    model = zoo.build_stateful_rnn(tmp_path / "kws.onnx", features=8, hidden=64, classes=4)
    frames = np.random.default_rng(0).standard_normal((200, 1, 8)).astype(np.float32)
    held_out = np.random.default_rng(1).standard_normal((120, 1, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", frames=frames)
    np.savez(tmp_path / "eval.npz", frames=held_out)
    out = tmp_path / "kws.ewb"
    r = _convert(model, "--calibration", tmp_path / "calib.npz", "--eval", tmp_path / "eval.npz",
                 "--state", "h=h_out", "--allow-worse", "--key", assets.key, "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    import json

    report = json.loads(r.stdout)
    assert report["state"] == {"h": "h_out"} and report["graph"]["ops"].get("QuantizeLinear", 0) >= 2

    engine, loaded, selftest = _engine(tmp_path, out, assets.pub)
    assert selftest["samples"] == 1 and selftest["max_abs_err"] <= selftest["atol"]
    shipped = tmp_path / "store" / "models" / "kws" / "v1" / "model.onnx"
    with np.load(shipped.with_name("reference.npz")) as ref:
        assert np.abs(ref["input.h"]).max() > 0.1  # the self-test's step starts from a state the stream reached
    want, got = _stream(model, held_out, 64), _stream(shipped, held_out, 64)
    error, span = float(np.abs(got - want).max()), float(want.max() - want.min())
    assert error < 0.04 * span
    assert report["quality"]["max_abs_err"] == pytest.approx(error, abs=1e-4)  # the report measured the stream
    # the board's stream gives what the host measured, sample by sample. The board runs the whole
    # request in one call (time is this model's first axis); the float RNN then differs in the
    # last bits, which can move a quantized score by one step of its grid, never more
    import onnx

    step = float(onnx.numpy_helper.to_array(
        next(t for t in onnx.load(str(shipped)).graph.initializer if t.name == "scores_scale")))
    served = engine.infer_arrays("kws", {"frames": held_out}, stream="s")[1]["scores"]
    assert np.abs(served - got).max() <= 1.01 * step and np.mean(served != got) < 0.1
    one_by_one = np.concatenate([engine.infer_arrays("kws", {"frames": held_out[i:i + 1]}, stream="t")[1]["scores"]
                                 for i in range(len(held_out))])
    np.testing.assert_allclose(one_by_one, got, rtol=0, atol=1e-6)
    engine.close()


def test_calibration_feeds_each_sample_the_state_the_fp32_model_reached(tmp_path):
    """Static INT8 calibrates on the states a stream really passes through, not on zeros."""
    from converters.stateful import steps

    model = zoo.build_stateful_rnn(tmp_path / "kws.onnx", hidden=16)
    frames = np.random.default_rng(2).standard_normal((12, 1, 8)).astype(np.float32)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    fed = steps(StreamSession(sess, {"h": "h_out"}, {"h": np.zeros((1, 1, 16), np.float32)}), {"frames": frames})
    assert len(fed) == 12 and not fed[0]["h"].any()
    h = np.zeros((1, 1, 16), np.float32)
    for i, feed in enumerate(fed):
        np.testing.assert_array_equal(feed["frames"], frames[i:i + 1])
        np.testing.assert_allclose(feed["h"], h, rtol=0, atol=1e-6)
        _, h = sess.run(None, {"frames": frames[i:i + 1], "h": h})
    assert np.abs(fed[-1]["h"]).max() > 0.1


def test_a_step_that_fails_is_named_by_its_place_in_the_stream_and_its_own_shapes(tmp_path):
    """A model whose state output does not fit its state input runs its first sample and fails on
    the second: the error names that sample and the one-row feed it got, not the whole batch."""
    from onnx import TensorProto, helper

    from agent.errors import ConversionError
    from converters.measure import run_all

    nodes = [helper.make_node("Add", ["x", "h"], ["y"]), helper.make_node("Concat", ["h", "h"], ["h_out"], axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
                                           helper.make_tensor_value_info("h", TensorProto.FLOAT, ["n", "k"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("h_out", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    stream = StreamSession(sess, {"h": "h_out"}, {"h": np.zeros((1, 4), np.float32)})
    with pytest.raises(ConversionError) as err:
        run_all(stream, {"x": np.ones((16, 4), np.float32)})
    assert "fails on sample 2 of the stream (x [1, 4], h [1, 8])" in str(err.value)
    assert "[16, 4]" not in str(err.value) and "each --state output has its input's shape" in str(err.value)


@pytest.mark.parametrize("flags, fragment", [
    (["--state", "hidden=h_out"], "the model has no input 'hidden'"),
    (["--state", "h=h_next"], "the model has no output 'h_next'"),
    (["--state", "h=h_out", "--state", "frames=h_out"], "names one output for two inputs"),
    (["--state", "h"], "expected NAME=VALUE"),
    (["--context", "frames=2"], "declare the model's recurrent state with --state IN=OUT as well"),
    (["--state", "h=h_out", "--context", "h=2"], "'h' is not an input callers send"),
    (["--state", "h=h_out", "--context", "frames=two"], "give a number of samples"),
    (["--state", "h=h_out", "--context", "frames=8"], "input 'frames' is [-1, 1, 8]"),
    (["--fix-input", "frames=1"], "input 'frames' has dynamic axes"),
    (["--fix-input", "rate=16000"], "the model has no input 'rate'"),
])
def test_bad_state_and_fixed_inputs_give_one_line_and_leave_no_file(tmp_path, flags, fragment):
    model = zoo.build_stateful_rnn(tmp_path / "kws.onnx")
    np.savez(tmp_path / "calib.npz", frames=np.zeros((20, 1, 8), np.float32))
    out = tmp_path / "out.ewb"
    r = _convert(model, "--calibration", tmp_path / "calib.npz", "--precision", "fp32", *flags, "-o", out)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeward convert: error:"), r.stderr
    assert fragment in lines[0]
    assert not out.exists()


def test_state_on_a_tflite_source_is_refused_with_the_fix(tmp_path):
    """--state reaches a recurrent layer through the ONNX lowering; a float .tflite has none to reach
    (the command line refuses it before; this is the Python API)."""
    from agent.errors import ConversionError
    from converters.convert import ConvertOptions
    from converters.from_tflite import convert_tflite

    model, _ = zoo.build_tflite_mlp(tmp_path / "mlp.tflite")
    np.savez(tmp_path / "calib.npz", x=np.zeros((20, 64), np.float32))
    out = tmp_path / "out.ewb"
    with pytest.raises(ConversionError) as err:
        convert_tflite(model, tmp_path / "calib.npz", out, options=ConvertOptions(state={"x": "y"}))
    assert str(err.value) == ("--state works on ONNX and PyTorch sources (their recurrent layers become TFLite ops "
                              "with the state as inputs): export the model to ONNX and convert that with --state")
    assert not out.exists()


def test_a_fixed_input_takes_the_inputs_dtype_and_refuses_what_does_not_fit(tmp_path):
    import onnx

    from agent.errors import ConversionError
    from converters.onnx_graph import fix_inputs

    model = onnx.load(_silero("silero_vad.onnx"))
    fix_inputs(model, {"sr": "16000"})
    assert "sr" not in [i.name for i in model.graph.input]
    (sr,) = [t for t in model.graph.initializer if t.name == "sr"]
    assert onnx.numpy_helper.to_array(sr).dtype == np.int64 and int(onnx.numpy_helper.to_array(sr)) == 16000
    with pytest.raises(ConversionError, match="not a int64 value"):
        fix_inputs(onnx.load(_silero("silero_vad.onnx")), {"sr": "16 kHz"})


def test_edgeward_bench_sends_samples_a_model_with_free_axes_can_run(tmp_path, assets):
    """Silero VAD takes windows of any length ([N, T]): made-up 1x1 rows fail in its STFT. The
    board's benchmark sends a sample of the bundle's own self-test data instead (its new
    samples, for an input with context), and `--bare` feeds the bare runtime the whole window
    and the state."""
    import json

    from agent.client import LocalClient
    from mqttkit import RunningAgent, wait_for

    np.savez(tmp_path / "chunks.npz", input=_windows(_voice_like(2.0, 0))[:, CONTEXT:])
    bundle = tmp_path / "vad.ewb"
    r = _convert(_silero("silero_vad.onnx"), "--calibration", tmp_path / "chunks.npz", "--precision", "fp32",
                 "--fix-input", "sr=16000", "--state", "state=stateN", "--context", "input=64", "--name", "vad",
                 "--key", assets.key, "-o", bundle)
    assert r.returncode == 0, r.stderr
    store = tmp_path / "store"
    ra = RunningAgent({"mqtt.url": "mqtt://127.0.0.1:9", "device.id": "pi-vad", "store.path": str(store),
                       "trust.keys": [str(assets.pub)], "memory.budget_mb": 4096, "memory.reserve_mb": 0},
                      install=[bundle])
    try:
        wait_for(lambda: (store / "agent.sock").exists(), what="local API socket")
        with LocalClient(str(store / "agent.sock")) as client:
            (model,) = client.models()
        assert model["mode"] == "stateful" and model["inputs"][0]["shape"] == [-1, -1]
        assert model["context"] == {"input": CONTEXT}
        from agent.boardbench import reference_inputs, sample_inputs

        (sample,) = sample_inputs(model, reference_inputs(model), np.random.default_rng(0)).values()
        assert sample.shape == (1, WINDOW)  # the new samples of the reference's window
        r = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "--socket", str(store / "agent.sock"),
                            "--model", "vad", "--clients", "1,2", "--seconds", "0.5", "--bare", "--json"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout)
        steps = result["steps"]
        assert [s["clients"] for s in steps] == [1, 2]
        assert all(s["errors"] == 0 and s["requests"] > 10 for s in steps), steps
        assert result["bare"]["p50_ms"] > 0 and all(s["bare_rows_per_s"] > 0 for s in steps)

        # an offline job over recordings: each file is one stream, whatever --batch cuts it into
        recordings = {"a.npy": _voice_like(2.0, 2), "b.npy": _voice_like(1.5, 3)}
        (tmp_path / "rec").mkdir()
        for name, audio in recordings.items():
            np.save(tmp_path / "rec" / name, _windows(audio)[:, CONTEXT:])
        r = subprocess.run([sys.executable, "-m", "agent.cli", "infer", "--socket", str(store / "agent.sock"),
                            "--model", "vad", "--input", str(tmp_path / "rec"), "--batch", "7",
                            "--output", str(tmp_path / "vad.jsonl")], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        rows = [json.loads(line) for line in (tmp_path / "vad.jsonl").read_text().splitlines()]
        for name, audio in recordings.items():
            got = [row["outputs"]["output"][0] for row in rows if row["source"].endswith(name)]
            np.testing.assert_allclose(got, _wrapper_probabilities(audio), rtol=0, atol=1e-5)
        assert ra.agent.engine.get("vad").snapshot().streams == 0  # the job's (and the bench's) were forgotten
    finally:
        ra.stop()


@pytest.mark.parametrize("edit, fragment", [
    (dict(context={"input": 64}), "context is carried on a stateful model's streams"),
    (dict(state={"state": "stateN"}, context={"sr": 64}), "context 'sr'"),
    (dict(state={"state": "stateN"}, context={"input": 576}), "context 'input'"),
    (dict(state={"state": "next"}), "state 'state' <- 'next' names no input or output"),
])
def test_a_manifest_whose_streams_name_nothing_real_is_refused(edit, fragment):
    """A bundle is checked before anything runs: an agent must not serve such a stream wrongly."""
    from agent.bundle import Manifest, TensorSpec, parse_manifest
    from agent.errors import BundleError

    m = Manifest(name="vad", version=1, format="onnx", model_file="model.onnx", runtime="onnxruntime",
                 inputs=[TensorSpec("input", "float32", [-1, 576]), TensorSpec("state", "float32", [2, 1, 128]),
                         TensorSpec("sr", "int64", [])],
                 outputs=[TensorSpec("output", "float32", [-1, 1]), TensorSpec("stateN", "float32", [2, 1, 128])],
                 **edit)
    with pytest.raises(BundleError, match=fragment):
        parse_manifest(m.to_bytes())


@pytest.mark.integration
def test_two_microphones_publish_raw_audio_over_mqtt_and_get_silero_s_answers(broker, assets, tmp_path):
    """The whole path a user builds: Silero VAD from its package converted with --context, a
    real agent and Mosquitto, and two microcontrollers that publish their 512-sample buffers
    as raw little-endian float32 to mic/<room>/audio, interleaved. Each topic is a stream
    (stream_from_topic); each room's answers are what Silero's wrapper gives on its audio."""
    import json

    from mqttkit import RawClient, RunningAgent, wait_for

    rooms = {"kitchen": _voice_like(2.0, 0), "hall": _voice_like(2.0, 1)}
    chunks = {room: _windows(audio)[:, CONTEXT:] for room, audio in rooms.items()}
    np.savez(tmp_path / "chunks.npz", input=chunks["kitchen"])
    bundle = tmp_path / "vad.ewb"
    r = _convert(_silero("silero_vad_openvino_16k.onnx"), "--calibration", tmp_path / "chunks.npz",
                 "--precision", "fp32", "--state", "state=stateN", "--context", "input=64", "--name", "vad",
                 "--key", assets.key, "-o", bundle)
    assert r.returncode == 0, r.stderr
    ra = RunningAgent({"mqtt.url": broker.url, "device.id": "pi-mics", "store.path": str(tmp_path / "store"),
                       "trust.keys": [str(assets.pub)], "memory.budget_mb": 4096, "memory.reserve_mb": 0,
                       "pipelines": [{"input_topic": f"mic/{room}/audio", "model": "vad",
                                      "output_topic": f"results/{room}", "format": "raw", "stream_from_topic": True}
                                     for room in rooms]},
                      install=[bundle])
    raw = RawClient(broker.port)
    try:
        wait_for(ra.agent.connected.is_set, what="agent connected")
        raw.subscribe("results/#")
        n = len(chunks["kitchen"])
        got: dict = {room: [] for room in rooms}

        def answered(count: int) -> bool:
            for m in raw.collect(lambda t: t.startswith("results/"), 0.05):
                got[m.topic.split("/")[1]].append(json.loads(m.payload))
            return all(len(v) >= count for v in got.values())

        # interleaved, one buffer per message, as the microphones fill them: a microphone sends a
        # window every 32 ms, far slower than the board answers, so each round waits for its
        # answers (back to back, a loaded host's agent would rightly answer "busy" to a flood)
        for i in range(n):
            for room in rooms:
                raw.publish(f"mic/{room}/audio", chunks[room][i].astype("<f4").tobytes())
            wait_for(lambda: answered(i + 1), what=f"{i + 1} answers per room")
        for room, audio in rooms.items():
            assert all(a["status"] == "ok" for a in got[room]), [a for a in got[room] if a["status"] != "ok"][:1]
            probabilities = np.array([a["outputs"]["output"] for a in got[room]], np.float32).reshape(-1)
            np.testing.assert_allclose(probabilities, _wrapper_probabilities(audio), rtol=0, atol=1e-5)
    finally:
        raw.close()
        ra.stop()


def _keyword_spotter():
    """A PyTorch keyword spotter: a 2-layer GRU over frames [T, 1, 10] whose hidden state [2, 1, 24]
    (layers, batch, hidden) comes in and goes out, and a classifier on each frame."""
    import torch

    class KeywordSpotter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = torch.nn.GRU(10, 24, num_layers=2)
            self.head = torch.nn.Linear(24, 4)

        def forward(self, frames, h):
            y, h_next = self.gru(frames, h)
            return self.head(y), h_next

    torch.manual_seed(0)
    return KeywordSpotter().eval()


def _spot(module, frames: np.ndarray) -> np.ndarray:
    """The module's per-frame scores on the whole sequence, from a zero state."""
    import torch

    with torch.no_grad():
        return module(torch.from_numpy(frames), torch.zeros(2, 1, 24))[0].numpy()


def _convert_spotter(tmp_path, assets, module, frames: np.ndarray, **options) -> tuple:
    from converters.convert import ConvertOptions
    from converters.from_torch import convert_torch

    np.savez(tmp_path / "frames.npz", frames=frames)
    out = tmp_path / "kws.ewb"
    report = convert_torch(module, {"frames": frames[:5], "h": np.zeros((2, 1, 24), np.float32)},
                           tmp_path / "frames.npz", out, key_path=assets.key,
                           options=ConvertOptions(name="kws", state={"h": "output1"}, **options))
    return out, report


def test_a_pytorch_gru_keyword_spotter_converts_with_its_state_and_streams(tmp_path, assets):
    """Through the Python API, as a PyTorch user brings a keyword spotter: a 2-layer GRU whose
    hidden state is [layers, batch, hidden]. Its axes stay as traced (the first is the layers,
    not a batch), the time axis stays free, and the board's stream answers what the module
    gives on the whole sequence, however it is chunked."""
    module = _keyword_spotter()
    frames = np.random.default_rng(3).standard_normal((60, 1, 10)).astype(np.float32)
    out, report = _convert_spotter(tmp_path, assets, module, frames, precision="fp32")
    assert report["state"] == {"h": "output1"} and not report.get("notes")  # no fixed-batch re-export
    m = open_bundle(out, [load_public_key(assets.pub)]).manifest
    specs = {s.name: s.shape for s in m.inputs}
    assert specs == {"frames": [-1, 1, 10], "h": [2, 1, 24]}

    engine, model, _ = _engine(tmp_path, out, assets.pub)
    want = _spot(module, frames)
    whole = engine.infer_arrays("kws", {"frames": frames}, stream="a")[1]["output0"]
    np.testing.assert_allclose(whole, want, rtol=0, atol=1e-5)
    pieces = [engine.infer_arrays("kws", {"frames": frames[lo:lo + 7]}, stream="b")[1]["output0"]
              for lo in range(0, len(frames), 7)]
    np.testing.assert_allclose(np.concatenate(pieces), want, rtol=0, atol=1e-5)
    engine.close()


def test_the_keyword_spotter_streams_frame_by_frame_as_int8_tflite(tmp_path, assets):
    """The same spotter converted to INT8 TFLite: its GRU unrolled (converters/recurrent.py) and the
    model written for one frame a call, which the board's worker runs frame by frame on the
    stream's state. A stream's answers do not depend on how its frames are chunked, and stay
    within a few int8 steps of the module's on the whole sequence."""
    module = _keyword_spotter()
    frames = np.random.default_rng(3).standard_normal((120, 1, 10)).astype(np.float32)
    out, report = _convert_spotter(tmp_path, assets, module, frames, format="tflite")
    assert report["quality"]["top1_agreement"] >= 0.95, report["quality"]
    manifest = open_bundle(out, [load_public_key(assets.pub)]).manifest
    assert {s.name: s.shape for s in manifest.inputs} == {"frames": [1, 1, 10], "h": [2, 1, 24]}

    engine, model, selftest = _engine(tmp_path, out, assets.pub)
    assert selftest["max_abs_err"] <= manifest.selftest.atol
    whole = engine.infer_arrays("kws", {"frames": frames}, stream="a")[1]["output0"]
    pieces = [engine.infer_arrays("kws", {"frames": frames[lo:lo + 7]}, stream="b")[1]["output0"]
              for lo in range(0, len(frames), 7)]
    engine.close()
    np.testing.assert_array_equal(np.concatenate(pieces), whole)
    want = _spot(module, frames)
    assert np.abs(whole - want).max() <= 0.05 * float(want.max() - want.min())
    assert (whole.argmax(-1) == want.argmax(-1)).mean() >= 0.95


def test_static_int8_of_silero_is_the_quantizers_failure_named_and_leaves_no_file(tmp_path):
    """onnxruntime's static quantizer writes an invalid model for Silero's If branches: the
    converter says so, names the float alternative, and leaves nothing behind."""
    np.savez(tmp_path / "chunks.npz", input=_windows(_voice_like(1.0, 0))[:, CONTEXT:])
    out = tmp_path / "vad.ewb"
    r = _convert(_silero("silero_vad.onnx"), "--calibration", tmp_path / "chunks.npz", "--fix-input", "sr=16000",
                 "--state", "state=stateN", "--context", "input=64", "-o", out)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("edgeward convert: error:")]
    assert len(errors) == 1 and "onnxruntime's quantizer wrote an invalid static INT8 model" in errors[0], r.stderr
    assert "If/Loop branches" in errors[0] and "--precision fp32" in errors[0]
    assert not out.exists()  # (the progress lines before the error are the calibration's)

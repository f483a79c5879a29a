"""`edgeward`: one command for the workstation and the board.

    edgeward keys gen signing            make an ed25519 key pair for signing bundles
    edgeward convert model.onnx ...      FP32 -> INT8, measured, packed into a signed bundle (host)
    edgeward inspect model.ewb           print a bundle's manifest, verify hashes and signature
    edgeward agent --broker ... ...      run the board daemon
    edgeward fleet ls|deploy|watch       see and update devices over MQTT
    edgeward infer --device ID ...       run one inference on a device over MQTT

`convert` lives in the `converters` package with the heavy host libraries; this
module hands it the command line by name, so nothing on the board imports it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from . import __version__
from .errors import EdgewardError

DEFAULT_BROKER = "mqtt://localhost:1883"


def _add_broker_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("broker")
    g.add_argument("--broker", default=os.environ.get("EDGEWARD_BROKER", DEFAULT_BROKER),
                   help="mqtt://HOST:PORT or mqtts://HOST:PORT (env EDGEWARD_BROKER; default %(default)s)")
    g.add_argument("--username", default=os.environ.get("EDGEWARD_USERNAME"), help="broker user name")
    g.add_argument("--password-file", help="file holding the broker password")
    g.add_argument("--ca-file", help="CA certificate to verify the broker's TLS certificate (mqtts://)")
    g.add_argument("--cert-file", help="client certificate, for brokers that require one")
    g.add_argument("--key-file", help="the client certificate's private key")


def _mqtt_config(args):
    from .config import MqttConfig, TlsConfig
    from .schema import SchemaError, validate

    cfg = MqttConfig(url=args.broker, username=args.username, password_file=args.password_file,
                     tls=TlsConfig(ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file))
    try:
        validate(cfg, "broker")
    except SchemaError as exc:
        raise EdgewardError(str(exc)) from exc
    if not cfg.url.startswith(("mqtt://", "mqtts://")):
        raise EdgewardError(f"--broker {cfg.url!r} is not a broker URL", "use mqtt://HOST:PORT")
    return cfg


# ------------------------------------------------------------------ keys / inspect

def cmd_keys(args) -> int:
    from .signing import generate_keypair

    private, public, kid = generate_keypair(args.name)
    print(f"private key: {private}  (keep it on the workstation; sign with `edgeward convert --key {private}`)")
    print(f"public key:  {public}  (copy it to each board: `edgeward agent --trust-key {public.name}`)")
    print(f"key id:      {kid}")
    return 0


def cmd_inspect(args) -> int:
    from .bundle import open_bundle
    from .schema import to_dict
    from .signing import load_public_key
    from .tables import format_table

    keys = [load_public_key(k) for k in args.pubkey]
    opened = open_bundle(args.bundle, keys, allow_unsigned=not keys, verify_signature=bool(keys))
    m = opened.manifest
    if args.json:
        print(json.dumps({"manifest": to_dict(m), "signed": opened.signature is not None,
                          "signature_verified_by": opened.signer}, indent=2))
        return 0
    if keys:
        sig = f"verified (key {opened.signer})"
    elif opened.signature is not None:
        sig = f"present (key {opened.signature.get('key_id')}), not checked: pass --pubkey FILE to verify"
    else:
        sig = "none (unsigned: boards refuse it unless trust.allow_unsigned is set)"
    print(f"{m.name} v{m.version}  [{m.format}, {m.precision}, runtime {m.runtime}]")
    print(f"  created {m.created or '?'} by {m.producer or '?'}")
    print(f"  files: all {len(m.files)} match their sha256 and size; signature: {sig}")
    print(f"  memory: load {m.memory.load_mb:.1f} MB + runtime {m.memory.runtime_mb:.1f} MB (measured on {m.memory.measured_on or '?'})")
    if m.preprocessing.get("image"):
        from .images import describe

        try:
            print(f"  images: {describe(m.preprocessing['image'], m.preprocessing.get('classes'))}")
        except EdgewardError as exc:
            print(f"  images: {exc}")
    elif m.preprocessing.get("classes"):  # named by --labels
        from .images import describe_classes

        print(f"  labels: {describe_classes(m.preprocessing['classes'])}")
    print()
    rows = [["input", s.name, s.dtype, "x".join("N" if d == -1 else str(d) for d in s.shape)] for s in m.inputs]
    rows += [["output", s.name, s.dtype, "x".join("N" if d == -1 else str(d) for d in s.shape)] for s in m.outputs]
    print(format_table(["", "name", "dtype", "shape"], rows))
    if m.quality:
        print()
        print(format_table(["quality", "value"], [[k, v] for k, v in m.quality.items()]))
    return 0


# ------------------------------------------------------------------ agent

def cmd_agent(args) -> int:
    from .config import load_config
    from .logs import setup_logging

    overrides = {"mqtt.url": args.broker, "device.id": args.device_id, "store.path": args.store,
                 "memory.budget_mb": args.budget_mb, "trust.keys": args.trust_key or None,
                 "telemetry.interval_s": args.telemetry_interval, "log_level": args.log_level,
                 "api.socket": args.socket}
    if args.allow_unsigned:
        overrides["trust.allow_unsigned"] = True
    if args.action == "check":
        from .check import FAIL, render, run_checks

        cfg = load_config(args.config, overrides, check_files=False)
        findings = run_checks(cfg)
        if args.json:
            print(json.dumps([f.__dict__ for f in findings], indent=2))
        else:
            print(render(findings))
        return 1 if any(f.level == FAIL for f in findings) else 0
    if args.action == "status":
        from .status import read_status, render_status

        cfg = load_config(args.config, overrides, check_files=False)
        status = read_status(cfg.store.path)
        print(render_status(status, cfg.store.path))
        return 0 if status and status.get("running") else 3
    cfg = load_config(args.config, overrides)
    setup_logging(cfg.log_level)
    from .daemon import Agent

    agent = Agent(cfg)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.request_stop())
    agent.start(install=args.install)
    try:
        agent.run()
    finally:
        agent.stop()
    return 0


# ------------------------------------------------------------------ fleet / infer

def _fmt_age(ts: float) -> str:
    age = max(0.0, time.time() - ts)
    return f"{age:.0f}s ago" if age < 120 else f"{age / 60:.0f}m ago" if age < 7200 else f"{age / 3600:.0f}h ago"


def cmd_fleet_ls(args) -> int:
    from .fleet import Fleet
    from .schema import to_dict
    from .tables import format_table

    with Fleet(_mqtt_config(args)) as fleet:
        states = fleet.devices()
    if args.json:
        print(json.dumps([to_dict(s) for s in states], indent=2))
        return 0
    if not states:
        print(f"no devices have reported to {args.broker}")
        return 0
    rows = [[s.device, "online" if s.online else "OFFLINE",
             ", ".join(f"{m.name} v{m.version}" for m in s.models) or "-",
             f"{s.budget_mb} MB" if s.online else "", s.hardware.model or s.hardware.machine,
             s.agent_version or "?", ", ".join(s.runtime_versions.values()) or ", ".join(s.runtimes) or "-",
             _fmt_age(s.ts)] for s in states]
    print(format_table(["DEVICE", "STATE", "MODELS", "BUDGET", "HARDWARE", "AGENT", "RUNTIMES", "SINCE"], rows))
    return 0


def _is_rollout(args) -> bool:
    return bool(args.group or args.all or len(args.device or []) > 1 or args.canary or args.soak)


def cmd_fleet_deploy(args) -> int:
    from .fleet import Fleet

    if not (args.device or args.group or args.all):
        raise EdgewardError("say where to deploy", "use --device ID (repeatable), --group NAME or --all")
    if _is_rollout(args):
        return _rollout_new(args)
    device = args.device[0]

    def progress(stage: str, done: int, total: int) -> None:
        if sys.stderr.isatty() or done == total:
            print(f"\r  {stage}: {done}/{total} chunks", end="\n" if done == total else "", file=sys.stderr)

    with Fleet(_mqtt_config(args)) as fleet:
        print(f"deploying {args.bundle} to {device} ...", file=sys.stderr)
        reply = fleet.deploy(args.bundle, device, chunk_size=args.chunk_kb * 1024,
                             timeout=args.timeout, progress=progress, url=args.url)
    d = reply.data
    was = f" (was v{d['previous_version']})" if d.get("previous_version") else ""
    st = d.get("self_test", {})
    print(f"{device}: {d['name']} v{d['version']} is serving{was}; self-test passed "
          f"(max abs err {st.get('max_abs_err')}, top-1 agreement {st.get('top1_agreement')}), "
          f"cost {d.get('cost_mb')} MB")
    return 0


def _state_dir(args) -> Path:
    from .rollout import default_state_dir

    return Path(args.state_dir) if args.state_dir else default_state_dir()


def _print_rollout(s) -> None:
    from .tables import format_table

    print(f"rollout {s.id}: {s.model} v{s.version} — {s.state.upper()}"
          + (f" at wave {s.wave + 1}/{len(s.waves)}" if s.state != "done" else f", {len(s.waves)} wave(s)"))
    if s.reason:
        print(f"  reason: {s.reason}")
    rows = [[i + 1, d, s.devices[d].status, s.devices[d].detail[:90]] for i, w in enumerate(s.waves) for d in w]
    print(format_table(["WAVE", "DEVICE", "STATUS", "DETAIL"], rows, align="rlll"))


def _run_rollout(r) -> int:
    state = r.run()
    _print_rollout(state)
    print(f"\n(state kept in {r.path}; `edgeward fleet rollout status {state.id}`)", file=sys.stderr)
    return 0 if state.state == "done" else 1


def _rollout_new(args) -> int:
    from .fleet import Fleet
    from .rollout import Gates, Rollout

    with Fleet(_mqtt_config(args)) as fleet:
        online = [s for s in fleet.devices() if s.online]
        if args.all:
            targets = [s.device for s in online]
        elif args.group:
            targets = [s.device for s in online if args.group in s.groups]
        else:
            targets = list(args.device)
            offline = sorted(set(targets) - {s.device for s in online})
            if offline:
                raise EdgewardError(f"not online: {', '.join(offline)}", "check `edgeward fleet ls`")
        gates = Gates(soak_s=args.soak or 0.0, max_error_rate=args.max_error_rate, max_p95_ms=args.max_p95_ms)
        r = Rollout.create(fleet, args.bundle, targets, args.canary, args.waves, gates, _state_dir(args),
                           progress=lambda m: print(m, file=sys.stderr, flush=True), url=args.url)
        print(f"rollout {r.s.id}: {r.s.model} v{r.s.version} to {len(r.s.devices)} device(s) in "
              f"{len(r.s.waves)} wave(s) {[len(w) for w in r.s.waves]}", file=sys.stderr)
        return _run_rollout(r)


def cmd_fleet_rollout(args) -> int:
    from .fleet import Fleet
    from .rollout import Rollout, list_rollouts
    from .tables import format_table

    if args.rollout_command == "ls":
        rows = [[s.id, f"{s.model} v{s.version}", s.state, f"{min(s.wave + 1, len(s.waves))}/{len(s.waves)}",
                 len(s.devices), time.strftime("%Y-%m-%d %H:%M", time.localtime(s.updated))]
                for s in list_rollouts(_state_dir(args))]
        print(format_table(["ID", "MODEL", "STATE", "WAVE", "DEVICES", "UPDATED"], rows) if rows else "no rollouts")
        return 0
    with Fleet(_mqtt_config(args)) as fleet:
        r = Rollout.load(fleet, args.id, _state_dir(args), progress=lambda m: print(m, file=sys.stderr, flush=True))
        if args.rollout_command == "status":
            _print_rollout(r.s)
            return 0 if r.s.state == "done" else 1
        return _run_rollout(r)


def cmd_fleet_rollback(args) -> int:
    from .fleet import Fleet

    with Fleet(_mqtt_config(args)) as fleet:
        d = fleet.rollback(args.device, args.model, args.version, timeout=args.timeout).data
    st = d.get("self_test", {})
    print(f"{args.device}: {d['name']} v{d['version']} is serving again (was v{d['previous_version']}); "
          f"self-test passed (top-1 agreement {st.get('top1_agreement')})")
    return 0


def cmd_fleet_watch(args) -> int:
    from .fleet import Fleet
    from .watchboard import WatchBoard

    stop = threading.Event()
    if args.seconds:
        threading.Timer(args.seconds, stop.set).start()
    seen = 0
    kinds = tuple(args.kind) if args.kind else ("state", "telemetry", "events")
    live = sys.stdout.isatty() and not args.lines
    as_table = args.table or live
    board, drawn = WatchBoard(), 0.0

    def draw() -> None:
        print(("\x1b[H\x1b[2J" if live else "") + time.strftime("%H:%M:%S  ") + f"{args.broker}\n"
              + board.render(), flush=True)

    with Fleet(_mqtt_config(args)) as fleet:
        try:
            for device, kind, msg in fleet.watch(stop, kinds=kinds, device=args.device or "+"):
                if as_table:
                    board.update(device, kind, msg)
                    if live and time.monotonic() - drawn > 0.5:
                        draw()
                        drawn = time.monotonic()
                else:
                    print(_watch_line(device, kind, msg), flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    break
        except KeyboardInterrupt:
            pass
        finally:
            stop.set()
    if as_table:
        draw()
    return 0


def _watch_line(device: str, kind: str, msg: dict) -> str:
    t = time.strftime("%H:%M:%S", time.localtime(msg.get("ts", time.time())))
    if kind == "telemetry":
        models = "; ".join(f"{n} v{s.get('version')}: {s.get('requests')} req, {s.get('errors')} err, "
                           f"p50 {s.get('p50_ms')} ms" for n, s in msg.get("models", {}).items())
        temp = f", {msg['temperature_c']} °C" if msg.get("temperature_c") is not None else ""
        used = msg.get("memory_mb") or msg.get("rss_mb")  # agents before memory_mb counted RSS
        return (f"{t} {device:<16} telemetry  memory {used} MB / {msg.get('budget_mb')} MB, "
                f"cpu {msg.get('cpu_percent')}%, load {msg.get('load_1m')}{temp}  {models}")
    if kind == "state":
        models = ", ".join(f"{m['name']} v{m['version']}" for m in msg.get("models", []))
        return f"{t} {device:<16} state      {'online' if msg.get('online') else 'OFFLINE'}  {models}"
    return f"{t} {device:<16} {msg.get('level', 'info'):<10} {msg.get('kind')}: {msg.get('message')}"


def cmd_infer(args) -> int:
    import numpy as np

    if not args.device:  # on the board: a batch job through the local agent
        from .batchjob import run_job

        if args.stream:
            raise EdgewardError("--stream is for one request to a device", "add --device, or drop --stream")
        if not args.output:
            raise EdgewardError("say where the results go", "pass --output results.jsonl")
        summary = run_job(args.socket, args.model, args.input, args.output, batch=args.batch,
                          preprocess=args.preprocess, draw=args.draw)
        print(f"{summary['samples']} samples through {summary['model']} v{summary['version']} in "
              f"{summary['seconds']} s -> {args.output}")
        return 0
    from . import protocol
    from .fleet import Fleet
    from .images import is_image

    path = Path(args.input)
    if path.is_dir():
        raise EdgewardError("over MQTT, --input is one file (.npy, .npz or an image); folders are for batch jobs "
                            "on the board", "run `edgeward infer --model NAME --input DIR` on the board")
    tensors, image = None, None
    if args.draw and not is_image(path):
        raise EdgewardError("--draw shows a detector's boxes on a photo, and the input is an array file",
                            "pass a photo (.jpg, .png, ...), or drop --draw")
    if is_image(path):  # sent as it is: the board prepares it as the model's bundle says
        try:
            image = path.read_bytes()
        except OSError as exc:
            raise EdgewardError(f"cannot read {path}: {exc.strerror}") from exc
    else:
        if args.preprocess:
            raise EdgewardError("--preprocess describes image files, but the input is an array file",
                                "drop --preprocess, or pass an image")
        try:
            loaded = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise EdgewardError(f"cannot read {path} as .npy/.npz: {exc}", "save inputs with numpy.save") from exc
        tensors = dict(loaded) if isinstance(loaded, np.lib.npyio.NpzFile) else {args.input_name: loaded}
    with Fleet(_mqtt_config(args)) as fleet:
        t0 = time.perf_counter()
        result = fleet.infer(args.device, args.model, tensors, timeout=args.timeout, image=image,
                             preprocess=args.preprocess, stream=args.stream)
        rtt = (time.perf_counter() - t0) * 1000
    outputs = result["outputs"]
    if args.output:
        np.savez(args.output, **outputs)
    if args.draw:
        if "detections" not in result:
            raise EdgewardError(f"--draw shows a detector's boxes, and {args.model} on {args.device} answered "
                                "with no detections list (not a detector)", "drop --draw")
        from .images import draw_detections

        draw_detections(path, result["detections"], args.draw)
    if args.json:
        print(json.dumps({"model": result["model"], "version": result["version"], "round_trip_ms": round(rtt, 2),
                          **{k: result[k] for k in protocol.ANSWER_LABELS if k in result},
                          "outputs": {k: v.tolist() for k, v in outputs.items()}}))
        return 0
    print(f"{args.device}/{result['model']} v{result['version']} answered in {rtt:.1f} ms")
    if "top1" in result:
        print(f"  class: {result.get('class', result['top1'])}")
    if "detections" in result:
        print(detection_table(result["detections"]))
    for name, arr in outputs.items():
        line = f"  {name}: {arr.dtype} {list(arr.shape)}"
        if arr.ndim == 2 and arr.shape[1] > 1 and "detections" not in result:  # a detector's rows are not scores
            line += f"  top-1 per row: {arr.argmax(1).tolist()}"
        print(line)
    return 0


def detection_table(found: list[dict]) -> str:
    """A detector's answer as a person reads it: one row per detection, best first."""
    from .tables import format_table

    if not found:
        return "  no detections"
    rows = [[d.get("class", d["class_id"]), f"{d['score']:.3f}", " ".join(f"{v:.3f}" for v in d["box"])]
            for d in found]
    return "\n".join("  " + line for line in format_table(["class", "score", "box (ymin xmin ymax xmax)"], rows,
                                                          align="lrl").splitlines())


def cmd_bench(args) -> int:
    from .boardbench import bench, render

    try:
        clients = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        clients = []
    if not clients or min(clients) < 1 or max(clients) > 256:
        raise EdgewardError(f"--clients {args.clients!r} is not a list of 1 to 256", "pass e.g. --clients 1,8,32")
    if not 0 < args.seconds <= 600:
        raise EdgewardError(f"--seconds {args.seconds} is out of range", "pass 0.1 to 600")
    image = None
    if args.image:
        try:
            image = Path(args.image).read_bytes()
        except OSError as exc:
            raise EdgewardError(f"cannot read {args.image}: {exc.strerror}") from exc
    result = bench(args.socket, args.model, clients, args.seconds, bare=args.bare, image=image)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 1 if any(s["errors"] for s in result["steps"]) else 0


# ------------------------------------------------------------------ parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeward", description="Quantize models, ship them to boards, keep them running.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run `edgeward COMMAND --help` for each command's options.")
    p.add_argument("--version", action="version", version=f"edgeward {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser("convert", help="FP32 model -> INT8, measured against the original, packed into a signed bundle",
                   add_help=False)

    k = sub.add_parser("keys", help="make an ed25519 key pair for signing bundles")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kg = ksub.add_parser("gen", help="write NAME.key (private, 0600) and NAME.pub")
    kg.add_argument("name", help="path prefix, e.g. keys/signing")
    kg.set_defaults(func=cmd_keys)

    i = sub.add_parser("inspect", help="show a bundle's manifest; verify its hashes and signature")
    i.add_argument("bundle")
    i.add_argument("--pubkey", action="append", default=[], metavar="FILE",
                   help="trusted public key to verify the signature with (repeatable)")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    i.set_defaults(func=cmd_inspect)

    a = sub.add_parser("agent", help="run the board daemon, check the board, or show its local status",
                       description="Run the agent (default); `edgeward agent check` to check, before it runs, "
                                   "everything it needs (config, trusted keys, runtimes, memory, store, socket, "
                                   "installed models, the broker with its TLS and credentials); `edgeward agent "
                                   "status` to show what the agent on this board is doing. Flags override the "
                                   "config file; without one, defaults apply.")
    a.add_argument("action", nargs="?", choices=["run", "check", "status"], default="run",
                   help="run the daemon (default); check the board (exit 1 if a check fails); or print its "
                        "local status (exit 3 when not running)")
    a.add_argument("--json", action="store_true", help="with check: the findings as JSON")
    a.add_argument("--config", help="agent.yaml (see docs/ARCHITECTURE.md for every key)")
    a.add_argument("--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT (mqtt.url)")
    a.add_argument("--device-id", help="this device's id in topics (device.id; default: the host name)")
    a.add_argument("--store", help="model store folder (store.path)")
    a.add_argument("--budget-mb", type=int, help="RAM budget in MB for the agent and its model workers "
                                                 "(memory.budget_mb)")
    a.add_argument("--socket", help="the local API's Unix socket (api.socket; default STORE/agent.sock, \"off\" for none)")
    a.add_argument("--trust-key", action="append", metavar="FILE", help="trusted public key (trust.keys, repeatable)")
    a.add_argument("--allow-unsigned", action="store_true", help="accept unsigned bundles (development only)")
    a.add_argument("--install", action="append", default=[], metavar="BUNDLE",
                   help="verify and install this bundle before starting (skipped if that version is installed)")
    a.add_argument("--telemetry-interval", type=float, help="seconds between telemetry messages")
    a.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    a.set_defaults(func=cmd_agent)

    f = sub.add_parser("fleet", help="list, watch and update devices over MQTT")
    fsub = f.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)
    ls = fsub.add_parser("ls", help="table of devices, their state and models")
    ls.add_argument("--json", action="store_true")
    _add_broker_args(ls)
    ls.set_defaults(func=cmd_fleet_ls)
    d = fsub.add_parser("deploy", help="send a bundle to devices: one directly, or many as a staged rollout",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="One --device without gates: a direct deploy that waits until the device serves it.\n"
                               "Otherwise a staged rollout: a canary wave, then the rest in --waves waves; each wave\n"
                               "must deploy and self-test, then keep its error rate (and p95) in bounds for --soak\n"
                               "seconds, or the rollout halts and that wave is rolled back. The state is saved:\n"
                               "`edgeward fleet rollout resume ID` continues an interrupted rollout.\n\n"
                               "  edgeward fleet deploy m.ewb --group kitchen --canary 10% --waves 3 --soak 120")
    d.add_argument("bundle")
    d.add_argument("--device", action="append", help="a target device (repeatable)")
    d.add_argument("--group", "--tag", dest="group",
                   help="every online device with this group/tag (the device's device.groups list)")
    d.add_argument("--all", action="store_true", help="every online device")
    d.add_argument("--canary", help="first wave: N devices or P%% of them")
    d.add_argument("--waves", type=int, default=1, help="waves after the canary (default %(default)s)")
    d.add_argument("--soak", type=float, help="seconds each wave must stay healthy (use > 2 telemetry intervals)")
    d.add_argument("--max-error-rate", type=float, default=0.05, help="health gate (default %(default)s)")
    d.add_argument("--max-p95-ms", type=float, help="health gate on p95 latency of the new version")
    d.add_argument("--state-dir", help="where rollout state is kept (default ~/.local/state/edgeward/rollouts)")
    d.add_argument("--chunk-kb", type=int, default=256, help="chunk size in kB (default %(default)s)")
    d.add_argument("--url", help="devices download the bundle from this http(s) URL (resumable) instead of "
                                 "receiving it as MQTT chunks; BUNDLE is still read here for its hash and manifest")
    d.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the device (default %(default)s)")
    _add_broker_args(d)
    d.set_defaults(func=cmd_fleet_deploy)
    ro = fsub.add_parser("rollout", help="list staged rollouts, show one, or resume an interrupted one")
    rosub = ro.add_subparsers(dest="rollout_command", metavar="ACTION", required=True)
    for name, text in (("ls", "list rollouts"), ("status", "show one rollout"), ("resume", "continue a rollout")):
        rp = rosub.add_parser(name, help=text)
        if name != "ls":
            rp.add_argument("id")
        rp.add_argument("--state-dir", help="where rollout state is kept")
        _add_broker_args(rp)
        rp.set_defaults(func=cmd_fleet_rollout)
    rb = fsub.add_parser("rollback", help="serve an older installed version again (the previous one by default)")
    rb.add_argument("--device", required=True)
    rb.add_argument("--model", required=True)
    rb.add_argument("--version", type=int, help="which older installed version (default: the one before)")
    rb.add_argument("--timeout", type=float, default=120.0)
    _add_broker_args(rb)
    rb.set_defaults(func=cmd_fleet_rollback)
    w = fsub.add_parser("watch", help="a live table of devices and models (or a line per message)",
                        description="On a terminal: a table of every device and model, redrawn as state, telemetry "
                                    "and events arrive. Piped, or with --lines: one line per message.")
    w.add_argument("--lines", action="store_true", help="one line per message instead of the live table")
    w.add_argument("--table", action="store_true", help="print the table (once, at the end) even when piped")
    w.add_argument("--device", help="only this device")
    w.add_argument("--kind", action="append", choices=["state", "telemetry", "events"], help="only these (repeatable)")
    w.add_argument("--count", type=int, help="stop after this many messages")
    w.add_argument("--seconds", type=float, help="stop after this many seconds")
    _add_broker_args(w)
    w.set_defaults(func=cmd_fleet_watch)

    n = sub.add_parser("infer", help="run a model: on a device over MQTT, or a batch job on this board",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="With --device: one request to that device over MQTT, outputs printed or saved;\n"
                                   "an image file goes as it is and the device prepares it as the bundle says.\n"
                                   "Without: a batch job through the agent on this board (its local API): every\n"
                                   ".npy/.npz under --input, or every image (prepared as the model's bundle says),\n"
                                   "--batch samples per request, one JSON line per sample.",
                       epilog="  edgeward infer --device pi-01 --model digits --input x.npy\n"
                              "  edgeward infer --device pi-01 --model cam --input door.jpg           # prints the class\n"
                              "  edgeward infer --model digits --input samples/ --batch 32 --output results.jsonl\n"
                              "  edgeward infer --model cam --input photos/ --output results.jsonl   # .jpg/.png files\n"
                              "  edgeward infer --model yard --input photos/ --output found.jsonl --draw boxes/  # a detector")
    n.add_argument("--device", help="the device to ask over MQTT (leave out for a local batch job)")
    n.add_argument("--model", required=True)
    n.add_argument("--input", required=True,
                   help=".npy (one input), .npz (named inputs) or an image file; in a batch job also a folder of "
                        "them")
    n.add_argument("--preprocess", metavar="SPEC",
                   help="images: how they become the input, for a bundle that does not say "
                        "(as edgeward convert --preprocess, e.g. imagenet)")
    n.add_argument("--input-name", default="input", help="name for a .npy input (models with one input accept any)")
    n.add_argument("--stream", metavar="ID",
                   help="with --device, a stateful model's stream: its state carries on from the stream's last call")
    n.add_argument("--output", help="save the outputs: .npz with --device, .jsonl for a batch job")
    n.add_argument("--batch", type=int, default=32, help="samples per request in a batch job (default %(default)s)")
    n.add_argument("--draw", metavar="PATH",
                   help="a detector run on photos: write them again with their boxes drawn (a folder for a batch "
                        "job, a file such as boxes.png with --device)")
    n.add_argument("--socket", default=os.environ.get("EDGEWARD_SOCKET", "/run/edgeward/agent.sock"),
                   help="the agent's local API socket (default %(default)s)")
    n.add_argument("--json", action="store_true")
    n.add_argument("--timeout", type=float, default=10.0)
    _add_broker_args(n)
    n.set_defaults(func=cmd_infer)

    b = sub.add_parser("bench", help="how fast a serving model answers on this board, through the local API",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Send 1-row requests of random data of the model's input shapes to the agent\n"
                                   "running on this board, as local apps do, for --seconds at each number of\n"
                                   "concurrent callers; print rows/s and p50/p95/p99 latency per step. Exits 1 if\n"
                                   "any request failed.\n\n"
                                   "--bare also times the same model file in the bare runtime (same threads, a\n"
                                   "process of its own) and prints the agent's latency, rows/s and memory beside it.",
                       epilog="  edgeward bench --model digits\n"
                              "  edgeward bench --model digits --bare          # the agent against the bare runtime\n"
                              "  edgeward bench --model cam --clients 1,4,16 --seconds 10 --json")
    b.add_argument("--model", required=True, help="a model the agent serves (edgeward agent status lists them)")
    b.add_argument("--clients", default="1,8", help="concurrent callers, one step each (default %(default)s)")
    b.add_argument("--seconds", type=float, default=3.0, help="per step (default %(default)s)")
    b.add_argument("--socket", default=os.environ.get("EDGEWARD_SOCKET", "/run/edgeward/agent.sock"),
                   help="the agent's local API socket (default %(default)s)")
    b.add_argument("--bare", action="store_true",
                   help="also time the model in the bare runtime, side by side (needs read access to the store)")
    b.add_argument("--image", metavar="FILE",
                   help="send this photo (JPEG, PNG, ...) with every request, prepared on the board as the bundle "
                        "says: camera frames per second, decoding included")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "convert":
            try:
                converters_cli = importlib.import_module("converters.cli")
            except ImportError as exc:
                raise EdgewardError(f"conversion needs the host extras ({exc.name} is missing)",
                                    "pip install 'edgeward[host]' on the workstation") from exc
            return converters_cli.main(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except EdgewardError as exc:
        print(f"edgeward: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `edgeward ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 141


if __name__ == "__main__":
    sys.exit(main())

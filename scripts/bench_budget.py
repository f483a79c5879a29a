#!/usr/bin/env python3
"""What memory.budget_mb counts: the agent with 0 to 3 models loaded, its memory measured as
PSS (what the budget counts, agent/budget.py) and as a sum of RSS over the agent and its
workers, side by side in one run. An RSS sum counts the pages every worker maps (libpython,
numpy, the runtime's library) once per worker; PSS counts each page once.

    .venv/bin/python scripts/bench_budget.py [--format onnx|tflite]      # about a minute
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_agent import AgentProc, tree_memory  # noqa: E402

from agent.devbroker import LocalBroker  # noqa: E402
from agent.signing import generate_keypair  # noqa: E402
from agent.tables import format_table  # noqa: E402
from converters import zoo  # noqa: E402
from converters.convert import ConvertOptions, convert_onnx  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", choices=["onnx", "tflite"], default="onnx", help="the models' format (default onnx)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgeward-bench-budget-"))
    try:
        say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        say("preparing: INT8 bundles of three models ...")
        key, pub, _ = generate_keypair(work / "signing")
        digits_calib, digits_eval = zoo.write_digits_npz(work / "digits")
        flat_calib, flat_eval = zoo.write_digits_npz(work / "flat", flat=True)
        img_calib, img_eval = zoo.write_image_npz(work / "images", size=128)
        zoo.build_digits_cnn(work / "digits.onnx")
        sources = [("digits", work / "digits.onnx", digits_calib, digits_eval),
                   ("mobilenet", zoo.build_mobilenet_like(work / "mobilenet.onnx", size=128), img_calib, img_eval),
                   ("mlp", zoo.build_wide_mlp(work / "mlp.onnx", hidden=1024), flat_calib, flat_eval)]
        bundles = []
        for name, model, calib, evaluation in sources:
            bundles.append(work / f"{name}.ewb")
            convert_onnx(model, calib, bundles[-1], key, evaluation,
                         ConvertOptions(name=name, format=args.format, allow_worse=True))
        broker = LocalBroker(workdir=work / "broker").start()
        rows, prev = [], None
        try:
            for n in range(len(bundles) + 1):
                say(f"the agent with {n} model(s) ...")
                agent = AgentProc(work, f"m{n}", broker.url, pub, bundles[:n], {})
                try:
                    time.sleep(1.0)
                    rss, pss = tree_memory(agent.proc.pid)
                finally:
                    agent.stop()
                added = "-" if prev is None else f"+{rss - prev[0]:.1f} / +{pss - prev[1]:.1f}"
                rows.append([n, ", ".join(s[0] for s in sources[:n]) or "(none)", f"{rss:.1f}", f"{pss:.1f}",
                             f"{pss / rss:.2f}", added])
                prev = (rss, pss)
        finally:
            broker.stop()
        print(f"The agent and its workers, INT8 {args.format} models, streaming mode (MB):\n")
        print(format_table(["models", "loaded", "RSS sum", "PSS (the budget)", "PSS/RSS", "last model added: RSS / PSS"],
                           rows, align="rlrrrr"))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)



if __name__ == "__main__":
    sys.exit(main())

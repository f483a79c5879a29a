"""The accuracy guard: find a quantization whose quality loss stays within a budget, or say what was tried.

`edgeward convert --max-drop 0.01` allows at most 1 percentage point of top-1 accuracy
lost against FP32 (with labels), or 1 % of samples whose top-1 class changes (without).
The search is ordered by what usually helps most for the least cost:

1. the settings asked for;
2. the other per-channel / calibration-method combinations;
3. from the best of those, keeping the most sensitive layers in float, one more at a
   time: each candidate layer is tried alone, and the one that helps most is kept.

It stops at the first result within budget, or fails with a table of every attempt.
A second rule, applied by default after the search, refuses a "quantized" model that is
larger or meaningfully slower than its FP32 source (`worse_than_fp32`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from agent.errors import ConversionError
from agent.tables import format_table

METHODS = ("minmax", "entropy", "percentile")
SLOWER_TOLERANCE = 1.10      # INT8 may be up to 10 % slower than FP32 ...
SLOWER_MARGIN_MS = 0.05      # ... or 0.05 ms, whichever is more, before it counts as slower (timer noise)


@dataclass
class Settings:
    per_channel: bool = True
    method: str = "minmax"
    exclude: list[str] = field(default_factory=list)

    def label(self) -> str:
        kept = f", float: {', '.join(self.exclude)}" if self.exclude else ""
        if self.method == "dynamic":
            return f"dynamic{kept}"
        return f"{self.method}, {'per-channel' if self.per_channel else 'per-tensor'}{kept}"


@dataclass
class Attempt:
    settings: Settings
    drop: float | None          # None: the quantizer failed
    note: str = ""


def quality_drop(quality: dict) -> float:
    """The loss the budget is about: top-1 accuracy points with labels, else the share of changed top-1."""
    if "accuracy_drop_pp" in quality:
        return quality["accuracy_drop_pp"] / 100
    if "top1_agreement" in quality:
        return 1 - quality["top1_agreement"]
    if "detection_agreement" in quality:  # a detector's: FP32's detections missed or added
        return 1 - quality["detection_agreement"]
    raise ConversionError("--max-drop needs a classifier or a sequence of classes ([N, classes] or [N, T, classes] "
                          "as the first output), a detector's detections or evaluation labels to measure a drop",
                          "leave out --max-drop and read the error figures in the report")


def search(first: Settings, try_settings: Callable[[Settings], dict], max_drop: float, candidates: list[str],
           max_float_layers: int = 3, max_attempts: int = 24, calibrated: bool = True,
           methods: tuple[str, ...] = METHODS,
           progress: Callable[[str, int, int], None] | None = None) -> tuple[Settings, dict, list[Attempt]]:
    """Return (settings, quality, attempts) for the first quantization within `max_drop`.

    `try_settings` quantizes and measures (raising ConversionError if it cannot); `candidates`
    are the layers that may be kept in float, most promising first. Without calibration
    (dynamic quantization) only keeping layers in float is searched; `methods` are the calibration
    methods the target can use (a TFLite source has no entropy calibration).
    """
    say = progress or (lambda *a: None)
    attempts: list[Attempt] = []
    results: dict[str, dict] = {}  # settings label -> quality

    def attempt(s: Settings) -> float | None:
        if len(attempts) >= max_attempts:
            return None
        say("accuracy search", len(attempts) + 1, max_attempts)
        try:
            quality = try_settings(s)
        except ConversionError as exc:
            attempts.append(Attempt(s, None, exc.message[:80]))
            return None
        drop = quality_drop(quality)
        attempts.append(Attempt(s, drop))
        results[s.label()] = quality
        return drop

    order = [first] + [Settings(pc, m, list(first.exclude)) for pc in (True, False) for m in methods
                       if (pc, m) != (first.per_channel, first.method) and calibrated]
    for s in order:
        drop = attempt(s)
        if drop is not None and drop <= max_drop:
            return s, results[s.label()], attempts
    scored = [a for a in attempts if a.drop is not None]
    if not scored:
        raise ConversionError(f"no quantization of this model worked; tried:\n{report(attempts, max_drop)}",
                              "exclude the failing nodes with --exclude-node, or ship FP32 with --precision fp32")
    best = min(scored, key=lambda a: a.drop).settings
    for _ in range(max_float_layers):
        trials = []
        for layer in candidates:
            if layer in best.exclude:
                continue
            s = Settings(best.per_channel, best.method, best.exclude + [layer])
            drop = attempt(s)
            if drop is None:
                continue
            if drop <= max_drop:
                return s, results[s.label()], attempts
            trials.append((drop, s))
        if not trials:
            break
        best = min(trials, key=lambda t: t[0])[1]
    raise ConversionError(f"no quantization stays within --max-drop {max_drop:g}; tried:\n{report(attempts, max_drop)}",
                          "raise --max-drop, give more calibration data, or ship FP32 with --precision fp32")


def report(attempts: list[Attempt], max_drop: float) -> str:
    rows = [[i + 1, a.settings.label(), "failed" if a.drop is None else f"{a.drop * 100:.2f} %",
             a.note or ("within budget" if a.drop is not None and a.drop <= max_drop else "")]
            for i, a in enumerate(attempts)]
    return format_table(["#", "settings", "drop", ""], rows, align="rlrl")


BROKEN_MEAN_ERROR = 0.1
"""A quantized model whose mean error passes this share of its output's range is broken, not
merely less precise: its answers are not the float model's (the digits CNN's INT8 errs by
under 1 %; a YOLOv8n's heads, of random weights, by 1.7 %)."""

BROKEN_DETECTION_AGREEMENT = 0.5
"""A detector whose INT8 model finds under half the float model's detections (or twice as many) is
broken: rounding moves boxes and scores a little, it does not replace the answer."""


def broken(quality: dict) -> str | None:
    """Why the quantized model's answers are wrong rather than rounded, or None. onnxruntime's
    quantizer, for one, drops a ReLU into the next quantization's range even where calibration
    saw that range as all zero, and the layer after it then reads the ReLU's negative input."""
    if "detection_agreement" in quality:
        if quality["detection_agreement"] >= BROKEN_DETECTION_AGREEMENT:
            return None
        return (f"only {quality['detection_agreement']:.0%} of its detections match the float model's "
                f"({quality['detections_matched']} of FP32's {quality['detections_fp32']}, with "
                f"{quality['detections_int8']} found)")
    mean, span = quality.get("mean_abs_err", 0.0), quality.get("output_range", 0.0)
    if mean <= BROKEN_MEAN_ERROR * span or (span == 0 and mean <= 1e-6):
        return None
    where = f" on output {quality['worst_output']}" if quality.get("worst_output") else ""
    return f"its answers are off by {mean:.4g} on average{where}, against an output range of {span:.4g}"


def worse_than_fp32(sizes: dict, latency: dict, judge_latency: bool = True) -> str | None:
    """Why this INT8 model is not worth shipping over FP32 (larger, or meaningfully slower), or None.
    `judge_latency=False` when this host's timing says nothing of the board's (see targets)."""
    problems = []
    if sizes["int8_bytes"] > sizes["fp32_bytes"]:
        problems.append(f"larger ({sizes['int8_bytes'] / 1024:.1f} kB vs {sizes['fp32_bytes'] / 1024:.1f} kB)")
    f, q = latency["fp32"]["p50"], latency["int8"]["p50"]
    if judge_latency and q > max(f * SLOWER_TOLERANCE, f + SLOWER_MARGIN_MS):
        problems.append(f"slower ({q:.3f} ms vs {f:.3f} ms p50 on this CPU)")
    return " and ".join(problems) or None

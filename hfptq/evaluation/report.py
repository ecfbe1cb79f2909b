"""The quality report: what quantization cost, as JSON, Markdown, a console table and plots.

A :class:`QualityReport` is filled section by section (every section is optional; missing ones
are left out of every output) and rendered with :meth:`QualityReport.to_dict`,
:meth:`~QualityReport.to_markdown`, :meth:`~QualityReport.console_summary` or
:meth:`~QualityReport.save`.

JSON schema (``schema_version`` 1)
----------------------------------
Top-level keys, in this order; all but the first three are present only when filled in::

    schema_version  1
    model           model name or path
    created_at      ISO-8601 UTC timestamp
    plan            plan summary as given by the caller (any JSON value)
    calibration     {"dataset", "samples", "seq_len", "observer", "activations", ...extra}
                    ("activations" is a sentence: static / dynamic / not quantized)
    algorithms      [{"name", "details": {...}}]
    perplexity      {"dataset", "seq_len", "stride", "num_tokens", "num_windows",
                     "float", "quantized", "abs_drop", "rel_drop", "float_nll", "quantized_nll"}
    accuracy        {task: {"num_examples", "metrics": {metric: {"float", "quantized",
                     "abs_drop", "rel_drop"}}}}
    size            {"float_bytes", "quantized_bytes", "ratio", "saved_bytes",
                     "by_precision": {"float": {precision: bytes}, "quantized": {...}},
                     "checkpoint": {"float_bytes", "quantized_bytes", "ratio"} (optional)}
    latency         {"settings": {...}, "float": {...}, "quantized": {...},
                     "prefill_speedup", "decode_speedup"}
    peak_memory     {"kind", "float_bytes", "quantized_bytes", "ratio"}
    layer_errors    [{"module", "sqnr_db", "rel_error", "numel"}]
    sensitivity     [{"rank", "module", "loss", "loss_increase", "rel_increase", "method" (optional)}]
    timings         {step: seconds}
    notes           [str]

Conventions: ``abs_drop`` and ``rel_drop`` are *degradations* (positive = the quantized model is
worse): ``quantized - float`` for perplexity, ``float - quantized`` for accuracies; ratios are
``float / quantized`` for sizes and memory (how many times smaller) and speed-ups are
``> 1`` when the quantized model is faster. Non-finite numbers (an SQNR of ``inf`` for an exact
module) are written to JSON as the strings ``"inf"``, ``"-inf"``, ``"nan"`` so the file is
strict JSON; :meth:`QualityReport.from_json` turns them back into floats.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from hfptq.errors import ConfigError
from hfptq.evaluation.perplexity import PerplexityResult, compare_perplexity
from hfptq.evaluation.size import format_bytes

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

#: Accuracy metric keys recognised by :meth:`QualityReport.add_accuracy`, in display order.
ACCURACY_METRICS = ("acc", "acc_norm", "accuracy", "accuracy_norm")

#: Latency fields kept per model in the report.
_LATENCY_FIELDS = (
    "prefill_wall_s", "prefill_cpu_s", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_token",
    "generate_wall_s", "generate_cpu_s", "threads", "peak_rss_bytes", "peak_gpu_bytes", "backends", "cpu_features",
)
_LATENCY_SETTINGS = ("device", "threads", "batch_size", "prompt_len", "new_tokens", "repeats", "warmup")

_ACTIVATION_WORDS = {
    "static": "static: activation ranges measured on the calibration data and frozen",
    "dynamic": "dynamic: activation ranges computed per token at run time",
    "none": "not quantized (weight-only)",
}

_SECTION_ORDER = (
    "plan", "calibration", "algorithms", "perplexity", "accuracy", "size", "latency", "peak_memory",
    "layer_errors", "sensitivity", "timings", "notes",
)

_MATPLOTLIB_WARNED = False


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return float(numerator) / float(denominator)


def _rel(delta: float, base: float) -> Optional[float]:
    return delta / base if base else None



def _encode_nonfinite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _encode_nonfinite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode_nonfinite(v) for v in value]
    return value


def _decode_nonfinite(value: Any) -> Any:
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, dict):
        return {k: _decode_nonfinite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_nonfinite(v) for v in value]
    return value


# ----------------------------------------------------------------------------- number formatting
def _fmt_num(value: Optional[float], digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def _fmt_pct(value: Optional[float], digits: int = 2) -> str:
    return "n/a" if value is None else f"{100.0 * value:.{digits}f}%"


def _fmt_signed_pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100.0 * value:+.2f}%"


def _fmt_seconds(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.3f} s"


def _fmt_x(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _cell(value: Any) -> str:
    """A value safe inside a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


@dataclass
class QualityReport:
    """What quantization cost one model: accuracy, perplexity, size, speed, memory, layer errors.

    Fill it with the ``set_*`` / ``add_*`` helpers (they compute the drops and ratios) or assign
    the section dicts directly in the documented shape (see the module docstring).

    Example:
        >>> report = QualityReport("google/gemma-3-270m", plan=plan.summary())
        >>> report.set_perplexity(perplexity(model, ids), perplexity(qmodel, ids), dataset="wikitext-2 test")
        >>> report.add_accuracy("piqa", multiple_choice(model, tok, ex), multiple_choice(qmodel, tok, ex))
        >>> report.set_size(model_size(model), model_size(qmodel))
        >>> print(report.console_summary())
        >>> report.save("out/report")  # report.json, report.md, *.png
    """

    model_name: str
    plan: Any = None
    calibration: Optional[dict] = None
    algorithms: list = field(default_factory=list)
    perplexity: Optional[dict] = None
    accuracy: dict = field(default_factory=dict)
    size: Optional[dict] = None
    latency: Optional[dict] = None
    peak_memory: Optional[dict] = None
    layer_errors: list = field(default_factory=list)
    sensitivity: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    # ------------------------------------------------------------------------------ builders
    def set_exported_perplexity(self, exported: PerplexityResult, *, format: str) -> "QualityReport":
        """Record the perplexity of the checkpoint exported in ``format``, reloaded without hfptq (same settings
        as :meth:`set_perplexity`, which must come first)."""
        if self.perplexity is not None:
            self.perplexity["exported"] = {"format": format, "perplexity": exported.perplexity, "nll": exported.nll,
                                           "rel_drop": exported.perplexity / self.perplexity["float"] - 1.0}
        return self

    def set_perplexity(
        self, reference: PerplexityResult, quantized: PerplexityResult, *, dataset: Optional[str] = None
    ) -> "QualityReport":
        """Record float vs quantized perplexity (measured with the same settings)."""
        cmp = compare_perplexity(reference, quantized)
        self.perplexity = {
            "dataset": dataset,
            "seq_len": reference.seq_len,
            "stride": reference.stride,
            "num_tokens": reference.num_tokens,
            "num_windows": reference.num_windows,
            "float": cmp["reference"],
            "quantized": cmp["quantized"],
            "abs_drop": cmp["abs_drop"],
            "rel_drop": cmp["rel_drop"],
            "float_nll": reference.nll,
            "quantized_nll": quantized.nll,
        }
        return self

    def add_accuracy(
        self, task: str, reference: dict, quantized: dict, *, metrics: Optional[list[str]] = None
    ) -> "QualityReport":
        """Record one task's float vs quantized accuracies.

        ``reference`` / ``quantized`` are result dicts of :mod:`hfptq.evaluation.accuracy`
        functions (or any ``{metric: float}`` dicts); by default every key of
        :data:`ACCURACY_METRICS` present in both is kept.
        """
        names = list(metrics) if metrics is not None else [m for m in ACCURACY_METRICS if m in reference and m in quantized]
        if not names:
            raise ConfigError(
                f"task {task!r}: no accuracy metric found in both results (looked for {list(ACCURACY_METRICS)}); "
                "pass metrics=[...] naming the keys to compare"
            )
        section: dict[str, Any] = {"num_examples": reference.get("num_examples"), "metrics": {}}
        for name in names:
            if name not in reference or name not in quantized:
                raise ConfigError(f"task {task!r}: metric {name!r} is missing from the float or the quantized result")
            f, q = float(reference[name]), float(quantized[name])
            section["metrics"][name] = {"float": f, "quantized": q, "abs_drop": f - q, "rel_drop": _rel(f - q, f)}
        self.accuracy[task] = section
        return self

    def set_size(
        self,
        reference: dict,
        quantized: dict,
        *,
        float_checkpoint_bytes: Optional[int] = None,
        quantized_checkpoint_bytes: Optional[int] = None,
    ) -> "QualityReport":
        """Record sizes from two :func:`hfptq.evaluation.size.model_size` results (+ checkpoints)."""
        fb, qb = int(reference["total_bytes"]), int(quantized["total_bytes"])
        self.size = {
            "float_bytes": fb,
            "quantized_bytes": qb,
            "ratio": _ratio(fb, qb),
            "saved_bytes": fb - qb,
            "by_precision": {
                "float": {k: int(v["bytes"]) for k, v in reference.get("by_precision", {}).items()},
                "quantized": {k: int(v["bytes"]) for k, v in quantized.get("by_precision", {}).items()},
            },
        }
        if float_checkpoint_bytes is not None or quantized_checkpoint_bytes is not None:
            self.size["checkpoint"] = {
                "float_bytes": float_checkpoint_bytes,
                "quantized_bytes": quantized_checkpoint_bytes,
                "ratio": _ratio(float_checkpoint_bytes, quantized_checkpoint_bytes),
            }
        return self

    def set_latency(self, reference: dict, quantized: dict) -> "QualityReport":
        """Record two :func:`hfptq.evaluation.latency.measure_latency` results."""
        self.latency = {
            "settings": {k: reference.get(k) for k in _LATENCY_SETTINGS if k in reference},
            "float": {k: reference[k] for k in _LATENCY_FIELDS if reference.get(k) is not None},
            "quantized": {k: quantized[k] for k in _LATENCY_FIELDS if quantized.get(k) is not None},
            "prefill_speedup": _ratio(reference.get("prefill_wall_s"), quantized.get("prefill_wall_s")),
            "decode_speedup": _ratio(quantized.get("decode_tokens_per_s"), reference.get("decode_tokens_per_s")),
        }
        mismatched = [
            k for k in ("batch_size", "prompt_len", "new_tokens", "threads")
            if k in reference and k in quantized and reference[k] != quantized[k]
        ]
        if mismatched:
            note = f"latency settings differ between float and quantized runs: {', '.join(mismatched)}"
            logger.warning(note)
            self.latency["warning"] = note
        return self

    def set_peak_memory(self, float_bytes: int, quantized_bytes: int, *, kind: str = "peak RSS") -> "QualityReport":
        """Record peak memory of the float and quantized runs (e.g. :func:`peak_rss_bytes`)."""
        self.peak_memory = {
            "kind": kind,
            "float_bytes": int(float_bytes),
            "quantized_bytes": int(quantized_bytes),
            "ratio": _ratio(float_bytes, quantized_bytes),
        }
        return self

    def set_layer_errors(self, rows: list[dict]) -> "QualityReport":
        """Record :func:`hfptq.evaluation.layer_error.layer_errors` rows."""
        self.layer_errors = [dict(r) for r in rows]
        return self

    def set_sensitivity(self, rows: list[dict]) -> "QualityReport":
        """Record :func:`hfptq.evaluation.layer_error.sensitivity_from_losses` rows."""
        self.sensitivity = [dict(r) for r in rows]
        return self

    def set_calibration(
        self,
        *,
        dataset: Optional[str] = None,
        samples: Optional[int] = None,
        seq_len: Optional[int] = None,
        observer: Optional[str] = None,
        activations: Optional[str] = None,
        **extra: Any,
    ) -> "QualityReport":
        """Record how calibration was done.

        ``activations`` is ``"static"``, ``"dynamic"`` or ``"none"`` (weight-only); it is stored as
        a sentence a reader understands. Any other keyword is kept as is.
        """
        words = activations
        if activations is not None:
            key = activations.lower()
            if key not in _ACTIVATION_WORDS:
                raise ConfigError(
                    f"activations must be 'static', 'dynamic' or 'none' (got {activations!r})"
                )
            words = _ACTIVATION_WORDS[key]
        info = {"dataset": dataset, "samples": samples, "seq_len": seq_len, "observer": observer, "activations": words}
        self.calibration = {k: v for k, v in {**info, **extra}.items() if v is not None}
        return self

    def add_algorithm(self, name: str, **details: Any) -> "QualityReport":
        """Record an algorithm that ran (e.g. ``add_algorithm("smoothquant", alpha=0.5)``)."""
        self.algorithms.append({"name": name, "details": details})
        return self

    def add_timing(self, step: str, seconds: float) -> "QualityReport":
        """Record how long a pipeline step took (accumulates if the step repeats)."""
        self.timings[step] = self.timings.get(step, 0.0) + float(seconds)
        return self

    @contextlib.contextmanager
    def timer(self, step: str) -> Iterator[None]:
        """Context manager timing a step: ``with report.timer("calibration"): ...``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add_timing(step, time.perf_counter() - start)

    # ------------------------------------------------------------------------------ serialization
    def to_dict(self) -> dict:
        """The report as plain Python data with the stable keys of the module docstring."""
        data: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "model": self.model_name, "created_at": self.created_at}
        for key in _SECTION_ORDER:
            value = getattr(self, key)
            if value is None or (isinstance(value, (list, dict)) and not value):
                continue
            data[key] = copy.deepcopy(value)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "QualityReport":
        """Rebuild a report from :meth:`to_dict` output (or a loaded ``report.json``)."""
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ConfigError(
                f"report schema_version {version!r} is not supported (this hfptq reads version {SCHEMA_VERSION})"
            )
        data = _decode_nonfinite(data)
        kwargs = {k: data[k] for k in _SECTION_ORDER if k in data}
        report = cls(model_name=data.get("model", ""), **kwargs)
        if "created_at" in data:
            report.created_at = data["created_at"]
        return report

    def to_json(self, path: Union[str, Path]) -> Path:
        """Write the report as strict JSON (non-finite numbers as strings); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_encode_nonfinite(self.to_dict()), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_json(cls, path: Union[str, Path]) -> "QualityReport":
        """Load a report written by :meth:`to_json`."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    # ------------------------------------------------------------------------------ summaries
    def _summary_rows(self) -> list[tuple[str, str, str, str]]:
        """(metric, float, quantized, change) rows shared by the console and Markdown summaries."""
        rows = []
        if self.perplexity:
            p = self.perplexity
            label = f"perplexity ({p['dataset']})" if p.get("dataset") else "perplexity"
            rows.append((label, _fmt_num(p["float"]), _fmt_num(p["quantized"]),
                         f"{p['abs_drop']:+.4f} ({_fmt_signed_pct(p['rel_drop'])})"))
            e = p.get("exported")
            if e:
                rows.append((f"perplexity, {e['format']} export reloaded without hfptq", _fmt_num(p["float"]),
                             _fmt_num(e["perplexity"]), f"{e['perplexity'] - p['float']:+.4f} "
                             f"({_fmt_signed_pct(e['rel_drop'])})"))
        for task, section in self.accuracy.items():
            for name, m in section["metrics"].items():
                rows.append((f"{task} {name}", _fmt_pct(m["float"]), _fmt_pct(m["quantized"]),
                             f"{-100.0 * m['abs_drop']:+.2f} pp"))
        if self.size:
            s = self.size
            rows.append(("size in memory", format_bytes(s["float_bytes"]), format_bytes(s["quantized_bytes"]),
                         f"{_fmt_x(s['ratio'])} smaller"))
            ckpt = s.get("checkpoint")
            if ckpt:
                rows.append(("checkpoint on disk", format_bytes(ckpt.get("float_bytes")),
                             format_bytes(ckpt.get("quantized_bytes")), f"{_fmt_x(ckpt.get('ratio'))} smaller"))
        if self.latency:
            f, q = self.latency["float"], self.latency["quantized"]
            rows.append(("prefill latency", _fmt_seconds(f.get("prefill_wall_s")), _fmt_seconds(q.get("prefill_wall_s")),
                         f"{_fmt_x(self.latency.get('prefill_speedup'))} faster"))
            if f.get("decode_tokens_per_s") is not None or q.get("decode_tokens_per_s") is not None:
                rows.append(("decode tokens/s", _fmt_num(f.get("decode_tokens_per_s"), 1),
                             _fmt_num(q.get("decode_tokens_per_s"), 1), f"{_fmt_x(self.latency.get('decode_speedup'))} faster"))
        if self.peak_memory:
            m = self.peak_memory
            rows.append((m.get("kind", "peak memory"), format_bytes(m["float_bytes"]), format_bytes(m["quantized_bytes"]),
                         f"{_fmt_x(m['ratio'])} smaller"))
        return rows

    def _worst_layers(self, n: int) -> list[dict]:
        finite = [r for r in self.layer_errors if r.get("sqnr_db") is not None]
        return sorted(finite, key=lambda r: (r["sqnr_db"], r["module"]))[:n]

    def console_summary(self) -> str:
        """A compact aligned table to print in a terminal.

        Example:
            >>> print(report.console_summary())
            hfptq quality report: google/gemma-3-270m
            metric                    float      quantized  change
            perplexity (wikitext-2)   21.5034    22.1010    +0.5976 (+2.78%)
            ...
        """
        header = ("metric", "float", "quantized", "change")
        rows = self._summary_rows()
        lines = [f"hfptq quality report: {self.model_name}"]
        if rows:
            widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
            fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
            lines.append(fmt(header))
            lines.append("  ".join("-" * w for w in widths))
            lines.extend(fmt(r) for r in rows)
        worst = self._worst_layers(3)
        if worst:
            lines.append("lowest SQNR modules (end to end: includes the error of the quantized modules upstream):")
            width = max(len(r["module"]) for r in worst)
            lines += [f"  {r['module'].ljust(width)}  {_fmt_num(r['sqnr_db'], 1)} dB" for r in worst]
        if self.sensitivity:
            top = self.sensitivity[:3]
            lines.append("most sensitive modules (loss increase):")
            width = max(len(r["module"]) for r in top)
            lines += [f"  {r['module'].ljust(width)}  {r['loss_increase']:+.4f}" for r in top]
        kinds = (self.latency or {}).get("quantized", {}).get("backends")
        if kinds:
            lines.append("kernels of the quantized model: " + "; ".join(
                f"{k['kind']} -> {k['backend']}" for k in kinds) + " (why: the report's markdown, hfptq.summary)")
        if self.timings:
            lines.append("timings: " + ", ".join(f"{k} {_fmt_seconds(v)}" for k, v in self.timings.items()))
        if not rows and len(lines) == 1:
            lines.append("(no measurements recorded)")
        return "\n".join(lines)

    # ------------------------------------------------------------------------------ markdown
    def to_markdown(self, images: Optional[dict[str, Union[str, Path]]] = None, *, max_layer_rows: int = 20) -> str:
        """Render the report as Markdown.

        Args:
            images: plot paths by key (``"layer_errors"``, ``"sensitivity"``, ``"size"``), linked
                relative to the Markdown file (what :meth:`save` passes).
            max_layer_rows: the per-layer table lists this many worst modules (all are in JSON).
        """
        images = images or {}
        md: list[str] = [f"# Quantization quality report: `{self.model_name}`", ""]
        md.append(f"_Generated {self.created_at} by hfptq (report schema {SCHEMA_VERSION})._")
        md.append("")

        rows = self._summary_rows()
        if rows:
            md += ["## Summary", "", "| Metric | Float | Quantized | Change |", "| --- | ---: | ---: | ---: |"]
            md += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
            md.append("")

        if self.perplexity:
            p = self.perplexity
            md += ["## Perplexity", ""]
            md.append(
                f"Dataset: {p.get('dataset') or 'n/a'}; {p['num_tokens']} scored tokens in {p['num_windows']} windows "
                f"of {p['seq_len']} positions, stride {p['stride']}."
            )
            md += ["", "| | Float | Quantized | Change |", "| --- | ---: | ---: | ---: |"]
            md.append(f"| Perplexity | {_fmt_num(p['float'])} | {_fmt_num(p['quantized'])} | "
                      f"{p['abs_drop']:+.4f} ({_fmt_signed_pct(p['rel_drop'])}) |")
            md.append(f"| NLL (nats/token) | {_fmt_num(p['float_nll'])} | {_fmt_num(p['quantized_nll'])} | "
                      f"{p['quantized_nll'] - p['float_nll']:+.4f} |")
            md.append("")

        if self.accuracy:
            md += ["## Accuracy", "", "| Task | Metric | Examples | Float | Quantized | Drop |",
                   "| --- | --- | ---: | ---: | ---: | ---: |"]
            for task, section in self.accuracy.items():
                for name, m in section["metrics"].items():
                    md.append(f"| {task} | {name} | {section.get('num_examples') or 'n/a'} | {_fmt_pct(m['float'])} | "
                              f"{_fmt_pct(m['quantized'])} | {100.0 * m['abs_drop']:+.2f} pp |")
            md += ["", "_Drop = float − quantized, in percentage points (positive = accuracy lost)._", ""]

        if self.size:
            s = self.size
            md += ["## Size", "", "| | Float | Quantized | Ratio |", "| --- | ---: | ---: | ---: |"]
            md.append(f"| In memory (parameters + buffers) | {format_bytes(s['float_bytes'])} ({s['float_bytes']} B) | "
                      f"{format_bytes(s['quantized_bytes'])} ({s['quantized_bytes']} B) | {_fmt_x(s['ratio'])} |")
            ckpt = s.get("checkpoint")
            if ckpt:
                md.append(f"| Checkpoint on disk | {format_bytes(ckpt.get('float_bytes'))} | "
                          f"{format_bytes(ckpt.get('quantized_bytes'))} | {_fmt_x(ckpt.get('ratio'))} |")
            by = s.get("by_precision", {})
            precisions = sorted(set(by.get("float", {})) | set(by.get("quantized", {})))
            if precisions:
                md += ["", "| Precision | Float | Quantized |", "| --- | ---: | ---: |"]
                for prec in precisions:
                    fb, qb = by.get("float", {}).get(prec), by.get("quantized", {}).get(prec)
                    md.append(f"| {prec} | {format_bytes(fb) if fb is not None else '—'} | "
                              f"{format_bytes(qb) if qb is not None else '—'} |")
            if "size" in images:
                md += ["", f"![Size by precision]({images['size']})"]
            md.append("")

        if self.latency:
            lat = self.latency
            f, q = lat["float"], lat["quantized"]
            settings = lat.get("settings", {})
            md += ["## Latency", ""]
            if settings:
                md += ["Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + ".", ""]
            md += ["| | Float | Quantized | Speed-up |", "| --- | ---: | ---: | ---: |"]
            md.append(f"| Prefill wall time (median) | {_fmt_seconds(f.get('prefill_wall_s'))} | "
                      f"{_fmt_seconds(q.get('prefill_wall_s'))} | {_fmt_x(lat.get('prefill_speedup'))} |")
            md.append(f"| Prefill CPU time (median) | {_fmt_seconds(f.get('prefill_cpu_s'))} | "
                      f"{_fmt_seconds(q.get('prefill_cpu_s'))} | |")
            if f.get("decode_tokens_per_s") is not None or q.get("decode_tokens_per_s") is not None:
                md.append(f"| Decode tokens/s | {_fmt_num(f.get('decode_tokens_per_s'), 2)} | "
                          f"{_fmt_num(q.get('decode_tokens_per_s'), 2)} | {_fmt_x(lat.get('decode_speedup'))} |")
                md.append(f"| Generate CPU time (median) | {_fmt_seconds(f.get('generate_cpu_s'))} | "
                          f"{_fmt_seconds(q.get('generate_cpu_s'))} | |")
            md.append(f"| Threads | {f.get('threads', 'n/a')} | {q.get('threads', 'n/a')} | |")
            if lat.get("warning"):
                md += ["", f"> Warning: {lat['warning']}"]
            kinds = q.get("backends")
            if kinds:
                md += ["", f"Kernels of the quantized model on {q.get('cpu_features', 'this machine')} "
                           "(`hfptq.quant.backends`):", "", "| Module kind | Modules | Backend | Why |",
                       "| --- | ---: | --- | --- |"]
                md += [f"| {k['kind']} | {k['modules']} | {k['backend']} | {k['reason']} |" for k in kinds]
            md += ["", "_CPU time is summed over all threads of the process; CPU/wall ≈ cores kept busy._", ""]

        if self.peak_memory:
            m = self.peak_memory
            md += ["## Peak memory", "", f"| | Float | Quantized | Ratio |", "| --- | ---: | ---: | ---: |"]
            md.append(f"| {m.get('kind', 'peak memory')} | {format_bytes(m['float_bytes'])} | "
                      f"{format_bytes(m['quantized_bytes'])} | {_fmt_x(m['ratio'])} |")
            md.append("")

        if self.layer_errors:
            n_rows = min(max_layer_rows, len(self.layer_errors))
            md += ["## Per-layer error", ""]
            md.append(f"The {n_rows} modules with the lowest SQNR (of {len(self.layer_errors)}; all are in report.json). "
                      "SQNR = 10·log10(Σref² / Σ(ref − q)²); higher is better, ~6 dB per bit. Measured end to end: "
                      "each module's output in the quantized model against the float model on the same input ids, so "
                      "it includes the error of every quantized module upstream (a float-kept module can score "
                      "low); the sensitivity table, when run, isolates one module at a time.")
            md += ["", "| Module | SQNR (dB) | Relative error |", "| --- | ---: | ---: |"]
            for r in self._worst_layers(n_rows):
                md.append(f"| `{r['module']}` | {_fmt_num(r['sqnr_db'], 2)} | {_fmt_num(r['rel_error'], 5)} |")
            if "layer_errors" in images:
                md += ["", f"![Per-layer SQNR]({images['layer_errors']})"]
            md.append("")

        if self.sensitivity:
            method = self.sensitivity[0].get("method") or "loss with only this module quantized"
            md += ["## Sensitivity", "", f"Modules ranked by loss increase, largest first. Method: {method}.", "",
                   "| Rank | Module | Loss | Increase | Relative |", "| ---: | --- | ---: | ---: | ---: |"]
            for r in self.sensitivity:
                md.append(f"| {r.get('rank', '')} | `{r['module']}` | {_fmt_num(r['loss'])} | "
                          f"{r['loss_increase']:+.4f} | {_fmt_signed_pct(r.get('rel_increase'))} |")
            if "sensitivity" in images:
                md += ["", f"![Sensitivity]({images['sensitivity']})"]
            md.append("")

        if self.plan is not None and self.plan != {} and self.plan != []:
            md += ["## Quantization plan", ""] + _render_plan(self.plan) + [""]

        if self.algorithms:
            md += ["## Algorithms", ""]
            for algo in self.algorithms:
                details = ", ".join(f"{k}={v}" for k, v in (algo.get("details") or {}).items())
                md.append(f"- **{algo['name']}**" + (f": {details}" if details else ""))
            md.append("")

        if self.calibration:
            md += ["## Calibration", "", "| Field | Value |", "| --- | --- |"]
            md += [f"| {_cell(k)} | {_cell(v)} |" for k, v in self.calibration.items()]
            md.append("")

        if self.timings:
            md += ["## Timings", "", "| Step | Time |", "| --- | ---: |"]
            md += [f"| {k} | {_fmt_seconds(v)} |" for k, v in self.timings.items()]
            md.append("")

        if self.notes:
            md += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        return "\n".join(md).rstrip() + "\n"

    def write_markdown(self, path: Union[str, Path], images: Optional[dict[str, Union[str, Path]]] = None) -> Path:
        """Write :meth:`to_markdown` to ``path``; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_markdown(images), encoding="utf-8")
        return path

    # ------------------------------------------------------------------------------ plots + save
    def save_plots(self, out_dir: Union[str, Path]) -> dict[str, Path]:
        """Write the PNG plots that apply (layer errors, sensitivity, size); needs matplotlib.

        Returns ``{"layer_errors" | "sensitivity" | "size": path}``; empty (with one warning per
        process) when matplotlib is not installed.
        """
        global _MATPLOTLIB_WARNED
        try:
            _plots = importlib.import_module("hfptq.evaluation._plots")
        except ImportError:
            if not _MATPLOTLIB_WARNED:
                logger.warning("matplotlib is not installed: report plots are skipped (pip install 'hfptq[plot]')")
                _MATPLOTLIB_WARNED = True
            return {}
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = {}
        if self.layer_errors:
            written["layer_errors"] = _plots.plot_layer_errors(self.layer_errors, out_dir / "layer_errors.png")
        if self.sensitivity:
            written["sensitivity"] = _plots.plot_sensitivity(self.sensitivity, out_dir / "sensitivity.png")
        if self.size and self.size.get("by_precision"):
            written["size"] = _plots.plot_size(self.size, out_dir / "size.png")
        return written

    def save(self, out_dir: Union[str, Path]) -> dict[str, Path]:
        """Write ``report.json``, ``report.md`` and the plots into ``out_dir``.

        Returns:
            ``{"json": path, "markdown": path, "layer_errors": png, "sensitivity": png, "size": png}``
            (plot keys only for plots that were written).

        Example:
            >>> paths = report.save("out/gemma-w8a8")
            >>> paths["markdown"].read_text()[:40]
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        plots = self.save_plots(out_dir)
        paths: dict[str, Path] = {
            "json": self.to_json(out_dir / "report.json"),
            "markdown": self.write_markdown(out_dir / "report.md", {k: p.name for k, p in plots.items()}),
        }
        paths.update(plots)
        logger.info("quality report written to %s", out_dir)
        return paths


def _render_plan(plan: Any, max_rows: int = 60) -> list[str]:
    """Markdown for the caller's plan summary: a table when it is tabular, else JSON."""
    scalar = (str, int, float, bool, type(None))
    if isinstance(plan, dict) and all(isinstance(v, scalar) for v in plan.values()):
        lines = ["| Key | Value |", "| --- | --- |"] + [f"| {_cell(k)} | {_cell(v)} |" for k, v in plan.items()]
        return lines
    if isinstance(plan, list) and plan and all(isinstance(r, dict) for r in plan):
        keys: list[str] = []
        for row in plan:
            keys += [k for k in row if k not in keys]
        lines = ["| " + " | ".join(_cell(k) for k in keys) + " |", "| " + " | ".join("---" for _ in keys) + " |"]
        for row in plan[:max_rows]:
            lines.append("| " + " | ".join(_cell(row.get(k, "")) for k in keys) + " |")
        if len(plan) > max_rows:
            lines += ["", f"_… {len(plan) - max_rows} more rows in report.json._"]
        return lines
    text = json.dumps(_encode_nonfinite(plan), indent=2, default=str)
    return ["```json", text, "```"]

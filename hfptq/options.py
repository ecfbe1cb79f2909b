"""The one options schema: every option of ``weights``, ``activations``, ``calibration``,
``smoothquant``, ``gptq`` and ``auto_precision``, with its type, default, range and meaning.

:class:`~hfptq.HfPtqConfig` and :func:`~hfptq.recipes.load_recipe` check every option section
against this table when they are built, so a typo (``gptq: {dampp: 0.01}``) or an out-of-range
value (``percentile: 150``) is an error at ``hfptq plan``, before any model is loaded. The
README's option table is generated from it (:func:`options_markdown`). Cross-field rules (e.g.
``granularity='token'`` needs ``mode='dynamic'``) and the completion of defaults stay with the
code that uses the options; this module only knows single options.

This module imports nothing of hfptq but :mod:`hfptq.errors`.

Example:
    >>> check_options("gptq", {"damp": 0.05, "block_size": 64})
    >>> check_options("gptq", {"dampp": 0.01})
    Traceback (most recent call last):
    ...
    hfptq.errors.ConfigError: Unknown option gptq.dampp. Did you mean 'damp'? Valid options: block_size, ...
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from .errors import ConfigError, ConfigTypeError, suggest

#: Checkpoint formats ``save_pretrained(format=...)`` and a recipe's ``output.format`` accept: ``hfptq`` (the
#: default) and ``compressed-tensors`` (an export that loads without hfptq, see :mod:`hfptq.export`).
CHECKPOINT_FORMATS: Tuple[str, ...] = ("hfptq", "compressed-tensors")

__all__ = ["Option", "SCHEMA", "SECTIONS", "check_options", "options_markdown", "defaults"]


@dataclass(frozen=True)
class Option:
    """One option: ``kind`` is ``int``, ``float``, ``bool``, ``str``, ``float|str`` (a number or one of
    ``choices``), ``floats`` (non-empty list of numbers), ``strs`` (a string or list of strings),
    ``mapping``, ``mappings`` (list of mappings), ``object`` (a string or an in-memory object) or
    ``any``. ``lo``/``hi`` bound numbers (``open_lo``/``open_hi`` exclude the bound); ``choices``
    lists the valid strings; ``nullable`` allows ``None``; ``pow2`` asks for a power of two >= 2
    (0 also allowed: off)."""

    name: str
    kind: str
    default: Any
    doc: str
    choices: Optional[Tuple[Any, ...]] = None
    lo: Optional[float] = None
    hi: Optional[float] = None
    open_lo: bool = False
    open_hi: bool = False
    nullable: bool = False
    pow2: bool = False

    # ------------------------------------------------------------------ rendering
    def range_text(self) -> str:
        parts = []
        if self.choices:
            parts.append(" \\| ".join(f"`{c}`" for c in self.choices))
        if (self.lo is not None or self.hi is not None) and not self.pow2:
            left = "(" if self.open_lo else "["
            right = ")" if self.open_hi else "]"
            lo = "-inf" if self.lo is None else _num(self.lo)
            hi = "inf" if self.hi is None else _num(self.hi)
            if self.lo is not None and self.lo == self.hi:
                parts.append(f"{lo} only")
            elif self.hi is None:
                parts.append(f"> {lo}" if self.open_lo else f">= {lo}")
            else:
                parts.append(f"{left}{lo}, {hi}{right}")
        if self.pow2:
            parts.append("power of two >= 2, or 0")
        if self.nullable:
            parts.append("or `null`" if parts else "`null` allowed")
        return "; ".join(parts)

    def default_text(self) -> str:
        if self.default is None:
            return "`null`"
        if isinstance(self.default, bool):
            return f"`{str(self.default).lower()}`"
        if isinstance(self.default, str) and self.default.startswith("("):
            return self.default  # a description, e.g. "(by mode)"
        return f"`{self.default}`"

    # ------------------------------------------------------------------ checking
    def check(self, section: str, value: Any) -> None:
        """Raise :class:`ConfigTypeError`/:class:`ConfigError` naming ``section.name`` if ``value`` is invalid."""
        field = f"{section}.{self.name}"
        if value is None:
            if self.nullable or self.kind in ("any", "object"):
                return
            raise ConfigTypeError(f"{field} cannot be null: {self._expected()} (default {self.default_text()}).",
                                  key=self.name)
        kind = self.kind
        if kind == "any":
            return
        if kind == "object":
            if isinstance(value, (int, float, bool, list, dict)):
                raise ConfigTypeError(f"{field} must be {self._expected()} (got {type(value).__name__}: {value!r}).",
                                      key=self.name)
            return
        if kind == "bool":
            if not isinstance(value, bool):
                raise self._type(field, value)
            return
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise self._type(field, value)
            self._choice(field, value)
            self._range(field, value)
            return
        if kind in ("float", "float|str"):
            if kind == "float|str" and isinstance(value, str):
                self._choice(field, value)
                return
            if not _is_number(value):
                raise self._type(field, value)
            self._range(field, value)
            return
        if kind == "str":
            if not isinstance(value, str):
                raise self._type(field, value)
            if self.choices:
                self._choice(field, value)
            return
        if kind == "floats":
            if not isinstance(value, (list, tuple)) or not value or not all(_is_number(v) for v in value):
                raise self._type(field, value)
            for v in value:
                self._range(field, v)
            return
        if kind == "strs":
            if isinstance(value, str):
                return
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise self._type(field, value)
            return
        if kind == "mapping":
            if not isinstance(value, Mapping):
                raise self._type(field, value)
            return
        if kind == "mappings":
            if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, Mapping) for v in value):
                raise self._type(field, value)
            return
        raise AssertionError(f"unknown option kind {kind!r}")  # pragma: no cover  (a bug in the table)

    def _expected(self) -> str:
        return {
            "int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
            "float|str": "a number or " + " / ".join(repr(c) for c in self.choices or ()),
            "floats": "a non-empty list of numbers", "strs": "a string or a list of strings",
            "mapping": "a mapping", "mappings": "a non-empty list of mappings",
            "object": "a string (name or path) or an in-memory object", "any": "anything",
        }[self.kind]

    def _type(self, field: str, value: Any) -> ConfigTypeError:
        rng = self.range_text().replace("\\|", "|").replace("`", "")
        return ConfigTypeError(
            f"{field} must be of type {self.kind}: {self._expected()}{' in ' + rng if rng else ''} "
            f"(got {type(value).__name__}: {value!r}).", key=self.name)

    def _choice(self, field: str, value: Any) -> None:
        if self.choices and value not in self.choices:
            hint = suggest(value, self.choices) if isinstance(value, str) else ""
            raise ConfigError(
                f"{field}={value!r} is not valid.{hint} Choose one of: {', '.join(map(str, self.choices))}. {self.doc}",
                key=self.name)

    def _range(self, field: str, value: float) -> None:
        lo_bad = self.lo is not None and (value <= self.lo if self.open_lo else value < self.lo)
        hi_bad = self.hi is not None and (value >= self.hi if self.open_hi else value > self.hi)
        pow2_bad = self.pow2 and value != 0 and not (value >= 2 and int(value) & (int(value) - 1) == 0)
        if lo_bad or hi_bad or pow2_bad:
            if self.pow2:
                must = "a power of two >= 2 (or 0: off)"
            elif self.kind == "int" and self.hi is None and self.lo in (0, 1):
                must = "a positive integer" if self.lo == 1 else "a non-negative integer"
            else:
                must = "in " + self.range_text().replace("`", "").replace("\\|", "|")
            raise ConfigError(f"{field} must be {must} (got {value!r}). {self.doc} "
                              f"(default {self.default_text().replace('`', '')}).", key=self.name)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e6 else f"{x:g}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_OBSERVERS = ("minmax", "percentile", "entropy", "mse")


def _section(*options: Option) -> Dict[str, Option]:
    return {o.name: o for o in options}


#: Every option section, by name; the order is the order of the README table.
SCHEMA: Dict[str, Dict[str, Option]] = {
    "weights": _section(
        Option("bits", "int", "(8; 4 with int4)", "Weight bits: use 8 (int8) or 4 (int4).", choices=(8, 4)),
        Option("symmetric", "bool", True, "Symmetric (no zero point) or asymmetric weights."),
        Option("granularity", "str", "(channel; group for int4)", "One scale per tensor, output channel or group.",
               choices=("tensor", "channel", "group")),
        Option("group_size", "int", "(128 for int4)", "Input columns per scale with granularity group.", lo=1,
               nullable=True),
        Option("observer", "str", "minmax", "Weight range: min/max, or an MSE clipping search.",
               choices=("minmax", "mse")),
    ),
    "activations": _section(
        Option("mode", "str", "dynamic", "Per-token scales at run time, per-tensor scales from calibration, or "
               "weight-only.", choices=("dynamic", "static", "none")),
        Option("bits", "int", 8, "Activation bits: activations are quantized to 8 bits.", choices=(8,)),
        Option("symmetric", "bool", "(false dynamic; true static)", "Symmetric or asymmetric activations."),
        Option("granularity", "str", "(token dynamic; tensor static)", "Scale granularity of the input.",
               choices=("token", "tensor", "channel")),
        Option("observer", "str", "minmax", "Range observer of static activations.", choices=_OBSERVERS),
        Option("percentile", "float", 99.99, "Percentile kept by the percentile observer.", lo=0, hi=100,
               open_lo=True),
        Option("averaging_constant", "float", None, "Running min/max average (minmax observer).", lo=0, hi=1,
               open_lo=True, nullable=True),
        Option("bins", "int", 2048, "Histogram bins (percentile, entropy, mse observers).", lo=16),
        Option("rotation", "int", None, "Hadamard block size rotating the input, folded into the weight.",
               lo=0, pow2=True, nullable=True),
    ),
    "calibration": _section(
        Option("dataset", "object", None, "Hub name, builder (json, text...), local path or a datasets.Dataset "
               "(required)."),
        Option("config", "str", None, "Dataset configuration, e.g. wikitext-2-raw-v1.", nullable=True),
        Option("split", "str", "validation", "Split, slices allowed (validation[:10%]).", nullable=True),
        Option("data_files", "any", None, "Files for a builder dataset (path, list or split mapping)."),
        Option("text_column", "str", "text", "Column holding the text.", nullable=True),
        Option("template", "str", None, "Format string building the text from several columns.", nullable=True),
        Option("num_samples", "int", 128, "Calibration windows.", lo=1, nullable=True),
        Option("seq_len", "int", 512, "Tokens per window.", lo=1, nullable=True),
        Option("batch_size", "int", 8, "Windows per forward pass.", lo=1, nullable=True),
        Option("shuffle", "bool", True, "Shuffle rows before packing (with seed).", nullable=True),
        Option("seed", "int", 0, "Shuffle seed.", nullable=True),
        Option("packing", "bool", True, "Concatenate rows into full windows (else one row per window).",
               nullable=True),
        Option("add_bos", "bool", None, "Prepend BOS to each window (null: as the tokenizer does).", nullable=True),
        Option("tokenizer", "object", None, "Tokenizer path/Hub id or object (null: the model's)."),
        Option("observer", "str", "minmax", "Default observer of static activations.", choices=_OBSERVERS,
               nullable=True),
        Option("percentile", "float", 99.99, "Percentile observer's percentile.", lo=0, hi=100, open_lo=True,
               nullable=True),
        Option("averaging_constant", "float", None, "Running min/max average (minmax observer).", lo=0, hi=1,
               open_lo=True, nullable=True),
        Option("bins", "int", 2048, "Histogram bins of histogram observers.", lo=16, nullable=True),
        Option("sequential", "bool", True, "Calibrate one decoder layer at a time (bounded memory).",
               nullable=True),
        Option("dtype", "str", "auto", "Calibration forward dtype.", choices=("auto", "model", "bfloat16"),
               nullable=True),
    ),
    "smoothquant": _section(
        Option("alpha", "float|str", 0.5, "Share of the activation range moved into the weights, or search per "
               "group.", choices=("search",), lo=0, hi=1),
        Option("alpha_grid", "floats", [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], "Alphas tried by alpha='search'.",
               lo=0, hi=1),
        Option("search_keeps_unsmoothed", "bool", True, "The search may keep a group unsmoothed."),
        Option("groups", "strs", None, "Smoothing groups to apply (null: all; 'head' = final norm -> LM head).",
               nullable=True),
        Option("weight_only", "bool", True, "Activation-aware scaling (AWQ) of weight-only groups with alpha='search'."),
        Option("weight_only_grid", "floats", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
               "Alphas tried for weight-only groups.", lo=0, hi=1),
        Option("search_tokens", "int", 512, "Rows of cached layer input used by the search.", lo=1),
        Option("min_scale", "float", 1e-5, "Lower clamp of the smoothing factors.", lo=0, open_lo=True),
        Option("max_scale", "float", 1e5, "Upper clamp of the smoothing factors.", lo=0, open_lo=True),
        Option("table", "mappings", None, "Custom prev -> consumers table for architectures without one.",
               nullable=True),
    ),
    "gptq": _section(
        Option("block_size", "int", 128, "Columns rounded per block.", lo=1),
        Option("damp", "float", 0.01, "Dampening added to the Hessian diagonal, as a fraction of its mean.", lo=0),
        Option("act_order", "bool", False, "Round columns by decreasing Hessian diagonal."),
        Option("static_groups", "bool", False, "Group parameters computed once from the original weight."),
        Option("max_damp_retries", "int", 6, "Cholesky retries with 10x dampening before round-to-nearest.", lo=0),
        Option("hessian_dtype", "str", "float32", "Hessian accumulation dtype.", choices=("float32", "float64")),
        Option("report_error", "bool", True, "Report GPTQ's and round-to-nearest's output error."),
        Option("true_sequential", "bool", False, "Round the modules of a layer in call order."),
        Option("float_targets", "bool", False, "Fit each module to the float model's output (turns true_sequential "
               "on)."),
    ),
    "auto_precision": _section(
        Option("budget", "mapping", {"max_ppl_increase_pct": 0.3}, "One of max_ppl_increase_pct, max_nll_increase, "
               "max_metric_drop."),
        Option("fallback", "any", "fp16", "Precision of modules kept out: fp16, bf16, fp32 or a rule fragment."),
        Option("sensitivity", "str", "kl", "Per-module sensitivity measure.", choices=("kl", "loss", "sqnr")),
        Option("sensitivity_windows", "int", 4, "Windows scored per sensitivity measurement.", lo=1),
        Option("margin", "float", 0.75, "Share of the budget the search may use.", lo=0, hi=1, open_lo=True),
        Option("sensitivity_tokens", "int", 128, "Positions scored per window.", lo=1),
        Option("max_rounds", "int", 3, "Search rounds if the held-out check fails.", lo=1),
        Option("batch_size", "int", 4, "Windows per forward pass.", lo=1),
        Option("candidates", "strs", None, "Kinds or module names the search may change (null: all).",
               nullable=True),
        Option("measure_speed", "bool", False, "Time a prefill of the base and the chosen model."),
    ),
}
SECTIONS: Tuple[str, ...] = tuple(SCHEMA)


def check_options(section: str, values: Optional[Mapping[str, Any]], *, prefix: Optional[str] = None) -> None:
    """Check one option section: unknown names (with a suggestion), types and ranges.

    Args:
        section: a key of :data:`SCHEMA` (``"gptq"``, ``"calibration"``, ...).
        values: the user's options (``None`` = all defaults).
        prefix: the field path used in messages (default ``section``; e.g. ``rules[0].weights``).

    Raises:
        ConfigError: unknown option or value out of range; ``exc.key`` is the offending option.
        ConfigTypeError: wrong type.

    Example:
        >>> check_options("calibration", {"percentile": 150})
        Traceback (most recent call last):
        ...
        hfptq.errors.ConfigError: calibration.percentile must be in (0, 100]; or null (got 150). ...
    """
    spec = SCHEMA[section]
    where = prefix or section
    if values is None:
        return
    if not isinstance(values, Mapping):
        raise ConfigTypeError(f"{where} must be a mapping of options such as {{{next(iter(spec))!r}: ...}} "
                              f"(got {type(values).__name__}: {values!r}).")
    for key, value in values.items():
        option = spec.get(key) if isinstance(key, str) else None
        if option is None:
            raise ConfigError(f"Unknown option {where}.{key}.{suggest(key, spec)} Valid options: {', '.join(spec)}.",
                              key=key)
        option.check(where, value)


def defaults(section: str) -> Dict[str, Any]:
    """The documented default of every option of ``section`` whose default is a plain value."""
    return {k: o.default for k, o in SCHEMA[section].items()
            if not (isinstance(o.default, str) and o.default.startswith("("))}


def options_markdown() -> str:
    """The option table of the README (Markdown), generated from :data:`SCHEMA`.

    Example:
        >>> options_markdown().splitlines()[0]
        '| option | type | default | valid values | meaning |'
    """
    lines = ["| option | type | default | valid values | meaning |", "|---|---|---|---|---|"]
    for section, spec in SCHEMA.items():
        for option in spec.values():
            kind = option.kind.replace("|", " \\| ")
            lines.append(f"| `{section}.{option.name}` | {kind} | {option.default_text()} | "
                         f"{option.range_text()} | {option.doc} |")
    return "\n".join(lines) + "\n"

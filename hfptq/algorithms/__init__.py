"""Accuracy algorithms beyond round-to-nearest.

* :mod:`hfptq.algorithms.smoothquant` — migrate activation outliers into the weights with a
  per-channel smoothing factor folded into the preceding norm (or linear), so W8A8 loses less.
* :mod:`hfptq.algorithms.gptq` — Hessian-based error compensation of the weight rounding (INT8
  per-channel, INT4 per-group), run layer by layer inside the sequential calibration.
* :mod:`hfptq.algorithms.autoprecision` — choose which modules stay in higher precision under a
  quality budget, with a logarithmic number of full evaluations.

The option dicts of ``HfPtqConfig(smoothquant=..., gptq=...)`` (and of an ``auto_precision``
section) are validated and completed by :func:`validate_options`, the single place that knows
their fields and defaults.

Example:
    >>> validate_options("gptq", {"block_size": 64})["damp"]
    0.01
    >>> validate_options("smoothquant", {"alpha": "search"})["alpha_grid"][:3]
    [0.2, 0.3, 0.4]
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Mapping, Optional

from ..errors import ConfigError, ConfigTypeError, suggest
from ..options import _is_number, defaults

__all__ = ["ALGORITHM_NAMES", "OPTION_DEFAULTS", "summarize_algorithms", "validate_options"]

#: Defaults of every option, per algorithm (from the one options schema, :mod:`hfptq.options`, where
#: each option's type, range and meaning live). ``validate_options`` fills the missing ones.
OPTION_DEFAULTS: Dict[str, Dict[str, Any]] = {name: defaults(name) for name in ("smoothquant", "gptq", "auto_precision")}
ALGORITHM_NAMES = tuple(OPTION_DEFAULTS)

_BUDGET_KEYS = ("max_ppl_increase_pct", "max_nll_increase", "max_metric_drop")


def _type_error(name: str, key: str, expected: str, value: Any) -> ConfigTypeError:
    return ConfigTypeError(f"{name}.{key} must be {expected} (got {type(value).__name__}: {value!r}).")


def _check_alpha(name: str, key: str, value: Any) -> float:
    if not _is_number(value):
        raise _type_error(name, key, "a number in [0, 1]", value)
    if not 0.0 <= float(value) <= 1.0:
        raise ConfigError(
            f"{name}.{key}={value} is outside [0, 1]: alpha is the share of the activation range moved into "
            "the weights (0.5 balances both; 'search' picks it per layer)."
        )
    return float(value)


def _positive_int(name: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(name, key, "a positive integer", value)
    if value <= 0:
        raise ConfigError(f"{name}.{key} must be a positive integer (got {value}).")
    return value


def _validate_smoothquant(name: str, out: Dict[str, Any]) -> None:
    alpha = out["alpha"]
    if isinstance(alpha, str):
        if alpha != "search":
            raise ConfigError(
                f"{name}.alpha={alpha!r} is not valid.{suggest(alpha, ['search'])} Use a number in [0, 1] or 'search'."
            )
    else:
        out["alpha"] = _check_alpha(name, "alpha", alpha)
    grid = out["alpha_grid"]
    if not isinstance(grid, (list, tuple)) or not grid:
        raise _type_error(name, "alpha_grid", "a non-empty list of numbers in [0, 1]", grid)
    out["alpha_grid"] = [_check_alpha(name, "alpha_grid", a) for a in grid]
    if not isinstance(out["weight_only"], bool):
        raise _type_error(name, "weight_only", "a bool", out["weight_only"])
    wgrid = out["weight_only_grid"]
    if not isinstance(wgrid, (list, tuple)) or not wgrid:
        raise _type_error(name, "weight_only_grid", "a non-empty list of numbers in [0, 1]", wgrid)
    out["weight_only_grid"] = [_check_alpha(name, "weight_only_grid", a) for a in wgrid]
    if not isinstance(out["search_keeps_unsmoothed"], bool):
        raise _type_error(name, "search_keeps_unsmoothed", "a bool", out["search_keeps_unsmoothed"])
    out["search_tokens"] = _positive_int(name, "search_tokens", out["search_tokens"])
    for key in ("min_scale", "max_scale"):
        if not _is_number(out[key]) or out[key] <= 0:
            raise ConfigError(f"{name}.{key} must be a positive number (got {out[key]!r}).")
    if out["min_scale"] >= out["max_scale"]:
        raise ConfigError(f"{name}.min_scale ({out['min_scale']}) must be below max_scale ({out['max_scale']}).")
    groups = out["groups"]
    if groups is not None:
        if isinstance(groups, str):
            groups = [groups]
        if not isinstance(groups, (list, tuple)) or not all(isinstance(g, str) for g in groups):
            raise _type_error(name, "groups", "a list of group names such as ['qkv', 'gate_up', 'down']", groups)
        out["groups"] = list(groups)
    table = out["table"]
    if table is not None:
        if not isinstance(table, (list, tuple)) or not table:
            raise _type_error(name, "table", "a non-empty list of {'name', 'prev', 'consumers'} mappings", table)
        rows = []
        for index, row in enumerate(table):
            section = f"{name}.table[{index}]"
            if not isinstance(row, Mapping):
                raise ConfigTypeError(f"{section} must be a mapping like {{'prev': 'input_layernorm', "
                                      "'consumers': ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj']}}.")
            allowed = ("name", "prev", "consumers", "prev_rows", "norm_offset")
            for key in row:
                if key not in allowed:
                    raise ConfigError(f"Unknown field {section}.{key}.{suggest(key, allowed)} Valid: {', '.join(allowed)}.")
            if not isinstance(row.get("prev"), str) or not row.get("consumers"):
                raise ConfigError(f"{section} needs 'prev' (module path inside the decoder layer) and 'consumers'.")
            consumers = row["consumers"]
            if isinstance(consumers, str):
                consumers = [consumers]
            rows.append({"name": str(row.get("name", f"group{index}")), "prev": row["prev"],
                         "consumers": list(consumers), "prev_rows": row.get("prev_rows"),
                         "norm_offset": row.get("norm_offset")})
        out["table"] = rows


def _validate_gptq(name: str, out: Dict[str, Any]) -> None:
    out["block_size"] = _positive_int(name, "block_size", out["block_size"])
    damp = out["damp"]
    if not _is_number(damp) or damp < 0:
        raise ConfigError(
            f"{name}.damp={damp!r} must be a non-negative number: the dampening added to the Hessian diagonal, as "
            "a fraction of its mean (0.01 is the usual value; raise it for ill-conditioned layers)."
        )
    out["damp"] = float(damp)
    for key in ("act_order", "static_groups", "report_error", "true_sequential", "float_targets"):
        if not isinstance(out[key], bool):
            raise _type_error(name, key, "a bool", out[key])
    retries = out["max_damp_retries"]
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"{name}.max_damp_retries must be a non-negative integer (got {retries!r}).")
    if out["float_targets"]:
        # the correction of o/gate-up/down must see the input the *corrected* q/k/v (gate/up) produce; measured
        # on the drift before them it compensates twice (Gemma 3 270M INT4: +76% perplexity instead of +4.9%)
        out["true_sequential"] = True
    if out["hessian_dtype"] not in ("float32", "float64"):
        raise ConfigError(
            f"{name}.hessian_dtype={out['hessian_dtype']!r} is not valid.{suggest(out['hessian_dtype'], ['float32', 'float64'])} "
            "Use 'float32' or 'float64'."
        )


def _validate_auto_precision(name: str, out: Dict[str, Any]) -> None:
    budget = out["budget"]
    if not isinstance(budget, Mapping) or not budget:
        raise ConfigTypeError(f"{name}.budget must be a mapping such as {{'max_ppl_increase_pct': 0.3}} (got {budget!r}).")
    budget = dict(budget)
    for key, value in budget.items():
        if key not in _BUDGET_KEYS:
            raise ConfigError(f"Unknown budget key {name}.budget.{key}.{suggest(key, _BUDGET_KEYS)} "
                              f"Valid keys: {', '.join(_BUDGET_KEYS)}.")
        if not _is_number(value) or value < 0:
            raise ConfigError(f"{name}.budget.{key} must be a non-negative number (got {value!r}).")
    if len(budget) != 1:
        raise ConfigError(f"{name}.budget needs exactly one of {', '.join(_BUDGET_KEYS)} (got {sorted(budget)}).")
    out["budget"] = budget
    fallback = out["fallback"]
    if isinstance(fallback, str):
        if fallback not in ("fp16", "bf16", "fp32"):
            raise ConfigError(
                f"{name}.fallback={fallback!r} is not valid.{suggest(fallback, ['fp16', 'bf16', 'fp32'])} Use 'fp16', "
                "'bf16', 'fp32' or a rule fragment like {'precision': 'int8', 'activations': 'dynamic'}."
            )
        out["fallback"] = {"precision": fallback}
    elif isinstance(fallback, Mapping):
        fallback = dict(fallback)
        extra = set(fallback) - {"precision", "weights", "activations"}
        if extra or "precision" not in fallback:
            raise ConfigError(f"{name}.fallback must have 'precision' and optionally 'weights'/'activations' "
                              f"(got keys {sorted(fallback)}).")
        from ..config import normalize_rule

        normalize_rule({"targets": ["_"], **fallback}, 0)  # same checks as a rule
        out["fallback"] = fallback
    else:
        raise _type_error(name, "fallback", "'fp16' or a rule fragment mapping", fallback)
    if out["sensitivity"] not in ("kl", "loss", "sqnr"):
        raise ConfigError(f"{name}.sensitivity={out['sensitivity']!r} is not valid."
                          f"{suggest(out['sensitivity'], ['kl', 'loss', 'sqnr'])} Use 'kl', 'loss' or 'sqnr'.")
    out["sensitivity_windows"] = _positive_int(name, "sensitivity_windows", out["sensitivity_windows"])
    out["batch_size"] = _positive_int(name, "batch_size", out["batch_size"])
    out["sensitivity_tokens"] = _positive_int(name, "sensitivity_tokens", out["sensitivity_tokens"])
    out["max_rounds"] = _positive_int(name, "max_rounds", out["max_rounds"])
    if not isinstance(out["measure_speed"], bool):
        raise _type_error(name, "measure_speed", "a bool", out["measure_speed"])
    margin = out["margin"]
    if not _is_number(margin) or not 0 < margin <= 1:
        raise ConfigError(f"{name}.margin must be in (0, 1] (got {margin!r}): the share of the budget the search "
                          "may use on the search windows.")
    out["margin"] = float(margin)
    cands = out["candidates"]
    if cands is not None:
        if isinstance(cands, str):
            cands = [cands]
        if not isinstance(cands, (list, tuple)) or not all(isinstance(c, str) for c in cands):
            raise _type_error(name, "candidates", "a list of kinds ('ffn') or module names", cands)
        out["candidates"] = list(cands)


_VALIDATORS = {
    "smoothquant": _validate_smoothquant,
    "gptq": _validate_gptq,
    "auto_precision": _validate_auto_precision,
}


def validate_options(name: str, options: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """Validate the option dict of an algorithm and fill its defaults.

    Args:
        name: ``"smoothquant"``, ``"gptq"`` or ``"auto_precision"``.
        options: the user's options (``None``/``True`` mean all defaults). Idempotent: a dict
            returned by this function validates to itself.

    Returns:
        A new dict with every option of :data:`OPTION_DEFAULTS` ``[name]``.

    Raises:
        ConfigError: an unknown option (with a suggestion), or a value out of range.
        ConfigTypeError: a value of the wrong type.

    Example:
        >>> validate_options("smoothquant", {"alpha": 0.6})["alpha"]
        0.6
        >>> validate_options("gptq", {"dampening": 0.1})
        Traceback (most recent call last):
        ...
        hfptq.errors.ConfigError: Unknown option gptq.dampening. Did you mean 'damp'? Valid options: ...
    """
    if name not in OPTION_DEFAULTS:
        raise ConfigError(f"Unknown algorithm {name!r}.{suggest(name, ALGORITHM_NAMES)} Known: {', '.join(ALGORITHM_NAMES)}.")
    if options is None or options is True:
        options = {}
    if not isinstance(options, Mapping):
        raise ConfigTypeError(f"{name} must be a mapping of options, True, or None (got {type(options).__name__}).")
    defaults = OPTION_DEFAULTS[name]
    for key in options:
        if key not in defaults:
            raise ConfigError(
                f"Unknown option {name}.{key}.{suggest(key, defaults)} Valid options: {', '.join(defaults)}."
            )
    out = copy.deepcopy(defaults)
    out.update(copy.deepcopy(dict(options)))
    _VALIDATORS[name](name, out)
    return out


def summarize_algorithms(
    smoothquant_info: Optional[Mapping[str, Any]],
    gptq_info: Optional[Mapping[str, Any]],
    config: Any = None,
) -> List[Dict[str, Any]]:
    """The report's ``info["algorithms"]`` list: one entry per algorithm that ran, saying what it bought.

    Args:
        smoothquant_info: ``{layer name: smooth_layer() record}`` (``None`` if SmoothQuant did not run).
        gptq_info: ``{module name: GPTQResult.info}`` (``None`` if GPTQ did not run).
        config: the :class:`~hfptq.HfPtqConfig` (for the options actually used).

    Returns:
        ``[{"name": "smoothquant", "groups_smoothed", "alpha_mean", "act_range_before_mean",
        "act_range_after_mean", ...}, {"name": "gptq", "modules", "error_reduction", "damp_retries",
        "fallbacks", ...}]``.

    Example:
        >>> summarize_algorithms(None, {"fc": {"error": 1.0, "rtn_error": 2.0}})[0]["error_reduction"]
        0.5
    """
    out: List[Dict[str, Any]] = []
    if smoothquant_info is not None:
        from .smoothquant import summarize as summarize_sq

        options = validate_options("smoothquant", getattr(config, "smoothquant", None) if config is not None else None)
        entry = summarize_sq(list(smoothquant_info.values()), options)
        entry.pop("layers", None)  # the per-layer records stay in info["smoothquant"]
        out.append(entry)
    if gptq_info is not None:
        from .gptq import summarize as summarize_gptq

        out.append(summarize_gptq(gptq_info, getattr(config, "gptq", None) if config is not None else None))
    return out

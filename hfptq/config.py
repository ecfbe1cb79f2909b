"""`HfPtqConfig`: the one object that says how a model is quantized.

It is a Transformers ``QuantizationConfigMixin`` (``quant_method="hfptq"``), so it can be passed as
``quantization_config=`` to ``from_pretrained`` and is written into ``config.json`` on save.
Every field is validated on construction; errors name the field and the fix.
"""
from __future__ import annotations

import copy
import re
from typing import Any, Dict, List, Mapping, Optional, Union

from transformers.utils.quantization_config import QuantizationConfigMixin

from .architectures import PRESETS
from .errors import ConfigError, ConfigTypeError, suggest
from .options import check_options
from .utils import is_power_of_two

QUANT_METHOD = "hfptq"
#: Version of the on-disk format (config.json ``quantization_config`` + tensor layout).
FORMAT_VERSION = 1

PRECISIONS = ("int8", "int4", "fp16", "bf16", "fp32", "skip")
INT_PRECISIONS = ("int8", "int4")
KINDS = ("attention", "ffn", "lm_head", "embedding", "other")
ACT_MODES = ("dynamic", "static", "none")
OBSERVER_NAMES = ("minmax", "percentile", "entropy", "mse")
COMPUTE_DTYPES = ("auto", "bfloat16", "float32", "float16")

#: What each kind of module gets unless a rule says otherwise: attention kept in FP16 storage,
#: FFN and the LM head in INT8 (W8A8), embeddings follow the LM head when they are tied to it.
DEFAULT_SCHEME: Dict[str, str] = {
    "attention": "fp16",
    "ffn": "int8",
    "lm_head": "int8",
    "embedding": "skip",
    "other": "skip",
}

WEIGHT_FIELDS = {
    "bits": (int, None),
    "symmetric": (bool, None),
    "granularity": (str, ("tensor", "channel", "group")),
    "group_size": (int, None),
    "observer": (str, ("minmax", "mse")),
}
ACTIVATION_FIELDS = {
    "mode": (str, ACT_MODES),
    "bits": (int, None),
    "symmetric": (bool, None),
    "granularity": (str, ("token", "tensor", "channel")),
    "observer": (str, OBSERVER_NAMES),
    "percentile": (float, None),
    "averaging_constant": (float, None),
    "bins": (int, None),
    # block size (a power of two) of an online Hadamard rotation of the input, folded into the weight
    "rotation": (int, None),
}
CALIBRATION_FIELDS = {
    "dataset": None,  # str | datasets.Dataset
    "config": (str, None),
    "split": (str, None),
    "data_files": None,
    "text_column": (str, None),
    "template": (str, None),
    "num_samples": (int, None),
    "seq_len": (int, None),
    "batch_size": (int, None),
    "shuffle": (bool, None),
    "seed": (int, None),
    "packing": (bool, None),
    "add_bos": (bool, None),
    "tokenizer": None,  # str | tokenizer object
    "observer": (str, OBSERVER_NAMES),
    "percentile": (float, None),
    "averaging_constant": (float, None),
    "bins": (int, None),
    "sequential": (bool, None),
    "dtype": (str, ("auto", "model", "bfloat16")),
}
RULE_FIELDS = ("targets", "precision", "weights", "activations", "name")


def default_weight_args(precision: str = "int8") -> Dict[str, Any]:
    """Weight quantization defaults for ``int8`` (per-channel) or ``int4`` (group of 128)."""
    if precision == "int4":
        return {"bits": 4, "symmetric": True, "granularity": "group", "group_size": 128, "observer": "minmax"}
    return {"bits": 8, "symmetric": True, "granularity": "channel", "group_size": None, "observer": "minmax"}


def default_activation_args(mode: str = "dynamic") -> Dict[str, Any]:
    """Activation defaults: dynamic = per-token computed at run time; static = per-tensor from calibration."""
    if mode == "dynamic":
        # asymmetric: the inputs of down_proj (after GELU/SiLU) are skewed; a per-token zero point
        # roughly halves their rounding error (Gemma 3 270M FFN W8A8: +0.9% ppl instead of +2.3%)
        return {"mode": "dynamic", "bits": 8, "symmetric": False, "granularity": "token"}
    if mode == "static":
        return {"mode": "static", "bits": 8, "symmetric": True, "granularity": "tensor", "observer": "minmax"}
    return {"mode": "none"}


_SCHEMA_OF = {id(WEIGHT_FIELDS): "weights", id(ACTIVATION_FIELDS): "activations", id(CALIBRATION_FIELDS): "calibration"}


def _check_fields(section: str, values: Mapping[str, Any], spec: Mapping[str, Any]) -> None:
    schema = _SCHEMA_OF.get(id(spec))
    if schema is not None:
        # names, types and ranges from the one options schema (hfptq.options); the choices below too
        check_options(schema, values, prefix=section)
    if not isinstance(values, Mapping):
        raise ConfigTypeError(
            f"{section} must be a mapping such as {{{', '.join(repr(k) + ': ...' for k in list(spec)[:2])}}} "
            f"(got {type(values).__name__}: {values!r})."
        )
    for key, value in values.items():
        if key not in spec:
            raise ConfigError(
                f"Unknown field {section}.{key}.{suggest(key, spec)} Valid fields: {', '.join(spec)}."
            )
        rule = spec[key]
        if rule is None or value is None:
            continue
        typ, choices = rule
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if typ is int and isinstance(value, bool) or not isinstance(value, typ):
            raise ConfigTypeError(
                f"{section}.{key} must be of type {typ.__name__} (got {type(value).__name__}: {value!r})."
            )
        if choices is not None and value not in choices:
            raise ConfigError(
                f"{section}.{key}={value!r} is not valid.{suggest(value, choices)} "
                f"Choose one of: {', '.join(map(str, choices))}."
            )


def normalize_weight_args(values: Optional[Mapping[str, Any]], section: str = "weights",
                          base: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Validate weight args and fill the defaults (``base`` or int8 per-channel)."""
    if values is None:
        values = {}
    _check_fields(section, values, WEIGHT_FIELDS)
    values = dict(values)
    bits = values.get("bits", (base or {}).get("bits", 8))
    out = dict(base) if base is not None else default_weight_args("int4" if bits == 4 else "int8")
    out.update(values)
    if out["bits"] not in (4, 8):
        raise ConfigError(f"{section}.bits={out['bits']} is not supported: use 8 (int8) or 4 (int4).")
    if out["granularity"] == "group":
        gs = out.get("group_size")
        if not isinstance(gs, int) or gs <= 0:
            raise ConfigError(
                f"{section}.group_size must be a positive integer with granularity='group' (got {gs!r}); e.g. 128."
            )
    else:
        out["group_size"] = None
    return out


def normalize_activation_args(values: Union[None, str, Mapping[str, Any]], section: str = "activations",
                              base: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Validate activation args. A string is the mode: ``"dynamic"``, ``"static"`` or ``"none"``."""
    if values is None:
        values = {}
    if isinstance(values, str):
        values = {"mode": values}
    if not isinstance(values, Mapping):
        raise ConfigTypeError(
            f"{section} must be 'dynamic', 'static', 'none' or a mapping like {{'mode': 'dynamic'}} (got {values!r})."
        )
    values = dict(values)
    _check_fields(section, values, ACTIVATION_FIELDS)
    mode = values.get("mode", (base or {}).get("mode", "dynamic"))
    if base is not None and base.get("mode") == mode:
        out = dict(base)
    else:
        out = default_activation_args(mode)
    out.update(values)
    rotation = out.get("rotation")
    if rotation is not None and rotation != 0:
        if not is_power_of_two(rotation):
            raise ConfigError(
                f"{section}.rotation={rotation!r} is not a power of two >= 2: it is the block size of the input's "
                "Hadamard rotation, e.g. 128 (it must also divide the module's in_features)."
            )
    if mode == "none":
        # weight-only: the input is not quantized, but a rotation still applies (it makes the weight's groups
        # outlier-free, which is what INT4 per-group weights need; see hfptq.quant.rotation)
        return {"mode": "none", "rotation": rotation} if rotation else {"mode": "none"}
    if out.get("bits", 8) != 8:
        raise ConfigError(f"{section}.bits={out['bits']} is not supported: activations are quantized to 8 bits.")
    if mode == "dynamic" and out.get("granularity") != "token":
        raise ConfigError(
            f"{section}.granularity={out.get('granularity')!r} with mode='dynamic': dynamic activations are "
            "quantized per token at run time; use granularity='token', or mode='static' for per-tensor scales."
        )
    if mode == "static" and out.get("granularity") == "token":
        raise ConfigError(
            f"{section}.granularity='token' with mode='static': per-token scales are computed at run time; "
            "use mode='dynamic', or granularity='tensor' for static scales."
        )
    return out


def check_target(target: str, section: str = "targets") -> None:
    """Validate one rule target: ``"re:<regex>"``, ``"kind:<kind>"``, a class name or a module name/suffix.

    Raises:
        ConfigError: the regex does not compile, or the kind is not one of :data:`KINDS`.

    Example:
        >>> check_target("re:mlp\\.(up|down)_proj$")
        >>> check_target("kind:ffn")
    """
    if target.startswith("re:"):
        try:
            re.compile(target[3:])
        except re.error as exc:
            raise ConfigError(
                f"{section}: {target!r} is not a valid regular expression ({exc}). Escape literal dots and "
                "brackets, e.g. 're:mlp\\.down_proj$'."
            ) from None
    elif target.startswith("kind:"):
        kind = target[5:]
        if kind not in KINDS:
            raise ConfigError(
                f"{section}: {target!r} names an unknown kind.{suggest(kind, KINDS)} "
                f"Use 'kind:' followed by one of: {', '.join(KINDS)}."
            )


def normalize_rule(rule: Mapping[str, Any], index: int) -> Dict[str, Any]:
    """Validate one plan rule ``{targets, precision, weights?, activations?, name?}``."""
    section = f"rules[{index}]"
    if not isinstance(rule, Mapping):
        raise ConfigTypeError(f"{section} must be a mapping like {{'targets': ['re:.*mlp.*'], 'precision': 'int8'}}.")
    for key in rule:
        if key not in RULE_FIELDS:
            raise ConfigError(f"Unknown field {section}.{key}.{suggest(key, RULE_FIELDS)} Valid: {', '.join(RULE_FIELDS)}.")
    if "targets" not in rule or "precision" not in rule:
        raise ConfigError(f"{section} needs both 'targets' (names, class names or 're:' regexes) and 'precision'.")
    targets = rule["targets"]
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"{section}.targets must be a non-empty string or list of strings (got {rule['targets']!r}).")
    for target in targets:
        check_target(target, f"{section}.targets")
    precision = rule["precision"]
    if precision not in PRECISIONS:
        raise ConfigError(
            f"{section}.precision={precision!r} is not valid.{suggest(precision, PRECISIONS)} "
            f"Choose one of: {', '.join(PRECISIONS)}."
        )
    out: Dict[str, Any] = {"targets": list(targets), "precision": precision}
    if rule.get("weights") is not None:
        if precision not in INT_PRECISIONS:
            raise ConfigError(f"{section}.weights only applies to int8/int4 rules (precision is {precision!r}).")
        _check_fields(f"{section}.weights", rule["weights"], WEIGHT_FIELDS)
        bits = rule["weights"].get("bits")
        if bits is not None and bits != (4 if precision == "int4" else 8):
            raise ConfigError(f"{section}.weights.bits={bits} contradicts precision={precision!r}; drop one of them.")
        out["weights"] = dict(rule["weights"])
    if rule.get("activations") is not None:
        if precision not in INT_PRECISIONS:
            raise ConfigError(f"{section}.activations only applies to int8/int4 rules (precision is {precision!r}).")
        acts = rule["activations"]
        normalize_activation_args(acts, f"{section}.activations")
        out["activations"] = {"mode": acts} if isinstance(acts, str) else dict(acts)
    if rule.get("name") is not None:
        out["name"] = str(rule["name"])
    return out


def _describe_in_memory(value: Any) -> str:
    """``<in-memory Dataset fingerprint=... rows=...>``: what a saved config/recipe can say about an object it
    cannot hold (the fingerprint identifies the exact rows; the recipe cannot reproduce them)."""
    details = []
    fingerprint = getattr(value, "_fingerprint", None)
    if isinstance(fingerprint, str):
        details.append(f"fingerprint={fingerprint}")
    try:
        details.append(f"rows={len(value)}")
    except TypeError:
        pass
    name = getattr(value, "name_or_path", None)
    if isinstance(name, str) and name:
        details.append(f"name_or_path={name}")
    return f"<in-memory {type(value).__name__}{' ' + ' '.join(details) if details else ''}>"


class HfPtqConfig(QuantizationConfigMixin):
    """Configuration of hfptq post-training quantization.

    Args:
        weights: default weight quantization of integer modules: ``bits`` (8), ``symmetric`` (True),
            ``granularity`` (``"channel"``, ``"tensor"`` or ``"group"``), ``group_size``, ``observer``
            (``"minmax"`` or ``"mse"`` clipping search). With ``bits=8`` these apply to ``int8``
            modules (``int4`` ones use int4 defaults: group of 128). ``bits=4`` makes ``int4`` the
            integer precision of the default scheme (FFN and LM head, weight-only) and these
            fields apply to ``int4`` modules.
        activations: ``"dynamic"`` (per-token scales computed at run time, W8A8 with integer matmul),
            ``"static"`` (per-tensor scales frozen by calibration), ``"none"`` (weight-only), or a
            mapping with ``mode`` and ``symmetric``/``granularity``/``observer``/``percentile``...;
            ``rotation`` (a power of two, e.g. 128) rotates the input in Hadamard blocks of that
            size before quantizing it, folded into the weight (see :mod:`hfptq.quant.rotation`);
            with ``mode="none"`` (weight-only) it still applies: the stored weight ``W H`` has no
            outlier columns, which is what INT4 groups need.
        scheme: precision per module kind (``attention``, ``ffn``, ``lm_head``, ``embedding``,
            ``other``); defaults to attention FP16, FFN + LM head INT8.
        rules: ordered list of ``{"targets": [...], "precision": ..., "weights": {...},
            "activations": {...}}``; the first rule matching a module wins, before the scheme.
            A target is a module class name (``"Linear"``), a module name or name suffix
            (``"down_proj"``), a regex prefixed ``"re:"`` (searched in the full module name) or a
            kind prefixed ``"kind:"`` (``"kind:ffn"``).
        preset: architecture preset naming which modules are attention/FFN/LM head: ``"auto"``
            (from ``config.model_type``), a model type such as ``"llama"``, or ``"structural"``
            (guess from module names).
        calibration: where and how to measure activation ranges (needed for ``"static"``
            activations, SmoothQuant and GPTQ); see :mod:`hfptq.data`.
        mode: ``"real"`` (int8 storage and integer matmul) or ``"fake"`` (float simulation, for study).
        compute_dtype: compute dtype of FP16-stored modules and weight-only dequantization on CPU:
            ``"auto"`` uses bfloat16 on CPU (FP16 matmul is ~200x slower there) and the storage
            dtype on CUDA.
        modules_to_not_convert: module names (or suffixes) left untouched, as in other
            Transformers quantizers; shorthand for a ``skip`` rule.
        smoothquant, gptq: accuracy algorithms (see :mod:`hfptq.algorithms`), ``None`` to disable.

    Example:
        >>> import hfptq
        >>> cfg = hfptq.HfPtqConfig(activations="dynamic", rules=[{"targets": "down_proj", "precision": "fp16"}])
        >>> cfg.to_dict()["quant_method"]
        'hfptq'
    """

    def __init__(
        self,
        weights: Optional[Mapping[str, Any]] = None,
        activations: Union[str, Mapping[str, Any], None] = "dynamic",
        scheme: Optional[Mapping[str, str]] = None,
        rules: Optional[List[Mapping[str, Any]]] = None,
        preset: str = "auto",
        calibration: Optional[Mapping[str, Any]] = None,
        mode: str = "real",
        compute_dtype: str = "auto",
        modules_to_not_convert: Optional[List[str]] = None,
        smoothquant: Optional[Mapping[str, Any]] = None,
        gptq: Optional[Mapping[str, Any]] = None,
        plan: Optional[Mapping[str, Any]] = None,
        format_version: int = FORMAT_VERSION,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        kwargs.pop("quant_method", None)
        # fields written by Transformers or earlier hfptq versions that carry no meaning for us
        for ignored in ("hfptq_version",):
            kwargs.pop(ignored, None)
        if kwargs:
            known = list(self._field_names())
            key = next(iter(kwargs))
            raise ConfigError(
                f"HfPtqConfig got an unknown field {key!r}.{suggest(key, known)} Valid fields: {', '.join(known)}."
            )
        if not isinstance(format_version, int) or isinstance(format_version, bool) or format_version < 1:
            raise ConfigTypeError(
                f"format_version must be a positive integer (got {format_version!r}); it is written by hfptq, "
                "do not edit it in config.json."
            )
        if format_version > FORMAT_VERSION:
            raise ConfigError(
                f"format_version={format_version!r} was written by a newer hfptq than this one (understands "
                f"{FORMAT_VERSION}); upgrade hfptq (pip install -U hfptq) to load this checkpoint."
            )
        self.format_version = FORMAT_VERSION
        self.weights = normalize_weight_args(weights, "weights")
        self.activations = normalize_activation_args(activations, "activations")
        if (self.activations["mode"] != "none" and self.weights["bits"] == 8 and self.weights["granularity"] == "group"
                and mode == "real"):
            raise ConfigError(
                "weights.granularity='group' needs activations='none' (weight-only): the integer matmul of W8A8 "
                "uses one scale per output channel. Use granularity='channel' for W8A8."
            )
        if scheme is not None and not isinstance(scheme, Mapping):
            raise ConfigTypeError(
                f"scheme must be a mapping of kind -> precision such as {{'attention': 'fp16', 'ffn': 'int8'}} "
                f"(got {type(scheme).__name__}: {scheme!r})."
            )
        scheme = dict(scheme or {})
        for key, value in scheme.items():
            if key not in KINDS:
                raise ConfigError(f"Unknown scheme kind {key!r}.{suggest(key, KINDS)} Valid kinds: {', '.join(KINDS)}.")
            if value not in PRECISIONS:
                raise ConfigError(
                    f"scheme.{key}={value!r} is not valid.{suggest(value, PRECISIONS)} Choose one of: {', '.join(PRECISIONS)}."
                )
        default_scheme = dict(DEFAULT_SCHEME)
        if self.weights["bits"] == 4:
            # weights.bits=4 makes int4 the integer precision of the default scheme (weight-only).
            default_scheme = {k: ("int4" if v == "int8" else v) for k, v in default_scheme.items()}
        self.scheme = {**default_scheme, **scheme}
        if rules is not None and not isinstance(rules, (list, tuple)):
            raise ConfigTypeError(f"rules must be a list of rule mappings (got {type(rules).__name__}).")
        self.rules = [normalize_rule(r, i) for i, r in enumerate(rules or [])]
        if not isinstance(preset, str):
            raise ConfigTypeError(f"preset must be a string such as 'auto' (got {preset!r}).")
        if preset not in ("auto", "structural") and preset not in PRESETS:
            raise ConfigError(
                f"preset={preset!r} is unknown.{suggest(preset, list(PRESETS) + ['auto', 'structural'])} Use 'auto' "
                f"(from config.model_type), 'structural' (from module names) or one of: {', '.join(sorted(PRESETS))}."
            )
        self.preset = preset
        if mode not in ("real", "fake"):
            raise ConfigError(f"mode={mode!r} is not valid: use 'real' (int8 kernels) or 'fake' (simulation).")
        self.mode = mode
        if compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(
                f"compute_dtype={compute_dtype!r} is not valid.{suggest(compute_dtype, COMPUTE_DTYPES)} "
                f"Choose one of: {', '.join(COMPUTE_DTYPES)}."
            )
        self.compute_dtype = compute_dtype
        if modules_to_not_convert is not None and (
            not isinstance(modules_to_not_convert, (list, tuple))
            or not all(isinstance(n, str) and n for n in modules_to_not_convert)
        ):
            raise ConfigTypeError(
                "modules_to_not_convert must be a list of module names or suffixes such as ['lm_head'] "
                f"(got {modules_to_not_convert!r})."
            )
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else None
        self.calibration = self._normalize_calibration(calibration)
        self.smoothquant = self._normalize_algorithm("smoothquant", smoothquant)
        self.gptq = self._normalize_algorithm("gptq", gptq)
        if self.activations["mode"] == "static" and self.calibration is None and plan is None:
            raise ConfigError(
                "activations='static' needs calibration data: pass calibration=dict(dataset='wikitext', "
                "config='wikitext-2-raw-v1', split='validation'), or use activations='dynamic'."
            )
        self.plan = copy.deepcopy(dict(plan)) if plan is not None else None
        self.post_init()

    # ------------------------------------------------------------------
    @staticmethod
    def _field_names():
        return (
            "weights", "activations", "scheme", "rules", "preset", "calibration", "mode", "compute_dtype",
            "modules_to_not_convert", "smoothquant", "gptq", "plan", "format_version",
        )

    @staticmethod
    def _normalize_calibration(calibration: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
        if calibration is None:
            return None
        if not isinstance(calibration, Mapping):
            raise ConfigTypeError(
                "calibration must be a mapping such as dict(dataset='wikitext', config='wikitext-2-raw-v1', "
                f"split='validation') (got {type(calibration).__name__})."
            )
        calibration = dict(calibration)
        _check_fields("calibration", calibration, CALIBRATION_FIELDS)
        if calibration.get("dataset") is None:
            raise ConfigError("calibration.dataset is required: a Hub name, a builder with data_files, or a datasets.Dataset.")
        for key in ("num_samples", "seq_len", "batch_size"):
            if key in calibration and calibration[key] is not None and calibration[key] <= 0:
                raise ConfigError(f"calibration.{key} must be a positive integer (got {calibration[key]}).")
        out = {"split": "validation", "text_column": "text", "num_samples": 128, "seq_len": 512, "batch_size": 8,
               "shuffle": True, "seed": 0, "observer": "minmax", "sequential": True}
        out.update(calibration)
        return out

    @staticmethod
    def _normalize_algorithm(name: str, value: Any) -> Optional[Dict[str, Any]]:
        if value is None or value is False:
            return None
        if value is True:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigTypeError(f"{name} must be a mapping of options, True, or None (got {value!r}).")
        check_options(name, value)  # names, types and ranges now, not after the model loaded
        return dict(value)

    def post_init(self) -> None:
        """Cross-field checks (called from ``__init__``)."""

    # ------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable dict (what lands in ``config.json``); in-memory objects are replaced by a description."""
        out: Dict[str, Any] = {}
        for key, value in self.__dict__.items():
            if key.startswith("_"):
                continue
            if key == "calibration" and value is not None:
                calib = {}
                for ckey, cvalue in value.items():
                    if cvalue is not None and not isinstance(cvalue, (str, int, float, bool, list, dict)):
                        cvalue = _describe_in_memory(cvalue)
                    calib[ckey] = copy.deepcopy(cvalue)
                out[key] = calib
            else:
                out[key] = copy.deepcopy(value)
        return out

    def to_diff_dict(self) -> Dict[str, Any]:
        return self.to_dict()

    def __deepcopy__(self, memo):
        # datasets.Dataset / tokenizer objects inside calibration are shared, not copied
        cls = self.__class__
        new = cls.__new__(cls)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "calibration" and value is not None:
                new.__dict__[key] = dict(value)
            else:
                new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    @property
    def is_static(self) -> bool:
        return self.activations["mode"] == "static"

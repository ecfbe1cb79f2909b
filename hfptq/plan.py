"""Resolve rules and architecture presets into a per-module precision plan.

The plan is the single source of truth of what happens to each module: it is printed to the
user, stored on the model (``model.hfptq_plan``) and in ``config.json`` so a reload rebuilds the
exact same skeleton. No Linear is ever left out silently: modules that stay in their original
precision appear in the plan as ``skip`` with the reason.
"""
from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .config import (
    INT_PRECISIONS,
    PRECISIONS,
    HfPtqConfig,
    normalize_activation_args,
    normalize_weight_args,
)
from .architectures import PRESETS, STRUCTURAL as _STRUCTURAL, is_conv1d as _is_conv1d, is_quantizable_linear, linear_shape
from .errors import CheckpointError, PlanError

logger = logging.getLogger(__name__)

@dataclass
class ModuleSpec:
    """What happens to one module."""

    name: str
    kind: str
    module_class: str
    precision: str
    in_features: int
    out_features: int
    has_bias: bool = False
    weights: Optional[Dict[str, Any]] = None
    activations: Optional[Dict[str, Any]] = None
    source: str = ""
    tied_to: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        return self.precision in INT_PRECISIONS

    def describe(self) -> str:
        """Short human-readable description of the precision, e.g. ``int8 W8A8 dynamic/token``."""
        if self.precision in INT_PRECISIONS and self.weights is not None:
            bits = self.weights["bits"]
            gran = self.weights["granularity"]
            if gran == "group":
                gran = f"g{self.weights['group_size']}"
            sym = "" if self.weights["symmetric"] else " asym"
            acts = self.activations or {"mode": "none"}
            rot = f", input rotated in blocks of {acts['rotation']}" if acts.get("rotation") else ""
            if acts["mode"] == "none":
                return f"int{bits} weight-only ({gran}{sym}{rot})"
            return f"W{bits}A8 {acts['mode']}/{acts['granularity']} ({gran}{sym}{rot})"
        if self.precision == "skip":
            return "unchanged"
        return f"{self.precision} storage"


@dataclass
class Plan:
    """Resolved per-module plan; ordered as the modules appear in the model."""

    entries: List[ModuleSpec]
    preset: str = ""
    model_type: str = ""

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, name: str) -> ModuleSpec:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def get(self, name: str) -> Optional[ModuleSpec]:
        for entry in self.entries:
            if entry.name == name:
                return entry
        return None

    def by_precision(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for entry in self.entries:
            counts[entry.precision] = counts.get(entry.precision, 0) + 1
        return counts

    def quantized_names(self) -> List[str]:
        return [e.name for e in self.entries if e.quantized and e.kind != "embedding"]

    def table(self) -> str:
        """Aligned text table: module, kind, class, precision, scheme, shape (out x in), decided by.

        Example:
            >>> print(resolve_plan(model, HfPtqConfig()).table())  # doctest: +SKIP
            module                        kind  class   precision  scheme                        out x in  decided by
            ...
            model.layers.0.mlp.down_proj  ffn   Linear  int8       W8A8 dynamic/token (channel)  64x128    scheme.ffn (llama)
        """
        rows = [("module", "kind", "class", "precision", "scheme", "out x in", "decided by")]
        for e in self.entries:
            rows.append(
                (e.name, e.kind, e.module_class, e.precision, e.describe(), f"{e.out_features}x{e.in_features}",
                 e.source + (f" (tied to {e.tied_to})" if e.tied_to and e.tied_to not in e.source else ""))
            )
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def summary(self) -> str:
        counts = ", ".join(f"{n} {p}" for p, n in sorted(self.by_precision().items()))
        return f"hfptq plan ({self.preset or 'custom'}): {len(self.entries)} modules: {counts}"

    def to_dict(self) -> Dict[str, Any]:
        return {"preset": self.preset, "model_type": self.model_type, "modules": [asdict(e) for e in self.entries]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        """The plan stored in a checkpoint's ``quantization_config.plan`` (:meth:`to_dict`'s output).

        Raises:
            CheckpointError: the stored plan is malformed or an entry has a precision hfptq does not know
                (config.json edited by hand or damaged).
        """
        entries = data.get("modules") if isinstance(data, Mapping) else None
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, Mapping) or "precision" not in entry:
                continue  # malformed: reported below
            precision = entry["precision"]
            if precision not in PRECISIONS:
                name = entry.get("name")
                raise CheckpointError(
                    f"config.json: quantization_config.plan entry {name!r} has precision {precision!r}, which is not "
                    f"one of {', '.join(PRECISIONS)}. The plan was edited by hand or is damaged: restore the "
                    "config.json saved with these weights, or re-quantize."
                )
        try:
            entries = [ModuleSpec(**dict(m)) for m in data["modules"]]
        except (KeyError, TypeError) as exc:
            raise CheckpointError(
                f"The stored hfptq plan is malformed ({exc}); the checkpoint's config.json was edited or corrupted. "
                "Re-quantize the float model, or restore config.json."
            ) from exc
        return cls(entries=entries, preset=data.get("preset", ""), model_type=data.get("model_type", ""))


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------


def _target_matches(target: str, name: str, module: nn.Module, kind: str) -> bool:
    if target.startswith("re:"):
        return re.search(target[3:], name) is not None
    if target.startswith("kind:"):
        return kind == target[5:]
    if type(module).__name__ == target:
        return True
    return name == target or name.endswith("." + target)


def _classify(name: str, patterns: Mapping[str, List[str]]) -> Optional[str]:
    for kind in ("lm_head", "attention", "ffn"):
        for pattern in patterns.get(kind, []):
            if re.search(pattern, name):
                return kind
    return None


def select_preset(model: nn.Module, preset: str) -> Tuple[str, Optional[Dict[str, List[str]]]]:
    """Return ``(preset_name, patterns)``; patterns is ``None`` for the structural fallback."""
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    if preset == "auto":
        if model_type in PRESETS:
            return model_type, PRESETS[model_type]
        return "structural", None
    if preset == "structural":
        return "structural", None
    if preset not in PRESETS:
        from .errors import suggest

        raise PlanError(
            f"preset={preset!r} is unknown.{suggest(preset, PRESETS)} Known presets: {', '.join(sorted(PRESETS))}, "
            "'auto' or 'structural'."
        )
    return preset, PRESETS[preset]


def _embeddings(model: nn.Module, which: str) -> Optional[nn.Module]:
    """``model.get_input_embeddings()`` / ``get_output_embeddings()``, or None where the model has none.

    Custom ``PreTrainedModel`` subclasses raise ``NotImplementedError`` from these unless overridden.
    """
    getter = getattr(model, f"get_{which}_embeddings", None)
    if getter is None:
        return None
    try:
        return getter()
    except (NotImplementedError, AttributeError):
        return None


def _tied_lm_head(model: nn.Module) -> bool:
    out, inp = _embeddings(model, "output"), _embeddings(model, "input")
    if out is None or inp is None or not hasattr(out, "weight") or not hasattr(inp, "weight"):
        return False
    if not isinstance(out.weight, torch.Tensor) or not isinstance(inp.weight, torch.Tensor):
        return False
    if out.weight is inp.weight:
        return True
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False)) and out.weight.shape == inp.weight.shape


def resolve_plan(model: nn.Module, config: HfPtqConfig) -> Plan:
    """Build the :class:`Plan` for ``model`` from ``config``.

    Every float ``nn.Linear`` / ``Conv1D`` of the model, and the input embedding, gets one entry.
    Precedence: ``modules_to_not_convert`` (always ``skip``), then ``config.rules`` in order (the
    first matching rule wins), then ``config.scheme`` for the module's kind (from the
    architecture preset, or the structural fallback for architectures without one). Modules of
    kind ``other`` (classifier heads, poolers, unknown names) are ``skip`` unless a rule says
    otherwise, and appear in the plan with the reason.

    Raises:
        PlanError: a rule matches nothing or is fully shadowed by earlier rules; no linear layer
            can be classified as attention/FFN and no rule says what to do; a module cannot take
            the requested precision (e.g. ``group_size`` not dividing ``in_features``).

    Example:
        >>> plan = resolve_plan(model, HfPtqConfig(rules=[{"targets": "down_proj", "precision": "fp16"}]))  # doctest: +SKIP
        >>> plan["model.layers.0.mlp.down_proj"].precision  # doctest: +SKIP
        'fp16'
    """
    preset_name, patterns = select_preset(model, config.preset)
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    # (label, rule); labels keep the user's indices so plan sources read 'rules[i]' as written
    rules: List[Tuple[str, Mapping[str, Any]]] = []
    if config.modules_to_not_convert:
        # Transformers' convention: these modules are never converted, whatever the other rules say.
        rules.append(("modules_to_not_convert",
                      {"targets": list(config.modules_to_not_convert), "precision": "skip"}))
    rules += [(rule.get("name") or f"rules[{index}]", rule) for index, rule in enumerate(config.rules)]

    out_emb = _embeddings(model, "output")
    in_emb = _embeddings(model, "input")
    # Linears owned by nn.MultiheadAttention are read through .weight by its functional forward:
    # they cannot be swapped for hfptq modules.
    mha_children = {
        f"{name}.{child}" if name else child
        for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)
        for child, _ in module.named_children()
    }
    candidates: List[Tuple[str, nn.Module, str]] = []
    for name, module in model.named_modules():
        if is_quantizable_linear(module):
            kind = _classify(name, patterns if patterns is not None else _STRUCTURAL)
            if kind is None and out_emb is not None and module is out_emb:
                kind = "lm_head"
            if kind is None or name in mha_children:
                kind = "other"
            candidates.append((name, module, kind))
        elif in_emb is not None and module is in_emb and isinstance(module, nn.Embedding):
            candidates.append((name, module, "embedding"))

    linears = [(n, k) for n, _, k in candidates if k != "embedding" and n not in mha_children]
    if linears and not config.rules and not any(k in ("attention", "ffn") for _, k in linears):
        raise PlanError(_unclassifiable_message(preset_name, model_type, [n for n, _ in linears]))

    rule_hits = [0] * len(rules)
    rule_matches = [0] * len(rules)
    entries: List[ModuleSpec] = []
    for name, module, kind in candidates:
        if kind == "embedding":
            in_f, out_f = module.embedding_dim, module.num_embeddings
            has_bias = False
        else:
            in_f, out_f = linear_shape(module)
            has_bias = getattr(module, "bias", None) is not None
        if name in mha_children:
            entries.append(_spec_from(name, kind, module, "skip", config, None,
                                      "inside nn.MultiheadAttention (not convertible)", in_f, out_f, has_bias))
            continue
        chosen: Optional[Tuple[str, Mapping[str, Any]]] = None
        for index, (label, rule) in enumerate(rules):
            if any(_target_matches(t, name, module, kind) for t in rule["targets"]):
                rule_matches[index] += 1
                if chosen is None:
                    chosen = (label, rule)
                    rule_hits[index] += 1
        if chosen is not None:
            label, rule = chosen
            spec = _spec_from(name, kind, module, rule["precision"], config, rule, label, in_f, out_f, has_bias)
        else:
            precision = config.scheme.get(kind, "skip")
            label = f"scheme.{kind} ({preset_name})" if kind != "other" else "no preset/rule matched"
            spec = _spec_from(name, kind, module, precision, config, None, label, in_f, out_f, has_bias)
        entries.append(spec)

    for index, (label, rule) in enumerate(rules):
        if rule_matches[index] == 0:
            raise PlanError(
                f"{label} (targets={rule['targets']}) matches no module. Targets are class names, module names or "
                "suffixes ('down_proj'), 're:<regex>' searched in the full name, or 'kind:<attention|ffn|lm_head>'. "
                "Print the candidate names with `hfptq plan` or hfptq.resolve_plan(model, config).table()."
            )
        if rule_hits[index] == 0:
            earlier = [lab for lab, _ in rules[:index]]
            raise PlanError(
                f"{label} (targets={rule['targets']}, precision={rule['precision']!r}) conflicts with earlier rules "
                f"({', '.join(earlier)}): every module it matches is already claimed by a rule before it, so it never "
                "applies. Reorder the rules (the first match wins) or remove it."
            )

    if patterns is None:
        left = [e.name for e in entries if e.kind == "other" and e.source == "no preset/rule matched"]
        if left:
            logger.warning(
                "hfptq: no preset for model_type=%r; %d linear layer(s) could not be classified from their names and "
                "stay unchanged (e.g. %s). Add rules to quantize them.", model_type, len(left),
                ", ".join(repr(n) for n in left[:3]),
            )

    _tie_embedding(model, entries)
    plan = Plan(entries=entries, preset=preset_name, model_type=model_type)
    return plan


def _unclassifiable_message(preset_name: str, model_type: str, names: List[str]) -> str:
    leaves: List[str] = []
    for name in names:
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in leaves:
            leaves.append(leaf)
    if preset_name == "structural":
        head = (f"No hfptq preset for model_type={model_type!r}, and none of its {len(names)} linear layers can be "
                "classified as attention or FFN from their names")
    else:
        head = (f"preset={preset_name!r} classifies none of the {len(names)} linear layers of this model "
                f"(model_type={model_type!r}) as attention or FFN")
    return (
        f"{head} (e.g. {names[0]!r}; layer names: {', '.join(leaves[:8])}). Write rules naming them, e.g. "
        f"rules=[{{'targets': [<attention layer names>], 'precision': 'fp16'}}, "
        f"{{'targets': [<feed-forward layer names>], 'precision': 'int8'}}] with names from {leaves[:8]} "
        f"(or 're:<regex>' patterns), or pass preset= one of {', '.join(sorted(PRESETS))}."
    )


def _spec_from(name, kind, module, precision, config: HfPtqConfig, rule, label, in_f, out_f, has_bias) -> ModuleSpec:
    spec = ModuleSpec(
        name=name, kind=kind, module_class=type(module).__name__, precision=precision,
        in_features=in_f, out_features=out_f, has_bias=has_bias, source=label,
    )
    if _is_conv1d(module):
        spec.extra["conv1d"] = True
    if kind == "embedding":
        scale = getattr(module, "scalar_embed_scale", None)  # plain float, also on the meta device
        if scale is None:
            scale = getattr(module, "embed_scale", None)
        if isinstance(scale, torch.Tensor) and scale.device.type == "meta":
            scale = None
        if scale is not None:
            spec.extra["embed_scale"] = float(scale.item() if isinstance(scale, torch.Tensor) else scale)
        if getattr(module, "padding_idx", None) is not None:
            spec.extra["padding_idx"] = int(module.padding_idx)
    if kind == "embedding" and precision not in INT_PRECISIONS + ("skip",):
        raise PlanError(
            f"{label}: the embedding {name!r} cannot be stored as {precision!r}; embeddings are 'int8'/'int4' "
            "(weight-only lookup) or 'skip'. Set scheme={'embedding': 'skip'} or add a rule with precision='int8'."
        )
    if precision in INT_PRECISIONS:
        # the top-level weights are the defaults of the integer precision with the same bit width
        base_w = config.weights if config.weights["bits"] == (4 if precision == "int4" else 8) else None
        wover = dict((rule or {}).get("weights") or {})
        wover.setdefault("bits", 4 if precision == "int4" else 8)
        spec.weights = normalize_weight_args(wover, f"{label}.weights", base=base_w)
        if kind == "embedding":
            spec.activations = {"mode": "none"}
        else:
            if rule is not None and rule.get("activations") is not None:
                spec.activations = normalize_activation_args(rule["activations"], f"{label}.activations",
                                                             base=config.activations)
            elif precision == "int4":
                spec.activations = {"mode": "none"}
            else:
                spec.activations = dict(config.activations)
        _validate_quant_spec(spec, config)
    return spec


def _validate_quant_spec(spec: ModuleSpec, config: HfPtqConfig) -> None:
    w, a = spec.weights, spec.activations
    if w["granularity"] == "group" and spec.in_features % w["group_size"] != 0:
        raise PlanError(
            f"{spec.source}: weights.group_size={w['group_size']} does not divide in_features={spec.in_features} of "
            f"{spec.name!r}. Use a group_size dividing {spec.in_features} (e.g. "
            f"{_divisor_hint(spec.in_features, w['group_size'])}), or granularity='channel' for this module "
            f"(a rule {{'targets': [{spec.name!r}], 'precision': {spec.precision!r}, "
            "'weights': {'granularity': 'channel'}})."
            + (" int4 modules take their defaults from the top-level weights= only with weights.bits=4, e.g. "
               f"weights={{'bits': 4, 'group_size': {_divisor_hint(spec.in_features, w['group_size'])}}}."
               if spec.precision == "int4" and config.weights["bits"] != 4
               else "")
        )
    if w["bits"] == 4 and spec.in_features % 2:
        raise PlanError(
            f"{spec.source}: {spec.name!r} has an odd in_features={spec.in_features}; int4 packs two values per byte "
            f"along in_features. Keep this module in int8 (a rule {{'targets': [{spec.name!r}], 'precision': 'int8'}})."
        )
    block = int(a.get("rotation") or 0)
    if block and spec.in_features % block:
        raise PlanError(
            f"{spec.source}: activations.rotation={block} does not divide {spec.name!r}'s in_features="
            f"{spec.in_features}; use a power of two that divides it, or a rule without rotation for this module."
        )
    if a["mode"] != "none" and config.mode == "real":
        if w["granularity"] == "group":
            raise PlanError(
                f"{spec.source}: {spec.name!r} has per-group weights and {a['mode']} activations; the integer matmul "
                "needs per-channel weights. Set activations='none' (weight-only) or granularity='channel'."
            )
        if w["bits"] == 4:
            raise PlanError(
                f"{spec.source}: int4 weights run weight-only; set activations='none' for {spec.name!r}."
            )
        if a["mode"] == "static" and a.get("granularity") == "channel":
            raise PlanError(
                f"{spec.source}: static per-channel activation scales cannot be factored out of an integer matmul; "
                "use granularity='tensor' (or mode='fake' to study per-channel scales)."
            )
        if not w["symmetric"]:
            raise PlanError(
                f"{spec.source}: W8A8 integer matmul needs symmetric weights for {spec.name!r}; set "
                "weights.symmetric=True (activations may stay asymmetric)."
            )


def _divisor_hint(n: int, near: int) -> int:
    """Largest divisor of ``n`` not above ``near`` (smaller groups keep the accuracy), else ``n``."""
    below = [d for d in range(1, min(n, near) + 1) if n % d == 0]
    return below[-1] if below else n


def _tie_embedding(model: nn.Module, entries: List[ModuleSpec]) -> None:
    """When the LM head is quantized and tied to the input embedding, the embedding shares its int storage."""
    lm = next((e for e in entries if e.kind == "lm_head"), None)
    emb = next((e for e in entries if e.kind == "embedding"), None)
    if lm is None or emb is None or not _tied_lm_head(model):
        return
    if lm.quantized:
        emb.precision = lm.precision
        emb.weights = dict(lm.weights)
        emb.activations = {"mode": "none"}
        emb.tied_to = lm.name
        emb.source = f"tied to {lm.name}"
        return
    if lm.precision != "skip" or emb.precision != "skip":
        raise PlanError(
            f"{lm.name!r} and {emb.name!r} share one weight (tie_word_embeddings): quantize the LM head "
            f"(int8/int4; the embedding then shares its integer storage) or leave both 'skip' "
            f"(got {lm.name}={lm.precision}, {emb.name}={emb.precision})."
        )

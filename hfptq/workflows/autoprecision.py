"""Automatic mixed precision: keep the fewest modules in higher precision that meet a quality budget.

Accuracy-aware tuners such as Intel Neural Compressor pay a full evaluation per trial. Here the
expensive part is done once and the search needs only ``O(log n)`` full evaluations:

1. **Calibrate once** with the base config (SmoothQuant and static scales; GPTQ is left to the
   final quantization, see below), keeping the smoothed float model and the calibration result.
2. **Rank by sensitivity**, cheaply: each candidate module is quantized *alone* (round-to-nearest,
   with the plan's scheme and the calibrated static scale) and the KL divergence of the model's
   next-token distribution from the float model's is measured on a few windows (the default
   ``sensitivity="kl"``). KL is the expected loss increase, without the sampling noise of a
   loss difference on a few hundred tokens (which is as large as the effect of one module).
   The layers before the module are not recomputed (their cached outputs are replayed) and the
   LM head runs only on the last ``sensitivity_tokens`` positions, so a module costs a fraction
   of one forward. ``"loss"`` ranks by the NLL change instead; ``"sqnr"`` by the output SQNR of
   every module quantized alone, from one forward pass.
3. **Binary search** the number ``k`` of most sensitive modules moved to the fallback precision
   (FP16 by default): each step converts a copy of the calibrated model (no re-calibration) and
   runs one full evaluation on the *search* windows; monotonicity in ``k`` makes this
   ``1 + ceil(log2 n)`` evaluations. The search aims at ``margin * budget`` to leave room for the
   difference between search and held-out windows.
4. **Verify on held-out windows**: the chosen config is quantized from scratch exactly as a user
   would (full pipeline, GPTQ included) and evaluated once on windows the search never saw. If it
   misses the budget, the search is repeated for half the target (at most ``max_rounds`` rounds);
   every round is reported.

The result carries the rules to keep (``result.rules``, ``result.recipe_snippet()``), the full
:class:`~hfptq.HfPtqConfig`, and a report with the evaluations used and the size/speed kept.

Example:
    >>> result = search("path/to/model", HfPtqConfig(scheme={"attention": "int8"}, smoothquant={"alpha": 0.5},
    ...                 calibration=dict(dataset="wikitext", config="wikitext-2-raw-v1")),
    ...                 budget={"max_ppl_increase_pct": 0.3}, calibration=calib_ids,
    ...                 eval_windows=val_ids, heldout_windows=test_ids)           # doctest: +SKIP
    >>> print(result.recipe_snippet())                                             # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..algorithms import validate_options
from ..api import _load_tokenizer, model_bytes, needs_calibration, quantize_model
from ..architectures import LayerStandIn, find_decoder_layers
from ..calibration import calibrate
from ..config import KINDS, HfPtqConfig
from ..convert import convert_model
from ..data import calibration_batches
from ..errors import ConfigError, DataError
from ..evaluation._utils import forward_logits, model_device
from ..evaluation.latency import measure_latency
from ..plan import resolve_plan
from ..quant.linear import QuantLinear

logger = logging.getLogger(__name__)

__all__ = ["AutoPrecisionResult", "mean_nll", "search"]

ModelSource = Union[str, "os.PathLike[str]", Callable[[], nn.Module], nn.Module]
MetricFn = Callable[[nn.Module, Any], float]


@dataclass
class AutoPrecisionResult:
    """Outcome of :func:`search`.

    Attributes:
        rules: the rules to keep (the fallback rule first, then the base config's rules that
            still apply); paste them into a config or a recipe.
        config: the complete :class:`~hfptq.HfPtqConfig` that was verified.
        report: budget, baselines, sensitivity ranking, every trial, held-out verification,
            evaluations used, size and speed kept (JSON-serialisable).
    """

    rules: List[Dict[str, Any]]
    config: HfPtqConfig
    report: Dict[str, Any] = field(default_factory=dict)

    @property
    def meets_budget(self) -> bool:
        """Whether the chosen config met the budget on the held-out windows."""
        return bool(self.report.get("heldout", {}).get("meets_budget"))

    @property
    def kept(self) -> List[str]:
        """Modules moved to the fallback precision."""
        return list(self.report.get("kept", []))

    def recipe_snippet(self) -> str:
        """YAML for the ``quantization:`` section of a recipe (rules + the base fields).

        Example:
            >>> print(result.recipe_snippet())                              # doctest: +SKIP
            quantization:
              rules:
              - name: auto_precision
                ...
        """
        import yaml

        fields = {k: v for k, v in self.config.to_dict().items()
                  if k not in ("quant_method", "plan", "format_version") and v is not None}
        fields["rules"] = self.rules
        return yaml.safe_dump({"quantization": fields}, sort_keys=False, default_flow_style=None, width=110)

    def summary(self) -> str:
        """A few lines for the console."""
        r = self.report
        held = r.get("heldout", {})
        lines = [
            f"hfptq auto precision: {len(self.kept)}/{r.get('num_candidates')} modules kept in "
            f"{r.get('fallback', {}).get('precision')}; budget {r.get('budget')}",
            f"  held-out: {held.get('increase_label')} -> {'meets' if held.get('meets_budget') else 'MISSES'} the budget",
            f"  evaluations: {r.get('evaluations', {}).get('full_evaluations')} full "
            f"({r.get('evaluations', {}).get('search')} search, {r.get('evaluations', {}).get('heldout')} held-out, "
            f"{r.get('evaluations', {}).get('baselines')} float baselines) + "
            f"{r.get('evaluations', {}).get('sensitivity_passes')} partial sensitivity passes",
        ]
        size = r.get("size", {})
        if size:
            lines.append(f"  size: {size.get('float_mib'):.1f} MiB float -> {size.get('base_mib'):.1f} MiB all-quantized, "
                         f"{size.get('final_mib'):.1f} MiB chosen")
        speed = r.get("speed", {})
        if speed:
            lines.append(f"  integer-matmul share of linear MACs: {speed.get('base_int8_mac_share'):.1%} base -> "
                         f"{speed.get('final_int8_mac_share'):.1%} chosen ({speed.get('int8_mac_share_kept'):.1%} kept)")
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        return {"rules": self.rules, "config": self.config.to_dict(), "report": self.report}


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def _logits(model: nn.Module, ids: torch.Tensor, keep: Optional[int]) -> torch.Tensor:
    return forward_logits(model, ids, logits_to_keep=keep)


@torch.no_grad()
def mean_nll(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4, last_tokens: Optional[int] = None,
             progress: bool = False) -> float:
    """Mean next-token negative log-likelihood (nats) over token windows ``[n, seq_len]``.

    Every position but the first is scored (the first token, e.g. BOS, has no context); with
    ``last_tokens`` only the last ``last_tokens`` positions are scored and the LM head runs only
    there (``logits_to_keep``), which is much cheaper for large vocabularies.

    Example:
        >>> nll = mean_nll(model, torch.randint(0, 100, (2, 64)))       # doctest: +SKIP
    """
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[1] < 2:
        raise DataError(f"windows must be a LongTensor [num_windows, seq_len >= 2] (got {getattr(windows, 'shape', windows)}).")
    device = model_device(model)
    seq_len = windows.shape[1]
    keep = None if last_tokens is None else min(int(last_tokens), seq_len - 1) + 1
    total, count = 0.0, 0
    starts = range(0, windows.shape[0], batch_size)
    for start in tqdm(starts, desc="hfptq: nll", disable=not progress, leave=False):
        ids = windows[start:start + batch_size].to(device=device, dtype=torch.long)
        logits = _logits(model, ids, keep).float()
        positions = logits.shape[1]
        if positions == seq_len:
            pred, target = logits[:, :-1], ids[:, 1:]
            if keep is not None:
                pred, target = pred[:, -(keep - 1):], target[:, -(keep - 1):]
        else:  # logits_to_keep honoured: logits of the last `positions` positions
            pred, target = logits[:, :-1], ids[:, seq_len - positions + 1:]
        nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum")
        total += float(nll)
        count += target.numel()
    return total / count


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _load(source: ModelSource) -> nn.Module:
    if isinstance(source, nn.Module):
        model = copy.deepcopy(source)
    elif callable(source):
        model = source()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model_path_or_factory() must return a torch model (got {type(model).__name__}).")
    elif isinstance(source, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    else:
        raise ConfigError("model_path_or_factory must be a path/Hub id, a callable returning a model, or a model "
                          f"(got {type(source).__name__}).")
    return model.eval()


def _config_fields(config: HfPtqConfig) -> Dict[str, Any]:
    return {k: copy.deepcopy(getattr(config, k)) if k != "calibration" else (dict(config.calibration)
            if config.calibration is not None else None)
            for k in config._field_names() if k not in ("plan", "format_version")}


def _derive(config: HfPtqConfig, **changes: Any) -> HfPtqConfig:
    fields = _config_fields(config)
    fields.update(changes)
    return HfPtqConfig(**fields)


def _matches(entry: Any, target: str) -> bool:
    if target.startswith("kind:"):  # the rule syntax, "kind:ffn"
        target = target[len("kind:"):]
        if target not in KINDS:
            raise ConfigError(f"options.candidates: unknown kind {target!r}; choose from {list(KINDS)}.")
    if target in KINDS:
        return entry.kind == target
    if target.startswith("re:"):
        import re

        return re.search(target[3:], entry.name) is not None
    return entry.name == target or entry.name.endswith("." + target)


def _int8_mac_share(plan: Any) -> float:
    total = fast = 0
    for e in plan:
        if e.kind == "embedding":
            continue
        macs = e.in_features * e.out_features
        total += macs
        if e.quantized and (e.activations or {}).get("mode", "none") != "none":
            fast += macs
    return fast / total if total else 0.0


class _PrefixCache:
    """Outputs of every decoder layer on the sensitivity windows, to skip the unchanged prefix."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int) -> None:
        found = find_decoder_layers(model)
        self.model = model
        self.windows = windows
        self.batch_size = batch_size
        self.name, self.layers = found if found is not None else ("", None)
        self.outputs: List[Dict[int, Any]] = []
        if self.layers is None:
            return
        for _, ids in self._batches():
            recorded: Dict[int, Any] = {}
            handles = [layer.register_forward_hook(self._record(i, recorded)) for i, layer in enumerate(self.layers)]
            try:
                with torch.no_grad():
                    _logits(model, ids.to(model_device(model)), 1)
            finally:
                for h in handles:
                    h.remove()
            self.outputs.append(recorded)

    @staticmethod
    def _record(index: int, recorded: Dict[int, Any]):
        def hook(module, args, output):
            recorded[index] = output
        return hook

    def layer_of(self, name: str) -> int:
        """Index of the decoder layer holding ``name`` (number of layers for modules after the stack)."""
        if self.layers is None:
            return 0
        prefix = f"{self.name}."
        if name.startswith(prefix):
            return int(name[len(prefix):].split(".")[0])
        return len(self.layers)

    @contextlib.contextmanager
    def skip_before(self, index: int, batch: int) -> Iterator[None]:
        if self.layers is None or index == 0:
            yield
            return
        originals = {i: self.layers[i] for i in range(index)}
        try:
            for i in range(index):
                self.layers[i] = LayerStandIn(originals[i], output=self.outputs[batch][i])
            yield
        finally:
            for i, module in originals.items():
                self.layers[i] = module

    @torch.no_grad()
    def _last_logits(self, ids: torch.Tensor, last_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Log-probs ``[B, t, V]`` of the last ``t`` predictions of each window and their targets ``[B, t]``."""
        t = min(int(last_tokens), ids.shape[1] - 1)
        logits = _logits(self.model, ids.to(model_device(self.model)), t + 1).float()
        pred = logits[:, -(t + 1):-1]
        return torch.log_softmax(pred, dim=-1), ids[:, -t:].to(pred.device)

    def _batches(self) -> Iterator[Tuple[int, torch.Tensor]]:
        for b, start in enumerate(range(0, self.windows.shape[0], self.batch_size)):
            yield b, self.windows[start:start + self.batch_size]

    @torch.no_grad()
    def reference(self, last_tokens: int) -> float:
        """Mean NLL of the unmodified model on the scored positions; keeps its log-probs for :meth:`score`."""
        self.ref_logp: List[torch.Tensor] = []
        total, count = 0.0, 0
        for _, ids in self._batches():
            logp, target = self._last_logits(ids, last_tokens)
            self.ref_logp.append(logp)
            total += float(-logp.gather(-1, target.unsqueeze(-1)).sum())
            count += target.numel()
        return total / count

    @torch.no_grad()
    def score(self, start_layer: int, last_tokens: int, kind: str) -> float:
        """``"loss"``: mean NLL; ``"kl"``: mean KL(reference || model) per scored position."""
        total, count = 0.0, 0
        for b, ids in self._batches():
            with self.skip_before(start_layer, b):
                logp, target = self._last_logits(ids, last_tokens)
            if kind == "kl":
                ref = self.ref_logp[b]
                total += float((ref.exp() * (ref - logp)).sum())
            else:
                total += float(-logp.gather(-1, target.unsqueeze(-1)).sum())
            count += target.numel()
        return total / count


def _quantized_module(module: nn.Module, entry: Any, calib: Any, fake: bool, compute_dtype: str) -> nn.Module:
    weights = getattr(calib, "weights", {}) or {}
    qparams = getattr(calib, "input_qparams", {}) or {}
    return QuantLinear.from_float(module, entry.weights, entry.activations, fake=fake, compute_dtype=compute_dtype,
                                  weight=weights.get(entry.name), input_qparams=qparams.get(entry.name))


@contextlib.contextmanager
def _smoothed_head(model: nn.Module, calib: Any) -> Iterator[None]:
    """Make the calibrated float model consistent for the sensitivity pass.

    SmoothQuant on a tied LM head folds ``1/s`` into the final norm in place but returns the head's
    ``W * s`` instead of writing it (the embedding shares ``W``). Until conversion, the float model
    reads ``W`` after a norm divided by ``s``; here such a head is swapped for an untied float copy
    holding ``W * s`` (the embedding keeps ``W``), and put back afterwards.
    """
    swapped = []
    for name, weight in (getattr(calib, "weights", None) or {}).items():
        module = model.get_submodule(name)
        current = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or current is None or current.shape != weight.shape \
                or torch.equal(current, weight):
            continue
        head = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                         device=current.device, dtype=current.dtype)
        head.weight = nn.Parameter(weight.to(current.dtype), requires_grad=False)
        if module.bias is not None:
            head.bias = module.bias
        _set_module(model, name, head)
        swapped.append((name, module))
    try:
        yield
    finally:
        for name, module in swapped:
            _set_module(model, name, module)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def _sensitivity_loss(model, plan, candidates, calib, windows, opts, config, progress) -> Tuple[float, Dict[str, float], int]:
    """Quantize each candidate alone and score the model: KL to the float model (``"kl"``) or NLL (``"loss"``)."""
    kind = opts["sensitivity"]
    cache = _PrefixCache(model, windows, opts["batch_size"])
    tokens = opts["sensitivity_tokens"]
    ref_nll = cache.reference(tokens)
    base = 0.0 if kind == "kl" else ref_nll
    scores: Dict[str, float] = {}
    passes = 1
    for name in tqdm(candidates, desc="hfptq: sensitivity", disable=not progress, leave=False):
        entry = plan[name]
        original = model.get_submodule(name)
        _set_module(model, name, _quantized_module(original, entry, calib, config.mode == "fake", config.compute_dtype))
        try:
            scores[name] = cache.score(cache.layer_of(name), tokens, kind)
        finally:
            _set_module(model, name, original)
        passes += 1
    return base, scores, passes


@torch.no_grad()
def _sensitivity_sqnr(model, plan, candidates, calib, windows, opts, config, progress) -> Tuple[float, Dict[str, float], int]:
    """Relative output error (noise / signal energy) of each module quantized alone, in one pass."""
    sums: Dict[str, List[float]] = {n: [0.0, 0.0] for n in candidates}
    quantized = {n: _quantized_module(model.get_submodule(n), plan[n], calib, True, "float32") for n in candidates}
    handles = []

    def hook_for(name: str):
        def hook(module, args, output):
            ref = output.float()
            err = quantized[name](args[0]).float() - ref
            sums[name][0] += float(ref.pow(2).sum())
            sums[name][1] += float(err.pow(2).sum())
        return hook

    for name in candidates:
        handles.append(model.get_submodule(name).register_forward_hook(hook_for(name)))
    try:
        mean_nll(model, windows, batch_size=opts["batch_size"], last_tokens=1, progress=progress)
    finally:
        for h in handles:
            h.remove()
    return 0.0, {n: (s[1] / s[0] if s[0] > 0 else 0.0) for n, s in sums.items()}, 1


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------


def _budget_fns(budget: Mapping[str, float]) -> Tuple[str, float, Callable[[float, float], float], Callable[[float], str]]:
    key, limit = next(iter(budget.items()))
    if key == "max_ppl_increase_pct":
        return key, float(limit), (lambda ref, q: (math.exp(q - ref) - 1.0) * 100.0), (lambda v: f"{v:+.3f}% ppl")
    if key == "max_nll_increase":
        return key, float(limit), (lambda ref, q: q - ref), (lambda v: f"{v:+.5f} nll")
    return key, float(limit), (lambda ref, q: ref - q), (lambda v: f"{v:+.4f} metric drop")


def _fallback_rules(names: Sequence[str], fallback: Mapping[str, Any], tied_lm: Optional[str],
                    tied_lm_w8a8: bool = True) -> List[Dict[str, Any]]:
    names = list(names)
    rules: List[Dict[str, Any]] = []
    float_fallback = fallback["precision"] not in ("int8", "int4")
    if tied_lm is not None and tied_lm in names and float_fallback:
        # A tied LM head cannot be FP16 while the embedding shares its weight. Its higher precision is
        # INT8 weight-only (no activation quantization; the embedding keeps sharing the INT8 storage),
        # or, when it already was weight-only, the original float weights of both.
        names.remove(tied_lm)
        if tied_lm_w8a8:
            rules.append({"targets": [tied_lm], "precision": "int8", "activations": "none",
                          "name": "auto_precision_lm_head"})
        else:
            rules.append({"targets": [tied_lm], "precision": "skip", "name": "auto_precision_lm_head"})
    if names:
        rule = {"targets": names, "precision": fallback["precision"], "name": "auto_precision"}
        for key in ("weights", "activations"):
            if fallback.get(key) is not None:
                rule[key] = copy.deepcopy(fallback[key])
        rules.insert(0, rule)
    return rules


def _compose_rules(base_config: HfPtqConfig, base_plan: Any, names: Sequence[str], fallback: Mapping[str, Any],
                   tied_lm: Optional[str]) -> Tuple[List[Dict[str, Any]], List[str]]:
    """Fallback rules first, then the base rules that still claim at least one module."""
    w8a8 = tied_lm is not None and (base_plan[tied_lm].activations or {}).get("mode", "none") != "none"
    new = _fallback_rules(names, fallback, tied_lm, w8a8)
    kept = set(names)
    rules, dropped = list(new), []
    for index, rule in enumerate(base_config.rules):
        label = rule.get("name") or f"rules[{index}]"
        hits = {e.name for e in base_plan if e.source == label}
        if hits and hits <= kept:
            dropped.append(label)
            continue
        rules.append(copy.deepcopy(rule))
    return rules, dropped


def search(
    model_path_or_factory: ModelSource,
    base_config: HfPtqConfig,
    budget: Optional[Mapping[str, float]] = None,
    *,
    calibration: Optional[torch.Tensor] = None,
    eval_windows: Any,
    heldout_windows: Any,
    tokenizer: Any = None,
    options: Optional[Mapping[str, Any]] = None,
    metric_fn: Optional[MetricFn] = None,
    baselines: Optional[Mapping[str, float]] = None,
    progress: bool = True,
) -> AutoPrecisionResult:
    """Choose which modules of ``base_config``'s plan move to a higher precision to meet ``budget``.

    Args:
        model_path_or_factory: a local path / Hub id (loaded in float32), a callable returning a
            fresh float model, or a float model (copied, never modified).
        base_config: the aggressive configuration to start from (e.g. all linears W8A8 with
            SmoothQuant); its calibration settings, algorithms and rules are kept.
        budget: ``{"max_ppl_increase_pct": 0.3}`` (perplexity increase in %, the default),
            ``{"max_nll_increase": x}`` (nats), or ``{"max_metric_drop": x}`` with ``metric_fn``
            (e.g. an accuracy drop in points).
        calibration: calibration token ids ``[num_samples, seq_len]``; default: built from
            ``base_config.calibration`` with ``tokenizer`` (needed when the base config calibrates).
        eval_windows: token windows ``[n, seq_len]`` for the search (or ``metric_fn``'s data); the
            first ``sensitivity_windows`` of them also rank the modules.
        heldout_windows: windows never used by the search, for the final verification.
        tokenizer: tokenizer (or path) to build the calibration data from ``base_config.calibration``.
        options: ``auto_precision`` options (see :data:`hfptq.algorithms.OPTION_DEFAULTS`):
            ``fallback`` ("fp16"), ``sensitivity`` ("kl" | "loss" | "sqnr"), ``sensitivity_windows``,
            ``sensitivity_tokens``, ``margin``, ``max_rounds``, ``candidates``, ``batch_size``,
            ``measure_speed``.
        metric_fn: ``metric_fn(model, data) -> float`` (higher is better) for ``max_metric_drop``.
        baselines: the float model's values ``{"eval": ..., "heldout": ...}`` when already measured
            (mean NLL in nats, or ``metric_fn`` values); saves two full evaluations.
        progress: progress bars.

    Returns:
        An :class:`AutoPrecisionResult` (``.rules``, ``.config``, ``.report``).

    Raises:
        ConfigError: invalid budget/options, or a budget that needs ``metric_fn``.

    Example:
        >>> res = search(factory, HfPtqConfig(scheme={"attention": "int8"}), {"max_ppl_increase_pct": 0.5},
        ...              eval_windows=val, heldout_windows=test)                   # doctest: +SKIP
        >>> res.rules[0]["targets"][:2], res.report["evaluations"]["full_evaluations"]  # doctest: +SKIP
    """

    started = time.perf_counter()
    raw = dict(options or {})
    if budget is not None:
        raw["budget"] = dict(budget)
    opts = validate_options("auto_precision", raw)
    key, limit, increase_of, label_of = _budget_fns(opts["budget"])
    if key == "max_metric_drop" and metric_fn is None:
        raise ConfigError("budget max_metric_drop needs metric_fn(model, data) -> float (higher is better).")
    if metric_fn is None and (not isinstance(eval_windows, torch.Tensor) or not isinstance(heldout_windows, torch.Tensor)):
        raise DataError("eval_windows and heldout_windows must be token id tensors [n, seq_len] (or pass metric_fn).")
    if isinstance(eval_windows, torch.Tensor) and isinstance(heldout_windows, torch.Tensor) \
            and eval_windows.shape[1:] == heldout_windows.shape[1:]:
        overlap = (eval_windows.unsqueeze(1) == heldout_windows.unsqueeze(0)).all(-1).any()
        if bool(overlap):
            raise DataError("heldout_windows share windows with eval_windows; the held-out check must use unseen data.")

    def evaluate(model: nn.Module, data: Any) -> float:
        if metric_fn is not None:
            return float(metric_fn(model, data))
        return mean_nll(model, data, batch_size=opts["batch_size"], progress=progress)

    # 0. models and baselines ------------------------------------------------------------
    float_model = _load(model_path_or_factory)
    float_bytes = model_bytes(float_model)
    base_plan = resolve_plan(float_model, base_config)
    evals = {"baselines": 0, "search": 0, "heldout": 0, "sensitivity_passes": 0, "calibrations": 0}
    if baselines is not None and {"eval", "heldout"} <= set(baselines):
        ref_eval, ref_heldout = float(baselines["eval"]), float(baselines["heldout"])
    else:
        ref_eval = evaluate(float_model, eval_windows)
        ref_heldout = evaluate(float_model, heldout_windows)
        evals["baselines"] += 2

    # 1. calibrate once (no GPTQ: the search converts the same smoothed float weights at every k)
    search_config = _derive(base_config, gptq=None)
    calib_ids = calibration
    needs = needs_calibration(search_config, base_plan) or needs_calibration(base_config, base_plan)
    if needs and calib_ids is None:
        if base_config.calibration is None:
            raise ConfigError("The base config calibrates (static/SmoothQuant/GPTQ): pass calibration= token ids or set "
                              "base_config.calibration.")

        tok = tokenizer
        if tok is None and isinstance(model_path_or_factory, (str, os.PathLike)):
            tok = str(model_path_or_factory)
        if isinstance(tok, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(tok))
        calib_ids = calibration_batches(base_config.calibration, _load_tokenizer(float_model, base_config, tok),
                                        progress=progress)
    rotated = [e.name for e in base_plan if e.quantized and (e.activations or {}).get("rotation")]
    if rotated:
        raise ConfigError(
            f"auto precision does not support activations.rotation yet (set on {rotated[:3]}"
            f"{' ...' if len(rotated) > 3 else ''}): search without rotation, then add it to the resulting rules."
        )
    work = copy.deepcopy(float_model)
    calib = None
    if needs_calibration(search_config, base_plan):
        calib = calibrate(work, base_plan, search_config, calib_ids, progress=progress)
        evals["calibrations"] += 1

    # 2. sensitivity ------------------------------------------------------------------------
    candidates = [e.name for e in base_plan if e.quantized and e.kind != "embedding"]
    if opts["candidates"] is not None:
        candidates = [n for n in candidates if any(_matches(base_plan[n], t) for t in opts["candidates"])]
    if not candidates:
        raise ConfigError("auto precision has no candidate: the base plan quantizes no module "
                          f"(or options.candidates={opts['candidates']} matches none).")
    sens_windows = eval_windows[: opts["sensitivity_windows"]] if isinstance(eval_windows, torch.Tensor) else None
    if sens_windows is None:
        raise DataError("sensitivity needs token windows: pass eval_windows as a token id tensor.")
    sens_fn = _sensitivity_sqnr if opts["sensitivity"] == "sqnr" else _sensitivity_loss
    t0 = time.perf_counter()
    with _smoothed_head(work, calib):
        base_loss, losses, passes = sens_fn(work, base_plan, candidates, calib, sens_windows, opts, search_config,
                                            progress)
    evals["sensitivity_passes"] += passes
    ranking = sorted(candidates, key=lambda n: (-(losses[n] - base_loss), n))
    sensitivity = [{"module": n, "kind": base_plan[n].kind, "score": losses[n] - base_loss} for n in ranking]
    sensitivity_seconds = time.perf_counter() - t0
    logger.info("auto precision: ranked %d modules in %.0f s; most sensitive: %s", len(ranking), sensitivity_seconds,
                ", ".join(ranking[:5]))

    lm = next((e for e in base_plan if e.kind == "lm_head"), None)
    emb = next((e for e in base_plan if e.kind == "embedding"), None)
    tied_lm = lm.name if (lm is not None and emb is not None and emb.tied_to == lm.name) else None

    # 3. binary search on k with one evaluation per step -------------------------------------
    trials: Dict[int, Dict[str, Any]] = {}
    sizes: Dict[int, int] = {}

    def config_for(k: int, base: HfPtqConfig) -> Tuple[HfPtqConfig, List[Dict[str, Any]], List[str]]:
        rules, dropped = _compose_rules(base_config, base_plan, ranking[:k], opts["fallback"], tied_lm)
        return _derive(base, rules=rules), rules, dropped

    def trial(k: int) -> float:
        if k in trials:
            return trials[k]["increase"]
        cfg, _, _ = config_for(k, search_config)
        # resolved on the float model, as quantize_model does before calibrating: after SmoothQuant folded a
        # tied LM head, `work`'s embedding no longer reads as tied, and a plan made from it would quantize the
        # smoothed rows as the embedding (garbage lookups)
        plan_k = resolve_plan(float_model, cfg)
        for entry in plan_k:  # what calibration recorded on the base plan (a tied embedding's 1/s after head SQ)
            base_entry = base_plan.get(entry.name)
            for key, value in (base_entry.extra if base_entry is not None else {}).items():
                entry.extra.setdefault(key, value)
        model_k = copy.deepcopy(work)
        weights = {n: w for n, w in (getattr(calib, "weights", {}) or {}).items()
                   if plan_k.get(n) is not None and plan_k[n].precision != "skip"}
        convert_model(model_k, plan_k, fake=cfg.mode == "fake", compute_dtype=cfg.compute_dtype,
                      input_qparams=getattr(calib, "input_qparams", None), weights=weights, progress=False)
        value = evaluate(model_k, eval_windows)
        evals["search"] += 1
        sizes[k] = model_bytes(model_k)
        inc = increase_of(ref_eval, value)
        trials[k] = {"k": k, "value": value, "increase": inc, "label": label_of(inc)}
        logger.info("auto precision: k=%d modules kept -> %s on the search windows", k, label_of(inc))
        del model_k
        return inc

    def minimal_k(target: float) -> int:
        n = len(ranking)
        if trial(0) <= target:
            return 0
        lo, hi = 0, n
        bar = tqdm(total=max(1, math.ceil(math.log2(max(n, 2)))), desc="hfptq: precision search",
                   disable=not progress, leave=False)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if trial(mid) <= target:
                hi = mid
            else:
                lo = mid
            bar.update(1)
        bar.close()
        if hi == n and n not in trials:
            trial(n)  # report what "everything in fallback" actually gives
        return hi

    # 4. verify on held-out windows (quantized from scratch, full pipeline) -------------------
    rounds: List[Dict[str, Any]] = []
    final = None
    target = limit * opts["margin"]
    for round_index in range(opts["max_rounds"]):
        k = minimal_k(target)
        cfg, rules, dropped = config_for(k, base_config)
        model_final = _load(model_path_or_factory)
        quantize_model(model_final, cfg, calibration_data=calib_ids if needs else None, progress=False)
        evals["calibrations"] += int(needs)
        value = evaluate(model_final, heldout_windows)
        evals["heldout"] += 1
        inc = increase_of(ref_heldout, value)
        logger.info("auto precision: round %d: k=%d verified on held-out windows: %s (budget %s)", round_index, k,
                    label_of(inc), label_of(limit))
        final = {"k": k, "config": cfg, "rules": rules, "dropped_rules": dropped, "value": value, "increase": inc,
                 "bytes": model_bytes(model_final), "plan": model_final.hfptq_plan,
                 "algorithms": (getattr(model_final, "hfptq_calibration", None) or {}).get("algorithms")}
        if opts["measure_speed"]:
            final["latency"] = _prefill_seconds(model_final)
        rounds.append({"round": round_index, "search_target": target, "k": k, "heldout_increase": inc,
                       "meets_budget": inc <= limit})
        del model_final
        if inc <= limit or k >= len(ranking):
            break
        target /= 2.0

    # 5. report ------------------------------------------------------------------------------
    assert final is not None
    kept = ranking[:final["k"]]
    base_share = _int8_mac_share(base_plan)
    final_share = _int8_mac_share(final["plan"])
    report: Dict[str, Any] = {
        "budget": dict(opts["budget"]),
        "margin": opts["margin"],
        "fallback": dict(opts["fallback"]),
        "sensitivity_method": opts["sensitivity"],
        "num_candidates": len(ranking),
        "kept": kept,
        "kept_kinds": {kind: sum(1 for n in kept if base_plan[n].kind == kind) for kind in KINDS
                       if any(base_plan[n].kind == kind for n in kept)},
        "dropped_base_rules": final["dropped_rules"],
        "baseline": {"eval": ref_eval, "heldout": ref_heldout,
                     "metric": "mean NLL (nats)" if metric_fn is None else "metric_fn"},
        "sensitivity": sensitivity,
        "sensitivity_seconds": sensitivity_seconds,
        "trials": [trials[k] for k in sorted(trials)],
        "rounds": rounds,
        "heldout": {"value": final["value"], "increase": final["increase"], "increase_label": label_of(final["increase"]),
                    "meets_budget": final["increase"] <= limit, "num_windows": _num(heldout_windows)},
        "search_windows": _num(eval_windows),
        "evaluations": {**evals, "full_evaluations": evals["search"] + evals["heldout"] + evals["baselines"],
                        "note": "full = one pass over the search or held-out windows; sensitivity passes replay the "
                                "layers before each module and score only the last positions"},
        "size": {"float_mib": float_bytes / 2**20, "base_mib": sizes.get(0, 0) / 2**20,
                 "final_mib": final["bytes"] / 2**20,
                 "final_vs_float": final["bytes"] / float_bytes if float_bytes else None},
        "speed": {"base_int8_mac_share": base_share, "final_int8_mac_share": final_share,
                  "int8_mac_share_kept": final_share / base_share if base_share else None},
        "algorithms": final["algorithms"],
        "seconds": time.perf_counter() - started,
    }
    if opts["measure_speed"]:
        base_model = _load(model_path_or_factory)
        quantize_model(base_model, base_config, calibration_data=calib_ids if needs else None, progress=False)
        report["speed"]["base_prefill_s"] = _prefill_seconds(base_model)
        report["speed"]["final_prefill_s"] = final.get("latency")
        report["speed"]["float_prefill_s"] = _prefill_seconds(float_model)
    return AutoPrecisionResult(rules=final["rules"], config=final["config"], report=report)


def _num(data: Any) -> Optional[int]:
    return int(data.shape[0]) if isinstance(data, torch.Tensor) else None


def _prefill_seconds(model: nn.Module) -> Optional[float]:
    try:
        return float(measure_latency(model, prompt_len=128, new_tokens=0, repeats=3, warmup=1)["prefill_wall_s"])
    except Exception as exc:  # timing is optional; never fail the search on it
        logger.warning("auto precision: latency measurement failed (%s)", exc)
        return None

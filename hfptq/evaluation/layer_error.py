"""Where quantization error comes from: per-module output error and loss-based sensitivity.

:func:`layer_errors` compares the outputs of the same named modules in a reference and a
quantized model on the same inputs:

* ``SQNR = 10 * log10(sum(ref**2) / sum((ref - q)**2))`` in dB (``inf`` when equal; every 6 dB is
  roughly one bit of precision);
* ``rel_error = ||ref - q|| / ||ref||`` (Frobenius norms).

Sums are accumulated in float64 over batches, so only one batch of outputs is held at a time.
Errors compound through the network: a late module's error includes the error of the earlier
quantized modules feeding it. For the isolated effect of quantizing one module, use
:func:`sensitivity_scan` with a toggle that quantizes (or keeps in float) one module at a time.
"""
from __future__ import annotations

import logging
import math
from contextlib import AbstractContextManager
from typing import Any, Callable, Iterable, Optional

import torch

from hfptq.errors import ConfigError, DataError, suggest
from hfptq.evaluation._utils import model_device, progress_bar

logger = logging.getLogger(__name__)


def _sqnr_from_sums(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def sqnr(reference: torch.Tensor, quantized: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``quantized`` against ``reference``, in dB.

    ``inf`` when the tensors are equal; ``-inf`` when the reference is all zeros but not the
    other one.

    Example:
        >>> sqnr(torch.ones(10), torch.ones(10) + 0.1)  # 10*log10(1 / 0.01)
        20.0
    """
    if reference.shape != quantized.shape:
        raise DataError(f"sqnr needs tensors of the same shape (got {tuple(reference.shape)} and {tuple(quantized.shape)})")
    ref = reference.detach().double()
    q = quantized.detach().to(ref.device).double()
    return _sqnr_from_sums(float(ref.pow(2).sum()), float((ref - q).pow(2).sum()))


def _first_tensor(output: Any) -> Optional[torch.Tensor]:
    """The main tensor of a module output (tensor, tuple/list whose first item, or ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            found = _first_tensor(item)
            if found is not None:
                return found
        return None
    if isinstance(output, dict):  # ModelOutput is a dict subclass
        for item in output.values():
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _resolve(model: torch.nn.Module, names: list[str], which: str) -> dict[str, torch.nn.Module]:
    modules = dict(model.named_modules())
    resolved = {}
    for name in names:
        if name not in modules:
            raise ConfigError(
                f"module {name!r} does not exist in the {which} model; module_names must be names "
                f"from model.named_modules().{suggest(name, modules)}"
            )
        resolved[name] = modules[name]
    return resolved


def layer_errors(
    reference_model: torch.nn.Module,
    quantized_model: torch.nn.Module,
    input_ids: torch.LongTensor,
    module_names: list[str],
    *,
    batch_size: int = 1,
    progress: bool = True,
) -> list[dict]:
    """Per-module output error of ``quantized_model`` against ``reference_model``.

    Both models run on the same ``input_ids`` (``[num_sequences, seq_len]``, or 1-D for one
    sequence); forward hooks on ``module_names`` (names that exist in both models) capture the
    outputs (the first tensor of tuple outputs). A module called several times per forward is
    compared call by call.

    Returns:
        Rows sorted by module name: ``{"module", "sqnr_db", "rel_error", "numel"}`` where
        ``numel`` is the number of output elements compared.

    Example:
        >>> names = [n for n, m in qmodel.named_modules() if n.endswith("mlp.down_proj")]
        >>> for row in layer_errors(model, qmodel, ids[:4, :256], names, batch_size=2):
        ...     print(row["module"], round(row["sqnr_db"], 1))
    """
    if not module_names:
        raise ConfigError("module_names is empty: name at least one module to compare")
    if len(set(module_names)) != len(module_names):
        raise ConfigError("module_names contains duplicates")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 (got {batch_size})")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[0] == 0:
        raise DataError(f"input_ids must be [num_sequences, seq_len] token ids (got shape {tuple(input_ids.shape)})")
    ref_modules = _resolve(reference_model, module_names, "reference")
    q_modules = _resolve(quantized_model, module_names, "quantized")

    stats = {name: {"signal": 0.0, "noise": 0.0, "numel": 0} for name in module_names}
    captured: dict[str, list[torch.Tensor]] = {}
    cursor: dict[str, int] = {}

    def capture(name: str):
        def hook(_module, _inputs, output):
            tensor = _first_tensor(output)
            if tensor is not None:
                captured.setdefault(name, []).append(tensor.detach())

        return hook

    def compare(name: str):
        def hook(_module, _inputs, output):
            q = _first_tensor(output)
            if q is None:
                return
            calls = captured.get(name, [])
            index = cursor.get(name, 0)
            cursor[name] = index + 1
            if index >= len(calls):
                raise DataError(
                    f"module {name!r} ran more often in the quantized model than in the reference; "
                    "the two models must have the same architecture"
                )
            ref = calls[index].to(q.device).double()
            if ref.shape != q.shape:
                raise DataError(
                    f"module {name!r} output shape differs: reference {tuple(ref.shape)} vs quantized {tuple(q.shape)}"
                )
            entry = stats[name]
            entry["signal"] += float(ref.pow(2).sum())
            entry["noise"] += float((ref - q.double()).pow(2).sum())
            entry["numel"] += ref.numel()
            calls[index] = None  # free as we go

        return hook

    handles = [m.register_forward_hook(capture(n)) for n, m in ref_modules.items()]
    handles += [m.register_forward_hook(compare(n)) for n, m in q_modules.items()]
    ref_device, q_device = model_device(reference_model), model_device(quantized_model)
    batches = [input_ids[i : i + batch_size] for i in range(0, input_ids.shape[0], batch_size)]
    modes = (reference_model.training, quantized_model.training)
    reference_model.eval()
    quantized_model.eval()
    try:
        with torch.inference_mode():
            for batch in progress_bar(batches, enabled=progress, desc="layer errors", unit="batch"):
                captured.clear()
                cursor.clear()
                reference_model(input_ids=batch.to(ref_device))
                quantized_model(input_ids=batch.to(q_device))
    finally:
        for handle in handles:
            handle.remove()
        captured.clear()
        reference_model.train(modes[0])
        quantized_model.train(modes[1])

    rows = []
    for name in sorted(module_names):
        entry = stats[name]
        if entry["numel"] == 0:
            logger.warning("module %r produced no tensor output; it is left out of the layer errors", name)
            continue
        rel = math.sqrt(entry["noise"] / entry["signal"]) if entry["signal"] > 0 else (0.0 if entry["noise"] == 0 else math.inf)
        rows.append(
            {
                "module": name,
                "sqnr_db": _sqnr_from_sums(entry["signal"], entry["noise"]),
                "rel_error": rel,
                "numel": entry["numel"],
            }
        )
    return rows


def sensitivity_from_losses(base_loss: float, per_module_loss: dict[str, float], top_k: int = 10) -> list[dict]:
    """Rank modules by how much quantizing them (alone) increases the loss.

    Args:
        base_loss: loss of the reference configuration (e.g. the float model's mean NLL).
        per_module_loss: loss with only that module changed (e.g. quantized alone), per module.
        top_k: number of rows to return (``None`` or ``<= 0`` for all).

    Returns:
        Rows sorted by loss increase, largest first (ties by name): ``{"rank", "module", "loss",
        "loss_increase", "rel_increase"}``. With mean-NLL losses, ``exp(loss_increase)`` is the
        perplexity ratio. This is the shape :class:`hfptq.evaluation.report.QualityReport` expects
        for its ``sensitivity`` section.

    Example:
        >>> sensitivity_from_losses(2.0, {"a": 2.5, "b": 2.1}, top_k=1)
        [{'rank': 1, 'module': 'a', 'loss': 2.5, 'loss_increase': 0.5, 'rel_increase': 0.25}]
    """
    if not math.isfinite(base_loss):
        raise DataError(f"base_loss must be finite (got {base_loss})")
    ordered = sorted(per_module_loss.items(), key=lambda kv: (-(kv[1] - base_loss), kv[0]))
    if top_k is not None and top_k > 0:
        ordered = ordered[:top_k]
    return [
        {
            "rank": rank,
            "module": name,
            "loss": float(loss),
            "loss_increase": float(loss - base_loss),
            "rel_increase": float((loss - base_loss) / abs(base_loss)) if base_loss != 0 else math.inf,
        }
        for rank, (name, loss) in enumerate(ordered, start=1)
    ]


def sensitivity_scan(
    evaluate_loss: Callable[[], float],
    module_names: Iterable[str],
    toggle: Callable[[str], AbstractContextManager],
    *,
    top_k: int = 10,
    progress: bool = True,
) -> list[dict]:
    """Measure each module's sensitivity by toggling it alone and re-evaluating the loss.

    This is the extension point for module-by-module sensitivity: the caller provides
    ``toggle(name)``, a context manager that changes only that module for the duration of the
    ``with`` block (typically: quantize just this module of a float model, or keep just this
    module in float in a quantized model), and ``evaluate_loss()``, which returns a scalar
    loss (e.g. ``perplexity(model, ids, max_windows=8, progress=False).nll``).

    Returns:
        :func:`sensitivity_from_losses` rows, with the base loss measured outside any toggle.

    Example:
        >>> @contextlib.contextmanager
        ... def quantize_only(name):
        ...     swap_in_quantized(model, name); yield; swap_back(model, name)
        >>> rows = sensitivity_scan(lambda: perplexity(model, ids, progress=False).nll, names, quantize_only)
    """
    names = list(module_names)
    if not names:
        raise ConfigError("module_names is empty: name at least one module to scan")
    base = float(evaluate_loss())
    losses = {}
    for name in progress_bar(names, enabled=progress, desc="sensitivity", unit="module"):
        with toggle(name):
            losses[name] = float(evaluate_loss())
    return sensitivity_from_losses(base, losses, top_k=top_k)

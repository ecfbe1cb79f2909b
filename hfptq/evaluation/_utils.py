"""Small helpers shared by the evaluation modules (model device, forward, progress bars).

Everything here works on any ``torch.nn.Module`` whose forward returns logits the way
Transformers models do (an output object with ``.logits``, a tuple whose first item is the
logits, or a bare tensor), so the same code evaluates float and quantized models.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

import torch

from hfptq.utils import accepted_kwargs

logger = logging.getLogger(__name__)


def model_device(model: torch.nn.Module) -> torch.device:
    """Device the model's inputs should live on.

    Uses ``model.device`` when the model defines it (Transformers models do, also when
    dispatched with a device map), else the device of the first parameter or buffer, else CPU.
    """
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def forward_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    logits_to_keep: Optional[int] = None,
) -> torch.Tensor:
    """Run ``model`` on ``input_ids`` and return the logits ``[batch, positions, vocab]``.

    ``attention_mask`` and ``logits_to_keep`` are passed only when the forward accepts them by
    name; ``use_cache=False`` is passed when accepted so no KV cache is allocated. When
    ``logits_to_keep`` is honoured the result covers only the last ``logits_to_keep`` positions;
    callers must check ``logits.shape[1]``.
    """
    names, var_kw = accepted_kwargs(model)
    kwargs: dict[str, Any] = {}
    if attention_mask is not None and ("attention_mask" in names or var_kw):
        kwargs["attention_mask"] = attention_mask
    # logits_to_keep must be an explicit parameter: a **kwargs catch-all may silently ignore it.
    if logits_to_keep is not None and "logits_to_keep" in names:
        kwargs["logits_to_keep"] = int(logits_to_keep)
    if "use_cache" in names:
        kwargs["use_cache"] = False
    out = model(input_ids=input_ids, **kwargs)
    return extract_logits(out)


def extract_logits(out: Any) -> torch.Tensor:
    """Pull the logits out of whatever a forward returned (``.logits``, tuple, or tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    raise TypeError(
        f"cannot find logits in the model output of type {type(out).__name__}; the model's forward "
        "must return an object with a `.logits` tensor (like Transformers models), a tuple whose "
        "first item is the logits, or the logits tensor itself"
    )


def progress_bar(iterable: Iterable, *, enabled: bool, desc: str, total: Optional[int] = None, unit: str = "it"):
    """``tqdm`` over ``iterable`` when ``enabled`` (and tqdm is importable); the iterable otherwise."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a hard dependency, but degrade gracefully
        return iterable
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False)


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` should have a BOS token prepended to model inputs.

    Delegates to :func:`hfptq.data.wants_bos` (the project's single rule) when that module is
    available; otherwise falls back to "the tokenizer adds BOS itself when encoding with special
    tokens", which is what the model saw in pre-training (true for Gemma/Llama, false for GPT-2).
    """
    try:
        from hfptq.data import wants_bos  # owned by the data module; imported lazily
    except ImportError:
        wants_bos = None
    if wants_bos is not None:
        return bool(wants_bos(tokenizer))
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:  # noqa: BLE001 - exotic tokenizers: do not add what we cannot verify
        return False
    return bool(ids) and ids[0] == bos

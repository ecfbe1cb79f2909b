"""Evaluate a saved quantized checkpoint against its float model (what ``hfptq eval`` runs).

Example:
    >>> report, folder = evaluate_checkpoint("outputs/gemma3-270m-default/model")   # doctest: +SKIP
    >>> print(report.console_summary())                                             # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Tuple, Union

from ..errors import CheckpointError
from ..offline.datasets import DATA_DIR_ENV
from ..offline.models import resolve_model
from ..pipeline import _DTYPES, _auto_class, apply_quick, evaluate_pair
from ..recipes import find_recipe, load_recipe

__all__ = ["evaluate_checkpoint"]


def _check_checkpoint(checkpoint: Path) -> None:
    if not (checkpoint / "config.json").exists():
        raise CheckpointError(f"{checkpoint} has no config.json: pass the folder written by save_pretrained / hfptq run.")
    try:
        qcfg = json.loads((checkpoint / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    except (ValueError, AttributeError) as exc:
        raise CheckpointError(f"{checkpoint / 'config.json'} is not a valid model config ({exc}).") from exc
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != "hfptq":
        raise CheckpointError(
            f"{checkpoint} is not an hfptq-quantized checkpoint (its config.json has no hfptq quantization_config): "
            "evaluating it would compare a float model with a float model. Pass the folder written by hfptq run / "
            "save_pretrained of a quantized model, or quantize it first with hfptq run."
        )


def evaluate_checkpoint(
    checkpoint: Union[str, Path],
    *,
    recipe: Optional[str] = None,
    reference: Optional[str] = None,
    data_dir: Optional[str] = None,
    output: Optional[Union[str, Path]] = None,
    quick: bool = False,
    progress: bool = True,
) -> Tuple[Any, Path]:
    """Evaluate ``checkpoint`` (an hfptq-quantized folder) against its float model; save the report.

    Args:
        checkpoint: folder written by ``save_pretrained`` / ``hfptq run``.
        recipe: recipe file or built-in name whose ``evaluation`` section runs (default: the
            ``hfptq_recipe.yaml`` saved with the checkpoint, else the built-in ``default``).
        reference: the float model (default: the recipe's ``model.name_or_path``).
        data_dir: offline dataset copies (sets ``HFPTQ_DATA_DIR``).
        output: report folder (default: ``<checkpoint>/../eval-report``).
        quick: tiny evaluation slices (a smoke run of the same path).
        progress: show progress bars.

    Returns:
        ``(report, report folder)``.

    Raises:
        CheckpointError: the folder is not an hfptq-quantized checkpoint.

    Example:
        >>> report, folder = evaluate_checkpoint("outputs/model", recipe="default", quick=True)  # doctest: +SKIP
    """
    from transformers import AutoTokenizer

    checkpoint = Path(checkpoint)
    _check_checkpoint(checkpoint)
    if data_dir:
        os.environ[DATA_DIR_ENV] = data_dir
    saved = checkpoint / "hfptq_recipe.yaml"
    loaded = load_recipe(find_recipe(recipe) if recipe else (saved if saved.exists() else find_recipe("default")))
    if quick:
        loaded = apply_quick(loaded)
    auto = _auto_class(loaded.task)
    dtype = _DTYPES[loaded.model.get("dtype", "float32")]
    reference_path = resolve_model(reference or loaded.model.get("name_or_path"))
    tokenizer = AutoTokenizer.from_pretrained(
        checkpoint if (checkpoint / "tokenizer_config.json").exists() else reference_path)
    float_model = auto.from_pretrained(reference_path, dtype=dtype).eval()
    quantized = auto.from_pretrained(checkpoint, dtype=dtype).eval()
    report = evaluate_pair(loaded, tokenizer, float_model, quantized, progress=progress)
    out = Path(output) if output else checkpoint.parent / "eval-report"
    report.save(out)
    return report, out

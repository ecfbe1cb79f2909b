"""Exports of hfptq-quantized models to formats other tools load without hfptq.

* :func:`export_compressed_tensors`: the compressed-tensors layout (stock Transformers with the
  ``compressed-tensors`` package, vLLM, SGLang).

Example:
    >>> model.save_pretrained("out/gemma-w8a8", format="compressed-tensors")   # doctest: +SKIP
    >>> hfptq.export_compressed_tensors(model, "out/gemma-w8a8")               # the same
"""
import os
from typing import Any, Dict, Union

from torch import nn

from .compressed_tensors import (
    CT_FORMAT,
    ExportError,
    ExportResult,
    check_compressed_tensors_exportable,
    export_compressed_tensors,
)

#: ``save_pretrained(format=...)`` / recipe ``output.format`` values (defined with the option schema, below this package).
from ..options import CHECKPOINT_FORMATS as FORMATS  # noqa: E402


def export_model(model: nn.Module, save_directory: Union[str, os.PathLike], format: str, *,
                 push_to_hub: bool = False, allow_deviation: bool = False, max_shard_size: Union[int, str] = "5GB",
                 safe_serialization: Any = True, **unsupported: Any) -> ExportResult:
    """Write ``model`` in an export ``format`` (``"compressed-tensors"``); what ``save_pretrained(format=...)`` calls.

    Raises:
        ExportError: unknown format, an option the export does not take, or a plan the format cannot express.

    Example:
        >>> hfptq.export.export_model(model, "out/ct", "compressed-tensors")   # doctest: +SKIP
    """
    if format != CT_FORMAT:
        raise ExportError(f"format={format!r} is not a checkpoint format hfptq writes; choose one of {list(FORMATS)}.",
                          key="output.format")
    if push_to_hub or unsupported:
        options = (["push_to_hub"] if push_to_hub else []) + sorted(unsupported)
        raise ExportError(
            f"save_pretrained(format={format!r}) does not take {options}: export to a folder, then upload it with "
            "huggingface_hub.upload_folder(repo_id=..., folder_path=...).", key="output.format")
    return export_compressed_tensors(model, save_directory, allow_deviation=allow_deviation,
                                     max_shard_size=max_shard_size)


def export_options(output: Dict[str, Any]) -> Dict[str, Any]:
    """``save_pretrained`` keyword arguments for a recipe's ``output`` section (empty for hfptq's own format).

    Example:
        >>> export_options({"format": "compressed-tensors"})
        {'format': 'compressed-tensors', 'allow_deviation': False}
        >>> export_options({})
        {}
    """
    fmt = output.get("format") or "hfptq"
    if fmt == "hfptq":
        return {}
    return {"format": fmt, "allow_deviation": bool(output.get("allow_deviation", False))}


def export_checkpoint(checkpoint: Union[str, os.PathLike], output: Union[str, os.PathLike], *,
                      format: str = CT_FORMAT, allow_deviation: bool = False) -> ExportResult:
    """Reload a saved hfptq checkpoint and export it (``hfptq export``); tokenizer files are copied along.

    Example:
        >>> hfptq.export.export_checkpoint("outputs/gemma3-270m-default/model", "gemma-ct")   # doctest: +SKIP
    """
    import json
    import shutil
    from pathlib import Path

    from transformers import AutoModelForCausalLM


    folder = Path(checkpoint)
    try:
        qcfg = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("quantization_config") or {}
    except (OSError, ValueError) as exc:
        raise ExportError(f"{folder} has no readable config.json ({exc}); pass a folder written by save_pretrained.",
                          key="checkpoint") from exc
    if qcfg.get("quant_method") != "hfptq":
        raise ExportError(f"{folder} is not an hfptq checkpoint (quant_method {qcfg.get('quant_method')!r}); "
                          "quantize the model with hfptq first.", key="checkpoint")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    result = export_model(model, output, format, allow_deviation=allow_deviation)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "vocab.json", "merges.txt", "chat_template.jinja"):
        if (folder / name).is_file():
            shutil.copy2(folder / name, Path(output) / name)
    return result


__all__ = [
    "FORMATS",
    "export_options",
    "export_checkpoint",
    "export_model",
    "CT_FORMAT",
    "ExportError",
    "ExportResult",
    "check_compressed_tensors_exportable",
    "export_compressed_tensors",
]

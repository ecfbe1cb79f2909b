"""Exports of hfptq-quantized models to formats other tools load without hfptq.

* :func:`export_compressed_tensors`: the compressed-tensors layout (stock Transformers with the
  ``compressed-tensors`` package, vLLM, SGLang).

Example:
    >>> model.save_pretrained("out/gemma-w8a8", format="compressed-tensors")   # doctest: +SKIP
    >>> hfptq.export_compressed_tensors(model, "out/gemma-w8a8")               # the same
"""
import os
from typing import Any, Union

from torch import nn

from .compressed_tensors import (
    CT_FORMAT,
    ExportError,
    ExportResult,
    check_compressed_tensors_exportable,
    export_compressed_tensors,
)

#: ``save_pretrained(format=...)`` / recipe ``output.format`` values: ``hfptq`` (the default) and the exports.
FORMATS = ("hfptq", CT_FORMAT)


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


__all__ = [
    "FORMATS",
    "export_model",
    "CT_FORMAT",
    "ExportError",
    "ExportResult",
    "check_compressed_tensors_exportable",
    "export_compressed_tensors",
]

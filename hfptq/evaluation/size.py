"""Model size in memory (by storage precision) and on disk.

:func:`model_size` walks every parameter **and** buffer once (tensors shared between modules,
such as tied embeddings, are counted once: they are deduplicated by data pointer) and groups
them by *precision*:

* by default the precision is the storage dtype name (``"bfloat16"``, ``"int8"``, ...);
* the integer weight of a quantized module (a tensor named ``qweight`` or containing
  ``"packed"``, with an integer dtype, in a module with an integer ``weight_bits`` attribute, as
  :class:`hfptq.quant.linear.QuantLinear` has) is reported as ``f"int{weight_bits}"``; for
  sub-byte widths the container holds several values per element (``values`` counts them all:
  two per ``uint8`` for int4);
* any other integer tensor whose name contains ``"packed"`` is reported as ``"int4"``;
* a module can state the precision of its tensors explicitly by defining
  ``hfptq_tensor_precision(tensor_name: str) -> str | None``; returning ``None`` falls back to the
  rules above.

Bytes are always the real storage bytes (``numel * element_size``), so packed int4 weights count
half a byte per value.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Union

import torch

from hfptq.errors import CheckpointError
from hfptq.utils import format_bytes  # noqa: F401  (part of this module's API)

logger = logging.getLogger(__name__)

_INTEGER_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
_INT_PRECISION = re.compile(r"^u?int(\d+)$")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _precision(module: torch.nn.Module, local_name: str, tensor: torch.Tensor) -> str:
    hook = getattr(module, "hfptq_tensor_precision", None)
    if callable(hook):
        declared = hook(local_name)
        if declared:
            return str(declared)
    if tensor.dtype in _INTEGER_DTYPES:
        bits = getattr(module, "weight_bits", None)
        is_weight = local_name == "qweight" or "packed" in local_name
        if is_weight and isinstance(bits, int) and not isinstance(bits, bool) and 0 < bits <= 8 * tensor.element_size():
            return f"int{bits}"
        if "packed" in local_name:
            return "int4"
    return _dtype_name(tensor.dtype)


def _values_per_element(precision: str, tensor: torch.Tensor) -> int:
    """Logical values per storage element: e.g. 2 for int4 packed in uint8, 1 for plain dtypes."""
    match = _INT_PRECISION.match(precision)
    if match is None or tensor.dtype not in _INTEGER_DTYPES:
        return 1
    bits = int(match.group(1))
    return max(1, (8 * tensor.element_size()) // bits) if bits > 0 else 1


def _storage_key(tensor: torch.Tensor) -> tuple:
    """Identity of the memory a tensor occupies (meta / exotic tensors fall back to ``id``)."""
    try:
        ptr = tensor.data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        ptr = 0
    if ptr == 0:
        return ("id", id(tensor))
    return ("ptr", ptr, tensor.dtype, tensor.numel())


def model_size(model: torch.nn.Module) -> dict:
    """Parameters and buffers of ``model`` grouped by precision, with their real bytes.

    Returns:
        A dict with

        * ``"total_bytes"``: bytes of all unique parameters and buffers;
        * ``"total_numel"``: their element count (storage elements);
        * ``"parameter_bytes"`` / ``"parameter_numel"`` and ``"buffer_bytes"`` / ``"buffer_numel"``;
        * ``"by_precision"``: ``{precision: {"bytes", "numel", "values", "tensors"}}`` sorted by
          bytes, largest first; ``values`` is the number of logical values (``2 * numel`` for
          ``int4`` packed into bytes).

    Example:
        >>> size = model_size(model)
        >>> size["total_bytes"] / 2**20, {k: v["bytes"] for k, v in size["by_precision"].items()}
    """
    seen: set[tuple] = set()
    groups: dict[str, dict[str, int]] = {}
    totals = {"parameter_bytes": 0, "parameter_numel": 0, "buffer_bytes": 0, "buffer_numel": 0}
    for module_name, module in model.named_modules():
        kinds = (
            ("parameter", module.named_parameters(recurse=False)),
            ("buffer", module.named_buffers(recurse=False)),
        )
        for kind, tensors in kinds:
            for local_name, tensor in tensors:
                if tensor is None:
                    continue
                key = _storage_key(tensor)
                if key in seen:
                    continue
                seen.add(key)
                numel = tensor.numel()
                nbytes = numel * tensor.element_size()
                precision = _precision(module, local_name, tensor)
                per_element = _values_per_element(precision, tensor)
                group = groups.setdefault(precision, {"bytes": 0, "numel": 0, "values": 0, "tensors": 0})
                group["bytes"] += nbytes
                group["numel"] += numel
                group["values"] += numel * per_element
                group["tensors"] += 1
                totals[f"{kind}_bytes"] += nbytes
                totals[f"{kind}_numel"] += numel
    by_precision = dict(sorted(groups.items(), key=lambda kv: (-kv[1]["bytes"], kv[0])))
    return {
        "total_bytes": totals["parameter_bytes"] + totals["buffer_bytes"],
        "total_numel": totals["parameter_numel"] + totals["buffer_numel"],
        **totals,
        "by_precision": by_precision,
    }


def checkpoint_bytes(path: Union[str, Path]) -> int:
    """Bytes on disk of a checkpoint: the sum of its ``*.safetensors`` and ``*.bin`` files.

    ``path`` is a checkpoint folder (only its top level is read, as ``save_pretrained`` writes
    it) or a single weights file.

    Example:
        >>> model.save_pretrained("out/q"); checkpoint_bytes("out/q")
        181403712
    """
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {str(path)!r} does not exist; pass the folder save_pretrained wrote")
    files = [p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin")]
    if not files:
        raise CheckpointError(
            f"no *.safetensors or *.bin file in {str(path)!r}; is this a saved model folder?"
        )
    return sum(p.stat().st_size for p in files)



"""Small helpers with no hfptq dependency, shared by every layer.

Example:
    >>> format_bytes(3 * 2**20)
    '3.00 MiB'
"""
from __future__ import annotations

import inspect
from typing import Any, Optional, Set, Tuple

__all__ = ["accepted_kwargs", "format_bytes", "is_power_of_two"]


def accepted_kwargs(model: Any) -> Tuple[Set[str], bool]:
    """Names of the keyword arguments ``model.forward`` accepts, and whether it takes ``**kwargs``
    (a forward whose signature cannot be read counts as taking ``**kwargs``).

    Example:
        >>> import torch
        >>> accepted_kwargs(torch.nn.Linear(2, 2))
        ({'input'}, False)
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # builtins / C extensions: assume the permissive case
        return set(), True
    return set(params), any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def is_power_of_two(value: object) -> bool:
    """``True`` for an ``int`` power of two >= 2 (e.g. the sizes a Sylvester Hadamard matrix has).

    Example:
        >>> is_power_of_two(128), is_power_of_two(96), is_power_of_two(True)
        (True, False, False)
    """
    return isinstance(value, int) and not isinstance(value, bool) and value >= 2 and value & (value - 1) == 0


def format_bytes(num_bytes: Optional[float], digits: int = 2) -> str:
    """Human-readable binary size (``"n/a"`` for ``None``), ``digits`` decimals from KiB up.

    Example:
        >>> format_bytes(512), format_bytes(1536, digits=1), format_bytes(None)
        ('512 B', '1.5 KiB', 'n/a')
    """
    if num_bytes is None:
        return "n/a"
    value = float(num_bytes)
    if abs(value) < 1024:
        return f"{value:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if abs(value) < 1024 or unit == "TiB":
            break
    return f"{value:.{digits}f} {unit}"

"""Small helpers with no hfptq dependency, shared by every layer.

Example:
    >>> format_bytes(3 * 2**20)
    '3.00 MiB'
"""
from __future__ import annotations

from typing import Optional

__all__ = ["format_bytes", "is_power_of_two"]


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

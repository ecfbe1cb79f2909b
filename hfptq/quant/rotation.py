"""Online block-Hadamard rotation of a linear's input (``activations.rotation``).

Some inputs carry outliers no per-channel factor can fold away: ``down_proj`` in a gated MLP reads
``act(gate(x)) * up(x)``, a product made at run time, so a few channels of some tokens are far
larger than the rest and set those tokens' INT8 step. Rotating the input by an orthogonal
Hadamard matrix spreads each outlier over a block of channels (QuaRot, Ashkboos et al. 2024),
and the rotation is undone exactly in the weight (this also serves weight-only INT4: the weight
``W H`` has no outlier columns, so its per-group ranges are tight, "incoherence processing")::

    y = x W^T = (x H)(W H)^T        (H orthogonal and symmetric: H H^T = I)

``H`` is block diagonal, one normalised Sylvester Hadamard matrix of ``block`` (a power of two) per
``block`` consecutive channels. The weight is rotated once, before calibration and quantization
(so observers, GPTQ Hessians and the stored integers all see the rotated problem); the input is
rotated at run time by a batched ``[.., block] @ [block, block]`` matmul, ``block / out_features``
of the linear's own multiply-adds (128 / 640 for Gemma 3 270M's ``down_proj``), in float. Blocks
above 128 run as a Kronecker product ``H_a (x) H_128`` (Sylvester matrices factor exactly), so a
block of 2048 costs ``16 + 128`` multiply-adds per element instead of 2048.

Example:
    >>> import torch
    >>> x, w = torch.randn(3, 256), torch.randn(8, 256)
    >>> torch.allclose(rotate(x, 128) @ rotate(w, 128).T, x @ w.T, atol=1e-4)
    True
"""
from __future__ import annotations

import functools
from typing import List, Tuple

import torch
from torch import nn

from ..architectures import is_conv1d
from ..utils import is_power_of_two

__all__ = ["hadamard", "rotate", "check_block", "fold_input_rotations", "undo_input_rotations"]


DENSE_BLOCK = 128  # larger blocks are applied as a Kronecker product of two smaller Hadamard matrices


def check_block(block: int) -> bool:
    """``True`` when ``block`` is a power of two >= 2 (the sizes a Sylvester Hadamard matrix has)."""
    return is_power_of_two(block)


@functools.lru_cache(maxsize=32)
def _hadamard(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(device=device, dtype=dtype)


def hadamard(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The normalised ``n x n`` Sylvester Hadamard matrix (orthogonal and symmetric), cached per dtype/device.

    Example:
        >>> h = hadamard(4)
        >>> torch.allclose(h @ h, torch.eye(4))
        True
    """
    if not check_block(n):
        raise ValueError(f"Hadamard size must be a power of two >= 2, got {n!r}")
    return _hadamard(n, dtype, torch.device(device))


def rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x @ H`` along the last dimension, ``H`` block diagonal with ``block x block`` Hadamard blocks.

    Also rotates the rows of a ``[out, in]`` weight the same way (``W H``). Applying it twice gives
    ``x`` back (up to rounding): ``H`` is its own inverse.
    """
    features = x.shape[-1]
    if features % block:
        raise ValueError(f"cannot rotate {features} channels in blocks of {block}")
    compute = x.dtype if x.is_floating_point() and x.dtype in (torch.float32, torch.float64) else torch.float32
    if block <= DENSE_BLOCK:
        out = torch.matmul(x.to(compute).reshape(*x.shape[:-1], features // block, block),
                           hadamard(block, compute, x.device))
        return out.reshape(x.shape).to(x.dtype)
    # Sylvester: H_(a*b) = H_a (x) H_b. Channel i1*b + i2 -> rotate the i2 axis by H_b, then the i1 axis by
    # H_a: (b + a) multiply-adds per element instead of a*b (2048 = 16 x 128: 144 instead of 2048).
    outer = block // DENSE_BLOCK
    y = torch.matmul(x.to(compute).reshape(-1, outer, DENSE_BLOCK), hadamard(DENSE_BLOCK, compute, x.device))
    out = torch.matmul(hadamard(outer, compute, x.device), y)  # H_a symmetric: sum_i1 H_a[j1, i1] y[i1, :]
    return out.reshape(x.shape).to(x.dtype)


def _rotate_input_hook(module: nn.Module, args):
    return (rotate(args[0], module._hfptq_rotation),) + tuple(args[1:])


def fold_input_rotations(model: nn.Module, plan) -> List[Tuple[nn.Module, torch.utils.hooks.RemovableHandle, torch.Tensor]]:
    """Rotate the float weight of every planned module with ``activations.rotation`` and rotate its input.

    The model computes the same function afterwards (up to float rounding): ``W`` becomes ``W H``
    and a forward pre-hook turns the input ``x`` into ``x H``. Calibration then observes the rotated
    input, and conversion (which replaces the module, dropping the hook) quantizes the rotated
    weight into a :class:`~hfptq.quant.linear.QuantLinear` that rotates its input itself.

    Returns:
        ``(module, hook handle, original weight)`` per rotated module, for :func:`undo_input_rotations`.
    """
    from ..errors import ConfigError

    done = []
    tied = {e.tied_to for e in plan if getattr(e, "tied_to", None)}
    for entry in plan:
        block = int((entry.activations or {}).get("rotation") or 0)
        if not block or not entry.quantized:
            continue
        if entry.name in tied:
            undo_input_rotations(done)
            raise ConfigError(
                f"activations.rotation on {entry.name!r}: its integer weight is shared with the tied input "
                "embedding, whose lookups would read rotated rows. Use a rule without rotation for it."
            )
        module = model.get_submodule(entry.name)
        weight = module.weight
        if is_conv1d(module):  # [in, out]
            rotated = rotate(weight.detach().t(), block).t()
        else:
            rotated = rotate(weight.detach(), block)
        original = weight.detach().clone()  # kept until conversion, so a failure restores it bit for bit
        with torch.no_grad():
            weight.copy_(rotated.to(weight.dtype))
        module._hfptq_rotation = block
        done.append((module, module.register_forward_pre_hook(_rotate_input_hook), original))
    return done


def undo_input_rotations(done: List[Tuple[nn.Module, torch.utils.hooks.RemovableHandle, torch.Tensor]]) -> None:
    """Put back the float weights (bit for bit) and remove the hooks of :func:`fold_input_rotations`."""
    for module, handle, original in done:
        handle.remove()
        module.__dict__.pop("_hfptq_rotation", None)
        with torch.no_grad():
            module.weight.copy_(original)

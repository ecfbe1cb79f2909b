"""What an accuracy algorithm plugs into the calibration engine: statistics and one step interface.

The sequential engine (:mod:`hfptq.calibration`) knows no algorithm. For each decoder layer it
runs the layer over the cached calibration inputs, and calls every :class:`CalibrationStep` at
fixed points:

1. ``before_observe(run, layer)`` — the step may run its own passes over the layer (with hooks
   collecting statistics) and change the layer's working copy (SmoothQuant folds its scales here);
2. ``observe_hooks(run, layer)`` — statistics hooks added to the engine's observing pass (the pass
   feeding the static activation observers), e.g. GPTQ's Hessians;
3. ``after_observe(run, layer)`` — the step uses what it collected (GPTQ rounds the weights, with
   extra passes for its later true-sequential groups).

After the layers, the *tail* (planned modules outside the layer stack, e.g. the LM head):
``before_tail`` (changes the tail pass must see, committed on success: SmoothQuant's final norm),
``tail_hooks`` (statistics of the tail observing pass) and ``after_tail``.

A step only writes to the layer's working copy (``layer.work``) or to ``run.weights``; the engine
commits the changes to the model after every layer and the tail calibrated without error.

Example:
    >>> class CountRows(CalibrationStep):
    ...     name = "count_rows"
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.rows = {}
    ...     def observe_hooks(self, run, layer):
    ...         def hook(name, x, batch_index):
    ...             self.rows[name] = self.rows.get(name, 0) + x.shape[0]
    ...         return [hook], None
    >>> result = hfptq.calibration.calibrate(model, plan, config, ids, steps=[CountRows()])  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import CalibrationError

__all__ = [
    "CalibrationStep",
    "ChannelAbsMax",
    "CrossAccumulator",
    "HessianAccumulator",
    "InputCapture",
    "LayerWork",
    "StatsHook",
]

StatsHook = Callable[[str, torch.Tensor, int], None]
"""``hook(module_name, x, batch_index)``: called with the 2-D input ``[tokens, in_features]`` of
every hooked linear during a calibration pass (what SmoothQuant/GPTQ-like algorithms need)."""


# ------------------------------------------------------------------------------------------------
# Statistics collectors (StatsHook callables)
# ------------------------------------------------------------------------------------------------


class ChannelAbsMax:
    """Running per-input-channel ``max |x|`` of each module's input (SmoothQuant's statistic).

    Example:
        >>> stats = ChannelAbsMax()
        >>> stats("mlp.up_proj", torch.tensor([[1.0, -3.0], [-2.0, 0.5]]), 0)
        >>> stats.values["mlp.up_proj"]
        tensor([2., 3.])
    """

    def __init__(self, names: Optional[Sequence[str]] = None) -> None:
        self.names = None if names is None else set(names)
        self.values: Dict[str, torch.Tensor] = {}

    def __call__(self, name: str, x: torch.Tensor, batch_index: int) -> None:
        if self.names is not None and name not in self.names:
            return
        amax = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        previous = self.values.get(name)
        self.values[name] = amax if previous is None else torch.maximum(previous, amax)


class HessianAccumulator:
    """Running ``H = 2/N · Σ x xᵀ`` over the ``N`` input tokens of each module (GPTQ's Hessian).

    Accumulated in float32, ``[in_features, in_features]`` per module, even under bfloat16
    autocast. GPTQ is invariant to the overall scale of ``H`` (its damping is relative to
    ``mean(diag(H))``).

    Example:
        >>> acc = HessianAccumulator()
        >>> acc("fc", torch.tensor([[1.0, 0.0], [0.0, 2.0]]), 0)
        >>> acc.hessian("fc")
        tensor([[1., 0.],
                [0., 4.]])
    """

    def __init__(self, names: Optional[Sequence[str]] = None) -> None:
        self.names = None if names is None else set(names)
        self.sums: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, int] = {}

    def __call__(self, name: str, x: torch.Tensor, batch_index: int = 0) -> None:
        if self.names is not None and name not in self.names:
            return
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        self._add(name, x2, x2)

    def _add(self, name: str, left: torch.Tensor, right: torch.Tensor) -> None:
        """Add ``leftᵀ right`` (``[tokens, in]`` each) to ``name``'s running sum, in float32."""
        # the hooks fire inside the calibration forwards, which may run under bfloat16 autocast: a
        # bfloat16 Gram matrix is not positive semi-definite to working precision (GPTQ's Cholesky then
        # fails at the requested dampening and retries with 10-1000x more), so this product stays float32
        with torch.autocast(device_type=left.device.type, enabled=False):
            product = left.t() @ right
        previous = self.sums.get(name)
        if previous is None:
            self.sums[name] = product
        elif previous.shape != product.shape:
            raise CalibrationError(f"{name!r}: inputs of width {left.shape[-1]} after inputs of width "
                                   f"{previous.shape[0]}; one accumulator per module input.")
        else:
            previous += product
        self.counts[name] = self.counts.get(name, 0) + left.shape[0]

    def hessian(self, name: str) -> torch.Tensor:
        """``2/N · Σ x xᵀ`` of ``name``'s inputs (float32)."""
        if name not in self.sums:
            raise CalibrationError(f"No input was recorded for {name!r}; its Hessian cannot be computed.")
        return self.sums[name] * (2.0 / max(1, self.counts[name]))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sums.values())


class CrossAccumulator(HessianAccumulator):
    """Running ``C = 2/N · Σ x_q x_fᵀ`` pairing each module input with the float model's (GPTAQ targets).

    ``targets[batch_index][name]`` holds the float model's input of ``name`` for that calibration
    batch (captured beforehand, same token positions); each call with the quantized model's input
    ``x_q`` adds ``x_qᵀ x_f``. Accumulated in float32, ``[in_features, in_features]`` per module.

    Example:
        >>> acc = CrossAccumulator(["fc"], [{"fc": torch.tensor([[1.0, 2.0]])}])
        >>> acc("fc", torch.tensor([[3.0, 0.0]]), 0)
        >>> acc.cross("fc")
        tensor([[ 6., 12.],
                [ 0.,  0.]])
    """

    def __init__(self, names: Sequence[str], targets: Sequence[Mapping[str, torch.Tensor]]) -> None:
        super().__init__(names)
        self.targets = targets

    def __call__(self, name: str, x: torch.Tensor, batch_index: int = 0) -> None:
        if name not in self.names:
            return
        xq = x.detach().reshape(-1, x.shape[-1]).float()
        xf = self.targets[batch_index].get(name) if batch_index < len(self.targets) else None
        if xf is None:
            raise CalibrationError(f"gptq.float_targets: {name!r} ran in the quantized model but not in the float one "
                                   f"in calibration batch {batch_index} (data-dependent routing?); set "
                                   "gptq.float_targets=False for this model.")
        xf = xf.to(xq.device)
        if xf.shape != xq.shape:
            raise CalibrationError(f"gptq.float_targets: the float model's input of {name!r} has shape "
                                   f"{tuple(xf.shape)}, the quantized model's {tuple(xq.shape)}.")
        self._add(name, xq, xf)

    def cross(self, name: str) -> torch.Tensor:
        """``2/N · Σ x_q x_fᵀ`` of ``name`` (float32), normalised like :meth:`HessianAccumulator.hessian`."""
        if name not in self.sums:
            raise CalibrationError(f"No input was recorded for {name!r}; its float-target correction cannot be computed.")
        return self.sums[name] * (2.0 / max(1, self.counts[name]))


class InputCapture:
    """Stores each module's input (float32, ``[tokens, in]``) per calibration batch.

    Example:
        >>> capture = InputCapture(["fc"])
        >>> capture("fc", torch.ones(2, 3), 0)
        >>> capture.batches[0]["fc"].shape
        torch.Size([2, 3])
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = set(names)
        self.batches: List[Dict[str, torch.Tensor]] = []

    def __call__(self, name: str, x: torch.Tensor, batch_index: int) -> None:
        if name not in self.names:
            return
        while len(self.batches) <= batch_index:
            self.batches.append({})
        self.batches[batch_index][name] = x.detach().reshape(-1, x.shape[-1]).float().clone()


# ------------------------------------------------------------------------------------------------
# The step interface
# ------------------------------------------------------------------------------------------------


@dataclass
class LayerWork:
    """One decoder layer while the engine calibrates it.

    Attributes:
        index: position of the layer in its ``nn.ModuleList``.
        name: full module name of the layer (``"model.layers.3"``).
        layer: the model's own layer (never written during calibration).
        work: the working copy steps may change (the layer itself when no step changes weights).
        modules: planned (not skipped) linears of the layer in ``work``, by full name.
        all_linears: every quantizable linear of ``work``, by full name.
        desc: progress-bar description of the layer's passes.
    """

    index: int
    name: str
    layer: nn.Module
    work: nn.Module
    modules: Dict[str, nn.Module] = field(default_factory=dict)
    all_linears: Dict[str, nn.Module] = field(default_factory=dict)
    desc: str = ""

    @property
    def prefix(self) -> str:
        """``name + "."``: the prefix of the layer's module names."""
        return f"{self.name}."


class CalibrationStep:
    """Base class of an algorithm run inside the sequential calibration (every hook is optional).

    ``run`` is the engine (:class:`hfptq.calibration.CalibrationRun`): it exposes ``model``,
    ``plan``, ``config``, ``slots`` (static modules' observers), ``steps``, the result dicts
    ``weights`` / ``weight_qparams`` / ``plan_updates``, and the passes ``layer_pass``,
    ``tail_pass`` and ``forward_first_batch``.

    Attributes:
        name: key of the step's ``records`` in ``CalibrationResult.info``.
        needs_every_layer: the step must see every layer (otherwise layers after the last one
            holding a module of :meth:`module_names` or an observer are skipped).
        records: what the step reports (stored in ``info[name]``).
    """

    name: str = "step"
    needs_every_layer: bool = False

    def __init__(self) -> None:
        self.records: Dict[str, Any] = {}

    def validate(self, run: Any) -> None:
        """Check options and modules before the model runs (raise ``ConfigError``/``CalibrationError``)."""

    def module_names(self, run: Any) -> Sequence[str]:
        """Planned modules whose statistics the step needs (they keep their layers running)."""
        return ()

    def passes_per_layer(self, run: Any) -> int:
        """Passes the step adds to each layer (for the progress bar)."""
        return 0

    def start_layers(self, run: Any) -> None:
        """Called once after the inputs were captured, before the first layer."""

    def before_observe(self, run: Any, layer: LayerWork) -> None:
        """Own passes and changes to ``layer.work`` before the observing pass."""

    def observe_hooks(self, run: Any, layer: LayerWork) -> Tuple[List[StatsHook], Optional[nn.Module]]:
        """``(hooks, stop_after)`` for the observing pass; ``stop_after`` (a module of ``layer.work``)
        may end each batch there when nothing else needs the rest of the layer."""
        return [], None

    def rewrites_outputs(self, run: Any, layer: LayerWork) -> bool:
        """True when ``after_observe`` changes the layer's function: the engine then runs the
        layer once more to produce the next layer's inputs."""
        return False

    def after_observe(self, run: Any, layer: LayerWork) -> None:
        """Use the statistics collected in the observing pass."""

    def end_layers(self, run: Any) -> None:
        """Called once after the last layer (release per-run state)."""

    def tail_needed(self, run: Any) -> bool:
        """True when the step needs the tail pass (modules outside the layer stack)."""
        return False

    def before_tail(self, run: Any) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Run before the tail observing pass; returns ``(model tensor, new value)`` changes the tail
        pass must see (applied for it, restored after, committed to the model on success)."""
        return []

    def tail_hooks(self, run: Any) -> Tuple[List[str], List[StatsHook]]:
        """``(module names, hooks)`` of the tail observing pass."""
        return [], []

    def after_tail(self, run: Any, modules: Mapping[str, nn.Module]) -> None:
        """Use the statistics of the tail observing pass (``modules``: the hooked tail modules)."""

"""Streaming range observers used during calibration.

An observer watches the tensors that flow into a module (``observe``), keeps a bounded summary of
them, and at the end turns that summary into a clipping range and quantization parameters
(``range`` / ``compute_qparams``). No observer ever keeps the activations themselves: memory is
``O(channels)`` for :class:`MinMaxObserver` and ``O(bins * channels)`` for the histogram-based
observers, whatever the number of calibration tokens.

Observers
---------
``"minmax"`` (:class:`MinMaxObserver`)
    Running min/max, or an exponential moving average of per-batch min/max.
``"percentile"`` (:class:`PercentileObserver`)
    Clips at a percentile of ``|x|`` (symmetric) or at the lower/upper percentiles of ``x``
    (asymmetric), read off a streaming histogram.
``"entropy"`` (:class:`EntropyObserver`)
    TensorRT-style entropy calibration: the threshold minimising ``KL(P || Q)`` between the
    clipped histogram of ``|x|`` and its quantized version.
``"mse"`` (:class:`MseObserver`)
    The clipping range minimising the expected quantization MSE, evaluated in closed form on
    the streaming histogram.

Granularity
-----------
``"tensor"`` gives one range; ``"channel"`` gives one range per channel of the axis ``ch_axis``
(default: the last dimension, e.g. the input features of a linear layer's activation). For a
``[out, in]`` weight observed per output channel pass ``ch_axis=0``. Every observer supports both;
the histogram observers then keep one histogram per channel, which costs
``channels * 2 * bins * 8`` bytes (64 MiB for 2048 channels at ``bins=2048``) and roughly 6x the
time per element of ``"tensor"``: prefer ``bins=256``-``512`` per channel.

The streaming histogram
-----------------------
Bin edges are integer multiples of a width ``w`` (zero is always an edge). The histogram holds
``2 * bins`` bins; when a batch falls outside it, ``w`` grows by the smallest integer factor
``k`` that makes everything fit, and old bins are merged ``k`` to one. Because the new edges are a
subset of the old ones this merge is *exact*: the histogram equals the one you would get by
binning all past data directly on the new edges. Hence the result depends on the batch split only
through the final ``w``, and ``w < span / (bins - 1)`` always holds (``span`` = observed
``max |x|`` for symmetric observers, ``max - min`` with zero included for asymmetric ones), i.e.
at least ``bins`` bins always cover the observed range. Per-batch cost is one ``aminmax`` plus
~4 vectorised passes (scale, truncate, ``bincount``) over ``2**18``-element chunks.

Example:
    >>> import torch
    >>> from hfptq.quant.observers import make_observer
    >>> obs = make_observer("minmax", bits=8, symmetric=True)
    >>> for batch in (torch.tensor([[-1.0, 0.5]]), torch.tensor([[2.0, 0.0]])):
    ...     obs.observe(batch)
    >>> obs.range()
    (tensor(-1.), tensor(2.))
    >>> scale, zero_point = obs.compute_qparams()
    >>> round(float(scale) * 127, 6), int(zero_point)
    (2.0, 0)
"""
from __future__ import annotations

import logging
import math
from typing import Callable, ClassVar, Dict, Optional, Tuple, Type

import torch

from hfptq.errors import CalibrationError, ConfigError, ConfigTypeError, suggest
from hfptq.quant.qparams import compute_qparams as _qparams_from_range
from hfptq.quant.qparams import qrange

logger = logging.getLogger(__name__)

__all__ = [
    "Observer",
    "MinMaxObserver",
    "PercentileObserver",
    "EntropyObserver",
    "MseObserver",
    "OBSERVERS",
    "GRANULARITIES",
    "make_observer",
]

GRANULARITIES: Tuple[str, ...] = ("tensor", "channel")

# Elements processed per vectorised step when binning a batch: bounds the temporary memory of a
# batch update (2 x 1 MiB) independently of the batch size and keeps the buffers cache-friendly.
_CHUNK_ELEMENTS = 1 << 18
# Bound on the elements of one temporary tensor in the end-of-calibration searches.
_SEARCH_CHUNK_ELEMENTS = 1 << 21
_LARGE_HISTOGRAM_BYTES = 256 * 2**20


def _check_int(field: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(f"{field} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ConfigError(f"{field} must be >= {minimum}, got {value}")
    return value


class Observer:
    """Base class of the streaming range observers.

    Args:
        bits: Integer width the range is calibrated for (8 or 4).
        symmetric: Symmetric (zero point 0, range ``[-a, a]``) or asymmetric quantization.
        granularity: ``"tensor"`` (one range) or ``"channel"`` (one range per channel of
            ``ch_axis``).
        ch_axis: Channel axis of the observed tensors when ``granularity="channel"``; default the
            last dimension (the input features of an activation ``[..., C]``).

    Attributes:
        name: Registry name of the observer class (see :data:`OBSERVERS`).
        num_batches: Number of non-empty batches observed so far.
        num_channels: Number of channels (``None`` until the first channel-wise batch).

    Subclasses implement ``_update(x2d, batch_min, batch_max)`` and ``_compute_range()``, both on
    ``[rows, C]`` views (``C == 1`` for ``"tensor"``).
    """

    name: ClassVar[str] = "observer"

    def __init__(
        self,
        bits: int = 8,
        symmetric: bool = True,
        granularity: str = "tensor",
        ch_axis: int = -1,
        **kwargs,
    ) -> None:
        if kwargs:
            unknown = sorted(kwargs)[0]
            raise ConfigError(
                f"unknown option {unknown!r} for the {self.name!r} observer; it accepts "
                f"{', '.join(repr(o) for o in self._option_names())}."
                f"{suggest(unknown, self._option_names())}"
            )
        if isinstance(bits, bool) or not isinstance(bits, int):
            raise ConfigTypeError(f"bits must be an int (4 or 8), got {bits!r}")
        try:
            qrange(bits, True)
        except ValueError as exc:
            raise ConfigError(f"bits must be 4 or 8, got {bits}") from exc
        if not isinstance(symmetric, bool):
            raise ConfigTypeError(f"symmetric must be a bool, got {symmetric!r}")
        if granularity not in GRANULARITIES:
            raise ConfigError(
                f"granularity must be one of {', '.join(map(repr, GRANULARITIES))} for observers, "
                f"got {granularity!r}.{suggest(granularity, GRANULARITIES)}"
            )
        if isinstance(ch_axis, bool) or not isinstance(ch_axis, int):
            raise ConfigTypeError(f"ch_axis must be an int, got {ch_axis!r}")
        self.bits = bits
        self.symmetric = symmetric
        self.granularity = granularity
        self.ch_axis = ch_axis
        self.num_batches = 0
        self.num_channels: Optional[int] = None
        self._range_cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    # ------------------------------------------------------------------ public API

    def observe(self, x: torch.Tensor) -> None:
        """Update the statistics with one batch ``x`` (any shape; any float dtype).

        Statistics are computed in float32 whatever the input dtype. Empty tensors are ignored.

        Raises:
            CalibrationError: ``x`` holds NaN/Inf, is not a tensor, or its channel count differs
                from the previous batches.
        """
        if not isinstance(x, torch.Tensor):
            raise CalibrationError(
                f"{self.name} observer expects a torch.Tensor, got {type(x).__name__}"
            )
        x = x.detach()
        if x.numel() == 0:
            logger.debug("%s observer: ignoring an empty batch of shape %s", self.name, tuple(x.shape))
            return
        if x.is_complex() or x.dtype == torch.bool:
            raise CalibrationError(f"{self.name} observer cannot observe a tensor of dtype {x.dtype}")
        if x.dtype == torch.float64:
            x = x.float()
        x2d = self._as_rows(x)
        if self.granularity == "tensor":
            batch_min, batch_max = torch.aminmax(x2d)
            batch_min, batch_max = batch_min.reshape(1).float(), batch_max.reshape(1).float()
        else:
            # amin/amax separately: ~10x faster than aminmax(dim=0) on CPU.
            batch_min, batch_max = x2d.amin(dim=0).float(), x2d.amax(dim=0).float()
        # NaN propagates through min/max and +-Inf shows up in them: no extra pass needed.
        if not bool(torch.isfinite(batch_min).all() & torch.isfinite(batch_max).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise CalibrationError(
                f"{self.name} observer received a batch with {bad} non-finite value(s) (NaN/Inf) "
                f"out of {x.numel()} (shape {tuple(x.shape)}, dtype {x.dtype}); check the model "
                "outputs for overflow (fp16?) and the calibration data"
            )
        self._update(x2d, batch_min, batch_max)
        self.num_batches += 1
        self._range_cache = None

    def range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The chosen clipping range ``(min, max)``, float32, shaped ``[]`` or ``[C]``.

        Raises:
            CalibrationError: nothing was observed.
        """
        if self.num_batches == 0:
            raise CalibrationError(
                f"{self.name} observer has observed no batch; run calibration data through the "
                "module (at least one non-empty batch) before computing its quantization range"
            )
        if self._range_cache is None:
            lo, hi = self._compute_range()
            lo, hi = lo.float(), hi.float()
            if self.granularity == "tensor":
                lo, hi = lo.reshape(()), hi.reshape(())
            self._range_cache = (lo, hi)
        lo, hi = self._range_cache
        return lo.clone(), hi.clone()

    def compute_qparams(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(scale float32, zero_point int32)`` for the chosen range, shaped ``[]`` or ``[C]``.

        Raises:
            CalibrationError: nothing was observed.
        """
        lo, hi = self.range()
        return _qparams_from_range(lo, hi, self.bits, self.symmetric)

    def reset(self) -> None:
        """Forget everything observed so far (the configuration is kept)."""
        self.num_batches = 0
        self.num_channels = None
        self._range_cache = None
        self._reset_state()

    def __repr__(self) -> str:
        extra = self._extra_repr()
        return (
            f"{type(self).__name__}(bits={self.bits}, symmetric={self.symmetric}, "
            f"granularity={self.granularity!r}{', ' + extra if extra else ''}, "
            f"num_batches={self.num_batches})"
        )

    # ------------------------------------------------------------------ for subclasses

    @classmethod
    def _option_names(cls) -> Tuple[str, ...]:
        return ("bits", "symmetric", "granularity", "ch_axis")

    def _extra_repr(self) -> str:
        return ""

    def _reset_state(self) -> None:
        raise NotImplementedError

    def _update(self, x2d: torch.Tensor, batch_min: torch.Tensor, batch_max: torch.Tensor) -> None:
        raise NotImplementedError

    def _compute_range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _as_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``[rows, C]`` view of ``x`` (``C == 1`` for per-tensor observers)."""
        if self.granularity == "tensor":
            return x.reshape(-1, 1)
        if x.dim() == 0:
            raise CalibrationError(
                f"{self.name} observer with granularity='channel' needs a tensor with a channel "
                "axis, got a 0-d tensor"
            )
        try:
            channels = x.shape[self.ch_axis]
        except IndexError as exc:
            raise CalibrationError(
                f"ch_axis={self.ch_axis} is out of range for a batch of shape {tuple(x.shape)}"
            ) from exc
        if self.num_channels is None:
            self.num_channels = channels
        elif channels != self.num_channels:
            raise CalibrationError(
                f"{self.name} observer saw {self.num_channels} channels (axis {self.ch_axis}) in "
                f"earlier batches but {channels} in a batch of shape {tuple(x.shape)}"
            )
        return x.movedim(self.ch_axis, -1).reshape(-1, channels)


class MinMaxObserver(Observer):
    """Running min/max, or an exponential moving average (EMA) of per-batch min/max.

    With ``averaging_constant=c`` the range after batch ``t`` is
    ``m_t = m_{t-1} + c * (batch_min_t - m_{t-1})`` (same for the max), starting from the first
    batch's min/max.

    Args:
        averaging_constant: ``None`` for the exact running min/max, or ``0 < c <= 1``.
        **kwargs: See :class:`Observer` (``bits``, ``symmetric``, ``granularity``, ``ch_axis``).

    Example:
        >>> obs = MinMaxObserver(averaging_constant=0.5)
        >>> obs.observe(torch.tensor([-2.0, 2.0])); obs.observe(torch.tensor([-4.0, 1.0]))
        >>> obs.range()
        (tensor(-3.), tensor(1.5000))
    """

    name = "minmax"

    def __init__(self, averaging_constant: Optional[float] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if averaging_constant is not None:
            if isinstance(averaging_constant, bool) or not isinstance(averaging_constant, (int, float)):
                raise ConfigTypeError(
                    f"averaging_constant must be a float in (0, 1] or None, got {averaging_constant!r}"
                )
            if not 0.0 < float(averaging_constant) <= 1.0:
                raise ConfigError(
                    f"averaging_constant must be in (0, 1] (or None for the running min/max), "
                    f"got {averaging_constant}"
                )
            averaging_constant = float(averaging_constant)
        self.averaging_constant = averaging_constant
        self._reset_state()

    @classmethod
    def _option_names(cls) -> Tuple[str, ...]:
        return super()._option_names() + ("averaging_constant",)

    def _extra_repr(self) -> str:
        return f"averaging_constant={self.averaging_constant}"

    def _reset_state(self) -> None:
        self.min_val: Optional[torch.Tensor] = None
        self.max_val: Optional[torch.Tensor] = None

    def _update(self, x2d: torch.Tensor, batch_min: torch.Tensor, batch_max: torch.Tensor) -> None:
        if self.min_val is None:
            self.min_val, self.max_val = batch_min.clone(), batch_max.clone()
        elif self.averaging_constant is None:
            self.min_val = torch.minimum(self.min_val, batch_min)
            self.max_val = torch.maximum(self.max_val, batch_max)
        else:
            c = self.averaging_constant
            self.min_val = self.min_val + c * (batch_min - self.min_val)
            self.max_val = self.max_val + c * (batch_max - self.max_val)

    def _compute_range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val


# ------------------------------------------------------------------------------------------------
# Streaming histogram
# ------------------------------------------------------------------------------------------------


class _StreamingHistogram:
    """Per-channel histograms on zero-anchored edges ``(i - neg_bins) * width``, ``i = 0..T``.

    ``counts[c, i]`` counts the values in ``[(i - a) w, (i + 1 - a) w)`` with ``a = neg_bins[c]``
    and ``w = width[c]`` (a value exactly on the top edge goes to the last bin). ``width == 0``
    marks a channel that has only seen zeros (all of them in bin ``a = 0``).
    """

    def __init__(self, channels: int, total_bins: int, device: torch.device) -> None:
        self.total_bins = total_bins
        self.counts = torch.zeros(channels, total_bins, dtype=torch.int64, device=device)
        self.width = torch.zeros(channels, dtype=torch.float64, device=device)
        self.neg_bins = torch.zeros(channels, dtype=torch.int64, device=device)
        self.neg_extent = torch.zeros(channels, dtype=torch.float64, device=device)
        self.pos_extent = torch.zeros(channels, dtype=torch.float64, device=device)

    def edges(self) -> torch.Tensor:
        """Bin edges ``[C, T + 1]`` (float64)."""
        i = torch.arange(self.total_bins + 1, device=self.width.device, dtype=torch.float64)
        return (i[None, :] - self.neg_bins[:, None].double()) * self.width[:, None]

    def update(self, x2d: torch.Tensor, neg_extent: torch.Tensor, pos_extent: torch.Tensor, absolute: bool) -> None:
        """Add the ``[rows, C]`` batch; ``neg_extent``/``pos_extent`` (``>= 0``) bound it."""
        self._fit(torch.maximum(self.neg_extent, neg_extent.double()), torch.maximum(self.pos_extent, pos_extent.double()))
        self._accumulate(x2d, absolute)

    def _fits(self, neg: torch.Tensor, pos: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
        safe = torch.where(width > 0, width, torch.ones_like(width))
        needed = torch.ceil(neg / safe) + torch.ceil(pos / safe)
        return (width > 0) & (needed <= self.total_bins)

    def _fit(self, neg: torch.Tensor, pos: torch.Tensor) -> None:
        """Grow the bin width (integer factor) and re-anchor so that ``[-neg, pos]`` fits."""
        T = self.total_bins
        old_width, old_neg_bins = self.width, self.neg_bins
        span = neg + pos
        new_width = old_width.clone()
        # First non-zero data: (span / (T - 2)) always fits, ceil() rounding included.
        init = (old_width == 0) & (span > 0)
        new_width = torch.where(init, span / (T - 2), new_width)
        grow = (old_width > 0) & ~self._fits(neg, pos, old_width)
        factor = torch.ones_like(old_width)
        if bool(grow.any()):
            safe = torch.where(old_width > 0, old_width, torch.ones_like(old_width))
            # Smallest candidate: span / (k w) <= T. It may miss by the ceil() of each side (up
            # to 2 bins); span / (k w) <= T - 2 always fits. Both keep w < 2 span / (T - 2).
            factor = torch.where(grow, torch.clamp(torch.ceil(span / (T * safe)), min=2.0), factor)
            missing = grow & ~self._fits(neg, pos, safe * factor)
            factor = torch.where(missing, torch.clamp(torch.ceil(span / ((T - 2) * safe)), min=2.0), factor)
            while True:  # float rounding safety net; steps of ~1 bin of the new histogram
                missing = grow & ~self._fits(neg, pos, safe * factor)
                if not bool(missing.any()):
                    break
                factor = factor + missing.double() * torch.ceil(factor / T)
            new_width = torch.where(grow, old_width * factor, new_width)
        safe_new = torch.where(new_width > 0, new_width, torch.ones_like(new_width))
        new_neg_bins = torch.where(new_width > 0, torch.ceil(neg / safe_new), torch.zeros_like(neg)).long()
        self.neg_extent, self.pos_extent = neg, pos
        changed = (new_width != old_width) | (new_neg_bins != old_neg_bins)
        if bool(changed.any()):
            if bool(grow.any()):
                logger.debug("histogram grows by up to %dx to cover [-%g, %g]", int(factor.max()), float(neg.max()), float(pos.max()))
            # Old bin j (relative to zero) lies inside new bin floor(j / k): exact merge.
            j = torch.arange(T, device=self.counts.device)[None, :] - old_neg_bins[:, None]
            k = factor.round().long()[:, None]
            merged = torch.div(j, k, rounding_mode="floor") + new_neg_bins[:, None]
            # Channels that only saw zeros keep everything in the bin of zero.
            target = torch.where((old_width > 0)[:, None], merged, new_neg_bins[:, None].expand(-1, T))
            target = target.clamp_(0, T - 1)  # only empty bins can fall outside
            counts = torch.zeros_like(self.counts)
            counts.scatter_add_(1, target, self.counts)
            self.counts = counts
        self.width, self.neg_bins = new_width, new_neg_bins

    def _accumulate(self, x2d: torch.Tensor, absolute: bool) -> None:
        T = self.total_bins
        rows, channels = x2d.shape
        device = self.counts.device
        inv_width = torch.where(self.width > 0, 1.0 / self.width, torch.zeros_like(self.width)).float()
        offset = self.neg_bins.float()
        chunk_rows = max(1, min(rows, _CHUNK_ELEMENTS // channels))
        # int32 indices are cheaper; the flat per-channel index must still fit.
        index_dtype = torch.int32 if channels * (T + 1) < 2**31 else torch.int64
        values = torch.empty((chunk_rows, channels), dtype=torch.float32, device=device)
        index = torch.empty((chunk_rows, channels), dtype=index_dtype, device=device)
        flat = torch.zeros(channels * (T + 1), dtype=torch.int64, device=device)
        if channels > 1:
            channel_start = torch.arange(channels, dtype=index_dtype, device=device) * (T + 1)
            ones = torch.ones(1, dtype=torch.int64, device=device)
        for start in range(0, rows, chunk_rows):
            chunk = x2d[start : start + chunk_rows]
            n = chunk.shape[0]
            v, idx = values[:n], index[:n]
            if absolute:  # neg_bins == 0
                torch.mul(chunk, inv_width, out=v)
                v.abs_()
            else:
                torch.addcmul(offset, chunk, inv_width, out=v)
            idx.copy_(v)  # truncation == floor, v >= 0 up to rounding
            idx.clamp_(0, T)  # T: values on the top edge (folded below)
            if channels == 1:
                flat += torch.bincount(idx.view(-1), minlength=T + 1)
            else:
                idx.add_(channel_start)
                flat.index_add_(0, idx.view(-1), ones.expand(idx.numel()))
        flat = flat.view(channels, T + 1)
        self.counts += flat[:, :T]
        self.counts[:, T - 1] += flat[:, T]


def _chunks(total: int, per_item: int):
    """Split ``range(total)`` into slices whose ``len * per_item`` stays near the search budget."""
    step = max(1, _SEARCH_CHUNK_ELEMENTS // max(1, per_item))
    for start in range(0, total, step):
        yield slice(start, min(total, start + step))


def _quantile_from_histogram(
    counts: torch.Tensor, edges: torch.Tensor, q: float
) -> torch.Tensor:
    """Per-row ``q``-quantile (``0 <= q <= 1``) assuming values uniform inside each bin."""
    cum = counts.cumsum(dim=1)
    total = cum[:, -1:]
    target = q * total
    idx = torch.searchsorted(cum, target).clamp_(max=counts.shape[1] - 1)
    before = torch.where(idx > 0, cum.gather(1, (idx - 1).clamp(min=0)), torch.zeros_like(target))
    in_bin = counts.gather(1, idx)
    frac = torch.where(in_bin > 0, (target - before) / in_bin.clamp(min=1e-300), torch.zeros_like(target))
    low = edges.gather(1, idx)
    width = edges.gather(1, idx + 1) - low
    return (low + frac.clamp(0.0, 1.0) * width).squeeze(1)


def _quantile_position(counts: torch.Tensor, edges: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Fraction of each row's mass below ``values`` (``[C]``), uniform density inside bins."""
    cum = torch.cat([torch.zeros_like(counts[:, :1]), counts.cumsum(1)], dim=1)
    idx = (torch.searchsorted(edges, values[:, None].to(edges.dtype), right=True) - 1).clamp_(0, counts.shape[1] - 1)
    low, high = edges.gather(1, idx), edges.gather(1, idx + 1)
    frac = ((values[:, None] - low) / (high - low).clamp(min=1e-300)).clamp(0.0, 1.0)
    below = cum.gather(1, idx) + frac * counts.gather(1, idx)
    return (below / cum[:, -1:].clamp(min=1e-300)).squeeze(1)


def _entropy_divergences(hist: torch.Tensor, num_quant_bins: int, start_bin: int) -> torch.Tensor:
    """``KL(P_i || Q_i)`` for every threshold ``i = start_bin..n`` (in bins) of each row of ``hist``.

    ``hist`` is ``[C, n]`` (float64, histogram of ``|x|`` over ``[0, amax]``). For a threshold of
    ``i`` bins, ``P_i = hist[:i]`` with the outliers ``hist[i:].sum()`` added to its last bin;
    ``Q_i`` splits ``hist[:i]`` into ``num_quant_bins`` groups (bin ``j`` in group
    ``floor(j * num_quant_bins / i)``) and spreads each group's mass uniformly over its non-empty
    bins (empty bins stay empty). Both are normalised; ``KL = inf`` when ``P`` has mass where
    ``Q`` has none. Evaluated with prefix sums in ``O(C * (n - start_bin) * num_quant_bins)``
    instead of materialising every ``P_i``/``Q_i``.

    Returns:
        ``[C, n - start_bin + 1]`` float64.
    """
    C, n = hist.shape
    device = hist.device
    zero_col = torch.zeros(C, 1, dtype=hist.dtype, device=device)
    xlogx = torch.where(hist > 0, hist * torch.log(hist.clamp(min=1e-300)), torch.zeros_like(hist))
    cs = torch.cat([zero_col, hist.cumsum(1)], dim=1)
    cs_xlogx = torch.cat([zero_col, xlogx.cumsum(1)], dim=1)
    cs_nonzero = torch.cat([zero_col, (hist > 0).to(hist.dtype).cumsum(1)], dim=1)
    total = cs[:, n:]  # [C, 1]

    thresholds = torch.arange(start_bin, n + 1, device=device)  # i, in bins
    groups = torch.arange(num_quant_bins, device=device)
    # Group g of threshold i holds bins j with g <= j * G / i < g + 1, i.e. [ceil(g i / G), ceil((g+1) i / G)).
    starts = (groups[None, :] * thresholds[:, None] + num_quant_bins - 1) // num_quant_bins
    ends = ((groups[None, :] + 1) * thresholds[:, None] + num_quant_bins - 1) // num_quant_bins
    out = torch.empty(C, thresholds.numel(), dtype=hist.dtype, device=device)
    for sl in _chunks(thresholds.numel(), C * num_quant_bins):
        i = thresholds[sl]
        s_idx, e_idx = starts[sl].reshape(-1), ends[sl].reshape(-1)
        k, g = i.numel(), num_quant_bins
        group_sum = (cs[:, e_idx] - cs[:, s_idx]).view(C, k, g)
        group_nonzero = (cs_nonzero[:, e_idx] - cs_nonzero[:, s_idx]).view(C, k, g)
        outliers = total - cs[:, i]  # [C, k]
        last = hist[:, i - 1]
        p_last = last + outliers
        p_log_p = cs_xlogx[:, i - 1] + torch.where(p_last > 0, p_last * torch.log(p_last.clamp(min=1e-300)), torch.zeros_like(p_last))
        p_group = group_sum.clone()
        p_group[..., -1] += outliers
        mean = group_sum / group_nonzero.clamp(min=1.0)
        p_log_q = torch.where(p_group > 0, p_group * torch.log(mean.clamp(min=1e-300)), torch.zeros_like(p_group)).sum(-1)
        sum_q = cs[:, i]
        safe_total = total.clamp(min=1e-300)
        kl = p_log_p / safe_total - torch.log(safe_total) - p_log_q / safe_total + torch.log(sum_q.clamp(min=1e-300))
        invalid = (outliers > 0) & (last <= 0)
        out[:, sl] = torch.where(invalid, torch.full_like(kl, math.inf), kl)
    return out


def _cumulative_squared_error(
    u: torch.Tensor, scale: torch.Tensor, q_lo: torch.Tensor, q_hi: torch.Tensor
) -> torch.Tensor:
    """``F(u) = integral_{q_lo}^{u} (v - Q(v))^2 dv`` (negative for ``u < q_lo``).

    ``Q`` rounds to multiples of ``scale`` and clamps to ``[q_lo, q_hi]`` (both multiples of
    ``scale``), which is exactly what :func:`hfptq.quant.qparams.quantize` followed by
    ``dequantize`` does. Inside the grid the error is a sawtooth whose square integrates to
    ``scale**3 / 12`` per step; outside it is the distance ``d`` to the clamp value, integrating
    to ``d**3 / 3``. Written with in-place ops: it runs on ``[C, K, M]`` grids.
    """
    inside = torch.maximum(u, q_lo).clamp_(max=q_hi)
    outside = (u - inside).pow_(3).div_(3.0)
    # Sawtooth part, from -s/2: n full periods (s^3/12 each) plus the partial one up to e.
    n = (inside / scale).add_(0.5).floor_()
    e = inside.addcmul_(n, scale, value=-1.0)
    cube = scale**3
    result = n.mul_(cube / 12.0).add_(e.pow_(3).add_(cube / 8.0).div_(3.0))
    # minus the same integral up to q_lo (a multiple of s: n0 = q_lo / s periods, e = 0)
    start = torch.floor(q_lo / scale + 0.5) * (cube / 12.0) + cube / 24.0
    return result.sub_(start).add_(outside)


def _point_squared_error(
    u: torch.Tensor, scale: torch.Tensor, q_lo: torch.Tensor, q_hi: torch.Tensor
) -> torch.Tensor:
    return (u - torch.minimum(torch.maximum(torch.round(u / scale) * scale, q_lo), q_hi)) ** 2


class _HistogramObserver(Observer):
    """Observers that summarise the data by a :class:`_StreamingHistogram`.

    Symmetric observers histogram ``|x|``; asymmetric ones histogram ``x``. The exact running
    min/max are tracked alongside.
    """

    def __init__(self, bins: int = 2048, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bins = _check_int("bins", bins, 16)
        self._reset_state()

    @classmethod
    def _option_names(cls) -> Tuple[str, ...]:
        return super()._option_names() + ("bins",)

    def _reset_state(self) -> None:
        self._hist: Optional[_StreamingHistogram] = None
        self.min_val: Optional[torch.Tensor] = None
        self.max_val: Optional[torch.Tensor] = None

    def _update(self, x2d: torch.Tensor, batch_min: torch.Tensor, batch_max: torch.Tensor) -> None:
        channels = x2d.shape[1]
        if self._hist is None:
            size = channels * 2 * self.bins * 8
            if size > _LARGE_HISTOGRAM_BYTES:
                logger.warning(
                    "%s observer: %d channels x %d bins need %.0f MiB of histograms; pass a smaller "
                    "`bins` (e.g. 256) for per-channel observers",
                    self.name, channels, 2 * self.bins, size / 2**20,
                )
            self._hist = _StreamingHistogram(channels, 2 * self.bins, x2d.device)
            self.min_val, self.max_val = batch_min.clone(), batch_max.clone()
        else:
            self.min_val = torch.minimum(self.min_val, batch_min)
            self.max_val = torch.maximum(self.max_val, batch_max)
        if self.symmetric:
            neg = torch.zeros_like(batch_min)
            pos = torch.maximum(-batch_min, batch_max)
        else:
            neg, pos = torch.clamp(-batch_min, min=0.0), torch.clamp(batch_max, min=0.0)
        self._hist.update(x2d, neg, pos, absolute=self.symmetric)

    # ------------------------------------------------------------------ inspection

    def histogram(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(counts, edges)`` of the streaming histogram (of ``|x|`` when symmetric).

        Shapes ``[T]`` / ``[T + 1]`` per tensor, ``[C, T]`` / ``[C, T + 1]`` per channel, with
        ``T = 2 * bins``; counts are int64, edges float64.
        """
        if self._hist is None:
            raise CalibrationError(f"{self.name} observer has observed no batch yet")
        counts, edges = self._hist.counts.clone(), self._hist.edges()
        if self.granularity == "tensor":
            return counts[0], edges[0]
        return counts, edges

    @property
    def bin_width(self) -> torch.Tensor:
        """Current histogram bin width (``[]`` or ``[C]``, float64); < ``span / (bins - 1)``."""
        if self._hist is None:
            raise CalibrationError(f"{self.name} observer has observed no batch yet")
        width = self._hist.width.clone()
        return width[0] if self.granularity == "tensor" else width

    def _abs_max(self) -> torch.Tensor:
        return torch.maximum(-self.min_val, self.max_val).double()

    def _folded_abs_histogram(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Histogram of ``|x|`` (``[C, T]`` float64 counts, bin width ``[C]``)."""
        hist = self._hist
        counts = hist.counts.double()
        if self.symmetric:
            return counts, hist.width
        T = hist.total_bins
        j = torch.arange(T, device=counts.device)[None, :] - hist.neg_bins[:, None]
        # bin [j w, (j+1) w) with j < 0 holds |x| in ((-j-1) w, -j w]: abs bin -j-1.
        target = torch.where(j >= 0, j, -j - 1).clamp_(0, T - 1)
        folded = torch.zeros_like(counts).scatter_add_(1, target, counts)
        return folded, hist.width

    def _extra_repr(self) -> str:
        return f"bins={self.bins}"


class PercentileObserver(_HistogramObserver):
    """Clip at a percentile of the observed distribution.

    Symmetric: the range is ``[-t, t]`` with ``t`` the ``percentile``-th percentile of ``|x|``.
    Asymmetric: ``[quantile(x, 1 - p), quantile(x, p)]`` with ``p = percentile / 100``. The
    quantiles are read off the streaming histogram (uniform density inside a bin): they fall in
    the same or a neighbouring bin as the exact quantiles of all observed data, i.e. within two
    bin widths (``w < span / (bins - 1)``), per channel too (one histogram per channel).

    Args:
        percentile: In ``(0, 100]``; ``100`` reproduces the min/max range.
        bins: Histogram resolution (see the module docstring).
        **kwargs: See :class:`Observer`.

    Example:
        >>> obs = PercentileObserver(percentile=99.0)
        >>> obs.observe(torch.linspace(-1.0, 1.0, 10001))
        >>> low, high = obs.range()
        >>> abs(float(high) - 0.99) < 2e-3
        True
    """

    name = "percentile"

    def __init__(self, percentile: float = 99.99, bins: int = 2048, **kwargs) -> None:
        super().__init__(bins=bins, **kwargs)
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)):
            raise ConfigTypeError(f"percentile must be a number in (0, 100], got {percentile!r}")
        if not 0.0 < float(percentile) <= 100.0:
            raise ConfigError(
                f"percentile must be in (0, 100] (e.g. 99.99), got {percentile}; it is a "
                "percentage, not a fraction"
            )
        self.percentile = float(percentile)

    @classmethod
    def _option_names(cls) -> Tuple[str, ...]:
        return super()._option_names() + ("percentile",)

    def _extra_repr(self) -> str:
        return f"percentile={self.percentile}, bins={self.bins}"

    def _compute_range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        counts, edges = self._hist.counts.double(), self._hist.edges()
        p = self.percentile / 100.0
        if self.symmetric:
            t = torch.minimum(_quantile_from_histogram(counts, edges, p), self._abs_max())
            return -t, t
        lo = _quantile_from_histogram(counts, edges, 1.0 - p)
        hi = _quantile_from_histogram(counts, edges, p)
        lo = torch.clamp(lo, min=self.min_val.double(), max=self.max_val.double())
        hi = torch.clamp(hi, min=self.min_val.double(), max=self.max_val.double())
        return lo, hi


class EntropyObserver(_HistogramObserver):
    """TensorRT-style entropy (KL-divergence) calibration.

    The histogram of ``|x|`` is resampled onto exactly ``bins`` bins over ``[0, amax]``
    (``amax`` = exact observed ``max |x|``), as in TensorRT's calibrator; thresholds of
    ``i = start_bin..bins`` bins are scored by ``KL(P_i || Q_i)`` where ``P_i`` is the histogram
    clipped at ``i`` bins with the outliers folded into its last bin and ``Q_i`` is ``P_i``
    quantized to ``2**(bits-1)`` levels (128 for int8, i.e. 255/2) and expanded back over the
    non-empty bins. The threshold with the smallest divergence wins (the largest on ties) and the
    range is ``[-t, t]``.

    As in NVIDIA's pytorch-quantization, the first bin's count is replaced by the second's before
    the search (``zero_bin_fix``): exact zeros (ReLU outputs, padding) cost nothing to quantize but
    their spike would otherwise drag the threshold down. The criterion is known to misbehave on
    distributions far from zero (it may clip most of the data): a warning is logged when the
    chosen threshold clips more than 1% of the values.

    Asymmetric observers run the same search on the histogram of ``|x|`` (folded from the
    histogram of ``x``) and clip each tail at that threshold:
    ``[max(min, -t), min(max, t)]``. This keeps the classic, well-understood criterion instead of
    inventing a two-sided KL search; it never widens the range beyond the observed min/max.

    Args:
        bins: Resolution of the resampled histogram searched (TensorRT uses 2048).
        start_bin: Smallest threshold tried, in bins (>= ``2**(bits-1)``; TensorRT uses 128).
        zero_bin_fix: Replace the first bin's count by the second's before the search.
        **kwargs: See :class:`Observer`.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.cat([torch.randn(100_000, generator=g), torch.tensor([50.0, -60.0])])
        >>> obs = EntropyObserver()
        >>> obs.observe(x)
        >>> low, high = obs.range()
        >>> 2.0 < float(high) < 20.0 and float(low) == -float(high)
        True
    """

    name = "entropy"

    def __init__(self, bins: int = 2048, start_bin: int = 128, zero_bin_fix: bool = True, **kwargs) -> None:
        super().__init__(bins=bins, **kwargs)
        self.start_bin = _check_int("start_bin", start_bin, 1)
        if not isinstance(zero_bin_fix, bool):
            raise ConfigTypeError(f"zero_bin_fix must be a bool, got {zero_bin_fix!r}")
        self.zero_bin_fix = zero_bin_fix
        levels = 2 ** (self.bits - 1)
        if self.start_bin < levels:
            raise ConfigError(
                f"start_bin must be >= 2**(bits-1) = {levels} (the number of quantized levels), "
                f"got {self.start_bin}"
            )
        if self.start_bin > self.bins:
            raise ConfigError(f"start_bin ({self.start_bin}) must be <= bins ({self.bins})")

    @classmethod
    def _option_names(cls) -> Tuple[str, ...]:
        return super()._option_names() + ("start_bin", "zero_bin_fix")

    def _extra_repr(self) -> str:
        return f"bins={self.bins}, start_bin={self.start_bin}, zero_bin_fix={self.zero_bin_fix}"

    def _warn_if_clipping_much(self, threshold: torch.Tensor) -> None:
        counts, width = self._folded_abs_histogram()
        edges = torch.arange(counts.shape[1] + 1, device=counts.device, dtype=torch.float64)[None, :] * width[:, None]
        kept = _quantile_position(counts, edges, threshold)
        clipped = float((1.0 - kept).max())
        if clipped > 0.01:
            logger.warning(
                "entropy observer clips %.1f%% of the observed values (|x| > %.4g); the KL criterion "
                "misbehaves on distributions far from zero. Consider observer='mse' or 'percentile'.",
                100 * clipped, float(threshold[int((1.0 - kept).argmax())]),
            )

    def _canonical_abs_histogram(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Histogram of ``|x|`` resampled onto ``bins`` equal bins over ``[0, amax]`` (uniform
        density inside the streaming bins). Returns ``(counts [C, bins], amax [C])``."""
        counts, width = self._folded_abs_histogram()
        amax = self._abs_max()
        C, T = counts.shape
        cum = torch.cat([torch.zeros(C, 1, dtype=counts.dtype, device=counts.device), counts.cumsum(1)], 1)
        k = torch.arange(self.bins + 1, device=counts.device, dtype=torch.float64)
        positions = k[None, :] * (amax / self.bins)[:, None] / torch.where(width > 0, width, torch.ones_like(width))[:, None]
        whole = torch.floor(positions).clamp_(0, T - 1)
        frac = (positions - whole).clamp_(0.0, 1.0)
        whole = whole.long()
        cdf = cum.gather(1, whole) + frac * counts.gather(1, whole)
        cdf[:, -1] = cum[:, -1]  # everything is <= amax
        cdf[:, 0] = 0.0
        # Rounding the CDF gives integer counts (each observation in exactly one bin, as if binned
        # directly) instead of fractional spills that would make near-empty bins non-empty.
        return torch.diff(torch.round(cdf), dim=1).clamp_(min=0.0), amax

    def _compute_range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        hist, amax = self._canonical_abs_histogram()
        if self.zero_bin_fix:
            hist[:, 0] = hist[:, 1]
        levels = 2 ** (self.bits - 1)
        threshold = amax.clone()
        for sl in _chunks(hist.shape[0], (self.bins - self.start_bin + 1) * levels):
            kl = _entropy_divergences(hist[sl], levels, self.start_bin)
            # last argmin: prefer the widest range among equally good ones.
            best = kl.shape[1] - 1 - torch.argmin(torch.flip(kl, dims=[1]), dim=1)
            bins_kept = (best + self.start_bin).double()
            finite = torch.isfinite(kl.gather(1, best[:, None]).squeeze(1))
            t = torch.where(finite, bins_kept * amax[sl] / self.bins, amax[sl])
            threshold[sl] = torch.minimum(t, amax[sl])
        self._warn_if_clipping_much(threshold)
        if self.symmetric:
            return -threshold, threshold
        lo = torch.maximum(self.min_val.double(), -threshold)
        hi = torch.minimum(self.max_val.double(), threshold)
        return lo, hi


class MseObserver(_HistogramObserver):
    """Clipping range that minimises the expected quantization MSE on the observed distribution.

    Candidates are fractions of the observed range: ``[-f amax, f amax]`` when symmetric,
    ``[f_lo min, f_hi max]`` when asymmetric. The search evaluates ``grid`` evenly spaced
    fractions in ``(0, 1]`` and then ``grid + 1`` more within ``1 / grid`` of the best one
    (resolution ``~ 2 / grid**2``); asymmetric observers start from the best common fraction
    ``f_lo = f_hi`` and then refine ``f_hi`` and ``f_lo`` one after the other (one round of
    coordinate descent, each stage keeping the current value as a candidate, so the estimate
    never gets worse).

    Each candidate range is turned into the real ``(scale, zero_point)``
    (:func:`hfptq.quant.qparams.compute_qparams`) and its MSE is computed from the streaming
    histogram in closed form: the squared rounding/clipping error is integrated over every bin
    assuming a uniform density inside it, with the outermost bins trimmed to the exact observed
    min/max. No data is replayed. ``f = 1`` (the min/max range) is always a candidate, and the
    min/max range is kept unless the chosen one is predicted better by more than
    :attr:`MIN_GAIN` (0.1%), a margin above the model's own error; ties go to the wider range.

    Args:
        grid: Number of candidate fractions per search stage (>= 2).
        bins: Histogram resolution (see the module docstring).
        **kwargs: See :class:`Observer`.

    Example:
        One outlier at 30 among 100k standard normal values: clipping at ``t`` costs
        ``(30 - t)**2 / n`` and rounding costs about ``(t / 127)**2 / 12``, minimised near
        ``t = 30 / (1 + n / (12 * 127**2))``:

        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.cat([torch.randn(100_000, generator=g), torch.tensor([30.0])])
        >>> obs = MseObserver(bits=8)
        >>> obs.observe(x)
        >>> low, high = obs.range()
        >>> abs(float(high) - 30.0 / (1 + 100_001 / (12 * 127**2))) < 1.0
        True
    """

    name = "mse"
    #: Relative MSE gain the model must predict before a range narrower than min/max is chosen.
    MIN_GAIN: ClassVar[float] = 1e-3

    def __init__(self, grid: int = 100, bins: int = 2048, **kwargs) -> None:
        super().__init__(bins=bins, **kwargs)
        self.grid = _check_int("grid", grid, 2)

    @classmethod
    def _option_names(cls) -> Tuple[str, ...]:
        return super()._option_names() + ("grid",)

    def _extra_repr(self) -> str:
        return f"grid={self.grid}, bins={self.bins}"

    def _bounds(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The ``f = 1`` range, zero included: ``[-amax, amax]`` or ``[min, max]`` (float64 ``[C]``)."""
        if self.symmetric:
            amax = self._abs_max()
            return -amax, amax
        return torch.clamp(self.min_val.double(), max=0.0), torch.clamp(self.max_val.double(), min=0.0)

    def expected_mse(self, min_val: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
        """Estimated MSE of quantizing all observed data with the range ``[min_val, max_val]``.

        Uses the same histogram model as the search (see the class docstring).

        Args:
            min_val, max_val: Candidate ranges, ``[K]`` per tensor or ``[C, K]`` per channel (a
                ``[K]`` pair is shared by all channels). For symmetric observers only
                ``max(-min_val, max_val)`` matters, as in :func:`~hfptq.quant.qparams.compute_qparams`.

        Returns:
            ``[K]`` or ``[C, K]`` float64.
        """
        if self._hist is None:
            raise CalibrationError(f"{self.name} observer has observed no batch yet")
        C = self._hist.counts.shape[0]
        device = self._hist.counts.device

        def as_ck(v: torch.Tensor) -> torch.Tensor:
            v = torch.as_tensor(v, dtype=torch.float64, device=device)
            if v.dim() == 0:
                v = v.reshape(1)
            return v[None, :].expand(C, -1) if v.dim() == 1 else v

        lo, hi = torch.broadcast_tensors(as_ck(min_val), as_ck(max_val))
        out = self._expected_mse(lo, hi)
        return out[0] if self.granularity == "tensor" else out

    def _expected_mse(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """``[C, K]`` estimated MSE of the ranges ``[lo, hi]`` (``[C, K]`` each)."""
        hist = self._hist
        C, T = hist.counts.shape
        lo, hi = torch.broadcast_tensors(lo, hi)
        K = lo.shape[1]
        counts = hist.counts.double()
        data_lo = torch.zeros_like(self.min_val.double()) if self.symmetric else self.min_val.double()
        data_hi = self._abs_max() if self.symmetric else self.max_val.double()
        # Bin b spans [E_b, E_{b+1}] once trimmed to the data; sharing edges between neighbours,
        # sum_b c_b / w_b * (F(E_{b+1}) - F(E_b)) = sum_i F(E_i) * (d_{i-1} - d_i), d_b = c_b / w_b.
        edges = torch.minimum(torch.maximum(hist.edges(), data_lo[:, None]), data_hi[:, None])
        widths = edges[:, 1:] - edges[:, :-1]
        has_width = widths > 1e-9 * hist.width[:, None]
        density = torch.where(has_width, counts / widths.clamp(min=1e-300), torch.zeros_like(counts))
        zero_col = torch.zeros(C, 1, dtype=torch.float64, device=counts.device)
        weights = torch.cat([zero_col, density], 1) - torch.cat([density, zero_col], 1)  # [C, T+1]
        # Mass in zero-width bins (data concentrated on one edge) is a point mass at that edge.
        point_mass = torch.where(has_width, torch.zeros_like(counts), counts)
        total = counts.sum(1).clamp(min=1.0)
        qmin, qmax = qrange(self.bits, self.symmetric)
        out = torch.empty(C, K, dtype=torch.float64, device=counts.device)
        for sl in _chunks(C, K * (T + 1)):
            scale, zero_point = _qparams_from_range(lo[sl].float(), hi[sl].float(), self.bits, self.symmetric)
            scale = scale.double()[..., None]  # [c, K, 1]
            zp = zero_point.double()[..., None]
            q_lo, q_hi = scale * (qmin - zp), scale * (qmax - zp)
            # Only edges with a non-zero weight contribute (empty regions of the histogram drop out).
            cols = (weights[sl] != 0).any(0).nonzero().squeeze(1)
            F = _cumulative_squared_error(edges[sl][:, None, cols], scale, q_lo, q_hi)
            mse = torch.bmm(F, weights[sl][:, cols, None]).squeeze(-1)
            point_cols = (point_mass[sl] > 0).any(0).nonzero().squeeze(1)
            if point_cols.numel():
                err = _point_squared_error(edges[sl][:, None, point_cols], scale, q_lo, q_hi)
                mse = mse + torch.bmm(err, point_mass[sl][:, point_cols, None]).squeeze(-1)
            out[sl] = mse / total[sl, None]
        return out.clamp_(min=0.0)

    def _best_fraction(
        self,
        make_range: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]],
        current: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """Coarse-then-fine 1-D search over a fraction ``f`` (``[C]``); ``make_range(f [C, K])``
        returns the candidate ``(lo, hi)``. ``current`` (``[C]``) is kept as a candidate."""
        C = self.min_val.shape[0]
        device = self.min_val.device
        step = 1.0 / self.grid
        # Descending: the widest range comes first.
        coarse = torch.linspace(1.0, step, self.grid, dtype=torch.float64, device=device)[None, :].expand(C, -1)
        if current is not None:
            coarse = torch.cat([current[:, None], coarse], dim=1)
        mse = self._expected_mse(*make_range(coarse))
        best = coarse.gather(1, mse.argmin(1, keepdim=True))
        offsets = torch.linspace(step, -step, self.grid + 1, dtype=torch.float64, device=device)
        fine = (best + offsets[None, :]).clamp(min=step * step, max=1.0)
        candidates = torch.cat([coarse, fine], dim=1)
        mse = torch.cat([mse, self._expected_mse(*make_range(fine))], dim=1)
        # Among (numerically) equal MSEs keep the widest range.
        best_mse = mse.min(1, keepdim=True).values
        tied = mse <= best_mse * (1.0 + 1e-12)
        return torch.where(tied, candidates, torch.zeros_like(candidates)).max(1).values

    def _compute_range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        lo_bound, hi_bound = self._bounds()
        f = self._best_fraction(lambda f: (lo_bound[:, None] * f, hi_bound[:, None] * f), None)
        f_lo, f_hi = f, f.clone()
        if not self.symmetric:
            f_hi = self._best_fraction(lambda g: (lo_bound[:, None] * f_lo[:, None], hi_bound[:, None] * g), f_hi)
            f_lo = self._best_fraction(lambda g: (lo_bound[:, None] * g, hi_bound[:, None] * f_hi[:, None]), f_lo)
        # Clip only when the model predicts a clear gain over min/max: the histogram model is
        # accurate to a small fraction of the MSE, not to the last digit.
        lo, hi = lo_bound * f_lo, hi_bound * f_hi
        mse = self._expected_mse(torch.stack([lo, lo_bound], 1), torch.stack([hi, hi_bound], 1))
        keep_minmax = mse[:, 1] <= mse[:, 0] * (1.0 + self.MIN_GAIN)
        return torch.where(keep_minmax, lo_bound, lo), torch.where(keep_minmax, hi_bound, hi)


OBSERVERS: Dict[str, Type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MseObserver,
}


def make_observer(name: str, **kwargs) -> Observer:
    """Build the observer registered as ``name`` (see :data:`OBSERVERS`).

    Args:
        name: ``"minmax"``, ``"percentile"``, ``"entropy"`` or ``"mse"`` (case-insensitive).
        **kwargs: Constructor arguments (``bits``, ``symmetric``, ``granularity``, ``ch_axis`` and
            the observer's own options); an option the observer does not take raises.

    Raises:
        ConfigError: unknown observer name (with a suggestion) or invalid option.

    Example:
        >>> make_observer("percentile", percentile=99.9, bits=8, symmetric=False)
        PercentileObserver(bits=8, symmetric=False, granularity='tensor', percentile=99.9, bins=2048, num_batches=0)
    """
    if not isinstance(name, str):
        raise ConfigTypeError(f"observer must be a string naming an observer, got {type(name).__name__}")
    key = name.strip().lower()
    if key not in OBSERVERS:
        raise ConfigError(
            f"observer={name!r} is not a known observer; valid names: "
            f"{', '.join(repr(n) for n in sorted(OBSERVERS))}.{suggest(key, OBSERVERS)}"
        )
    return OBSERVERS[key](**kwargs)

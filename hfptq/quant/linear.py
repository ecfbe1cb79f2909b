"""Quantized modules: int8/int4 Linear, float-storage Linear, quantized (tied) Embedding.

They are plain ``nn.Module`` subclasses (not ``nn.Linear``) so Transformers' weight initialisation
never touches their integer buffers; each one exposes ``in_features``/``out_features`` like a
Linear. All state lives in persistent buffers whose names are the checkpoint keys:

* ``qweight``: int8 ``[out, in]`` (int4: uint8 ``[out, in/2]``, two values per byte)
* ``weight_scale``: float32 ``[out or 1, n_groups]``; ``weight_zero_point``: int8 (asymmetric only)
* ``input_scale`` / ``input_zero_point``: static activation qparams (scalars)
* ``bias``: float parameter, as in ``nn.Linear``

The float ``weight`` key is deliberately absent: a float model cannot mistake these for its weights.

Speed: every module has a *fast path* (the default) that produces bit-identical outputs to its
reference formulas with fewer passes over memory (see :mod:`hfptq.quant.kernels`):

* W8A8 (``act_mode`` ``"dynamic"``/``"static"``): activation quantization in place, an exact integer
  matmul, rescale written into the int32 accumulator's own memory. Which integer kernel runs on CPU
  is chosen per process from the CPU's features (:mod:`hfptq.quant.backends`): with AVX512-VNNI,
  ``torch._int_mm`` (oneDNN) for prompts and FBGEMM's int8 GEMM for at most
  :data:`~hfptq.quant.kernels.FBGEMM_MAX_ROWS` rows (decode, about twice as fast for one row);
  without VNNI, FBGEMM for every row count (where FBGEMM would saturate 8-bit operands, with the int8
  weights re-gridded to 7 bits per output channel at run time: route ``fbgemm-w7``). FBGEMM keeps a packed copy of each int8 weight it has served
  (made on the first such call; ``HFPTQ_FBGEMM=0`` turns FBGEMM off).
* Weight-only: the weight is dequantized a tile of rows at a time (cache-sized temporaries
  instead of a full float copy of the weight on every call).
* :class:`FloatLinear`: the compute-dtype copy of the FP16 weight (on CPU bfloat16 where the CPU
  has native bfloat16, else float32) is made once and reused while the weight is unchanged;
  :attr:`FloatLinear.cache_compute_weight` turns that off to save memory.

Derived tensors are plain attributes, never buffers: they are not saved, not counted as model
weights, rebuilt lazily after a reload, and dropped when a module is pickled or deep-copied.
``with hfptq.quant.kernels.reference_math(): ...`` runs the reference formulas instead.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..architectures import weight_out_in
from ..errors import CalibrationError
from .rotation import rotate
from .backends import module_route, native_bf16, warn_once
from .kernels import (
    FBGEMM_MAX_ROWS,
    FBGEMM_ROW_ZERO_POINT_MAX_K,
    fbgemm_row_zero_point_max_k,
    cached_cast,
    cached_derived,
    clear_cached,
    dequant_linear_tiled,
    fast_cast,
    fbgemm_fp16_linear,
    fbgemm_fp16_linear_available,
    fbgemm_fp16_pack,
    fbgemm_int8_linear,
    fbgemm_linear_available,
    fbgemm_pack,
    fast_path_enabled,
    int8_matmul,
    packed_bf16_linear,
    packed_bf16_linear_available,
    packed_bf16_weight,
    prepared_input,
    quantize_fast,
    quantize_per_token_fast,
    quantize_rows_for_fbgemm,
    regrid_factors,
    regrid_weight,
    rescale_int32,
    subtract_zero_point_terms,
    tensor_key,
)
from .qparams import (
    dequantize,
    dequantize_weight,
    fake_quantize,
    pack_int4,
    qrange,
    quantize,
    quantize_per_token,
    quantize_weight,
    unpack_int4,
)


#: Rows of an int8 weight summed at a time by :func:`_int8_rowsum` (a 16,384 x 640 block is 40 MiB in int32).
_ROWSUM_ROWS = 16384


def _int8_rowsum(w: torch.Tensor) -> torch.Tensor:
    """``sum_k w[n, k]`` in int32 of an int8 ``[N, K]`` weight, exact, in blocks of :data:`_ROWSUM_ROWS` rows:
    never an ``[N, K]`` int32/float32 copy (for Gemma's 262,144 x 640 LM head that was 640 MiB-2 GiB of
    transient memory, e.g. the float32 copy ``int8_matmul`` makes on CPUs without VNNI)."""
    out = torch.empty(w.shape[0], dtype=torch.int32, device=w.device)
    for start in range(0, w.shape[0], _ROWSUM_ROWS):
        out[start:start + _ROWSUM_ROWS] = w[start:start + _ROWSUM_ROWS].sum(dim=1, dtype=torch.int32)
    return out


def resolve_compute_dtype(setting: str, device: torch.device, storage: torch.dtype) -> torch.dtype:
    """Compute dtype for float-storage and weight-only modules.

    ``"auto"``: on CUDA compute in the storage dtype; on CPU never in float16 (about 200x slower
    than float32 there): bfloat16 where the CPU multiplies it natively (AVX512-BF16 / AMX-BF16,
    see :func:`hfptq.quant.backends.native_bf16`), float32 elsewhere (emulated bfloat16 is 4-8x
    slower than float32). An explicit ``"bfloat16"`` on a CPU without native bfloat16 is honoured,
    with a warning (once).

    Example:
        >>> resolve_compute_dtype("auto", torch.device("cuda"), torch.float16)
        torch.float16
    """
    if setting != "auto":
        dtype = getattr(torch, setting)
        if dtype == torch.bfloat16 and device.type == "cpu" and not native_bf16():
            warn_once("compute-bf16", "compute_dtype='bfloat16' on a CPU without native bfloat16 (no avx512_bf16/"
                      "amx_bf16): oneDNN emulates it, several times slower than float32; compute_dtype='auto' "
                      "uses float32 on this CPU")
        return dtype
    if device.type == "cpu" and storage == torch.float16:
        return torch.bfloat16 if native_bf16() else torch.float32
    return storage


class _DerivedCaches:
    """Derived copies kept in plain attributes (see :func:`~hfptq.quant.kernels.cached_derived`):
    dropped when the module is pickled or deep-copied, and when ``.to()``/``.cuda()``/``.half()``
    replace the tensors they were made from (an entry keeps its source alive, so a stale one would
    hold the old weights, e.g. a CPU copy after ``model.to("cuda")``)."""

    _CACHE_SLOTS: tuple = ()

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        for slot in self._CACHE_SLOTS:
            state.pop(slot, None)
        return state

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        current = {tensor_key(t) for t in (*self._parameters.values(), *self._buffers.values()) if t is not None}
        for slot in self._CACHE_SLOTS:
            entry = self.__dict__.get(slot)
            if entry is not None and entry[0] not in current:
                del self.__dict__[slot]
        return out

    def clear_cache(self) -> None:
        """Free the derived copies (they are rebuilt at the next forward that needs them)."""
        for slot in self._CACHE_SLOTS:
            clear_cached(self, slot)


class QuantLinear(_DerivedCaches, nn.Module):
    """Linear layer with integer weights.

    Execution (``act_mode``):
        * ``"none"``: weight-only; weights dequantized to ``compute_dtype`` (W8A16/W8A32, W4A16).
        * ``"dynamic"``: activations quantized per token at run time, integer matmul, rescale.
        * ``"static"``: activations quantized with the frozen per-tensor ``input_scale``.
        * ``fake=True``: the same quantization simulated in floating point (for study only).

    Example:
        >>> lin = torch.nn.Linear(64, 32)
        >>> q = QuantLinear.from_float(lin, weight_args={"bits": 8, "symmetric": True, "granularity": "channel"},
        ...                            act_args={"mode": "dynamic"})
        >>> q(torch.randn(2, 64)).shape
        torch.Size([2, 32])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        weight_args: Optional[Dict[str, Any]] = None,
        act_args: Optional[Dict[str, Any]] = None,
        fake: bool = False,
        compute_dtype: str = "auto",
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        weight_args = dict(weight_args or {"bits": 8, "symmetric": True, "granularity": "channel"})
        act_args = dict(act_args or {"mode": "none"})
        self.in_features = in_features
        self.out_features = out_features
        self.weight_bits = int(weight_args.get("bits", 8))
        self.weight_symmetric = bool(weight_args.get("symmetric", True))
        self.weight_granularity = weight_args.get("granularity", "channel")
        self.group_size = weight_args.get("group_size")
        self.act_mode = act_args.get("mode", "none")
        self.act_symmetric = bool(act_args.get("symmetric", True))
        self.act_bits = int(act_args.get("bits", 8))
        # block size of the online Hadamard rotation of the input (0: none), see hfptq.quant.rotation;
        # the stored weight is already rotated
        self.input_rotation = int(act_args.get("rotation") or 0)
        self.fake = fake
        self.compute_dtype_setting = compute_dtype
        #: a calibration step (SmoothQuant) scaled this weight: set from the plan entry's ``extra["smoothed"]``;
        #: chooses ``fbgemm-a7`` over ``fbgemm-w7`` where FBGEMM saturates (see hfptq.quant.backends)
        self.smoothed = False
        rows = 1 if self.weight_granularity == "tensor" else out_features
        groups = in_features // self.group_size if self.weight_granularity == "group" else 1
        if self.weight_bits == 4:
            self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        else:
            self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(rows, groups, dtype=torch.float32, device=device))
        if not self.weight_symmetric:
            self.register_buffer("weight_zero_point", torch.empty(rows, groups, dtype=torch.int8, device=device))
        else:
            self.weight_zero_point = None
        if self.act_mode == "static":
            self.register_buffer("input_scale", torch.empty((), dtype=torch.float32, device=device))
            if not self.act_symmetric:
                self.register_buffer("input_zero_point", torch.empty((), dtype=torch.int32, device=device))
            else:
                self.input_zero_point = None
        else:
            self.input_scale = None
            self.input_zero_point = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    _CACHE_SLOTS = ("_hfptq_rowsum", "_hfptq_fbgemm", "_hfptq_fbgemm_chunks", "_hfptq_fbgemm_split", "_hfptq_rowsum_f32",
                    "_hfptq_w7", "_hfptq_w7_chunks", "_hfptq_w7_weight", "_hfptq_w7_rowsum", "_hfptq_w7_factor")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        weight_args: Dict[str, Any],
        act_args: Optional[Dict[str, Any]] = None,
        *,
        fake: bool = False,
        compute_dtype: str = "auto",
        weight: Optional[torch.Tensor] = None,
        input_qparams: Optional[tuple] = None,
        weight_qparams: Optional[tuple] = None,
    ) -> "QuantLinear":
        """Quantize a float ``nn.Linear`` (or GPT-2 ``Conv1D``).

        Args:
            weight: an already transformed ``[out, in]`` float weight (e.g. after SmoothQuant or
                GPTQ); defaults to the module's own weight.
            input_qparams: ``(scale, zero_point)`` of static activations.
            weight_qparams: ``(scale, zero_point)`` chosen by an observer/GPTQ.
        """
        if weight is None:
            weight = weight_out_in(module).detach()
        out_features, in_features = weight.shape
        bias = getattr(module, "bias", None)
        q = cls(
            in_features, out_features, bias is not None, weight_args=weight_args, act_args=act_args, fake=fake,
            compute_dtype=compute_dtype, dtype=bias.dtype if bias is not None else None, device=weight.device,
        )
        q.set_weight(weight, weight_qparams)
        if bias is not None:
            q.bias.data.copy_(bias.detach())
        if q.act_mode == "static":
            if input_qparams is None:
                raise CalibrationError(
                    "static activations need input_qparams=(scale, zero_point) measured by calibration: quantize "
                    "through HfPtqConfig(activations='static', calibration=...) so the scales are measured first, "
                    "or use activations='dynamic' (per-token scales computed at run time)")
            q.set_input_qparams(*input_qparams)
        return q

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor, qparams: Optional[tuple] = None) -> None:
        """Quantize and store a float ``[out, in]`` weight."""
        scale, zp = (None, None) if qparams is None else qparams
        q, scale, zp = quantize_weight(
            weight, self.weight_bits, self.weight_symmetric, self.weight_granularity, self.group_size,
            scale=scale, zero_point=zp,
        )
        self.qweight.data = (pack_int4(q) if self.weight_bits == 4 else q).to(self.qweight.device)
        self.weight_scale.data = scale.to(self.weight_scale.device)
        if zp is not None:
            self.weight_zero_point.data = zp.to(self.weight_scale.device)
        self.clear_cache()  # row sums, FBGEMM's packed copy: derived from the old weight

    @torch.no_grad()
    def set_input_qparams(self, scale: torch.Tensor, zero_point: Optional[torch.Tensor] = None) -> None:
        self.input_scale.data = torch.as_tensor(scale, dtype=torch.float32, device=self.weight_scale.device).reshape(())
        if self.input_zero_point is not None:
            zp = torch.as_tensor(0 if zero_point is None else zero_point, device=self.weight_scale.device)
            self.input_zero_point.data = zp.to(torch.int32).reshape(())

    # ------------------------------------------------------------------ helpers
    def int_weight(self) -> torch.Tensor:
        """Integer weight values as int8 ``[out, in]`` (int4 unpacked)."""
        return unpack_int4(self.qweight) if self.weight_bits == 4 else self.qweight

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float ``[out, in]`` weight that the integer weight represents."""
        return dequantize_weight(self.int_weight(), self.weight_scale, self.weight_zero_point, dtype)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if self.compute_dtype_setting == "auto":
            # weight-only on CPU: half inputs compute in bf16 where the CPU has it natively, else fp32
            return resolve_compute_dtype("auto", x.device, torch.float16) if x.dtype == torch.float16 else x.dtype
        return resolve_compute_dtype(self.compute_dtype_setting, x.device, x.dtype)

    def extra_repr(self) -> str:
        gran = self.weight_granularity if self.weight_granularity != "group" else f"group{self.group_size}"
        mode = "fake" if self.fake else "real"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"w=int{self.weight_bits}/{gran}/{'sym' if self.weight_symmetric else 'asym'}, act={self.act_mode}, {mode}"
            + (f", input rotated (Hadamard {self.input_rotation})" if self.input_rotation else "")
        )

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation:
            x = rotate(x, self.input_rotation)
        if self.fake:
            return self._forward_fake(x)
        fast = fast_path_enabled()
        if self.act_mode == "none":
            if fast and x.device.type == "cpu":
                return self._forward_weight_only_fast(x)
            return self._forward_weight_only_reference(x)
        if fast:
            return self._forward_int8_fast(x)
        return self._forward_int8_reference(x)

    def _forward_weight_only_reference(self, x: torch.Tensor) -> torch.Tensor:
        cd = self._compute_dtype(x)
        w = self.dequantized_weight(cd)
        bias = None if self.bias is None else self.bias.to(cd)
        return F.linear(x.to(cd), w, bias).to(x.dtype)

    def _forward_weight_only_fast(self, x: torch.Tensor) -> torch.Tensor:
        """Same dequantized elements and the same ``F.linear``, one cache-sized tile of rows at a time."""
        cd = self._compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(cd)
        y = dequant_linear_tiled(x.to(cd), self.qweight, self.weight_scale, self.weight_zero_point, bias, cd,
                                 bits=self.weight_bits)
        return y.to(x.dtype)

    def _weight_rowsum_for(self, w: torch.Tensor, slot: str = "_hfptq_rowsum") -> torch.Tensor:
        """``sum_k W[n, k]`` in int32 of the int8 weight ``w`` (``qweight``, or in ``slot="_hfptq_w7_rowsum"``
        its 7-bit re-gridding), kept while ``qweight`` is unchanged."""
        return cached_derived(self, slot, self.qweight, lambda _: _int8_rowsum(w))

    def regridded_weight(self) -> tuple:
        """``(q7 int8 [out, in], scale float32 [out, 1])``: the symmetric int8 weight re-gridded to 7 bits per
        output channel (:func:`~hfptq.quant.kernels.regrid_weight`; ``scale = weight_scale * factor``), what
        the ``fbgemm-w7`` route computes with. A runtime derivative: ``qweight``/``weight_scale`` and saved
        checkpoints keep the 8-bit values. Kept (as large as ``qweight``) while ``qweight`` is unchanged;
        the fast path itself keeps only FBGEMM's packed copy.

        Example:
            >>> q = QuantLinear.from_float(torch.nn.Linear(16, 4), {"bits": 8, "symmetric": True,
            ...                            "granularity": "channel"}, {"mode": "dynamic"})
            >>> q7, scale7 = q.regridded_weight()
            >>> int(q7.abs().max()) <= 64
            True
        """
        factor = self._w7_factor()
        q7 = cached_derived(self, "_hfptq_w7_weight", self.qweight, lambda w: regrid_weight(w, factor=factor)[0])
        return q7, self.weight_scale * factor

    def _w7_factor(self) -> torch.Tensor:
        """The row factors of :func:`~hfptq.quant.kernels.regrid_factors`, chosen once per ``qweight`` (every
        7-bit path of this module, fast or reference, uses these very factors)."""
        return cached_derived(self, "_hfptq_w7_factor", self.qweight, regrid_factors)

    def _w7_state(self) -> dict:
        """What the ``fbgemm-w7`` fast path needs, without keeping the re-gridded weight itself: the row
        factors, FBGEMM's pack of the 7-bit weight, its int32 row sums (made once from one re-gridding)."""
        def make(w: torch.Tensor) -> dict:
            factor = self._w7_factor()
            q7 = regrid_weight(w, factor=factor)[0]
            return {"factor": factor, "packed": fbgemm_pack(q7), "rowsum": _int8_rowsum(q7)}
        return cached_derived(self, "_hfptq_w7", self.qweight, make)

    def _quantize_input(self, x2: torch.Tensor):
        if self.act_mode == "dynamic":
            return quantize_per_token(x2, self.act_bits, self.act_symmetric)
        zp = self.input_zero_point
        xq = quantize(x2, self.input_scale, zp, self.act_bits, self.act_symmetric)
        return xq, self.input_scale, zp

    def _forward_int8_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The reference W8A8 math, one plain tensor expression per step (with the 7-bit re-gridded weight
        inside :func:`~hfptq.quant.backends.route_reference_math` for modules on route ``fbgemm-w7``)."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xq, xs, xz = self._quantize_input(x2)
        w7 = self.__dict__.get("_hfptq_reference_w7", False)
        w, w_scale = self.regridded_weight() if w7 else (self.int_weight(), self.weight_scale)
        acc = int8_matmul(xq, w)
        if xz is not None:
            # (x_q - z) @ W^T = x_q @ W^T - z * rowsum(W)
            rowsum = self._weight_rowsum_for(w, "_hfptq_w7_rowsum" if w7 else "_hfptq_rowsum")
            acc = acc - xz.to(torch.int32).reshape(-1, 1) * rowsum.reshape(1, -1)
        if self.weight_zero_point is not None:
            # x_q @ (W - z_w)^T = x_q @ W^T - rowsum(x_q) * z_w (+ K * z_x * z_w when x_q was shifted above)
            zw = self.weight_zero_point.to(torch.int32).reshape(1, -1)
            acc = acc - xq.to(torch.int32).sum(dim=1, keepdim=True) * zw
            if xz is not None:
                acc = acc + xz.to(torch.int32).reshape(-1, 1) * zw * xq.shape[-1]
        y = acc.to(torch.float32) * (xs.reshape(-1, 1) if xs.dim() else xs) * w_scale.reshape(1, -1)
        if self.bias is not None:
            y = y + self.bias.to(torch.float32)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _forward_int8_fast(self, x: torch.Tensor) -> torch.Tensor:
        """Bit-identical to :meth:`_forward_int8_reference` with fewer passes and temporaries, on the
        route :mod:`hfptq.quant.backends` chose for this CPU. On CPUs without VNNI whose FBGEMM saturates
        8-bit operands, route ``fbgemm-w7`` is bit-identical to the reference math with the 7-bit
        re-gridded weight (:meth:`regridded_weight`) and ``fbgemm-a7`` to it with 7-bit activations
        (``act_bits=7``): :func:`~hfptq.quant.backends.route_reference_math` runs those references."""
        shape = x.shape
        k = shape[-1]
        rows = x.numel() // k if k else 0
        route = None
        if x.device.type == "cpu" and rows > 0:
            route = module_route(self).name
            if route == "onednn-vnni":
                if (rows <= FBGEMM_MAX_ROWS and self.weight_bits == 8 and self.weight_zero_point is None
                        and fbgemm_linear_available()
                        and (rows == 1 or self.act_mode == "static" or self.act_symmetric
                             or k <= FBGEMM_ROW_ZERO_POINT_MAX_K)):
                    y = self._forward_int8_fbgemm(x, self.act_bits)
                    if y is not None:
                        return y
            elif route in ("fbgemm", "fbgemm-split", "fbgemm-a7", "fbgemm-w7"):
                y = self._forward_int8_fbgemm(x, min(self.act_bits, 7) if route == "fbgemm-a7" else self.act_bits,
                                              split=route == "fbgemm-split", w7=route == "fbgemm-w7")
                if y is not None:
                    return y
        if self.act_mode == "dynamic":
            # q/k/v and gate/up receive the same tensor: quantize it once per token, not per module
            bits, sym = self.act_bits, self.act_symmetric
            xq, xs, xz = prepared_input(("per_token", bits, sym), x,
                                        lambda t: quantize_per_token_fast(t.reshape(-1, k), bits, sym))
        else:
            xs, xz = self.input_scale, self.input_zero_point
            xq = quantize_fast(x.reshape(-1, k), xs, xz, self.act_bits, self.act_symmetric)
        w7 = route == "fbgemm-w7"  # (here only for inputs holding NaN or infinity)
        w, w_scale = self.regridded_weight() if w7 else (self.int_weight(), self.weight_scale)
        acc = int8_matmul(xq, w)
        if xz is not None or self.weight_zero_point is not None:
            rowsum = self._weight_rowsum_for(w, "_hfptq_w7_rowsum" if w7 else "_hfptq_rowsum") if xz is not None else None
            acc = subtract_zero_point_terms(acc, xq, xz, w, self.weight_zero_point, rowsum)
        y = rescale_int32(acc, xs, w_scale.reshape(1, -1), self.bias, x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _forward_int8_fbgemm(self, x: torch.Tensor, bits: int, split: bool = False,
                             w7: bool = False) -> Optional[torch.Tensor]:
        """Through FBGEMM with ``bits``-bit activations: the same quantized input and integer sums as the
        reference with ``act_bits=bits`` (see :func:`~hfptq.quant.kernels.fbgemm_int8_linear`), then
        :func:`rescale_int32`'s steps in place. ``None`` when the input holds NaN or infinity (the caller
        takes the general route). Static activations: ``bits`` must be ``act_bits``.

        FBGEMM reads int8 weights about twice as fast as ``torch._int_mm`` for one row (Gemma 3's
        262,144 x 640 LM head: 10 ms vs 18 ms at one thread), at the cost of a packed copy of the
        weight, made on the first call. Several rows of asymmetric activations wider than
        :func:`~hfptq.quant.kernels.fbgemm_row_zero_point_max_k` are summed in chunks of that width
        (exact float32 partial sums, added in float64, one rounding to float32 at the end: the
        reference's ``acc.to(float32)``); those chunks are a second packed copy. ``split``: the
        ``fbgemm-split`` route (:meth:`_fbgemm_split_sums`). ``w7``: the ``fbgemm-w7`` route, the weight
        re-gridded to 7 bits (:meth:`regridded_weight`; FBGEMM's pack of it is kept instead of the 8-bit one).
        """
        shape = x.shape
        k = shape[-1]
        x2 = x.reshape(-1, k)
        if self.act_mode == "dynamic":
            sym = self.act_symmetric
            prepared = prepared_input(("fbgemm", bits, sym), x,
                                      lambda t: quantize_rows_for_fbgemm(t.reshape(-1, k), bits, sym))
            if prepared is None:  # NaN or infinity in the input: the general route
                return None
            xs_shift, z, xs, row_zero_points = prepared
        else:
            xs, xz = self.input_scale, self.input_zero_point
            xs_shift = quantize_fast(x2, xs, xz, bits, self.act_symmetric).to(torch.float32)
            z, row_zero_points = 1 << (bits - 1), None
            if xz is not None:
                z0 = int(xz.item())
                xs_shift.sub_(z0)
                z += z0
        if w7:
            state = self._w7_state()
            w_scale = self.weight_scale * state["factor"]
        else:
            w_scale = self.weight_scale
        if split:
            acc = self._fbgemm_split_sums(xs_shift, z, row_zero_points)
            return rescale_int32(acc, xs, w_scale.reshape(1, -1), self.bias, x.dtype).reshape(
                *shape[:-1], self.out_features)
        width = fbgemm_row_zero_point_max_k(bits, 7 if w7 else 8)
        if row_zero_points is not None and k > width:
            y = self._fbgemm_chunked(xs_shift, z, width, row_zero_points, w7)
            return self._rescale_fbgemm(y, xs, x, shape, w_scale)
        packed = state["packed"] if w7 else cached_derived(self, "_hfptq_fbgemm", self.qweight, fbgemm_pack)
        y = fbgemm_int8_linear(xs_shift, z, packed)
        if row_zero_points is not None:
            # float(sum x_q w) - z * rowsum(W): integers <= 2**24 in magnitude (K <= width), so the one
            # rounding is that of the reference's float(acc - z * rowsum)
            if w7:
                rowsum = state["rowsum"].to(torch.float32)
            else:
                rowsum = cached_derived(self, "_hfptq_rowsum_f32", self.qweight,
                                        lambda w: self._weight_rowsum_for(w).to(torch.float32))
            y.addr_(row_zero_points.reshape(-1), rowsum, alpha=-1)
        return self._rescale_fbgemm(y, xs, x, shape, w_scale)

    def _fbgemm_column_packs(self, slot: str, width: int, w7: bool = False) -> list:
        """FBGEMM packs of ``qweight``'s (``w7``: its 7-bit re-gridding's) chunks of ``width`` input columns,
        kept in ``slot`` per width while ``qweight`` is unchanged (the width depends on the route's
        activation bits, which may change)."""
        by_width = cached_derived(self, slot, self.qweight, lambda w: {})
        if width not in by_width:
            w = regrid_weight(self.qweight, factor=self._w7_factor())[0] if w7 else self.qweight
            by_width[width] = [fbgemm_pack(w[:, i:i + width]) for i in range(0, w.shape[1], width)]
        return by_width[width]

    def _fbgemm_chunked(self, xs_shift: torch.Tensor, z: int, width: int, row_zero_points: torch.Tensor,
                        w7: bool = False) -> torch.Tensor:
        """``float32(sum_k x_q W - z * rowsum(W))`` for several rows and inputs wider than ``width``: each
        chunk's FBGEMM sum is an exact float32 integer (``<= 2**24``), float64 adds them and the zero-point
        term exactly, and the one conversion to float32 rounds the exact integer as the reference does."""
        k = xs_shift.shape[-1]
        packs = self._fbgemm_column_packs("_hfptq_w7_chunks" if w7 else "_hfptq_fbgemm_chunks", width, w7)
        y = None
        for i, packed in zip(range(0, k, width), packs):
            part = fbgemm_int8_linear(xs_shift[:, i:i + width].contiguous(), z, packed).to(torch.float64)
            y = part if y is None else y.add_(part)
        rowsum = (self._w7_state()["rowsum"] if w7 else self._weight_rowsum_for(self.qweight)).to(torch.float64)
        y.addr_(row_zero_points.reshape(-1).to(torch.float64), rowsum, alpha=-1)
        return y.to(torch.float32)

    def _fbgemm_split_sums(self, xs_shift: torch.Tensor, z: int, row_zero_points: Optional[torch.Tensor]) -> torch.Tensor:
        """Exact int32 ``sum_k (x_q - z_row) W`` of 8-bit activations from FBGEMM on a CPU whose FBGEMM adds
        pairs of products in saturating 16-bit arithmetic (no VNNI): the ``fbgemm-split`` route.

        FBGEMM's uint8 input ``u = x_shifted + zero_point`` (0..255) is split into ``h = floor(u / 2)``
        (0..127) and ``l = u - 2 h`` (0 or 1). Neither can saturate a pair (``2 * 127 * 128 < 2**15``),
        so FBGEMM returns ``H = sum h W`` and ``L = sum l W`` exactly; ``H`` is taken over chunks of
        1,024 inputs so that each float32 result is an exact integer (``<= 1024 * 127 * 128 < 2**24``).
        Then, in int32: ``2 H + L - (zero_point + z_row) * rowsum(W)``, the reference's integers.
        Two GEMM passes instead of one: the price of 8-bit exactness without VNNI.
        """
        k = xs_shift.shape[-1]
        width = FBGEMM_ROW_ZERO_POINT_MAX_K
        packs = self._fbgemm_column_packs("_hfptq_fbgemm_split", width)
        u = xs_shift + z
        h = u.mul(0.5).floor_()
        low = u.sub_(h).sub_(h)
        acc = None
        for i, packed in zip(range(0, k, width), packs):
            hs, ls = (h, low) if len(packs) == 1 else (h[:, i:i + width].contiguous(), low[:, i:i + width].contiguous())
            part = fbgemm_int8_linear(hs, 0, packed).to(torch.int32).mul_(2)
            part.add_(fbgemm_int8_linear(ls, 0, packed).to(torch.int32))
            acc = part if acc is None else acc.add_(part)
        zcol = torch.full((acc.shape[0],), int(z), dtype=torch.int32)
        if row_zero_points is not None:
            zcol.add_(row_zero_points.reshape(-1).to(torch.int32))
        return acc.addr_(zcol, self._weight_rowsum_for(self.qweight), alpha=-1)

    def _rescale_fbgemm(self, y: torch.Tensor, xs: torch.Tensor, x: torch.Tensor, shape,
                        w_scale: torch.Tensor) -> torch.Tensor:
        """:func:`rescale_int32`'s steps, in place on FBGEMM's float32 sums ``y``."""
        y.mul_(xs).mul_(w_scale.reshape(1, -1))
        if self.bias is not None:
            y.add_(self.bias if self.bias.dtype == torch.float32 else self.bias.to(torch.float32))
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _forward_fake(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.act_mode == "dynamic":
            xq, xs, xz = quantize_per_token(xf, self.act_bits, self.act_symmetric)
            xf = dequantize(xq, xs, xz)
        elif self.act_mode == "static":
            xf = fake_quantize(xf, self.input_scale, self.input_zero_point, self.act_bits, self.act_symmetric)
        w = self.dequantized_weight(torch.float32)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(xf, w, bias).to(x.dtype)


class FloatLinear(_DerivedCaches, nn.Module):
    """Linear kept in a float *storage* dtype (e.g. FP16) that computes in ``compute_dtype``.

    On CPU, FP16 matmul is about 200x slower than FP32, so ``compute_dtype="auto"`` computes FP16
    storage in bfloat16 on CPUs with native bfloat16 (AVX512-BF16/AMX-BF16) and in float32 on the
    others, where bfloat16 is emulated and 4-8x slower than float32 (and in FP16 on CUDA). The
    output is returned in the input dtype.

    Converting the weight on every call reads and writes the whole matrix each time (for Gemma 3
    270M's attention that conversion alone costs more than the matmul at decode). With
    :attr:`cache_compute_weight` (the default) the compute-dtype copy is made at the first
    forward and reused while the weight is unchanged (in-place writes and reassignment are
    detected). Trade-off: a bfloat16 copy beside the FP16 storage doubles the resident bytes of
    these modules (Gemma 3 270M default plan: +59 MB, 297 -> 356 MB against 1,072 MB in FP32),
    while the bytes read per token stay those of one 16-bit matrix. On CPUs without native
    bfloat16 (float32 compute) the copy is FBGEMM's packed float16 weight instead
    (``fbgemm-fp16``: same bytes as the FP16 weight, float32 products and sums, results within
    :func:`~hfptq.quant.kernels.fp16_linear_error_bound` of ``F.linear`` on the float32 weight,
    measured no slower than a float32 copy); where FBGEMM is missing, a float32 copy, which triples
    the bytes (+118 MB, 297 -> 415 MB). Set ``FloatLinear.cache_compute_weight = False``
    (class-wide) or on one instance to convert per call instead (no copy; slower than FP32 for one
    token). Outputs are bit-identical with and without the bfloat16/float32 copies.

    Example:
        >>> lin = FloatLinear.from_float(torch.nn.Linear(64, 32), torch.float16)
        >>> lin(torch.randn(2, 64)).dtype
        torch.float32
    """

    #: Keep the compute-dtype copy of the weight between calls (see the class docstring).
    cache_compute_weight: bool = True
    _CACHE_SLOTS = ("_hfptq_weight_cache", "_hfptq_bias_cache", "_hfptq_packed_cache", "_hfptq_fp16_packed")

    def uses_fbgemm_fp16(self, x_device: torch.device, compute_dtype: torch.dtype) -> bool:
        """Whether this module computes through FBGEMM's float16-weight GEMM: float16 storage that
        ``compute_dtype="auto"`` computes in float32 on this CPU (no native bfloat16), with the compute copy
        cached, where :func:`~hfptq.quant.kernels.fbgemm_fp16_linear_available`. An explicit
        ``compute_dtype="float32"`` keeps ``F.linear`` on a float32 copy (bit-identical to the reference)."""
        return (compute_dtype == torch.float32 and self.compute_dtype_setting == "auto"
                and self.storage_dtype == torch.float16 and x_device.type == "cpu"
                and self.cache_compute_weight and fbgemm_fp16_linear_available())

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 storage_dtype: torch.dtype = torch.float16, compute_dtype: str = "auto",
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.storage_dtype = storage_dtype
        self.compute_dtype_setting = compute_dtype
        # buffers, not parameters: Transformers takes the model dtype from the first float *parameter*,
        # and FP16 storage must not turn an FP32 model's config.json into dtype=float16.
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=storage_dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=storage_dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_float(cls, module: nn.Module, storage_dtype: torch.dtype, compute_dtype: str = "auto") -> "FloatLinear":
        weight = weight_out_in(module).detach()
        bias = getattr(module, "bias", None)
        out = cls(weight.shape[1], weight.shape[0], bias is not None, storage_dtype=storage_dtype,
                  compute_dtype=compute_dtype, device=weight.device)
        out.weight.data = weight.to(storage_dtype).contiguous()
        if bias is not None:
            out.bias.data = bias.detach().to(storage_dtype)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = resolve_compute_dtype(self.compute_dtype_setting, x.device, self.storage_dtype)
        fast = fast_path_enabled()
        if not fast and not self.__dict__.get("_hfptq_reference_keeps_kernel"):
            bias = None if self.bias is None else self.bias.to(cd)
            return F.linear(x.to(cd), self.weight.to(cd), bias).to(x.dtype)
        w, bias = self.weight, self.bias
        xc = x if x.dtype == cd else prepared_input(("cast", cd), x, lambda t: t.to(cd))
        if self.uses_fbgemm_fp16(x.device, cd):
            # FBGEMM's float16-weight GEMM: the same float32 products as F.linear on the float32 copy, summed in
            # another order (within kernels.fp16_linear_error_bound), at half the copy's bytes and no slower
            packed = cached_derived(self, "_hfptq_fp16_packed", w, fbgemm_fp16_pack)
            k = xc.shape[-1]
            y = fbgemm_fp16_linear(xc.reshape(-1, k), packed).reshape(*xc.shape[:-1], self.out_features)
            if bias is not None:
                y.add_(cached_cast(self, "_hfptq_bias_cache", bias, cd))
            return y if y.dtype == x.dtype else y.to(x.dtype)
        if (cd == torch.bfloat16 and self.cache_compute_weight and x.device.type == "cpu"
                and packed_bf16_linear_available()):
            # oneDNN's prepacked layout: F.linear's numbers (checked by the probe), no reorder per call
            packed = cached_derived(self, "_hfptq_packed_cache", w,
                                    lambda t: packed_bf16_weight(fast_cast(t, torch.bfloat16)))
            bias = None if bias is None else cached_cast(self, "_hfptq_bias_cache", bias, cd)
            y = packed_bf16_linear(xc, packed, bias)
            return y if y.dtype == x.dtype else y.to(x.dtype)
        if cd != w.dtype:
            if self.cache_compute_weight:
                w = cached_cast(self, "_hfptq_weight_cache", w, cd)
                bias = None if bias is None else cached_cast(self, "_hfptq_bias_cache", bias, cd)
            else:
                w = fast_cast(w, cd)
                bias = None if bias is None else fast_cast(bias, cd)
        y = F.linear(xc, w, bias)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"storage={str(self.storage_dtype).replace('torch.', '')}, compute={self.compute_dtype_setting}")


class QuantEmbedding(nn.Module):
    """Embedding lookup from integer rows (per-row scales), optionally sharing a tied LM head's storage.

    With ``tied_to`` set, the integer table is the LM head's ``qweight`` (one row per token, scale
    per row), so the 4x saving of the tied matrix counts once and nothing is stored twice.
    ``embed_scale`` reproduces scaled embeddings (Gemma multiplies by ``sqrt(hidden_size)``).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, weight_args: Optional[Dict[str, Any]] = None,
                 padding_idx: Optional[int] = None, embed_scale: Optional[float] = None,
                 output_dtype: torch.dtype = torch.float32, tied_to: Optional[QuantLinear] = None,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.embed_scale = embed_scale
        self.output_dtype = output_dtype
        if tied_to is not None:
            # plain attribute, not a submodule: the storage belongs to the LM head
            object.__setattr__(self, "_source", tied_to)
        else:
            source = QuantLinear(embedding_dim, num_embeddings, False, weight_args=weight_args,
                                 act_args={"mode": "none"}, device=device)
            self.table = source  # registered: the buffers are saved under <name>.table.*
            object.__setattr__(self, "_source", source)

    @property
    def source(self) -> QuantLinear:
        return self._source

    def _apply(self, fn, *args, **kwargs):
        # model.to(torch.bfloat16) must change what the lookup returns, as it does for nn.Embedding: a
        # tied embedding owns no float tensor for Module._apply to cast, so the cast is read off a probe.
        # (Without it the model kept float32 embeddings after .to(bfloat16) while a reload of its
        # checkpoint built bfloat16 ones: the reload was not bit-exact.)
        out = super()._apply(fn, *args, **kwargs)
        probe = fn(torch.empty(0, dtype=self.output_dtype))
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self.output_dtype = probe.dtype
        return out

    def tie_to(self, lm_head: QuantLinear) -> None:
        object.__setattr__(self, "_source", lm_head)

    @classmethod
    def from_float(cls, module: nn.Embedding, weight_args: Dict[str, Any], *, tied_to: Optional[QuantLinear] = None,
                   embed_scale: Optional[float] = None) -> "QuantEmbedding":
        out = cls(module.num_embeddings, module.embedding_dim, weight_args=weight_args,
                  padding_idx=module.padding_idx, embed_scale=embed_scale, output_dtype=module.weight.dtype,
                  tied_to=tied_to, device=module.weight.device)
        if tied_to is None:
            out.table.set_weight(module.weight.detach())
        return out

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        src = self._source
        q = F.embedding(input_ids, src.qweight)
        if src.weight_bits == 4:
            q = unpack_int4(q)
        scale = src.weight_scale
        rows = scale.shape[0]
        idx = input_ids if rows > 1 else torch.zeros_like(input_ids)
        s = F.embedding(idx, scale)  # [..., n_groups]
        x = q.float().reshape(*q.shape[:-1], s.shape[-1], -1)
        if src.weight_zero_point is not None:
            z = F.embedding(idx, src.weight_zero_point.to(torch.int32)).float()
            x = x - z.unsqueeze(-1)
        out = (x * s.unsqueeze(-1)).reshape(*input_ids.shape, self.embedding_dim).to(self.output_dtype)
        if self.embed_scale is not None:
            out = out * torch.tensor(self.embed_scale, dtype=self.output_dtype, device=out.device)
        return out

    def extra_repr(self) -> str:
        tied = "tied to LM head" if not hasattr(self, "table") else "own table"
        return f"{self.num_embeddings}, {self.embedding_dim}, int{self._source.weight_bits}, {tied}"

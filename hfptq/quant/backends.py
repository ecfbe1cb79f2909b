"""Which kernels the quantized modules run on this machine, and why (backend dispatch by capability).

The fastest exact route for an int8 x int8 matmul, or for a module kept in FP16 storage, depends on
what the CPU does natively. hfptq decides once per process from capability facts, never from timing
(so the choice, and the tests, do not depend on how busy the machine is):

* **CPU features**: the ``flags`` line of ``/proc/cpuinfo`` and torch's
  ``torch.backends.cpu.get_cpu_capability()``; ``HFPTQ_CPU_FEATURES`` replaces both (for tests and
  to emulate another CPU class, e.g. ``HFPTQ_CPU_FEATURES=avx2``).
* **W8A8 route** (int8 weights x int8 activations, CPU), first that applies:

  ======================  =========================================================================
  ``onednn-vnni``         CPU with AVX512-VNNI: ``torch._int_mm`` (oneDNN's VNNI int8 GEMM) for
                          prompts, FBGEMM for 1-32 rows (decode). Exact: the reference integers.
  ``fbgemm``              no AVX512-VNNI, but FBGEMM's int8 GEMM gives the exact sums here (a probe
                          checks it, extreme operands included): FBGEMM for every row count. Exact.
  ``fbgemm-w7``           no AVX512-VNNI and FBGEMM adds pairs of 8-bit products in saturating 16-bit
                          arithmetic (AVX2 ``vpmaddubsw``): activations stay 8-bit (dynamic or static)
                          and the symmetric int8 weights are **re-gridded to 7 bits per output
                          channel** (:func:`~hfptq.quant.kernels.regrid_weight`: ``[-64, 63]`` times a
                          per-row factor, the row's full range on the 7-bit grid), which cannot saturate
                          (``2 * 255 * 64 < 2**15``), so FBGEMM's sums are exact. A runtime derivative:
                          ``qweight``/``weight_scale`` and saved checkpoints stay 8-bit. The outputs are
                          exactly the reference math *with the re-gridded weights* (rows whose int8
                          values fit 7 bits are unchanged); they differ from the 8-bit reference by
                          the coarser weight grid (README *Speed* gives the measured perplexity).
                          Logged once.
  ``fbgemm-a7``           (forced, where only 7-bit activations are exact, or, on ``fbgemm-w7`` CPUs,
                          for dynamic modules whose weights SmoothQuant scaled: it moved the activation
                          outliers into them, so 7-bit weights cost more there) the same CPUs with the
                          8-bit weights: dynamic activations are quantized to **7 bits** (as
                          ``reduce_range`` does in torch.ao). Exactly the reference math *with 7-bit
                          activations*; measured less accurate than ``fbgemm-w7`` for modules SmoothQuant did not scale.
  ``fbgemm-split``        (only when forced) the 8-bit reference's integers on such a CPU: FBGEMM's
                          uint8 input split into a 7-bit half and a low bit, two passes, combined in
                          int32. Exact, but measured at or above FP32's time (two GEMMs plus the
                          split), so it is never chosen automatically.
  ``float-exact``         nothing above applies: the integer matmul runs as a float32 (float64 for
                          inputs wider than 1,023) matmul of the integer values, exact but about as
                          slow as the float module, or slower. A warning says so once per process.
  ======================  =========================================================================

  ``torch._int_mm`` is used on CPU only with AVX512-VNNI: without it torch runs a scalar loop
  (measured 1,154 ms for a ``[512 x 640] x [640 x 2048]`` product on an AVX2-only EPYC, where
  float32 takes 18 ms). Asymmetric or 4-bit weights take ``float-exact`` under every FBGEMM route;
  static activations also under ``fbgemm-a7`` (their calibrated 8-bit grid is kept).
* **FP16-stored modules** (``compute_dtype="auto"``): bfloat16 only where the CPU multiplies it
  natively (``avx512_bf16`` or ``amx_bf16``; oneDNN's prepacked bfloat16 copy, ``bf16-prepacked``),
  else float32 — emulated bfloat16 is 4-8x slower than float32. In float32 they run
  ``fbgemm-fp16``: FBGEMM's float16-weight GEMM on a packed float16 copy (as many bytes as the
  FP16 weight, where a float32 copy took twice that), float32 products and sums: the float32
  results of ``F.linear`` up to summation order (bound:
  :func:`~hfptq.quant.kernels.fp16_linear_error_bound`), measured no slower than the float32 copy
  (README *Speed*). Without FBGEMM, a cached float32 copy (see
  :class:`~hfptq.quant.linear.FloatLinear`).

Forcing, for tests and comparisons: ``HFPTQ_W8A8_BACKEND=<route>`` or :func:`force_backend`.
:func:`describe_model` lists what each module kind of a model runs and why; ``hfptq.summary``
and the quality report print it.

Example:
    >>> from hfptq.quant import backends
    >>> backends.cpu_features().capability in {"DEFAULT", "AVX2", "AVX512", "ZVECTOR", "NEON", "SVE256", "VSX"}
    True
    >>> with backends.force_backend("float-exact"):
    ...     backends.w8a8_backend().name
    'float-exact'
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import warnings
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterator, List, Optional, Tuple

import torch

from ..errors import ConfigError, suggest

logger = logging.getLogger(__name__)

__all__ = [
    "CpuFeatures", "Backend", "W8A8_BACKENDS", "HfPtqPerformanceWarning", "cpu_features", "w8a8_backend",
    "module_backend", "module_route", "route_reference_math", "force_backend", "describe_model", "format_backends", "reset", "native_bf16",
    "cpu_int_mm_fast",
]

#: W8A8 routes, fastest first (see the module docstring).
W8A8_BACKENDS = ("onednn-vnni", "fbgemm", "fbgemm-w7", "fbgemm-split", "fbgemm-a7", "float-exact")

#: Routes that run FBGEMM's int8 GEMM for every row count, and the (activation, weight) bits whose
#: sums its probe must find exact for them.
_FBGEMM_ROUTES = {"fbgemm": (8, 8), "fbgemm-w7": (8, 7), "fbgemm-split": (7, 8), "fbgemm-a7": (7, 8)}

#: Feature sets that ``HFPTQ_CPU_FEATURES`` accepts by class name (plus any /proc/cpuinfo flag).
_CLASSES: Dict[str, Tuple[str, ...]] = {
    "avx2": ("sse4_2", "avx", "avx2", "fma", "f16c"),
    "avx512": ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl"),
}
_CLASSES["avx512-vnni"] = _CLASSES["avx512"] + ("avx512_vnni",)
_CLASSES["avx512-bf16"] = _CLASSES["avx512-vnni"] + ("avx512_bf16",)
_CLASSES["amx"] = _CLASSES["avx512-bf16"] + ("amx_tile", "amx_int8", "amx_bf16")


class HfPtqPerformanceWarning(UserWarning):
    """hfptq found no fast route for some modules on this machine and uses a slower fallback."""


@dataclass(frozen=True)
class CpuFeatures:
    """What the CPU offers, as far as hfptq's routes care.

    Attributes:
        flags: the ``/proc/cpuinfo`` flags (or those named by ``HFPTQ_CPU_FEATURES``).
        capability: torch's ``get_cpu_capability()`` (``AVX512``, ``AVX2``, ...), or the class the
            override implies.
        source: ``"detected"`` or ``"HFPTQ_CPU_FEATURES=..."``.
        machine: ``platform.machine()``.
    """

    flags: FrozenSet[str]
    capability: str
    source: str
    machine: str

    @property
    def avx512_vnni(self) -> bool:
        """AVX512-VNNI: what ``torch._int_mm`` needs on CPU to run oneDNN's int8 GEMM."""
        return "avx512_vnni" in self.flags

    @property
    def native_bf16(self) -> bool:
        """Native bfloat16 dot products (AVX512-BF16 or AMX-BF16)."""
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags  # per forward call: no set built

    def describe(self) -> str:
        """One line: capability and the features that matter here."""
        keys = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16",
                            "asimddp", "i8mm", "bf16") if f in self.flags]
        src = "" if self.source == "detected" else f" ({self.source})"
        return f"{self.machine} {self.capability}: {' '.join(keys) or 'no int8/bf16 dot-product features'}{src}"


def _proc_flags() -> FrozenSet[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def _parse_override(text: str) -> FrozenSet[str]:
    flags = set()
    for token in text.replace(",", " ").split():
        token = token.strip().lower()
        flags.update(_CLASSES.get(token, (token,)))
    return frozenset(flags)


@functools.lru_cache(maxsize=None)
def cpu_features() -> CpuFeatures:
    """The CPU's features, read once per process (``HFPTQ_CPU_FEATURES`` overrides them).

    ``HFPTQ_CPU_FEATURES`` takes /proc/cpuinfo flag names and/or the class names ``avx2``,
    ``avx512``, ``avx512-vnni``, ``avx512-bf16``, ``amx`` (comma or space separated), e.g.
    ``HFPTQ_CPU_FEATURES=avx2`` for an AVX2-only CPU. Call :func:`reset` after changing it.

    Example:
        >>> cpu_features().describe()  # doctest: +SKIP
        'x86_64 AVX512: avx2 avx512f avx512_vnni avx_vnni avx512_bf16'
    """
    override = os.environ.get("HFPTQ_CPU_FEATURES", "").strip()
    machine = platform.machine()
    if override:
        flags = _parse_override(override)
        capability = "AVX512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "DEFAULT"
        return CpuFeatures(flags, capability, f"HFPTQ_CPU_FEATURES={override}", machine)
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        capability = "unknown"
    return CpuFeatures(_proc_flags(), capability, "detected", machine)


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (so FP16-stored modules compute in bf16)."""
    return cpu_features().native_bf16


@dataclass(frozen=True)
class Backend:
    """A route and why it was chosen."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


_forced: List[Optional[str]] = [None]
_warned: set = set()
#: bumped whenever the choice may change (reset, force_backend): modules re-resolve their route
_generation = [0]


def _check_name(name: str, field: str) -> str:
    if name not in W8A8_BACKENDS:
        raise ConfigError(f"{field}={name!r} is not a W8A8 backend; use one of {', '.join(W8A8_BACKENDS)}"
                          f" (or unset it for the automatic choice).{suggest(name, W8A8_BACKENDS)}", key=field)
    return name


@contextlib.contextmanager
def force_backend(name: Optional[str]) -> Iterator[None]:
    """Use the W8A8 route ``name`` (one of :data:`W8A8_BACKENDS`) inside the ``with`` block, process-wide.

    ``None`` restores the automatic choice. Forcing a route the machine lacks runs it anyway when
    it can run (``onednn-vnni`` without VNNI is torch's scalar loop: correct, very slow);
    ``fbgemm`` where FBGEMM saturates would give wrong sums, so it is refused with a
    :class:`~hfptq.errors.ConfigError` when the probe says so.

    Example:
        >>> with force_backend("fbgemm-a7"):
        ...     w8a8_backend().name
        'fbgemm-a7'
    """
    if name is not None:
        _check_name(name, "force_backend")
        _check_runnable(name, "force_backend")
    previous = _forced[0]
    _forced[0] = name
    _generation[0] += 1
    try:
        yield
    finally:
        _forced[0] = previous
        _generation[0] += 1


def _check_runnable(name: str, field: str) -> None:
    from . import kernels

    if name in _FBGEMM_ROUTES and not kernels.fbgemm_linear_available(*_FBGEMM_ROUTES[name]):
        a, w = _FBGEMM_ROUTES[name]
        raise ConfigError(
            f"{field}={name!r}: FBGEMM's int8 linear is missing or not exact on this machine for "
            f"{a}-bit activations x {w}-bit weights (probe failed; HFPTQ_FBGEMM=0 also turns it off); "
            f"use {'fbgemm-w7, fbgemm-split or ' if name == 'fbgemm' else ''}float-exact", key=field)


def reset() -> None:
    """Forget the detected features, the chosen route and the warnings already given
    (after changing ``HFPTQ_CPU_FEATURES`` / ``HFPTQ_W8A8_BACKEND`` in a running process)."""
    cpu_features.cache_clear()
    _auto_backend.cache_clear()
    _env_forced.cache_clear()
    _warned.clear()
    _generation[0] += 1


def cpu_int_mm_fast() -> bool:
    """Whether ``torch._int_mm`` may be used on CPU: AVX512-VNNI (oneDNN's kernel), or forced ``onednn-vnni``."""
    forced = _forced_name()
    if forced is not None:
        return forced == "onednn-vnni"
    return cpu_features().avx512_vnni


def _forced_name() -> Optional[str]:
    if _forced[0] is not None:
        return _forced[0]
    return _env_forced()


@functools.lru_cache(maxsize=None)
def _env_forced() -> Optional[str]:
    env = os.environ.get("HFPTQ_W8A8_BACKEND", "").strip()
    if env and env != "auto":
        _check_name(env, "HFPTQ_W8A8_BACKEND")
        _check_runnable(env, "HFPTQ_W8A8_BACKEND")
        return env
    return None


@functools.lru_cache(maxsize=None)
def _auto_backend() -> Backend:
    from . import kernels

    f = cpu_features()
    if f.avx512_vnni and kernels.int_mm_available("cpu"):
        decode = ("FBGEMM for 1-32 rows (exact)" if kernels.fbgemm_linear_available(8)
                  else "torch._int_mm for every row count")
        return Backend("onednn-vnni", f"avx512_vnni: torch._int_mm runs oneDNN's VNNI int8 GEMM; {decode}")
    why = "no avx512_vnni (torch._int_mm would run a scalar loop)"
    if kernels.fbgemm_linear_available(8):
        return Backend("fbgemm", f"{why}; FBGEMM's int8 GEMM gives the exact 8-bit sums here")
    if kernels.fbgemm_linear_available(8, 7):
        return Backend("fbgemm-w7", f"{why}; FBGEMM saturates 16-bit pair sums of 8-bit operands on this CPU, "
                                    "so the int8 weights are re-gridded to 7 bits per output channel at run "
                                    "time (8-bit activations; exact math of the re-gridded weights)")
    if kernels.fbgemm_linear_available(7):
        return Backend("fbgemm-a7", f"{why}; FBGEMM saturates 16-bit pair sums of 8-bit operands on this CPU, "
                                    "so activations are quantized to 7 bits (exact 7-bit math)")
    return Backend("float-exact", f"{why} and no exact FBGEMM int8 GEMM: exact float matmul of the integers")


def w8a8_backend() -> Backend:
    """The process-wide W8A8 route on CPU (forced, or chosen from :func:`cpu_features`).

    Example:
        >>> w8a8_backend().name in W8A8_BACKENDS
        True
    """
    forced = _forced_name()
    if forced is not None:
        src = "force_backend" if _forced[0] is not None else "HFPTQ_W8A8_BACKEND"
        return Backend(forced, f"forced by {src}")
    return _auto_backend()


def warn_once(key: str, message: str) -> None:
    """Issue :class:`HfPtqPerformanceWarning` ``message`` once per process for ``key``."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, HfPtqPerformanceWarning, stacklevel=3)


def _w8a8_module_route(module) -> Backend:
    """The route of one W8A8 QuantLinear on CPU (the process route, or ``float-exact`` where it cannot apply;
    on ``fbgemm-w7`` CPUs, ``fbgemm-a7`` for dynamic modules whose weights SmoothQuant scaled)."""
    from . import kernels

    route = w8a8_backend()
    if route.name in _FBGEMM_ROUTES:
        blockers = []
        if module.weight_bits != 8:
            blockers.append(f"int{module.weight_bits} weights")
        if module.weight_zero_point is not None:
            blockers.append("asymmetric weights")
        if route.name == "fbgemm-a7" and module.act_mode == "static":
            blockers.append("static activations (calibrated 8-bit grid)")
        if blockers:
            return Backend("float-exact", f"{' and '.join(blockers)} cannot take the {route.name} route; "
                                          f"exact float matmul of the integers")
        if (route.name == "fbgemm-w7" and _forced_name() is None and module.act_mode == "dynamic"
                and getattr(module, "smoothed", False) and kernels.fbgemm_linear_available(7, 8)):
            return Backend("fbgemm-a7", "no avx512_vnni and FBGEMM saturates 8-bit x 8-bit pair sums; SmoothQuant "
                                        "moved activation outliers into this module's weights, so 7-bit activations "
                                        "cost less than 7-bit weights here (exact 7-bit math)")
    return route


def module_route(module) -> Backend:
    """The CPU route of a W8A8 :class:`~hfptq.quant.linear.QuantLinear`, resolved once per module (again
    after :func:`reset` / :func:`force_backend`). Warns once per reason when it is ``float-exact``."""
    entry = module.__dict__.get("_hfptq_route")
    if entry is not None and entry[0] == _generation[0]:
        return entry[1]
    route = _w8a8_module_route(module)
    if route.name in ("fbgemm-a7", "fbgemm-w7") and _forced_name() is None and route.name not in _warned:
        _warned.add(route.name)
        what = ("compute with their int8 weights re-gridded to 7 bits per output channel" if route.name == "fbgemm-w7"
                else "quantize activations to 7 bits")
        logger.warning(
            "hfptq: this CPU has no avx512_vnni and its FBGEMM saturates 8-bit int8 products (%s): W8A8 modules "
            "%s (fast; numerics differ from the 8-bit reference, see README *Speed*). "
            "HFPTQ_W8A8_BACKEND=fbgemm-split keeps the 8-bit results at about FP32 speed.", cpu_features().describe(),
            what)
    if route.name == "float-exact" and _forced_name() is None:
        warn_once("float-exact:" + route.reason, (
            f"hfptq: no fast int8 route for some W8A8 modules on this CPU ({cpu_features().describe()}): "
            f"{route.reason}. They run at about float32 speed or slower; a CPU with avx512_vnni, or an FBGEMM "
            f"whose int8 GEMM is exact here, runs them 2-4x faster. HFPTQ_W8A8_BACKEND forces a route."))
    module.__dict__["_hfptq_route"] = (_generation[0], route)
    return route


def module_backend(module, device_type: str = "cpu") -> Backend:
    """What ``module`` (an hfptq quantized module) runs on ``device_type``, and why.

    Example:
        >>> from hfptq.quant.linear import FloatLinear
        >>> module_backend(FloatLinear.from_float(torch.nn.Linear(8, 4), torch.float16)).name  # doctest: +SKIP
        'bf16-prepacked'
    """
    from . import kernels
    from .linear import FloatLinear, QuantLinear, resolve_compute_dtype

    if isinstance(module, FloatLinear):
        storage = module.storage_dtype
        cd = resolve_compute_dtype(module.compute_dtype_setting, torch.device(device_type), storage)
        cd_name = str(cd).replace("torch.", "")
        if device_type != "cpu":
            return Backend(f"{cd_name}", f"{device_type} matmul in {cd_name}")
        auto = module.compute_dtype_setting == "auto"
        if cd == torch.bfloat16:
            packed = module.cache_compute_weight and kernels.packed_bf16_linear_available()
            why = ("native bf16 (avx512_bf16/amx_bf16)" if auto else "compute_dtype=bfloat16")
            return Backend("bf16-prepacked" if packed else "bf16", f"{why}; "
                           + ("oneDNN prepacked weight" if packed else "cached bf16 copy of the weight"))
        if cd == storage:
            return Backend(cd_name, f"computes in its storage dtype {cd_name}")
        why = "no native bf16 (avx512_bf16/amx_bf16) on this CPU" if auto else f"compute_dtype={cd_name}"
        if module.uses_fbgemm_fp16(torch.device(device_type), cd):
            return Backend("fbgemm-fp16", f"{why}; FBGEMM's float16-weight GEMM (packed float16 copy, float32 "
                                          "products and sums: F.linear's float32 results up to summation order)")
        copy = "cached" if module.cache_compute_weight else "per-call"
        return Backend(cd_name, f"{why}; {copy} {cd_name} copy of the {str(storage).replace('torch.', '')} weight")
    if isinstance(module, QuantLinear):
        if module.fake:
            return Backend("fake-quant", "float simulation of the quantization (mode='fake')")
        if module.act_mode == "none":
            cd = resolve_compute_dtype(module.compute_dtype_setting, torch.device(device_type), torch.float16)
            cd_name = str(cd).replace("torch.", "")
            return Backend(f"dequant-{cd_name}", f"weight-only: tiles of the weight dequantized to {cd_name} "
                                                 "(float32 for float32 inputs)")
        if device_type != "cpu":
            return Backend("int-mm", f"torch._int_mm on {device_type}")
        return _w8a8_module_route(module)
    return Backend("float", "not quantized by hfptq")


@contextlib.contextmanager
def route_reference_math(model: torch.nn.Module) -> Iterator[None]:
    """:func:`~hfptq.quant.kernels.reference_math` with the operands each module's route really uses: the
    7-bit re-gridded weights (:meth:`~hfptq.quant.linear.QuantLinear.regridded_weight`) for W8A8 modules
    on the ``fbgemm-w7`` route, 7-bit activations for dynamic ones on ``fbgemm-a7``, unchanged elsewhere.
    Inside the block the model computes the reference formulas of what its fast path computes, so the
    two are bit-identical on every route (the plain ``reference_math()`` gives the 8-bit reference,
    which ``fbgemm-w7`` and ``fbgemm-a7`` do not reproduce). The re-gridded weights it makes are
    dropped on exit. FP16-storage modules on ``fbgemm-fp16`` keep running FBGEMM's kernel inside the
    block: no formula reproduces its summation order (it is within
    :func:`~hfptq.quant.kernels.fp16_linear_error_bound` of ``F.linear`` on the float32 weight, which
    ``reference_math()`` alone runs).

    Example:
        >>> with route_reference_math(model):       # doctest: +SKIP
        ...     ref = model(input_ids).logits
        >>> torch.equal(ref, model(input_ids).logits)  # doctest: +SKIP
        True
    """
    from .kernels import reference_math
    from .linear import FloatLinear, QuantLinear

    changed, regridded, kept = [], [], []
    for module in model.modules():
        if isinstance(module, FloatLinear) and module_backend(module, module.weight.device.type).name == "fbgemm-fp16":
            kept.append(module)
            module.__dict__["_hfptq_reference_keeps_kernel"] = True
        if (not isinstance(module, QuantLinear) or module.fake or module.act_mode == "none"
                or module.qweight.device.type != "cpu"):
            continue
        route = module_route(module).name
        if route == "fbgemm-a7" and module.act_mode == "dynamic":
            changed.append((module, module.act_bits))
            module.act_bits = min(module.act_bits, 7)
        elif route == "fbgemm-w7":
            regridded.append(module)
            module.__dict__["_hfptq_reference_w7"] = True
    try:
        with reference_math():
            yield
    finally:
        for module, bits in changed:
            module.act_bits = bits
        for module in kept:
            module.__dict__.pop("_hfptq_reference_keeps_kernel", None)
        for module in regridded:
            module.__dict__.pop("_hfptq_reference_w7", None)
            module.__dict__.pop("_hfptq_w7_weight", None)
            module.__dict__.pop("_hfptq_w7_rowsum", None)


def _kind_label(module) -> str:
    from .linear import FloatLinear, QuantLinear

    if isinstance(module, FloatLinear):
        return f"{str(module.storage_dtype).replace('torch.', '')} storage"
    if isinstance(module, QuantLinear):
        if module.act_mode == "none" or module.fake:
            return f"int{module.weight_bits} weight-only" + (" (fake)" if module.fake else "")
        sym = "sym" if module.act_symmetric else "asym"
        return f"W{module.weight_bits}A{module.act_bits} {module.act_mode} {sym}"
    return type(module).__name__


def describe_model(model: torch.nn.Module) -> List[dict]:
    """One entry per module kind of a quantized model: ``kind``, ``modules`` (count), ``example``
    (a module name), ``backend``, ``reason``; plus the CPU line (:func:`format_backends` prints it).

    Example:
        >>> describe_model(model)  # doctest: +SKIP
        [{'kind': 'W8A8 dynamic asym', 'modules': 55, 'example': 'model.layers.0.mlp.gate_proj',
          'backend': 'onednn-vnni', 'reason': 'avx512_vnni: ...'}, ...]
    """
    from .linear import FloatLinear, QuantLinear

    groups: Dict[Tuple[str, str, str], dict] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (QuantLinear, FloatLinear)):
            continue
        device = next((t.device.type for t in module.buffers()), "cpu")
        backend = module_backend(module, device)
        key = (_kind_label(module), backend.name, backend.reason)
        entry = groups.setdefault(key, {"kind": key[0], "modules": 0, "example": name,
                                        "backend": backend.name, "reason": backend.reason, "device": device})
        entry["modules"] += 1
    return list(groups.values())


def format_backends(model: torch.nn.Module) -> str:
    """Text block: the CPU line, then one line per module kind with its backend and the reason.

    Example:
        >>> print(format_backends(model))  # doctest: +SKIP
        backends on x86_64 AVX512: avx2 avx512f avx512_vnni avx_vnni avx512_bf16
          W8A8 dynamic asym (55 modules): onednn-vnni - avx512_vnni: torch._int_mm runs ...
          float16 storage (72 modules): bf16-prepacked - native bf16 (avx512_bf16/amx_bf16); ...
    """
    lines = [f"backends on {cpu_features().describe()}"]
    for e in describe_model(model):
        lines.append(f"  {e['kind']} ({e['modules']} module{'s' if e['modules'] != 1 else ''}"
                     f"{'' if e['device'] == 'cpu' else ', ' + e['device']}): {e['backend']} - {e['reason']}")
    return "\n".join(lines)

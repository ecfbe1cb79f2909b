"""Export an hfptq-quantized model as a compressed-tensors checkpoint.

compressed-tensors is the on-disk format of llm-compressor: stock Transformers loads it (its
built-in ``compressed-tensors`` quantizer, with the ``compressed-tensors`` package installed),
vLLM and SGLang serve it. This module writes it directly from hfptq's integers and scales: no
requantization, the same integers land on disk.

How a plan maps onto the format
-------------------------------
* Every int8/int4 Linear becomes a member of a *config group* (one group per distinct scheme,
  ``targets`` = the exact module names):

  ==========================================  ======================================================
  hfptq                                        compressed-tensors
  ==========================================  ======================================================
  int8 weights, symmetric, channel/tensor/     ``weights: {num_bits: 8, symmetric: true, strategy:
  group (+ W8A8 activations)                   channel|tensor|group}``, format ``int-quantized``:
                                               ``weight`` I8, ``weight_scale`` F32
  dynamic per-token asymmetric activations     ``input_activations: {strategy: token, dynamic: true,
                                               symmetric: false}``
  static per-tensor asymmetric activations     ``{strategy: tensor, dynamic: false, symmetric:
                                               false}`` + ``input_scale``/``input_zero_point``
  weight-only int8/int4 (symmetric)            format ``pack-quantized``: ``weight_packed`` I32
                                               (dense packing), ``weight_scale``, ``weight_shape``
  ==========================================  ======================================================

* FP16/BF16/FP32-stored and ``skip`` Linears are listed in ``ignore`` and written as float weights.
* SmoothQuant and GPTQ need nothing: they are folded into the stored weights (and norms).
* A quantized embedding that reads a tied LM head's integers is *untied*: it is written as a float
  table (the values hfptq's embedding returns), and ``tie_word_embeddings`` is set to false; a
  warning states the extra bytes.

What the format cannot express exactly
--------------------------------------
* **Refused always** (no flag): the online Hadamard rotation of an input (stock Transformers
  ignores a ``transform_config`` silently: the logits would be wrong), asymmetric *weights*
  (Transformers cannot load the zero-point layout of packed weights; vLLM's int kernels take
  symmetric weights), GPT-2 ``Conv1D`` (compressed-tensors quantizes ``nn.Linear`` only).
* **Refused unless** ``allow_deviation=True``: symmetric activations. compressed-tensors quantizes
  them on ``[-128, 127]`` (dynamic: scale ``amax / 127.5``), hfptq on ``[-127, 127]`` (scale
  ``amax / 127``), so the integers differ. With the flag the checkpoint is written and reloaded in
  this process, and the measured deviation from the hfptq model's logits is printed.

Each refusal names the module and the nearest exportable setting.

Example:
    >>> model = AutoModelForCausalLM.from_pretrained(path, quantization_config=hfptq.HfPtqConfig())  # doctest: +SKIP
    >>> model.save_pretrained("out/w8a8-ct", format="compressed-tensors")                            # doctest: +SKIP
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import CheckpointError

logger = logging.getLogger(__name__)

#: The value of ``save_pretrained(format=...)`` / recipe ``output.format`` that selects this export.
CT_FORMAT = "compressed-tensors"
#: Engines that load a compressed-tensors checkpoint, as written in the model card.
ENGINES = ("Transformers (with `pip install compressed-tensors`)", "vLLM", "SGLang")


class ExportError(CheckpointError):
    """The model cannot be exported in the requested format (the message names the module and the fix)."""


@dataclass
class ExportResult:
    """What :func:`export_compressed_tensors` wrote.

    Attributes:
        directory: the checkpoint folder.
        quantization_config: the ``quantization_config`` written to ``config.json``.
        untied: embeddings written as float tables (they read a tied LM head's integers in hfptq).
        untie_bytes: bytes the untied tables add to the checkpoint.
        deviations: modules exported although the format cannot express them exactly (only with
            ``allow_deviation=True``), each with the reason.
        measured: the measured deviation of the reloaded checkpoint from the hfptq model
            (``max_abs_logit_diff``, ``argmax_agreement``, ``tokens``), when it was measured.
        engines: engines that can serve the checkpoint.
    """

    directory: Path
    quantization_config: Dict[str, Any]
    untied: List[str] = field(default_factory=list)
    untie_bytes: int = 0
    deviations: List[str] = field(default_factory=list)
    measured: Optional[Dict[str, float]] = None
    engines: List[str] = field(default_factory=lambda: list(ENGINES))
    vllm_notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {"directory": str(self.directory), "format": CT_FORMAT, "untied": self.untied,
                "untie_bytes": self.untie_bytes, "deviations": self.deviations, "measured": self.measured,
                "engines": self.engines, "vllm_notes": self.vllm_notes}


@dataclass
class _ModulePlan:
    name: str
    scheme: Optional[Dict[str, Any]] = None  # compressed-tensors scheme (weights / input_activations / format)
    refused: Optional[str] = None            # never exportable: reason + nearest exportable setting
    inexact: Optional[str] = None            # exportable only with allow_deviation


def _weight_args(entry) -> Dict[str, Any]:
    w = entry.weights
    args: Dict[str, Any] = {"num_bits": int(w["bits"]), "type": "int", "symmetric": bool(w["symmetric"]),
                            "strategy": w["granularity"], "dynamic": False}
    args["group_size"] = int(w["group_size"]) if w["granularity"] == "group" else None
    return args


def _activation_args(acts: Dict[str, Any]) -> Dict[str, Any]:
    dynamic = acts["mode"] == "dynamic"
    return {"num_bits": int(acts.get("bits", 8)), "type": "int", "symmetric": bool(acts.get("symmetric", True)),
            "strategy": "token" if dynamic else "tensor", "dynamic": dynamic, "group_size": None}


def _analyse(model: nn.Module) -> Tuple[List[_ModulePlan], List[str], List[Any]]:
    """Per planned Linear: its compressed-tensors scheme or why not; the ignore list; embeddings to write as float."""
    plan = model.hfptq_plan
    modules: List[_ModulePlan] = []
    ignore: List[str] = []
    float_embeddings: List[Any] = []
    for entry in plan:
        if entry.kind == "embedding":
            if entry.quantized:
                float_embeddings.append(entry)
            continue
        if not entry.quantized:
            ignore.append(entry.name)
            continue
        item = _ModulePlan(entry.name)
        modules.append(item)
        acts = dict(entry.activations or {"mode": "none"})
        where = f"{entry.name} ({entry.describe()})"
        if entry.module_class != "Linear" and entry.module_class.endswith("Conv1D"):
            item.refused = (f"{where}: compressed-tensors quantizes nn.Linear modules only, not {entry.module_class}. "
                            f"Nearest exportable plan: leave it float (a rule {{targets: {entry.name}, precision: fp16}}).")
            continue
        if acts.get("rotation"):
            item.refused = (
                f"{where}: its input is Hadamard-rotated at run time (activations.rotation={acts['rotation']}). "
                "Stock Transformers ignores compressed-tensors' transform_config silently, so the checkpoint would "
                "load and give wrong logits. Nearest exportable plan: the same without activations.rotation "
                "(re-quantize; expect a somewhat larger accuracy drop).")
            continue
        if not entry.weights["symmetric"]:
            sym = dict(entry.weights, symmetric=True)
            item.refused = (
                f"{where}: asymmetric weights (weights.symmetric=false). Transformers' compressed-tensors loader "
                "cannot load their zero points (packed zero-point shape) and vLLM's integer kernels take symmetric "
                f"weights. Nearest exportable plan: weights {sym} (re-quantize).")
            continue
        if entry.weights["bits"] not in (4, 8):
            item.refused = f"{where}: {entry.weights['bits']}-bit weights are not supported by this export."
            continue
        scheme: Dict[str, Any] = {"weights": _weight_args(entry), "input_activations": None,
                                  "output_activations": None}
        if acts["mode"] == "none":
            scheme["format"] = "pack-quantized"
        else:
            if entry.weights["bits"] != 8:
                item.refused = f"{where}: int4 weights with quantized activations have no compressed-tensors scheme."
                continue
            scheme["input_activations"] = _activation_args(acts)
            scheme["format"] = "int-quantized"
            if acts.get("symmetric", True):
                nearest = dict(acts, symmetric=False)
                nearest.pop("observer", None)
                if acts["mode"] == "dynamic":
                    why = ("compressed-tensors quantizes symmetric activations with scale amax/127.5 on [-128, 127], "
                           "hfptq with amax/127 on [-127, 127], so most integers differ")
                else:
                    why = ("compressed-tensors clamps static symmetric activations at -128, hfptq at -127 (inputs "
                           "below -127 x input_scale differ, e.g. every value a percentile/entropy/mse observer clipped)")
                item.inexact = (f"{where}: symmetric activations: {why}. Nearest exact plan: activations "
                                f"{{mode: {acts['mode']}, symmetric: false}} (re-quantize).")
        item.scheme = scheme
    return modules, ignore, float_embeddings


def check_compressed_tensors_exportable(model: nn.Module, *, allow_deviation: bool = False) -> List[str]:
    """Why ``model`` cannot be exported as compressed-tensors (empty list: it can).

    Example:
        >>> problems = hfptq.export.check_compressed_tensors_exportable(model)   # doctest: +SKIP
        >>> print("\\n".join(problems) or "exportable")                          # doctest: +SKIP
    """
    _require_hfptq_model(model)
    return _problems(_analyse(model)[0], allow_deviation)


def _problems(modules: List[_ModulePlan], allow_deviation: bool) -> List[str]:
    """The refusals, then (unless ``allow_deviation``) the inexact modules."""
    return [m.refused for m in modules if m.refused] + ([] if allow_deviation else [m.inexact for m in modules if m.inexact])


def _require_hfptq_model(model: nn.Module) -> None:
    if getattr(model, "hfptq_plan", None) is None:
        raise ExportError(
            "export_compressed_tensors needs a model quantized by hfptq (model.hfptq_plan is missing). Load it with "
            "from_pretrained(..., quantization_config=hfptq.HfPtqConfig()) or reload an hfptq checkpoint first.")


def _scheme_key(scheme: Dict[str, Any]) -> str:
    return json.dumps(scheme, sort_keys=True)


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Dense packing of signed ``bits``-bit integers ``[rows, cols]`` into int32 words, as compressed-tensors'
    ``pack_to_int32`` (value + ``2**(bits-1)``, element ``i`` of a row at bit ``i * bits``, rows padded with 0).

    Example:
        >>> pack_int32(torch.tensor([[-8, 7, 0, 0, 0, 0, 0, 0]], dtype=torch.int8), 4)
        tensor([[-2004318080]], dtype=torch.int32)
    """
    if 32 % bits:
        raise ValueError(f"bits={bits} must divide 32")
    per_word = 32 // bits
    rows, cols = values.shape
    u = values.to(torch.int64) + (1 << (bits - 1))
    pad = (-cols) % per_word
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.reshape(rows, -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (u << shifts).sum(dim=-1)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)
    return words.to(torch.int32).contiguous()


def _quant_linear_tensors(name: str, module: nn.Module, scheme: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one hfptq QuantLinear (same integers, same scales)."""
    out: Dict[str, torch.Tensor] = {}
    q = module.int_weight().detach().cpu()
    scale = module.weight_scale.detach().float().cpu()
    strategy = scheme["weights"]["strategy"]
    scale = scale.reshape(1) if strategy == "tensor" else scale.reshape(module.out_features, -1)
    out[f"{name}.weight_scale"] = scale.contiguous()
    if scheme["format"] == "pack-quantized":
        out[f"{name}.weight_packed"] = pack_int32(q, scheme["weights"]["num_bits"])
        out[f"{name}.weight_shape"] = torch.tensor([module.out_features, module.in_features], dtype=torch.int64)
    else:
        out[f"{name}.weight"] = q.to(torch.int8).contiguous()
    acts = scheme.get("input_activations")
    if acts is not None and not acts["dynamic"]:
        out[f"{name}.input_scale"] = module.input_scale.detach().float().cpu().reshape(1)
        if not acts["symmetric"]:
            out[f"{name}.input_zero_point"] = module.input_zero_point.detach().cpu().to(torch.int8).reshape(1)
    if module.bias is not None:
        out[f"{name}.bias"] = module.bias.detach().cpu().contiguous()
    return out


def _float_embedding(module: nn.Module) -> torch.Tensor:
    """The float table hfptq's quantized embedding reads from (before the model's own ``embed_scale``)."""
    src = module.source
    table = src.dequantized_weight(torch.float32)
    channel = getattr(module, "hfptq_channel_scale", None)
    if channel is not None:  # SmoothQuant on a tied head: the shared integers hold W * s, the embedding 1 / s
        table = table * torch.tensor(channel, dtype=torch.float32).reshape(1, -1)
    return table.to(module.output_dtype).contiguous()


def _build_quantization_config(groups: Dict[str, Tuple[Dict[str, Any], List[str]]], ignore: List[str]) -> Dict[str, Any]:
    config_groups = {}
    formats = set()
    for index, (scheme, targets) in enumerate(groups.values()):
        formats.add(scheme["format"])
        config_groups[f"group_{index}"] = {"targets": targets, **scheme}
    try:
        from compressed_tensors import __version__ as ct_version
    except Exception:  # the package is only needed to load the checkpoint, not to write it
        ct_version = None
    config: Dict[str, Any] = {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "producer": "hfptq",
    }
    if ct_version:
        config["version"] = ct_version
    return config


def _vllm_notes(groups: Dict[str, Tuple[Dict[str, Any], List[str]]], ignore: List[str]) -> List[str]:
    """vLLM fuses q/k/v and gate/up projections: each fused set must share one scheme (or all be ignored)."""
    scheme_of = {}
    for key, (_, targets) in groups.items():
        for t in targets:
            scheme_of[t] = key
    for t in ignore:
        scheme_of[t] = "ignore"
    notes = []
    for fused in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
        prefixes = {n[: -len(fused[0])] for n in scheme_of if n.endswith(fused[0])}
        for prefix in sorted(prefixes):
            kinds = {scheme_of.get(prefix + s) for s in fused}
            if len(kinds) > 1:
                notes.append(f"{prefix}{{{','.join(fused)}}} have different schemes; vLLM fuses them and needs one "
                             "scheme for all of them")
    return notes


def export_compressed_tensors(
    model: nn.Module,
    save_directory: Union[str, os.PathLike],
    *,
    allow_deviation: bool = False,
    max_shard_size: Union[int, str] = "5GB",
    progress: bool = True,
) -> ExportResult:
    """Write ``model`` (quantized by hfptq) as a compressed-tensors checkpoint that loads without hfptq.

    The folder gets ``config.json`` (``quantization_config.quant_method = "compressed-tensors"``),
    safetensors shards, ``generation_config.json`` and a model card naming the engines that serve it.
    Written into a staging folder first and moved in only when complete.

    Args:
        model: an hfptq-quantized model (``model.hfptq_plan``).
        save_directory: the target folder.
        allow_deviation: also export modules the format cannot express exactly (symmetric
            activations); the checkpoint is then reloaded with stock Transformers in this process
            (needs ``compressed-tensors``) and the deviation is printed and returned. Rotated inputs
            and asymmetric weights are refused even with this flag.
        max_shard_size: as in ``save_pretrained``.

    Returns:
        :class:`ExportResult`.

    Raises:
        ExportError: the plan has modules the format cannot express (each named, with the nearest
            exportable setting); nothing is written.

    Example:
        >>> result = hfptq.export_compressed_tensors(model, "out/gemma-w8a8-ct")   # doctest: +SKIP
        >>> # elsewhere, without hfptq: pip install compressed-tensors
        >>> AutoModelForCausalLM.from_pretrained("out/gemma-w8a8-ct")             # doctest: +SKIP
    """
    from ..checkpoint import _commit_staging, _make_staging

    _require_hfptq_model(model)
    modules, ignore, float_embeddings = _analyse(model)
    inexact = [m.inexact for m in modules if m.inexact]
    lines = _problems(modules, allow_deviation)
    if lines:
        hint = ("" if any(m.refused for m in modules) or not inexact else
                "\nOr pass allow_deviation=True (recipe output.allow_deviation: true, CLI --allow-deviation) to export "
                "anyway; the measured deviation is printed.")
        raise ExportError(
            f"This plan cannot be exported as {CT_FORMAT} ({len(lines)} module(s)); nothing was written:\n  - "
            + "\n  - ".join(lines[:8]) + (f"\n  ... and {len(lines) - 8} more" if len(lines) > 8 else "") + hint,
            key="output.format")

    groups: Dict[str, Tuple[Dict[str, Any], List[str]]] = {}
    for item in modules:
        groups.setdefault(_scheme_key(item.scheme), (item.scheme, []))[1].append(item.name)
    quantization_config = _build_quantization_config(groups, ignore)

    # tensors: the model's state dict with each quantized module's hfptq buffers replaced
    state = model.state_dict()
    untied: List[str] = []
    untie_bytes = 0
    replaced: Dict[str, torch.Tensor] = {}
    for item in tqdm(modules, desc="hfptq: exporting compressed-tensors", disable=not progress, leave=False):
        replaced.update(_quant_linear_tensors(item.name, model.get_submodule(item.name), item.scheme))
    for entry in float_embeddings:
        module = model.get_submodule(entry.name)
        table = _float_embedding(module)
        replaced[f"{entry.name}.weight"] = table
        nbytes = table.numel() * table.element_size()
        if entry.tied_to:
            untied.append(entry.name)
            untie_bytes += nbytes
            logger.warning(
                "hfptq: %s shares the int8 rows of %s in hfptq; compressed-tensors cannot tie a float embedding to "
                "a quantized LM head, so it is untied and written as a %s table of %s: the checkpoint grows by "
                "%.1f MiB.", entry.name, entry.tied_to, str(table.dtype).replace("torch.", ""),
                "x".join(map(str, table.shape)), nbytes / 2**20)
        else:
            logger.warning("hfptq: the quantized embedding %s is written as a float table (+%.1f MiB): "
                           "compressed-tensors loaders keep embeddings float.", entry.name, nbytes / 2**20)
    planned = {m.name for m in modules} | {e.name for e in float_embeddings}
    tensors: Dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.rsplit(".", 1)[0] in planned or any(key.startswith(p + ".table.") for p in planned):
            continue
        tensors[key] = tensor.detach().cpu().contiguous()
    tensors.update(replaced)

    target = Path(os.fspath(save_directory)).absolute()
    if target.is_file():
        raise ExportError(f"save_directory {target} is a file; pass a folder.", key="output.dir")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _make_staging(target)
    result = ExportResult(directory=target, quantization_config=quantization_config, untied=untied,
                          untie_bytes=untie_bytes, deviations=inexact if allow_deviation else [],
                          vllm_notes=_vllm_notes(groups, ignore))
    try:
        _write_tensors(staging, tensors, max_shard_size)
        config = copy.deepcopy(model.config)
        config.quantization_config = quantization_config
        if untied:
            config.tie_word_embeddings = False
            text = config.get_text_config() if hasattr(config, "get_text_config") else config
            if text is not config and hasattr(text, "tie_word_embeddings"):
                text.tie_word_embeddings = False
        config.save_pretrained(staging)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and getattr(model, "can_generate", lambda: False)():
            generation_config.save_pretrained(staging)
        _write_card(staging, model, result, target)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, CheckpointError) or not isinstance(exc, Exception):
            raise
        raise ExportError(f"Writing the {CT_FORMAT} checkpoint to {target} failed ({type(exc).__name__}: {exc}); "
                          f"{target} was left unchanged.") from exc
    _commit_staging(staging, target)
    if allow_deviation and inexact:
        result.measured = measure_deviation(model, target)
        print(f"hfptq: exported {len(inexact)} module(s) the format cannot express exactly; reloaded with stock "
              f"Transformers, max |logit diff| {result.measured['max_abs_logit_diff']:.3g}, argmax agreement "
              f"{100 * result.measured['argmax_agreement']:.1f}% over {result.measured['tokens']} tokens.")
    logger.info("hfptq: compressed-tensors checkpoint written to %s", target)
    return result


def _write_tensors(folder: Path, tensors: Dict[str, torch.Tensor], max_shard_size: Union[int, str]) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: tensors[k] for k in keys}, str(folder / filename), metadata={"format": "pt"})
        _umask_mode(folder / filename)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _umask_mode(path: Path) -> None:
    """safetensors writes files 0600; give them the mode any other file here gets (0666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _write_card(folder: Path, model: nn.Module, result: ExportResult, target: Path) -> None:
    from ..card import write_model_card, write_recipe

    try:
        write_recipe(folder, model, name=target.name)
    except Exception:
        logger.warning("hfptq: could not write the recipe next to the export; the checkpoint is saved anyway.",
                       exc_info=True)

    existing = target / "README.md"
    try:
        write_model_card(folder, model, existing=existing if existing.is_file() else None, load_from=target.name,
                         export=result.to_dict())
    except Exception:
        logger.warning("hfptq: could not write the model card; the checkpoint is saved anyway.", exc_info=True)


@torch.no_grad()
def measure_deviation(model: nn.Module, folder: Union[str, os.PathLike], *, batch: int = 2, seq_len: int = 64,
                      seed: int = 0) -> Dict[str, float]:
    """Reload ``folder`` with stock Transformers (compressed-tensors) and compare its logits with ``model``'s
    on seeded random token ids: ``{max_abs_logit_diff, argmax_agreement, tokens}``.

    Raises:
        ExportError: ``compressed-tensors`` is not installed (``pip install compressed-tensors``).
    """
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as exc:
        raise ExportError("Measuring the deviation needs the compressed-tensors package: "
                          "pip install compressed-tensors") from exc
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(os.fspath(folder), dtype=model.dtype)
    reloaded.eval()
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    device = next(model.parameters()).device
    ours = model(input_ids=ids.to(device)).logits.float().cpu()
    theirs = reloaded(input_ids=ids).logits.float()
    del reloaded
    return {"max_abs_logit_diff": float((ours - theirs).abs().max()),
            "argmax_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()),
            "tokens": int(ids.numel())}

"""hfptq checkpoints: what ``save_pretrained`` writes and how ``from_pretrained`` reads it back.

On-disk layout (checkpoint format 1)
------------------------------------
* ``config.json``: the model config plus ``quantization_config`` (the :class:`~hfptq.HfPtqConfig`
  including the resolved per-module ``plan``), written by Transformers.
* ``model*.safetensors`` (+ index when sharded): every tensor under the name of the quantized
  module's persistent buffer: ``<m>.qweight`` (``I8 [out, in]``; int4: ``U8 [out, in/2]``, two
  values per byte), ``<m>.weight_scale`` (``F32``), ``<m>.weight_zero_point`` (``I8``, asymmetric
  only), ``<m>.input_scale`` / ``<m>.input_zero_point`` (static activations), ``<m>.bias``;
  FP16-stored modules keep ``<m>.weight``; a tied embedding stores nothing (it reads the LM head's
  integers).
* A zero-size ``I8`` *tombstone* ``<m>.weight`` for every int8/int4 module, and one zero-size
  tensor named :data:`HINT_KEY`. With ``import hfptq`` they are ignored. Without it, Transformers
  builds the float model, finds ``<m>.weight`` of shape ``[0]`` where ``[out, in]`` is expected
  and **raises** (size mismatch) instead of silently loading a float model with random FFN
  weights; its load report, printed just before the error, lists :data:`HINT_KEY`, whose name
  says to ``pip install hfptq`` and ``import hfptq``.
* ``config.json``'s ``attn_implementation`` is :data:`LOAD_GUARD`: plain Transformers refuses to
  build a model with it whatever the loading flags (``ignore_mismatched_sizes=True`` would silence
  the tombstones); hfptq's quantizer restores the default before the model is built.
* safetensors metadata in every shard: ``hfptq_format`` (format version), ``hfptq_version``,
  ``hfptq_save_id`` (one id per save: shards from two different saves are refused),
  ``hfptq_plan_sha256`` (:func:`plan_hash` of the plan in ``config.json``: a hand-edited plan is
  refused at load and by :func:`verify_checkpoint`) and ``hfptq_crc32`` (CRC-32 of every tensor,
  checked by :func:`verify_checkpoint`).
* ``hfptq_recipe.yaml`` (the config as a recipe, minus the plan) and ``README.md`` (model card);
  see :mod:`hfptq.card`.

Saving is transactional: :func:`save_quantized` (installed as the model's ``save_pretrained``)
writes everything into a hidden staging folder next to the target and only then moves the files
in, ``config.json`` last. A save that fails midway leaves the target as it was and raises
:class:`~hfptq.errors.CheckpointError`.

Reloading validates before any weight is read: each shard's header must parse (a truncated file is
named), carry a supported ``hfptq_format`` and the same ``hfptq_save_id``, and every tensor the
plan needs must exist with the dtype and shape the plan implies; a mismatch names the module and
the key.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .config import QUANT_METHOD, HfPtqConfig
from .errors import CheckpointError, HfPtqError
from .plan import Plan

logger = logging.getLogger(__name__)

#: Version of the tensor layout + metadata written by this hfptq (safetensors ``hfptq_format``).
CHECKPOINT_FORMAT = 1
META_FORMAT = "hfptq_format"
META_VERSION = "hfptq_version"
META_SAVE_ID = "hfptq_save_id"
META_CRC32 = "hfptq_crc32"
META_PLAN_HASH = "hfptq_plan_sha256"
#: Written into a checkpoint's ``config.json`` as ``attn_implementation``. Plain Transformers refuses to build a
#: model with an attention implementation it does not know, whatever the loading flags
#: (``ignore_mismatched_sizes=True``, ``num_labels=...``, ``dtype=...``); hfptq's quantizer puts the default back
#: (:func:`clear_load_guard`) before the model is built. Its name is the instruction the user sees in the error.
LOAD_GUARD = "hfptq_quantized_checkpoint__pip_install_hfptq_and_import_hfptq_before_from_pretrained"
RECIPE_FILENAME = "hfptq_recipe.yaml"
CARD_FILENAME = "README.md"
CONFIG_FILENAME = "config.json"
_STAGING_MARK = ".hfptq-partial-"

_ST_DTYPES = {
    torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64", torch.bool: "BOOL",
}
_ST_FLOATS = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


# ----------------------------------------------------------------------------------------------
# Plan and skeleton
# ----------------------------------------------------------------------------------------------


def stored_plan(config: HfPtqConfig) -> Plan:
    """The :class:`~hfptq.plan.Plan` stored in a checkpoint's ``quantization_config``.

    Raises:
        CheckpointError: the config carries no plan (it was not written by hfptq's ``save_pretrained``).
    """
    if not config.plan:
        raise CheckpointError(
            "This checkpoint's quantization_config has no hfptq plan, so the quantized modules cannot be rebuilt. "
            "It was not written by hfptq's save_pretrained; re-quantize the float model."
        )
    try:
        return Plan.from_dict(config.plan)
    except HfPtqError:
        raise
    except Exception as exc:  # a damaged plan must not surface as a bare KeyError/TypeError
        raise CheckpointError(
            f"config.json: quantization_config.plan cannot be read ({type(exc).__name__}: {exc}). The plan was edited "
            "by hand or is damaged: restore the config.json saved with these weights, or re-quantize."
        ) from exc


def plan_hash(plan_dict: Mapping[str, Any]) -> str:
    """SHA-256 of a plan's canonical JSON: recorded with the weights at save, compared at load and in verify.

    Example:
        >>> plan_hash({"modules": []}) == plan_hash({"modules": []})
        True
    """
    import hashlib

    text = json.dumps(plan_dict, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def clear_load_guard(config: Any) -> Any:
    """Undo :data:`LOAD_GUARD` on a model config loaded from an hfptq checkpoint (the default attention returns)."""
    if getattr(config, "_attn_implementation", None) == LOAD_GUARD:
        config._attn_implementation = None
    return config


def early_checks(config: Any) -> None:
    """Checks of a local checkpoint folder run before Transformers reads its files (see the quantizer's
    ``update_attn_implementation``): a damaged shard index is named instead of a bare JSONDecodeError."""
    folder = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    if not folder or not os.path.isdir(str(folder)):
        return
    for index in Path(str(folder)).glob("*.safetensors.index.json"):
        _read_weight_map(index)


def _read_weight_map(index: Path) -> Dict[str, str]:
    """The ``weight_map`` of a shard index; a damaged index is named (not a bare JSONDecodeError/KeyError)."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
            raise ValueError("no 'weight_map' mapping")
    except (ValueError, OSError) as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(
            f"{index} is damaged ({exc}): it cannot say which shard holds which tensor. Re-save the model, or "
            "re-download this file."
        ) from exc
    return data["weight_map"]


#: A zero-size tensor whose *name* is the instruction: it shows up in the load report Transformers prints
#: (as UNEXPECTED) right above the size-mismatch error when the checkpoint is loaded without ``import hfptq``.
HINT_KEY = "hfptq_checkpoint.run_pip_install_hfptq_then_import_hfptq_before_from_pretrained"


def _tombstone_keys(plan: Plan) -> List[str]:
    """``<m>.weight`` of every int8/int4 module (the float key a plain Transformers load looks for), plus the hint."""
    return [f"{e.name}.weight" for e in plan if e.quantized] + [HINT_KEY]


def prepare_reload(model: nn.Module, config: HfPtqConfig, dtype: Optional[torch.dtype] = None,
                   checkpoint_files: Optional[Sequence[str]] = None) -> None:
    """Before weights load: swap the planned modules for empty quantized ones (on meta) and check the files.

    Args:
        model: the freshly built float model (on the meta device during ``from_pretrained``).
        config: the checkpoint's :class:`~hfptq.HfPtqConfig` (with its ``plan``).
        dtype: the model dtype ``from_pretrained`` settled on.
        checkpoint_files: the safetensors files about to be loaded; their headers are validated
            against the plan (see :func:`check_checkpoint_files`).

    Raises:
        CheckpointError: no plan, the plan names modules the model lacks, or the files do not match.
    """
    from .convert import build_skeleton

    plan = stored_plan(config)
    build_skeleton(model, plan, fake=config.mode == "fake", compute_dtype=config.compute_dtype, dtype=dtype)
    model.hfptq_plan = plan
    _shield_containers_from_init(model, plan)
    if checkpoint_files:
        files = [str(f) for f in checkpoint_files if str(f).endswith(".safetensors")]
        if files:
            expected = expected_tensors(model, plan)
            rename = _checkpoint_key_renamer(model)
            info = check_checkpoint_files(files, expected, rename=rename, allowed=_allowed_keys(model, plan),
                                          plan_digest=plan_hash(config.plan))
            _adopt_saved_float_dtypes(model, info, expected)
    tombstones = _tombstone_keys(plan)
    if tombstones:
        # the tombstones are for float loaders only: not "unexpected" for us
        pattern = "^(?:" + "|".join(re.escape(k) for k in tombstones) + ")$"
        existing = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
        model._keys_to_ignore_on_load_unexpected = existing | {pattern}


def _allowed_keys(model: nn.Module, plan: Plan) -> set:
    """Every tensor name an hfptq checkpoint of ``model`` may hold: the quantized skeleton's state dict
    (planned modules' buffers, everything else's float tensors), the tombstones and the hint."""
    return set(model.state_dict().keys()) | set(_tombstone_keys(plan))


_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


def _adopt_saved_float_dtypes(model: nn.Module, info: "CheckpointInfo",
                              expected: Mapping[str, Tuple[str, torch.dtype, Tuple[int, ...]]]) -> None:
    """Give the skeleton's float tensors (scales, biases, FP16 weights) the dtype they were saved in.

    A model moved with ``model.to(torch.bfloat16)`` after quantizing saves bf16 scales; loading them
    into float32 buffers would change the arithmetic of every forward (logits differ by ~1e-2), so
    the reloaded model holds exactly what was saved and computes exactly what the saved model did.
    """
    tensors = info.model_tensors if info.model_tensors is not None else info.tensors
    for key, (module_name, dtype, _shape) in expected.items():
        found = tensors.get(key)
        if found is None or not dtype.is_floating_point:
            continue
        saved = _TORCH_DTYPES.get(found[1])
        if saved is None or saved == dtype or not saved.is_floating_point:
            continue
        module = model.get_submodule(module_name)
        local = key[len(module_name) + 1:]
        if local in module._buffers and module._buffers[local] is not None:
            module._buffers[local] = module._buffers[local].to(saved)
        elif local in module._parameters and module._parameters[local] is not None:
            old = module._parameters[local]
            module._parameters[local] = nn.Parameter(old.detach().to(saved), requires_grad=old.requires_grad)


def _shield_containers_from_init(model: nn.Module, plan: Plan) -> None:
    """Keep Transformers' ``_init_weights`` away from the containers of hfptq modules on reload.

    After loading, Transformers calls ``_init_weights(module)`` on every module not flagged
    ``_is_hf_initialized``; some architectures reach into children there (GPT-2 re-initialises
    ``mlp.c_proj.weight``), which does not exist on a quantized module. A container that holds no
    tensor of its own has nothing to initialise, so it is flagged; its children are still visited
    one by one. Whole models (``PreTrainedModel``) and modules with own tensors or non-persistent
    buffers are left alone.
    """
    from transformers import PreTrainedModel

    ancestors = set()
    for entry in plan:
        if entry.precision != "skip":
            parts = entry.name.split(".")
            ancestors.update(".".join(parts[:depth]) for depth in range(1, len(parts)))
    for name, module in model.named_modules():
        if name not in ancestors or isinstance(module, PreTrainedModel):
            continue
        if module._parameters or module._buffers or getattr(module, "_non_persistent_buffers_set", None):
            continue
        module._is_hf_initialized = True


def finish_reload(model: nn.Module, config: HfPtqConfig) -> None:
    """After weights load: re-link tied embeddings (the LM head's storage may have moved) and install the save hooks."""
    from .quant.linear import QuantEmbedding

    plan = model.hfptq_plan
    for entry in plan:
        if entry.tied_to:
            emb = model.get_submodule(entry.name)
            if isinstance(emb, QuantEmbedding):
                emb.tie_to(model.get_submodule(entry.tied_to))
    if getattr(model, "hfptq_base_model", None) is None:
        model.hfptq_base_model = _base_model_from_recipe(getattr(model, "name_or_path", None))
    install_save_hooks(model)


def _checkpoint_key_renamer(model: nn.Module) -> Optional[Callable[[str], str]]:
    """The renaming Transformers applies to checkpoint keys of ``model`` when loading (legacy names,
    base-model prefix), so file keys compare with module names; identity if that API is unavailable."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = get_model_conversion_mapping(model, None, None)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        prefix = getattr(model, "base_model_prefix", None) or None
        meta_state = model.state_dict()
    except Exception:  # private Transformers API: never let it block a load
        logger.debug("hfptq: no checkpoint key renaming available", exc_info=True)
        return None

    def rename(key: str) -> str:
        try:
            return rename_source_key(key, renamings, converters, prefix, meta_state)[0]
        except Exception:
            return key

    return rename


def expected_tensors(model: nn.Module, plan: Plan) -> Dict[str, Tuple[str, torch.dtype, Tuple[int, ...]]]:
    """What the checkpoint must hold for ``plan``: ``{key: (module name, dtype, shape)}``.

    Read from the quantized skeleton itself (meta tensors carry dtype and shape), so it always
    matches the module layout of :mod:`hfptq.quant.linear`.
    """
    out: Dict[str, Tuple[str, torch.dtype, Tuple[int, ...]]] = {}
    for entry in plan:
        if entry.precision == "skip" or entry.tied_to:
            continue
        module = model.get_submodule(entry.name)
        for local, tensor in module.state_dict(keep_vars=True).items():
            out[f"{entry.name}.{local}"] = (entry.name, tensor.dtype, tuple(tensor.shape))
    return out


# ----------------------------------------------------------------------------------------------
# Header validation
# ----------------------------------------------------------------------------------------------


@dataclass
class CheckpointInfo:
    """What :func:`read_checkpoint_headers` found: tensors ``{key: (file, dtype, shape)}`` and metadata."""

    files: List[str]
    tensors: Dict[str, Tuple[str, str, Tuple[int, ...]]] = field(default_factory=dict)
    metadata: Dict[str, Dict[str, str]] = field(default_factory=dict)
    #: ``tensors`` under the model keys they load into (Transformers' renamings applied), set by
    #: :func:`check_checkpoint_files`
    model_tensors: Optional[Dict[str, Tuple[str, str, Tuple[int, ...]]]] = None

    @property
    def save_ids(self) -> Dict[str, Optional[str]]:
        return {f: (m or {}).get(META_SAVE_ID) for f, m in self.metadata.items()}


def read_checkpoint_headers(files: Sequence[Union[str, os.PathLike]]) -> CheckpointInfo:
    """Parse the safetensors headers of ``files`` (no tensor data is read).

    Raises:
        CheckpointError: a file is missing, truncated or its header is corrupted (the file is named).
    """
    from safetensors import safe_open

    info = CheckpointInfo(files=[str(f) for f in files])
    for path in info.files:
        name = os.path.basename(path)
        if not os.path.isfile(path):
            raise CheckpointError(f"Checkpoint file {path} is missing. Re-save or re-download the checkpoint.")
        try:
            with safe_open(path, framework="pt") as handle:
                info.metadata[path] = dict(handle.metadata() or {})
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    info.tensors[key] = (name, piece.get_dtype(), tuple(piece.get_shape()))
        except Exception as exc:  # safetensors raises its own SafetensorError / OSError
            raise CheckpointError(
                f"Checkpoint file {path} is truncated or corrupted ({exc}); it cannot be read. The save or download "
                "that produced it did not finish: save the model again or re-download the checkpoint."
            ) from exc
    return info


def _check_metadata(info: CheckpointInfo) -> None:
    for path, meta in info.metadata.items():
        fmt = meta.get(META_FORMAT)
        if fmt is None:
            raise CheckpointError(
                f"{path} has no '{META_FORMAT}' metadata although config.json says quant_method='{QUANT_METHOD}': it "
                "was not written by hfptq's save_pretrained (e.g. a float model re-saved without `import hfptq`). "
                "Re-quantize the float model with hfptq and save it again."
            )
        try:
            version = int(fmt)
        except ValueError:
            raise CheckpointError(f"{path}: metadata {META_FORMAT}={fmt!r} is not a version number.") from None
        if version > CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{path} uses hfptq checkpoint format {version}, written by a newer hfptq "
                f"({meta.get(META_VERSION, 'unknown version')}); this hfptq reads format {CHECKPOINT_FORMAT}. "
                "Upgrade hfptq: pip install -U hfptq."
            )
    ids = {sid for sid in info.save_ids.values()}
    if len(ids) > 1:
        by_id: Dict[Optional[str], List[str]] = {}
        for path, sid in info.save_ids.items():
            by_id.setdefault(sid, []).append(os.path.basename(path))
        detail = "; ".join(f"{', '.join(sorted(v))} from save {k}" for k, v in by_id.items())
        raise CheckpointError(
            f"The checkpoint's shards come from different saves ({detail}): a save into this folder was "
            "interrupted or files were copied together by hand. Save the model again into an empty folder."
        )


def check_checkpoint_files(files: Sequence[str],
                           expected: Mapping[str, Tuple[str, torch.dtype, Tuple[int, ...]]],
                           rename: Optional[Callable[[str], str]] = None, *,
                           allowed: Optional[set] = None, plan_digest: Optional[str] = None) -> CheckpointInfo:
    """Validate safetensors headers against what the plan needs (see :func:`expected_tensors`).

    Integer tensors must match dtype and shape exactly; float tensors must be floating point (any
    width: Transformers casts them) with the exact shape. ``rename`` maps a file key to the model
    key it loads into (Transformers' legacy renamings); identity by default.

    ``allowed`` (every key the model may hold) refuses tensors the plan does not account for, e.g.
    the integers of a module whose plan entry was deleted or set to ``skip``. ``plan_digest``
    (:func:`plan_hash` of ``config.json``'s plan) must equal the hash recorded with the weights
    when the shards carry one: a plan edited by hand (symmetric instead of asymmetric, rotation
    changed or removed, an embedding scale dropped) would otherwise load as garbage.

    Raises:
        CheckpointError: unreadable file, unsupported/mixed metadata, a plan that is not the one the
            weights were saved with, or a tensor that is missing, unexpected or has the wrong
            dtype/shape; the message names the module and the key.
    """
    info = read_checkpoint_headers(files)
    _check_metadata(info)
    renamed = {k: k if rename is None else rename(k) for k in info.tensors}
    tensors = info.model_tensors = {renamed[k]: v for k, v in info.tensors.items()}
    problems: List[str] = []
    if allowed is not None:
        extra = sorted(k for k in info.tensors if k not in allowed and renamed[k] not in allowed)
        if extra:
            problems.append(
                f"the files hold {len(extra)} tensor(s) the plan does not account for: {extra[:5]} (a plan entry was "
                "deleted or set to skip, or the model was quantized twice)"
            )
    for key, (module, dtype, shape) in expected.items():
        want = _ST_DTYPES.get(dtype, str(dtype))
        found = tensors.get(key)
        if found is None:
            problems.append(f"module {module!r}: tensor {key!r} is missing (plan expects {want} {list(shape)})")
            continue
        fname, got_dtype, got_shape = found
        dtype_ok = (got_dtype in _ST_FLOATS) if dtype.is_floating_point else got_dtype == want
        if not dtype_ok or tuple(got_shape) != tuple(shape):
            hint = ""
            if want == "U8" and got_dtype == "I8":
                hint = " (the plan says int4, packed two values per byte, but the file holds int8 weights)"
            elif want == "I8" and got_dtype == "U8":
                hint = " (the plan says int8 but the file holds packed int4 weights)"
            problems.append(
                f"module {module!r}: tensor {key!r} in {fname} is {got_dtype} {list(got_shape)}, the plan expects "
                f"{want} {list(shape)}{hint}"
            )
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(
            "The checkpoint's tensors do not match the hfptq plan in its config.json: "
            + "; ".join(problems[:5]) + more
            + ". config.json and the weights come from different quantizations: save the quantized model again "
            "with hfptq, or restore the config.json that belongs to these weights."
        )
    if plan_digest is not None:  # after the tensor check, whose messages name the module
        for path, meta in info.metadata.items():
            recorded = meta.get(META_PLAN_HASH)
            if recorded is not None and recorded != plan_digest:
                raise CheckpointError(
                    f"config.json's hfptq plan is not the plan {os.path.basename(path)} was saved with (its "
                    f"{META_PLAN_HASH} differs): config.json was edited or comes from another quantization. The "
                    "weights would load as garbage; restore the config.json saved with these weights, or re-quantize."
                )
    return info


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------


def _crc32(tensor: torch.Tensor) -> Optional[str]:
    if tensor.device.type == "meta":
        return None
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return f"{zlib.crc32(b''):08x}"
    data = t.reshape(-1).view(torch.uint8).numpy()
    return f"{zlib.crc32(memoryview(data)):08x}"


def state_dict_for_save(model: nn.Module, *, checksums: bool = True) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The tensors and safetensors metadata ``save_pretrained`` writes for an hfptq model.

    ``model.state_dict()`` (quantized buffers under their checkpoint names) plus a zero-size
    ``<m>.weight`` tombstone per int8/int4 module, and the ``hfptq_*`` metadata (a fresh save id).
    Used by :meth:`hfptq.quantizer.HfPtqQuantizer.get_state_dict_and_metadata`.

    Raises:
        CheckpointError: the model carries no hfptq plan.
    """
    from . import __version__

    plan = getattr(model, "hfptq_plan", None)
    if plan is None:
        raise CheckpointError(
            "This model has an hfptq quantizer attached but no model.hfptq_plan; it cannot be saved as an hfptq "
            "checkpoint. Quantize it with hfptq.quantize_model or from_pretrained(quantization_config=HfPtqConfig())."
        )
    state_dict = model.state_dict()
    crcs: Dict[str, str] = {}
    if checksums:
        for key, tensor in state_dict.items():
            crc = _crc32(tensor)
            if crc is not None:
                crcs[key] = crc
    for key in _tombstone_keys(plan):
        if key not in state_dict:
            state_dict[key] = torch.zeros(0, dtype=torch.int8)
    metadata = {
        META_FORMAT: str(CHECKPOINT_FORMAT),
        META_VERSION: __version__,
        META_SAVE_ID: uuid.uuid4().hex,
    }
    qcfg = getattr(getattr(model, "config", None), "quantization_config", None)
    stored = qcfg.plan if isinstance(qcfg, HfPtqConfig) and qcfg.plan else plan.to_dict()
    # the JSON round trip makes the hash the one of what config.json will hold (tuples -> lists, ...)
    metadata[META_PLAN_HASH] = plan_hash(json.loads(json.dumps(stored, default=str)))
    if checksums:
        metadata[META_CRC32] = json.dumps(crcs, separators=(",", ":"), sort_keys=True)
    return state_dict, metadata


class _BoundHook:
    """Picklable, deep-copyable stand-in for a bound method installed on one model instance."""

    def __init__(self, model: nn.Module, func_name: str) -> None:
        self.model = model
        self.func_name = func_name
        self.__doc__ = globals()[func_name].__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return globals()[self.func_name](self.model, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<hfptq {self.func_name} of {type(self.model).__name__}>"


def install_save_hooks(model: nn.Module) -> None:
    """Route ``model.save_pretrained`` through :func:`save_quantized` and keep the model card on ``push_to_hub``.

    Only this instance is affected (no global patching). ``push_to_hub`` saves through
    ``save_pretrained`` and then overwrites ``README.md`` with Transformers' default card; the
    ``_upload_modified_files`` hook puts hfptq's card back just before the upload.
    """
    model.save_pretrained = _BoundHook(model, "save_quantized")
    model._upload_modified_files = _BoundHook(model, "_upload_with_card")
    model.tie_weights = _BoundHook(model, "tie_weights_hfptq")


def remove_save_hooks(model: nn.Module) -> None:
    """Undo :func:`install_save_hooks` (e.g. after dequantization): ``save_pretrained`` is Transformers' again."""
    for name in ("save_pretrained", "_upload_modified_files", "tie_weights"):
        if isinstance(model.__dict__.get(name), _BoundHook):
            del model.__dict__[name]


def tie_weights_hfptq(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``model.tie_weights()`` for hfptq models (installed by :func:`install_save_hooks`).

    A quantized LM head and the embedding that reads its integers are already tied through the
    integer storage, and neither has a float ``weight`` for Transformers to tie; those pairs are
    left alone, every other tied pair is tied by Transformers as usual. Callers such as
    lm-eval-harness (``HFLM(pretrained=model)``) call ``tie_weights()`` on the model they get.

    Example:
        >>> model.tie_weights()   # doctest: +SKIP
    """
    from transformers import PreTrainedModel

    plan = getattr(model, "hfptq_plan", None)
    if plan is None:
        return PreTrainedModel.tie_weights(model, *args, **kwargs)
    owned = {e.name for e in plan if e.tied_to or (e.kind == "lm_head" and e.precision != "skip")}
    expand = model.get_expanded_tied_weights_keys

    def not_owned(all_submodels: bool = False) -> Dict[str, str]:
        keys = expand(all_submodels=all_submodels)
        return {t: s for t, s in keys.items() if t.rsplit(".", 1)[0] not in owned and s.rsplit(".", 1)[0] not in owned}

    model.get_expanded_tied_weights_keys = not_owned
    try:
        return PreTrainedModel.tie_weights(model, *args, **kwargs)
    finally:
        del model.__dict__["get_expanded_tied_weights_keys"]


def _is_hfptq_model(model: nn.Module) -> bool:
    from .quantizer import HfPtqQuantizer

    qcfg = getattr(getattr(model, "config", None), "quantization_config", None)
    return (isinstance(getattr(model, "hf_quantizer", None), HfPtqQuantizer) and isinstance(qcfg, HfPtqConfig)
            and getattr(model, "hfptq_plan", None) is not None)


def mark_quantized(model: nn.Module, config: HfPtqConfig, plan: Optional[Plan] = None) -> nn.Module:
    """Make a model quantized by hand (:func:`hfptq.convert.convert_model`) saveable as an hfptq checkpoint.

    Records the plan in ``config.plan`` and ``model.hfptq_plan``, sets
    ``model.config.quantization_config``, attaches an :class:`~hfptq.quantizer.HfPtqQuantizer`
    (as ``from_pretrained`` does) and installs the save hooks. Idempotent.

    Example:
        >>> plan = hfptq.resolve_plan(model, cfg)                                   # doctest: +SKIP
        >>> convert_model(model, plan, input_qparams=qparams)                       # doctest: +SKIP
        >>> mark_quantized(model, cfg, plan).save_pretrained("out/model")           # doctest: +SKIP
    """
    from .quantizer import HfPtqQuantizer

    plan = plan if plan is not None else getattr(model, "hfptq_plan", None)
    if plan is None:
        if not config.plan:
            raise CheckpointError("mark_quantized needs the plan the model was converted with (plan=...).")
        plan = Plan.from_dict(config.plan)
    config.plan = plan.to_dict()
    model.hfptq_plan = plan
    model.config.quantization_config = config
    quantizer = getattr(model, "hf_quantizer", None)
    if not isinstance(quantizer, HfPtqQuantizer):
        model.hf_quantizer = HfPtqQuantizer(config, pre_quantized=True)
    else:
        quantizer.quantization_config = config
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    if getattr(model, "hfptq_base_model", None) is None:
        model.hfptq_base_model = getattr(model, "name_or_path", None) or None
    install_save_hooks(model)
    return model


def save_quantized(model: nn.Module, save_directory: Union[str, os.PathLike], *, is_main_process: bool = True,
                   push_to_hub: bool = False, token: Optional[Union[str, bool]] = None, **kwargs: Any) -> None:
    """``save_pretrained`` for hfptq models: weights + config, recipe and model card, written atomically.

    Everything is written into a hidden staging folder beside ``save_directory``
    (``.<name>.hfptq-partial-*``); only when that succeeded are the files moved in. Files of the
    target that the new save does not replace (tokenizer, ...) are kept; stale weight shards of an
    earlier save are removed. ``config.json`` moves last, after the old one was removed first, so an
    interruption during the moves leaves a folder without ``config.json`` rather than a mix that
    loads. Accepts every ``PreTrainedModel.save_pretrained`` argument.

    Raises:
        CheckpointError: writing failed (the target folder was left unchanged), or moving the
            finished files in failed midway (the target then has no ``config.json`` and does not load).

    ``format="compressed-tensors"`` writes a checkpoint that loads without hfptq instead (see
    :func:`hfptq.export_compressed_tensors`; ``allow_deviation=True`` is passed on).

    Example:
        >>> model.save_pretrained("out/gemma-int8", max_shard_size="200MB")   # doctest: +SKIP
    """
    from transformers import PreTrainedModel

    export_format = kwargs.pop("format", None)
    if export_format not in (None, "hfptq") and is_main_process:
        from .export import export_model  # e.g. format="compressed-tensors"

        return export_model(model, save_directory, export_format, push_to_hub=push_to_hub, **kwargs)
    original = PreTrainedModel.save_pretrained
    if token is not None:
        kwargs["token"] = token
    if not is_main_process or kwargs.get("distributed_checkpoint") or not _is_hfptq_model(model):
        return original(model, save_directory, is_main_process=is_main_process, push_to_hub=push_to_hub, **kwargs)
    target = Path(os.fspath(save_directory)).absolute()
    if target.is_file():
        raise CheckpointError(f"save_pretrained needs a directory, but {target} is a file.")
    hub: Dict[str, Any] = {}
    if push_to_hub:
        for key in ("repo_id", "commit_message", "create_pr", "private", "revision", "commit_description"):
            if key in kwargs:
                hub[key] = kwargs.pop(key)
        hub["token"] = kwargs.get("token")
    files_timestamps = _timestamps(target) if push_to_hub else {}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = _make_staging(target)
    except OSError as exc:
        raise CheckpointError(f"Cannot save the checkpoint to {target}: {exc}. Choose a writable folder.") from exc
    try:
        original(model, staging, push_to_hub=False, **kwargs)
        _guard_config(staging / CONFIG_FILENAME)
        _write_side_files(staging, model, target, load_from=hub.get("repo_id") or os.fspath(save_directory))
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, CheckpointError) or not isinstance(exc, Exception):
            raise
        raise CheckpointError(
            f"Saving the hfptq checkpoint to {target} failed ({type(exc).__name__}: {exc}). Nothing was written "
            f"to {target}: its previous contents are unchanged."
        ) from exc
    progress: List[str] = []
    try:
        _commit_staging(staging, target, variant=kwargs.get("variant"), progress=progress)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if not isinstance(exc, Exception):
            raise
        if not progress:
            raise CheckpointError(
                f"Cannot write the new checkpoint into {target} ({type(exc).__name__}: {exc}). Nothing in {target} was "
                "changed: the previous checkpoint there is intact and still loads. Make the folder writable or save "
                "elsewhere."
            ) from exc
        raise CheckpointError(
            f"Moving the new checkpoint into {target} failed midway ({type(exc).__name__}: {exc}). The folder is "
            "incomplete: its config.json was removed first, so it will not load as a mix of old and new files. "
            "Save the model again."
        ) from exc
    logger.info("hfptq checkpoint saved to %s", target)
    if push_to_hub:
        _push_saved_folder(model, target, files_timestamps, hub)


def _guard_config(config_path: Path) -> None:
    """Write :data:`LOAD_GUARD` into the staged ``config.json`` (see there)."""
    data = json.loads(config_path.read_text(encoding="utf-8"))
    data["attn_implementation"] = LOAD_GUARD
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _stale_staging(target: Path) -> List[Path]:
    """Staging folders of earlier saves to ``target`` that were interrupted (killed process, power loss)."""
    found: List[Path] = []
    for folder, pattern in ((target.parent, f".{target.name}{_STAGING_MARK}*"),
                            (target, f"{_STAGING_MARK.strip('-')}-*")):
        if folder.is_dir():
            found.extend(p for p in folder.glob(pattern)
                         if p.is_dir() and not p.is_symlink() and not _owner_alive(p.name))
    return found


def _owner_alive(name: str) -> bool:
    """Whether the process that created staging folder ``name`` (``...-partial-<pid>-<hex>``) still runs:
    a concurrent save's folder must not be taken for a leftover."""
    match = re.search(r"partial-(\d+)-[0-9a-f]+$", name)
    if match is None:
        return False
    pid = int(match.group(1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _make_staging(target: Path) -> Path:
    """A fresh hidden folder on the target's filesystem: beside it, or inside it if the parent is read-only.

    Staging folders left by interrupted earlier saves to the same target (full copies of the
    weights) are removed first.
    """
    for stale in _stale_staging(target):
        logger.info("hfptq: removing %s, left by an interrupted save", stale)
        shutil.rmtree(stale, ignore_errors=True)
    suffix = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    # not tempfile.mkdtemp: its 0o700 mode would become the checkpoint folder's mode after the rename
    staging = target.parent / f".{target.name}{_STAGING_MARK}{suffix}"
    try:
        staging.mkdir()
        return staging
    except OSError:
        if not target.is_dir():
            raise
    staging = target / f"{_STAGING_MARK.strip('-')}-{suffix}"
    staging.mkdir()
    return staging


def _write_side_files(staging: Path, model: nn.Module, target: Path, load_from: str) -> None:
    """Recipe and model card. They describe the weights but are not needed to load them: a failure
    here is logged and the checkpoint is still saved."""
    from .card import write_model_card, write_recipe

    existing_card = target / CARD_FILENAME
    for what, write in (
        (RECIPE_FILENAME, lambda: write_recipe(staging, model, name=target.name)),
        (CARD_FILENAME, lambda: write_model_card(staging, model, load_from=load_from,
                                                 existing=existing_card if existing_card.is_file() else None)),
    ):
        try:
            write()
        except Exception:
            logger.warning("hfptq: could not write %s next to the checkpoint; the weights are saved anyway.", what,
                           exc_info=True)


def _timestamps(folder: Path) -> Dict[str, float]:
    if not folder.is_dir():
        return {}
    return {f: os.path.getmtime(folder / f) for f in os.listdir(folder)}


def _weight_file_pattern(variant: Optional[str]) -> re.Pattern:
    stem = "model" + (f".{variant}" if variant else "")
    return re.compile(re.escape(stem) + r"(?:-\d{5}-of-\d{5})?\.safetensors(?:\.index\.json)?$")


def _commit_staging(staging: Path, target: Path, variant: Optional[str] = None,
                    progress: Optional[List[str]] = None) -> None:
    """Move the staged files into ``target`` (atomically when the target does not exist yet).

    ``progress`` receives one entry per change made to ``target`` (so a failure can say whether the
    previous checkpoint is still intact).
    """
    progress = progress if progress is not None else []
    if not target.exists():
        os.replace(staging, target)
        return
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
        progress.append("removed empty target")
        os.replace(staging, target)
        return
    new = sorted(os.listdir(staging))
    weight_pattern = _weight_file_pattern(variant)
    # 1. invalidate the old checkpoint first: from here on, until the new config.json lands, the
    #    folder has no config.json and cannot be loaded as a half-old half-new mix.
    old_config = target / CONFIG_FILENAME
    if old_config.exists():
        old_config.unlink()
        progress.append(f"removed {old_config}")
    # 2. stale weight files of a previous save that this save does not overwrite
    for name in os.listdir(target):
        if name not in new and weight_pattern.fullmatch(name) and (target / name).is_file():
            (target / name).unlink()
            progress.append(f"removed {name}")
    # 3. move the new files in, config.json last
    ordered = [n for n in new if n != CONFIG_FILENAME] + ([CONFIG_FILENAME] if CONFIG_FILENAME in new else [])
    for name in ordered:
        dest = target / name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        progress.append(f"moved {name}")
        os.replace(staging / name, dest)
    staging.rmdir()


def _push_saved_folder(model: nn.Module, folder: Path, files_timestamps: Dict[str, float],
                       hub: Dict[str, Any]) -> Any:
    """Upload what :func:`save_quantized` just wrote (``save_pretrained(..., push_to_hub=True)``)."""
    from transformers.utils.hub import hf_api

    repo_id = hub.get("repo_id") or folder.name
    create_kwargs = {k: hub[k] for k in ("private", "token") if hub.get(k) is not None}
    repo_id = hf_api().create_repo(repo_id, exist_ok=True, **create_kwargs).repo_id
    return model._upload_modified_files(
        str(folder), repo_id, files_timestamps, commit_message=hub.get("commit_message"), token=hub.get("token"),
        create_pr=hub.get("create_pr", False), revision=hub.get("revision"),
        commit_description=hub.get("commit_description"),
    )


def _upload_with_card(model: nn.Module, working_dir: Union[str, os.PathLike], repo_id: str, *args: Any,
                      **kwargs: Any) -> Any:
    """``_upload_modified_files`` hook: restore hfptq's model card (merged with the card Transformers wrote)."""
    from transformers import PreTrainedModel

    from .card import write_model_card

    if not _is_hfptq_model(model):
        return PreTrainedModel._upload_modified_files(model, working_dir, repo_id, *args, **kwargs)
    folder = Path(working_dir)
    card = folder / CARD_FILENAME
    write_model_card(folder, model, existing=card if card.is_file() else None, load_from=repo_id)
    return PreTrainedModel._upload_modified_files(model, working_dir, repo_id, *args, **kwargs)


def _base_model_from_recipe(path: Optional[str]) -> Optional[str]:
    """The float model a reloaded checkpoint was quantized from, as recorded in its recipe (local folders only)."""
    if not path:
        return None
    recipe = Path(path) / RECIPE_FILENAME
    if not recipe.is_file():
        return None
    try:
        import yaml

        data = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
        return (data.get("model") or {}).get("name_or_path")
    except Exception:  # a damaged recipe must not block loading the weights
        logger.warning("Could not read %s; the base model is unknown.", recipe)
        return None


# ----------------------------------------------------------------------------------------------
# Offline verification
# ----------------------------------------------------------------------------------------------


def checkpoint_files(folder: Union[str, os.PathLike], variant: Optional[str] = None) -> List[str]:
    """The safetensors files of a saved folder (from the index when sharded).

    Raises:
        CheckpointError: no weights file in the folder.
    """
    folder = Path(folder)
    stem = "model" + (f".{variant}" if variant else "")
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = _read_weight_map(index)
        return [str(folder / name) for name in sorted(set(weight_map.values()))]
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [str(single)]
    raise CheckpointError(f"No {stem}.safetensors (or index) in {folder}: is this a folder written by save_pretrained?")


def verify_checkpoint(folder: Union[str, os.PathLike], *, checksums: bool = True,
                      variant: Optional[str] = None) -> CheckpointInfo:
    """Check a saved hfptq checkpoint without loading the model.

    Verifies that ``config.json`` holds a readable hfptq ``quantization_config`` with a plan, that
    every shard header parses and carries the same save id and a supported format, that every
    tensor the plan needs is there with the dtype and shape the plan implies (checked against the
    quantized model built on the meta device), and (``checksums=True``) that every tensor's bytes
    still match the CRC-32 recorded at save time (this reads all data).

    Raises:
        CheckpointError: the first problem found, naming the file, module and key.

    Example:
        >>> info = verify_checkpoint("out/gemma-int8")   # doctest: +SKIP
        >>> len(info.tensors)                             # doctest: +SKIP
        436
    """
    folder = Path(folder)
    config_path = folder / CONFIG_FILENAME
    if not config_path.is_file():
        raise CheckpointError(
            f"{folder} has no config.json: the save did not complete or this is not a model folder."
        )
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON ({exc}).") from exc
    qcfg = raw.get("quantization_config") if isinstance(raw, dict) else None
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{config_path} has no hfptq quantization_config: not an hfptq checkpoint.")
    try:
        config = HfPtqConfig.from_dict(qcfg)
    except HfPtqError as exc:
        raise CheckpointError(f"{config_path}: quantization_config is invalid: {exc}") from exc
    plan = stored_plan(config)
    files = checkpoint_files(folder, variant)
    skeleton = _meta_skeleton(raw, config, plan)
    info = check_checkpoint_files(files, expected_tensors(skeleton, plan), rename=_checkpoint_key_renamer(skeleton),
                                  allowed=_allowed_keys(skeleton, plan), plan_digest=plan_hash(config.plan))
    if checksums:
        _verify_crcs(info)
    return info


def _meta_skeleton(raw_config: Mapping[str, Any], config: HfPtqConfig, plan: Plan) -> nn.Module:
    """The quantized model built on the meta device from a saved ``config.json`` (no memory, no weights)."""
    import transformers

    from .convert import build_skeleton

    architectures = raw_config.get("architectures") or []
    name = architectures[0] if isinstance(architectures, list) and architectures else None
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(
            f"config.json names architectures={architectures!r}, which is not a model class of this Transformers; "
            "cannot check the checkpoint against its plan. Restore the config.json saved with the weights."
        )
    fields = {k: v for k, v in raw_config.items() if k != "quantization_config"}
    if fields.get("attn_implementation") == LOAD_GUARD:
        fields.pop("attn_implementation")
    try:
        model_config = transformers.AutoConfig.for_model(**fields)
        with torch.device("meta"):
            model = cls(model_config)
    except HfPtqError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"config.json does not describe a model Transformers can build ({type(exc).__name__}: {exc}); restore "
            "the config.json saved with the weights."
        ) from exc
    build_skeleton(model, plan, fake=config.mode == "fake", compute_dtype=config.compute_dtype)
    return model


def _verify_crcs(info: CheckpointInfo) -> None:
    from safetensors import safe_open

    for path in info.files:
        recorded = info.metadata[path].get(META_CRC32)
        if recorded is None:
            logger.warning("%s has no recorded checksums; skipping the data check.", path)
            continue
        try:
            crcs = json.loads(recorded)
            if not isinstance(crcs, dict):
                raise ValueError("not a mapping")
        except ValueError as exc:
            raise CheckpointError(
                f"{path}: metadata {META_CRC32} is damaged ({exc}); the checksums cannot be checked. Re-save or "
                "re-download the checkpoint."
            ) from exc
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                if key not in crcs:
                    continue
                got = _crc32(handle.get_tensor(key))
                if got != crcs[key]:
                    raise CheckpointError(
                        f"Tensor {key!r} in {path} is corrupted: its bytes no longer match the checksum recorded "
                        "when it was saved. Re-download or re-save the checkpoint."
                    )


# ----------------------------------------------------------------------------------------------
# Dequantization
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace every hfptq module by a float ``nn.Linear``/``nn.Embedding`` holding its dequantized weight."""
    from .convert import _set_module
    from .quant.linear import FloatLinear, QuantEmbedding, QuantLinear

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""))
    dtype = dtype or torch.float32
    remove_save_hooks(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, (QuantLinear, FloatLinear)):
            weight = module.dequantized_weight(dtype) if isinstance(module, QuantLinear) else module.weight.to(dtype)
            if getattr(module, "input_rotation", 0):
                from .quant.rotation import rotate

                weight = rotate(weight.float(), module.input_rotation).to(dtype)  # W H H = W: undo the fold
            lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype,
                            device=weight.device)
            lin.weight.data.copy_(weight)
            if module.bias is not None:
                lin.bias.data.copy_(module.bias.to(dtype))
            _set_module(model, name, lin)
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantEmbedding):
            ids = torch.arange(module.num_embeddings, device=module.source.qweight.device)
            scale = module.embed_scale
            module.embed_scale = getattr(module, "hfptq_channel_scale", None)  # undo a smoothed tied head's W * s
            weight = module(ids).to(dtype)
            module.embed_scale = scale
            emb = nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                               dtype=dtype, device=weight.device)
            emb.weight.data.copy_(weight)
            _set_module(model, name, emb)
    return model

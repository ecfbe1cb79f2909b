"""Evaluate a saved quantized checkpoint against its float model (what ``hfptq eval`` runs).

Example:
    >>> report, folder = evaluate_checkpoint("outputs/gemma3-270m-default/model")   # doctest: +SKIP
    >>> print(report.console_summary())                                             # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from ..errors import CheckpointError, ConfigError
from ..offline.datasets import DATA_DIR_ENV
from ..offline.models import resolve_model
from ..pipeline import _DTYPES, _auto_class, apply_quick, evaluate_pair
from ..recipes import find_recipe, load_recipe

__all__ = ["evaluate_checkpoint", "launch_evaluation"]


def _check_checkpoint(checkpoint: Path) -> None:
    if not (checkpoint / "config.json").exists():
        raise CheckpointError(f"{checkpoint} has no config.json: pass the folder written by save_pretrained / hfptq run.")
    try:
        qcfg = json.loads((checkpoint / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    except (ValueError, AttributeError) as exc:
        raise CheckpointError(f"{checkpoint / 'config.json'} is not a valid model config ({exc}).") from exc
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != "hfptq":
        raise CheckpointError(
            f"{checkpoint} is not an hfptq-quantized checkpoint (its config.json has no hfptq quantization_config): "
            "evaluating it would compare a float model with a float model. Pass the folder written by hfptq run / "
            "save_pretrained of a quantized model, or quantize it first with hfptq run."
        )


DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential", "cpu")


def _device_map(value: Any) -> Any:
    """``value`` as ``from_pretrained`` takes it: a strategy name, a dict, or a JSON file of a dict."""
    if value is None or isinstance(value, dict):
        return value
    text = str(value)
    if text in DEVICE_MAP_NAMES:
        return text
    path = Path(text)
    if path.suffix == ".json" and path.is_file():
        try:
            mapping = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ConfigError(f"device_map file {path} is not valid JSON ({exc}).", key="device_map") from exc
        if isinstance(mapping, dict) and all(isinstance(k, str) for k in mapping):
            return mapping
        raise ConfigError(f"device_map file {path} must hold a JSON object of module name -> device "
                          '(e.g. {"model.layers.1": "disk", "": "cpu"}).', key="device_map")
    raise ConfigError(f"device_map {text!r} is neither one of {', '.join(DEVICE_MAP_NAMES)} nor a .json file of "
                      "module name -> device.", key="device_map")


def _save_report(report: Any, out: Path) -> None:
    """Write the report into a hidden sibling folder, then move each file into ``out``: a failure
    while writing leaves ``out`` as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        report.save(staging)
        out.mkdir(exist_ok=True)
        for item in sorted(staging.iterdir()):
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def evaluate_checkpoint(
    checkpoint: Union[str, Path],
    *,
    recipe: Optional[str] = None,
    reference: Optional[str] = None,
    data_dir: Optional[str] = None,
    output: Optional[Union[str, Path]] = None,
    quick: bool = False,
    progress: bool = True,
    device_map: Any = None,
    max_memory: Optional[Dict[Any, Any]] = None,
    offload_folder: Optional[Union[str, Path]] = None,
) -> Tuple[Any, Path]:
    """Evaluate ``checkpoint`` (an hfptq-quantized folder) against its float model; save the report.

    Run under a launcher (``torchrun --standalone --nproc_per_node N -m hfptq.cli eval ...`` or
    ``hfptq eval ... --processes N``), every process loads both models and scores its share of the
    perplexity windows (CPU, gloo); the main process combines them (the one-process number), runs
    the rest of the ``evaluation`` section alone and is the only one that writes the report.

    Args:
        checkpoint: folder written by ``save_pretrained`` / ``hfptq run``.
        recipe: recipe file or built-in name whose ``evaluation`` section runs (default: the
            ``hfptq_recipe.yaml`` saved with the checkpoint, else the built-in ``default``).
        reference: the float model (default: the recipe's ``model.name_or_path``).
        data_dir: offline dataset copies (sets ``HFPTQ_DATA_DIR``).
        output: report folder (default: ``<checkpoint>/../eval-report``).
        quick: tiny evaluation slices (a smoke run of the same path).
        progress: show progress bars (main process only).
        device_map: load both models split across devices through accelerate: ``"auto"``,
            ``"sequential"``, ... or a dict / ``.json`` file of module name -> ``"cpu"``/``"disk"``/GPU
            index. Layers mapped to ``"disk"`` are read from ``offload_folder`` layer by layer.
        max_memory: per-device caps for the ``"auto"``-style maps, e.g. ``{"cpu": "2GB"}``.
        offload_folder: where disk-offloaded weights go (default with a ``device_map``: a temporary
            folder removed afterwards). Each model and each process gets its own subfolder.

    Returns:
        ``(report, report folder)``. In a multi-process run, the other processes return a report
        holding only the perplexity section, and write nothing.

    Raises:
        CheckpointError: the folder is not an hfptq-quantized checkpoint.
        ConfigError: a bad ``device_map``, or ``accelerate launch --cpu`` asked for several processes.
        RankFailedError: another process of a multi-process run failed (its rank and error named).

    Example:
        >>> report, folder = evaluate_checkpoint("outputs/model", recipe="default", quick=True)  # doctest: +SKIP
        >>> report, folder = evaluate_checkpoint("outputs/model", device_map="auto",            # doctest: +SKIP
        ...                                      max_memory={"cpu": "1GB"}, offload_folder="offload")
    """
    from transformers import AutoTokenizer

    from ..evaluation.distributed import launched_state, process_grid

    checkpoint = Path(checkpoint)
    _check_checkpoint(checkpoint)
    device_map = _device_map(device_map)
    if (max_memory is not None or offload_folder is not None) and device_map is None:
        raise ConfigError("max_memory / offload_folder only apply with a device_map; pass device_map='auto' "
                          "(or a map of module name -> device) as well.", key="device_map")
    state = launched_state()
    rank, world = process_grid(state)
    if data_dir:
        os.environ[DATA_DIR_ENV] = data_dir
    saved = checkpoint / "hfptq_recipe.yaml"
    loaded = load_recipe(find_recipe(recipe) if recipe else (saved if saved.exists() else find_recipe("default")))
    if quick:
        loaded = apply_quick(loaded)
    if rank > 0:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one set of loading bars (the main process's) is enough
        # Only the perplexity windows are shared out; the main process runs the rest alone.
        loaded = copy.deepcopy(loaded)
        ppl = loaded.evaluation.get("perplexity")
        loaded.evaluation = {"perplexity": ppl} if ppl is not None else {}
    auto = _auto_class(loaded.task)
    dtype = _DTYPES[loaded.model.get("dtype", "float32")]
    reference_path = resolve_model(reference or loaded.model.get("name_or_path"))
    tokenizer = AutoTokenizer.from_pretrained(
        checkpoint if (checkpoint / "tokenizer_config.json").exists() else reference_path)
    with contextlib.ExitStack() as stack:
        placement: Dict[str, Dict[str, Any]] = {"float": {}, "quantized": {}}
        if device_map is not None:
            root = Path(offload_folder) if offload_folder else Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="hfptq-offload-")))
            for name in placement:
                folder = root / (f"rank{rank}" if world > 1 else "") / name
                # offload_buffers: hfptq stores its integer weights and scales as buffers, which accelerate
                # would otherwise keep in memory for layers mapped to "disk".
                placement[name] = {"device_map": copy.deepcopy(device_map), "offload_folder": str(folder),
                                   "offload_buffers": True}
                if max_memory is not None:
                    placement[name]["max_memory"] = dict(max_memory)
        float_model = auto.from_pretrained(reference_path, dtype=dtype, **placement["float"]).eval()
        quantized = auto.from_pretrained(checkpoint, dtype=dtype, **placement["quantized"]).eval()
        report = evaluate_pair(loaded, tokenizer, float_model, quantized, progress=progress and rank == 0,
                               accelerator=state)
        del float_model, quantized
    out = Path(output) if output else checkpoint.parent / "eval-report"
    if rank == 0:
        _save_report(report, out)
    return report, out


def launch_evaluation(checkpoint: Union[str, Path], processes: int, argv: List[str]) -> int:
    """Run ``hfptq <argv>`` (an ``eval`` command line) as ``processes`` ranks with torchrun; return its exit code.

    The ranks run on this machine on CPU (gloo), ``max(1, cores // processes)`` threads each
    unless ``OMP_NUM_THREADS`` is set; see :func:`evaluate_checkpoint` for what each rank does.
    Nothing is started when ``processes`` is not a positive number no larger than the CPU count, or
    when ``checkpoint`` is not an hfptq checkpoint.

    Example:
        >>> launch_evaluation("outputs/model", 2, ["eval", "outputs/model", "--processes", "2"])  # doctest: +SKIP
        0
    """
    cores = os.cpu_count() or 1
    if not isinstance(processes, int) or processes < 1:
        raise ConfigError(f"--processes must be a whole number >= 1 (got {processes!r}).", key="processes")
    if processes > cores:
        raise ConfigError(f"--processes {processes} exceeds the {cores} CPU cores of this machine: every process "
                          "holds both models and the ranks would only wait for each other. Use --processes "
                          f"{cores} or fewer.", key="processes")
    if os.environ.get("WORLD_SIZE"):
        raise ConfigError(f"--processes {processes} inside a launch of {os.environ['WORLD_SIZE']} processes: "
                          "either let hfptq start the processes or use a launcher, not both.", key="processes")
    _check_checkpoint(Path(checkpoint))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // processes)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "hfptq.cli", *argv]
    return subprocess.call(cmd, env=env)

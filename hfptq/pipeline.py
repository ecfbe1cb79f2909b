"""The whole job a recipe describes: load -> quantize (calibrating) -> evaluate float vs quantized
-> report -> save (-> push).

The CLI (``hfptq run``) is a thin wrapper around :func:`run_recipe`; everything it does is
available here.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

import torch
from torch import nn

from .config import HfPtqConfig
from .errors import ConfigError
from .recipes import Recipe

logger = logging.getLogger(__name__)

#: Evaluation sizes used by ``quick=True`` (smoke runs, tests): same code path, tiny slices.
QUICK = {
    "perplexity": {"max_windows": 2, "seq_len": 128},
    "piqa": {"limit": 8},
    "ag_news": {"limit": 8},
    "latency": {"prompt_len": 16, "new_tokens": 4, "repeats": 1, "warmup": 0},
    "layer_error": {"num_samples": 1, "seq_len": 64},
    "sensitivity": {"num_samples": 1, "seq_len": 64},
    "calibration": {"num_samples": 4, "seq_len": 64},
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RunResult:
    """What :func:`run_recipe` produced."""

    report: Any
    output_dir: Path
    model_dir: Optional[Path]
    files: Dict[str, Path]
    quantized_model: Any = None
    float_model: Any = None


def _auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "sequence-classification" else AutoModelForCausalLM


def apply_quick(recipe: Recipe) -> Recipe:
    """A copy of ``recipe`` with every evaluation and calibration size shrunk (same code path)."""
    recipe = copy.deepcopy(recipe)
    for section, sizes in QUICK.items():
        if section == "calibration":
            calib = recipe.quantization.get("calibration")
            if calib:
                calib.update(sizes)
            continue
        if section in recipe.evaluation and recipe.evaluation[section] is not None:
            recipe.evaluation[section].update(sizes)
    return recipe


def load_models(recipe: Recipe, model_path: str, config: HfPtqConfig, *, progress: bool = True):
    """Load the float reference and the quantized model (quantized at load by ``from_pretrained``)."""
    from transformers import AutoTokenizer

    auto = _auto_class(recipe.task)
    dtype = _DTYPES[recipe.model.get("dtype", "float32")]
    kwargs: Dict[str, Any] = {"dtype": dtype}
    if recipe.model.get("num_labels"):
        kwargs["num_labels"] = recipe.model["num_labels"]
    if recipe.model.get("revision"):
        kwargs["revision"] = recipe.model["revision"]
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        started = time.perf_counter()
        with _transformers_progress(progress):
            float_model = auto.from_pretrained(model_path, **kwargs).eval()
    except OSError as exc:  # includes huggingface_hub's "not a valid repo id" / offline misses
        raise _unloadable("model.name_or_path", model_path, exc) from exc
    float_load = time.perf_counter() - started
    calib = config.calibration
    if calib is not None and calib.get("tokenizer") is None:
        calib["tokenizer"] = model_path
    started = time.perf_counter()
    from .quantizer import load_progress

    try:
        with load_progress(progress), _transformers_progress(progress):
            quantized = auto.from_pretrained(model_path, quantization_config=config, **kwargs).eval()
    except OSError as exc:  # the float model loaded just above: what failed is what calibration loads
        raise ConfigError(
            f"Quantizing {model_path} failed to load a file ({exc}). Check calibration.tokenizer "
            f"({calib.get('tokenizer') if calib else None!r}) and calibration.dataset / data_files."
        ) from exc
    quant_load = time.perf_counter() - started
    return tokenizer, float_model, quantized, float_load, quant_load


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Transformers' loading bars off inside the block when ``enabled`` is False (restored after)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled and was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not hf_logging.is_progress_bar_enabled():
            hf_logging.enable_progress_bar()


def _known_models() -> List[str]:
    from .models import KNOWN_MODELS

    return sorted(KNOWN_MODELS)


def _unloadable(field: str, path: str, exc: BaseException) -> ConfigError:
    return ConfigError(
        f"{field}={path!r} cannot be loaded ({exc}). Give a built-in alias ({', '.join(_known_models())}), a local "
        "folder written by save_pretrained, or a Hub id reachable from here."
    )


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.sep in name and not _is_hub_id(name)


def _is_hub_id(name: str) -> bool:
    import re

    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None


def resolve_recipe_model(name: Optional[str], field: str = "model.name_or_path") -> str:
    """:func:`hfptq.models.resolve_model`, refusing a local path that does not exist (instead of letting
    Transformers take it for a Hub id and fail with a bare error).

    Raises:
        ConfigError: ``name`` looks like a path and nothing is there.
    """
    from .errors import suggest
    from .models import resolve_model

    if isinstance(name, str) and _looks_like_path(name) and not Path(name).expanduser().exists():
        raise ConfigError(
            f"{field}={name!r}: no such folder.{suggest(name, _known_models())} Give a built-in alias "
            f"({', '.join(_known_models())}), a folder written by save_pretrained, or a Hub id."
        )
    return resolve_model(name)


def check_output_dir(out: Path, *, save: bool) -> None:
    """Fail before any work when the run could not write its report (or checkpoint) to ``out``.

    Raises:
        ConfigError: ``out`` (or ``out/model``) is a file, or the folder cannot be created or written.
    """
    import tempfile

    out = Path(out).absolute()
    for path in ([out, out / "report"] + ([out / "model"] if save else [])):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"output.dir: {path} is a file, not a folder; choose another output.dir (or --output).")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(existing))
        # a probe file in the nearest existing folder, removed at once: nothing is created before the run starts
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".hfptq-write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"output.dir: cannot write to {out} ({exc}); choose a writable output.dir (or --output) before the run "
            "spends time loading, calibrating and evaluating."
        ) from exc


def _check_calibration_tokenizer(config: HfPtqConfig) -> None:
    tok = (config.calibration or {}).get("tokenizer")
    if isinstance(tok, str) and _looks_like_path(tok) and not Path(tok).expanduser().exists():
        raise ConfigError(
            f"calibration.tokenizer={tok!r}: no such folder. Give a folder with a tokenizer, a Hub id, or leave it "
            "out to use the model's own tokenizer."
        )


def _bos(tokenizer) -> Optional[int]:
    from .data import wants_bos

    return tokenizer.bos_token_id if wants_bos(tokenizer) else None


def _corpus_ids(spec: Dict[str, Any], tokenizer) -> torch.Tensor:
    from .data import load_text_corpus, tokenize_corpus

    text = load_text_corpus(spec)
    return tokenize_corpus(text, tokenizer, add_bos=False)


def _windows(ids: torch.Tensor, n: int, seq_len: int, bos: Optional[int]) -> torch.Tensor:
    body = seq_len - (1 if bos is not None else 0)
    if ids.numel() < body:
        raise ConfigError(f"The evaluation corpus has {ids.numel()} tokens, fewer than one window of {seq_len}.")
    n = max(1, min(n, ids.numel() // body))
    rows = ids[: n * body].reshape(n, body)
    if bos is not None:
        rows = torch.cat([torch.full((n, 1), bos, dtype=rows.dtype), rows], dim=1)
    return rows


@contextlib.contextmanager
def keep_float(quantized: nn.Module, float_model: nn.Module, name: str) -> Iterator[None]:
    """Temporarily put the float model's module ``name`` back into the quantized model."""
    parent_name, _, child = name.rpartition(".")
    parent = quantized.get_submodule(parent_name) if parent_name else quantized
    original = getattr(parent, child)
    setattr(parent, child, float_model.get_submodule(name))
    try:
        yield
    finally:
        setattr(parent, child, original)


def plan_rows(plan) -> List[Dict[str, Any]]:
    """The plan grouped for a report: one row per (kind, precision, scheme) with a module count."""
    if plan is None:
        return []
    groups: Dict[tuple, int] = {}
    for e in plan:
        key = (e.kind, e.precision, e.describe())
        groups[key] = groups.get(key, 0) + 1
    return [{"kind": k, "precision": p, "scheme": d, "modules": n} for (k, p, d), n in groups.items()]


def evaluate_pair(recipe: Recipe, tokenizer, float_model: nn.Module, quantized: nn.Module, *,
                  progress: bool = True, report: Any = None, accelerator: Any = None):
    """Run the recipe's ``evaluation`` section on both models; fill and return a QualityReport.

    ``accelerator`` (an ``accelerate`` state of a multi-process launch) shards the perplexity windows
    across the processes; every process must run the same ``perplexity`` section.
    """
    from . import data as hdata
    from .evaluation import (
        QualityReport,
        classify,
        layer_errors,
        measure_latency,
        model_size,
        multiple_choice,
        perplexity,
        piqa_examples,
        sensitivity_from_losses,
        zero_shot_classify,
    )
    from .evaluation._utils import progress_bar

    plan = getattr(quantized, "hfptq_plan", None)
    if report is None:
        report = QualityReport(recipe.model.get("name_or_path") or "model", plan=plan_rows(plan))
    ev = recipe.evaluation
    bos = _bos(tokenizer) if recipe.task == "causal-lm" else None
    ids = None
    if recipe.task == "causal-lm" and any(k in ev for k in ("perplexity", "layer_error", "sensitivity")):
        spec = dict(ev.get("perplexity") or {"dataset": "wikitext", "config": "wikitext-2-raw-v1", "split": "test"})
        with report.timer("tokenize evaluation corpus"):
            ids = _corpus_ids({k: v for k, v in spec.items() if k in ("dataset", "config", "split", "data_files",
                                                                       "text_column")}, tokenizer)
    if ev.get("perplexity") is not None and recipe.task == "causal-lm":
        p = ev["perplexity"]
        kw = dict(seq_len=p.get("seq_len", 512), stride=p.get("stride"), batch_size=p.get("batch_size", 1),
                  bos_token_id=bos, max_windows=p.get("max_windows"), progress=progress,
                  accelerator=accelerator)
        with report.timer("perplexity (float)"):
            ref = perplexity(float_model, ids, **kw)
        with report.timer("perplexity (quantized)"):
            qua = perplexity(quantized, ids, **kw)
        name = f"{p.get('dataset', 'wikitext')} {p.get('config') or ''} {p.get('split', 'test')}".replace("  ", " ")
        report.set_perplexity(ref, qua, dataset=name.strip())
    if ev.get("piqa") is not None and recipe.task == "causal-lm":
        p = ev["piqa"]
        rows = hdata.load_piqa(p.get("split", "validation"), limit=p.get("limit"), seed=p.get("seed"))
        examples = piqa_examples(rows)
        with report.timer("piqa"):
            r = multiple_choice(float_model, tokenizer, examples, batch_size=p.get("batch_size", 8), progress=progress)
            q = multiple_choice(quantized, tokenizer, examples, batch_size=p.get("batch_size", 8), progress=progress)
        report.add_accuracy("piqa", r, q)
    if ev.get("ag_news") is not None:
        p = ev["ag_news"]
        rows, names = hdata.load_ag_news(p.get("split", "test"), limit=p.get("limit"), seed=p.get("seed"))
        texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
        with report.timer("ag_news"):
            if recipe.task == "sequence-classification":
                kw = dict(batch_size=p.get("batch_size", 16), max_length=p.get("max_length", 256), progress=progress)
                r = classify(float_model, tokenizer, texts, labels, **kw)
                q = classify(quantized, tokenizer, texts, labels, **kw)
            else:
                kw = dict(batch_size=p.get("batch_size", 8), progress=progress)
                if p.get("template"):
                    kw["template"] = p["template"]
                r = zero_shot_classify(float_model, tokenizer, texts, labels, names, **kw)
                q = zero_shot_classify(quantized, tokenizer, texts, labels, names, **kw)
        report.add_accuracy("ag_news", r, q)
    report.set_size(model_size(float_model), model_size(quantized))
    if ev.get("latency") is not None and recipe.task == "causal-lm":
        p = dict(ev["latency"])
        with report.timer("latency"):
            r = measure_latency(float_model, **p)
            q = measure_latency(quantized, **p)
        report.set_latency(r, q)
    names = [e.name for e in plan if e.precision != "skip" and e.kind != "embedding"] if plan is not None else []
    if ev.get("layer_error") is not None and names and ids is not None:
        p = ev["layer_error"]
        sample = _windows(ids, p.get("num_samples", 2), p.get("seq_len", 256), bos)
        with report.timer("layer error"):
            report.set_layer_errors(layer_errors(float_model, quantized, sample, names, progress=progress))
    if ev.get("sensitivity") is not None and names and ids is not None:
        p = ev["sensitivity"]
        sample = _windows(ids, p.get("num_samples", 1), p.get("seq_len", 256), bos)
        scanned = [n for n in names if plan[n].quantized]

        def loss() -> float:
            with torch.inference_mode():
                out = quantized(sample, labels=sample)
            return float(out.loss)

        # Restore one module at a time to float inside the quantized model: the loss it gives back
        # is what quantizing that module costs with everything else quantized (one pass per module).
        with report.timer("sensitivity"):
            base = loss()
            restored = {}
            for name in progress_bar(scanned, enabled=progress, desc="hfptq: sensitivity", unit="module"):
                with keep_float(quantized, float_model, name):
                    restored[name] = loss()
        rows = sensitivity_from_losses(base, {n: 2 * base - v for n, v in restored.items()}, top_k=p.get("top_k", 10))
        for row in rows:
            row["loss"] = restored[row["module"]]
            row["method"] = "quantized model with this module restored to float; loss_increase = loss it costs"
        report.set_sensitivity(rows)
    return report


def run_recipe(
    recipe: Recipe,
    *,
    model: Optional[str] = None,
    data_dir: Optional[str] = None,
    output_dir: Optional[str] = None,
    quick: bool = False,
    save: Optional[bool] = None,
    push_to_hub: Optional[str] = None,
    progress: bool = True,
    print_summary: bool = True,
) -> RunResult:
    """Run a recipe end to end and return the report (also written to ``<output>/report``).

    Args:
        model: override ``model.name_or_path`` (alias, local dir or Hub id).
        data_dir: folder with the offline copies of the datasets (sets ``HFPTQ_DATA_DIR``).
        output_dir: override ``output.dir``.
        quick: shrink calibration and evaluation to tiny slices (smoke test of the same path).
        save: override ``output.save``.
        push_to_hub: repo id to publish the quantized checkpoint to.
    """
    if data_dir is not None:
        os.environ["HFPTQ_DATA_DIR"] = str(data_dir)
    if quick:
        recipe = apply_quick(recipe)
    out = recipe.output_dir(output_dir)
    do_save = recipe.output.get("save", True) if save is None else save
    # everything that can be checked before the (long) load/calibrate/evaluate is checked first
    check_output_dir(out, save=do_save)
    config = recipe.to_config()
    _check_calibration_tokenizer(config)
    model_path = resolve_recipe_model(model or recipe.model.get("name_or_path"),
                                      "--model" if model else "model.name_or_path")
    started = time.perf_counter()
    tokenizer, float_model, quantized, float_load, quant_load = load_models(recipe, model_path, config,
                                                                            progress=progress)
    from .evaluation import QualityReport

    report = QualityReport(model_path if model is None and not recipe.model.get("name_or_path") else
                           (model or recipe.model.get("name_or_path")), plan=plan_rows(quantized.hfptq_plan))
    report.add_timing("load float model", float_load)
    report.add_timing("load + quantize", quant_load)
    calib_info = getattr(quantized, "hfptq_calibration", None) or {}
    qcfg = config.to_dict()
    if qcfg.get("calibration"):
        c = qcfg["calibration"]
        report.set_calibration(dataset=" ".join(str(x) for x in (c.get("dataset"), c.get("config"), c.get("split")) if x),
                               samples=c.get("num_samples"), seq_len=c.get("seq_len"), observer=c.get("observer"),
                               activations=config.activations["mode"],
                               **{k: v for k, v in calib_info.items() if k in ("seconds", "peak_rss_bytes",
                                                                             "estimated_memory_bytes",
                                                                             "compute_dtype")})
    else:
        report.set_calibration(activations=config.activations["mode"])
    for algo in calib_info.get("algorithms", []) if isinstance(calib_info, dict) else []:
        algo = dict(algo)
        report.add_algorithm(algo.pop("name", "algorithm"), **algo)
    rotated = {e.name: int(e.activations["rotation"]) for e in getattr(quantized, "hfptq_plan", None) or []
               if e.quantized and (e.activations or {}).get("rotation")}
    if rotated:
        report.add_algorithm("rotation", modules=len(rotated), block_sizes=sorted(set(rotated.values())),
                             what="inputs rotated by a block Hadamard matrix before INT8 (weights stored rotated)")
    evaluate_pair(recipe, tokenizer, float_model, quantized, progress=progress, report=report)
    files: Dict[str, Path] = {}
    model_dir: Optional[Path] = None
    save_error: Optional[BaseException] = None
    from .export import export_options

    if do_save:
        model_dir = out / "model"
        quantized.hfptq_report = report.to_dict()
        quantized.hfptq_recipe = recipe
        if not Path(str(recipe.model.get("name_or_path") or "")).exists() and not model:
            quantized.hfptq_base_model = recipe.model.get("name_or_path")
        try:
            with report.timer("save"), _transformers_progress(progress):
                quantized.save_pretrained(model_dir, max_shard_size=recipe.output.get("max_shard_size") or "2GB",
                                          **export_options(recipe.output))
                tokenizer.save_pretrained(model_dir)
        except Exception as exc:  # the evaluation is done: write its report before giving up
            save_error, model_dir = exc, None
    if save_error is not None:
        files.update(report.save(out / "report") if recipe.output.get("plots", True) else
                     {"json": report.to_json(out / "report" / "report.json")})
        from .errors import CheckpointError

        raise CheckpointError(
            f"Saving the quantized checkpoint to {out / 'model'} failed ({type(save_error).__name__}: {save_error}). "
            f"The evaluation report was written to {out / 'report'}; fix the output folder and run again."
        ) from save_error
    if do_save and model_dir is not None:
        from .evaluation import checkpoint_bytes

        if report.size is not None:
            float_ckpt = checkpoint_bytes(model_path) if Path(model_path).is_dir() else None
            quant_ckpt = checkpoint_bytes(model_dir)
            report.size["checkpoint"] = {
                "float_bytes": float_ckpt, "quantized_bytes": quant_ckpt,
                "ratio": (float_ckpt / quant_ckpt) if float_ckpt and quant_ckpt else None,
            }
    if do_save and model_dir is not None and export_options(recipe.output):
        _evaluate_export(recipe, model_dir, tokenizer, report, progress=progress)  # reloaded without hfptq
    repo = push_to_hub or (recipe.output.get("push_to_hub") or {}).get("repo_id")
    if repo:
        options = dict(recipe.output.get("push_to_hub") or {})
        options.pop("repo_id", None)
        with report.timer("push_to_hub"):
            quantized.push_to_hub(repo, **options)
            tokenizer.push_to_hub(repo, **options)
    report.add_timing("total", time.perf_counter() - started)
    files.update(report.save(out / "report") if recipe.output.get("plots", True) else
                 {"json": report.to_json(out / "report" / "report.json")})
    if print_summary:
        print(report.console_summary())
        print(f"\nReport: {out / 'report'}" + (f"\nQuantized checkpoint: {model_dir}" if model_dir else ""))
    return RunResult(report=report, output_dir=out, model_dir=model_dir, files=files,
                     quantized_model=quantized, float_model=float_model)


def plan_for_recipe(recipe: Recipe, model: Optional[str] = None) -> str:
    """The plan a recipe would apply, without loading weights (the model skeleton is built on meta)."""
    from transformers import AutoConfig

    from .plan import resolve_plan

    path = resolve_recipe_model(model or recipe.model.get("name_or_path"), "--model" if model else "model.name_or_path")
    try:
        cfg = AutoConfig.from_pretrained(path)
    except OSError as exc:
        raise _unloadable("--model" if model else "model.name_or_path", path, exc) from exc
    from .checkpoint import clear_load_guard

    clear_load_guard(cfg)  # an hfptq checkpoint's config: the skeleton is built here, not by from_pretrained
    if recipe.model.get("num_labels"):
        cfg.num_labels = recipe.model["num_labels"]
    auto = _auto_class(recipe.task)
    with torch.device("meta"):
        skeleton = auto.from_config(cfg)
    plan = resolve_plan(skeleton, recipe.to_config())
    out = plan.table() + "\n\n" + plan.summary()
    if all(e.precision == "skip" for e in plan):
        out += "\nWarning: this plan skips every module: nothing would be quantized."
    return out


def _evaluate_export(recipe: Any, folder: Union[str, os.PathLike], tokenizer: Any, report: Any, *,
                    progress: bool = True) -> None:
    """Perplexity of an exported checkpoint reloaded with stock Transformers (no hfptq module involved),
    with the recipe's perplexity settings, recorded in ``report`` next to hfptq's own numbers."""
    ev = recipe.evaluation.get("perplexity")
    if ev is None or recipe.task != "causal-lm" or report.perplexity is None:
        return
    import torch
    from transformers import AutoModelForCausalLM

    from .evaluation import perplexity

    spec = {k: v for k, v in ev.items() if k in ("dataset", "config", "split", "data_files", "text_column")}
    spec.setdefault("dataset", "wikitext")
    ids = _corpus_ids(spec, tokenizer)
    dtype = _DTYPES[recipe.model.get("dtype", "float32")]
    with report.timer("perplexity (exported, reloaded)"):
        model = AutoModelForCausalLM.from_pretrained(os.fspath(folder), dtype=dtype).eval()
        with torch.no_grad():
            result = perplexity(model, ids, seq_len=ev.get("seq_len", 512), stride=ev.get("stride"),
                                batch_size=ev.get("batch_size", 1), bos_token_id=_bos(tokenizer),
                                max_windows=ev.get("max_windows"), progress=progress)
        del model
    report.set_exported_perplexity(result, format=recipe.output.get("format"))

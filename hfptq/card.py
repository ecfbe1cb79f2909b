"""Files written beside an hfptq checkpoint: the recipe (``hfptq_recipe.yaml``) and the model card (``README.md``).

Both are written by ``save_pretrained`` (see :func:`hfptq.checkpoint.save_quantized`) and travel
with ``push_to_hub``. The card says what was quantized (the plan summarised by module kind and
precision), how it was calibrated, the measured quality drop and size when an evaluation report
is attached to the model (``model.hfptq_report``, a :class:`~hfptq.evaluation.QualityReport`
dict), the checkpoint size, and how to load it.

An existing ``README.md`` is not thrown away: hfptq's part lives between
``<!-- hfptq:card:begin -->`` and ``<!-- hfptq:card:end -->`` and only that part is replaced;
the Transformers default card (the template ``push_to_hub`` writes) is replaced entirely. Tags of
the front matter are merged.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import yaml
from torch import nn

from .utils import format_bytes

logger = logging.getLogger(__name__)

CARD_BEGIN = "<!-- hfptq:card:begin -->"
CARD_END = "<!-- hfptq:card:end -->"
#: Sentences of the card template Transformers writes on push_to_hub (utils/hub.py create_and_tag_model_card).
_TRANSFORMERS_TEMPLATE_MARKERS = (
    "This is the model card of a 🤗 transformers model that has been pushed on the Hub",
    "This model card has been automatically generated.",
)
_AUTO_CLASSES = (
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ("ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
)


# ----------------------------------------------------------------------------------------------
# Recipe
# ----------------------------------------------------------------------------------------------


def _task(model: nn.Module) -> Optional[str]:
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return "causal-lm"
    if name.endswith("ForSequenceClassification"):
        return "sequence-classification"
    return None


def recipe_for(model: nn.Module, name: str = "quantized") -> "Any":
    """The :class:`~hfptq.recipes.Recipe` describing how ``model`` was quantized (config minus the plan).

    Uses ``model.hfptq_recipe`` (a Recipe or mapping, e.g. set by the pipeline) when present, with
    its ``quantization`` section replaced by the config actually used.
    """
    from .recipes import Recipe, config_to_quantization_section, load_recipe

    config = model.config.quantization_config
    quantization = config_to_quantization_section(config)
    attached = getattr(model, "hfptq_recipe", None)
    if attached is not None:
        recipe = attached if isinstance(attached, Recipe) else load_recipe(dict(attached))
        data = recipe.to_dict()
        data["quantization"] = quantization
        return load_recipe(data, source=recipe.source or "<model.hfptq_recipe>")
    section: Dict[str, Any] = {}
    base = getattr(model, "hfptq_base_model", None)
    if base:
        section["name_or_path"] = str(base)
    dtype = getattr(model.config, "dtype", None)
    dtype = str(dtype).replace("torch.", "") if dtype is not None else None
    if dtype in ("float32", "bfloat16", "float16"):
        section["dtype"] = dtype
    task = _task(model)
    if task:
        section["task"] = task
    return Recipe(name=name, model=section, quantization=quantization,
                  description="The hfptq quantization that produced this checkpoint (written by save_pretrained).")


def write_recipe(folder: Union[str, os.PathLike], model: nn.Module, *, name: Optional[str] = None) -> Path:
    """Write ``hfptq_recipe.yaml``: the :class:`~hfptq.HfPtqConfig` as a recipe, minus the resolved plan.

    ``hfptq run hfptq_recipe.yaml`` (or :func:`hfptq.recipes.load_recipe`) reads it back.

    Example:
        >>> write_recipe("out/model", model).name   # doctest: +SKIP
        'hfptq_recipe.yaml'
    """
    from . import __version__
    from .checkpoint import RECIPE_FILENAME

    folder = Path(folder)
    recipe = recipe_for(model, name=name or folder.name)
    header = [
        f"# hfptq {__version__} recipe of this checkpoint (the resolved per-module plan is in config.json).",
        "# Reproduce it from the float model with: hfptq run hfptq_recipe.yaml",
    ]
    calibration = recipe.quantization.get("calibration") or {}
    if any(isinstance(v, str) and v.startswith("<in-memory") for v in calibration.values()):
        header.append("# Calibration used in-memory objects (shown as <in-memory ...>): replace them to re-run.")
    path = folder / RECIPE_FILENAME
    path.write_text("\n".join(header) + "\n" + recipe.to_yaml(), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------


def _fmt_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def plan_table(plan: Any) -> List[Tuple[str, str, str, int, int]]:
    """Plan rows grouped by (kind, precision, scheme): ``(kind, precision, scheme, modules, parameters)``."""
    groups: Dict[Tuple[str, str, str], List[int]] = {}
    order: List[Tuple[str, str, str]] = []
    for entry in plan:
        scheme = entry.describe()
        if entry.tied_to:
            scheme = f"shares the integer storage of {entry.tied_to}"
        key = (entry.kind, entry.precision, scheme)
        if key not in groups:
            groups[key] = [0, 0]
            order.append(key)
        groups[key][0] += 1
        groups[key][1] += 0 if entry.tied_to else entry.in_features * entry.out_features
    kinds = ("embedding", "attention", "ffn", "lm_head", "other")
    order.sort(key=lambda k: (kinds.index(k[0]) if k[0] in kinds else len(kinds), k[1]))
    return [(k[0], k[1], k[2], groups[k][0], groups[k][1]) for k in order]


def _float32_bytes(model: nn.Module) -> int:
    """Bytes of the model as an FP32 checkpoint: planned modules at their float size, the rest as stored."""
    plan = model.hfptq_plan
    planned = {e.name for e in plan if e.precision != "skip"}
    total = 0
    for entry in plan:
        if entry.precision == "skip" or entry.tied_to:
            continue
        total += 4 * (entry.in_features * entry.out_features + (entry.out_features if entry.has_bias else 0))
    seen = set()
    for name, tensor in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if any(module == p or module.startswith(p + ".") for p in planned):
            continue
        key = id(tensor) if tensor.device.type == "meta" else (tensor.device, tensor.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * (4 if tensor.is_floating_point() else tensor.element_size())
    return total


def _checkpoint_bytes(folder: Optional[Path]) -> Optional[int]:
    if folder is None or not folder.is_dir():
        return None
    sizes = [p.stat().st_size for p in folder.iterdir() if p.is_file() and p.suffix == ".safetensors"]
    return sum(sizes) if sizes else None


def _calibration_lines(model: nn.Module, config: Any) -> List[str]:
    acts = config.activations.get("mode", "dynamic")
    info = getattr(model, "hfptq_calibration", None)
    plan = model.hfptq_plan
    static = any(e.quantized and (e.activations or {}).get("mode") == "static" for e in plan)
    calib = config.to_dict().get("calibration")
    lines: List[str] = []
    memory = [f"{k}: {v}" for k, v in (calib or {}).items() if isinstance(v, str) and v.startswith("<in-memory")]
    if memory:
        lines += [f"**Not reproducible from its recipe:** calibration used in-memory objects ({'; '.join(memory)}). "
                  "`hfptq_recipe.yaml` cannot re-create this checkpoint until they are saved (e.g. "
                  "`Dataset.to_json`) and named in `calibration`.", ""]
    if isinstance(info, Mapping) and info:
        dataset = " / ".join(str(info[k]) for k in ("dataset", "config", "split") if info.get(k))
        rows = [
            ("dataset", dataset or None),
            ("samples x tokens", f"{info['num_samples']} x {info['seq_len']}" if info.get("num_samples") else None),
            ("observer", info.get("observer") if isinstance(info.get("observer"), str) else None),
            ("activation scheme", info.get("activation_scheme")),
            ("engine", info.get("engine")),
            ("time", f"{info['seconds']:.1f} s" if isinstance(info.get("seconds"), (int, float)) else None),
            ("peak RSS", format_bytes(info["peak_rss_bytes"]) if info.get("peak_rss_bytes") else None),
        ]
        lines.append("| | |")
        lines.append("|---|---|")
        lines.extend(f"| {k} | {v} |" for k, v in rows if v)
        algos = [a for a in ("smoothquant", "gptq") if info.get(a) or (config.to_dict().get(a) is not None)]
        if algos:
            lines.append("")
            lines.append(f"Accuracy algorithms applied: {', '.join(algos)}.")
    elif calib and (static or config.smoothquant is not None or config.gptq is not None):
        dataset = " / ".join(str(calib[k]) for k in ("dataset", "config", "split") if calib.get(k))
        lines.append(f"Calibrated on {dataset}: {calib.get('num_samples')} samples of {calib.get('seq_len')} tokens, "
                     f"{calib.get('observer', 'minmax')} observer.")
    else:
        lines.append("No calibration data was used: weight scales come from the weights themselves (min/max per "
                     "channel or group).")
    words = {
        "dynamic": "Activations of W8A8 modules are quantized per token at run time (dynamic).",
        "static": "Activations of W8A8 modules use per-tensor scales measured on the calibration data and frozen "
                  "into the checkpoint (static).",
        "none": "Activations stay in floating point (weight-only quantization).",
    }
    lines.append("")
    lines.append(words.get(acts, f"Activations: {acts}."))
    return lines


def _report_lines(report: Mapping[str, Any]) -> List[str]:
    """Rows of the attached QualityReport dict (schema_version 1, see hfptq.evaluation.report)."""
    rows: List[Tuple[str, str, str, str]] = []

    def num(v: Any, digits: int = 4) -> str:
        return f"{v:.{digits}f}" if isinstance(v, (int, float)) else str(v)

    ppl = report.get("perplexity")
    if isinstance(ppl, Mapping) and "float" in ppl and "quantized" in ppl:
        label = f"perplexity ({ppl['dataset']})" if ppl.get("dataset") else "perplexity"
        change = ""
        if isinstance(ppl.get("abs_drop"), (int, float)):
            change = f"{ppl['abs_drop']:+.4f}"
            if isinstance(ppl.get("rel_drop"), (int, float)):
                change += f" ({100 * ppl['rel_drop']:+.2f}%)"
        rows.append((label, num(ppl["float"]), num(ppl["quantized"]), change))
    for task, section in (report.get("accuracy") or {}).items():
        for metric, m in (section.get("metrics") or {}).items():
            if not isinstance(m, Mapping):
                continue
            change = f"{-100 * m['abs_drop']:+.2f} pp" if isinstance(m.get("abs_drop"), (int, float)) else ""
            rows.append((f"{task} {metric}", f"{100 * m['float']:.2f}%", f"{100 * m['quantized']:.2f}%", change))
    size = report.get("size")
    if isinstance(size, Mapping) and "float_bytes" in size:
        ratio = size.get("ratio")
        rows.append(("size in memory", format_bytes(size["float_bytes"]), format_bytes(size.get("quantized_bytes")),
                     f"{ratio:.2f}x smaller" if isinstance(ratio, (int, float)) else ""))
        ckpt = size.get("checkpoint") or {}
        if ckpt.get("float_bytes") and ckpt.get("quantized_bytes"):
            rows.append(("checkpoint on disk", format_bytes(ckpt["float_bytes"]), format_bytes(ckpt["quantized_bytes"]),
                         f"{ckpt['float_bytes'] / ckpt['quantized_bytes']:.2f}x smaller"))
    lat = report.get("latency")
    if isinstance(lat, Mapping) and isinstance(lat.get("prefill_speedup"), (int, float)):
        f, q = lat.get("float") or {}, lat.get("quantized") or {}
        rows.append(("prefill latency", num(f.get("prefill_wall_s"), 3) + " s", num(q.get("prefill_wall_s"), 3) + " s",
                     f"{lat['prefill_speedup']:.2f}x faster"))
    if not rows:
        return []
    out = ["| metric | float | quantized | change |", "|---|---|---|---|"]
    out.extend(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows)
    return out


def _auto_class(model: nn.Module) -> str:
    name = type(model).__name__
    for suffix, auto in _AUTO_CLASSES:
        if name.endswith(suffix):
            return auto
    return "AutoModel"


def card_metadata(model: nn.Module) -> Dict[str, Any]:
    """Front matter of the card: library, tags (``hfptq``, ``int8``/``int4``, ...), base model when it is a Hub id."""
    plan = model.hfptq_plan
    precisions = sorted({e.precision for e in plan if e.quantized})
    tags = ["hfptq", "quantized"] + precisions
    for tag in getattr(model, "model_tags", None) or []:
        if tag not in tags:
            tags.append(tag)
    meta: Dict[str, Any] = {"library_name": "transformers", "tags": tags}
    base = getattr(model, "hfptq_base_model", None)
    if base and re.fullmatch(r"[\w.-]+/[\w.-]+", str(base)) and not os.path.exists(str(base)):
        meta["base_model"] = str(base)
        meta["base_model_relation"] = "quantized"
    return meta


def render_model_card(model: nn.Module, *, load_from: Optional[str] = None,
                      checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
                      export: Optional[Mapping[str, Any]] = None) -> str:
    """The model card (Markdown with YAML front matter) of an hfptq-quantized model.

    Args:
        load_from: the Hub repo id or path shown in the loading snippet; defaults to the folder name.
        checkpoint_dir: the saved folder, to report the size of its safetensors files.
        export: for an export to another format (:func:`hfptq.export_compressed_tensors`), its
            ``ExportResult.to_dict()``: the card then says which engines serve the checkpoint.

    Example:
        >>> print(render_model_card(model, load_from="me/gemma-3-270m-hfptq"))   # doctest: +SKIP
    """
    from . import __version__
    from .checkpoint import CHECKPOINT_FORMAT, RECIPE_FILENAME

    plan = model.hfptq_plan
    config = model.config.quantization_config
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    source = load_from or (folder.name if folder else "path/to/checkpoint")
    base = getattr(model, "hfptq_base_model", None)
    # a local folder is named, not spelled out: the card may be published
    base_label = Path(str(base)).name if base and os.path.isabs(str(base)) else base
    title = f"{Path(str(base)).name if base else type(model).__name__} quantized with hfptq"

    lines: List[str] = ["---", yaml.safe_dump(card_metadata(model), sort_keys=False).rstrip(), "---", CARD_BEGIN,
                        f"# {title}", ""]
    intro = (f"Post-training quantized checkpoint written by [hfptq](https://pypi.org/project/hfptq/) {__version__} "
             + (f"(checkpoint format {CHECKPOINT_FORMAT})" if export is None else f"(exported as {export.get('format')})"))
    intro += f" from `{base_label}`." if base_label else "."
    lines += [intro, "", "## What was quantized", "",
              "| module kind | precision | scheme | modules | parameters |", "|---|---|---|---|---|"]
    for kind, precision, scheme, count, params in plan_table(plan):
        lines.append(f"| {kind} | {precision} | {scheme} | {count} | {_fmt_count(params) if params else '-'} |")
    skip_note = "`skip` modules are left as they were. " if any(e.precision == "skip" for e in plan) else ""
    where_plan = ("`config.json` (`quantization_config.plan`)" if export is None else
                  "`config.json` (`quantization_config.config_groups` and `ignore`)")
    lines += ["", f"{skip_note}The full per-module plan is stored in {where_plan}; "
                  f"the settings that produced it are in `{RECIPE_FILENAME}`.", ""]
    lines += ["## Calibration", ""] + _calibration_lines(model, config) + [""]

    lines += ["## Quality and size", ""]
    report = getattr(model, "hfptq_report", None)
    if report is not None and not isinstance(report, Mapping) and callable(getattr(report, "to_dict", None)):
        report = report.to_dict()  # a QualityReport object rather than its dict
    report_rows = _report_lines(report) if isinstance(report, Mapping) else []
    if report_rows:
        dataset_note = report.get("model")
        lines += [f"Measured by hfptq's evaluation pipeline{f' on `{dataset_note}`' if dataset_note else ''} "
                  "(float = the original model):", ""] + report_rows + [""]
    else:
        lines += ["No evaluation report was attached when this checkpoint was saved: measure the quality drop "
                  "with `hfptq run` (perplexity, accuracy, size, latency) before relying on it.", ""]
    ckpt = _checkpoint_bytes(folder)
    fp32 = _float32_bytes(model)
    if ckpt is not None:
        lines += [f"Checkpoint size on disk: {format_bytes(ckpt)} (safetensors), {100 * ckpt / fp32:.1f}% of the "
                  f"same model as an FP32 checkpoint ({format_bytes(fp32)}, computed from the parameter count).", ""]

    auto = _auto_class(model)
    if export is not None:
        return "\n".join(lines + _export_load_lines(export, auto, source) + [CARD_END, ""])
    lines += [
        "## How to load", "",
        "```bash", "pip install hfptq", "```", "",
        "```python",
        "import hfptq  # registers the 'hfptq' quantization method with Transformers",
        f"from transformers import {auto}", "",
        f'model = {auto}.from_pretrained("{source}")',
        "```", "",
        "The integer weights and the frozen scales load as they were saved; nothing is recalibrated. "
        "Without `import hfptq`, Transformers refuses to load this checkpoint (size mismatch on the "
        "placeholder `*.weight` tensors) instead of silently building a float model with missing weights.",
        CARD_END, "",
    ]
    return "\n".join(lines)


def _export_load_lines(export: Mapping[str, Any], auto: str, source: str) -> List[str]:
    """"How to load" of a compressed-tensors export: the engines that serve it, no hfptq needed."""
    lines = ["## Format and serving", "",
             f"Exported by hfptq in the **{export.get('format')}** format: loading it does not need hfptq. "
             "Engines that can serve it: " + ", ".join(export.get("engines") or []) + " (hfptq tests the reload with "
             "stock Transformers; vLLM and SGLang load the same compressed-tensors schemes but are not run by hfptq's "
             "tests).", ""]
    for note in export.get("vllm_notes") or []:
        lines.append(f"- vLLM caveat: {note}.")
    if export.get("untied"):
        lines.append(f"- {', '.join(export['untied'])}: untied from the quantized LM head and stored as a float table "
                     f"(+{format_bytes(export.get('untie_bytes'))}).")
    for deviation in export.get("deviations") or []:
        lines.append(f"- Not exact in this format (exported on request): {deviation}")
    measured = export.get("measured")
    if measured:
        lines.append(f"- Measured after reloading with stock Transformers: max |logit difference| "
                     f"{measured['max_abs_logit_diff']:.3g}, argmax agreement {100 * measured['argmax_agreement']:.1f}% "
                     f"({measured['tokens']} tokens).")
    if lines[-1] != "":
        lines.append("")
    lines += ["```bash", "pip install transformers compressed-tensors", "```", "", "```python",
              f"from transformers import {auto}", "", f'model = {auto}.from_pretrained("{source}")', "```", "",
              "```bash", f"vllm serve {source}", "```", ""]
    return lines


def _split_front_matter(text: str) -> Tuple[Dict[str, Any], str]:
    if text.startswith("---"):
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n?", text, flags=re.S)
        if match:
            try:
                meta = yaml.safe_load(match.group(1)) or {}
            except yaml.YAMLError:
                meta = {}
            if isinstance(meta, dict):
                return meta, text[match.end():]
    return {}, text


def merge_model_card(existing: Optional[str], card: str) -> str:
    """Combine an existing ``README.md`` with hfptq's ``card``.

    * no existing card, an earlier hfptq card, or Transformers' default template: hfptq's card
      (front-matter tags merged);
    * a card with an hfptq section: only that section is replaced;
    * any other (hand-written) card: kept, with hfptq's section appended.
    """
    new_meta, new_body = _split_front_matter(card)
    if not existing or not existing.strip():
        return card
    old_meta, old_body = _split_front_matter(existing)
    meta = dict(old_meta)
    for key, value in new_meta.items():
        if key == "tags":
            tags = list(old_meta.get("tags") or [])
            tags += [t for t in value if t not in tags]
            meta["tags"] = tags
        else:
            meta[key] = value
    section = new_body[new_body.index(CARD_BEGIN):] if CARD_BEGIN in new_body else new_body
    if CARD_BEGIN in old_body and CARD_END in old_body:
        start = old_body.index(CARD_BEGIN)
        end = old_body.index(CARD_END) + len(CARD_END)
        body = old_body[:start] + section.rstrip("\n") + old_body[end:]
        if not old_body[:start].strip() and not old_body[end:].strip():
            body = new_body
    elif any(marker in old_body for marker in _TRANSFORMERS_TEMPLATE_MARKERS):
        body = new_body
    else:
        body = old_body.rstrip("\n") + "\n\n" + section
    return "---\n" + yaml.safe_dump(meta, sort_keys=False).rstrip() + "\n---\n" + body.lstrip("\n")


def write_model_card(folder: Union[str, os.PathLike], model: nn.Module, *,
                     existing: Optional[Union[str, os.PathLike]] = None, load_from: Optional[str] = None,
                     export: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``README.md`` into ``folder``, merged with the card at ``existing`` (see :func:`merge_model_card`).

    Example:
        >>> write_model_card("out/model", model)   # doctest: +SKIP
        PosixPath('out/model/README.md')
    """
    from .checkpoint import CARD_FILENAME

    folder = Path(folder)
    card = render_model_card(model, load_from=load_from, checkpoint_dir=folder, export=export)
    old = None
    if existing is not None and Path(existing).is_file():
        old = Path(existing).read_text(encoding="utf-8")
    path = folder / CARD_FILENAME
    path.write_text(merge_model_card(old, card), encoding="utf-8")
    return path

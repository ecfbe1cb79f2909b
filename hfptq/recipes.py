"""Recipes: versioned YAML files that drive the whole pipeline.

A recipe names the model, the quantization (the fields of :class:`~hfptq.HfPtqConfig`), the
evaluation to run and where to write the results. It is validated strictly: an unknown key is an
error that points at the file and line and suggests the closest valid key.

Schema (version 1)::

    version: 1
    name: gemma3-270m-default          # free text, used for the output folder
    description: ...
    model:
      name_or_path: gemma3-270m        # alias (gemma3-270m, smollm2-135m), local dir, or Hub id; null = default
      dtype: float32                   # float32 | bfloat16 | float16
      task: causal-lm                  # causal-lm | sequence-classification
      num_labels: null                 # sequence-classification only
    quantization:                      # any HfPtqConfig field
      activations: static
      calibration: {dataset: wikitext, config: wikitext-2-raw-v1, split: validation, num_samples: 128, seq_len: 512}
    evaluation:
      perplexity: {dataset: wikitext, config: wikitext-2-raw-v1, split: test, seq_len: 512, max_windows: 40}
      piqa: {limit: 200}
      ag_news: {limit: 200}
      latency: {prompt_len: 128, new_tokens: 16, repeats: 3}
      layer_error: {num_samples: 2}
      sensitivity: {top_k: 10, num_samples: 2}
    output:
      dir: outputs/gemma3-270m-default
      save: true
      push_to_hub: null                # or {repo_id: me/model, private: true}
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import yaml

from .config import HfPtqConfig
from .errors import HfPtqError, RecipeError, suggest

RECIPE_VERSION = 1

_SCHEMA: Dict[str, Any] = {
    "version": int,
    "name": str,
    "description": str,
    "model": {"name_or_path": (str, type(None)), "dtype": str, "task": str, "num_labels": (int, type(None)),
              "revision": str},
    "quantization": {k: object for k in HfPtqConfig._field_names() if k not in ("plan", "format_version")},
    "evaluation": {
        "perplexity": {"dataset": str, "config": (str, type(None)), "split": str, "data_files": object,
                       "text_column": str, "seq_len": int, "stride": (int, type(None)), "max_windows": (int, type(None)),
                       "batch_size": int},
        "piqa": {"split": str, "limit": (int, type(None)), "seed": (int, type(None)), "batch_size": int},
        "ag_news": {"split": str, "limit": (int, type(None)), "seed": (int, type(None)), "batch_size": int,
                    "template": str, "max_length": int},
        "latency": {"batch_size": int, "prompt_len": int, "new_tokens": int, "repeats": int, "warmup": int,
                    "threads": (int, type(None))},
        "layer_error": {"num_samples": int, "seq_len": int},
        "sensitivity": {"top_k": int, "num_samples": int, "seq_len": int, "method": str},
    },
    "output": {"dir": str, "save": bool, "max_shard_size": (str, type(None)), "plots": bool,
               "push_to_hub": (dict, type(None)), "format": str, "allow_deviation": bool},
}
_TASKS = ("causal-lm", "sequence-classification")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Recipe:
    """A validated recipe. ``source`` is the file it came from (None when built in code)."""

    name: str
    model: Dict[str, Any] = field(default_factory=dict)
    quantization: Dict[str, Any] = field(default_factory=dict)
    evaluation: Dict[str, Any] = field(default_factory=dict)
    output: Dict[str, Any] = field(default_factory=dict)
    description: str = ""
    version: int = RECIPE_VERSION
    source: Optional[str] = None

    # ---------------------------------------------------------------- conversions
    def to_config(self) -> HfPtqConfig:
        """The :class:`HfPtqConfig` this recipe asks for (validated)."""
        try:
            return HfPtqConfig(**copy.deepcopy(self.quantization))
        except HfPtqError as exc:
            raise RecipeError(f"{self.source or 'recipe'}: quantization: {exc}") from exc

    @classmethod
    def from_config(cls, config: HfPtqConfig, name: str = "from-config", **sections: Any) -> "Recipe":
        """Build a recipe around a config (``config -> recipe -> config`` round-trips)."""
        return cls(name=name, quantization=config_to_quantization_section(config), **sections)

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"version": self.version, "name": self.name}
        if self.description:
            out["description"] = self.description
        for key in ("model", "quantization", "evaluation", "output"):
            value = getattr(self, key)
            if value:
                out[key] = copy.deepcopy(value)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)

    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.write_text(self.to_yaml())
        return path

    @property
    def task(self) -> str:
        return self.model.get("task", "causal-lm")

    def output_dir(self, override: Optional[str] = None) -> Path:
        return Path(override or self.output.get("dir") or os.path.join("outputs", self.name))


def config_to_quantization_section(config: HfPtqConfig) -> Dict[str, Any]:
    """The recipe ``quantization`` section for a config: its fields minus the resolved plan and defaults noise."""
    data = config.to_dict()
    for key in ("quant_method", "plan", "format_version"):
        data.pop(key, None)
    return {k: v for k, v in data.items() if v is not None}


# -------------------------------------------------------------------- loading / validation


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key."""


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"duplicate key {key!r} (first at line {first})")
        self.key, self.line, self.first = key, line, first


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode, deep: bool = False):
    mapping = {}
    lines = {}
    loader.flatten_mapping(node)  # YAML merge keys (<<: *anchor)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in lines:
            # PyYAML keeps the last value silently; a recipe with two `alpha:` lines is a mistake
            raise _DuplicateKey(key, key_node.start_mark.line + 1, lines[key])
        mapping[key] = loader.construct_object(value_node, deep=deep)
        lines[key] = key_node.start_mark.line + 1
    mapping_with_lines = _LinedDict(mapping)
    mapping_with_lines.lines = lines
    return mapping_with_lines


class _LinedDict(dict):
    lines: Dict[str, int]


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _where(source: str, mapping: Mapping, key: str) -> str:
    line = getattr(mapping, "lines", {}).get(key)
    return f"{source}:{line}" if line else source


def _validate(section: Mapping, schema: Mapping, path: str, source: str) -> None:
    for key, value in section.items():
        if key not in schema:
            raise RecipeError(
                f"{_where(source, section, key)}: unknown key {path}{key!s}.{suggest(key, schema)} "
                f"Valid keys here: {', '.join(map(str, schema))}."
            )
        expected = schema[key]
        if isinstance(expected, dict):
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise RecipeError(f"{_where(source, section, key)}: {path}{key} must be a mapping.")
            _validate(value, expected, f"{path}{key}.", source)
        elif expected is not object:
            types = expected if isinstance(expected, tuple) else (expected,)
            if isinstance(value, bool):
                ok = bool in types
            else:
                ok = isinstance(value, types)
            if not ok:
                names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise RecipeError(
                    f"{_where(source, section, key)}: {path}{key} must be {names} (got {value!r})."
                )


def load_recipe(path_or_text: Union[str, Path, Mapping[str, Any]], *, source: Optional[str] = None) -> Recipe:
    """Load and validate a recipe from a YAML file path, YAML text, or a mapping.

    Raises:
        RecipeError: unknown keys (with the line and a suggestion), wrong types, a newer
            ``version``, or an invalid ``quantization`` section (checked by building the config).

    Example:
        >>> r = load_recipe("version: 1\\nname: demo\\nquantization: {activations: dynamic}\\n")
        >>> r.to_config().activations["mode"]
        'dynamic'
    """
    if isinstance(path_or_text, Mapping):
        data = path_or_text
        source = source or "<dict>"
    else:
        text = str(path_or_text)
        if isinstance(path_or_text, Path) or (("\n" not in text) and text.endswith((".yaml", ".yml"))):
            path = Path(text)
            if not path.exists():
                raise RecipeError(f"Recipe file {path} does not exist. Recipes shipped with hfptq live in recipes/.")
            source = source or str(path)
            text = path.read_text()
        else:
            source = source or "<string>"
        try:
            data = yaml.load(text, Loader=_LineLoader)
        except _DuplicateKey as exc:
            raise RecipeError(
                f"{source}:{exc.line}: duplicate key {exc.key!r} (also at line {exc.first}); YAML would keep only "
                "the last one. Remove one of them."
            ) from None
        except yaml.YAMLError as exc:
            raise RecipeError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise RecipeError(f"{source}: a recipe is a YAML mapping with keys {', '.join(_SCHEMA)}.")
    _validate(data, _SCHEMA, "", source)
    version = data.get("version", RECIPE_VERSION)
    if version < 1:
        raise RecipeError(
            f"{_where(source, data, 'version')}: version={version} is not a recipe version: write version: "
            f"{RECIPE_VERSION}."
        )
    if version > RECIPE_VERSION:
        raise RecipeError(
            f"{_where(source, data, 'version')}: recipe version {version} is newer than this hfptq understands "
            f"({RECIPE_VERSION}); upgrade hfptq."
        )
    model = _plain(data.get("model") or {})
    if model.get("task", "causal-lm") not in _TASKS:
        raise RecipeError(
            f"{_where(source, data['model'], 'task')}: model.task={model['task']!r}.{suggest(model['task'], _TASKS)} "
            f"Choose one of: {', '.join(_TASKS)}."
        )
    if model.get("dtype", "float32") not in _DTYPES:
        raise RecipeError(
            f"{_where(source, data['model'], 'dtype')}: model.dtype={model['dtype']!r}; choose one of {', '.join(_DTYPES)}."
        )
    output_format = (data.get("output") or {}).get("format", "hfptq")
    from .options import CHECKPOINT_FORMATS as FORMATS

    if output_format not in FORMATS:
        raise RecipeError(
            f"{_where(source, data['output'], 'format')}: output.format={output_format!r}.{suggest(output_format, FORMATS)} "
            f"Choose one of: {', '.join(FORMATS)} (compressed-tensors: loads without hfptq, served by vLLM/SGLang)."
        )
    name = data.get("name") or (Path(source).stem if source and source.endswith((".yaml", ".yml")) else "recipe")
    recipe = Recipe(
        name=str(name), model=model, quantization=_plain(data.get("quantization") or {}),
        evaluation=_plain(data.get("evaluation") or {}), output=_plain(data.get("output") or {}),
        description=str(data.get("description") or ""), version=int(version), source=source,
    )
    quantization = data.get("quantization") or {}
    _check_option_sections(quantization, source)
    calibration = quantization.get("calibration") if isinstance(quantization, Mapping) else None
    for key, value in (calibration.items() if isinstance(calibration, Mapping) else ()):
        if isinstance(value, str) and value.startswith("<in-memory"):
            raise RecipeError(
                f"{_where(source, calibration, key)}: quantization.calibration.{key} is {value}: the checkpoint this "
                "recipe was saved with was calibrated on an in-memory object, which a recipe cannot hold. Save it "
                "(e.g. Dataset.to_json('calib.jsonl')) and name it here (dataset: json, data_files: calib.jsonl)."
            )
    try:
        recipe.to_config()  # validates the quantization section now, with the recipe's file in the error
    except RecipeError as exc:
        key = getattr(exc.__cause__, "key", None)
        line_of = key if key in quantization else None
        if line_of is None or not getattr(quantization, "lines", None):
            raise
        raise RecipeError(f"{_where(source, quantization, line_of)}: quantization: {exc.__cause__}") from exc.__cause__
    return recipe


def _check_option_sections(quantization: Mapping, source: str) -> None:
    """Check every option section of ``quantization`` against :mod:`hfptq.options`; errors carry the line."""
    from .options import check_options

    def check(section: str, values: Any, where: str, parent: Mapping, key: str) -> None:
        if isinstance(values, str) and section == "activations":
            values = {"mode": values}
        if values is None or values is True or values is False:
            return
        try:
            check_options(section, values, prefix=f"quantization.{where}")
        except HfPtqError as exc:
            bad = exc.key if isinstance(values, Mapping) and exc.key in values else None
            loc = _where(source, values, bad) if bad is not None else _where(source, parent, key)
            raise RecipeError(f"{loc}: {exc}", key=exc.key) from exc

    for section in ("weights", "activations", "calibration", "smoothquant", "gptq"):
        if section in quantization:
            check(section, quantization[section], section, quantization, section)
    rules = quantization.get("rules")
    if isinstance(rules, list):
        for index, rule in enumerate(rules):
            if isinstance(rule, Mapping):
                for section in ("weights", "activations"):
                    if section in rule:
                        check(section, rule[section], f"rules[{index}].{section}", rule, section)


def builtin_recipes_dir() -> Path:
    """The built-in recipes: ``hfptq/builtin_recipes`` of an installed wheel, else ``recipes/`` of the source tree.

    The YAML files live in the top-level ``recipes/`` folder; ``pyproject.toml`` ships it inside the
    package as ``hfptq.builtin_recipes``.

    Example:
        >>> (builtin_recipes_dir() / "default.yaml").is_file()
        True
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "builtin_recipes", here.parent / "recipes"):
        if candidate.is_dir() and any(candidate.glob("*.yaml")):
            return candidate
    return here.parent / "recipes"


def find_recipe(name_or_path: str) -> Path:
    """Resolve ``name_or_path``: an existing file, or the name of a built-in recipe (``default``)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    folder = builtin_recipes_dir()
    for candidate in (folder / name_or_path, folder / f"{name_or_path}.yaml"):
        if candidate.exists():
            return candidate
    known = sorted(p.stem for p in folder.glob("*.yaml"))
    raise RecipeError(f"No recipe file {name_or_path!r}.{suggest(name_or_path, known)} Built-in recipes: {', '.join(known)}.")

"""Datasets for calibration and evaluation: a *spec* in, text rows and token tensors out.

A spec is a plain mapping, usually the ``calibration`` section of :class:`~hfptq.config.HfPtqConfig` or a recipe
YAML block. Every field is optional except ``dataset``; :data:`DEFAULT_SPEC` lists the fields and their defaults::

    dataset: str | datasets.Dataset  # Hub name ("Salesforce/wikitext"), builder ("text", "json", "csv", "parquet",
                                     # "arrow") used with data_files, a local file or folder, or a ready Dataset
    config: str | None               # Hub config name, e.g. "wikitext-2-raw-v1"
    split: str = "validation"        # slicing works too: "validation[:500]"
    data_files: str | list | dict | None
    text_column: str = "text"
    template: str | None             # "Question: {goal}\\nAnswer: {sol1}", formatted with each row's fields
    num_samples: int = 128
    seq_len: int = 512
    shuffle: bool = True
    seed: int = 0
    packing: bool = True             # False: one row per sample, truncated; rows shorter than seq_len are skipped
    add_bos: bool | None = None      # None: follow the tokenizer (see :func:`wants_bos`)

Fields this module does not know are ignored, so a config section may carry more keys.

Offline data
------------
When ``HFPTQ_DATA_DIR`` is set (or ``data_dir=`` is given), well-known Hub datasets are read from the local files
in that folder instead of the Hub, through the ``datasets`` builders (``text``, ``json``, ``csv``), and come out
with the same rows and columns as the Hub version:

* ``Salesforce/wikitext`` / ``wikitext`` (configs ``wikitext-2-raw-v1``, ``wikitext-103-raw-v1``):
  validation -> ``wikitext-2-raw/wiki.valid.raw``, test -> ``wikitext-2-raw/wiki.test.canonical.raw``;
* ``ybisk/piqa`` / ``piqa``: validation -> ``piqa/valid.jsonl`` + ``piqa/valid-labels.lst`` (column ``label``);
* ``fancyzhx/ag_news`` / ``ag_news``: test -> ``ag_news_csv/test.csv`` + ``classes.txt`` (``text`` = title + " " +
  description, ``label`` 0-based, as on the Hub);
* ``EleutherAI/lambada_openai`` / ``lambada_openai``: test -> ``lambada_openai/lambada_test.jsonl``.

(WikiText-2 and WikiText-103 share their validation and test articles, so both raw configs map to the same files.
The non-raw configs, with ``<unk>`` substitutions, have no local copy.)

WikiText rows follow the Hub convention: one row per line, ``""`` for a blank line, every other row ending in
``"\\n"``, CRLF normalised to LF. The same convention applies to your own raw files when you name the dataset
``wikitext`` and give ``data_files``. Without the override and with ``HF_DATASETS_OFFLINE=1``, a Hub name that is
not in the local ``datasets`` cache fails with a :class:`~hfptq.errors.DataError` that says how to point at local
files.
"""
from __future__ import annotations

import logging
import os
import re
import string
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm

from hfptq.errors import DataError, suggest
from hfptq.offline.datasets import (
    DATA_DIR_ENV,
    base_split as _base_split,
    known_dataset as _known_dataset,
    local_copy,
    offline_hint as _offline_hint,
    shared_data_dir,
    wikitext_rows as _wikitext_rows,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DATA_DIR_ENV",
    "DEFAULT_SPEC",
    "calibration_batches",
    "iter_texts",
    "load_ag_news",
    "load_piqa",
    "load_split",
    "load_text_corpus",
    "resolve_source",
    "shared_data_dir",
    "tokenize_corpus",
    "wants_bos",
]

DEFAULT_SPEC: dict[str, Any] = {
    "dataset": None,
    "config": None,
    "split": "validation",
    "data_files": None,
    "text_column": "text",
    "template": None,
    "num_samples": 128,
    "seq_len": 512,
    "shuffle": True,
    "seed": 0,
    "packing": True,
    "add_bos": None,
}
"""Every spec field and its default."""

ROW_SEPARATOR = "\n\n"
"""Text put between consecutive rows when packing (the WikiText ``"\\n\\n".join(rows)`` convention)."""

_LOCAL_BUILDERS = ("text", "json", "csv", "parquet", "arrow")
_BUILDER_BY_SUFFIX = {
    ".txt": "text",
    ".raw": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
_ITER_BATCH = 256  # rows read (and tokenized) per step


# --------------------------------------------------------------------------------------------------------------
# Where the data comes from
# --------------------------------------------------------------------------------------------------------------
@dataclass
class _Source:
    """How to load one spec: ``datasets.load_dataset`` kwargs plus a row fix-up that makes local copies match."""

    load_kwargs: dict[str, Any]
    description: str
    postprocess: Callable[[datasets.Dataset], datasets.Dataset] | None = None
    hub: bool = False


def _normalize_spec(spec: Mapping[str, Any] | str | os.PathLike | datasets.Dataset, overrides: Mapping[str, Any]
                    ) -> dict[str, Any]:
    if isinstance(spec, (str, os.PathLike, datasets.Dataset, datasets.DatasetDict)):
        spec = {"dataset": spec}
    if not isinstance(spec, Mapping):
        raise DataError(
            f"dataset spec: expected a mapping such as {{'dataset': 'Salesforce/wikitext', "
            f"'config': 'wikitext-2-raw-v1'}}, a dataset name or a datasets.Dataset, got {type(spec).__name__}."
        )
    merged = {**DEFAULT_SPEC, **{k: v for k, v in spec.items() if v is not None}, **overrides}
    if merged["dataset"] is None:
        raise DataError("dataset: missing. Give a Hub name (e.g. 'Salesforce/wikitext'), a builder with "
                        "data_files (e.g. dataset: json, data_files: calib.jsonl), a local path or a datasets.Dataset.")
    if merged["split"] is None:
        merged["split"] = DEFAULT_SPEC["split"]
    if not isinstance(merged["split"], str):
        raise DataError(f"split: expected a split name such as 'validation', got {merged['split']!r}.")
    return merged


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).suffix.lower() in _BUILDER_BY_SUFFIX


def _files_for_split(data_files: Any, split: str) -> Any:
    """Register plain data files under the requested split so ``split=`` finds them."""
    if isinstance(data_files, Mapping):
        return {str(k): _as_str_files(v) for k, v in data_files.items()}
    return {_base_split(split): _as_str_files(data_files)}


def _as_str_files(files: Any) -> str | list[str]:
    # os.path, not Path: Path would collapse the "//" of URLs and hf:// paths.
    if isinstance(files, (str, os.PathLike)):
        return os.path.expanduser(os.fspath(files))
    if isinstance(files, Iterable):
        return [os.path.expanduser(os.fspath(f)) for f in files]
    raise DataError(f"data_files: expected a path, a list of paths or a {{split: paths}} mapping, got {files!r}.")


def _resolve(spec: Mapping[str, Any], data_dir: str | os.PathLike | None) -> _Source:
    dataset = spec["dataset"]
    if isinstance(dataset, (datasets.Dataset, datasets.DatasetDict)):
        return _Source({}, "in-memory dataset")
    if not isinstance(dataset, (str, os.PathLike)):
        raise DataError(
            f"dataset: expected a Hub name, a builder name ({', '.join(_LOCAL_BUILDERS)}), a local path or a "
            f"datasets.Dataset, got {type(dataset).__name__}."
        )
    name, split, config, data_files = str(dataset), spec["split"], spec["config"], spec["data_files"]
    known = _known_dataset(name)

    if known is not None and data_files is None:
        root = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
        if root is not None:
            kwargs, description, postprocess = local_copy(known, Path(root).expanduser(), config, split)
            return _Source(kwargs, description, postprocess=postprocess)
    if known is not None and known.key == "wikitext" and data_files is not None:
        # The user's own WikiText raw files: the text builder plus the Hub row convention.
        return _Source(
            {"path": "text", "data_files": _files_for_split(data_files, split), "split": split,
             "keep_linebreaks": True},
            f"WikiText raw files {data_files!r}",
            postprocess=_wikitext_rows,
        )

    if name in _LOCAL_BUILDERS:
        if data_files is None:
            raise DataError(f"data_files: dataset {name!r} is a local builder and needs data_files, e.g. "
                            f"dataset: {name}, data_files: path/to/file.")
        return _Source({"path": name, "data_files": _files_for_split(data_files, split), "split": split},
                       f"{name} files {data_files!r}")

    path = Path(name).expanduser()
    if path.is_file():
        builder = _BUILDER_BY_SUFFIX.get(path.suffix.lower())
        if builder is None:
            raise DataError(
                f"dataset: cannot tell the format of {str(path)!r} from its suffix (known: "
                f"{', '.join(sorted(_BUILDER_BY_SUFFIX))}). Set dataset to a builder ({', '.join(_LOCAL_BUILDERS)}) "
                f"and data_files: {str(path)!r}."
            )
        return _Source({"path": builder, "data_files": {_base_split(split): str(path)}, "split": split},
                       f"local file {str(path)!r}")
    if path.is_dir():
        kwargs: dict[str, Any] = {"path": str(path), "split": split}
        if data_files is not None:
            kwargs["data_files"] = _files_for_split(data_files, split)
        return _Source(kwargs, f"local folder {str(path)!r}")
    if _looks_like_path(name):
        raise DataError(f"dataset: local path {name!r} does not exist (resolved to {str(path.resolve())!r}).")

    kwargs = {"path": name, "split": split}
    if config is not None:
        kwargs["name"] = config
    if data_files is not None:
        kwargs["data_files"] = data_files
    label = f"{name!r}" + (f" ({config})" if config else "")
    return _Source(kwargs, f"Hub dataset {label}", hub=True)


def resolve_source(spec: Mapping[str, Any], *, data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Return the keyword arguments :func:`load_split` gives to ``datasets.load_dataset`` for ``spec``.

    Applies the offline override: with ``data_dir`` (or ``$HFPTQ_DATA_DIR``) set, well-known Hub datasets map to
    local files (see the module docstring). Plain data files are registered under the requested split. For a
    ready ``datasets.Dataset`` nothing is loaded and the result is ``{}``.

    Raises:
        DataError: the spec names a missing local path, a builder without ``data_files``, or a config/split
            that has no local copy under the override.

    Example:
        >>> resolve_source({"dataset": "json", "data_files": "calib.jsonl", "split": "train"})
        {'path': 'json', 'data_files': {'train': 'calib.jsonl'}, 'split': 'train'}
        >>> resolve_source({"dataset": "Salesforce/wikitext", "config": "wikitext-2-raw-v1", "split": "test"},
        ...                data_dir="../shared/data")["data_files"]  # doctest: +SKIP
        {'test': '../shared/data/wikitext-2-raw/wiki.test.canonical.raw'}
    """
    return dict(_resolve(_normalize_spec(spec, {}), data_dir).load_kwargs)


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------
def _load(source: _Source) -> datasets.Dataset:
    kwargs = source.load_kwargs
    try:
        return datasets.load_dataset(**kwargs)
    except ConnectionError as exc:
        raise DataError(
            f"dataset: could not load {source.description}: the Hugging Face Hub is unreachable "
            f"(offline mode or no network; {exc}). {_offline_hint()}"
        ) from exc
    except FileNotFoundError as exc:
        if source.hub:
            raise DataError(
                f"dataset: {source.description} was not found on the Hub or in the local cache ({exc}). Check the "
                f"name and config. {_offline_hint()}"
            ) from exc
        raise DataError(f"data_files: {exc}. Check the paths in data_files / dataset.") from exc
    except datasets.exceptions.DatasetGenerationError as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, datasets.arrow_writer.SchemaInferenceError):
            raise DataError(f"split: {kwargs.get('split')!r} of {source.description} is empty (the data files "
                            f"hold no rows); check the data files.") from exc
        raise DataError(f"data_files: could not read {source.description}: {cause}") from exc
    except ValueError as exc:
        match = re.search(r"Unknown split .*Should be one of \[(.*)\]", str(exc))
        if match:
            available = re.findall(r"[\w.-]+", match.group(1))
            split = str(kwargs.get("split"))
            raise DataError(
                f"split: {split!r} is not a split of {source.description}; available: {', '.join(available)}."
                f"{suggest(_base_split(split), available)}"
            ) from exc
        raise DataError(f"dataset: could not load {source.description}: {exc}") from exc


def load_split(spec: Mapping[str, Any] | str | os.PathLike | datasets.Dataset, *,
               data_dir: str | os.PathLike | None = None, **overrides: Any) -> datasets.Dataset:
    """Load one split of a dataset spec as a ``datasets.Dataset``.

    ``spec`` may be a spec mapping, a bare dataset name/path, or a ready ``Dataset`` (returned as is; a
    ``DatasetDict`` gives its ``split``). ``overrides`` replace spec fields, e.g. ``split="test"``.

    Raises:
        DataError: unknown split (the message lists the available ones), empty split, missing files, or the Hub
            being unreachable (the message says how to use local files instead).

    Example:
        >>> ds = load_split({"dataset": "json", "data_files": "calib.jsonl"}, split="train")  # doctest: +SKIP
        >>> ds = load_split("Salesforce/wikitext", config="wikitext-2-raw-v1", split="test")  # doctest: +SKIP
    """
    merged = _normalize_spec(spec, overrides)
    source = _resolve(merged, data_dir)
    dataset = merged["dataset"]
    if isinstance(dataset, datasets.DatasetDict):
        split = merged["split"]
        if split not in dataset:
            raise DataError(f"split: {split!r} is not in the given DatasetDict; available: "
                            f"{', '.join(dataset)}.{suggest(split, dataset)}")
        ds = dataset[split]
        description = f"split {split!r} of the given DatasetDict"
    elif isinstance(dataset, datasets.Dataset):
        ds, description = dataset, "the given Dataset"
    else:
        logger.info("Loading %s, split %r", source.description, merged["split"])
        ds = _load(source)
        description = f"split {merged['split']!r} of {source.description}"
        if source.postprocess is not None:
            ds = source.postprocess(ds)
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"dataset: expected one split (a datasets.Dataset), got {type(ds).__name__}; set split.")
    if len(ds) == 0:
        raise DataError(f"split: {description} is empty; choose another split or check the data files.")
    return ds


def _template_fields(template: str) -> list[str]:
    fields = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise DataError(f"template: {template!r} is not a valid format string ({exc}); write fields as {{name}} "
                        f"and literal braces as {{{{ }}}}.") from exc
    for _, field_name, _, _ in parsed:
        if field_name is None:
            continue
        base = re.split(r"[.\[]", field_name, maxsplit=1)[0]
        if not base or base.isdigit():
            raise DataError(f"template: {template!r} uses a positional field {{{field_name}}}; name a column, e.g. "
                            f"{{text}}.")
        fields.append(base)
    return fields


def iter_texts(ds: datasets.Dataset, text_column: str = "text", template: str | None = None) -> Iterator[str]:
    """Yield one string per row: ``row[text_column]``, or ``template.format(**row)`` when a template is given.

    Columns are checked before the first row is read. ``None`` values count as ``""``.

    Raises:
        DataError: the text column or a template field is not a column (the message lists the columns), or the
            text column does not hold strings.

    Example:
        >>> ds = datasets.Dataset.from_dict({"goal": ["Open a jar"], "sol1": ["Twist the lid."]})
        >>> list(iter_texts(ds, template="Question: {goal}\\nAnswer: {sol1}"))
        ['Question: Open a jar\\nAnswer: Twist the lid.']
    """
    columns = list(ds.column_names)
    if template is not None:
        if not isinstance(template, str):
            raise DataError(f"template: expected a format string, got {type(template).__name__}.")
        for name in _template_fields(template):
            if name not in columns:
                raise DataError(f"template: field {{{name}}} is not a column of the dataset; available columns: "
                                f"{', '.join(columns)}.{suggest(name, columns)}")
        return (template.format(**row) for batch in ds.iter(batch_size=_ITER_BATCH) for row in _rows(batch))
    if text_column not in columns:
        raise DataError(
            f"text_column: {text_column!r} is not a column of the dataset; available columns: {', '.join(columns)}."
            f"{suggest(text_column, columns)} Set text_column to one of them, or set a template to combine fields "
            f"(e.g. '{{{columns[0] if columns else 'field'}}}')."
        )
    feature = ds.features[text_column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise DataError(f"text_column: column {text_column!r} holds {feature}, not text. Pick a text column or "
                        f"set a template, e.g. template: '{{{text_column}}}'.")
    return (t or "" for batch in ds.iter(batch_size=_ITER_BATCH) for t in batch[text_column])


def _rows(batch: Mapping[str, list]) -> Iterator[dict[str, Any]]:
    keys = list(batch)
    for values in zip(*(batch[k] for k in keys)):
        yield {k: "" if v is None else v for k, v in zip(keys, values)}


# --------------------------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------------------------
def wants_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` prepends a BOS token to a plain input (Gemma and Llama do; GPT-2 and SmolLM2 don't).

    Decided by what the tokenizer actually does with ``add_special_tokens=True`` (``add_bos_token`` is not
    reliable: Gemma's is ``False`` while its post-processor adds ``<bos>``), or ``add_bos_token=True``.

    Example:
        >>> wants_bos(AutoTokenizer.from_pretrained("google/gemma-3-270m"))  # doctest: +SKIP
        True
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    if getattr(tokenizer, "add_bos_token", False) is True:
        return True
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _resolve_bos(tokenizer: Any, add_bos: bool | None) -> int | None:
    """BOS id to prepend to each window, or None."""
    if add_bos is None:
        add_bos = wants_bos(tokenizer)
    if not add_bos:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise DataError("add_bos: True, but the tokenizer has no bos_token; set add_bos: false (or null).")
    return int(bos)


def tokenize_corpus(text: str, tokenizer: Any, add_bos: bool | None = None) -> torch.LongTensor:
    """Tokenize a whole corpus in one call; returns the 1-D ids, with no special token inside.

    By default (``add_bos`` ``None`` or ``False``) there is no BOS at all: windowed evaluation cuts this stream and
    prepends BOS to every window itself when :func:`wants_bos` says so. ``add_bos=True`` puts one BOS at position
    0, which reproduces ``tokenizer(text).input_ids`` for BOS tokenizers such as Gemma's.

    Raises:
        DataError: ``text`` is not a str, or ``add_bos=True`` and the tokenizer has no BOS token.

    Example:
        >>> text = load_text_corpus({"dataset": "wikitext", "config": "wikitext-2-raw-v1", "split": "test"})
        ... # doctest: +SKIP
        >>> ids = tokenize_corpus(text, tokenizer)  # doctest: +SKIP
        >>> bos_token_id = tokenizer.bos_token_id if wants_bos(tokenizer) else None  # per window  # doctest: +SKIP
    """
    if not isinstance(text, str):
        raise DataError(f"text: expected the corpus as one str, got {type(text).__name__}.")
    logger.info("Tokenizing a corpus of %d characters", len(text))
    # verbose=False: the corpus is longer than model_max_length on purpose; it is windowed later.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    bos = _resolve_bos(tokenizer, bool(add_bos))
    if bos is not None:
        ids = [bos, *ids]
    return torch.tensor(ids, dtype=torch.long)


def load_text_corpus(spec: Mapping[str, Any], *, data_dir: str | os.PathLike | None = None) -> str:
    """Return a whole split as ONE string: ``"\\n\\n".join(rows)``, the WikiText perplexity convention.

    Rows come from ``text_column`` (or ``template``); ``"\\r\\n"`` is normalised to ``"\\n"``. With the offline
    override, local WikiText files give exactly the Hub rows, hence the same corpus Hub users get.

    Example:
        >>> text = load_text_corpus({"dataset": "Salesforce/wikitext", "config": "wikitext-2-raw-v1",
        ...                          "split": "test"})  # doctest: +SKIP
        >>> text.startswith("\\n\\n = Robert Boulter = \\n")  # doctest: +SKIP
        True
    """
    merged = _normalize_spec(spec, {})
    ds = load_split(merged, data_dir=data_dir)
    text = ROW_SEPARATOR.join(iter_texts(ds, merged["text_column"], merged["template"]))
    return text.replace("\r\n", "\n")


def _positive_int(spec: Mapping[str, Any], field: str) -> int:
    value = spec[field]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DataError(f"{field}: expected a positive integer, got {value!r}.")
    return value


def calibration_batches(spec: Mapping[str, Any], tokenizer: Any, *, progress: bool = True,
                        data_dir: str | os.PathLike | None = None) -> torch.LongTensor:
    """Token windows for calibration: a ``[num_samples, seq_len]`` LongTensor.

    Rows are shuffled with ``seed`` (when ``shuffle``) and tokenized in that order, stopping as soon as enough
    tokens are collected, so large splits are never tokenized in full. Empty rows are skipped.

    * ``packing=True``: rows are joined with :data:`ROW_SEPARATOR` (``"\\n\\n"``, as in ``"\\n\\n".join(rows)``;
      no EOS is put inside windows) and the stream is cut into consecutive windows; the first ``num_samples`` are
      returned.
    * ``packing=False``: one row per sample, truncated to ``seq_len``; rows shorter than that are skipped.

    When BOS is wanted (``add_bos``, or :func:`wants_bos` when it is ``None``) every window starts with BOS
    followed by ``seq_len - 1`` text tokens. If the split yields fewer than ``num_samples`` windows but at least
    one, a warning is logged and the available windows are returned. The result depends only on the spec.

    Raises:
        DataError: ``num_samples``/``seq_len`` not positive, bad columns or template, or too few tokens for a
            single window (the message gives found vs needed and what to change).

    Example:
        >>> spec = {"dataset": "Salesforce/wikitext", "config": "wikitext-2-raw-v1", "split": "validation",
        ...         "num_samples": 8, "seq_len": 256}
        >>> calibration_batches(spec, tokenizer).shape  # doctest: +SKIP
        torch.Size([8, 256])
    """
    merged = _normalize_spec(spec, {})
    num_samples = _positive_int(merged, "num_samples")
    seq_len = _positive_int(merged, "seq_len")
    seed = merged["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed: expected an integer, got {seed!r}.")
    bos = _resolve_bos(tokenizer, merged["add_bos"])
    text_len = seq_len - (bos is not None)
    if text_len <= 0:
        raise DataError(f"seq_len: {seq_len} leaves no room for text after the BOS token; use seq_len >= 2.")

    ds = load_split(merged, data_dir=data_dir)
    if merged["shuffle"]:
        ds = ds.shuffle(seed=seed, keep_in_memory=True)
    texts = iter_texts(ds, merged["text_column"], merged["template"])
    name = merged["dataset"] if isinstance(merged["dataset"], (str, os.PathLike)) else "the given dataset"
    what = f"split {merged['split']!r} of {str(name)!r}"
    make_windows = _packed_windows if merged["packing"] else _row_windows
    windows = make_windows(texts, tokenizer, num_samples, text_len, progress=progress, what=what)
    if bos is not None:
        windows = [[bos, *w] for w in windows]
    return torch.tensor(windows, dtype=torch.long).reshape(len(windows), seq_len)


def _tokenized_rows(texts: Iterator[str], tokenizer: Any) -> Iterator[list[int]]:
    """Token ids of each non-empty row, tokenizing a batch of rows at a time."""
    batch: list[str] = []
    for text in texts:
        if text.strip():
            batch.append(text)
        if len(batch) == _ITER_BATCH:
            yield from tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
            batch = []
    if batch:
        yield from tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]


def _packed_windows(texts: Iterator[str], tokenizer: Any, num_samples: int, text_len: int, *, progress: bool,
                    what: str) -> list[list[int]]:
    needed = num_samples * text_len
    separator = tokenizer(ROW_SEPARATOR, add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    with tqdm(total=needed, unit="tok", desc="Tokenizing calibration data", disable=not progress) as bar:
        for ids in _tokenized_rows(texts, tokenizer):
            before = len(stream)
            if stream:
                stream.extend(separator)
            stream.extend(ids)
            bar.update(min(len(stream), needed) - min(before, needed))
            if len(stream) >= needed:
                break
    found = min(len(stream) // text_len, num_samples)
    if found == 0:
        raise DataError(
            f"seq_len: {what} has only {len(stream)} tokens, but one sample needs {text_len} text tokens. Lower "
            f"seq_len (and num_samples), or use a larger split."
        )
    if found < num_samples:
        logger.warning("%s has %d tokens: only %d of num_samples=%d windows of %d tokens; calibrating on %d.",
                       what, len(stream), found, num_samples, text_len, found)
    return [stream[i * text_len:(i + 1) * text_len] for i in range(found)]


def _row_windows(texts: Iterator[str], tokenizer: Any, num_samples: int, text_len: int, *, progress: bool,
                 what: str) -> list[list[int]]:
    windows: list[list[int]] = []
    longest = skipped = 0
    with tqdm(total=num_samples, unit="sample", desc="Tokenizing calibration data", disable=not progress) as bar:
        for ids in _tokenized_rows(texts, tokenizer):
            longest = max(longest, len(ids))
            if len(ids) < text_len:
                skipped += 1
                continue
            windows.append(ids[:text_len])
            bar.update(1)
            if len(windows) == num_samples:
                break
    if not windows:
        raise DataError(
            f"seq_len: no row of {what} has {text_len} tokens (the longest has {longest}), and packing is off. "
            f"Lower seq_len or set packing: true."
        )
    if len(windows) < num_samples:
        logger.warning("%s: only %d rows have >= %d tokens (%d shorter rows skipped); calibrating on %d of "
                       "num_samples=%d. Set packing: true to use every row.", what, len(windows), text_len, skipped,
                       len(windows), num_samples)
    return windows


# --------------------------------------------------------------------------------------------------------------
# Evaluation sets
# --------------------------------------------------------------------------------------------------------------
def _shuffled_head(ds: datasets.Dataset, limit: int | None, seed: int | None, field: str = "limit"
                   ) -> datasets.Dataset:
    if seed is not None:
        ds = ds.shuffle(seed=seed, keep_in_memory=True)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise DataError(f"{field}: expected a positive integer or None, got {limit!r}.")
        ds = ds.select(range(min(limit, len(ds))))
    return ds


def load_piqa(split: str = "validation", limit: int | None = None, seed: int | None = None, *,
              data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """PIQA rows ``{"goal", "sol1", "sol2", "label"}`` with ``label`` 0 (``sol1`` correct) or 1 (``sol2``).

    ``seed`` shuffles before taking the first ``limit`` rows; without it the file order is kept.

    Example:
        >>> rows = load_piqa(limit=2)  # doctest: +SKIP
        >>> sorted(rows[0])  # doctest: +SKIP
        ['goal', 'label', 'sol1', 'sol2']
    """
    ds = load_split({"dataset": "ybisk/piqa", "split": split}, data_dir=data_dir)
    missing = {"goal", "sol1", "sol2", "label"} - set(ds.column_names)
    if missing:
        raise DataError(f"PIQA split {split!r} lacks columns {sorted(missing)} (has {ds.column_names}).")
    ds = _shuffled_head(ds, limit, seed)
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(r["label"])} for r in ds]


def load_ag_news(split: str = "test", limit: int | None = None, seed: int | None = None, *,
                 data_dir: str | os.PathLike | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """AG News rows ``{"text", "label"}`` (0-based: World, Sports, Business, Sci/Tech) and the label names.

    The text is ``title + " " + description`` exactly as on the Hub (the upstream backslash line-break escapes are
    kept, as the Hub keeps them). ``seed`` shuffles before taking the first ``limit`` rows.

    Example:
        >>> rows, names = load_ag_news(limit=4, seed=0)  # doctest: +SKIP
        >>> names  # doctest: +SKIP
        ['World', 'Sports', 'Business', 'Sci/Tech']
    """
    ds = load_split({"dataset": "fancyzhx/ag_news", "split": split}, data_dir=data_dir)
    label_feature = ds.features.get("label")
    if "text" not in ds.column_names or label_feature is None:
        raise DataError(f"AG News split {split!r} lacks the text/label columns (has {ds.column_names}).")
    names = list(getattr(label_feature, "names", None) or ["World", "Sports", "Business", "Sci/Tech"])
    ds = _shuffled_head(ds, limit, seed)
    return [{"text": r["text"], "label": int(r["label"])} for r in ds], names

"""Offline dataset mirrors: well-known Hub datasets read from a local folder (the ``shared/data`` layout).

With ``$HFPTQ_DATA_DIR`` (or ``data_dir=``) set, :mod:`hfptq.data` maps these Hub names to local
files and rewrites their rows to match the Hub's exactly:

=================  ======================================  =====================================
dataset            local file (relative to the folder)     rows
=================  ======================================  =====================================
wikitext           ``wikitext-2-raw/wiki.{valid,test}...``  Hub WikiText rows (``""`` for blanks)
piqa               ``piqa/valid.jsonl`` + labels            ``label`` column attached
ag_news            ``ag_news_csv/test.csv``                 ``text = title + " " + description``
lambada_openai     ``lambada_openai/lambada_test.jsonl``    as is
=================  ======================================  =====================================

Example:
    >>> known_dataset("piqa").splits["validation"]
    'piqa/valid.jsonl'
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from ..errors import DataError, suggest

__all__ = [
    "DATA_DIR_ENV",
    "KNOWN_DATASETS",
    "KnownDataset",
    "base_split",
    "known_dataset",
    "local_copy",
    "offline_hint",
    "shared_data_dir",
    "wikitext_rows",
]

DATA_DIR_ENV = "HFPTQ_DATA_DIR"
"""Environment variable naming the offline data folder (layout of ``shared/data``)."""


def shared_data_dir() -> Path | None:
    """Return the offline data folder, or ``None`` when there is none.

    Looks at ``$HFPTQ_DATA_DIR`` first (returned as given, even if it does not exist, so a typo surfaces as an
    error later), then for a ``shared/data`` folder next to the project: ``../shared/data`` relative to the
    repository root, then relative to the current directory.

    Example:
        >>> root = shared_data_dir()  # doctest: +SKIP
        >>> load_split({"dataset": "Salesforce/wikitext", "config": "wikitext-2-raw-v1"}, data_dir=root)
        ... # doctest: +SKIP
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parent.parent.parent
    for candidate in (repo_root.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    return None


@dataclass(frozen=True)
class KnownDataset:
    """A Hub dataset with a local copy in the offline data folder."""

    key: str
    hub_name: str
    names: tuple[str, ...]  # lower-case names that select it
    configs: tuple[str | None, ...]
    splits: Mapping[str, str]  # split -> main data file, relative to the data dir
    builder: str
    builder_kwargs: Mapping[str, Any]


KNOWN_DATASETS = (
    KnownDataset(
        key="wikitext",
        hub_name="Salesforce/wikitext",
        names=("wikitext", "salesforce/wikitext"),
        configs=(None, "wikitext-2-raw-v1", "wikitext-103-raw-v1"),
        splits={"validation": "wikitext-2-raw/wiki.valid.raw", "test": "wikitext-2-raw/wiki.test.canonical.raw"},
        builder="text",
        builder_kwargs={"keep_linebreaks": True},
    ),
    KnownDataset(
        key="piqa",
        hub_name="ybisk/piqa",
        names=("piqa", "ybisk/piqa"),
        configs=(None, "plain_text", "default"),
        splits={"validation": "piqa/valid.jsonl"},
        builder="json",
        builder_kwargs={},
    ),
    KnownDataset(
        key="ag_news",
        hub_name="fancyzhx/ag_news",
        names=("ag_news", "fancyzhx/ag_news"),
        configs=(None, "default"),
        splits={"test": "ag_news_csv/test.csv"},
        builder="csv",
        builder_kwargs={
            "column_names": ["label", "title", "description"],
            # Titles such as "NA" must stay text: no NaN detection.
            "keep_default_na": False,
            "na_filter": False,
            "features": datasets.Features(
                {"label": datasets.Value("int64"), "title": datasets.Value("string"),
                 "description": datasets.Value("string")}
            ),
        },
    ),
    KnownDataset(
        key="lambada_openai",
        hub_name="EleutherAI/lambada_openai",
        names=("lambada_openai", "eleutherai/lambada_openai"),
        configs=(None, "default", "en"),
        splits={"test": "lambada_openai/lambada_test.jsonl"},
        builder="json",
        builder_kwargs={},
    ),
)


def known_dataset(name: str) -> KnownDataset | None:
    """The known dataset ``name`` selects (Hub name or short name, any case), or ``None``.

    Example:
        >>> known_dataset("Salesforce/WikiText").key
        'wikitext'
    """
    lowered = name.lower()
    return next((k for k in KNOWN_DATASETS if lowered in k.names), None)


def base_split(split: str) -> str:
    """``"validation[:10%]"`` -> ``"validation"`` (the name data files are registered under)."""
    return re.split(r"[\[+]", split, maxsplit=1)[0].strip()



def local_copy(known: KnownDataset, root: Path, config: str | None, split: str
               ) -> tuple[dict[str, Any], str, Callable[[datasets.Dataset], datasets.Dataset] | None]:
    """``(load_dataset kwargs, description, row fix-up)`` reading ``known`` from the offline folder ``root``."""
    where = f"the offline data dir {str(root)!r}"
    if config not in known.configs:
        local = ", ".join(repr(c) for c in known.configs if c is not None)
        raise DataError(
            f"config: {config!r} of {known.key!r} has no local copy in {where} (local configs: {local}). "
            f"Use one of those, or unset {DATA_DIR_ENV} to read the Hub."
        )
    base = base_split(split)
    if base not in known.splits:
        raise DataError(
            f"split: {base!r} of {known.key!r} has no local copy in {where}; available: "
            f"{', '.join(known.splits)}.{suggest(base, known.splits)}"
        )
    data_file = root / known.splits[base]
    if not data_file.is_file():
        raise DataError(
            f"{DATA_DIR_ENV}: {str(data_file)!r} is missing, so {known.key!r} ({base}) cannot be read offline. "
            f"Point {DATA_DIR_ENV} at a folder with the shared/data layout, or give data_files explicitly."
        )
    kwargs = {"path": known.builder, "data_files": {base: str(data_file)}, "split": split, **known.builder_kwargs}
    postprocess = {
        "wikitext": wikitext_rows,
        "piqa": lambda ds: _attach_piqa_labels(ds, data_file.with_name("valid-labels.lst"), split),
        "ag_news": lambda ds: _ag_news_rows(ds, data_file.with_name("classes.txt")),
        "lambada_openai": None,
    }[known.key]
    return kwargs, f"{known.key!r} (local copy in {str(root)!r})", postprocess


# --------------------------------------------------------------------------------------------------------------
# Local copies -> Hub-identical rows
# --------------------------------------------------------------------------------------------------------------
def _wikitext_row(line: str) -> str:
    line = line.replace("\r\n", "\n").replace("\r", "\n")
    if not line.strip():
        return ""
    return line if line.endswith("\n") else line + "\n"


def wikitext_rows(ds: datasets.Dataset) -> datasets.Dataset:
    """Hub WikiText rows: ``""`` for blank lines, every other row ends in ``"\\n"``, no CR."""
    return ds.map(lambda batch: {"text": [_wikitext_row(t) for t in batch["text"]]}, batched=True,
                  desc="WikiText rows")


def _attach_piqa_labels(ds: datasets.Dataset, labels_file: Path, split: str) -> datasets.Dataset:
    if not labels_file.is_file():
        raise DataError(f"{DATA_DIR_ENV}: PIQA labels {str(labels_file)!r} are missing next to the inputs.")
    labels = [int(line) for line in labels_file.read_text(encoding="utf-8").split()]
    if base_split(split) != split:
        raise DataError(f"split: slicing ({split!r}) is not supported for the local PIQA copy; use "
                        f"load_piqa(limit=...) or the plain split 'validation'.")
    if len(labels) != len(ds):
        raise DataError(f"PIQA: {str(labels_file)!r} has {len(labels)} labels for {len(ds)} rows; the files do "
                        f"not belong together.")
    return ds.add_column("label", labels)


def _ag_news_rows(ds: datasets.Dataset, classes_file: Path) -> datasets.Dataset:
    """Hub AG News rows: ``text = title + " " + description`` (kept verbatim, backslashes included, exactly as the
    Hub builder does), 0-based ``label`` as a ClassLabel named after ``classes.txt``."""
    names = ["World", "Sports", "Business", "Sci/Tech"]
    if classes_file.is_file():
        names = [line.strip() for line in classes_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    ds = ds.map(
        lambda b: {"text": [f"{t} {d}" for t, d in zip(b["title"], b["description"])],
                   "label": [int(x) - 1 for x in b["label"]]},
        batched=True, remove_columns=["title", "description"], desc="AG News rows",
    )
    ds = ds.select_columns(["text", "label"])
    return ds.cast_column("label", datasets.ClassLabel(names=names))


def offline_hint() -> str:
    local = shared_data_dir()
    known = ", ".join(k.hub_name for k in KNOWN_DATASETS)
    hint = (
        f"Point at local files instead: dataset: json|text|csv|parquet with data_files: path/to/file, or set "
        f"{DATA_DIR_ENV}=<folder> with the shared/data layout to read {known} from disk."
    )
    if local is not None and not os.environ.get(DATA_DIR_ENV):
        hint += f" A local copy was found: {DATA_DIR_ENV}={local}"
    return hint



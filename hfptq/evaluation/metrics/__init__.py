"""Metric scripts shipped with hfptq, loaded through the ``evaluate`` library without the Hub.

Each sub-folder ``<name>/<name>.py`` is an ``evaluate.Metric`` script. :func:`load_metric`
loads it from its local path, so it works with ``HF_HUB_OFFLINE=1`` and never touches the
network (``evaluate.load`` only goes to the Hub for names that are not local paths).
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from hfptq.errors import ConfigError, suggest

logger = logging.getLogger(__name__)

METRICS_DIR = Path(__file__).resolve().parent


def available_metrics() -> list[str]:
    """Names of the metric scripts shipped with hfptq (e.g. ``["accuracy"]``)."""
    return sorted(p.name for p in METRICS_DIR.iterdir() if p.is_dir() and (p / f"{p.name}.py").is_file())


def metric_path(name: str) -> Path:
    """Folder of the shipped metric ``name``; raises :class:`ConfigError` for unknown names."""
    folder = METRICS_DIR / name
    if not (folder / f"{name}.py").is_file():
        names = available_metrics()
        raise ConfigError(
            f"metric {name!r} is not shipped with hfptq (available: {', '.join(names) or 'none'})."
            f"{suggest(name, names)}"
        )
    return folder


@functools.lru_cache(maxsize=None)
def load_metric(name: str) -> Any:
    """Load (once per process) the shipped ``evaluate`` metric ``name`` from its local folder.

    The metric keeps its state in memory (no cache files are written next to the data).

    Example:
        >>> metric = load_metric("accuracy")
        >>> metric.compute(predictions=[1, 0, 1], references=[1, 1, 1])["accuracy"]
        0.6666666666666666
    """
    try:
        import evaluate  # heavy import, only when a metric is actually needed
    except ImportError as exc:
        raise ImportError(
            "hfptq computes accuracies with the `evaluate` library, which is not installed: pip install evaluate"
        ) from exc

    path = metric_path(name)
    logger.debug("loading metric %r from %s", name, path)
    return evaluate.load(str(path), keep_in_memory=True)

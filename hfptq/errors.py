"""Exception hierarchy: every error hfptq raises on purpose derives from :class:`HfPtqError`.

Messages name the offending field and say how to fix it.
"""
from __future__ import annotations


class HfPtqError(Exception):
    """Base class of all hfptq errors.

    ``key`` (optional) is the offending option name, so that a recipe loader can point at its line.
    """

    def __init__(self, *args: object, key: object = None) -> None:
        super().__init__(*args)
        self.key = key


class ConfigError(HfPtqError, ValueError):
    """A configuration field (config, rule, recipe) has a wrong value."""


class ConfigTypeError(HfPtqError, TypeError):
    """A configuration field has the wrong type."""


class PlanError(HfPtqError, ValueError):
    """Rules or presets could not be resolved to a per-module plan."""


class CalibrationError(HfPtqError, ValueError):
    """Calibration data or activations are unusable (empty split, NaN activations, ...)."""


class DataError(HfPtqError, ValueError):
    """A dataset could not be loaded or lacks a required column."""


class CheckpointError(HfPtqError, ValueError):
    """A checkpoint is corrupt, from an incompatible format version, or does not match its plan."""


class RecipeError(HfPtqError, ValueError):
    """A recipe YAML file is invalid."""


def suggest(name: str, candidates) -> str:
    """Return ' Did you mean 'x'?' for the closest candidate, or ''."""
    import difflib

    match = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" Did you mean {match[0]!r}?" if match else ""

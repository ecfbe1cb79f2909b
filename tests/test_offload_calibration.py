"""Calibration over an accelerate-offloaded model (issue 21 B): one decoder layer in memory at a time.

A tiny random Llama saved to disk is loaded with a device map that sends decoder layers (and the
LM head) to "disk"; hfptq brings each layer in, calibrates, quantizes it and drops its float
weights. The math is the same as quantizing the model in memory (the same tensors reach the same
observers and conversions), so every quantized tensor and the logits must be bit-identical.
"""
from __future__ import annotations

import random
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

import hfptq
from hfptq import HfPtqConfig, HfPtqError
from hfptq.offload import OffloadError, is_offloaded

from .tiny import tiny_llama_dir

LAYERS = 3
#: everything that carries weights goes to disk except the embedding (its lookup feeds calibration)
DISK_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "disk", "lm_head": "disk",
            **{f"model.layers.{i}": "disk" for i in range(LAYERS)}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("offcal"), tie=False, layers=LAYERS)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = "the of and in to a is was for on as with by he at from his it an were are which".split()
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))) for _ in range(80)) + "\n")
    return path


def _calibration(text_file: Path) -> dict:
    return dict(dataset="text", data_files=str(text_file), split="train", text_column="text", num_samples=6,
                seq_len=16, batch_size=4, seed=0)


PLANS = {
    "static": lambda c: HfPtqConfig(activations="static", calibration=c),
    "smoothquant-static": lambda c: HfPtqConfig(activations="static", smoothquant={"alpha": 0.5}, calibration=c),
    "smoothquant-dynamic": lambda c: HfPtqConfig(smoothquant={"alpha": 0.5}, calibration=c),
    "gptq-static-int8-attention": lambda c: HfPtqConfig(activations="static", gptq={}, scheme={"attention": "int8"},
                                                        calibration=c),
    "default-no-calibration": lambda c: HfPtqConfig(),
}


def _load(folder, config=None, **kw):
    from transformers import AutoModelForCausalLM

    if config is not None:
        kw["quantization_config"] = config
    return AutoModelForCausalLM.from_pretrained(folder, **kw).eval()


def _ids(model) -> torch.Tensor:
    return torch.arange(4, 4 + 24).remainder(model.config.vocab_size).view(2, 12)


def _assert_same_model(model, reference) -> None:
    state, ref_state = model.state_dict(), reference.state_dict()
    assert state.keys() == ref_state.keys()
    for key, tensor in state.items():
        assert tensor.device.type == "cpu", key
        assert tensor.dtype == ref_state[key].dtype and torch.equal(tensor, ref_state[key]), key
    with torch.no_grad():
        assert torch.equal(model(_ids(model)).logits, reference(_ids(reference)).logits)
    assert model.hfptq_plan.to_dict() == reference.hfptq_plan.to_dict()
    assert hfptq.summary(model) == hfptq.summary(reference)


def _assert_in_memory(model) -> None:
    assert not is_offloaded(model)
    assert not any(hasattr(m, "_hf_hook") for m in model.modules()), "an accelerate hook is left"
    assert not hasattr(model, "hf_device_map")  # a plain in-memory model now (saved as one, without offload warnings)


@pytest.mark.parametrize("name", sorted(PLANS))
@pytest.mark.parametrize("chunk", [None, 1000], ids=["whole", "row-blocks"])
def test_offloaded_quantization_at_load_equals_the_in_memory_one(folder, text_file, tmp_path, name, chunk, monkeypatch):
    if chunk is not None:  # every weight converted in blocks of 1000 // 64 = 15 rows (large weights are, on real models)
        monkeypatch.setattr("hfptq.offload.OFFLOAD_BLOCK_ELEMENTS", chunk)
    from hfptq import offload

    blockwise = []
    original = offload._quant_linear_in_blocks
    monkeypatch.setattr(offload, "_quant_linear_in_blocks", lambda m, e, *a: blockwise.append(e.name) or original(m, e, *a))
    config = PLANS[name](_calibration(text_file))
    offloaded = _load(folder, config, device_map=DISK_MAP, offload_folder=str(tmp_path / "off"))
    integer = [e.name for e in offloaded.hfptq_plan if e.quantized and e.kind != "embedding"]
    assert sorted(blockwise) == (sorted(integer) if chunk else [])
    reference = _load(folder, PLANS[name](_calibration(text_file)))
    _assert_same_model(offloaded, reference)
    _assert_in_memory(offloaded)
    assert offloaded.hfptq_offload["float_bytes_loaded"] > 0
    estimate = offloaded.hfptq_offload["estimate"]
    assert estimate["quantized_model_bytes"] == pytest.approx(hfptq.api.model_bytes(offloaded), rel=0.02)
    if name == "default-no-calibration":
        assert estimate["calibration_bytes"] == 0
    else:
        assert offloaded.hfptq_calibration["engine"].startswith("sequential")
        assert estimate["calibration_bytes"] == offloaded.hfptq_calibration["estimated_memory_bytes"]
    # saveable and reloadable like any hfptq model
    offloaded.save_pretrained(tmp_path / "q")
    again = _load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again(_ids(again)).logits, reference(_ids(reference)).logits)


TIED = {
    # the embedding reads the smoothed head's integers and divides by the factors
    "quantized-embedding-smoothed-head": dict(scheme={"embedding": "int8"}, activations="static",
                                              smoothquant={"alpha": 0.5, "groups": ["qkv", "gate_up", "down", "head"]}),
    # the float head stays tied to the float embedding (one table in memory, as when loaded without offload)
    "float-tied-head": dict(scheme={"lm_head": "skip"}, activations="static"),
}


@pytest.mark.parametrize("name", sorted(TIED))
def test_tied_model_wholly_on_disk(tmp_path_factory, text_file, tmp_path, monkeypatch, name):
    """Tied LM head and embedding, everything on disk, weights converted in row blocks: the in-memory result, and
    the tied table is loaded once (accelerate's hooks untie it on the meta device after each forward)."""
    monkeypatch.setattr("hfptq.offload.OFFLOAD_BLOCK_ELEMENTS", 1000)
    tied = tiny_llama_dir(tmp_path_factory.mktemp("tied"), tie=True, layers=2)
    config = lambda: HfPtqConfig(calibration=_calibration(text_file), **TIED[name])  # noqa: E731
    model = _load(tied, config(), device_map={"": "disk"}, offload_folder=str(tmp_path / "off"))
    reference = _load(tied, config())
    if name == "float-tied-head":
        assert reference.lm_head.weight is reference.model.embed_tokens.weight
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        assert any(g["group"] == "head" and g["status"] == "smoothed"
                   for record in reference.hfptq_calibration["smoothquant"].values() for g in record["groups"])
    _assert_same_model(model, reference)  # also the bytes (hfptq.summary): a broken tie would hold two tables
    _assert_in_memory(model)
    assert model.hfptq_offload["float_bytes_loaded"] <= model.hfptq_offload["estimate"]["float_model_bytes"]


def test_device_map_auto_with_max_memory_calibrates_offloaded(folder, text_file, tmp_path):
    config = PLANS["smoothquant-static"](_calibration(text_file))
    model = _load(folder, config, device_map="auto", max_memory={"cpu": 120_000}, offload_folder=str(tmp_path / "off"))
    reference = _load(folder, PLANS["smoothquant-static"](_calibration(text_file)))
    _assert_same_model(model, reference)
    _assert_in_memory(model)


def test_python_entry_point_on_a_disk_offloaded_model(folder, text_file, tmp_path):
    from accelerate import disk_offload

    config = lambda: HfPtqConfig(activations="static", smoothquant={"alpha": 0.5},  # noqa: E731
                                 calibration={"dataset": "unused", "batch_size": 4})
    model = _load(folder)
    ids = torch.randint(4, model.config.vocab_size, (6, 16), generator=torch.Generator().manual_seed(0))
    disk_offload(model, str(tmp_path / "off"), execution_device="cpu")
    assert is_offloaded(model)
    with pytest.raises(HfPtqError, match="quantize_offloaded") as err:  # the plain entry point points to it
        hfptq.quantize_model(model, config(), calibration_data=ids, progress=False)
    assert err.value.key == "device_map"
    hfptq.quantize_offloaded(model, config(), calibration_data=ids, progress=False)
    reference = hfptq.quantize_model(_load(folder), config(), calibration_data=ids, progress=False)
    _assert_same_model(model, reference)
    _assert_in_memory(model)


def test_at_most_one_float_layer_is_in_memory_during_calibration(folder, text_file, tmp_path, monkeypatch):
    """Every float weight loaded from disk is tracked (weakly); at each calibration pass, the live float
    Linear weights must be those of one decoder layer (7 Linears in a Llama layer), never more."""
    from hfptq import offload
    from hfptq.calibration import CalibrationRun

    loaded: list = []
    original_load = offload._load_tensor

    def tracking_load(module, name, value, device):
        original_load(module, name, value, device)
        tensor = getattr(module, name)
        if isinstance(module, nn.Linear) and name == "weight":
            loaded.append(weakref.ref(tensor))

    alive_per_pass: list = []
    original_pass = CalibrationRun.layer_pass

    def counting_pass(self, *args, **kwargs):
        alive_per_pass.append(sum(ref() is not None for ref in loaded))
        return original_pass(self, *args, **kwargs)

    monkeypatch.setattr(offload, "_load_tensor", tracking_load)
    monkeypatch.setattr(CalibrationRun, "layer_pass", counting_pass)
    config = PLANS["smoothquant-static"](_calibration(text_file))
    model = _load(folder, config, device_map=DISK_MAP, offload_folder=str(tmp_path / "off"))
    per_layer = sum(isinstance(m, nn.Linear) for m in
                    __import__("transformers").AutoModelForCausalLM.from_pretrained(folder).model.layers[0].modules())
    assert per_layer == 7
    assert len(loaded) == LAYERS * per_layer + 1  # every layer's Linears and the LM head came from disk
    assert alive_per_pass and max(alive_per_pass) == per_layer, alive_per_pass
    assert sum(ref() is not None for ref in loaded) == 0  # no float weight outlives the quantization
    assert hfptq.api.model_bytes(model) < 0.5 * model.hfptq_bytes_before


# ------------------------------------------------------------------------------------------------
# what still cannot work
# ------------------------------------------------------------------------------------------------


def test_meta_entries_in_the_device_map_are_refused_before_loading(folder, tmp_path):
    device_map = dict(DISK_MAP, **{"model.layers.1": "meta"})
    with pytest.raises(OffloadError, match="meta") as err:
        _load(folder, HfPtqConfig(), device_map=device_map, offload_folder=str(tmp_path / "off"))
    assert err.value.key == "device_map" and "model.layers.1" in str(err.value)
    assert not (tmp_path / "off").exists() or not any((tmp_path / "off").iterdir())


def test_rotated_plan_over_an_offloaded_model_is_refused(folder, tmp_path):
    config = HfPtqConfig(activations={"mode": "none", "rotation": 16})
    with pytest.raises(OffloadError, match="rotation") as err:
        _load(folder, config, device_map=DISK_MAP, offload_folder=str(tmp_path / "off"))
    assert err.value.key == "device_map" and "proj" in str(err.value)
    assert not (tmp_path / "off").exists() or not any((tmp_path / "off").iterdir())

"""Models larger than memory (issue 21 B): quantize while loading, and offloading device maps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hfptq
from hfptq import HfPtqConfig, HfPtqError
from hfptq.offload import ENV_SWITCH, OffloadError, QuantizeOnLoad, streaming_blocker
from hfptq.quant.linear import FloatLinear, QuantLinear

from .tiny import tiny_llama_dir


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with an untied LM head, saved in bfloat16 in 3 shards."""
    from transformers import AutoModelForCausalLM

    folder = tiny_llama_dir(tmp_path_factory.mktemp("untied"), tie=False, layers=3)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="60KB")
    assert len(list(folder.glob("*.safetensors"))) >= 3
    return folder


def _load(folder, config=None, **kw):
    from transformers import AutoModelForCausalLM

    if config is not None:
        kw["quantization_config"] = config
    return AutoModelForCausalLM.from_pretrained(folder, **kw).eval()


def _ids(model):
    return torch.arange(4, 4 + 24).remainder(model.config.vocab_size).view(2, 12)


CONFIGS = {
    "default": lambda: HfPtqConfig(),
    "int4-asym": lambda: HfPtqConfig(weights={"bits": 4, "symmetric": False, "group_size": 32}, activations="none"),
    "int8-everything": lambda: HfPtqConfig(scheme={"attention": "int8"}, activations="none"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [None, 200], ids=["whole", "row-blocks"])
def test_quantize_while_loading_is_bit_identical_to_quantizing_the_loaded_model(untied_dir, name, dtype, chunk,
                                                                                 monkeypatch):
    if chunk is not None:  # weights quantized in blocks of 200 // in_features rows (3 rows of 64 inputs)
        monkeypatch.setattr("hfptq.offload.CHUNK_ELEMENTS", chunk)
    streamed = _load(untied_dir, CONFIGS[name](), dtype=dtype)
    assert streamed.hfptq_streamed, "this plan needs no calibration: it must be quantized while loading"
    float_model = _load(untied_dir, dtype=dtype)
    reference = hfptq.quantize_model(float_model, CONFIGS[name](), progress=False)
    assert streamed.hfptq_plan.to_dict() == reference.hfptq_plan.to_dict()
    ref_state = reference.state_dict()
    state = streamed.state_dict()
    assert state.keys() == ref_state.keys()  # no leftover placeholder, nothing missing
    for key, tensor in state.items():
        assert tensor.device.type == "cpu", key
        assert tensor.dtype == ref_state[key].dtype and torch.equal(tensor, ref_state[key]), key
    with torch.no_grad():
        assert torch.equal(streamed(_ids(streamed)).logits, reference(_ids(reference)).logits)
    assert hfptq.summary(streamed) == hfptq.summary(reference)  # float bytes estimated exactly
    kinds = {type(m) for m in streamed.modules()}
    assert QuantLinear in kinds


def test_streamed_model_saves_and_reloads_identically(untied_dir, tmp_path):
    model = _load(untied_dir, HfPtqConfig(), dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "q")
    again = _load(tmp_path / "q", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(_ids(model)).logits, again(_ids(again)).logits)


def test_plans_needing_calibration_or_embedding_changes_load_in_float_first(untied_dir, tmp_path, monkeypatch):
    tied = tiny_llama_dir(tmp_path / "tied", tie=True)
    model = _load(tied, HfPtqConfig())  # the tied embedding reads the LM head's integers: after loading
    assert not getattr(model, "hfptq_streamed", False)
    assert isinstance(model.lm_head, QuantLinear)
    rotated = HfPtqConfig(activations={"mode": "none", "rotation": 16})
    assert "rotation" in streaming_blocker(rotated, hfptq.resolve_plan(_load(untied_dir), rotated))
    monkeypatch.setenv(ENV_SWITCH, "0")
    model = _load(untied_dir, HfPtqConfig())
    assert not getattr(model, "hfptq_streamed", False) and isinstance(model.lm_head, QuantLinear)


def test_the_op_releases_the_mapped_pages_of_each_weight(untied_dir):
    """After quantizing a weight read from the memory-mapped file, its pages leave the resident set."""
    from safetensors import safe_open

    if not sys.platform.startswith("linux"):
        pytest.skip("mincore-free check via /proc needs Linux")
    from hfptq.offload import _release_pages

    big = untied_dir / "big.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.ones(1024, 1024)}, str(big))  # 4 MiB = 1024 pages
    with safe_open(str(big), framework="pt", backend="mmap") as f:
        tensor = f.get_slice("w")[...]
        if tensor.untyped_storage().resizable():
            pytest.skip("this safetensors copies instead of mapping")
        before = _rss_file_kb()
        assert float(tensor.sum()) == 1024 * 1024  # touches every page
        touched = _rss_file_kb()
        _release_pages(tensor)
        released = _rss_file_kb()
        assert touched - before >= 3 * 1024  # the 4 MiB became resident
        assert touched - released >= 3 * 1024  # and left again
        assert float(tensor.sum()) == 1024 * 1024  # still readable: the file is read again


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile")


# ------------------------------------------------------------------------------------------------
# Device maps
# ------------------------------------------------------------------------------------------------


def test_disk_offload_of_a_calibration_free_plan_quantizes_layer_by_layer_like_streaming(untied_dir, tmp_path):
    """A disk map turns quantize-while-loading off (the float weights of offloaded layers are read by accelerate, not
    by the loader's ops): the layers are quantized one by one after loading, with the same tensors."""
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
    offloaded = _load(untied_dir, HfPtqConfig(), dtype=torch.bfloat16, device_map=device_map,
                      offload_folder=str(tmp_path / "off"))
    streamed = _load(untied_dir, HfPtqConfig(), dtype=torch.bfloat16)
    assert streamed.hfptq_streamed and not getattr(offloaded, "hfptq_streamed", False)
    state, ref_state = offloaded.state_dict(), streamed.state_dict()
    assert state.keys() == ref_state.keys()
    for key, tensor in state.items():
        assert tensor.dtype == ref_state[key].dtype and torch.equal(tensor, ref_state[key]), key
    with torch.no_grad():
        assert torch.equal(offloaded(_ids(offloaded)).logits, streamed(_ids(streamed)).logits)


def test_max_memory_that_cannot_hold_the_quantized_model_is_refused(untied_dir, tmp_path):
    with pytest.raises(OffloadError, match="max_memory") as err:
        _load(untied_dir, HfPtqConfig(), device_map="auto", max_memory={"cpu": 30_000},
              offload_folder=str(tmp_path / "off"))
    assert isinstance(err.value, HfPtqError) and err.value.key == "device_map"


def test_quantized_checkpoint_reloads_with_disk_offload(untied_dir, tmp_path):
    """The workflow the error message proposes: quantize without offload, save, reload offloaded."""
    model = _load(untied_dir, HfPtqConfig(), dtype=torch.float32)
    model.save_pretrained(tmp_path / "q")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = _load(tmp_path / "q", device_map=device_map, offload_folder=str(tmp_path / "off"))
    auto = _load(tmp_path / "q", device_map="auto", max_memory={"cpu": 30_000}, offload_folder=str(tmp_path / "off2"))
    assert "disk" in set(auto.hf_device_map.values())
    with torch.no_grad():
        expected = model(_ids(model)).logits
        assert torch.equal(expected, offloaded(_ids(offloaded)).logits)
        assert torch.equal(expected, auto(_ids(auto)).logits)


# ------------------------------------------------------------------------------------------------
# benchmarks/scale.py (run by hand; this keeps it from rotting)
# ------------------------------------------------------------------------------------------------


def test_scale_benchmark_builds_a_sharded_bf16_checkpoint_and_measures_a_streamed_load(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "scale.py"
    spec = importlib.util.spec_from_file_location("bench_scale", path)
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    config = scale.llama_config(layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=96)  # int4 groups of 128 (sq-mixed) fit
    record = scale.build_checkpoint(tmp_path / "ckpt", config, progress=False)
    files = sorted((tmp_path / "ckpt").glob("*.safetensors"))
    assert len(files) == record["shards"] == 4  # embeddings, 2 layers, norm + LM head
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == record["float_bytes"] == 2 * record["params"]
    assert record["params"] == sum(p.numel() for p in _load(tmp_path / "ckpt").parameters())
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert scale.build_checkpoint(tmp_path / "ckpt", config, progress=False) == record
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # reused, not rebuilt
    row = scale.measure_child(str(tmp_path / "ckpt"), "default")
    assert row["streamed"] and row["finite_logits"] and row["ru_maxrss_bytes"] > 0
    result = {"float_bytes": record["float_bytes"], "params": record["params"], "shards": 4, "date": "d",
              "cpu_model": "c", "cpu_capability": "x", "rows": [dict(row, cap="none")]}
    table = scale.render(result)
    assert "| default | streamed |" in table and "x |" in table
    # the SmoothQuant-calibrated run over the disk-offloaded model
    offloaded = scale.measure_child(str(tmp_path / "ckpt"), "sq-mixed")
    assert offloaded["offloaded"] and not offloaded["streamed"] and offloaded["finite_logits"]
    assert offloaded["calibration"]["num_samples"] == 4 and offloaded["offload"]["float_bytes_loaded"] > 0
    assert offloaded["offload"]["estimate"]["quantized_model_bytes"] == pytest.approx(offloaded["quantized_bytes"], rel=0.02)
    table = scale.render(dict(result, rows=[dict(offloaded, cap="none")]))
    assert "| sq-mixed | offloaded, calibrated |" in table


_PEAK_CHILD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
import hfptq
kw = {} if sys.argv[2] == "float" else {"quantization_config": hfptq.HfPtqConfig(
    weights={"bits": 4}, activations="none", scheme={"attention": "int4"})}
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, **kw)
# VmHWM: this process's peak RSS (ru_maxrss would carry over the forking pytest process's size)
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"peak": peak,
                  "bytes": hfptq.api.model_bytes(model), "streamed": bool(getattr(model, "hfptq_streamed", 0))}))
"""


def test_peak_memory_of_quantize_while_loading_is_below_quantizing_after_loading(tmp_path):
    """A 270 MB bf16 checkpoint, int4 plan (73 MB). Quantizing after loading reads every page of the
    mapped file (peak >= process + float + quantized); quantizing while loading must peak at least
    half the float size lower. Fails if the op is bypassed or if the mapped pages stay resident."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=512, tie_word_embeddings=False)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen).mul_(0.02).to(torch.bfloat16) for k, s in shapes.items()}
    float_bytes = sum(t.numel() * 2 for t in state.values())
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    del state
    cfg.save_pretrained(tmp_path)

    def run(mode: str, switch: str = "1") -> dict:
        env = dict(os.environ, **{ENV_SWITCH: switch, "OMP_NUM_THREADS": "1"})
        out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(tmp_path), mode], env=env,
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    streamed, float_first = run("int4"), run("int4", "0")
    assert streamed["streamed"] and not float_first["streamed"]
    assert streamed["bytes"] == float_first["bytes"] < 0.3 * float_bytes
    print(f"peaks MB: float-first {float_first['peak'] / 1e6:.0f}, streamed {streamed['peak'] / 1e6:.0f}; "
          f"float {float_bytes / 1e6:.0f}, int4 {streamed['bytes'] / 1e6:.0f}")
    assert streamed["peak"] <= float_first["peak"] - 0.5 * float_bytes

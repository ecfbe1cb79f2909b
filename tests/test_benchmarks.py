"""The benchmark scripts' own logic (they are run by hand; these keep them from rotting)."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (the bf16 prepacked linear)")
def test_prefill_floor_kernels_run_with_the_model_shapes_and_the_floor_is_their_sum():
    from transformers import LlamaConfig

    floor = _load("prefill_floor")
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50)
    fns = floor.kernels(cfg, 16)
    assert set(fns) == {"sdpa", "ffn int8", "attention bf16", "attention int8"}
    for fn in fns.values():
        fn()
    result = {"date": "d", "cpu_model": "c", "torch": "t", "model": "m", "prompt_len": 16, "repeats": 1,
              "cpu_s": {"fp32 prefill": 2.0, "sdpa": 0.2, "ffn int8": 0.3, "attention bf16": 0.4, "attention int8": 0.1}}
    table = floor.render(result)
    assert "| **floor, default plan (sdpa + ffn int8 + attention bf16)** | 900 | **0.45x** |" in table
    assert "| **floor, all-int8 plan (sdpa + ffn int8 + attention int8)** | 600 | **0.30x** |" in table
    groups = {"attention projections": 0.3, "ffn projections": 0.5, "total": 1.0}
    bd = floor.render({"date": "d", "cpu_model": "c", "torch": "t", "prompt_len": 16, "repeats": 1,
                       "emulation_env": {"HFPTQ_CPU_FEATURES": "avx2"},
                       "breakdown_cpu_s": {"fp32": groups, "hfptq-default": dict(groups, total=0.6)}})
    assert "| group | fp32 | hfptq-default |" in bd and "EMULATED" in bd
    assert "| total | 1,000 (1.00x) | 600 (0.60x) |" in bd


def test_speed_renders_the_identity_of_prompt_and_decode():
    speed = _load("speed")
    assert speed._cell_identity({}) == "-"
    assert speed._cell_identity({"identical": True}) == "bit-identical"  # older files: prompt only
    assert speed._cell_identity({"identical": True, "decode_identical": True}) == "bit-identical (prompt + decode)"
    assert speed._cell_identity({"identical": False, "decode_identical": False, "max_abs_diff": 0.0}) == "decode differs"
    assert speed._cell_identity({"identical": False, "max_abs_diff": 0.5}) == "max diff 0.5"

"""hfptq checkpoints: save_pretrained -> from_pretrained round trips, the files written beside the
weights, loading without ``import hfptq``, and every kind of broken checkpoint.

Round trips are judged with ``torch.equal`` on the logits: a reload rebuilds the same modules from
the same integers and scales, so the forward pass must be bit-identical. Most reloads run in this
process (``from_pretrained`` builds a new model from disk; only the registry of the ``hfptq``
method is shared); one test reloads in a fresh interpreter, and one loads in a fresh interpreter
that never imports hfptq.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hfptq
from hfptq import checkpoint as ckpt
from hfptq.card import merge_model_card, plan_table
from hfptq.config import HfPtqConfig
from hfptq.convert import convert_model
from hfptq.errors import CheckpointError, ConfigError
from hfptq.plan import resolve_plan
from hfptq.quant.linear import QuantEmbedding, QuantLinear

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def reload(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def headers(folder: Path) -> Dict[str, tuple]:
    """{key: (dtype, shape)} over every safetensors file of a folder."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                s = h.get_slice(k)
                out[k] = (s.get_dtype(), tuple(s.get_shape()))
    return out


def metadata(path: Path) -> Dict[str, str]:
    with safe_open(str(path), "pt") as h:
        return dict(h.metadata())


def static_model(load_tiny, family: str, *, symmetric: bool = True):
    """A W8A8 *static* model built by hand: plan + convert_model(input_qparams) + mark_quantized."""
    model = load_tiny(family)
    acts = {"mode": "static", "symmetric": symmetric}
    cfg = HfPtqConfig(activations=acts, calibration={"dataset": "hand-made"})
    plan = resolve_plan(model, cfg)
    qparams = {}
    for i, entry in enumerate(plan):
        if entry.quantized and (entry.activations or {}).get("mode") == "static":
            zp = None if symmetric else torch.tensor(3 + i % 5, dtype=torch.int32)
            qparams[entry.name] = (torch.tensor(0.02 + 0.003 * i), zp)
    convert_model(model, plan, input_qparams=qparams, progress=False)
    return ckpt.mark_quantized(model, cfg, plan)


def run_fresh(code: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (offline, one thread)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    # Transformers' default verbosity (warnings shown): the tests assert what a user sees, whatever the
    # caller's TRANSFORMERS_VERBOSITY (CI may set "error").
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               TRANSFORMERS_VERBOSITY="warning")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(REPO))


@pytest.fixture
def ids(tiny_input_ids):
    return tiny_input_ids("llama")


# ------------------------------------------------------------------------------------------------
# round trips: bit-exact logits
# ------------------------------------------------------------------------------------------------

INT4_FFN = [{"targets": "kind:ffn", "precision": "int4", "weights": {"group_size": 16}}]

CONFIGS = {
    "weight_only": lambda: HfPtqConfig(activations="none"),
    "dynamic_w8a8": lambda: HfPtqConfig(),
    "int4_group": lambda: HfPtqConfig(activations="none", rules=INT4_FFN),
    "int4_group_asym": lambda: HfPtqConfig(
        activations="none", rules=[{"targets": "kind:ffn", "precision": "int4",
                                    "weights": {"group_size": 16, "symmetric": False}}]),
    "mixed_rules": lambda: HfPtqConfig(
        scheme={"attention": "bf16", "embedding": "int8"},
        rules=[
            {"targets": "down_proj", "precision": "fp16"},
            {"targets": r"re:layers\.0\.self_attn\.q_proj$", "precision": "int8", "activations": "none"},
            {"targets": "kind:ffn", "precision": "int4", "weights": {"group_size": 32}},
            {"targets": "lm_head", "precision": "int8", "weights": {"granularity": "tensor"}},
        ]),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_roundtrip_bit_exact(name, load_tiny, ids, tmp_path):
    model = load_tiny("llama", CONFIGS[name]())
    before = logits(model, ids)
    model.save_pretrained(tmp_path)
    again = reload(tmp_path)
    assert torch.equal(before, logits(again, ids))
    assert again.hfptq_plan.to_dict() == model.hfptq_plan.to_dict()
    # nothing recalibrated / re-quantized: every integer tensor is the saved one
    for name_, module in model.named_modules():
        if isinstance(module, QuantLinear):
            other = again.get_submodule(name_)
            assert torch.equal(module.qweight, other.qweight) and torch.equal(module.weight_scale, other.weight_scale)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_static_w8a8_roundtrip(symmetric, load_tiny, ids, tmp_path):
    model = static_model(load_tiny, "llama", symmetric=symmetric)
    before = logits(model, ids)
    model.save_pretrained(tmp_path)
    h = headers(tmp_path)
    key = "model.layers.0.mlp.up_proj"
    assert h[f"{key}.input_scale"] == ("F32", ())
    assert (f"{key}.input_zero_point" in h) == (not symmetric)
    again = reload(tmp_path)
    assert torch.equal(before, logits(again, ids))
    up = again.get_submodule(key)
    assert up.act_mode == "static" and torch.equal(up.input_scale, model.get_submodule(key).input_scale)


def test_int4_packed_two_per_byte_on_disk(load_tiny, tmp_path):
    model = load_tiny("llama", CONFIGS["int4_group"]())
    model.save_pretrained(tmp_path)
    h = headers(tmp_path)
    up = model.get_submodule("model.layers.0.mlp.up_proj")  # in 32 -> out 64, group 16
    assert h["model.layers.0.mlp.up_proj.qweight"] == ("U8", (up.out_features, up.in_features // 2))
    assert h["model.layers.0.mlp.up_proj.weight_scale"] == ("F32", (up.out_features, up.in_features // 16))
    assert h["model.layers.0.mlp.down_proj.qweight"] == ("U8", (32, 64 // 2))
    assert h["lm_head.qweight"] == ("I8", (128, 32))  # the LM head stays int8
    # int4 values are stored exactly: unpacking the file gives the module's integers
    raw = load_file(str(tmp_path / "model.safetensors"))["model.layers.0.mlp.up_proj.qweight"]
    assert torch.equal(raw, up.qweight)


def test_tied_embedding_shares_storage(load_tiny, tiny_input_ids, tmp_path):
    model = load_tiny("gemma3_text", HfPtqConfig())
    ids = tiny_input_ids("gemma3_text")
    before = logits(model, ids)
    model.save_pretrained(tmp_path)
    h = headers(tmp_path)
    assert h["model.embed_tokens.weight"] == ("I8", (0,))  # tombstone only: the ints live in lm_head
    assert not any(k.startswith("model.embed_tokens.") and k != "model.embed_tokens.weight" for k in h)
    again = reload(tmp_path)
    assert torch.equal(before, logits(again, ids))
    emb = again.get_submodule("model.embed_tokens")
    assert isinstance(emb, QuantEmbedding) and emb.source is again.get_submodule("lm_head")


def test_untied_embedding_own_table(load_tiny, ids, tmp_path):
    model = load_tiny("llama", HfPtqConfig(scheme={"embedding": "int8"}))
    before = logits(model, ids)
    model.save_pretrained(tmp_path)
    assert headers(tmp_path)["model.embed_tokens.table.qweight"] == ("I8", (128, 32))
    assert torch.equal(before, logits(reload(tmp_path), ids))


def test_sharded_checkpoint(load_tiny, ids, tmp_path):
    model = load_tiny("llama", HfPtqConfig(activations="none"))
    before = logits(model, ids)
    model.save_pretrained(tmp_path, max_shard_size="8KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    save_ids = {metadata(s)[ckpt.META_SAVE_ID] for s in shards}
    assert len(save_ids) == 1
    assert torch.equal(before, logits(reload(tmp_path), ids))
    ckpt.verify_checkpoint(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_model_dtypes(dtype, load_tiny, ids, tmp_path):
    model = load_tiny("llama", HfPtqConfig(), dtype=dtype)
    before = logits(model, ids)
    assert before.dtype == dtype
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == str(dtype).replace("torch.", "")
    again = reload(tmp_path)
    out = logits(again, ids)
    assert out.dtype == dtype and torch.equal(before, out)
    assert again.get_submodule("model.norm").weight.dtype == dtype


def test_device_map_auto(load_tiny, ids, tmp_path):
    model = load_tiny("llama", HfPtqConfig())
    before = logits(model, ids)
    model.save_pretrained(tmp_path)
    again = reload(tmp_path, device_map="auto")
    assert torch.equal(before, logits(again, ids.to(again.device)).cpu())


@pytest.mark.parametrize("family", ["gpt2", "opt", "gpt_neox", "gemma3_text", "distilbert_mlm", "bert"])
def test_other_families_roundtrip(family, load_tiny, tiny_input_ids, tiny_families, tmp_path):
    import transformers

    model = load_tiny(family, HfPtqConfig())
    ids = tiny_input_ids(family)
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path)
    ckpt.verify_checkpoint(tmp_path)
    auto = getattr(transformers, tiny_families[family].auto_class)
    again = auto.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(before, again(ids).logits)


def test_resave_of_reloaded_model_and_deepcopy(load_tiny, ids, tmp_path):
    model = load_tiny("llama", HfPtqConfig())
    before = logits(model, ids)
    model.save_pretrained(tmp_path / "a")
    again = reload(tmp_path / "a")
    again.save_pretrained(tmp_path / "a")  # into the folder it was loaded from (memory-mapped)
    clone = copy.deepcopy(again)
    clone.save_pretrained(tmp_path / "b")  # the hook is bound to the copy, not the original
    for folder in ("a", "b"):
        assert torch.equal(before, logits(reload(tmp_path / folder), ids))
    assert clone.save_pretrained.model is clone


def test_dequantized_model_saves_as_plain_float(load_tiny, ids, tmp_path):
    model = load_tiny("llama", HfPtqConfig(activations="none"))
    model = model.dequantize()
    assert "save_pretrained" not in model.__dict__  # hfptq's save hook is gone with the quantizer
    before = logits(model, ids)
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert not (tmp_path / "hfptq_recipe.yaml").exists()
    assert ckpt.META_FORMAT not in metadata(tmp_path / "model.safetensors")
    assert torch.equal(before, logits(reload(tmp_path), ids))


def test_hand_converted_model_needs_mark_quantized(load_tiny, ids, tmp_path):
    """convert_model alone does not make a saveable checkpoint; mark_quantized does."""
    model = load_tiny("llama")
    cfg = HfPtqConfig(activations="none")
    plan = resolve_plan(model, cfg)
    convert_model(model, plan, progress=False)
    before = logits(model, ids)
    ckpt.mark_quantized(model, cfg, plan)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["plan"]["modules"]
    assert torch.equal(before, logits(reload(tmp_path), ids))


# ------------------------------------------------------------------------------------------------
# files written beside the weights
# ------------------------------------------------------------------------------------------------


def test_layout_metadata_and_tombstones(load_tiny, tmp_path):
    model = load_tiny("llama", HfPtqConfig())
    model.save_pretrained(tmp_path)
    names = sorted(os.listdir(tmp_path))
    assert names == ["README.md", "config.json", "generation_config.json", "hfptq_recipe.yaml", "model.safetensors"]
    h = headers(tmp_path)
    plan = model.hfptq_plan
    for entry in plan:
        if entry.quantized and not entry.tied_to:
            assert h[f"{entry.name}.weight"] == ("I8", (0,))
            assert h[f"{entry.name}.qweight"] == ("I8", (entry.out_features, entry.in_features))
            assert h[f"{entry.name}.weight_scale"] == ("F32", (entry.out_features, 1))
        elif entry.precision == "fp16":
            assert h[f"{entry.name}.weight"] == ("F16", (entry.out_features, entry.in_features))
    assert h[ckpt.HINT_KEY] == ("I8", (0,))
    meta = metadata(tmp_path / "model.safetensors")
    assert meta[ckpt.META_FORMAT] == "1" and meta[ckpt.META_VERSION] == hfptq.__version__
    assert len(meta[ckpt.META_SAVE_ID]) == 32 and meta["format"] == "pt"
    crcs = json.loads(meta[ckpt.META_CRC32])
    assert set(crcs) == set(model.state_dict())
    qcfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "hfptq" and qcfg["format_version"] == 1
    assert len(qcfg["plan"]["modules"]) == len(plan)
    # a second save gets a new save id
    model.save_pretrained(tmp_path / "again")
    assert metadata(tmp_path / "again" / "model.safetensors")[ckpt.META_SAVE_ID] != meta[ckpt.META_SAVE_ID]


def test_recipe_yaml_reloads_to_the_same_config(load_tiny, tmp_path):
    from hfptq.recipes import load_recipe

    cfg = CONFIGS["mixed_rules"]()
    model = load_tiny("llama", cfg)
    model.save_pretrained(tmp_path)
    text = (tmp_path / "hfptq_recipe.yaml").read_text()
    assert "plan" not in text.split("quantization:", 1)[1]
    recipe = load_recipe(tmp_path / "hfptq_recipe.yaml")
    got = recipe.to_config().to_dict()
    want = cfg.to_dict()
    for d in (got, want):
        d.pop("plan")
    assert got == want
    assert recipe.model["name_or_path"] == str(model.hfptq_base_model)
    assert recipe.model["task"] == "causal-lm" and recipe.model["dtype"] == "float32"


def test_model_card_contents(load_tiny, tmp_path):
    model = static_model(load_tiny, "llama")
    model.hfptq_calibration = {"dataset": "wikitext", "config": "wikitext-2-raw-v1", "split": "validation",
                               "num_samples": 16, "seq_len": 64, "observer": "minmax", "seconds": 1.25}
    model.hfptq_report = {
        "schema_version": 1, "model": "tiny-llama",
        "perplexity": {"dataset": "wikitext", "float": 20.0, "quantized": 20.5, "abs_drop": 0.5, "rel_drop": 0.025},
        "accuracy": {"piqa": {"num_examples": 50, "metrics": {"acc": {"float": 0.7, "quantized": 0.68,
                                                                       "abs_drop": 0.02, "rel_drop": 0.0286}}}},
        "size": {"float_bytes": 4000, "quantized_bytes": 1000, "ratio": 4.0},
    }
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: transformers" in front and "- hfptq" in front and "- int8" in front
    for kind, precision, scheme, count, params in plan_table(model.hfptq_plan):
        assert f"| {kind} | {precision} | {scheme} | {count} |" in card
    assert "| ffn | int8 | W8A8 static/tensor (channel) | 6 |" in card
    assert "wikitext / wikitext-2-raw-v1 / validation" in card and "16 x 64" in card
    assert "| perplexity (wikitext) | 20.0000 | 20.5000 | +0.5000 (+2.50%) |" in card
    assert "| piqa acc | 70.00% | 68.00% | -2.00 pp |" in card
    size = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    assert f"{size / 1024:.2f} KiB" in card
    assert "pip install hfptq" in card and "import hfptq" in card
    assert f'AutoModelForCausalLM.from_pretrained("{tmp_path}")' in card


def test_model_card_without_report_says_so(load_tiny, tmp_path):
    model = load_tiny("llama", HfPtqConfig())
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "No evaluation report was attached" in card
    assert "No calibration data was used" in card and "per token at run time" in card


def test_merge_model_card_keeps_user_text():
    ours = "---\nlibrary_name: transformers\ntags:\n- hfptq\n---\n<!-- hfptq:card:begin -->\nNEW\n<!-- hfptq:card:end -->\n"
    template = ("---\ntags: [custom]\n---\n# Model Card\nThis is the model card of a 🤗 transformers model that has "
                "been pushed on the Hub. This model card has been automatically generated.\n")
    merged = merge_model_card(template, ours)
    assert "automatically generated" not in merged and "NEW" in merged and "- custom" in merged
    user = "---\nlicense: mit\n---\n# My notes\nhand written\n"
    merged = merge_model_card(user, ours)
    assert "hand written" in merged and "NEW" in merged and "license: mit" in merged
    again = merge_model_card(merged.replace("NEW", "OLD"), ours)
    assert again.count("hfptq:card:begin") == 1 and "OLD" not in again and "hand written" in again


# ------------------------------------------------------------------------------------------------
# loading without `import hfptq`: loud failure, never silent garbage
# ------------------------------------------------------------------------------------------------


def test_fresh_process_fails_loudly_without_hfptq_then_reloads_with_it(load_tiny, ids, tmp_path):
    """One fresh interpreter: plain Transformers refuses the checkpoint (three ways of asking), then
    ``import hfptq`` makes the very same call load it with bit-identical logits, without calibrating."""
    model = static_model(load_tiny, "llama")
    torch.save({"ids": ids, "logits": logits(model, ids)}, tmp_path / "expected.pt")
    model.save_pretrained(tmp_path / "model")
    proc = run_fresh(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        path = {str(tmp_path / 'model')!r}
        for kwargs in ({{}}, {{"device_map": "auto"}}, {{"trust_remote_code": True}},
                       {{"ignore_mismatched_sizes": True}}, {{"dtype": torch.float32, "low_cpu_mem_usage": True}},
                       {{"attn_implementation": "eager"}}):
            try:
                AutoModelForCausalLM.from_pretrained(path, **kwargs)
                print("LOADED", kwargs)
            except Exception as exc:
                print("RAISED", type(exc).__name__, exc)
        print("HFPTQ_IMPORTED", "hfptq" in sys.modules)
        import hfptq
        exp = torch.load({str(tmp_path / 'expected.pt')!r})
        model = AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            out = model(exp["ids"]).logits
        print("EQUAL", torch.equal(out, exp["logits"]))
        print("CALIBRATION_IMPORTED", "hfptq.calibration" in sys.modules)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "LOADED" not in out and "HFPTQ_IMPORTED False" in out
    # config.json's attn_implementation is the load guard: plain Transformers refuses to build the model, whatever
    # the loading flags, with the instruction in the error itself
    assert out.count(f"RAISED ValueError Specified `attn_implementation=\"{ckpt.LOAD_GUARD}\"`") == 5
    assert "pip_install_hfptq_and_import_hfptq" in ckpt.LOAD_GUARD
    # an explicit attn_implementation overrides the guard: then the tombstones' size mismatch raises
    assert out.count("RAISED RuntimeError You set `ignore_mismatched_sizes` to `False`") == 1
    assert proc.stderr.count("Unknown quantization type, got hfptq") == 6
    assert proc.stderr.count(ckpt.HINT_KEY) == 1 and "pip_install_hfptq" in ckpt.HINT_KEY
    assert "EQUAL True" in out
    assert "CALIBRATION_IMPORTED False" in out  # nothing was recalibrated


# ------------------------------------------------------------------------------------------------
# broken checkpoints
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def saved(load_tiny, tmp_path):
    model = load_tiny("llama", HfPtqConfig())
    model.save_pretrained(tmp_path / "ok")
    return tmp_path / "ok"


def _edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_truncated_file(saved):
    path = saved / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupted"):
        reload(saved)


def test_corrupted_header(saved):
    path = saved / "model.safetensors"
    with open(path, "r+b") as f:
        f.seek(12)
        f.write(b"\x00garbage!")
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        reload(saved)


def test_corrupted_data_detected_by_verify(saved):
    ckpt.verify_checkpoint(saved)
    path = saved / "model.safetensors"
    header_len = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    with open(path, "r+b") as f:  # flip one byte well inside the data section
        f.seek(header_len + 5000)
        byte = f.read(1)
        f.seek(header_len + 5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="is corrupted: its bytes no longer match the checksum"):
        ckpt.verify_checkpoint(saved)


def test_newer_config_format_version(saved):
    _edit_config(saved, lambda d: d["quantization_config"].update(format_version=2))
    with pytest.raises(ConfigError, match="newer hfptq.*pip install -U hfptq"):
        reload(saved)


def test_newer_tensor_format(saved):
    path = saved / "model.safetensors"
    tensors = load_file(str(path))
    meta = metadata(path)
    meta[ckpt.META_FORMAT] = "2"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="format 2, written by a newer hfptq"):
        reload(saved)


def test_plan_says_int4_but_tensors_are_int8(saved):
    def edit(d):
        for m in d["quantization_config"]["plan"]["modules"]:
            if m["name"] == "model.layers.1.mlp.up_proj":
                m["precision"] = "int4"
                m["weights"] = {"bits": 4, "symmetric": True, "granularity": "group", "group_size": 16,
                                "observer": "minmax"}
                m["activations"] = {"mode": "none"}

    _edit_config(saved, edit)
    with pytest.raises(CheckpointError) as info:
        reload(saved)
    msg = str(info.value)
    assert "module 'model.layers.1.mlp.up_proj'" in msg
    assert "'model.layers.1.mlp.up_proj.qweight' in model.safetensors is I8 [64, 32]" in msg
    assert "expects U8 [64, 16]" in msg and "int4" in msg


def test_missing_tensor(saved):
    path = saved / "model.safetensors"
    tensors = load_file(str(path))
    meta = metadata(path)
    del tensors["model.layers.0.mlp.down_proj.weight_scale"]
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="'model.layers.0.mlp.down_proj.weight_scale' is missing"):
        reload(saved)


def test_float_resave_without_hfptq_is_refused(saved):
    """A file without hfptq metadata (e.g. a float model re-saved under the hfptq config) is refused."""
    path = saved / "model.safetensors"
    save_file(load_file(str(path)), str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="no 'hfptq_format' metadata"):
        reload(saved)


def test_shards_from_two_saves_are_refused(load_tiny, tmp_path):
    model = load_tiny("llama", HfPtqConfig(activations="none"))
    model.save_pretrained(tmp_path / "a", max_shard_size="8KB")
    model.save_pretrained(tmp_path / "b", max_shard_size="8KB")
    shard = sorted((tmp_path / "a").glob("model-*.safetensors"))[1]
    (tmp_path / "b" / shard.name).write_bytes(shard.read_bytes())
    with pytest.raises(CheckpointError, match="shards come from different saves"):
        reload(tmp_path / "b")


def _failing_writer(fail_on: int):
    """A stand-in for safetensors' save_file that writes half a file on call ``fail_on`` and raises."""
    from safetensors.torch import save_file as real

    calls = {"n": 0}

    def write(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == fail_on:
            with open(filename, "wb") as f:
                f.write(b"\x00" * 100)
            raise OSError(28, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    return write


@pytest.mark.parametrize("shard_size,fail_on", [(None, 1), ("8KB", 3)], ids=["single", "third-shard"])
def test_failed_save_leaves_previous_checkpoint_intact(shard_size, fail_on, load_tiny, ids, tmp_path, monkeypatch):
    import transformers.modeling_utils as mu

    target = tmp_path / "model"
    old = load_tiny("llama", HfPtqConfig(activations="none"))
    old_logits = logits(old, ids)
    old.save_pretrained(target)
    (target / "tokenizer.json").write_text("{}")  # an unrelated file the user keeps there
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    new = load_tiny("llama", HfPtqConfig(rules=INT4_FFN, activations="none"))
    monkeypatch.setattr(mu, "safe_save_file", _failing_writer(fail_on))
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    with pytest.raises(CheckpointError, match="No space left on device.*previous contents are unchanged"):
        new.save_pretrained(target, **kwargs)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging folder left behind
    assert torch.equal(old_logits, logits(reload(target), ids))


def test_failed_save_into_new_folder_leaves_nothing(load_tiny, tmp_path, monkeypatch):
    import transformers.modeling_utils as mu

    model = load_tiny("llama", HfPtqConfig())
    monkeypatch.setattr(mu, "safe_save_file", _failing_writer(1))
    with pytest.raises(CheckpointError):
        model.save_pretrained(tmp_path / "fresh")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_commit_leaves_unloadable_folder(load_tiny, tmp_path, monkeypatch):
    """If moving the staged files fails midway, config.json is absent: the folder cannot load as a mix."""
    target = tmp_path / "model"
    model = load_tiny("llama", HfPtqConfig())
    model.save_pretrained(target)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("model.safetensors"):
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(CheckpointError, match="incomplete"):
        model.save_pretrained(target)
    monkeypatch.undo()
    assert not (target / "config.json").exists()
    with pytest.raises(CheckpointError, match="no config.json"):
        ckpt.verify_checkpoint(target)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_resave_removes_stale_shards_and_keeps_other_files(load_tiny, ids, tmp_path):
    model = load_tiny("llama", HfPtqConfig())
    model.save_pretrained(tmp_path, max_shard_size="8KB")
    (tmp_path / "tokenizer.json").write_text("{}")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    assert (tmp_path / "tokenizer.json").read_text() == "{}"
    assert torch.equal(logits(model, ids), logits(reload(tmp_path), ids))


def test_broken_model_card_does_not_block_the_save(load_tiny, ids, tmp_path, monkeypatch, caplog):
    import hfptq.card

    def boom(*args, **kwargs):
        raise RuntimeError("card renderer bug")

    monkeypatch.setattr(hfptq.card, "render_model_card", boom)
    model = load_tiny("llama", HfPtqConfig())
    with caplog.at_level("WARNING", logger="hfptq.checkpoint"):
        model.save_pretrained(tmp_path)
    assert "could not write README.md" in caplog.text
    assert not (tmp_path / "README.md").exists() and (tmp_path / "hfptq_recipe.yaml").exists()
    assert torch.equal(logits(model, ids), logits(reload(tmp_path), ids))


def test_save_into_a_file_path(load_tiny, tmp_path):
    model = load_tiny("llama", HfPtqConfig())
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        model.save_pretrained(tmp_path / "f")


def test_plain_save_pretrained_path_also_writes_hfptq_layout(load_tiny, ids, tmp_path):
    """Calling PreTrainedModel.save_pretrained directly (no hook) still goes through the quantizer."""
    from transformers import PreTrainedModel

    model = load_tiny("llama", HfPtqConfig())
    PreTrainedModel.save_pretrained(model, tmp_path)
    assert headers(tmp_path)[ckpt.HINT_KEY] == ("I8", (0,))
    assert torch.equal(logits(model, ids), logits(reload(tmp_path), ids))


# ------------------------------------------------------------------------------------------------
# real model
# ------------------------------------------------------------------------------------------------


def _proc_status(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field_name)


@pytest.mark.real_model
def test_gemma_default_plan_save_reload_fresh_process(tmp_path):
    """Gemma 3 270M, default plan: size on disk, save memory, and a fresh-process reload with identical logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfptq.api import model_bytes
    from hfptq.errors import ConfigError as _ConfigError

    try:
        from hfptq.models import gemma3_270m_path

        source = gemma3_270m_path()
    except (_ConfigError, ImportError) as exc:
        pytest.skip(f"Gemma 3 270M not available: {exc}")
    tok = AutoTokenizer.from_pretrained(source)
    ids = tok("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=HfPtqConfig())
    before = logits(model, ids)
    torch.save({"ids": ids, "logits": before}, tmp_path / "expected.pt")

    can_reset_peak = os.access("/proc/self/clear_refs", os.W_OK)
    if can_reset_peak:
        rss = _proc_status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    model.save_pretrained(tmp_path / "model")
    if can_reset_peak:
        # saving streams the model's own tensors to disk: no copy of the weights is made
        assert _proc_status("VmHWM") - rss < 0.1 * model_bytes(model)

    fp32_bytes = sum(p.stat().st_size for p in Path(source).glob("*.safetensors"))
    disk = sum(p.stat().st_size for p in (tmp_path / "model").glob("*.safetensors"))
    assert disk <= 0.35 * fp32_bytes, (disk, fp32_bytes)
    h = headers(tmp_path / "model")
    assert h["lm_head.qweight"] == ("I8", (262144, 640)) and h["model.embed_tokens.weight"] == ("I8", (0,))
    ckpt.verify_checkpoint(tmp_path / "model")

    proc = run_fresh(f"""
        import torch
        import hfptq
        from transformers import AutoModelForCausalLM
        exp = torch.load({str(tmp_path / 'expected.pt')!r})
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r})
        with torch.no_grad():
            out = model(exp["ids"]).logits
        print("EQUAL", torch.equal(out, exp["logits"]))
    """, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "EQUAL True" in proc.stdout


def test_smoothquant_marks_the_modules_it_scaled_and_the_mark_survives_reload(load_tiny, tmp_path):
    """The plan records which W8A8 modules SmoothQuant scaled (``extra["smoothed"]``): their route on a CPU whose
    FBGEMM saturates depends on it (hfptq.quant.backends), so a reload must carry it."""
    from transformers import AutoModelForCausalLM

    model = load_tiny("llama")
    cfg = HfPtqConfig(smoothquant={"alpha": 0.5, "groups": ["gate_up"]}, calibration={"dataset": "hand-made"})
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    hfptq.quantize_model(model, cfg, calibration_data=ids, progress=False)
    flags = {name: m.smoothed for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert flags and all(flags[n] == n.endswith(("gate_proj", "up_proj")) for n in flags), flags
    for name, flag in flags.items():
        assert model.hfptq_plan[name].extra.get("smoothed", False) == flag
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert {name: m.smoothed for name, m in again.named_modules() if isinstance(m, QuantLinear)} == flags

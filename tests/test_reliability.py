"""Reliability: the twelve ways to get silent garbage, a lost run or a bare traceback (issue 20).

Each test drives one adversarial case on a tiny random model and asserts the fixed behaviour: an
``HfPtqError`` naming the file/field and the fix, a refused load, or a bit-exact reload. Every one
of them fails on the code before the fix (checked by running this file against it).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hfptq
from hfptq import checkpoint as ckpt
from hfptq.config import HfPtqConfig
from hfptq.errors import CheckpointError, ConfigError, RecipeError

REPO = Path(__file__).resolve().parents[1]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def reload(path, auto="AutoModelForCausalLM", **kwargs):
    import transformers

    return getattr(transformers, auto).from_pretrained(path, **kwargs).eval()


def edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def plan_entry(data, name):
    return next(m for m in data["quantization_config"]["plan"]["modules"] if m["name"] == name)


class _Ran:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys):
    """``hfptq ARGS`` in this process (the console script's ``main``); an exception other than the ones
    ``main`` turns into exit codes propagates and fails the test, as a traceback would."""
    from hfptq.cli import main

    def run(*args: str) -> _Ran:
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return _Ran(code, out.out, out.err)

    return run


@pytest.fixture
def ids(tiny_input_ids):
    return tiny_input_ids("llama")


# ------------------------------------------------------------------------------------------------
# 1. quantizing an already-quantized model
# ------------------------------------------------------------------------------------------------


def test_quantizing_a_quantized_model_is_refused(load_tiny, ids):
    model = load_tiny("llama", HfPtqConfig())
    before = logits(model, ids)
    with pytest.raises(ConfigError, match=r"already quantized.*dequantize\(\) first"):
        hfptq.quantize_model(model, HfPtqConfig())
    assert torch.equal(logits(model, ids), before)  # untouched


def test_verify_catches_weights_the_plan_does_not_describe(load_tiny, tmp_path, monkeypatch):
    """What a second quantization used to save: a 0-module plan over integer weights (reloaded with random
    FFN and LM head). verify_checkpoint and the load refuse the tensors the plan does not account for."""
    import hfptq.api

    model = load_tiny("llama", HfPtqConfig())
    monkeypatch.setattr(hfptq.api, "refuse_quantized", lambda m: None)  # the code path before the fix
    hfptq.quantize_model(model, HfPtqConfig(), progress=False)
    assert not any(e.quantized for e in model.hfptq_plan)
    model.save_pretrained(tmp_path / "twice")
    with pytest.raises(CheckpointError, match="tensor.s. the plan does not account for"):
        ckpt.verify_checkpoint(tmp_path / "twice")
    with pytest.raises(CheckpointError, match="the plan does not account for"):
        reload(tmp_path / "twice")


# ------------------------------------------------------------------------------------------------
# 2. without `import hfptq`, no standard loading path loads the float model silently
# ------------------------------------------------------------------------------------------------


def test_loading_without_hfptq_fails_whatever_the_flags(load_tiny, tmp_path):
    load_tiny("bert", HfPtqConfig()).save_pretrained(tmp_path / "bert")
    load_tiny("llama", HfPtqConfig()).save_pretrained(tmp_path / "llama")  # untied LM head
    code = f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
        cases = [
            (AutoModelForSequenceClassification, {str(tmp_path / 'bert')!r}, dict(num_labels=3, ignore_mismatched_sizes=True)),
            (AutoModelForSequenceClassification, {str(tmp_path / 'bert')!r}, dict(ignore_mismatched_sizes=True, dtype=torch.float32)),
            (AutoModelForCausalLM, {str(tmp_path / 'llama')!r}, dict(ignore_mismatched_sizes=True)),
            (AutoModelForCausalLM, {str(tmp_path / 'llama')!r}, dict(low_cpu_mem_usage=True, dtype="auto")),
        ]
        for auto, path, kwargs in cases:
            try:
                auto.from_pretrained(path, **kwargs)
                print("LOADED", kwargs)
            except Exception as exc:
                print("RAISED", type(exc).__name__, str(exc)[:200].replace(chr(10), " "))
        print("HFPTQ_IMPORTED", "hfptq" in sys.modules)
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=240, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED" not in proc.stdout and "HFPTQ_IMPORTED False" in proc.stdout
    assert proc.stdout.count("pip_install_hfptq_and_import_hfptq") == 4, proc.stdout
    # with the plugin, the same folders load (the guard is undone before the model is built)
    bert = reload(tmp_path / "bert", "AutoModelForSequenceClassification")
    assert bert.config._attn_implementation != ckpt.LOAD_GUARD


# ------------------------------------------------------------------------------------------------
# 3. FP16 storage overflow
# ------------------------------------------------------------------------------------------------


def test_fp16_overflow_is_refused_at_convert_time(load_tiny, ids):
    model = load_tiny("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = 1e5
    assert torch.isfinite(logits(model, ids)).all()
    with pytest.raises(ConfigError) as info:
        hfptq.quantize_model(model, HfPtqConfig(), progress=False)
    msg = str(info.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "bf16" in msg and "65504" in msg
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear  # nothing converted
    # the suggested fix works: that module in bf16 (float32's range), outputs finite
    rule = {"targets": "model.layers.0.self_attn.q_proj", "precision": "bf16"}
    hfptq.quantize_model(model, HfPtqConfig(rules=[rule]), progress=False)
    assert torch.isfinite(logits(model, ids)).all()


# ------------------------------------------------------------------------------------------------
# 4. hand-edited plans
# ------------------------------------------------------------------------------------------------


def _edits():
    up = "model.layers.1.mlp.up_proj"

    def symmetric(d):
        plan_entry(d, up)["weights"]["symmetric"] = True

    def rotation(d):
        plan_entry(d, up)["activations"]["rotation"] = 32

    def drop_rotation(d):
        plan_entry(d, up)["activations"].pop("rotation")

    def delete(d):
        mods = d["quantization_config"]["plan"]["modules"]
        mods.remove(plan_entry(d, up))

    def skip(d):
        plan_entry(d, up)["precision"] = "skip"

    return {"asym->sym": symmetric, "rotation 16->32": rotation, "rotation removed": drop_rotation,
            "entry deleted": delete, "entry skipped": skip}


@pytest.fixture(scope="module")
def int4_asym_rotated(tmp_path_factory, load_tiny):
    cfg = HfPtqConfig(rules=[{"targets": "kind:ffn", "precision": "int4",
                              "weights": {"symmetric": False, "granularity": "group", "group_size": 16},
                              "activations": {"mode": "none", "rotation": 16}}])
    folder = tmp_path_factory.mktemp("edit") / "ok"
    load_tiny("llama", cfg).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("edit", list(_edits()))
def test_hand_edited_plan_is_refused_at_load_and_by_verify(int4_asym_rotated, tmp_path, edit):
    folder = tmp_path / "edited"
    shutil.copytree(int4_asym_rotated, folder)
    ckpt.verify_checkpoint(folder)
    edit_config(folder, _edits()[edit])
    with pytest.raises(CheckpointError):
        ckpt.verify_checkpoint(folder)
    with pytest.raises(CheckpointError):
        reload(folder)


@pytest.fixture(scope="module")
def smoothed_tied_head(tmp_path_factory, load_tiny):
    """Gemma's tied embedding after SmoothQuant smoothed the LM head: the embedding's ``embed_channel_scale``
    (and Gemma's ``embed_scale``) live only in the plan."""
    model = load_tiny("gemma")
    cfg = HfPtqConfig(smoothquant={"groups": ["head"]}, calibration={"dataset": "hand-made"})
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    hfptq.quantize_model(model, cfg, calibration_data=ids, progress=False)
    assert "embed_channel_scale" in model.hfptq_plan["model.embed_tokens"].extra
    assert model.hfptq_plan["lm_head"].extra.get("smoothed") is True and model.lm_head.smoothed  # the head's route
    folder = tmp_path_factory.mktemp("smoothed") / "g"
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("edit", ["drop embed_channel_scale", "double embed_scale"])
def test_edited_embedding_scales_are_refused(smoothed_tied_head, tmp_path, edit):
    folder = tmp_path / "g"
    shutil.copytree(smoothed_tied_head, folder)

    def change(d):
        extra = plan_entry(d, "model.embed_tokens")["extra"]
        if edit == "drop embed_channel_scale":
            extra.pop("embed_channel_scale")
        else:
            extra["embed_scale"] = 2 * extra["embed_scale"]

    edit_config(folder, change)
    with pytest.raises(CheckpointError, match="hfptq_plan_sha256 differs"):
        ckpt.verify_checkpoint(folder)
    with pytest.raises(CheckpointError, match="edited"):
        reload(folder)


# ------------------------------------------------------------------------------------------------
# 5. bare exceptions on damaged checkpoints
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def saved(load_tiny, tmp_path):
    load_tiny("llama", HfPtqConfig()).save_pretrained(tmp_path / "ok")
    return tmp_path / "ok"


def test_unknown_plan_precision(saved):
    edit_config(saved, lambda d: plan_entry(d, "model.layers.0.mlp.up_proj").update(precision="int7"))
    for call in (lambda: reload(saved), lambda: ckpt.verify_checkpoint(saved)):
        with pytest.raises(CheckpointError, match="'int7'.*config.json"):
            call()


def test_corrupt_shard_index_named(load_tiny, tmp_path):
    load_tiny("llama", HfPtqConfig()).save_pretrained(tmp_path / "s", max_shard_size="20KB")
    index = tmp_path / "s" / "model.safetensors.index.json"
    assert index.is_file()
    index.write_text('{"metadata": {}, "weight_map": {')
    for call in (lambda: reload(tmp_path / "s"), lambda: ckpt.verify_checkpoint(tmp_path / "s")):
        with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
            call()


def test_garbage_checksum_metadata(saved):
    path = saved / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as h:
        meta = dict(h.metadata())
    meta[ckpt.META_CRC32] = "{not json"
    save_file(load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="hfptq_crc32 is damaged"):
        ckpt.verify_checkpoint(saved)


@pytest.mark.parametrize("architectures", [["pipeline"], [3]])
def test_bad_architectures_in_verify(saved, architectures):
    edit_config(saved, lambda d: d.update(architectures=architectures))
    with pytest.raises(CheckpointError, match="architectures"):
        ckpt.verify_checkpoint(saved)


# ------------------------------------------------------------------------------------------------
# 6. saving over a checkpoint in an unwritable folder
# ------------------------------------------------------------------------------------------------


def test_failed_overwrite_says_the_old_checkpoint_is_intact(load_tiny, saved, ids, monkeypatch):
    expected = logits(reload(saved), ids)
    real_unlink = Path.unlink

    def refuse(self, *args, **kwargs):  # what a read-only folder does (root ignores chmod)
        if self.parent == saved:
            raise PermissionError(13, "Permission denied", str(self))
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", refuse)
    model = load_tiny("llama", HfPtqConfig(activations="none"))
    with pytest.raises(CheckpointError) as info:
        model.save_pretrained(saved)
    msg = str(info.value)
    assert "Nothing in" in msg and "intact" in msg and "removed first" not in msg
    monkeypatch.undo()
    assert torch.equal(logits(reload(saved), ids), expected)  # what the message says is true
    assert not any(".hfptq-partial-" in p.name for p in saved.parent.iterdir())


# ------------------------------------------------------------------------------------------------
# 7. model.to(bfloat16) after quantizing: reload is bit-exact
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activations", ["dynamic", "none"])
def test_bfloat16_model_reloads_bit_exact(load_tiny, tiny_input_ids, tmp_path, activations):
    # BERT: absolute positions, so nothing outside hfptq changes with the cast (a rotary model's float32
    # inv_freq buffer is cast by .to() but rebuilt in float32 on reload, by Transformers, quantized or not)
    model = load_tiny("bert", HfPtqConfig(activations=activations)).to(torch.bfloat16)
    ids = tiny_input_ids("bert")
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "bf16")
    again = reload(tmp_path / "bf16", "AutoModelForSequenceClassification")
    assert torch.equal(logits(again, ids), expected)
    scales = {n: b.dtype for n, b in again.named_buffers() if n.endswith("weight_scale")}
    assert scales and set(scales.values()) == {torch.bfloat16}


def test_tied_quantized_embedding_follows_to_dtype(load_tiny, tmp_path):
    model = load_tiny("gemma", HfPtqConfig()).to(torch.bfloat16)
    emb = model.get_input_embeddings()
    assert type(emb).__name__ == "QuantEmbedding"
    ids = torch.arange(3, 20).view(1, -1)
    with torch.no_grad():
        out = emb(ids)
    assert out.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "g")
    with torch.no_grad():
        again = reload(tmp_path / "g").get_input_embeddings()(ids)
    assert torch.equal(again, out)


# ------------------------------------------------------------------------------------------------
# 8. recipe validation at load, with file and line
# ------------------------------------------------------------------------------------------------


def _recipe(tmp_path, body: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(body).lstrip())
    return path


@pytest.mark.parametrize("body,line,fragment", [
    ("""
     version: 1
     quantization:
       smoothquant:
         alpah: 0.5
     """, 4, "Did you mean 'alpha'?"),
    ("""
     version: 1
     quantization:
       gptq: {dampp: 0.01}
     """, 3, "Did you mean 'damp'?"),
    ("""
     version: 0
     """, 1, "version"),
    ("""
     version: -7
     """, 1, "version"),
    ("""
     version: 1
     quantization:
       smoothquant:
         alpha: 0.5
         alpha: 0.8
     """, 5, "duplicate key 'alpha'"),
    ("""
     version: 1
     quantization:
       activations: static
       calibration:
         dataset: wikitext
         percentile: 150
     """, 6, "percentile must be in (0, 100]"),
    ("""
     version: 1
     quantization:
       activations: {mode: static, observer: percentile, bins: 0}
       calibration: {dataset: wikitext}
     """, 3, "bins must be in"),
    ("""
     version: 1
     quantization:
       smoothquant: {alpha: 5}
       calibration: {dataset: wikitext}
     """, 3, "alpha must be in"),
    ("""
     version: 1
     quantization:
       gptq:
         damp: -1
       calibration: {dataset: wikitext}
     """, 4, "damp must be in"),
])
def test_recipe_errors_at_load_with_file_and_line(tmp_path, body, line, fragment):
    path = _recipe(tmp_path, body)
    with pytest.raises(RecipeError) as info:
        hfptq.recipes.load_recipe(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:{line}:"), msg
    assert fragment in msg


def test_hfptq_plan_reports_option_typo_with_line(tmp_path, cli):
    path = _recipe(tmp_path, """
        version: 1
        quantization:
          gptq: {dampp: 0.01}
        """)
    proc = cli("plan", str(path))
    assert proc.returncode == 2
    assert f"{path}:3:" in proc.stderr and "Did you mean 'damp'?" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------
# 9. `hfptq run` checks the output location first, and keeps the report if saving fails late
# ------------------------------------------------------------------------------------------------


def _tiny_run_recipe(tmp_path, tiny_model_dir, out: str) -> Path:
    from tests.tiny import tiny_llama_dir  # with a tokenizer

    model = tiny_llama_dir(tmp_path / "tiny-llama", layers=1)
    return _recipe(tmp_path, f"""
        version: 1
        name: tiny
        model: {{name_or_path: {model}}}
        quantization: {{activations: dynamic}}
        evaluation: {{}}
        output: {{dir: {out}, plots: false}}
        """)


def test_run_refuses_a_file_as_output_before_loading(tmp_path, tiny_model_dir, monkeypatch):
    import hfptq.pipeline as pipeline

    (tmp_path / "out").write_text("a file")
    recipe = hfptq.recipes.load_recipe(_tiny_run_recipe(tmp_path, tiny_model_dir, str(tmp_path / "out")))
    monkeypatch.setattr(pipeline, "load_models", lambda *a, **k: pytest.fail("loaded before checking the output"))
    with pytest.raises(ConfigError, match="is a file"):
        pipeline.run_recipe(recipe, progress=False, print_summary=False)
    with pytest.raises(ConfigError, match="output.dir: cannot write to .*out/sub"):
        pipeline.run_recipe(recipe, output_dir=str(tmp_path / "out" / "sub"), progress=False, print_summary=False)


def test_run_writes_the_report_when_saving_fails_late(tmp_path, tiny_model_dir, monkeypatch):
    import hfptq.pipeline as pipeline

    recipe = hfptq.recipes.load_recipe(_tiny_run_recipe(tmp_path, tiny_model_dir, str(tmp_path / "out")))

    def broken_save(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_quantized", broken_save)
    with pytest.raises(CheckpointError, match="report was written"):
        pipeline.run_recipe(recipe, progress=False, print_summary=False)
    assert (tmp_path / "out" / "report" / "report.json").is_file()


# ------------------------------------------------------------------------------------------------
# 10-12. CLI: missing paths, float checkpoints, unknown aliases -> hfptq errors, exit 2
# ------------------------------------------------------------------------------------------------


def test_cli_missing_paths_exit_2(tmp_path, tiny_model_dir, cli):
    tok = _recipe(tmp_path, f"""
        version: 1
        model: {{name_or_path: {tiny_model_dir('llama')}}}
        quantization:
          activations: static
          calibration: {{dataset: wikitext, tokenizer: /nope/tokenizer}}
        output: {{dir: {tmp_path / 'o'}}}
        """)
    for args in (["plan", "/nope"], ["plan", "default", "--model", "/nope"], ["run", "default", "--model", "/nope",
                                                                             "--output", str(tmp_path / "o1")],
                 ["run", str(tok)]):
        proc = cli(*args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and "error:" in proc.stderr, (args, proc.stderr[-2000:])
        assert "/nope" in proc.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o").exists()  # nothing created by a refused run


def test_cli_eval_refuses_a_float_checkpoint(tiny_model_dir, cli):
    proc = cli("eval", str(tiny_model_dir("llama")))
    assert proc.returncode == 2
    assert "not an hfptq-quantized checkpoint" in proc.stderr


def test_cli_model_rejects_unknown_alias(cli):
    proc = cli("model", "gemma9")
    assert proc.returncode == 2
    assert "Unknown model alias 'gemma9'" in proc.stderr and "Did you mean 'gemma3-270m'?" in proc.stderr


# ------------------------------------------------------------------------------------------------
# Also: leftovers of interrupted saves, all-skip configs, in-memory calibration data
# ------------------------------------------------------------------------------------------------


def test_interrupted_save_leftovers_are_cleaned_by_the_next_save(load_tiny, tmp_path):
    target = tmp_path / "model"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".model.hfptq-partial-{dead.stdout.strip()}-0123456789ab"  # its process has exited
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"x" * 1000)
    old_style = tmp_path / ".model.hfptq-partial-0123456789ab"
    old_style.mkdir()
    alive = tmp_path / f".model.hfptq-partial-{os.getpid()}-ba9876543210"  # a concurrent save of a live process
    alive.mkdir()
    load_tiny("llama", HfPtqConfig()).save_pretrained(target)
    assert not leftover.exists() and not old_style.exists()
    assert alive.exists()
    ckpt.verify_checkpoint(target)


def test_config_skipping_everything_warns(load_tiny, caplog):
    model = load_tiny("llama")
    cfg = HfPtqConfig(scheme={k: "skip" for k in ("attention", "ffn", "lm_head", "embedding", "other")})
    with caplog.at_level("WARNING", logger="hfptq"):
        hfptq.quantize_model(model, cfg, progress=False)
    assert "skips every module" in caplog.text


def test_in_memory_calibration_dataset_is_named_in_card_and_refused_by_the_recipe(load_tiny, tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["the city of the world was new and old"] * 8})
    cfg = HfPtqConfig(activations="static", calibration={"dataset": ds, "num_samples": 2, "seq_len": 8,
                                                          "tokenizer": None})
    stored = cfg.to_dict()["calibration"]["dataset"]
    assert stored.startswith("<in-memory Dataset") and f"fingerprint={ds._fingerprint}" in stored and "rows=8" in stored
    model = load_tiny("llama")
    model.hfptq_calibration = None
    hfptq.quantize_model(model, cfg, calibration_data=torch.randint(3, 100, (2, 8)), progress=False)
    model.save_pretrained(tmp_path / "m")
    card = (tmp_path / "m" / "README.md").read_text()
    assert "Not reproducible from its recipe" in card and ds._fingerprint in card
    with pytest.raises(RecipeError, match="in-memory"):
        hfptq.recipes.load_recipe(tmp_path / "m" / ckpt.RECIPE_FILENAME)


# ------------------------------------------------------------------------------------------------
# a calibration tokenizer that does not load, from Python (the CLI checks paths before any work)
# ------------------------------------------------------------------------------------------------


def test_bad_calibration_tokenizer_from_python_names_the_field(load_tiny, tmp_path):
    model = load_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    missing = tmp_path / "no-tokenizer-here"
    cfg = HfPtqConfig(activations="static",
                      calibration={"dataset": "wikitext", "tokenizer": str(missing), "num_samples": 2, "seq_len": 8})
    with pytest.raises(ConfigError, match=r"calibration\.tokenizer .*no-tokenizer-here.*does not load") as info:
        hfptq.quantize_model(model, cfg, progress=False)
    assert info.value.key == "calibration.tokenizer"
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # untouched

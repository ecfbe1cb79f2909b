"""The hfptq console script: help, plan, recipes, exit codes, a full tiny run."""
import subprocess
import sys

import pytest

from hfptq.cli import main
from hfptq.data import shared_data_dir
from tests.tiny import tiny_llama_dir


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("run", "eval", "plan", "recipes", "model"):
        assert command in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2


def test_recipes_lists_builtins(capsys):
    assert main(["recipes"]) == 0
    assert "default" in capsys.readouterr().out


def test_bad_recipe_exits_2_with_message(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nname: x\nquantization:\n  activation: static\n")
    assert main(["plan", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:4" in err and "Did you mean 'activations'" in err


def test_plan_on_tiny_model_prints_every_linear(tmp_path, capsys):
    folder = tiny_llama_dir(tmp_path / "m")
    assert main(["plan", "w8a8-all-linear", "--model", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in out and "lm_head" in out and "hfptq plan (llama)" in out


@pytest.mark.skipif(shared_data_dir() is None, reason="../shared/data not found")
def test_console_script_run_and_eval(tmp_path):
    folder = tiny_llama_dir(tmp_path / "m")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "hfptq.cli", "run", "w8a8-all-linear", "--model", str(folder), "--quick",
           "--no-progress", "--output", str(out), "--data-dir", str(shared_data_dir())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hfptq quality report" in proc.stdout and "perplexity" in proc.stdout
    # --no-progress: no bar anywhere, the calibration's and conversion's inside from_pretrained included
    assert "%|" not in proc.stderr and "calibrating" not in proc.stderr, proc.stderr[-3000:]
    assert (out / "report" / "report.json").exists() and (out / "model" / "model.safetensors").exists()
    proc = subprocess.run([sys.executable, "-m", "hfptq.cli", "eval", str(out / "model"), "--reference", str(folder),
                           "--quick", "--no-progress", "--output", str(tmp_path / "ev"), "--data-dir", str(shared_data_dir())],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ev" / "report.json").exists()


def test_missing_checkpoint_for_eval(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err

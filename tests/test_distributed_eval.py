"""Evaluation of a model split across processes (torchrun ranks on CPU, gloo) and devices (cpu + disk).

Exactness: each rank forms exactly the batches one process forms, every window's NLL is one
float32 ``cross_entropy`` sum turned into a Python float, and the floats are added in window order
on every rank. With the same kernels and thread count (1 here) every window's logits are the same
numbers, so the combined perplexity must be *equal* to the one-process value, not just close.
A disk-offloaded layer is read back from the same safetensors bytes and runs the same kernels on
the CPU, so its perplexity must be equal too.

Run as a script (``torchrun --nproc_per_node 2 tests/test_distributed_eval.py OUT``), this file is
the worker of :func:`test_ranks_combine_in_window_order_and_fail_together`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # torchrun worker: make `tests` and `hfptq` importable like pytest does
    sys.path.insert(0, str(ROOT))

from hfptq.cli import main  # noqa: E402
from hfptq.data import shared_data_dir  # noqa: E402
from hfptq.evaluation import perplexity  # noqa: E402

needs_data = pytest.mark.skipif(shared_data_dir() is None, reason="../shared/data not found")

RECIPE = """version: 1
name: tiny-distributed
model: {dtype: float32, task: causal-lm}
evaluation:
  perplexity: {dataset: wikitext, config: wikitext-2-raw-v1, split: test, seq_len: 48, max_windows: 7, batch_size: 2}
  latency: {prompt_len: 8, new_tokens: 2, repeats: 1}
"""
# Layers 1 and 2 live on disk: accelerate reads them from the checkpoint when they run.
DISK_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
            "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


def _env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama (untied, 3 layers), its hfptq checkpoint and a perplexity recipe."""
    from transformers import AutoModelForCausalLM

    from hfptq import HfPtqConfig

    from .tiny import tiny_llama_dir

    root = tmp_path_factory.mktemp("dist")
    float_dir = tiny_llama_dir(root / "float", tie=False, layers=3)
    AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=HfPtqConfig()).save_pretrained(root / "q")
    (root / "recipe.yaml").write_text(RECIPE)
    (root / "map.json").write_text(json.dumps(DISK_MAP))
    return root


def _eval_args(tiny: Path, out: Path, *extra: str) -> list:
    return ["eval", str(tiny / "q"), "--recipe", str(tiny / "recipe.yaml"), "--reference", str(tiny / "float"),
            "--data-dir", str(shared_data_dir()), "--no-progress", "--output", str(out), *extra]


@pytest.fixture(scope="module")
def one_process_report(tiny):
    """``hfptq eval`` in this process at one thread: the reference numbers."""
    from hfptq.workflows import evaluate_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report, out = evaluate_checkpoint(tiny / "q", recipe=str(tiny / "recipe.yaml"), reference=str(tiny / "float"),
                                          data_dir=str(shared_data_dir()), output=tiny / "ev-one", progress=False)
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "report.json").read_text())


@needs_data
def test_eval_with_two_processes_equals_one_process(tiny, one_process_report, tmp_path, capfd, monkeypatch):
    """`hfptq eval --processes 2` starts two torchrun ranks (children of this process)."""
    for key, value in _env().items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "ev-two"
    rc = main(_eval_args(tiny, out, "--processes", "2"))
    stdout, stderr = capfd.readouterr()
    assert rc == 0, stderr[-4000:]
    two = json.loads((out / "report.json").read_text())
    assert two["perplexity"]["num_windows"] == 7  # 4 batches (the last holds 1 window): 2 per rank
    assert two["perplexity"] == one_process_report["perplexity"]  # bit-identical, NLLs included
    assert stdout.count("hfptq quality report") == 1  # only the main process prints
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ev-two"]  # no staging folder left


@needs_data
def test_disk_offloaded_reload_gives_the_same_perplexity(tiny, one_process_report, tmp_path):
    """cpu + disk are this machine's devices: layers 1-2 of both models are read from disk per forward."""
    from transformers import AutoModelForCausalLM

    from hfptq.workflows import evaluate_checkpoint

    ids = torch.randint(4, 200, (400,), generator=torch.Generator().manual_seed(0))
    full = AutoModelForCausalLM.from_pretrained(tiny / "q").eval()
    # offload_buffers: hfptq's integer weights and scales are buffers, kept in memory without it
    split = AutoModelForCausalLM.from_pretrained(tiny / "q", device_map=DISK_MAP, offload_folder=str(tmp_path / "o"),
                                                 offload_buffers=True)
    assert {"cpu", "disk"} <= set(split.hf_device_map.values())
    on_disk = dict(split.model.layers[2].named_buffers())
    assert on_disk["mlp.down_proj.qweight"].device.type == "meta"  # really not in memory
    kw = dict(seq_len=40, stride=25, batch_size=3, bos_token_id=2, progress=False)
    assert perplexity(split, ids, **kw) == perplexity(full, ids, **kw)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, out = evaluate_checkpoint(tiny / "q", recipe=str(tiny / "recipe.yaml"), reference=str(tiny / "float"),
                                     data_dir=str(shared_data_dir()), output=tmp_path / "ev-disk", progress=False,
                                     device_map=str(tiny / "map.json"), max_memory=None)
    finally:
        torch.set_num_threads(threads)
    assert json.loads((out / "report.json").read_text())["perplexity"] == one_process_report["perplexity"]


# ------------------------------------------------------------------------------------------------
# perplexity(accelerator=...) in two real ranks: exact combination, and failures seen by every rank
# ------------------------------------------------------------------------------------------------


def _tiny_lm(vocab: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def _corpus(vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (333,), generator=torch.Generator().manual_seed(1))


PPL_ARGS = dict(seq_len=24, stride=17, batch_size=2, bos_token_id=1, progress=False)


def _worker(out_dir: str, eval_args: list) -> int:
    """One rank: the same evaluation as one process, then a rank that fails, then ranks that disagree;
    last, ``hfptq eval`` under this launch with rank 1's copy of the data missing (its exit code)."""
    from accelerate import PartialState

    from hfptq import HfPtqError

    torch.set_num_threads(1)
    state = PartialState(cpu=True)
    rank = state.process_index
    model, ids = _tiny_lm(), _corpus()
    record: dict = {"world": state.num_processes}
    record["result"] = perplexity(model, ids, accelerator=state, **PPL_ARGS).to_dict()
    bad = ids.clone()
    if rank == 1:
        bad[200] = 10_000  # beyond the vocabulary: this rank's embedding lookup raises
    try:
        perplexity(model, bad, accelerator=state, **PPL_ARGS)
    except Exception as exc:  # noqa: BLE001 - recorded for the test to inspect
        record["failure"] = [type(exc).__name__, isinstance(exc, HfPtqError), str(exc)]
    try:
        perplexity(model, ids, accelerator=state, **dict(PPL_ARGS, max_windows=5 + rank))
    except Exception as exc:  # noqa: BLE001
        record["mismatch"] = [type(exc).__name__, isinstance(exc, HfPtqError), str(exc)]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    if rank == 1:  # e.g. a node whose copy of the datasets is missing
        eval_args = [a if a != str(shared_data_dir()) else str(Path(out_dir) / "no-data") for a in eval_args]
    return main(eval_args)


@needs_data
def test_ranks_combine_in_window_order_and_fail_together(tiny, tmp_path):
    report = tmp_path / "ev"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(tmp_path),
           *_eval_args(tiny, report)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = perplexity(_tiny_lm(), _corpus(), **PPL_ARGS).to_dict()
    finally:
        torch.set_num_threads(threads)
    assert expected["num_windows"] == 20  # 10 batches of 2 windows: 5 per rank
    for record in ranks:
        assert record["world"] == 2
        assert record["result"] == expected  # every rank returns the one-process number, bit for bit

    # rank 1 re-raises its own error; rank 0 does not wait forever but names the rank and the cause
    assert ranks[1]["failure"][0] == "IndexError"
    name, is_hfptq, message = ranks[0]["failure"]
    assert name == "RankFailedError" and is_hfptq
    assert "rank 1: IndexError" in message and "1 of 2 processes" in message
    # ranks that were given different inputs are refused on both, naming what differs
    for record in ranks:
        name, is_hfptq, message = record["mismatch"]
        assert name == "ConfigError" and is_hfptq and "rank 1" in message and "'windows': 6" in message

    # hfptq eval with one failing rank: the launch fails, the rank says why, nothing is written
    assert proc.returncode != 0
    assert "hfptq eval [rank 1]: error: HFPTQ_DATA_DIR" in proc.stderr and "no-data" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.json", "rank1.json"]


# ------------------------------------------------------------------------------------------------
# Launch mistakes: clear error, exit code 2, nothing started or written
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("processes, expected", [("0", "whole number >= 1"), ("-3", "whole number >= 1"),
                                                 (str((os.cpu_count() or 1) + 1), "CPU cores")])
def test_bad_process_count_is_refused_before_any_work(tiny, tmp_path, capsys, processes, expected):
    out = tmp_path / "ev"
    assert main(_eval_args(tiny, out, "--processes", processes)) == 2
    err = capsys.readouterr().err
    assert "--processes" in err and expected in err
    assert not out.exists()


def test_accelerate_cpu_launch_that_started_one_process_is_refused(tiny, tmp_path, capsys, monkeypatch):
    """`accelerate launch --cpu --num_processes 2` runs ONE process here (it needs mpirun): say so."""
    for key, value in {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "ev"
    assert main(_eval_args(tiny, out)) == 2
    err = capsys.readouterr().err
    assert "started a single process" in err and "torchrun --standalone --nproc_per_node" in err
    assert not out.exists()


def test_device_map_options_are_checked(tiny, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(_eval_args(tiny, out, "--device-map", "everywhere")) == 2
    assert "device_map 'everywhere'" in capsys.readouterr().err
    assert main(_eval_args(tiny, out, "--max-memory", "cpu")) == 2
    assert "DEVICE=SIZE" in capsys.readouterr().err
    assert main(_eval_args(tiny, out, "--offload-folder", str(tmp_path / "off"))) == 2
    assert "only apply with a device_map" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "off").exists()


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], sys.argv[2:]))

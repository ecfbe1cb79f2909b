"""Peak memory of quantize-at-load (and of offloaded calibration) on a checkpoint larger than the memory it is given.

What is measured
----------------
* A random-weight Llama-architecture checkpoint is built on disk in bfloat16 (default: 3.0 B
  parameters, hidden 3072, 28 layers, FFN 8192, vocab 32000, untied embeddings = 6.0 GB), one
  safetensors shard per decoder layer, written tensor by tensor (building it never holds more than
  one layer in memory). It is cached under ``--cache`` (default ``$HFPTQ_CACHE`` or
  ``~/.cache/hfptq/scale``), never in the repository, and reused when its ``build.json`` matches.
* Each configuration is loaded in its own fresh subprocess with
  ``AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=...)``;
  a thread samples ``/proc/self/status`` (``VmRSS``, ``RssAnon``, ``RssFile``) every 20 ms and
  ``VmHWM`` (the kernel's own high-water mark of the process) is the reported peak. Reported: peak RSS,
  the quantized model's bytes (parameters + buffers), both as ratios to the float checkpoint's bytes,
  wall and process CPU time of the load, and a one-token forward as a smoke check.
* The ``sq-*`` configurations calibrate (SmoothQuant, 4 samples x 128 tokens): the float model is
  loaded offloaded by accelerate (every decoder layer, the final norm and the LM head on
  ``"disk"``, read from the checkpoint's own shards; the embedding in memory) and
  :func:`hfptq.quantize_offloaded` quantizes it one layer at a time. The model has random weights
  and no tokenizer, so the calibration samples are random token ids (seeded). Their rows also
  give hfptq's own estimate of the peak, printed before any weight is loaded.
* ``--cap-gb``: the subprocess runs in a cgroup (v1 or v2) whose memory limit is this many GB when
  one can be created (root); otherwise the cap is reported as not enforced and only measured. A
  load that exceeds it is killed (reported as failed); the page cache of the mapped checkpoint is
  reclaimable and does not count against it.
  ``RLIMIT_AS`` cannot be used: the checkpoint is memory-mapped, which counts against it.

Configurations (``--configs``)
------------------------------
=================  ==========================================================================
default            ``HfPtqConfig()``: attention kept 16-bit (FP16), FFN + LM head int8 W8A8
int8               ``HfPtqConfig(scheme={"attention": "int8"})``: every linear int8
w4                 ``HfPtqConfig(weights={"bits": 4}, activations="none")``: FFN + LM head int4
                   group-128 weight-only, attention FP16
w4-all             the same with ``scheme={"attention": "int4"}``: every linear int4
sq-default         ``HfPtqConfig()`` + SmoothQuant (alpha 0.5), offloaded, calibrated
sq-int8-static     every linear int8 W8A8 with static activations + SmoothQuant, offloaded
sq-mixed           attention int8 W8A8 static + SmoothQuant, FFN int4 group-128 weight-only,
                   LM head int8 W8A8 static, offloaded
=================  ==========================================================================

``<config>-float-first`` (e.g. ``default-float-first``) loads the float model first and quantizes
after loading, as hfptq did before quantize-while-loading (and still does for calibrated plans).

Run::

    python benchmarks/scale.py --configs default,int8,w4-all --cap-gb default=4.8,int8=4.1,w4-all=3.0
    python benchmarks/scale.py --append --configs sq-default,sq-int8-static,sq-mixed \
        --cap-gb sq-default=4.8,sq-int8-static=4.1,sq-mixed=3.0
    python benchmarks/scale.py --layers 4 --configs default --json /tmp/x.json   # quick

Writes ``benchmarks/results/scale-<n>B.json`` (with CPU facts) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch

HERE = Path(__file__).resolve().parent

LLAMA_3B = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
                rms_norm_eps=1e-5, rope_theta=500000.0)

CONFIGS = {
    "default": "HfPtqConfig()",
    "int8": "HfPtqConfig(scheme={'attention': 'int8'})",
    "w4": "HfPtqConfig(weights={'bits': 4}, activations='none')",
    "w4-all": "HfPtqConfig(weights={'bits': 4}, activations='none', scheme={'attention': 'int4'})",
}
#: ``<config>-float-first``: the same plan loaded in float and quantized after loading (what every
#: plan did before quantize-while-loading; HFPTQ_QUANTIZE_WHILE_LOADING=0)
FLOAT_FIRST = "-float-first"

#: SmoothQuant-calibrated plans, run over the disk-offloaded float model (hfptq.quantize_offloaded): every
#: decoder layer, the final norm and the LM head on "disk", the embedding in memory
_CALIBRATION = "calibration={'dataset': 'random token ids', 'num_samples': 4, 'seq_len': 128, 'batch_size': 4}"
OFFLOADED = {
    "sq-default": f"HfPtqConfig(smoothquant={{'alpha': 0.5}}, {_CALIBRATION})",
    "sq-int8-static": f"HfPtqConfig(scheme={{'attention': 'int8'}}, activations='static', smoothquant={{'alpha': 0.5}}, "
                      f"{_CALIBRATION})",
    "sq-mixed": f"HfPtqConfig(scheme={{'attention': 'int8', 'ffn': 'int4'}}, activations='static', "
                f"smoothquant={{'alpha': 0.5}}, {_CALIBRATION})",
}
CALIBRATION_SHAPE = (4, 128)
CONFIGS.update(OFFLOADED)


def offload_map(config) -> Dict[str, str]:
    """Device map of the offloaded runs: the decoder layers, final norm and LM head on disk."""
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "disk", "lm_head": "disk"}
    device_map.update({f"model.layers.{i}": "disk" for i in range(config.num_hidden_layers)})
    return device_map


# ------------------------------------------------------------------------------------------------
# The checkpoint
# ------------------------------------------------------------------------------------------------


def llama_config(layers: Optional[int] = None, **overrides: Any):
    """The Llama config of the benchmark model (``layers`` overrides the 28 decoder layers)."""
    from transformers import LlamaConfig

    values = dict(LLAMA_3B)
    if layers is not None:
        values["num_hidden_layers"] = layers
    values.update(overrides)
    return LlamaConfig(**values)


def layer_shapes(config) -> Dict[str, tuple]:
    """Parameter name -> shape for one decoder layer (without the ``model.layers.<i>.`` prefix)."""
    h, i = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return {
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q), "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i), "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
    }


def checkpoint_shapes(config) -> List[Dict[str, tuple]]:
    """One ``{name: shape}`` dict per shard: embeddings, each decoder layer, final norm + LM head."""
    shards = [{"model.embed_tokens.weight": (config.vocab_size, config.hidden_size)}]
    for layer in range(config.num_hidden_layers):
        shards.append({f"model.layers.{layer}.{k}": v for k, v in layer_shapes(config).items()})
    last = {"model.norm.weight": (config.hidden_size,)}
    if not config.tie_word_embeddings:
        last["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    shards.append(last)
    return shards


def _random(shape: tuple, generator: torch.Generator, fan_in: int) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    # generated in float32 row blocks (vectorised, bounded temporary) and stored in bfloat16
    out = torch.empty(shape, dtype=torch.bfloat16)
    std = fan_in ** -0.5
    block = max(1, (64 << 20) // (4 * shape[1]))
    for start in range(0, shape[0], block):
        stop = min(shape[0], start + block)
        out[start:stop] = torch.randn((stop - start, shape[1]), generator=generator).mul_(std)
    return out


def build_checkpoint(folder: Path, config, *, seed: int = 0, progress: bool = True) -> Dict[str, Any]:
    """Write a random-weight bf16 checkpoint (sharded safetensors + index + config.json) into ``folder``.

    Returns the build record (also written to ``build.json``); an existing folder whose
    ``build.json`` matches is reused as it is.

    Example:
        >>> build_checkpoint(Path("/tmp/scale-tiny"), llama_config(layers=2, hidden_size=64,
        ...     intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=100))  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    shards = checkpoint_shapes(config)
    params = sum(int(torch.Size(s).numel()) for shard in shards for s in shard.values())
    record = {"config": config.to_dict(), "seed": seed, "params": params, "dtype": "bfloat16",
              "float_bytes": params * 2, "shards": len(shards)}
    record["config"].pop("transformers_version", None)
    record = json.loads(json.dumps(record))  # as stored (tuples become lists)
    stamp = folder / "build.json"
    if stamp.exists():
        try:
            if json.loads(stamp.read_text()) == record:
                return record
        except ValueError:
            pass
    folder.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    started = time.perf_counter()
    for index, shard in enumerate(shards):
        name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {key: _random(shape, generator, shape[-1]) for key, shape in shard.items()}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
        del tensors
        if progress:
            print(f"\rbuilding {folder}: shard {index + 1}/{len(shards)} ({time.perf_counter() - started:.0f} s)",
                  end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": record["float_bytes"]}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(folder)
    stamp.write_text(json.dumps(record))
    return record


# ------------------------------------------------------------------------------------------------
# Measuring one load (runs in a fresh subprocess)
# ------------------------------------------------------------------------------------------------


def _status_kb(fields=("VmRSS", "RssAnon", "RssFile", "VmHWM")) -> Dict[str, int]:
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in fields:
                out[key] = int(line.split()[1])
    return out


class PeakSampler:
    """Samples ``/proc/self/status`` every ``interval`` seconds in a thread; keeps the maxima (KiB)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak: Dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def sample(self) -> None:
        for key, value in _status_kb().items():
            self.peak[key] = max(self.peak.get(key, 0), value)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def measure_child(path: str, config_name: str) -> Dict[str, Any]:
    """Load ``path`` with one configuration in this (fresh) process; return the measurements."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import hfptq
    from hfptq import HfPtqConfig
    from hfptq.api import model_bytes

    hf_logging.set_verbosity_error()
    baseline = _status_kb()
    expr = CONFIGS[config_name.removesuffix(FLOAT_FIRST)]
    if config_name.endswith(FLOAT_FIRST):
        os.environ["HFPTQ_QUANTIZE_WHILE_LOADING"] = "0"
    config = eval(expr, {"HfPtqConfig": HfPtqConfig})  # noqa: S307 - fixed table above
    offloaded = config_name in OFFLOADED
    wall, cpu = time.perf_counter(), time.process_time()
    with PeakSampler() as sampler:
        if offloaded:
            import tempfile

            from transformers import AutoConfig

            # the float model offloaded to disk (accelerate reads the checkpoint's own shards), then quantized
            # one layer at a time; the random-weight model has no tokenizer, so the calibration samples are
            # random token ids (seeded)
            with tempfile.TemporaryDirectory() as folder:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, offload_folder=folder,
                                                             device_map=offload_map(AutoConfig.from_pretrained(path)))
                ids = torch.randint(0, model.config.vocab_size, CALIBRATION_SHAPE,
                                    generator=torch.Generator().manual_seed(0))
                hfptq.quantize_offloaded(model, config, calibration_data=ids, progress=False)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=config)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after_load = _status_kb()
    load_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    from hfptq.quant.linear import FloatLinear

    # smoke forward without FloatLinear's bfloat16 copy of the FP16 weights (+1.4 GB on the 3 B model:
    # an inference-speed cache, not part of quantizing)
    FloatLinear.cache_compute_weight = False
    from hfptq.quant.kernels import reference_math

    # ... and with the reference formulas: the fast kernels' packed copies of the integer weights (FBGEMM's,
    # +2 GB for static W8A8 on every linear) are inference caches too, and would not fit the cap of the load
    with torch.no_grad(), reference_math():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    return {
        "config": config_name, "expr": expr, "load_wall_s": wall, "load_cpu_s": cpu,
        "ru_maxrss_bytes": load_maxrss,  # the kernel's peak up to the end of from_pretrained
        "ru_maxrss_after_forward_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "sampled_peak_bytes": {k: v * 1024 for k, v in sampler.peak.items()},
        "baseline_bytes": {k: v * 1024 for k, v in baseline.items()},
        "after_load_bytes": {k: v * 1024 for k, v in after_load.items()},
        "quantized_bytes": model_bytes(model), "streamed": bool(getattr(model, "hfptq_streamed", False)),
        "offloaded": offloaded, "offload": getattr(model, "hfptq_offload", None),
        "calibration": {k: (model.hfptq_calibration or {}).get(k) for k in
                        ("num_samples", "seq_len", "seconds", "peak_rss_bytes", "estimated_memory_bytes", "engine")}
        if offloaded else None,
        "finite_logits": bool(torch.isfinite(logits).all()), "hfptq": hfptq.__version__,
        "summary": hfptq.summary(model),
    }


def _cgroup_prefix(cap_gb: Optional[float]) -> tuple:
    """(command prefix running the child under a memory cgroup of ``cap_gb`` GB, description, cgroup dir)."""
    if not cap_gb:
        return [], "none", None
    limit = int(cap_gb * 1e9)
    name = f"hfptq-scale-{os.getpid()}"
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    try:
        if v2.exists():
            group = Path("/sys/fs/cgroup") / name
            group.mkdir()
            (group / "memory.max").write_text(str(limit))
            return (["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh"],
                    f"cgroup v2 memory.max {cap_gb:g} GB", group)
        group = Path("/sys/fs/cgroup/memory") / name
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
        return (["sh", "-c", f'echo $$ > {group}/tasks && exec "$@"', "sh"],
                f"cgroup v1 memory.limit_in_bytes {cap_gb:g} GB", group)
    except OSError as exc:
        return [], f"not enforced ({type(exc).__name__}: {exc})", None


def run_config(path: Path, config_name: str, cap_gb: Optional[float], threads: int) -> Dict[str, Any]:
    prefix, enforced, group = _cgroup_prefix(cap_gb)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    code = (f"import json,sys; sys.path.insert(0,{str(HERE)!r}); import scale; "
            f"print('RESULT'+json.dumps(scale.measure_child({str(path)!r},{config_name!r})))")
    try:
        proc = subprocess.run(prefix + [sys.executable, "-c", code], env=env, capture_output=True, text=True)
    finally:
        if group is not None:
            try:
                group.rmdir()
            except OSError:
                pass
    result: Dict[str, Any] = {"config": config_name, "cap": enforced, "returncode": proc.returncode}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            result.update(json.loads(line[len("RESULT"):]))
    if proc.returncode != 0:
        result["stderr_tail"] = proc.stderr[-2000:]
    return result


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def cpu_facts() -> Dict[str, Any]:
    flags, model = [], platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    return {"cpu_model": model, "cpu_flags": flags, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "logical_cpus": os.cpu_count()}


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def _peak(row: Mapping[str, Any]) -> int:
    """Peak RSS of the load: the kernel's high-water mark (``VmHWM``, reset at exec, unlike
    ``ru_maxrss`` which starts from the forking parent's size), else the sampled maximum."""
    hwm = row["after_load_bytes"].get("VmHWM")
    return hwm if hwm else max(row["ru_maxrss_bytes"], row["sampled_peak_bytes"].get("VmRSS", 0))


def render(result: Dict[str, Any]) -> str:
    """Markdown table of one run (peak RSS and quantized size as ratios to the float checkpoint)."""
    float_bytes = result["float_bytes"]
    lines = [
        f"Model: random Llama, {result['params'] / 1e9:.2f} B params, bf16 checkpoint {_gb(float_bytes)} GB "
        f"({result['shards']} shards); {result['date']}; {result['cpu_model']} ({result['cpu_capability']})",
        "",
        "| config | path | peak RSS GB | peak / float | quantized GB | quantized / float | estimated peak / float "
        "| <= 0.5x | load wall s | load CPU s | cap |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for row in result["rows"]:
        if "ru_maxrss_bytes" not in row:
            lines.append(f"| {row['config']} | failed (rc {row['returncode']}) | | | | | | | | | {row['cap']} |")
            continue
        peak = _peak(row)
        path = ("offloaded, calibrated" if row.get("offloaded") else
                "streamed" if row["streamed"] else "float first")
        estimate = (row.get("offload") or {}).get("estimate", {}).get("peak_bytes")
        lines.append(
            f"| {row['config']} | {path} | {_gb(peak)} | **{peak / float_bytes:.2f}x** | "
            f"{_gb(row['quantized_bytes'])} | {row['quantized_bytes'] / float_bytes:.2f}x | "
            f"{f'{estimate / float_bytes:.2f}x' if estimate else ''} | {'yes' if peak <= 0.5 * float_bytes else 'no'} | "
            f"{row['load_wall_s']:.0f} | {row['load_cpu_s']:.0f} | {row['cap']} |")
    return "\n".join(lines)


def _parse_caps(text: Optional[str]) -> Dict[str, float]:
    """``"5"`` -> every config 5 GB; ``"default=4.8,w4=2"`` -> per config."""
    if not text:
        return {}
    if "=" not in text:
        return {"*": float(text)}
    return {k.strip(): float(v) for k, v in (item.split("=", 1) for item in text.split(","))}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 28: 3.0 B params)")
    parser.add_argument("--configs", default="default,int8,w4-all", help=f"comma list of {sorted(CONFIGS)}")
    parser.add_argument("--cache", default=None, help="where the checkpoint is built (never the repository)")
    parser.add_argument("--cap-gb", default=None,
                        help="memory cgroup limit of each load, if one can be made: GB, or per config 'default=4.8,w4=2'")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="output path (default benchmarks/results/scale-<n>B.json)")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of the existing output file for configs not run now (each row keeps its date)")
    args = parser.parse_args(argv)
    config = llama_config(args.layers)
    cache = Path(args.cache or os.environ.get("HFPTQ_CACHE") or Path.home() / ".cache" / "hfptq") / "scale"
    folder = cache / f"llama-{config.num_hidden_layers}L-{config.hidden_size}"
    record = build_checkpoint(folder, config)
    result: Dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **cpu_facts(),
        "torch": torch.__version__, "checkpoint": str(folder), **{k: record[k] for k in ("params", "float_bytes", "shards")},
        "args": vars(args), "rows": [],
    }
    import transformers

    result["transformers"] = transformers.__version__
    caps = _parse_caps(args.cap_gb)
    names = [name.strip() for name in args.configs.split(",")]
    for name in names:
        row = run_config(folder, name, caps.get(name, caps.get("*")), args.threads)
        row["date"] = result["date"]
        result["rows"].append(row)
        print(f"{name}: done", file=sys.stderr)
    out = Path(args.json) if args.json else HERE / "results" / f"scale-{record['params'] / 1e9:.1f}B.json"
    if args.append and out.exists():
        previous = json.loads(out.read_text())
        if previous.get("float_bytes") == result["float_bytes"]:
            kept = [dict(row, date=row.get("date", previous.get("date"))) for row in previous.get("rows", [])
                    if row["config"] not in names]
            result["rows"] = kept + result["rows"]
    out.write_text(json.dumps(result, indent=1))
    print(render(result))
    return result


if __name__ == "__main__":
    main()

"""How fast can a 1 x 512 prefill of the default plan be on this CPU? The kernels it cannot avoid, timed alone.

The default plan keeps attention in FP16 storage (bfloat16 matmuls on CPU) and runs the FFN in
W8A8. Whatever else is optimised, a prefill must still run, per decoder layer:

* ``sdpa``: scaled-dot-product attention of the prompt (float32, as in every configuration:
  weight quantization does not touch it), with the model's heads, KV heads and head size;
* ``ffn int8``: the three FFN GEMMs in ``torch._int_mm`` (int8 x int8 -> int32), the fastest
  int8 GEMM PyTorch has here (at M = 512 it beats FBGEMM);
* ``attention bf16``: the q/k/v/o projections with oneDNN's prepacked bfloat16 weights (what
  hfptq runs), and, for the all-int8 plan, the same four in ``torch._int_mm``.

The script times the float32 model's real prefill and these kernels in the same process at one
thread (process CPU time, configurations alternated, medians), with the shapes read from the
model's ``config.json``, and prints each as a ratio to the FP32 prefill. The sum of the kernels is
a lower bound for the plan: no norm, activation, rotary, quantization or rescale op is counted.

``--breakdown fp32,hfptq-default,hfptq-int8`` instead times the real prefill of each
``benchmarks/speed.py`` configuration and splits its process CPU time by module group with forward
hooks: attention projections, the rest of the attention block (SDPA, rotary, q/k norms), FFN
projections, LM head, and everything else (norms, embedding, residuals). On a CPU without VNNI
(emulate one with the variables of ``benchmarks/speed.py``) this shows where the default plan's
prefill time goes with the kernels it really runs there.

Run::

    python benchmarks/prefill_floor.py [--model PATH] [--prompt-len 512] [--repeats 5] [--json out.json]
    python benchmarks/prefill_floor.py --breakdown fp32,hfptq-default,hfptq-int8 [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (the model location and the CPU description)


def kernels(config, prompt_len: int) -> Dict[str, Callable[[], object]]:
    """One callable per unavoidable kernel group, each running all decoder layers."""
    text = getattr(config, "text_config", config)
    layers = text.num_hidden_layers
    hidden, inter = text.hidden_size, text.intermediate_size
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    gen = torch.Generator().manual_seed(0)
    m = prompt_len

    def int8(rows: int, cols: int) -> torch.Tensor:
        return torch.randint(-127, 128, (rows, cols), generator=gen, dtype=torch.int8)

    # per-layer weights, so that no layer finds another's weights in cache (as in the model)
    ffn = [(int8(inter, hidden), int8(inter, hidden), int8(hidden, inter)) for _ in range(layers)]
    x_h, x_i = int8(m, hidden), int8(m, inter)
    shapes = [(heads * head_dim, hidden), (kv_heads * head_dim, hidden), (kv_heads * head_dim, hidden),
              (hidden, heads * head_dim)]
    reorder = torch.ops.mkldnn._reorder_linear_weight
    linear = torch.ops.mkldnn._linear_pointwise
    attn_bf16 = [[reorder(torch.randn(o, i, generator=gen).to(torch.bfloat16), 1) for o, i in shapes]
                 for _ in range(layers)]
    attn_int8 = [[int8(o, i) for o, i in shapes] for _ in range(layers)]
    xb_h = torch.randn(m, hidden, generator=gen).to(torch.bfloat16)
    xb_a = torch.randn(m, heads * head_dim, generator=gen).to(torch.bfloat16)
    xa = int8(m, heads * head_dim)
    q = torch.randn(1, heads, m, head_dim, generator=gen)
    k = torch.randn(1, kv_heads, m, head_dim, generator=gen)
    v = torch.randn(1, kv_heads, m, head_dim, generator=gen)
    scale = head_dim ** -0.5

    def sdpa() -> None:
        for _ in range(layers):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=kv_heads != heads)

    def ffn_int8() -> None:
        for gate, up, down in ffn:
            torch._int_mm(x_h, gate.t())
            torch._int_mm(x_h, up.t())
            torch._int_mm(x_i, down.t())

    def attention_bf16() -> None:
        for wq, wk, wv, wo in attn_bf16:
            for w in (wq, wk, wv):
                linear(xb_h, w, None, "none", [], "")
            linear(xb_a, wo, None, "none", [], "")

    def attention_int8() -> None:
        for wq, wk, wv, wo in attn_int8:
            for w in (wq, wk, wv):
                torch._int_mm(x_h, w.t())
            torch._int_mm(xa, wo.t())

    return {"sdpa": sdpa, "ffn int8": ffn_int8, "attention bf16": attention_bf16,
            "attention int8": attention_int8}


def measure(path: str, prompt_len: int, repeats: int, warmup: int) -> Dict[str, object]:
    torch.set_num_threads(1)
    model = speed.build("fp32", path, torch.device("cpu"), False)
    ids = torch.randint(3, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    fns: Dict[str, Callable[[], object]] = {"fp32 prefill": speed._prefill(model, ids)}
    fns.update(kernels(model.config, prompt_len))
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():  # alternated, round by round
            _, t = speed._timed(fn, torch.device("cpu"))  # process CPU time
            if r >= warmup:
                samples[name].append(t)
        print(f"#   round {r + 1}/{warmup + repeats} done", file=sys.stderr, flush=True)
    med = {name: statistics.median(v) for name, v in samples.items()}
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu_model": speed.cpu_model(), "torch": torch.__version__,
            "model": path, "prompt_len": prompt_len, "repeats": repeats, "warmup": warmup, "cpu_s": med}


#: Module groups of :func:`breakdown`, by the end of the module's name.
GROUPS = (("attention projections", ("q_proj", "k_proj", "v_proj", "o_proj")),
          ("ffn projections", ("gate_proj", "up_proj", "down_proj")), ("lm head", ("lm_head",)),
          ("attention block", ("self_attn",)))


def breakdown(path: str, configs: List[str], prompt_len: int, repeats: int, warmup: int) -> Dict[str, object]:
    """Process CPU time of one ``[1, prompt_len]`` prefill per configuration, split by module group (hooks)."""
    torch.set_num_threads(1)
    out: Dict[str, Dict[str, float]] = {}
    for name in configs:
        model = speed.build(name, path, torch.device("cpu"), False)
        ids = torch.randint(3, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
        spent: Dict[str, float] = {}
        started: Dict[str, float] = {}
        for mod_name, module in model.named_modules():
            group = next((g for g, ends in GROUPS if mod_name.endswith(ends)), None)
            if group is None:
                continue
            module.register_forward_pre_hook(lambda m, a, n=mod_name: started.__setitem__(n, time.process_time()))
            module.register_forward_hook(lambda m, a, r, n=mod_name, g=group: spent.__setitem__(
                g, spent.get(g, 0.0) + time.process_time() - started[n]))
        rounds = []
        with torch.inference_mode():
            for r in range(warmup + repeats):
                spent.clear()
                t0 = time.process_time()
                model(input_ids=ids, logits_to_keep=1)
                if r >= warmup:
                    rounds.append(dict(spent, total=time.process_time() - t0))
        med = {k: statistics.median(x.get(k, 0.0) for x in rounds) for k in rounds[0]}
        row = {"attention projections": med.get("attention projections", 0.0),
               "sdpa, rotary, q/k norms": med.get("attention block", 0.0) - med.get("attention projections", 0.0),
               "ffn projections": med.get("ffn projections", 0.0), "lm head": med.get("lm head", 0.0)}
        row["other (norms, embedding, residuals)"] = med["total"] - sum(row.values())
        row["total"] = med["total"]
        out[name] = row
        print(f"#   {name}: {row}", file=sys.stderr, flush=True)
        del model
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu_model": speed.cpu_model(), "torch": torch.__version__,
            **speed.cpu_facts(), "model": path, "prompt_len": prompt_len, "repeats": repeats, "warmup": warmup,
            "breakdown_cpu_s": out}


def render_breakdown(result: Dict[str, object]) -> str:
    rows = result["breakdown_cpu_s"]
    names = list(rows)
    base = rows["fp32"]["total"] if "fp32" in rows else None
    lines = [f"# prefill time by module group, {result['date']}: CPU {result['cpu_model']} "
             f"({result.get('cpu_capability', '?')}), torch {result['torch']}, one thread, process CPU ms, "
             f"medians of {result['repeats']} rounds; prompt [1, {result['prompt_len']}]"
             + (f"; EMULATED: {result['emulation_env']}" if result.get("emulation_env") else ""),
             "", "| group | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for group in rows[names[0]]:
        cells = []
        for n in names:
            v = rows[n][group]
            cells.append(f"{v * 1e3:,.0f}" + (f" ({v / base:.2f}x)" if base else ""))
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(result: Dict[str, object]) -> str:
    if "breakdown_cpu_s" in result:
        return render_breakdown(result)
    med = result["cpu_s"]
    base = med["fp32 prefill"]
    lines = [
        f"# prefill floor, {result['date']}: CPU {result['cpu_model']}, torch {result['torch']}, one thread, "
        f"process CPU time, medians of {result['repeats']} alternating rounds; model {result['model']}, "
        f"prompt [1, {result['prompt_len']}]",
        "",
        "| what | CPU ms | / FP32 prefill |",
        "|---|---:|---:|",
    ]
    for name, value in med.items():
        lines.append(f"| {name} | {value * 1e3:,.0f} | {value / base:.2f}x |")
    plans = {"default plan (sdpa + ffn int8 + attention bf16)": ("sdpa", "ffn int8", "attention bf16"),
             "all-int8 plan (sdpa + ffn int8 + attention int8)": ("sdpa", "ffn int8", "attention int8")}
    for label, parts in plans.items():
        total = sum(med[p] for p in parts)
        lines.append(f"| **floor, {label}** | {total * 1e3:,.0f} | **{total / base:.2f}x** |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: Gemma 3 270M from hfptq.models)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the raw numbers here")
    p.add_argument("--render", default=None, metavar="JSON", help="print the table of an earlier --json file")
    p.add_argument("--breakdown", default=None, metavar="CONFIGS",
                   help="comma-separated benchmarks/speed.py configurations: split their real prefill by module group")
    args = p.parse_args(argv)
    if args.render:
        result = json.loads(Path(args.render).read_text())
    elif args.breakdown:
        result = breakdown(args.model or speed.default_model_path(), args.breakdown.split(","), args.prompt_len,
                           args.repeats, args.warmup)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    else:
        result = measure(args.model or speed.default_model_path(), args.prompt_len, args.repeats, args.warmup)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    print(render(result))
    return result


if __name__ == "__main__":
    main()

"""Latency and memory measurements: prefill latency, decode throughput, peak resident memory.

Timings report both wall-clock time (``time.perf_counter``) and the CPU time of the whole
process (``time.process_time``, summed over all threads). Their ratio is the number of cores
effectively kept busy, which tells whether a speed-up comes from better kernels or from more
threads. On CUDA, the device is synchronized around each timed call and CPU time only covers
the host side.

Peak memory is the process high-water mark of resident memory (``VmHWM`` in
``/proc/self/status`` on Linux). :func:`reset_peak_rss` resets it by writing ``5`` to
``/proc/self/clear_refs`` (Linux >= 4.0, allowed for one's own process in most containers).
Elsewhere, or when that write is not permitted, :func:`peak_rss_bytes` falls back to
``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which cannot be reset: it is then the peak since
the process started, so measure the float and the quantized model in separate processes for a
fair comparison.
"""
from __future__ import annotations

import logging
import statistics
import sys
import time
from typing import Any, Callable, Optional

import torch

from hfptq.errors import ConfigError
from hfptq.evaluation._utils import forward_logits, model_device

logger = logging.getLogger(__name__)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes (since start or the last reset).

    Reads ``VmHWM`` from ``/proc/self/status``; falls back to ``getrusage`` (not resettable).

    Example:
        >>> reset_peak_rss(); model = load(...); print(peak_rss_bytes() / 2**20, "MiB")
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


def reset_peak_rss() -> bool:
    """Reset the peak-RSS counter to the current RSS; returns whether the reset worked.

    Writes ``"5"`` to ``/proc/self/clear_refs``. Returns ``False`` (and logs at debug level) where
    that is unavailable or not permitted; :func:`peak_rss_bytes` then reports the peak since
    process start.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError as exc:
        logger.debug("cannot reset the peak RSS (%s); peak_rss_bytes() is the peak since process start", exc)
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float, Any]:
    """Run ``fn`` once; return ``(wall_s, cpu_s, result)``."""
    _sync(device)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    result = fn()
    _sync(device)
    return time.perf_counter() - wall0, time.process_time() - cpu0, result


def _repeat(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> tuple[list[float], list[float]]:
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu, _ = _timed(fn, device)
        walls.append(wall)
        cpus.append(cpu)
    return walls, cpus


def measure_latency(
    model: torch.nn.Module,
    *,
    batch_size: int = 1,
    prompt_len: int = 512,
    new_tokens: int = 64,
    repeats: int = 5,
    warmup: int = 1,
    threads: Optional[int] = None,
    input_ids: Optional[torch.LongTensor] = None,
    seed: int = 0,
) -> dict:
    """Prefill latency and greedy decode throughput of a causal LM.

    * **Prefill**: one forward pass over a ``[batch_size, prompt_len]`` prompt, keeping only the
      last position's logits when the model supports ``logits_to_keep`` (as ``generate`` does);
      median over ``repeats`` runs after ``warmup`` runs.
    * **Decode**: ``generate`` with the KV cache, batch 1, greedy, exactly ``new_tokens`` new
      tokens (the end-of-sequence id is set to one the model cannot produce, see
      :func:`fixed_length_generation_config`). The prefill part is removed by also
      timing ``generate`` with a single new token: ``decode_tokens_per_s = (new_tokens - 1) /
      (median(t_generate(new_tokens)) - median(t_generate(1)))``.

    Args:
        model: the model to time (float or quantized), on its own device.
        batch_size: prompts per prefill forward.
        prompt_len: tokens per prompt.
        new_tokens: tokens generated in the decode measurement (``0`` skips decoding).
        repeats: timed runs per measurement (the median is reported).
        warmup: untimed runs before the timed ones.
        threads: ``torch.set_num_threads`` for the measurement (restored afterwards);
            ``None`` keeps the current setting.
        input_ids: prompt ids ``[>= batch_size, >= prompt_len]``; default: random ids from
            ``model.config.vocab_size`` drawn with ``seed``.
        seed: seed of the random prompt.

    Returns:
        A dict with ``device``, ``threads``, ``batch_size``, ``prompt_len``, ``new_tokens``,
        ``repeats``, ``warmup``; ``prefill_wall_s`` and ``prefill_cpu_s`` (medians),
        ``prefill_wall_s_runs``, ``prefill_tokens_per_s``; ``decode_tokens_per_s``,
        ``decode_ms_per_token``, ``generate_wall_s`` and ``generate_cpu_s`` (medians for
        ``new_tokens``), ``generate_wall_s_runs`` (``None`` values and ``decode_skipped`` when the
        model cannot ``generate``); ``peak_rss_bytes``; ``peak_gpu_bytes`` on CUDA; for a model
        with hfptq modules, ``backends`` (:func:`hfptq.quant.backends.describe_model`: the kernels
        each module kind ran and why) and ``cpu_features``.

    Example:
        >>> lat = measure_latency(model, prompt_len=256, new_tokens=32, threads=4)
        >>> lat["prefill_wall_s"], lat["decode_tokens_per_s"]
    """
    for name, value, minimum in (
        ("batch_size", batch_size, 1), ("prompt_len", prompt_len, 1), ("new_tokens", new_tokens, 0),
        ("repeats", repeats, 1), ("warmup", warmup, 0),
    ):
        if not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{name} must be an int >= {minimum} (got {value!r})")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive int or None (got {threads!r})")

    device = model_device(model)
    if input_ids is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if not vocab:
            raise ConfigError("model.config.vocab_size is unknown: pass input_ids=[batch, prompt_len] token ids")
        generator = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(0, int(vocab), (batch_size, prompt_len), generator=generator)
    elif input_ids.dim() != 2 or input_ids.shape[0] < batch_size or input_ids.shape[1] < prompt_len:
        raise ConfigError(
            f"input_ids must have shape [>= batch_size, >= prompt_len] = [>= {batch_size}, >= {prompt_len}] "
            f"(got {tuple(input_ids.shape)})"
        )
    prompt = input_ids[:batch_size, :prompt_len].to(device)

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    was_training = model.training
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        used_threads = torch.get_num_threads()
        # no_grad, as ``generate`` itself uses: tensors keep their version counters, which lets sibling
        # projections (q/k/v, gate/up) prepare a shared input once (hfptq.quant.kernels.prepared_input)
        with torch.no_grad():
            walls, cpus = _repeat(lambda: forward_logits(model, prompt, logits_to_keep=1), device, repeats, warmup)
            result: dict[str, Any] = {
                "device": str(device),
                "threads": used_threads,
                "batch_size": batch_size,
                "prompt_len": prompt_len,
                "new_tokens": new_tokens,
                "repeats": repeats,
                "warmup": warmup,
                "prefill_wall_s": statistics.median(walls),
                "prefill_cpu_s": statistics.median(cpus),
                "prefill_wall_s_runs": walls,
                "prefill_tokens_per_s": batch_size * prompt_len / max(statistics.median(walls), 1e-12),
            }
            result.update(_measure_decode(model, prompt[:1], new_tokens, repeats, warmup, device))
    finally:
        model.train(was_training)
        if threads is not None:
            torch.set_num_threads(previous_threads)
    result["peak_rss_bytes"] = peak_rss_bytes()
    from ..quant.backends import cpu_features, describe_model

    kinds = describe_model(model)
    if kinds:  # which kernels the quantized modules ran, and why (hfptq.quant.backends)
        result["backends"] = kinds
        result["cpu_features"] = cpu_features().describe()
    if device.type == "cuda":
        result["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(device))
    logger.info(
        "prefill %.4fs (%d x %d tokens), decode %s tok/s, %d threads",
        result["prefill_wall_s"], batch_size, prompt_len,
        f"{result['decode_tokens_per_s']:.2f}" if result["decode_tokens_per_s"] else "n/a", used_threads,
    )
    return result


def fixed_length_generation_config(model: torch.nn.Module, new_tokens: int):
    """A greedy ``GenerationConfig`` (KV cache) that makes exactly ``new_tokens`` tokens.

    The end-of-sequence id is one the model cannot produce (past both ``config.vocab_size`` and the
    output layer's logit count, which some models pad), so generation never stops early. Not
    ``min_new_tokens``: its logits processor runs ``isin`` over the whole vocabulary at every step
    (3.8 ms per token on Gemma 3's 262,144-token vocabulary at one thread), a cost of the
    measurement that would be counted as the model's.
    """
    from transformers import GenerationConfig

    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    never = max(int(getattr(config, "vocab_size", 0) or 0), int(getattr(head, "out_features", 0) or 0))
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        pad = (eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0
    return GenerationConfig(do_sample=False, max_new_tokens=new_tokens, use_cache=True, pad_token_id=pad,
                            eos_token_id=never)


def _measure_decode(
    model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int, warmup: int, device: torch.device
) -> dict:
    empty = {
        "decode_tokens_per_s": None,
        "decode_ms_per_token": None,
        "generate_wall_s": None,
        "generate_cpu_s": None,
        "generate_wall_s_runs": None,
    }
    if new_tokens == 0:
        return {**empty, "decode_skipped": "new_tokens=0"}
    can_generate = getattr(model, "can_generate", None)
    if not hasattr(model, "generate") or (callable(can_generate) and not can_generate()):
        logger.warning("%s cannot generate(); decode throughput is not measured", type(model).__name__)
        return {**empty, "decode_skipped": f"{type(model).__name__} has no generate()"}

    attention_mask = torch.ones_like(prompt)

    def generate(n: int) -> torch.Tensor:
        gen_config = fixed_length_generation_config(model, n)
        return model.generate(prompt, attention_mask=attention_mask, generation_config=gen_config)

    out = generate(new_tokens)  # also serves as a warmup run
    produced = out.shape[1] - prompt.shape[1]
    if produced != new_tokens:
        logger.warning("generate produced %d tokens instead of %d", produced, new_tokens)
    walls, cpus = _repeat(lambda: generate(new_tokens), device, repeats, max(0, warmup - 1))
    gen_wall, gen_cpu = statistics.median(walls), statistics.median(cpus)
    if new_tokens > 1:
        one_walls, _ = _repeat(lambda: generate(1), device, repeats, 0)
        decode_time = gen_wall - statistics.median(one_walls)
        decode_steps = new_tokens - 1
        if decode_time <= 0:  # timing noise on tiny models: fall back to the end-to-end rate
            decode_time, decode_steps = gen_wall, new_tokens
    else:
        decode_time, decode_steps = gen_wall, 1
    return {
        "decode_tokens_per_s": decode_steps / max(decode_time, 1e-12),
        "decode_ms_per_token": 1000.0 * decode_time / decode_steps,
        "generate_wall_s": gen_wall,
        "generate_cpu_s": gen_cpu,
        "generate_wall_s_runs": walls,
    }

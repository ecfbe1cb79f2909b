"""Evaluation over several processes (``torchrun`` / ``accelerate launch``): who does what, and gathering.

:func:`hfptq.evaluation.perplexity` takes ``accelerator=`` (an ``accelerate.Accelerator`` or
``PartialState``); with more than one process each rank scores its share of the windows and the
per-window sums are gathered and added in window order, so the result is the one-process number.
``hfptq eval`` calls :func:`launched_state` to find out whether it was started by a launcher.

Example:
    >>> from hfptq.evaluation.distributed import launched_state
    >>> state = launched_state()           # None in a plain `python` process        # doctest: +SKIP
    >>> res = perplexity(model, ids, accelerator=state)                              # doctest: +SKIP
"""
from __future__ import annotations

import os
from typing import Any, List, Optional, Tuple

from hfptq.errors import ConfigError, HfPtqError

__all__ = ["RankFailedError", "launched_state", "process_grid", "gather_checked"]

LAUNCH_HINT = ("launch the ranks with `torchrun --standalone --nproc_per_node N -m hfptq.cli eval ...`, "
               "`accelerate launch --multi_gpu --num_processes N -m hfptq.cli eval ...` (on a CPU-only machine too), "
               "or let hfptq start them: `hfptq eval ... --processes N`")


class RankFailedError(HfPtqError, RuntimeError):
    """Another process of a multi-process evaluation failed; the message names its rank and error."""


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def launched_state() -> Any:
    """The ``accelerate.PartialState`` of a multi-process launch, or ``None`` for a single process.

    A launcher (``torchrun``, ``accelerate launch --multi_gpu``) sets ``WORLD_SIZE``/``RANK``;
    with ``WORLD_SIZE > 1`` the process group is initialised on CPU with the gloo backend (ranks
    evaluate on CPU). ``accelerate launch --cpu --num_processes N`` without ``--mpirun_hostfile``
    starts a single process (its multi-process CPU mode needs mpirun) and would silently evaluate
    everything N-times slower than asked: that is refused with :class:`ConfigError`.

    Example:
        >>> state = launched_state()
        >>> rank, world = process_grid(state)
    """
    world = _env_int("WORLD_SIZE")
    if world is None or world <= 1:
        use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        if use_cpu and os.environ.get("MASTER_ADDR") and world is None:
            raise ConfigError(
                "`accelerate launch --cpu --num_processes N` started a single process: accelerate's multi-process CPU "
                "mode needs mpirun (--mpirun_hostfile), so this evaluation would run alone, not sharded. Fix: "
                + LAUNCH_HINT + ".",
                key="num_processes",
            )
        return None
    from accelerate import PartialState

    return PartialState(cpu=True)


def process_grid(accelerator: Any) -> Tuple[int, int]:
    """``(rank, number of processes)`` of ``accelerator`` (``Accelerator``, ``PartialState`` or ``None``)."""
    if accelerator is None:
        return 0, 1
    try:
        world, rank = int(accelerator.num_processes), int(accelerator.process_index)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"accelerator must be an accelerate.Accelerator or PartialState (got {type(accelerator).__name__}); "
            "pass accelerator=None for one process",
            key="accelerator",
        ) from exc
    if world > 1:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError(
                f"accelerator says {world} processes but torch.distributed is not initialised; create it inside a "
                f"launched process ({LAUNCH_HINT})",
                key="accelerator",
            )
    return rank, world


def gather_checked(payload: dict, world: int, what: str) -> List[dict]:
    """All ranks' ``payload`` dicts (index = rank); raises on every rank if any rank reported an error.

    Each payload may carry ``"error"`` (a one-line description) and ``"setup"`` (what the rank
    evaluated); a failure or a differing setup raises :class:`RankFailedError` /
    :class:`ConfigError` on all ranks, so no rank waits forever and none returns a partial result.
    """
    if world == 1:
        payloads = [payload]
    else:
        import torch.distributed as dist

        payloads = [None] * world
        try:
            dist.all_gather_object(payloads, payload)
        except RuntimeError as exc:  # gloo: "Connection closed by peer" when another rank exited
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RankFailedError(f"{what}: another process stopped before sending its results (its own message "
                                  f"says why; {first[:300]}). No result was combined.") from exc
    failed = [(r, p["error"]) for r, p in enumerate(payloads) if p.get("error")]
    if failed:
        detail = "; ".join(f"rank {r}: {e}" for r, e in failed)
        raise RankFailedError(f"{what} failed on {len(failed)} of {world} processes ({detail}); no result was "
                              "combined. Fix the error on that rank and run again.")
    setups = [p.get("setup") for p in payloads]
    for r, setup in enumerate(setups):
        if setup != setups[0]:
            raise ConfigError(
                f"{what}: rank {r} evaluated {setup} but rank 0 evaluated {setups[0]}; every process must get the same "
                "model inputs (corpus, tokenizer, seq_len, stride, max_windows)",
                key="input_ids",
            )
    return payloads

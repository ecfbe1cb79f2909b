"""Corpus perplexity of a causal language model over fixed-length windows.

The corpus is one long 1-D tensor of token ids (see ``hfptq.data.tokenize_corpus``). It is cut
into windows of ``seq_len`` model positions:

* ``stride=None`` (or ``stride >= seq_len``): non-overlapping windows. Without BOS the first
  token of each window has no context and is not scored (the usual convention); with BOS every
  corpus token is scored.
* ``stride < seq_len``: sliding windows that advance by ``stride`` tokens; each window scores
  only the tokens that no earlier window scored, using the rest of the window as context (the
  strategy of the Transformers perplexity guide).

The last window is moved back so that it ends exactly at the end of the corpus and keeps full
context; only its new tokens are scored, so every token is scored at most once and all windows
have the same length (which makes batching trivial). The negative log-likelihood is averaged
over all scored tokens (token-weighted, not a mean of per-window means).

With ``accelerator=`` (several processes launched by ``torchrun`` / ``accelerate launch``) each
process scores every ``num_processes``-th batch; the per-window sums are gathered and added in
window order (see :mod:`hfptq.evaluation.distributed`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from hfptq.errors import ConfigError, DataError
from hfptq.evaluation._utils import forward_logits, model_device, progress_bar
from hfptq.evaluation.distributed import RankFailedError, gather_checked, process_grid

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    """Outcome of :func:`perplexity`.

    Attributes:
        perplexity: ``exp(nll)``.
        nll: mean negative log-likelihood per scored token, in nats.
        num_tokens: number of scored tokens.
        num_windows: number of windows run through the model.
        seq_len: model positions per window (BOS included when used).
        stride: corpus tokens between window starts (after clamping; see :func:`perplexity`).
    """

    perplexity: float
    nll: float
    num_tokens: int
    num_windows: int
    seq_len: int
    stride: int

    def to_dict(self) -> dict:
        """Plain ``dict`` of the fields (JSON-serializable)."""
        return asdict(self)


@dataclass(frozen=True)
class _Window:
    begin: int  # first corpus index in the window (inclusive)
    end: int  # last corpus index + 1
    score_from: int  # corpus tokens with index >= score_from are scored (if they have context)


def _plan_windows(num_ids: int, content_len: int, stride: int) -> list[_Window]:
    """Windows ``[begin, end)`` over ``num_ids`` corpus tokens, each scoring only new tokens."""
    windows: list[_Window] = []
    prev_end = 0
    begin = 0
    while True:
        end = min(begin + content_len, num_ids)
        if end - begin < content_len:
            # Tail: slide back so the last window keeps full context; old tokens are context only.
            begin = max(0, end - content_len)
        windows.append(_Window(begin, end, prev_end))
        prev_end = end
        if end >= num_ids:
            return windows
        begin += stride


def _scored_mask(window: _Window, has_bos: bool) -> torch.Tensor:
    """Boolean mask over the window's corpus tokens: which ones are scored."""
    idx = torch.arange(window.begin, window.end)
    mask = idx >= window.score_from
    if not has_bos:
        mask &= idx > window.begin  # the first token has nothing to be predicted from
    return mask


def _score_batches(
    model: torch.nn.Module,
    ids_cpu: torch.Tensor,
    windows: list[_Window],
    batches: list[list[int]],
    *,
    has_bos: bool,
    bos_token_id: Optional[int],
    progress: bool,
) -> list[tuple[int, float, int]]:
    """``(window index, summed NLL, scored tokens)`` for every window of ``batches`` (lists of indices)."""
    device = model_device(model)
    # Position j of the model input predicts input position j + 1.
    offset = 1 if has_bos else 0
    terms: list[tuple[int, float, int]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch_idx in progress_bar(batches, enabled=progress, desc="perplexity", unit="batch"):
                batch = [windows[i] for i in batch_idx]
                rows = []
                masks = []
                for w in batch:
                    chunk = ids_cpu[w.begin : w.end]
                    if has_bos:
                        chunk = torch.cat([torch.tensor([bos_token_id], dtype=torch.long), chunk])
                    rows.append(chunk)
                    # target mask over model positions 1..L-1 (what logits[:, :-1] predict)
                    masks.append(torch.cat([torch.zeros(offset, dtype=torch.bool), _scored_mask(w, has_bos)])[1:])
                inputs = torch.stack(rows).to(device)
                target_mask = torch.stack(masks)  # [B, L-1]
                # Only the logits from the first scored target onward are needed: ask the model
                # for just those (a large saving for sliding windows with big vocabularies).
                first_scored = int(target_mask.any(0).nonzero()[0]) if target_mask.any() else target_mask.shape[1]
                keep = inputs.shape[1] - first_scored  # logits positions first_scored .. L-1
                logits = forward_logits(model, inputs, logits_to_keep=keep)
                start = inputs.shape[1] - logits.shape[1]  # position of logits[:, 0]
                if start > first_scored:
                    raise RuntimeError(
                        f"model returned {logits.shape[1]} logit positions for {inputs.shape[1]} inputs"
                    )
                for b in range(inputs.shape[0]):
                    pos = target_mask[b].nonzero().squeeze(1)  # logits positions predicting pos + 1
                    if pos.numel() == 0:
                        terms.append((batch_idx[b], 0.0, 0))
                        continue
                    # Scored positions are one contiguous run (new tokens at the end of the window):
                    # slice instead of gathering, so no copy of the [positions, vocab] logits is made.
                    lo, hi = int(pos[0]), int(pos[-1]) + 1
                    assert hi - lo == pos.numel(), "scored positions must be contiguous"
                    row_logits = logits[b, lo - start : hi - start].float()
                    targets = inputs[b, lo + 1 : hi + 1].to(logits.device)
                    nll = F.cross_entropy(row_logits, targets, reduction="sum")
                    terms.append((batch_idx[b], float(nll), hi - lo))
    finally:
        model.train(was_training)
    return terms


def perplexity(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    *,
    seq_len: int = 512,
    stride: Optional[int] = None,
    batch_size: int = 1,
    bos_token_id: Optional[int] = None,
    max_windows: Optional[int] = None,
    progress: bool = True,
    accelerator: Any = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on the 1-D token ids ``input_ids``.

    Args:
        model: any causal LM whose forward takes ``input_ids`` and returns logits (float or
            quantized Transformers model). It is run on whatever device it is on.
        input_ids: 1-D corpus token ids (a ``[1, N]`` tensor is accepted too).
        seq_len: model positions per window, BOS included when ``bos_token_id`` is given, so the
            model never sees more than ``seq_len`` positions.
        stride: corpus tokens between window starts. ``None`` means non-overlapping windows. A
            stride larger than the window's corpus part (``seq_len``, or ``seq_len - 1`` with BOS)
            is clamped to it, since larger strides would skip tokens.
        batch_size: windows per forward pass.
        bos_token_id: if given, every window is prefixed with this token; BOS is never scored.
        max_windows: evaluate only the first ``max_windows`` windows (quick estimates).
        progress: show a progress bar (on the main process only).
        accelerator: an ``accelerate.Accelerator`` or ``PartialState`` of a multi-process launch
            (``torchrun``, ``accelerate launch``). Every process must call this with the same
            ``input_ids`` and arguments; each scores every ``num_processes``-th batch of windows,
            the per-window NLL sums are gathered and added in window order, so every rank returns
            the one-process result (bit-identical when each window's forward gives the same
            logits, e.g. same thread count and kernels). A failure on one rank raises on all
            (:class:`~hfptq.evaluation.distributed.RankFailedError` naming the rank). ``None``:
            this process evaluates everything.

    Returns:
        A :class:`PerplexityResult`.

    Example:
        >>> from hfptq.data import load_text_corpus, tokenize_corpus, wants_bos
        >>> spec = {"dataset": "Salesforce/wikitext", "config": "wikitext-2-raw-v1", "split": "test"}
        >>> ids = tokenize_corpus(load_text_corpus(spec), tokenizer, add_bos=False)
        >>> bos = tokenizer.bos_token_id if wants_bos(tokenizer) else None
        >>> res = perplexity(model, ids, seq_len=512, bos_token_id=bos)
        >>> print(f"{res.perplexity:.2f} over {res.num_tokens} tokens")
        >>> # under `torchrun --nproc_per_node 2 script.py`: each rank scores half of the windows
        >>> res = perplexity(model, ids, seq_len=512, accelerator=accelerate.PartialState(cpu=True))
    """
    if not isinstance(input_ids, torch.Tensor):
        raise DataError(f"input_ids must be a torch.LongTensor of token ids (got {type(input_ids).__name__})")
    if input_ids.dim() == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if input_ids.dim() != 1:
        raise DataError(
            f"input_ids must be the 1-D token ids of one corpus (got shape {tuple(input_ids.shape)}); "
            "concatenate documents first (hfptq.data.tokenize_corpus does)"
        )
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise DataError(f"input_ids must hold integer token ids (got dtype {input_ids.dtype})")
    has_bos = bos_token_id is not None
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2 (got {seq_len}): a window needs context and a target")
    content_len = seq_len - 1 if has_bos else seq_len
    if stride is None:
        stride = content_len
    if stride < 1:
        raise ConfigError(f"stride must be >= 1 (got {stride}); use stride=None for non-overlapping windows")
    stride = min(int(stride), content_len)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 (got {batch_size})")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"max_windows must be >= 1 or None (got {max_windows})")
    num_ids = int(input_ids.numel())
    min_ids = 1 if has_bos else 2
    if num_ids < min_ids:
        raise DataError(f"the corpus has {num_ids} token(s); perplexity needs at least {min_ids}")

    windows = _plan_windows(num_ids, content_len, stride)
    if max_windows is not None:
        windows = windows[:max_windows]
    rank, world = process_grid(accelerator)
    ids_cpu = input_ids.detach().to("cpu", torch.long)
    batches = [list(range(i, min(i + batch_size, len(windows)))) for i in range(0, len(windows), batch_size)]
    # Rank r scores batches r, r + world, ...: every batch is formed exactly as in one process, so
    # each window's NLL is the same number wherever it is computed.
    mine = batches[rank::world]
    error: Optional[BaseException] = None
    terms: list[tuple[int, float, int]] = []
    try:
        terms = _score_batches(model, ids_cpu, windows, mine, has_bos=has_bos, bos_token_id=bos_token_id,
                               progress=progress and rank == 0)
    except Exception as exc:  # noqa: BLE001 - reported to the other ranks, then re-raised here
        if world == 1:
            raise
        error = exc
    if world > 1:
        setup = {"corpus_tokens": num_ids, "windows": len(windows), "seq_len": seq_len, "stride": stride,
                 "batch_size": batch_size, "bos": has_bos}
        payload = {"terms": terms, "setup": setup,
                   "error": f"{type(error).__name__}: {error}" if error is not None else None}
        try:
            payloads = gather_checked(payload, world, "perplexity")
        except RankFailedError:
            if error is not None:
                raise error  # this rank's own exception, with its traceback
            raise
        terms = sorted(t for p in payloads for t in p["terms"])
        if [t[0] for t in terms] != list(range(len(windows))):
            raise RankFailedError(f"perplexity: the ranks returned windows {[t[0] for t in terms]}, expected each of "
                                  f"0..{len(windows) - 1} once")
    # Summed in window order, one float per window: the same additions as one process makes.
    total_nll = 0.0
    total_tokens = 0
    for _, nll, count in terms:
        if count:
            total_nll += nll
            total_tokens += count

    if total_tokens == 0:
        raise DataError("no token was scored; use a longer corpus or more windows (max_windows)")
    mean_nll = total_nll / total_tokens
    result = PerplexityResult(
        perplexity=math.exp(mean_nll) if mean_nll < 700 else float("inf"),
        nll=mean_nll,
        num_tokens=total_tokens,
        num_windows=len(windows),
        seq_len=seq_len,
        stride=stride,
    )
    if rank == 0:
        logger.info("perplexity %.4f (nll %.4f) over %d tokens in %d windows", result.perplexity, mean_nll,
                    total_tokens, len(windows))
    return result


def compare_perplexity(reference: PerplexityResult, quantized: PerplexityResult) -> dict:
    """How much perplexity the quantized model lost against the reference.

    Both results must come from the same evaluation setup (same scored tokens, ``seq_len`` and
    ``stride``); otherwise the comparison is meaningless and :class:`ConfigError` is raised.

    Returns:
        ``{"reference", "quantized"`` (perplexities), ``"abs_drop"`` (``quantized - reference``),
        ``"rel_drop"`` (``abs_drop / reference``), ``"nll_delta"`` (``quantized.nll -
        reference.nll``, nats/token), ``"num_tokens"}``. A positive drop means the quantized
        model is worse.

    Example:
        >>> compare_perplexity(ref, q)["rel_drop"]  # 0.031 -> 3.1 % higher perplexity
    """
    for field in ("num_tokens", "seq_len", "stride"):
        a, b = getattr(reference, field), getattr(quantized, field)
        if a != b:
            raise ConfigError(
                f"cannot compare perplexities measured differently: {field} is {a} for the reference "
                f"and {b} for the quantized model; evaluate both with the same corpus, seq_len, stride "
                "and max_windows"
            )
    abs_drop = quantized.perplexity - reference.perplexity
    return {
        "reference": reference.perplexity,
        "quantized": quantized.perplexity,
        "abs_drop": abs_drop,
        "rel_drop": abs_drop / reference.perplexity,
        "nll_delta": quantized.nll - reference.nll,
        "num_tokens": reference.num_tokens,
    }

"""lm-evaluation-harness on hfptq models, with offline PIQA / LAMBADA tasks.

``lm_eval``'s ``HFLM`` accepts a model object: pass the quantized model itself. Local task YAMLs
(``piqa_local``, ``lambada_openai_local``) read the copies in a data folder (the layout of
``../shared/data``) with the prompts, targets and metrics of lm-eval's own ``piqa`` and
``lambada_openai`` tasks, so the numbers compare with published lm-eval numbers for those tasks.

Example:
    >>> from hfptq.evaluation.lm_eval import lm_eval_evaluate
    >>> results = lm_eval_evaluate(model, tokenizer, ["piqa_local"], data_dir="../shared/data", limit=200)  # doctest: +SKIP
    >>> results["results"]["piqa_local"]["acc,none"]                                                      # doctest: +SKIP

Needs ``pip install lm_eval`` (not a dependency of hfptq itself).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from ..errors import DataError

#: Task names written by :func:`write_local_tasks`.
LOCAL_TASKS = ("piqa_local", "lambada_openai_local")

# lm-eval 0.4's piqa.yaml / lambada_openai.yaml, with the dataset replaced by local JSON files
_PIQA_YAML = """task: piqa_local
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    validation: {data_file}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
should_decontaminate: true
doc_to_decontamination_query: goal
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_LAMBADA_YAML = """task: lambada_openai_local
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data_file}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
should_decontaminate: true
doc_to_decontamination_query: "{{{{text}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _data_dir(data_dir: Optional[Union[str, os.PathLike]]) -> Path:
    if data_dir is None:
        from ..data import shared_data_dir

        data_dir = shared_data_dir()  # $HFPTQ_DATA_DIR first
    if data_dir is None or not Path(data_dir).is_dir():
        raise DataError(f"data_dir={data_dir!r}: no local data folder. Pass data_dir (or set HFPTQ_DATA_DIR) to a folder "
                        "with piqa/valid.jsonl + piqa/valid-labels.lst and lambada_openai/lambada_test.jsonl.")
    return Path(data_dir)


def write_local_tasks(folder: Union[str, os.PathLike], data_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Write the ``piqa_local`` / ``lambada_openai_local`` task YAMLs (and PIQA with its labels joined in)
    into ``folder``; returns it, for ``lm_eval.tasks.TaskManager(include_path=folder)``.

    Raises:
        DataError: the data folder or one of its files is missing.

    Example:
        >>> folder = write_local_tasks("/tmp/hfptq-tasks", "../shared/data")   # doctest: +SKIP
    """
    root = _data_dir(data_dir)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    piqa, labels = root / "piqa" / "valid.jsonl", root / "piqa" / "valid-labels.lst"
    lambada = root / "lambada_openai" / "lambada_test.jsonl"
    for path in (piqa, labels, lambada):
        if not path.is_file():
            raise DataError(f"data_dir={str(root)!r} has no {path.relative_to(root)}; point data_dir at a copy of "
                            "../shared/data (PIQA validation + labels, LAMBADA OpenAI test).")
    rows = [json.loads(line) for line in piqa.read_text(encoding="utf-8").splitlines() if line.strip()]
    golds = [int(x) for x in labels.read_text(encoding="utf-8").split()]
    if len(rows) != len(golds):
        raise DataError(f"{piqa} has {len(rows)} rows but {labels} {len(golds)} labels; restore the original files.")
    merged = folder / "piqa_validation.jsonl"
    merged.write_text("".join(json.dumps({**r, "label": g}) + "\n" for r, g in zip(rows, golds)), encoding="utf-8")
    (folder / "piqa_local.yaml").write_text(_PIQA_YAML.format(data_file=json.dumps(str(merged))), encoding="utf-8")
    (folder / "lambada_openai_local.yaml").write_text(_LAMBADA_YAML.format(data_file=json.dumps(str(lambada.resolve()))),
                                                      encoding="utf-8")
    return folder


def lm_eval_model(model: Any, tokenizer: Any = None, *, batch_size: int = 8, max_length: Optional[int] = None,
                  **kwargs: Any) -> Any:
    """An ``lm_eval`` ``HFLM`` around an already loaded (quantized) model.

    ``HFLM`` calls ``model.tie_weights()``; hfptq models keep their tied LM head / embedding pair
    (the int8 storage is shared) and tie everything else as usual.

    Example:
        >>> lm = lm_eval_model(model, tokenizer)                           # doctest: +SKIP
        >>> lm_eval.simple_evaluate(model=lm, tasks=["piqa"])              # doctest: +SKIP
    """
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("lm_eval_model needs lm-evaluation-harness: pip install lm_eval") from exc
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    if max_length is not None:
        kwargs["max_length"] = max_length
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)


def lm_eval_evaluate(model: Any, tokenizer: Any = None, tasks: Sequence[str] = LOCAL_TASKS, *,
                     data_dir: Optional[Union[str, os.PathLike]] = None, limit: Optional[int] = None,
                     batch_size: int = 8, tasks_dir: Optional[Union[str, os.PathLike]] = None,
                     **kwargs: Any) -> Dict[str, Any]:
    """Run lm-eval ``tasks`` (the local PIQA / LAMBADA ones by default) on ``model``; lm-eval's results dict.

    Args:
        limit: examples per task (``None``: all).
        tasks_dir: where to write the local task YAMLs (default ``$HFPTQ_CACHE/lm_eval_tasks``).
        kwargs: passed to ``lm_eval.simple_evaluate``.

    Example:
        >>> r = lm_eval_evaluate(model, tok, ["piqa_local"], data_dir="../shared/data", limit=100)   # doctest: +SKIP
        >>> r["results"]["piqa_local"]["acc,none"]                                                  # doctest: +SKIP
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    if tasks_dir is None:
        cache = Path(os.environ.get("HFPTQ_CACHE") or Path.home() / ".cache" / "hfptq")
        tasks_dir = cache / "lm_eval_tasks"
    include: List[str] = []
    if any(t in LOCAL_TASKS for t in tasks):
        include.append(str(write_local_tasks(tasks_dir, data_dir)))
    manager = TaskManager(include_path=include or None)
    lm = lm_eval_model(model, tokenizer, batch_size=batch_size)
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, **kwargs)

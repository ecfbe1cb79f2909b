"""Tests for hfptq.data: specs -> rows -> token windows, offline copies of Hub datasets, and every bad input."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import csv
import json
import logging
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from hfptq import data
from hfptq.errors import DataError

# ----------------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------------
SHARED = data.shared_data_dir() if not os.environ.get(data.DATA_DIR_ENV) else Path(os.environ[data.DATA_DIR_ENV])
needs_shared = pytest.mark.skipif(
    SHARED is None or not (SHARED / "wikitext-2-raw" / "wiki.test.canonical.raw").is_file(),
    reason="the offline data folder (../shared/data or $HFPTQ_DATA_DIR) is not available",
)
PAD, EOS, BOS = 0, 1, 2


def byte_tokenizer(bos: bool = True, bos_token: bool = True) -> PreTrainedTokenizerFast:
    """A tokenizer built offline: one token per UTF-8 byte (ids 3..258, byte-level order), so token counts are byte
    counts and tokenizing rows one by one gives the same ids as tokenizing their concatenation.

    ``bos`` adds a Gemma-style post-processor that prepends ``<bos>``; ``bos_token`` declares the token at all.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": PAD, "<eos>": EOS, "<bos>": BOS, **{c: i + 3 for i, c in enumerate(alphabet)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS)]
        )
    kwargs = {"bos_token": "<bos>"} if bos_token else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", **kwargs)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return byte_tokenizer(bos=True)


@pytest.fixture(scope="module")
def tok_nobos() -> PreTrainedTokenizerFast:
    return byte_tokenizer(bos=False)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path_factory):
    """No ambient override, and a private datasets cache so tmp files never pollute ~/.cache."""
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_datasets_cache")


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def fake_data_dir(root: Path) -> Path:
    """The shared/data layout with tiny stand-in files."""
    (root / "wikitext-2-raw").mkdir(parents=True)
    (root / "wikitext-2-raw" / "wiki.valid.raw").write_text(" \n = A = \n \n Valid text . \n", encoding="utf-8")
    (root / "wikitext-2-raw" / "wiki.test.canonical.raw").write_text(" \n = B = \n \n Test text . \n",
                                                                      encoding="utf-8")
    (root / "piqa").mkdir()
    write_jsonl(root / "piqa" / "valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}])
    (root / "piqa" / "valid-labels.lst").write_text("1\n", encoding="utf-8")
    (root / "ag_news_csv").mkdir()
    (root / "ag_news_csv" / "test.csv").write_text('"3","T","D"\n', encoding="utf-8")
    (root / "ag_news_csv" / "classes.txt").write_text("World\nSports\nBusiness\nSci/Tech\n", encoding="utf-8")
    (root / "lambada_openai").mkdir()
    write_jsonl(root / "lambada_openai" / "lambada_test.jsonl", [{"text": "a b c"}])
    return root


# ----------------------------------------------------------------------------------------------------------------
# shared_data_dir / resolve_source
# ----------------------------------------------------------------------------------------------------------------
def test_shared_data_dir_prefers_env(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "elsewhere"))
    assert data.shared_data_dir() == tmp_path / "elsewhere"


@needs_shared
def test_shared_data_dir_found_next_to_repo_from_any_cwd(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    found = data.shared_data_dir()
    assert found is not None and (found / "piqa" / "valid.jsonl").is_file()


@pytest.mark.parametrize(
    "name, config, split, expected",
    [
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "validation", "wikitext-2-raw/wiki.valid.raw"),
        ("wikitext", "wikitext-2-raw-v1", "test", "wikitext-2-raw/wiki.test.canonical.raw"),
        ("wikitext", "wikitext-103-raw-v1", "test", "wikitext-2-raw/wiki.test.canonical.raw"),
        ("ybisk/piqa", None, "validation", "piqa/valid.jsonl"),
        ("piqa", None, "validation", "piqa/valid.jsonl"),
        ("fancyzhx/ag_news", None, "test", "ag_news_csv/test.csv"),
        ("ag_news", None, "test", "ag_news_csv/test.csv"),
        ("EleutherAI/lambada_openai", "en", "test", "lambada_openai/lambada_test.jsonl"),
        ("lambada_openai", None, "test", "lambada_openai/lambada_test.jsonl"),
    ],
)
def test_resolve_source_maps_hub_names_to_local_files(tmp_path, name, config, split, expected):
    root = fake_data_dir(tmp_path / "d")
    kwargs = data.resolve_source({"dataset": name, "config": config, "split": split}, data_dir=root)
    assert kwargs["data_files"] == {split: str(root / expected)}
    assert kwargs["split"] == split
    assert kwargs["path"] in ("text", "json", "csv")


def test_resolve_source_uses_env_override_and_hub_without(monkeypatch, tmp_path):
    spec = {"dataset": "Salesforce/wikitext", "config": "wikitext-2-raw-v1", "split": "test"}
    assert data.resolve_source(spec) == {"path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1", "split": "test"}
    root = fake_data_dir(tmp_path / "d")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(root))
    assert data.resolve_source(spec)["data_files"] == {"test": str(root / "wikitext-2-raw/wiki.test.canonical.raw")}


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"dataset": "wikitext", "config": "wikitext-2-raw-v1", "split": "train"}, ["split", "validation, test"]),
        ({"dataset": "wikitext", "config": "wikitext-2-v1", "split": "test"}, ["config", "wikitext-2-raw-v1"]),
        ({"dataset": "ybisk/piqa", "split": "test"}, ["split", "validation"]),
    ],
)
def test_resolve_source_override_rejects_what_has_no_local_copy(tmp_path, spec, words):
    root = fake_data_dir(tmp_path / "d")
    with pytest.raises(DataError) as info:
        data.resolve_source(spec, data_dir=root)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_resolve_source_override_reports_missing_file(tmp_path):
    with pytest.raises(DataError, match="wiki.valid.raw.*is missing"):
        data.resolve_source({"dataset": "wikitext", "config": "wikitext-2-raw-v1"}, data_dir=tmp_path)


def test_resolve_source_plain_files_are_registered_under_the_split(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": "x"}])
    assert data.resolve_source({"dataset": "json", "data_files": str(f), "split": "validation[:1]"}) == {
        "path": "json", "data_files": {"validation": str(f)}, "split": "validation[:1]"}
    assert data.resolve_source({"dataset": str(f), "split": "test"}) == {
        "path": "json", "data_files": {"test": str(f)}, "split": "test"}


def test_offline_hub_name_fails_with_a_helpful_error():
    import huggingface_hub.constants

    if not (datasets.config.HF_HUB_OFFLINE or huggingface_hub.constants.is_offline_mode()):
        pytest.skip("offline mode was not enabled before datasets was imported")
    with pytest.raises(DataError) as info:
        data.load_split({"dataset": "Salesforce/wikitext", "config": "wikitext-2-raw-v1", "split": "test"})
    message = str(info.value)
    assert "unreachable" in message and "data_files" in message and data.DATA_DIR_ENV in message


# ----------------------------------------------------------------------------------------------------------------
# Real offline copies: same rows as the Hub
# ----------------------------------------------------------------------------------------------------------------
def hub_wikitext_rows(raw_text: str) -> list[str]:
    """The data README's recipe for rebuilding Hub rows from an LF raw file."""
    return [line + "\n" if line.strip() else "" for line in raw_text.split("\n")[:-1]]


@needs_shared
@pytest.mark.parametrize("split, filename, rows", [("test", "wiki.test.canonical.raw", 4358),
                                                   ("validation", "wiki.valid.raw", 3760)])
def test_local_wikitext_gives_hub_rows_and_corpus(split, filename, rows):
    spec = {"dataset": "Salesforce/wikitext", "config": "wikitext-2-raw-v1", "split": split}
    expected = hub_wikitext_rows((SHARED / "wikitext-2-raw" / filename).read_text(encoding="utf-8"))
    assert len(expected) == rows
    ds = data.load_split(spec, data_dir=SHARED)
    assert ds.column_names == ["text"] and ds["text"] == expected
    assert data.load_text_corpus(spec, data_dir=SHARED) == "\n\n".join(expected)


@needs_shared
def test_crlf_wikitext_file_normalises_to_the_canonical_lines():
    crlf = SHARED / "wikitext-2-raw" / "wiki.test.raw"
    canonical = (SHARED / "wikitext-2-raw" / "wiki.test.canonical.raw").read_text(encoding="utf-8")
    canonical_lines = [line for line in canonical.split("\n") if line.strip()]
    assert len(canonical_lines) == 2891

    corpus = data.load_text_corpus({"dataset": "wikitext", "data_files": str(crlf), "split": "test"})
    assert "\r" not in corpus
    assert [line for line in corpus.split("\n") if line.strip()] == canonical_lines
    # The generic text builder (no WikiText convention) still yields the same lines, without line ends.
    ds = data.load_split({"dataset": "text", "data_files": str(crlf), "split": "test"})
    assert ds["text"] == canonical_lines


@needs_shared
def test_local_piqa_matches_the_files_and_readme_counts():
    rows = data.load_piqa(data_dir=SHARED)
    inputs = [json.loads(line) for line in (SHARED / "piqa" / "valid.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(inputs) == 1838
    assert [r["label"] for r in rows].count(0) == 910 and [r["label"] for r in rows].count(1) == 928
    assert all(r[k] == i[k] for r, i in zip(rows, inputs) for k in ("goal", "sol1", "sol2"))

    sample = data.load_piqa(limit=5, seed=3, data_dir=SHARED)
    assert sample == data.load_piqa(limit=5, seed=3, data_dir=SHARED)
    assert sample != rows[:5] and all(r in rows for r in sample)
    assert data.load_piqa(limit=5, data_dir=SHARED) == rows[:5]


@needs_shared
def test_local_ag_news_matches_the_hub_builder():
    rows, names = data.load_ag_news(data_dir=SHARED)
    assert names == ["World", "Sports", "Business", "Sci/Tech"]
    # The Hub builder: csv.reader, text = title + " " + description, label - 1.
    with (SHARED / "ag_news_csv" / "test.csv").open(encoding="utf-8") as handle:
        reader = csv.reader(handle, quotechar='"', delimiter=",", quoting=csv.QUOTE_ALL, skipinitialspace=True)
        hub = [{"text": f"{title} {desc}", "label": int(label) - 1} for label, title, desc in reader]
    assert rows == hub
    assert [sum(r["label"] == c for r in rows) for c in range(4)] == [1900] * 4

    sample, _ = data.load_ag_news(limit=7, seed=0, data_dir=SHARED)
    assert len(sample) == 7 and all(r in rows for r in sample)


@needs_shared
def test_local_lambada_rows():
    ds = data.load_split({"dataset": "EleutherAI/lambada_openai", "split": "test"}, data_dir=SHARED)
    lines = (SHARED / "lambada_openai" / "lambada_test.jsonl").read_text(encoding="utf-8").splitlines()
    assert ds.column_names == ["text"] and len(ds) == 5153
    assert ds["text"][0] == json.loads(lines[0])["text"]


# ----------------------------------------------------------------------------------------------------------------
# Local builders and bad input
# ----------------------------------------------------------------------------------------------------------------
def test_local_builders_text_json_csv_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n", encoding="utf-8")
    write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    (tmp_path / "a.csv").write_text("text,n\none,1\ntwo,2\n", encoding="utf-8")
    datasets.Dataset.from_dict({"text": ["one", "two"]}).to_parquet(str(tmp_path / "a.parquet"))
    for builder, name in [("text", "a.txt"), ("json", "a.jsonl"), ("csv", "a.csv"), ("parquet", "a.parquet")]:
        by_builder = data.load_split({"dataset": builder, "data_files": str(tmp_path / name), "split": "train"})
        by_path = data.load_split(str(tmp_path / name), split="validation")
        assert by_builder["text"] == by_path["text"] == ["one", "two"], builder
    sliced = data.load_split({"dataset": "json", "data_files": [str(tmp_path / "a.jsonl")], "split": "train[:1]"})
    assert sliced["text"] == ["one"]


def test_ready_dataset_and_datasetdict_pass_through():
    ds = datasets.Dataset.from_dict({"text": ["x"]})
    assert data.load_split(ds) is ds
    dd = datasets.DatasetDict(train=ds, test=datasets.Dataset.from_dict({"text": ["y"]}))
    assert data.load_split(dd, split="test")["text"] == ["y"]
    with pytest.raises(DataError, match="available: train, test"):
        data.load_split(dd, split="validation")


@pytest.mark.parametrize(
    "spec, pattern",
    [
        ({"dataset": "json"}, "data_files: .*needs data_files"),
        ({"dataset": "./nope/calib.jsonl"}, "does not exist"),
        ({"dataset": 3}, "dataset: expected"),
        ({}, "dataset: missing"),
        ({"dataset": "json", "data_files": 5}, "data_files: expected"),
    ],
)
def test_bad_specs_name_the_field(spec, pattern):
    with pytest.raises(DataError, match=pattern):
        data.load_split(spec)


def test_unknown_suffix_and_missing_data_files(tmp_path):
    (tmp_path / "a.xyz").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="cannot tell the format"):
        data.load_split(str(tmp_path / "a.xyz"))
    with pytest.raises(DataError, match="data_files"):
        data.load_split({"dataset": "json", "data_files": str(tmp_path / "missing.jsonl")})


def test_unknown_split_lists_available(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    with pytest.raises(DataError) as info:
        data.load_split({"dataset": "json", "data_files": {"train": str(f), "validation": str(f)}, "split": "tset"})
    assert "split: 'tset'" in str(info.value) and "train, validation" in str(info.value)


def test_empty_split_is_an_error(tmp_path):
    with pytest.raises(DataError, match="empty"):
        data.load_split(datasets.Dataset.from_dict({"text": []}))
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        data.load_split({"dataset": "text", "data_files": str(tmp_path / "empty.txt")})


def test_iter_texts_column_and_template():
    ds = datasets.Dataset.from_dict({"goal": ["g1", "g2"], "sol1": ["s1", None], "label": [0, 1]})
    assert list(data.iter_texts(ds, "goal")) == ["g1", "g2"]
    assert list(data.iter_texts(ds, "sol1")) == ["s1", ""]
    assert list(data.iter_texts(ds, template="Q: {goal}\nA: {sol1} ({label})")) == ["Q: g1\nA: s1 (0)",
                                                                                    "Q: g2\nA:  (1)"]


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"text_column": "text"}, r"text_column: 'text' is not a column.*available columns: goal, label"),
        ({"text_column": "gaol"}, "Did you mean 'goal'"),
        ({"text_column": "label"}, "holds .*int64.*not text"),
        ({"template": "Q: {question}"}, r"template: field \{question\}.*available columns: goal, label"),
        ({"template": "Q: {0}"}, "positional"),
        ({"template": "Q: {goal"}, "not a valid format string"),
    ],
)
def test_iter_texts_errors(kwargs, pattern):
    ds = datasets.Dataset.from_dict({"goal": ["g"], "label": [1]})
    with pytest.raises(DataError, match=pattern):
        list(data.iter_texts(ds, **kwargs))


# ----------------------------------------------------------------------------------------------------------------
# Tokens: wants_bos, tokenize_corpus, calibration_batches
# ----------------------------------------------------------------------------------------------------------------
def test_wants_bos_follows_what_the_tokenizer_does(tok, tok_nobos):
    assert data.wants_bos(tok) is True
    assert data.wants_bos(tok_nobos) is False  # declares <bos> but never adds it (GPT-2/SmolLM2 style)
    assert data.wants_bos(byte_tokenizer(bos=False, bos_token=False)) is False


def test_tokenize_corpus_has_no_bos_unless_asked(tok, tok_nobos):
    text = "héllo\n\nworld " * 50
    plain = ids_of(tok, text)
    assert len(plain) == len(text.encode("utf-8"))
    assert data.tokenize_corpus(text, tok).tolist() == plain
    assert data.tokenize_corpus(text, tok, add_bos=False).tolist() == plain
    assert data.tokenize_corpus(text, tok, add_bos=True).tolist() == tok(text)["input_ids"] == [BOS, *plain]
    assert data.tokenize_corpus(text, tok_nobos, add_bos=True).tolist() == [BOS, *plain]
    assert data.tokenize_corpus(text, tok).dtype == torch.long
    with pytest.raises(DataError, match="add_bos"):
        data.tokenize_corpus(text, byte_tokenizer(bos=False, bos_token=False), add_bos=True)


def rows_ds(rows: list[str]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": rows})


def test_packing_without_shuffle_matches_the_joined_text(tok, tok_nobos):
    rows = ["first row", "", "  ", "second row is longer", "third", "fourth row here"]
    stream_text = data.ROW_SEPARATOR.join(r for r in rows if r.strip())
    stream = ids_of(tok, stream_text)
    spec = {"dataset": rows_ds(rows), "shuffle": False, "num_samples": 3, "seq_len": 12}

    with_bos = data.calibration_batches(spec, tok, progress=False)
    assert with_bos.shape == (3, 12) and with_bos.dtype == torch.long
    assert with_bos.tolist() == [[BOS, *stream[i * 11:(i + 1) * 11]] for i in range(3)]

    no_bos = data.calibration_batches(spec, tok_nobos, progress=False)
    assert no_bos.tolist() == [stream[i * 12:(i + 1) * 12] for i in range(3)]
    assert data.calibration_batches({**spec, "add_bos": False}, tok, progress=False).tolist() == no_bos.tolist()
    assert data.calibration_batches({**spec, "add_bos": True}, tok_nobos, progress=False).tolist() == with_bos.tolist()


def test_one_long_row_gives_exactly_num_samples_windows(tok_nobos):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    out = data.calibration_batches({"dataset": rows_ds([text]), "num_samples": 3, "seq_len": 10}, tok_nobos,
                                   progress=False)
    assert out.tolist() == [ids_of(tok_nobos, text[i * 10:(i + 1) * 10]) for i in range(3)]


def test_calibration_is_deterministic_and_seeded(tok):
    rows = [f"row number {i} " + "x" * (i % 7) for i in range(200)]
    spec = {"dataset": rows_ds(rows), "num_samples": 8, "seq_len": 32, "seed": 1}
    first = data.calibration_batches(spec, tok, progress=False)
    assert torch.equal(first, data.calibration_batches(spec, tok, progress=False))
    assert not torch.equal(first, data.calibration_batches({**spec, "seed": 2}, tok, progress=False))
    unshuffled = data.calibration_batches({**spec, "shuffle": False}, tok, progress=False)
    assert not torch.equal(first, unshuffled)
    assert tok.decode(unshuffled[0, 1:]).startswith("row number 0 \n\nrow number 1 x\n\n")


def test_no_packing_takes_whole_rows_truncated_and_skips_short_ones(tok):
    rows = ["short", "a" * 40, "tiny", "b" * 20, "c" * 9, "d" * 30]
    spec = {"dataset": rows_ds(rows), "shuffle": False, "packing": False, "num_samples": 3, "seq_len": 10}
    out = data.calibration_batches(spec, tok, progress=False)
    assert out.tolist() == [[BOS, *ids_of(tok, ch * 9)] for ch in "abc"]


def test_only_the_needed_rows_are_tokenized(tok):
    seen: list[int] = []

    class Counting:
        bos_token_id = tok.bos_token_id

        def __call__(self, text, **kwargs):
            seen.append(1 if isinstance(text, str) else len(text))
            return tok(text, **kwargs)

    rows = ["0123456789"] * 5000
    out = data.calibration_batches({"dataset": rows_ds(rows), "num_samples": 4, "seq_len": 16}, Counting(),
                                   progress=False)
    assert out.shape == (4, 16)
    assert sum(seen) <= 2 + 256  # wants_bos probe + separator + one batch, not 5000 rows


def test_too_few_tokens(tok, caplog):
    spec = {"dataset": rows_ds(["abc", "def"]), "shuffle": False, "num_samples": 4, "seq_len": 64}
    with pytest.raises(DataError) as info:
        data.calibration_batches(spec, tok, progress=False)
    # "abc\n\ndef" is 8 tokens; one window needs 63 text tokens after BOS.
    assert "only 8 tokens" in str(info.value) and "needs 63" in str(info.value) and "seq_len" in str(info.value)

    with caplog.at_level(logging.WARNING, logger="hfptq.data"):
        out = data.calibration_batches({**spec, "seq_len": 4}, tok, progress=False)
    assert out.shape == (2, 4) and "only 2 of num_samples=4" in caplog.text


def test_no_packing_without_long_enough_rows(tok):
    spec = {"dataset": rows_ds(["abc", "defgh"]), "packing": False, "num_samples": 2, "seq_len": 16}
    with pytest.raises(DataError, match=r"longest has 5\).*packing: true"):
        data.calibration_batches(spec, tok, progress=False)


@pytest.mark.parametrize(
    "override, pattern",
    [
        ({"num_samples": 0}, "num_samples: expected a positive integer"),
        ({"num_samples": -3}, "num_samples"),
        ({"seq_len": 0}, "seq_len: expected a positive integer"),
        ({"seq_len": True}, "seq_len"),
        ({"seq_len": 1}, "no room for text after the BOS"),
        ({"seed": "x"}, "seed"),
        ({"text_column": "body"}, "text_column"),
    ],
)
def test_calibration_bad_numbers(tok, override, pattern):
    with pytest.raises(DataError, match=pattern):
        data.calibration_batches({"dataset": rows_ds(["abcdef"] * 10), **override}, tok, progress=False)


def test_add_bos_true_without_bos_token():
    tokenizer = byte_tokenizer(bos=False, bos_token=False)
    with pytest.raises(DataError, match="add_bos"):
        data.calibration_batches({"dataset": rows_ds(["abcdef"] * 10), "add_bos": True, "seq_len": 4,
                                  "num_samples": 1}, tokenizer, progress=False)


def test_calibration_from_local_files_with_template(tmp_path, tok_nobos):
    f = write_jsonl(tmp_path / "qa.jsonl", [{"goal": f"g{i}", "sol1": f"s{i}"} for i in range(50)])
    spec = {"dataset": "json", "data_files": str(f), "split": "train", "template": "Question: {goal}\nAnswer: {sol1}",
            "shuffle": False, "num_samples": 2, "seq_len": 20}
    out = data.calibration_batches(spec, tok_nobos, progress=False)
    expected = ids_of(tok_nobos, "Question: g0\nAnswer: s0\n\nQuestion: g1\nAnswer: s1\n\nQuestion: g2")[:40]
    assert out.flatten().tolist() == expected


@needs_shared
def test_calibration_on_local_wikitext_validation(tok):
    spec = {"dataset": "Salesforce/wikitext", "config": "wikitext-2-raw-v1", "num_samples": 32, "seq_len": 256}
    out = data.calibration_batches(spec, tok, progress=False, data_dir=SHARED)
    assert out.shape == (32, 256) and (out[:, 0] == BOS).all() and not (out[:, 1:] == BOS).any()
    valid = (SHARED / "wikitext-2-raw" / "wiki.valid.raw").read_text(encoding="utf-8")
    # The windows are consecutive slices of one stream of validation rows joined by blank lines.
    pieces = tok.decode(out[:, 1:].flatten()).split("\n\n")[:-1]
    assert len(pieces) > 5 and all(piece.strip() in valid for piece in pieces)


@pytest.mark.real_model
@needs_shared
def test_gemma_tokenizer_gets_bos_per_window():
    from transformers import AutoTokenizer

    from hfptq.models import gemma3_270m_path

    gemma = AutoTokenizer.from_pretrained(gemma3_270m_path())
    assert data.wants_bos(gemma)
    spec = {"dataset": "wikitext", "config": "wikitext-2-raw-v1", "num_samples": 4, "seq_len": 64}
    out = data.calibration_batches(spec, gemma, progress=False, data_dir=SHARED)
    assert out.shape == (4, 64)
    assert (out[:, 0] == gemma.bos_token_id).all() and not (out[:, 1:] == gemma.bos_token_id).any()
    corpus = data.load_text_corpus({"dataset": "wikitext", "split": "test"}, data_dir=SHARED)
    ids = data.tokenize_corpus(corpus, gemma)
    assert not (ids == gemma.bos_token_id).any()
    assert data.tokenize_corpus(corpus, gemma, add_bos=True).tolist() == gemma(corpus, verbose=False)["input_ids"]

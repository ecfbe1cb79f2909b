import json
import logging
import math
import sys

import pytest

from hfptq.errors import ConfigError
from hfptq.evaluation import report as report_mod
from hfptq.evaluation.perplexity import PerplexityResult
from hfptq.evaluation.report import SCHEMA_VERSION, QualityReport

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _full_report() -> QualityReport:
    r = QualityReport("tiny/model", plan=[{"module": "layers.0.mlp", "precision": "int8"},
                                           {"module": "lm_head", "precision": "float"}])
    r.set_perplexity(
        PerplexityResult(20.0, math.log(20.0), 1000, 4, 256, 256),
        PerplexityResult(21.0, math.log(21.0), 1000, 4, 256, 256),
        dataset="wikitext-2 test",
    )
    r.add_accuracy("piqa", {"acc": 0.70, "acc_norm": 0.68, "num_examples": 200},
                   {"acc": 0.65, "acc_norm": 0.66, "num_examples": 200})
    r.add_accuracy("ag_news", {"accuracy": 0.5, "num_examples": 100}, {"accuracy": 0.45, "num_examples": 100})
    r.set_size(
        {"total_bytes": 4 * 2**20, "by_precision": {"float32": {"bytes": 4 * 2**20}}},
        {"total_bytes": 2**20 + 2**19, "by_precision": {"int8": {"bytes": 2**20}, "float32": {"bytes": 2**19}}},
        float_checkpoint_bytes=4_200_000, quantized_checkpoint_bytes=1_400_000,
    )
    lat = {"prefill_wall_s": 0.5, "prefill_cpu_s": 0.9, "decode_tokens_per_s": 20.0, "threads": 2,
           "batch_size": 1, "prompt_len": 128, "new_tokens": 16, "device": "cpu"}
    r.set_latency(lat, {**lat, "prefill_wall_s": 0.25, "decode_tokens_per_s": 30.0})
    r.set_peak_memory(800 * 2**20, 400 * 2**20)
    r.set_layer_errors([
        {"module": "model.layers.0.mlp.down_proj", "sqnr_db": 31.25, "rel_error": 0.0274, "numel": 10},
        {"module": "model.layers.1.mlp.down_proj", "sqnr_db": 12.5, "rel_error": 0.2371, "numel": 10},
        {"module": "model.layers.10.mlp.down_proj", "sqnr_db": 25.0, "rel_error": 0.0562, "numel": 10},
        {"module": "model.embed_tokens", "sqnr_db": math.inf, "rel_error": 0.0, "numel": 10},
    ])
    r.set_sensitivity([
        {"rank": 1, "module": "model.layers.1.mlp.down_proj", "loss": 2.5, "loss_increase": 0.3, "rel_increase": 0.136},
        {"rank": 2, "module": "model.layers.0.mlp.down_proj", "loss": 2.25, "loss_increase": 0.05, "rel_increase": 0.0227},
    ])
    r.add_algorithm("smoothquant", alpha=0.5)
    r.set_calibration(dataset="wikitext-2 validation", samples=64, seq_len=256, observer="minmax", activations="static")
    r.add_timing("calibration", 3.5)
    return r


def test_to_dict_has_the_documented_keys_and_computed_drops():
    d = _full_report().to_dict()
    assert list(d) == ["schema_version", "model", "created_at", "plan", "calibration", "algorithms", "perplexity",
                       "accuracy", "size", "latency", "peak_memory", "layer_errors", "sensitivity", "timings"]
    assert d["schema_version"] == SCHEMA_VERSION == 1
    p = d["perplexity"]
    assert (p["float"], p["quantized"]) == (20.0, 21.0)
    assert p["abs_drop"] == pytest.approx(1.0) and p["rel_drop"] == pytest.approx(0.05)
    acc = d["accuracy"]["piqa"]["metrics"]
    assert set(acc) == {"acc", "acc_norm"}
    assert acc["acc"]["abs_drop"] == pytest.approx(0.05)
    assert acc["acc"]["rel_drop"] == pytest.approx(0.05 / 0.70)
    assert acc["acc_norm"]["abs_drop"] == pytest.approx(0.02)
    assert d["accuracy"]["ag_news"]["metrics"]["accuracy"]["quantized"] == 0.45
    assert d["size"]["ratio"] == pytest.approx(4 / 1.5)
    assert d["size"]["by_precision"]["quantized"] == {"int8": 2**20, "float32": 2**19}
    assert d["size"]["checkpoint"]["ratio"] == pytest.approx(3.0)
    assert d["latency"]["prefill_speedup"] == pytest.approx(2.0)
    assert d["latency"]["decode_speedup"] == pytest.approx(1.5)
    assert d["peak_memory"]["ratio"] == pytest.approx(2.0)
    assert d["calibration"]["activations"].startswith("static")
    assert d["algorithms"] == [{"name": "smoothquant", "details": {"alpha": 0.5}}]


def test_missing_sections_are_omitted(tmp_path):
    r = QualityReport("m")
    r.set_perplexity(PerplexityResult(10.0, math.log(10.0), 50, 1, 64, 64),
                     PerplexityResult(10.5, math.log(10.5), 50, 1, 64, 64))
    d = r.to_dict()
    assert set(d) == {"schema_version", "model", "created_at", "perplexity"}
    md = r.to_markdown()
    assert "## Perplexity" in md and "## Accuracy" not in md and "## Size" not in md
    paths = r.save(tmp_path)
    assert set(paths) == {"json", "markdown"}  # no plot applies
    assert not list(tmp_path.glob("*.png"))
    assert "perplexity" in r.console_summary()


def test_json_round_trip_is_strict_json_with_nonfinite_values_as_strings(tmp_path):
    r = _full_report()
    path = r.to_json(tmp_path / "sub" / "report.json")

    def reject(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    loaded = json.loads(path.read_text(), parse_constant=reject)
    inf_row = [row for row in loaded["layer_errors"] if row["module"] == "model.embed_tokens"][0]
    assert inf_row["sqnr_db"] == "inf"
    again = QualityReport.from_json(path)
    assert again.to_dict() == r.to_dict()
    with pytest.raises(ConfigError, match="schema_version"):
        QualityReport.from_dict({**loaded, "schema_version": 99})


def test_markdown_contains_the_numbers():
    md = _full_report().to_markdown()
    for text in ("20.0000", "21.0000", "+1.0000 (+5.00%)",  # perplexity and its drop
                 "70.00%", "65.00%", "+5.00 pp", "68.00%", "66.00%", "+2.00 pp",  # accuracies
                 "4.00 MiB", "1.50 MiB", "2.67x",  # sizes
                 "500.0 ms", "250.0 ms", "2.00x", "20.00", "30.00", "1.50x",  # latency
                 "800.00 MiB", "400.00 MiB",  # peak memory
                 "`model.layers.1.mlp.down_proj` | 12.50 | 0.23710",  # layer errors
                 "+0.3000", "smoothquant", "alpha=0.5", "wikitext-2 validation", "3.500 s",
                 "| layers.0.mlp | int8 |"):
        assert text in md, text
    # the worst layer comes first in the per-layer table
    section = md.split("## Per-layer error")[1]
    assert section.index("layers.1.mlp") < section.index("layers.10.mlp") < section.index("layers.0.mlp")


def test_console_summary_is_an_aligned_table():
    text = _full_report().console_summary()
    lines = text.splitlines()
    assert lines[0] == "hfptq quality report: tiny/model"
    header, rule = lines[1], lines[2]
    table = lines[1:lines.index(next(l for l in lines if l.startswith("lowest SQNR")))]
    starts = [header.index(c) for c in ("float", "quantized", "change")]
    for line in table[2:]:  # every row has its columns at the header's positions
        for start in starts:
            assert line[start - 2 : start] == "  " and line[start] != " ", line
    assert set(rule.replace(" ", "")) == {"-"}
    assert "21.0000" in text and "+5.00%" in text and "-5.00 pp" in text and "2.67x smaller" in text
    assert "model.layers.1.mlp.down_proj" in text and "12.5 dB" in text


def test_save_writes_json_markdown_and_valid_pngs(tmp_path):
    paths = _full_report().save(tmp_path)
    assert set(paths) == {"json", "markdown", "layer_errors", "sensitivity", "size"}
    for key in ("layer_errors", "sensitivity", "size"):
        data = paths[key].read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5000, key
        import matplotlib.image

        image = matplotlib.image.imread(paths[key])
        assert image.shape[0] > 200 and image.shape[1] > 400
    md = paths["markdown"].read_text()
    assert "![Per-layer SQNR](layer_errors.png)" in md and "![Size by precision](size.png)" in md
    assert json.loads(paths["json"].read_text())["model"] == "tiny/model"


def test_plots_are_skipped_with_one_warning_without_matplotlib(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "hfptq.evaluation._plots", None)
    monkeypatch.setattr(report_mod, "_MATPLOTLIB_WARNED", False)
    with caplog.at_level(logging.WARNING, logger="hfptq.evaluation.report"):
        paths = _full_report().save(tmp_path / "a")
        _full_report().save(tmp_path / "b")
    assert set(paths) == {"json", "markdown"}
    assert "![" not in paths["markdown"].read_text()
    assert sum("matplotlib" in rec.message for rec in caplog.records) == 1


def test_builders_validate_their_inputs():
    r = QualityReport("m")
    with pytest.raises(ConfigError, match="no accuracy metric"):
        r.add_accuracy("t", {"f1": 0.5}, {"f1": 0.4})
    r.add_accuracy("t", {"f1": 0.5}, {"f1": 0.4}, metrics=["f1"])
    assert r.accuracy["t"]["metrics"]["f1"]["abs_drop"] == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="activations"):
        r.set_calibration(activations="sometimes")
    with r.timer("step"):
        pass
    assert r.timings["step"] >= 0

import contextlib
import copy
import math

import pytest
import torch
from torch import nn

from hfptq.errors import ConfigError, DataError
from hfptq.evaluation.layer_error import layer_errors, sensitivity_from_losses, sensitivity_scan, sqnr

from .toys import tiny_llama


def test_sqnr_of_known_signals():
    assert sqnr(torch.ones(100), torch.ones(100) + 0.1) == pytest.approx(20.0, abs=1e-5)  # 10 log10(1 / 0.01)
    assert sqnr(torch.ones(8), torch.ones(8) * 0.5) == pytest.approx(10 * math.log10(4.0))
    assert sqnr(torch.arange(5.0), torch.arange(5.0)) == math.inf
    assert sqnr(torch.zeros(3), torch.ones(3)) == -math.inf
    with pytest.raises(DataError, match="shape"):
        sqnr(torch.ones(3), torch.ones(4))


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 8)
        self.fc1 = nn.Linear(8, 8, bias=False)
        self.fc2 = nn.Linear(8, 4, bias=False)

    def forward(self, input_ids):
        return self.fc2(torch.relu(self.fc1(self.embed(input_ids))))


def test_scaled_weights_give_hand_computed_errors():
    ref = _Toy()
    q = copy.deepcopy(ref)
    with torch.no_grad():
        q.fc1.weight.mul_(1.1)  # output of fc1 = 1.1 x reference: noise = 0.01 x signal -> 20 dB, rel 0.1
    ids = torch.randint(0, 20, (5, 6), generator=torch.Generator().manual_seed(0))
    rows = layer_errors(ref, q, ids, ["fc2", "fc1", "embed"], batch_size=2, progress=False)
    assert [r["module"] for r in rows] == ["embed", "fc1", "fc2"]  # sorted by name
    by = {r["module"]: r for r in rows}
    assert by["embed"]["sqnr_db"] == math.inf and by["embed"]["rel_error"] == 0.0
    assert by["fc1"]["sqnr_db"] == pytest.approx(20.0, abs=1e-4)
    assert by["fc1"]["rel_error"] == pytest.approx(0.1, rel=1e-5)
    assert by["fc1"]["numel"] == 5 * 6 * 8
    # fc2 sees relu(1.1 a) = 1.1 relu(a): its output is scaled by 1.1 as well
    assert by["fc2"]["sqnr_db"] == pytest.approx(20.0, abs=1e-4)
    assert by["fc2"]["numel"] == 5 * 6 * 4


def test_accumulates_over_batches_like_one_big_batch():
    ref = _Toy()
    q = copy.deepcopy(ref)
    with torch.no_grad():
        q.fc2.weight.add_(torch.randn(q.fc2.weight.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    ids = torch.randint(0, 20, (6, 5), generator=torch.Generator().manual_seed(2))
    one = layer_errors(ref, q, ids, ["fc2"], batch_size=6, progress=False)[0]
    many = layer_errors(ref, q, ids, ["fc2"], batch_size=1, progress=False)[0]
    with torch.no_grad():
        expected = sqnr(ref(ids), q(ids))
    assert one["sqnr_db"] == pytest.approx(expected, rel=1e-9)
    assert many["sqnr_db"] == pytest.approx(expected, rel=1e-9)
    assert not ref._forward_hooks and not ref.fc2._forward_hooks and not q.fc2._forward_hooks  # hooks removed


def test_decoder_layers_with_tuple_outputs_on_a_real_model():
    ref = tiny_llama()
    q = copy.deepcopy(ref)
    with torch.no_grad():
        w = q.model.layers[1].mlp.down_proj.weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.01)
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    names = ["model.layers.0", "model.layers.1", "model.layers.1.mlp.down_proj", "lm_head"]
    rows = {r["module"]: r for r in layer_errors(ref, q, ids, names, progress=False)}
    assert rows["model.layers.0"]["sqnr_db"] == math.inf
    assert math.isfinite(rows["model.layers.1.mlp.down_proj"]["sqnr_db"])
    assert rows["lm_head"]["rel_error"] > 0
    with pytest.raises(ConfigError, match="Did you mean"):
        layer_errors(ref, q, ids, ["model.layers.0.mlp.down_prj"], progress=False)


def test_sensitivity_ranking():
    rows = sensitivity_from_losses(2.0, {"a": 2.5, "b": 2.1, "c": 1.9, "d": 3.0}, top_k=3)
    assert [r["module"] for r in rows] == ["d", "a", "b"]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss_increase"] == pytest.approx(1.0)
    assert rows[0]["rel_increase"] == pytest.approx(0.5)
    assert len(sensitivity_from_losses(2.0, {"a": 2.5, "b": 2.1}, top_k=0)) == 2


def test_sensitivity_scan_toggles_one_module_at_a_time():
    state = {"quantized": None}
    penalties = {"x": 0.3, "y": 0.1, "z": 0.7}

    @contextlib.contextmanager
    def toggle(name):
        state["quantized"] = name
        yield
        state["quantized"] = None

    def loss():
        return 1.0 + penalties.get(state["quantized"], 0.0)

    rows = sensitivity_scan(loss, ["x", "y", "z"], toggle, top_k=2, progress=False)
    assert [(r["module"], round(r["loss_increase"], 9)) for r in rows] == [("z", 0.7), ("x", 0.3)]
    assert state["quantized"] is None

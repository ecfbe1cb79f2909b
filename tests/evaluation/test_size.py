import pytest
import torch
from torch import nn

from hfptq.errors import CheckpointError
from hfptq.evaluation.size import checkpoint_bytes, format_bytes, model_size


class _Int8Linear(nn.Module):
    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=torch.bfloat16))


class _PackedInt4(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight_bits = 4
        self.register_buffer("qweight", torch.zeros(8, 16, dtype=torch.uint8))  # 8 x 32 int4 values


def test_int8_buffers_count_one_byte_each_and_buffers_are_included():
    model = nn.Sequential(_Int8Linear(10, 20), nn.LayerNorm(10))
    size = model_size(model)
    by = size["by_precision"]
    assert by["int8"] == {"bytes": 200, "numel": 200, "values": 200, "tensors": 1}
    assert by["float32"]["bytes"] == (10 + 10 + 10) * 4  # scale + LayerNorm weight and bias
    assert by["bfloat16"]["bytes"] == 10 * 2
    assert size["buffer_bytes"] == 200 + 40
    assert size["parameter_bytes"] == 20 + 80
    assert size["total_bytes"] == 200 + 120 + 20
    assert size["total_numel"] == 200 + 30 + 10
    assert list(by)[0] == "int8"  # largest first


def test_packed_int4_counts_real_bytes_and_logical_values():
    size = model_size(nn.ModuleDict({"a": _PackedInt4()}))
    assert size["by_precision"]["int4"] == {"bytes": 128, "numel": 128, "values": 256, "tensors": 1}
    assert "uint8" not in size["by_precision"]

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("weight_packed", torch.zeros(4, dtype=torch.int32))  # 4 x 8 int4 values

    assert model_size(Named())["by_precision"]["int4"]["values"] == 32


def test_modules_can_declare_their_precision():
    class Fp8Like(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.zeros(6, dtype=torch.uint8))

        def hfptq_tensor_precision(self, name):
            return "fp8" if name == "w" else None

    assert model_size(Fp8Like())["by_precision"] == {"fp8": {"bytes": 6, "numel": 6, "values": 6, "tensors": 1}}


def test_shared_tensors_are_counted_once():
    emb = nn.Embedding(50, 8)
    head = nn.Linear(8, 50, bias=False)
    head.weight = emb.weight  # tied parameter
    model = nn.ModuleDict({"emb": emb, "head": head})
    assert model_size(model)["total_bytes"] == 50 * 8 * 4

    # the same storage registered as buffers of two modules (distinct tensor objects)
    table = torch.zeros(100, dtype=torch.int8)
    a, b = nn.Module(), nn.Module()
    a.register_buffer("t", table)
    b.register_buffer("t", table.view(10, 10))
    assert model_size(nn.ModuleDict({"a": a, "b": b}))["total_bytes"] == 100


def test_checkpoint_bytes_sums_weight_files_only(tmp_path):
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x" * 24)
    (tmp_path / "extra.bin").write_bytes(b"x" * 7)
    (tmp_path / "config.json").write_text("{}" * 100)
    assert checkpoint_bytes(tmp_path) == 1031
    assert checkpoint_bytes(tmp_path / "extra.bin") == 7
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint_bytes(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="safetensors"):
        checkpoint_bytes(empty)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * 2**20) == "3.00 MiB"
    assert format_bytes(None) == "n/a"

"""Shared fixtures: tiny random models of every preset family, and error-bound helpers.

Fixtures for other test files
-----------------------------
* ``tiny_model_dir(family) -> Path``: a tiny random model of ``family`` (see :data:`TINY_FAMILIES`)
  built with ``from_config`` under a fixed seed and saved with ``save_pretrained``; built once per
  session and cached.
* ``load_tiny(family, quantization_config=None, **kw) -> model``: a fresh ``eval()`` model loaded
  from that directory through its ``AutoModel*`` class (``quantization_config`` passed through).
* ``tiny_input_ids(family) -> LongTensor [2, 12]``: deterministic token ids avoiding special ids.
* ``tiny_family``: any test taking this argument is parametrized over all :data:`TINY_FAMILIES`
  (a :class:`TinyFamily`, ids = family names). ``tiny_causal_family`` does the same over the
  generative ones only.
* ``qbounds``: the error-bound helpers of this file (``linear_error_bound``, ``quant_linear_bound``,
  ``float_linear_bound``, ``exact_quant_linear``, ...) as a namespace.

Tiny models: hidden 32, 4 heads, 2 layers, vocab 128, default initialisation; every family builds,
saves and loads in well under a second.
"""
from __future__ import annotations

import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# One intra-op thread: the machines running this suite are shared, and with oversubscribed cores
# OpenMP's spin-waiting makes small matmuls up to ~50x slower with 2 threads than with 1.
# HFPTQ_TEST_THREADS=<n> overrides.
torch.set_num_threads(int(os.environ.get("HFPTQ_TEST_THREADS", "1")))

VOCAB = 128
HIDDEN = 32
INTER = 64
LAYERS = 2
HEADS = 4

# ------------------------------------------------------------------------------------------------
# Tiny model families
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyFamily:
    """A tiny random model of one preset family and the plan hfptq's default config must give it.

    Module names are written out from the Transformers architectures (not from hfptq's presets),
    so the plan tests check the presets against the real module trees.
    """

    name: str
    model_type: str
    auto_class: str
    make_config: Callable[[], "object"]
    layer_prefix: str  # format string with {i}
    attention: Tuple[str, ...]  # per-layer suffixes
    ffn: Tuple[str, ...]
    embedding: str
    lm_head: Optional[str] = None
    other: Tuple[str, ...] = ()  # heads/poolers that are neither attention nor FFN -> 'other' -> skip
    tied: bool = False  # the LM head shares the input embedding's weight
    conv1d: bool = False  # GPT-2 style Conv1D ([in, out] weights)
    embed_scale: bool = False  # Gemma: embeddings multiplied by sqrt(hidden)
    seed: int = 0

    @property
    def generative(self) -> bool:
        return self.auto_class == "AutoModelForCausalLM"

    def names(self, kind: str) -> List[str]:
        """Full module names of ``kind`` (``attention``/``ffn``/``lm_head``/``other``/``embedding``)."""
        if kind in ("attention", "ffn"):
            return [self.layer_prefix.format(i=i) + s for i in range(LAYERS) for s in getattr(self, kind)]
        if kind == "lm_head":
            return [self.lm_head] if self.lm_head else []
        if kind == "embedding":
            return [self.embedding]
        if kind == "other":
            return list(self.other)
        raise KeyError(kind)

    def __str__(self) -> str:  # pytest ids
        return self.name


def _special(**kw):
    """Special token ids inside the tiny vocabulary (avoids Transformers' out-of-vocab warnings)."""
    return {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **kw}


def _llama_like(cls_name: str, **extra):
    def make():
        import transformers

        return getattr(transformers, cls_name)(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=64, **_special(), **extra,
        )

    return make


def _cfg(cls_name: str, **kwargs):
    def make():
        import transformers

        return getattr(transformers, cls_name)(**kwargs)

    return make


_LLAMA_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_LLAMA_FFN = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_BERT_ATTN = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
_BERT_FFN = ("intermediate.dense", "output.dense")
_DISTIL_ATTN = ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin")
_DISTIL_FFN = ("ffn.lin1", "ffn.lin2")
_BERT_KW = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, max_position_embeddings=64)
_DISTIL_KW = dict(vocab_size=VOCAB, dim=HIDDEN, hidden_dim=INTER, n_layers=LAYERS, n_heads=HEADS,
                  max_position_embeddings=64)


def _decoder(name, model_type, make, attention=_LLAMA_ATTN, ffn=_LLAMA_FFN, prefix="model.layers.{i}.",
             embedding="model.embed_tokens", lm_head="lm_head", **kw) -> TinyFamily:
    return TinyFamily(name, model_type, "AutoModelForCausalLM", make, prefix, attention, ffn, embedding, lm_head, **kw)


_FAMILY_LIST = [
    _decoder("llama", "llama", _llama_like("LlamaConfig")),
    _decoder("mistral", "mistral", _llama_like("MistralConfig")),
    _decoder("qwen2", "qwen2", _llama_like("Qwen2Config")),
    _decoder("qwen3", "qwen3", _llama_like("Qwen3Config", head_dim=8)),
    _decoder("gemma", "gemma", _llama_like("GemmaConfig", head_dim=8), tied=True, embed_scale=True),
    _decoder("gemma2", "gemma2", _llama_like("Gemma2Config", head_dim=8), tied=True, embed_scale=True),
    _decoder("gemma3_text", "gemma3_text", _llama_like("Gemma3TextConfig", head_dim=8), tied=True, embed_scale=True),
    _decoder("phi3", "phi3", _llama_like("Phi3Config"), attention=("self_attn.o_proj", "self_attn.qkv_proj"),
             ffn=("mlp.gate_up_proj", "mlp.down_proj")),
    _decoder("gpt2", "gpt2", _cfg("GPT2Config", vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                 n_positions=64, **_special()),
             attention=("attn.c_attn", "attn.c_proj"), ffn=("mlp.c_fc", "mlp.c_proj"), prefix="transformer.h.{i}.",
             embedding="transformer.wte", tied=True, conv1d=True),
    _decoder("opt", "opt", _cfg("OPTConfig", vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=INTER,
                               num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=64,
                               word_embed_proj_dim=HIDDEN, **_special()),
             attention=("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj"),
             ffn=("fc1", "fc2"), prefix="model.decoder.layers.{i}.", embedding="model.decoder.embed_tokens",
             tied=True),
    _decoder("gpt_neox", "gpt_neox", _cfg("GPTNeoXConfig", vocab_size=VOCAB, hidden_size=HIDDEN,
                                         intermediate_size=INTER, num_hidden_layers=LAYERS,
                                         num_attention_heads=HEADS, max_position_embeddings=64, **_special()),
             attention=("attention.query_key_value", "attention.dense"),
             ffn=("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"), prefix="gpt_neox.layers.{i}.",
             embedding="gpt_neox.embed_in"),
    # encoders: classification heads and poolers are 'other' -> skip; MLM decoders are the LM head
    TinyFamily("bert", "bert", "AutoModelForSequenceClassification", _cfg("BertConfig", **_BERT_KW),
               "bert.encoder.layer.{i}.", _BERT_ATTN, _BERT_FFN, "bert.embeddings.word_embeddings",
               other=("bert.pooler.dense", "classifier")),
    TinyFamily("bert_mlm", "bert", "AutoModelForMaskedLM", _cfg("BertConfig", **_BERT_KW),
               "bert.encoder.layer.{i}.", _BERT_ATTN, _BERT_FFN, "bert.embeddings.word_embeddings",
               lm_head="cls.predictions.decoder", other=("cls.predictions.transform.dense",), tied=True),
    TinyFamily("roberta", "roberta", "AutoModelForSequenceClassification", _cfg("RobertaConfig", **_BERT_KW),
               "roberta.encoder.layer.{i}.", _BERT_ATTN, _BERT_FFN, "roberta.embeddings.word_embeddings",
               other=("classifier.dense", "classifier.out_proj")),
    TinyFamily("roberta_mlm", "roberta", "AutoModelForMaskedLM", _cfg("RobertaConfig", **_BERT_KW),
               "roberta.encoder.layer.{i}.", _BERT_ATTN, _BERT_FFN, "roberta.embeddings.word_embeddings",
               lm_head="lm_head.decoder", other=("lm_head.dense",), tied=True),
    TinyFamily("distilbert", "distilbert", "AutoModelForSequenceClassification",
               _cfg("DistilBertConfig", **_DISTIL_KW), "distilbert.transformer.layer.{i}.", _DISTIL_ATTN,
               _DISTIL_FFN, "distilbert.embeddings.word_embeddings", other=("pre_classifier", "classifier")),
    TinyFamily("distilbert_mlm", "distilbert", "AutoModelForMaskedLM", _cfg("DistilBertConfig", **_DISTIL_KW),
               "distilbert.transformer.layer.{i}.", _DISTIL_ATTN, _DISTIL_FFN,
               "distilbert.embeddings.word_embeddings", lm_head="vocab_projector", other=("vocab_transform",),
               tied=True),
]
TINY_FAMILIES: Dict[str, TinyFamily] = {f.name: f for f in _FAMILY_LIST}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "tiny_family" in metafunc.fixturenames:
        metafunc.parametrize("tiny_family", list(TINY_FAMILIES.values()), ids=list(TINY_FAMILIES))
    if "tiny_causal_family" in metafunc.fixturenames:
        causal = [f for f in TINY_FAMILIES.values() if f.generative]
        metafunc.parametrize("tiny_causal_family", causal, ids=[f.name for f in causal])


@pytest.fixture(scope="session")
def tiny_families() -> Dict[str, TinyFamily]:
    """All tiny families by name."""
    return TINY_FAMILIES


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: ``tiny_model_dir("llama")`` -> directory of a saved tiny random model (cached per session)."""
    root = tmp_path_factory.mktemp("tiny_models")

    def build(family: str) -> Path:
        return _build_tiny(family, root)[0]

    return build


_BUILT: Dict[str, Tuple[Path, torch.nn.Module]] = {}


def _build_tiny(family: str, root: Path) -> Tuple[Path, torch.nn.Module]:
    if family not in _BUILT:
        import transformers

        spec = TINY_FAMILIES[family]
        torch.manual_seed(spec.seed)
        model = getattr(transformers, spec.auto_class).from_config(spec.make_config()).eval()
        path = root / family
        model.save_pretrained(path)
        model.config._name_or_path = str(path)  # as after from_pretrained(path)
        _BUILT[family] = (path, model)
    return _BUILT[family]


@pytest.fixture(scope="session")
def load_tiny(tiny_model_dir) -> Callable[..., torch.nn.Module]:
    """Factory: ``load_tiny("gpt2", quantization_config=cfg)`` -> fresh ``eval()`` model via ``AutoModel*``.

    Without a config or kwargs it returns a deep copy of the saved float model (same tensors as a reload).
    """

    def load(family: str, quantization_config=None, **kwargs) -> torch.nn.Module:
        import copy

        import transformers

        path = tiny_model_dir(family)
        if quantization_config is None and not kwargs:
            # the float model: a copy of the one that was saved (identical tensors, no reload cost)
            return copy.deepcopy(_BUILT[family][1]).eval()
        spec = TINY_FAMILIES[family]
        auto = getattr(transformers, spec.auto_class)
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        return auto.from_pretrained(path, **kwargs).eval()

    return load


@pytest.fixture(scope="session")
def tiny_input_ids() -> Callable[[str], torch.Tensor]:
    """Factory: deterministic ``[2, 12]`` token ids in ``[3, vocab)`` (no pad/bos/eos ids)."""

    def make(family: str = "") -> torch.Tensor:
        gen = torch.Generator().manual_seed(1234)
        return torch.randint(3, VOCAB, (2, 12), generator=gen)

    return make


# ------------------------------------------------------------------------------------------------
# Error bounds (float64). Notation: y = x W^T + b with x [T, K], W [N, K].
# ------------------------------------------------------------------------------------------------

U_FP32 = 2.0 ** -24  # unit roundoff (round to nearest) of float32
U_BF16 = 2.0 ** -8
U_FP16 = 2.0 ** -11
FP16_HALF_SUBNORMAL = 2.0 ** -25  # absolute rounding error of float16 below its normal range


def linear_error_bound(
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    *,
    x_err: Optional[torch.Tensor] = None,
    w_err: Optional[torch.Tensor] = None,
    b_err: Optional[torch.Tensor] = None,
    acc_u: float = U_FP32,
    out_u: float = U_FP32,
) -> torch.Tensor:
    """Elementwise bound of ``|ŷ - (x W^T + b)|`` when ŷ is computed from perturbed operands.

    If ``|x̂ - x| <= x_err`` and ``|Ŵ - W| <= w_err`` elementwise (broadcastable), then since
    ``x̂Ŵ^T - xW^T = (x̂ - x)W^T + x̂(Ŵ - W)^T``:

        |Δy| <= |Δx| |W|^T + (|x| + |Δx|) |ΔW|^T + |Δb|
                + K·acc_u · (|x̂| |Ŵ|^T)          (floating-point accumulation of K products)
                + out_u · (|y| + ...)             (rounding of the result)

    Every term is evaluated in float64, so the bound is rigorous up to float64 rounding.
    """
    x = x.double().reshape(-1, x.shape[-1])
    w = w.double()
    k = x.shape[-1]
    ax, aw = x.abs(), w.abs()
    dx = torch.zeros_like(ax) if x_err is None else x_err.double().expand_as(ax)
    dw = torch.zeros_like(aw) if w_err is None else w_err.double().expand_as(aw)
    xh, wh = ax + dx, aw + dw
    y = x @ w.t() + (0 if b is None else b.double())
    bound = dx @ aw.t() + xh @ dw.t()
    if b_err is not None:
        bound = bound + b_err.double()
    mag = xh @ wh.t() + (0 if b is None else b.double().abs() + (0 if b_err is None else b_err.double()))
    bound = bound + k * acc_u * mag + out_u * (y.abs() + bound) + 1e-30
    return bound


def expand_weight_steps(scale: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Per-element weight step ``[out, in]`` from a ``[rows, n_groups]`` scale (tensor/channel/group)."""
    rows, groups = scale.shape
    s = scale.double().reshape(rows, groups, 1).expand(rows, groups, in_features // groups)
    return s.reshape(rows, in_features).expand(out_features, in_features)


def token_steps(x: torch.Tensor, symmetric: bool = True, bits: int = 8) -> torch.Tensor:
    """Dynamic per-token step (float64 ``[T, 1]``): ``amax/127`` (symmetric) or ``(max - min)/255``
    over a range widened to contain 0 (asymmetric)."""
    x2 = x.double().reshape(-1, x.shape[-1])
    if symmetric:
        return x2.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    hi = x2.amax(-1, keepdim=True).clamp(min=0)
    lo = x2.amin(-1, keepdim=True).clamp(max=0)
    return (hi - lo) / (2 ** bits - 1)


_UNIT = {torch.float32: U_FP32, torch.bfloat16: U_BF16, torch.float16: U_FP16, torch.float64: 0.0}


def quant_linear_bound(module, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """Bound of ``|QuantLinear(x) - (x W^T + b)|`` from the step sizes.

    ``|ΔW| <= s_w/2`` per element (``s_w`` read from ``module.weight_scale``); ``|Δx| <= s_x/2`` per
    token (dynamic: the step is recomputed from ``x``) or per tensor (static ``input_scale``, ``x``
    inside the calibrated range); plus the rounding of the arithmetic: W8A8 rescales an exact
    integer product in float32 and casts to ``x.dtype``; weight-only dequantizes to the compute
    dtype (bfloat16 for half inputs on CPU) and accumulates in float32.
    """
    w_step = expand_weight_steps(module.weight_scale, module.out_features, module.in_features)
    # scales computed in float32 may be one ulp off the float64 value: widen the half step by 2^-22
    half = 0.5 + 2.0 ** -22
    w_err = w_step * half
    b_err = None
    x_err = None
    if module.act_mode == "none":
        setting = module.compute_dtype_setting
        if setting == "auto":
            cd = torch.bfloat16 if (x.device.type == "cpu" and x.dtype == torch.float16) else x.dtype
        else:
            cd = getattr(torch, setting)
        uc = _UNIT[cd]
        w_err = w_err + uc * (w.double().abs() + w_err)
        if b is not None:
            b_err = uc * b.double().abs()
        if x.dtype != cd:
            x_err = uc * x.double().abs().reshape(-1, x.shape[-1])
        out_u = max(U_FP32, uc, _UNIT[x.dtype])
    else:
        if module.act_mode == "dynamic":
            x_err = token_steps(x, module.act_symmetric) * half
        else:
            x_err = module.input_scale.double().reshape(1, 1) * half
        out_u = max(4 * U_FP32, _UNIT[x.dtype])
    return linear_error_bound(x, w, b, x_err=x_err, w_err=w_err, b_err=b_err, acc_u=U_FP32, out_u=out_u)


def float_linear_bound(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], storage: torch.dtype,
                       compute: torch.dtype) -> torch.Tensor:
    """Bound of ``|FloatLinear(x) - (x W^T + b)|``: W (and b) rounded to ``storage`` then to ``compute``,
    x rounded to ``compute``, float32 accumulation, result rounded to ``compute``."""
    u = {torch.float16: U_FP16, torch.bfloat16: U_BF16, torch.float32: 0.0}
    ws, wc = u[storage], u[compute]
    xc = 0.0 if x.dtype == compute else u[compute]
    w_rel = ws + wc + ws * wc
    w_err = w.double().abs() * w_rel + (FP16_HALF_SUBNORMAL if storage == torch.float16 else 0.0)
    x_err = x.double().abs().reshape(-1, x.shape[-1]) * xc
    b_err = None if b is None else b.double().abs() * w_rel + FP16_HALF_SUBNORMAL
    return linear_error_bound(x, w, b, x_err=x_err, w_err=w_err, b_err=b_err, acc_u=U_FP32,
                              out_u=max(U_FP32, wc))


def quantize_tokens_reference(x: torch.Tensor, symmetric: bool = True):
    """Per-token int8 quantization by its definition (float32 scale, round half to even, clamp).

    Returns ``(q float64 [T, K], scale float64 [T, 1], zero_point float64 [T, 1])``.
    """
    x2 = x.float().reshape(-1, x.shape[-1])
    tiny = torch.finfo(torch.float32).tiny * 2 ** 20
    if symmetric:
        s = (x2.abs().amax(-1, keepdim=True) / 127).clamp(min=tiny)
        q = torch.round(x2 / s).clamp(-127, 127)
        return q.double(), s.double(), torch.zeros_like(s, dtype=torch.float64)
    hi = x2.amax(-1, keepdim=True).clamp(min=0)
    lo = x2.amin(-1, keepdim=True).clamp(max=0)
    s = ((hi - lo) / 255).clamp(min=tiny)
    z = torch.round(-128 - lo / s).clamp(-128, 127)
    q = (torch.round(x2 / s) + z).clamp(-128, 127)
    return q.double(), s.double(), z.double()


def exact_quant_linear(module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Float64 evaluation of what a QuantLinear represents, from its own integer buffers.

    Returns ``(y, magnitude)``: ``y = (q_x - z_x) s_x · ((q_w - z_w) s_w)^T + b`` and
    ``magnitude = |x̂| |Ŵ|^T + |b|`` (for float32 rounding tolerances).
    """
    wq = module.int_weight().double()
    out_f, in_f = wq.shape
    if module.weight_zero_point is not None:
        zw = expand_weight_steps(module.weight_zero_point.double(), out_f, in_f)
        wq = wq - zw
    w_hat = wq * expand_weight_steps(module.weight_scale, out_f, in_f)
    x2 = x.reshape(-1, x.shape[-1])
    if module.act_mode == "dynamic":
        q, s, z = quantize_tokens_reference(x2, module.act_symmetric)
        x_hat = (q - z) * s
    elif module.act_mode == "static":
        s = module.input_scale.float()
        z = 0.0 if module.input_zero_point is None else module.input_zero_point.double()
        lo, hi = (-127, 127) if module.input_zero_point is None else (-128, 127)
        q = (torch.round(x2.float() / s).double() + z).clamp(lo, hi)
        x_hat = (q - z) * s.double()
    else:
        x_hat = x2.double()
    b = None if module.bias is None else module.bias.double()
    y = x_hat @ w_hat.t() + (0 if b is None else b)
    mag = x_hat.abs() @ w_hat.abs().t() + (0 if b is None else b.abs())
    return y.reshape(*x.shape[:-1], out_f), mag.reshape(*x.shape[:-1], out_f)


def float_reference_weight(module: torch.nn.Module) -> torch.Tensor:
    """``[out, in]`` float weight of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (whose weight is ``[in, out]``)."""
    w = module.weight.detach()
    return w.t() if type(module).__name__ == "Conv1D" else w


@pytest.fixture(scope="session")
def qbounds() -> types.SimpleNamespace:
    """Error-bound helpers as a namespace (see the functions in ``tests/conftest.py``)."""
    return types.SimpleNamespace(
        U_FP32=U_FP32, U_BF16=U_BF16, U_FP16=U_FP16,
        linear_error_bound=linear_error_bound, expand_weight_steps=expand_weight_steps, token_steps=token_steps,
        quant_linear_bound=quant_linear_bound, float_linear_bound=float_linear_bound,
        quantize_tokens_reference=quantize_tokens_reference, exact_quant_linear=exact_quant_linear,
        float_reference_weight=float_reference_weight,
    )

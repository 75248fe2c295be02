"""Perplexity and the QAT losses make the logits a chunk of tokens at a time (qatcli/evaluation/head.py): the same
values as the whole-batch formulas, for Llama, for Gemma 3 (tied, soft-capped), for a model whose forward scales
its logits (detected, whole logits), for a fake-quantized lm_head; and no [batch, seqlen, vocab] tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama_config
from test_gemma import gemma_config
from transformers import Gemma3ForCausalLM, LlamaForCausalLM

from qatcli.config import QATConfig
from qatcli.evaluation import head
from qatcli.qat import losses
from qatcli.qat.estimators import make_estimator
from qatcli.qat.fake_quant import prepare_qat
from qatcli.quant.grid import QuantSpec
from qatcli.quant.rtn import quantize_rtn
from qatcli.quant.targets import find_targets

VOCAB = 512
CHUNK = 7  # tokens per chunk: 60 tokens make 8 full chunks and a shorter one


class ScaledLlama(LlamaForCausalLM):
    """A model whose forward does more to its logits than lm_head (as Cohere's logit_scale does)."""

    def forward(self, input_ids=None, logits_to_keep=0, **kwargs):
        out = super().forward(input_ids, logits_to_keep=logits_to_keep, **kwargs)
        out.logits = out.logits * 0.5
        return out


def make(kind: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "llama":
        return LlamaForCausalLM(tiny_llama_config(VOCAB))
    if kind == "scaled":
        return ScaledLlama(tiny_llama_config(VOCAB))
    model = Gemma3ForCausalLM(gemma_config(VOCAB, layers=2, softcap=2.0))
    with torch.no_grad():  # random norms and a soft cap that bites (logits of several units)
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 0.5))
    return model


def straightforward_kd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    t = F.log_softmax(teacher.float(), dim=-1).flatten(0, 1)
    return F.kl_div(F.log_softmax(student.float(), dim=-1).flatten(0, 1), t, log_target=True, reduction="batchmean")


def straightforward_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def loss_and_grads(model, teacher, ids, loss: str, chunked: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    if chunked:
        value = losses.model_ce_loss(model, ids) if loss == "ce" else losses.model_kd_loss(model, teacher, ids)
    else:
        logits = model(ids).logits
        if loss == "ce":
            value = straightforward_ce(logits, ids)
        else:
            with torch.no_grad():
                teacher_logits = teacher(ids).logits
            value = straightforward_kd(logits, teacher_logits)
    (value / 2).backward()  # an upstream gradient that is not 1, as with gradient accumulation
    return value.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(head, "CHUNK_ELEMENTS", VOCAB * CHUNK)


@pytest.mark.parametrize("kind", ["llama", "gemma", "scaled"])
@pytest.mark.parametrize("loss", ["ce", "kd"])
def test_chunked_losses_equal_the_whole_batch_formulas(kind: str, loss: str, small_chunks: None) -> None:
    model, teacher = make(kind, 0), make(kind, 1)
    ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    got, got_grads = loss_and_grads(model, teacher, ids, loss, chunked=True)
    expected, expected_grads = loss_and_grads(model, teacher, ids, loss, chunked=False)
    assert abs(float(got) - float(expected)) <= 1e-6 * abs(float(expected))
    assert len(got_grads) == len(expected_grads) == len(list(model.parameters()))
    for a, b in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert (model in head._FULL_LOGITS) == (kind == "scaled")  # the scaled forward is detected


@pytest.mark.parametrize("kind", ["llama", "gemma", "scaled"])
def test_token_nll_equals_the_whole_batch_cross_entropy(kind: str, small_chunks: None) -> None:
    model = make(kind, 0)
    ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(ids).logits
        expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        got = head.token_nll(model, ids)
    assert got.shape == (3, 19)
    torch.testing.assert_close(got.flatten(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_no_logits_of_the_whole_batch_exist(kind: str, small_chunks: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """lm_head itself sees one position per window (the check); every logits tensor made has at most CHUNK rows."""
    model, teacher = make(kind, 0), make(kind, 1)
    ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(3))
    head_outputs: list[tuple[int, ...]] = []
    made: list[tuple[int, ...]] = []
    for m in (model, teacher):
        m.get_output_embeddings().register_forward_hook(lambda mod, args, out: head_outputs.append(tuple(out.shape)))
    real = head.head_logits

    def recording(*args, **kwargs):
        logits = real(*args, **kwargs)
        made.append(tuple(logits.shape))
        return logits

    monkeypatch.setattr(head, "head_logits", recording)
    monkeypatch.setattr(losses, "head_logits", recording)
    losses.model_ce_loss(model, ids).backward()
    losses.model_kd_loss(model, teacher, ids).backward()
    with torch.no_grad():
        head.token_nll(model, ids)
    assert head_outputs and all(shape == (3, 1, VOCAB) for shape in head_outputs), head_outputs
    rows = [shape[:-1].numel() for shape in map(torch.Size, made)]
    assert made and all(shape[-1] == VOCAB for shape in made) and max(rows) <= CHUNK, made
    assert sum(rows) >= 3 * 19 + 3 * 20 + 3 * 19  # ce, kd (student and teacher) and nll: every token in a chunk


def test_a_fake_quantized_lm_head_trains_with_the_same_gradients(small_chunks: None) -> None:
    """quant.lm_head: lm_head is a FakeQuantLinear; its weight is taken once per batch, its gradients (latent
    weight and scales) are the whole-batch ones."""
    model = make("llama", 0)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    targets = find_targets(model, [], [], lm_head=True)
    layers = quantize_rtn(targets, QuantSpec(4, 32, True), "minmax")
    fakes = prepare_qat(model, layers, make_estimator(QATConfig(estimator="ste"), seed=0))
    assert type(model.lm_head).__name__ == "FakeQuantLinear"
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [fakes["lm_head"].weight, fakes["lm_head"].scales, fakes["model.layers.0.mlp.down_proj"].scales]
    for p in trained:
        p.requires_grad_(True)
    grads = []
    for chunked in (True, False):
        for p in trained:
            p.grad = None
        value = losses.model_ce_loss(model, ids) if chunked else straightforward_ce(model(ids).logits, ids)
        value.backward()
        grads.append((value.detach(), [p.grad.clone() for p in trained]))
    (got, got_grads), (expected, expected_grads) = grads
    assert abs(float(got) - float(expected)) <= 1e-6 * abs(float(expected))
    for a, b in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert model not in head._FULL_LOGITS

"""The completion-only loss: the same loss and gradients as each example alone, padded or padding-free."""

from __future__ import annotations

import pytest
import torch

from llamaduo.config import ModelConfig
from llamaduo.models import load_model
from tests.tiny import tiny_examples, tiny_model  # noqa: F401


def _reference_completion_loss(model, rows) -> torch.Tensor:
    """Each example alone, unpadded: summed cross-entropy over its completion tokens ÷ their count."""
    nll, count = torch.zeros(()), 0
    for r in rows:
        logits = model(input_ids=torch.tensor([r["input_ids"]])).logits[0, :-1]
        target = torch.tensor(r["labels"][1:])
        nll = nll + torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
        count += int((target != -100).sum())
    return nll / count


@pytest.mark.parametrize("padding_free", [True, False])
def test_padding_free_and_padded_batches_give_the_loss_and_gradients_of_unpacked_examples(
    tiny_model, padding_free  # noqa: F811
):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from llamaduo.train import tokenize_example
    from llamaduo.train_loss import completion_loss

    torch.manual_seed(0)
    model, tok = load_model(ModelConfig(base=str(tiny_model)))
    examples = tiny_examples(6, system="Reply briefly.")
    examples[2].messages[-1].content *= 3  # lengths differ: padding, and segments of several sizes
    rows = []
    for e in examples:
        r = tokenize_example(tok, e, 128)
        rows.append({"input_ids": r["input_ids"], "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"], strict=True)]})
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=padding_free)(rows)
    assert batch["input_ids"].shape[0] == (1 if padding_free else 6)

    ref = _reference_completion_loss(model, rows)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss, _ = completion_loss(model, batch)
    loss.backward()
    assert torch.allclose(loss, ref, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref_grads[n], atol=1e-5), n  # no example attends into another

"""The training loss: mean cross-entropy over the completion (assistant) tokens only, and the
`SFTTrainer` subclass that uses it. torch is imported inside the functions, as in `train.py`.
"""

from __future__ import annotations

from typing import Any


def completion_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> tuple[Any, Any]:
    """Mean cross-entropy over the completion tokens of a padded or padding-free batch.

    The LM head is most of the compute of a small model with a large vocabulary (Gemma 3 270M:
    262k words × 640 dims, more than its 18 layers per token), so it runs only at positions
    whose next token is in the loss: `logits_to_keep` trims the columns no row needs, and a
    pre-hook on the head keeps exactly the rows' completion positions. The model's own forward
    runs throughout (DDP/FSDP wrappers, soft-capping and scaling included), and the loss is
    the same as over all positions. `inputs` is a collator's batch with `labels` (-100 = not in the loss).
    """
    import torch
    from torch.nn import functional as F

    inputs = dict(inputs)
    labels = inputs.pop("labels")
    targets = labels[:, 1:]
    # Columns where some row predicts a completion token, then the exact (row, column) pairs.
    keep = (targets != -100).any(dim=0).nonzero().flatten()
    if keep.numel() == 0:
        keep = torch.zeros(1, dtype=torch.long, device=labels.device)  # no completion token: a zero loss
    targets = targets[:, keep]
    picked = targets != -100
    if not picked.any():
        picked[0, 0] = True  # one position, masked by its -100 target, keeps the graph connected
    head = getattr(model, "module", model).get_output_embeddings()

    def only_completion_positions(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0][picked.to(args[0].device)].unsqueeze(0), *args[1:])

    hook = head.register_forward_pre_hook(only_completion_positions)
    try:
        outputs = model(**inputs, use_cache=False, logits_to_keep=keep)
    finally:
        hook.remove()
    logits = outputs.logits[0]
    outputs.logits = None  # [positions, vocab] is large; the loss below holds what backward needs
    total = F.cross_entropy(logits.float(), targets[picked].to(logits.device), ignore_index=-100, reduction="sum")
    count = picked.sum() if num_items_in_batch is None else num_items_in_batch
    return total / torch.as_tensor(count, device=total.device).clamp(min=1), outputs


def completion_loss_trainer(base: type) -> type:
    """`SFTTrainer` with `completion_loss`: TRL scores every position off CUDA and adds entropy
    and accuracy metrics over the full vocabulary each step, which dominates a small model's time."""

    class CompletionLossTrainer(base):  # type: ignore[misc, valid-type]
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
            loss, outputs = completion_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # `num_items_in_batch` counts every rank's tokens and DDP averages the gradients.
                loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

    return CompletionLossTrainer

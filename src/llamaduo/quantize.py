"""`infer.precision: int8`: the model's linear layers as int8 weights for CPU generation.

The model is cast to bf16 (as `precision: bf16` does), then each frozen linear layer — every
`nn.Linear` of the base model, the LM head and the base layer under a LoRA adapter included —
keeps its weights as int8 with one bf16 scale per output row and multiplies bf16 activations by
them (`Int8Linear`, torch's weight-only int8 CPU kernel, the one torchao's int8 weight-only
quantization runs on CPU). Activations are not quantized: on Gemma 3 270M, next-token choices
under teacher forcing agree with fp32 on 98.3 % of tokens (bf16: 99.3 %), where int8 activations
(fbgemm's dynamic quantization) agreed on 87 %. The infer stage merges a round's LoRA adapter
before quantizing (`infer.round_model`), as `deploy` merges it into the export a run is served
from, so the int8 tensors judged are the ones served, bit for bit. Runs served together on one
base (`serve RUN_A RUN_B`) keep their adapters apart: the LoRA matrices stay in bf16 on top of the
int8 base, and `accept` against each name measures what that serves. A decode step reads half of bf16's bytes: Gemma's
262,144-row LM head takes ~5.7 ms for one row vs ~14 ms in bf16 (2 threads; docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

import torch  # only imported where a model is being prepared for generation (`infer.for_generation`)

from llamaduo.errors import UserError

LORA_PARTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "modules_to_save"}


class Int8Linear(torch.nn.Module):
    """A frozen `nn.Linear` as int8 weights, a bf16 scale per output row, bf16 activations."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def int8_linears(model: Any) -> Any:
    """`model` in bf16 with every base `nn.Linear` replaced (in place) by an `Int8Linear`; the LoRA
    matrices and everything else stay bf16."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise UserError(f"infer.precision=int8 is int8 weights for CPU generation; the model is on {device} "
                        "(use bf16 there)")
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        raise UserError(f"infer.precision=int8 needs torch's weight-only int8 kernel, which torch {torch.__version__} "
                        "lacks; use bf16")
    model.to(torch.bfloat16)
    keep = {id(m) for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in LORA_PARTS
            for m in module.modules()}
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is torch.nn.Linear and id(child) not in keep]
    for parent, name, child in swaps:
        setattr(parent, name, Int8Linear(child))
    return model


def int8_weights(model: Any) -> int:
    """How many weights `int8_linears` holds as int8 in `model` (0: it was not applied); they are
    buffers, not among `model.parameters()`."""
    return sum(m.qweight.numel() for m in model.modules() if isinstance(m, Int8Linear))

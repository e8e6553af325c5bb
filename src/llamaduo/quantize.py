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
`infer.int4_lm_head` makes the LM head alone 4-bit (`Int4Linear`: a bf16 scale and zero per 32
weights, torch's int4 CPU kernel): on Gemma the head is the biggest read of a decode step, and
4-bit makes it a third of int8's time for one row (98.0 % of next tokens as fp32's).
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


class Int4Linear(torch.nn.Module):
    """A frozen `nn.Linear` (the LM head, `infer.int4_lm_head`) as 4-bit weights with a bf16 scale
    and zero per `group` weights of a row, bf16 activations (torch's int4 CPU kernel; the head's
    262,144 rows on Gemma are a third of int8's time for one row, half for eight)."""

    def __init__(self, linear: torch.nn.Linear, group: int = 32):
        super().__init__()
        self.in_features, self.out_features, self.group = linear.in_features, linear.out_features, group
        if linear.bias is not None or self.in_features % group:
            raise UserError(f"infer.int4_lm_head needs an LM head without bias whose {self.in_features} inputs are a "
                            f"multiple of {group}")
        rows = -(-self.out_features // 16) * 16  # the kernel packs rows by 16; the extra ones are zeros
        w = torch.nn.functional.pad(linear.weight.detach().float(), (0, 0, 0, rows - self.out_features))
        w = w.reshape(-1, group)
        low, high = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        scale = (high - low).clamp(min=1e-12) / 15
        q = torch.round((w - low) / scale).clamp(0, 15).to(torch.int32).reshape(rows, -1)
        self.register_buffer("qweight", torch._convert_weight_to_int4pack_for_cpu(q, 1))
        # The kernel's form: weight = (q - 8) * scale + zero, [groups, rows, (scale, zero)].
        zero = low + 8 * scale
        pairs = torch.cat([scale, zero], dim=1).reshape(rows, -1, 2).transpose(0, 1)
        self.register_buffer("scale_zero", pairs.contiguous().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.qweight, self.group, self.scale_zero)
        return y[:, : self.out_features].reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 weights (groups of {self.group})"


def int8_linears(model: Any, int4_head: bool = False) -> Any:
    """`model` in bf16 with every base `nn.Linear` replaced (in place) by an `Int8Linear` (the LM head
    by an `Int4Linear` with `int4_head`); the LoRA matrices and everything else stay bf16."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise UserError(f"infer.precision=int8 is int8 weights for CPU generation; the model is on {device} "
                        "(use bf16 there)")
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        raise UserError(f"infer.precision=int8 needs torch's weight-only int8 kernel, which torch {torch.__version__} "
                        "lacks; use bf16")
    if int4_head and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise UserError(f"infer.int4_lm_head needs torch's int4 CPU kernel, which torch {torch.__version__} lacks")
    head = model.get_output_embeddings() if int4_head else None
    if int4_head and type(head) is not torch.nn.Linear:
        raise UserError(f"infer.int4_lm_head: this model's LM head is a {type(head).__name__}, not a plain linear layer")
    model.to(torch.bfloat16)
    keep = {id(m) for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in LORA_PARTS
            for m in module.modules()}
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is torch.nn.Linear and id(child) not in keep]
    for parent, name, child in swaps:
        setattr(parent, name, Int4Linear(child) if child is head else Int8Linear(child))
    return model


def int8_weights(model: Any) -> int:
    """How many weights `int8_linears` holds quantized (int8, or int4 in the head) in `model` (0: it was
    not applied); they are buffers, not among `model.parameters()`."""
    return sum(m.qweight.numel() if isinstance(m, Int8Linear) else m.in_features * m.out_features
               for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear)))

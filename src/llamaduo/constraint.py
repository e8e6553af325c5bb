"""What the decode loop needs from a constraint on the next token (grammar-constrained decoding).

A request with `response_format` `json_object` / `json_schema` or a forced tool call gets one
`TokenConstraint` per generated sequence (each of the K samples its own, made by the request's
`ConstraintFactory`); the decode loop calls `mask_logits` on that row's next-token logits before
sampling, then `accept` with the token it chose. The grammar engine behind it (xgrammar) lives in
`grammar.py`; the decode loop never knows which engine it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class TokenConstraint(Protocol):
    def mask_logits(self, logits: Any) -> None:
        """Set the logits of tokens not allowed next to -inf, in place (a 1-D tensor over the vocabulary)."""
        ...

    def accept(self, token_id: int) -> None:
        """Advance past the token the decoder chose (it was allowed)."""
        ...

    def is_finished(self) -> bool:
        """True once the structure is complete: the sequence must end here."""
        ...


ConstraintFactory = Callable[[], TokenConstraint]
"""Makes a fresh constraint for one sequence; compiled grammars are shared between them."""

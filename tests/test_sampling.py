"""`sampling`: each row's next token."""

from __future__ import annotations

import torch

from llamaduo.sampling import greedy


def test_greedy_takes_each_rows_first_highest_logit_as_argmax_does():
    torch.manual_seed(0)
    logits = torch.randint(0, 3, (16, 500)).to(torch.bfloat16)  # every row has many tied maxima
    logits[3, 7] = logits[3, 9] = 5
    picked = greedy(logits)
    assert torch.equal(picked, logits.argmax(dim=-1)) and picked[3] == 7
    assert all(logits[i, : picked[i]].max() < logits[i, picked[i]] for i in range(16) if picked[i] > 0)

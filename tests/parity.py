"""What every family's parity test checks against its transformers reference: the logits, and the
16-token greedy continuation through `Model.complete` (our prompt building, cache and stopping)."""

from __future__ import annotations

from typing import Any

import torch


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def assert_logits_match(logits: torch.Tensor, theirs: torch.Tensor, bound: float = 1e-4) -> None:
    """Same shape; relative error, and the largest element's error over the largest logit, within `bound`."""
    assert logits.shape == theirs.shape
    assert relative_error(logits, theirs) <= bound
    assert (logits - theirs).abs().max().item() / theirs.abs().max().item() <= bound


def assert_same_greedy(ours: Any, reference: Any, messages: Any, inputs: dict[str, Any], prompt_len: int,
                       tokens: int = 16) -> None:
    """Our greedy completion of `messages` equals transformers' `generate` on the processor's `inputs`,
    with our stop and suppressed tokens (so neither side stops or picks a media token early)."""
    completion = ours.complete(messages, max_new_tokens=tokens)
    with torch.no_grad():
        generated = reference.generate(
            **inputs, max_new_tokens=tokens, do_sample=False, eos_token_id=ours.tokenizer.eos_token_ids,
            suppress_tokens=ours.suppress_ids, pad_token_id=ours.tokenizer.pad_token_id)
    assert completion.token_ids == generated[0, prompt_len:].tolist()
    assert len(completion.token_ids) == tokens

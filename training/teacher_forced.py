"""Teacher-forced scoring of a split: validation in star-train, PPL in star-eval.

The gold strategy token is the decoder's second input (`__start__ [strategy] r_1 ...`), so

    loss_lm = sum NLL / tokens      over response tokens + eos (the strategy token not counted)
    PPL     = exp(loss_lm)
    loss_st = mean CE of the strategy logits at position 0 against the gold strategy
    strategy_accuracy = % of argmax strategy logits equal to gold (x100)
(the last two only for examples with a strategy: language-model examples score loss_lm and ppl)

Position 0 reads only `__start__` and the encoder, so its argmax is the strategy that decoding
would predict.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from star_training.data import Example, collate
from star_training.metrics import perplexity
from star_training.model import StarForConditionalGeneration


@torch.no_grad()
def teacher_forced_scores(
    model: StarForConditionalGeneration,
    examples: list[Example],
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    autocast: AbstractContextManager | None = None,
) -> dict[str, float]:
    """loss_lm, ppl, loss_st, strategy_accuracy, nll_sum, tokens and examples (eval mode)."""
    if not examples:
        raise ValueError("no examples to score")
    was_training = model.training
    model.eval()
    nll = st = 0.0
    tokens = correct = 0
    try:
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
            with autocast or nullcontext():
                out = model(**batch)
            nll += out.nll_sum.float().item()
            tokens += int(out.n_tokens)
            if out.loss_st is not None:
                st += out.loss_st.float().item() * batch["strategy"].numel()
                correct += int((out.strategy_logits.argmax(-1) == batch["strategy"]).sum())
    finally:
        model.train(was_training)
    scores = {"loss_lm": nll / tokens, "ppl": perplexity(nll, tokens)}
    if examples[0].strategy is not None:
        scores |= {"loss_st": st / len(examples), "strategy_accuracy": 100.0 * correct / len(examples)}
    return scores | {"nll_sum": nll, "tokens": tokens, "examples": len(examples)}

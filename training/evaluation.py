"""Evaluate a model on a split: strategy prediction, generation and PPL (SPEC section 3).

- PPL: teacher-forced, gold strategy fed (`teacher_forced.py`).
- Generation: strategy first, then the reply, with the paper's decoding settings and a fixed
  seed; the generation metrics use the PREDICTED strategy's replies. The oracle run feeds the
  gold strategy instead and is reported apart, never as the main result.
- References are the training labels decoded by the same tokenizer (response cut to max_target
  tokens, lower-cased, punctuation spaced), so hypothesis and reference share one normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from star_runtime.detok import readable
from star_runtime.sampling import DecodingOptions
from star_runtime.strategies import STRATEGIES
from star_runtime.tokenizer import Tokenizer
from star_training.data import Example, collate
from star_training.generate import generate
from star_training.metrics import generation_scores, strategy_scores
from star_training.model import StarForConditionalGeneration
from star_training.teacher_forced import teacher_forced_scores


@dataclass
class EvalResult:
    scores: dict[str, Any]  # "predicted" (and "oracle") generation scores, "teacher_forced", counts
    predictions: list[dict[str, Any]]  # one record per example
    oracle_predictions: list[dict[str, Any]] = field(default_factory=list)


def reference_text(example: Example, tok: Tokenizer) -> str:
    """The response as the model is trained to produce it: labels minus strategy token and eos."""
    return tok.decode([i for i in example.labels[1:] if i != tok.eos_id])


def _generate_all(
    model: StarForConditionalGeneration,
    examples: list[Example],
    tok: Tokenizer,
    *,
    options: DecodingOptions,
    batch_size: int,
    device: torch.device,
    seed: int,
    oracle: bool,
) -> tuple[list[int], list[str]]:
    """Predicted (or, for the oracle, gold) strategy ids and hypothesis texts, in example order.

    One generator seeded once: the same seed and batch size give the same replies."""
    generator = torch.Generator(device=device).manual_seed(seed)
    strategies: list[int] = []
    hypotheses: list[str] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = collate(chunk, tok.pad_id)
        result = generate(
            model, batch["input_ids"].to(device), batch["attention_mask"].to(device), options,
            generator=generator, forced_strategy=[e.strategy for e in chunk] if oracle else None,
        )
        strategies += result.strategy_id.tolist()
        hypotheses += [tok.decode(ids) for ids in result.responses]
    return strategies, hypotheses


def _records(examples: list[Example], tok: Tokenizer, strategies: Sequence[int | None], hypotheses: list[str],
             *, detokenize: bool = True) -> list[dict]:
    return [
        {
            "conversation": e.conversation, "turn": e.turn, "situation": e.situation, "context": list(e.context),
            "speakers": list(e.speakers),
            "gold_strategy": STRATEGIES[e.strategy], "predicted_strategy": None if s is None else STRATEGIES[s],
            "reference": reference_text(e, tok), "hypothesis": h,
            # the reply as a person would read it; the metrics score "hypothesis". An LLM's reply
            # is written text already, so it is kept as it came.
            "hypothesis_readable": readable(h) if detokenize else h,
        }
        for e, s, h in zip(examples, strategies, hypotheses)
    ]


def predict_strategies(
    model: StarForConditionalGeneration,
    tok: Tokenizer,
    examples: list[Example],
    *,
    batch_size: int = 32,
    device: torch.device = torch.device("cpu"),
) -> list[int]:
    """The model's strategy class id for each example, decoding no reply: the argmax at the first
    decoder position, the same strategy `evaluate` reports (it does not depend on sampling)."""
    model.to(device).eval()
    strategies: list[int] = []
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], tok.pad_id)
        result = generate(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                          do_sample=False, max_new_tokens=0)
        strategies += result.strategy_id.tolist()
    return strategies


def score_replies(
    examples: list[Example],
    tok: Tokenizer,
    strategies: Sequence[int | None],
    hypotheses: list[str],
    *,
    detokenize: bool = True,
) -> EvalResult:
    """Strategy accuracy / macro-F1 of `strategies` and the text metrics of `hypotheses` against
    the examples' references, with one prediction record per example.

    Whoever wrote the replies (STAR, an LLM) is scored by this one function. A strategy of None
    (a responder that named none) counts as wrong for accuracy and for its gold class's recall.
    detokenize: True for the tokenizer's text (records also carry it as a person reads it).
    """
    references = [reference_text(e, tok) for e in examples]
    gold = [e.strategy for e in examples]
    scores: dict[str, Any] = {
        "examples": len(examples),
        "predicted": {**strategy_scores(gold, [-1 if s is None else s for s in strategies]),
                      **generation_scores(hypotheses, references)},
    }
    return EvalResult(scores, _records(examples, tok, strategies, hypotheses, detokenize=detokenize))


def evaluate(
    model: StarForConditionalGeneration,
    tok: Tokenizer,
    examples: list[Example],
    *,
    options: DecodingOptions = DecodingOptions(),
    batch_size: int = 32,
    device: torch.device = torch.device("cpu"),
    seed: int = 42,
    oracle: bool = False,
) -> EvalResult:
    """Score `examples`: strategy accuracy / macro-F1 and text metrics from predicted strategies,
    PPL teacher-forced with the gold strategy, and optionally the oracle-strategy text metrics."""
    model.to(device).eval()
    common = dict(options=options, batch_size=batch_size, device=device, seed=seed)

    predicted, hypotheses = _generate_all(model, examples, tok, oracle=False, **common)
    result = score_replies(examples, tok, predicted, hypotheses)
    result.scores["teacher_forced"] = teacher_forced_scores(model, examples, pad_id=tok.pad_id,
                                                            batch_size=batch_size, device=device)
    if oracle:
        forced, oracle_hyps = _generate_all(model, examples, tok, oracle=True, **common)
        result.scores["oracle"] = generation_scores(oracle_hyps, [reference_text(e, tok) for e in examples])
        result.oracle_predictions = _records(examples, tok, forced, oracle_hyps)
    return result

"""Eager PyTorch decoding: strategy first, then the response (the baseline the benchmarks compare).

    e          = encoder(context)                                   once
    h_0        = decoder(__start__)                                  KV cache filled
    p_strategy = softmax(strategy_logits(h_0))                       [B, 8]; strategy = argmax (or forced)
    x_1        = the strategy's token
    for t = 1 .. max_new_tokens:
        h_t     = decoder(x_t)                  one position, KV cache
        h'_t    = STAR.step(h_t, state)         streaming pool over positions 0..t (0 included)
        x_{t+1} ~ warp(W_E h'_t + b)            sampled (or argmax), stops at __end__

`warp_logits` follows transformers' generate semantics in its order: repetition penalty over
all decoder tokens so far, then temperature, top-k and top-p (the last three only when
sampling). Strategy tokens, padding and `__start__` are banned inside a response.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from star_runtime.sampling import DecodingOptions
from star_training.model import StarForConditionalGeneration


@dataclass
class GenerationResult:
    strategy_id: torch.Tensor  # [B] class ids (predicted, or forced)
    strategy_probs: torch.Tensor  # [B, n_strategies] the model's softmax, also when forced
    responses: list[list[int]]  # token ids per sequence, without __end__


def warp_logits(
    scores: torch.Tensor,
    history: torch.Tensor,
    *,
    repetition_penalty: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """transformers' RepetitionPenalty, Temperature, TopK and TopP processors, in that order.

    scores [B, V] (banned tokens already -inf); history [B, t] the decoder tokens so far.
    A seen token's score s becomes s * penalty if s < 0 else s / penalty. top_k = 0 and
    top_p = 1 switch those filters off; at least one token always survives.
    """
    if repetition_penalty != 1.0:
        seen = scores.gather(1, history)  # [B, t]
        seen = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
        scores = scores.scatter(1, history, seen)
    if temperature != 1.0:
        scores = scores / temperature
    if top_k > 0:
        kth = scores.topk(min(top_k, scores.size(-1)), dim=-1).values[:, -1:]  # [B, 1]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1)  # ascending
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1 - top_p  # the low tail holding at most 1 - top_p of the mass
        drop_sorted[:, -1] = False  # keep the most likely token
        scores = scores.masked_fill(drop_sorted.scatter(1, order, drop_sorted), -float("inf"))
    return scores


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off while decoding; the caller's train/eval mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.inference_mode()
def generate(
    model: StarForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    options: DecodingOptions | None = None,
    *,
    min_new_tokens: int = 0,
    generator: torch.Generator | None = None,
    forced_strategy: int | Sequence[int] | torch.Tensor | None = None,
    stop_at_eos: bool = True,
    **overrides: Any,
) -> GenerationResult:
    """Predict a strategy and generate a response for each context in the batch.

    input_ids/attention_mask [B, S]: encoder input and its mask (1 = real token).
    options: the decoding options (default: the paper's, DecodingOptions()), with `overrides`
    (its fields: do_sample=False, max_new_tokens=12, ...) on top; greedy keeps the repetition
    penalty, not temperature, top-k, top-p. min_new_tokens: __end__ banned before that many
    tokens. generator: the source of randomness for sampling (fixed seed = same replies).
    forced_strategy: class id(s), one or one per sequence, fed instead of the predicted strategy.
    stop_at_eos: False bans __end__, so every reply has exactly max_new_tokens tokens (benchmarks).
    """
    o = (options or DecodingOptions()).but(**overrides)
    if not 0 <= min_new_tokens <= o.max_new_tokens:
        raise ValueError(f"need 0 <= min_new_tokens <= max_new_tokens, got {min_new_tokens} and {o.max_new_tokens}")
    with _eval_mode(model):
        cfg = model.config
        start, eos, pad = cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id
        B, device = input_ids.size(0), input_ids.device
        strategy_ids = model.strategy_ids  # [n_strategies] vocabulary ids

        # Step 0: __start__ -> h_0 -> strategy.
        e = model.encode(input_ids, attention_mask)  # [B, S, d]
        tokens = torch.full((B, 1), start, dtype=torch.long, device=device)  # decoder tokens so far [B, t]
        h, cache = model.decode(tokens, e, attention_mask)  # [B, 1, d]
        strategy_logits = model.strategy_logits(h[:, 0])  # [B, n_strategies]
        strategy_probs = strategy_logits.softmax(dim=-1)
        if forced_strategy is None:
            strategy = strategy_logits.argmax(dim=-1)
        else:
            strategy = torch.as_tensor(forced_strategy, dtype=torch.long, device=device).reshape(-1)
            if strategy.numel() not in (1, B) or strategy.min() < 0 or strategy.max() >= len(strategy_ids):
                raise ValueError(
                    f"forced_strategy must be class ids in 0..{len(strategy_ids) - 1}, one or one per sequence "
                    f"(batch of {B}), not {forced_strategy}"
                )
            strategy = strategy.expand(B).clone()
        _, state = model.fuse_step(h[:, 0], model.empty_star_state(B))  # the pool includes position 0

        banned = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=device)
        banned[strategy_ids] = True
        banned[[pad, start]] = True
        banned_with_eos = banned.clone()
        banned_with_eos[eos] = True

        next_token = strategy_ids[strategy]  # [B]
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        steps: list[torch.Tensor] = []  # sampled tokens, [B] each
        for t in range(o.max_new_tokens):
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            h, cache = model.decode(next_token[:, None], e, attention_mask, past_key_values=cache)  # [B, 1, d]
            fused, state = model.fuse_step(h[:, 0], state)  # [B, d]
            scores = model.lm_logits(fused)  # [B, V]
            ban = banned_with_eos if (t < min_new_tokens or not stop_at_eos) else banned
            scores = scores.masked_fill(ban, -float("inf"))
            if o.do_sample:
                scores = warp_logits(scores, tokens, repetition_penalty=o.repetition_penalty,
                                     temperature=o.temperature, top_k=o.top_k, top_p=o.top_p)
                next_token = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)[:, 0]
            else:
                next_token = warp_logits(scores, tokens, repetition_penalty=o.repetition_penalty).argmax(dim=-1)
            next_token = next_token.masked_fill(finished, pad)  # finished rows feed padding, cut below
            steps.append(next_token)
            finished |= next_token == eos
            if finished.all():
                break
        rows = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(B)]
        responses = [row[: row.index(eos)] if eos in row else row for row in rows]
        return GenerationResult(strategy, strategy_probs, responses)

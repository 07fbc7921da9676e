"""Eager generation (training/generate.py) on tiny random models."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from star_training.checkpoint import load_model, save_model
from star_training.config import StarConfig, base_config
from star_training.generate import generate, warp_logits
from star_training.model import StarForConditionalGeneration

V = 64  # pad 0, __start__ 1, __end__ 2, __unk__ 3, ordinary tokens 4..55, strategy tokens 56..63
STRATEGY_IDS = list(range(56, 64))
PAD, START, EOS = 0, 1, 2


def tiny_model(**star_options) -> StarForConditionalGeneration:
    star = StarConfig(strategy_token_ids=STRATEGY_IDS, **star_options)
    return StarForConditionalGeneration(base_config("tiny", V), star).eval()


def contexts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two encoder inputs [2, 9], the second padded on the right."""
    input_ids = torch.randint(4, 56, (2, 9))
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, 6:] = 0
    input_ids[attention_mask == 0] = PAD
    return input_ids, attention_mask


def naive_greedy(model, input_ids, attention_mask, *, max_new_tokens, penalty, forced=None) -> tuple[int, list[int]]:
    """One sequence, the whole decoder re-run for every token: no cache, no streaming state."""
    dec = [START]
    out = model(input_ids[None], attention_mask[None], torch.tensor([dec]))
    strategy = int(out.strategy_logits.argmax()) if forced is None else forced
    dec.append(STRATEGY_IDS[strategy])
    response = []
    for _ in range(max_new_tokens):
        scores = model(input_ids[None], attention_mask[None], torch.tensor([dec])).lm_logits[0, -1].clone()
        scores[[*STRATEGY_IDS, PAD, START]] = -float("inf")
        for tok in set(dec):
            scores[tok] = scores[tok] * penalty if scores[tok] < 0 else scores[tok] / penalty
        tok = int(scores.argmax())
        if tok == EOS:
            break
        response.append(tok)
        dec.append(tok)
    return strategy, response


@pytest.mark.parametrize("use_star", [True, False])
def test_greedy_batch_matches_a_naive_re_forward_loop(use_star: bool) -> None:
    model = tiny_model(use_star=use_star)
    input_ids, attention_mask = contexts()
    got = generate(model, input_ids, attention_mask, do_sample=False, max_new_tokens=12)
    with torch.no_grad():
        for i, n in enumerate([9, 6]):  # the naive loop sees each context unpadded
            strategy, response = naive_greedy(model, input_ids[i, :n], attention_mask[i, :n], max_new_tokens=12,
                                              penalty=1.03)
            assert got.strategy_id[i] == strategy
            assert got.responses[i] == response


def test_forced_strategy_is_fed_and_reported() -> None:
    model = tiny_model()
    input_ids, attention_mask = contexts()
    free = generate(model, input_ids, attention_mask, do_sample=False, max_new_tokens=8)
    forced = [(int(s) + 3) % 8 for s in free.strategy_id]
    got = generate(model, input_ids, attention_mask, do_sample=False, max_new_tokens=8, forced_strategy=forced)
    assert got.strategy_id.tolist() == forced
    assert torch.equal(got.strategy_probs, free.strategy_probs)  # still the model's own distribution
    with torch.no_grad():
        _, response = naive_greedy(model, input_ids[0], attention_mask[0], max_new_tokens=8, penalty=1.03,
                                   forced=forced[0])
    assert got.responses[0] == response
    with pytest.raises(ValueError, match="class ids in 0..7"):
        generate(model, input_ids, attention_mask, forced_strategy=8)


def test_banned_tokens_never_appear_even_when_most_likely() -> None:
    model = tiny_model()
    with torch.no_grad():
        model.base.final_logits_bias[0, [*STRATEGY_IDS, PAD, START]] = 20.0  # they would win every step
    input_ids, attention_mask = contexts()
    got = generate(model, input_ids, attention_mask, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=30,
                   stop_at_eos=False, generator=torch.Generator().manual_seed(0))
    tokens = {t for r in got.responses for t in r}
    assert len(tokens) > 5 and not tokens & {*STRATEGY_IDS, PAD, START}


def test_max_new_tokens_min_new_tokens_and_stop_at_eos() -> None:
    model = tiny_model()
    input_ids, attention_mask = contexts()
    fixed = generate(model, input_ids, attention_mask, max_new_tokens=7, stop_at_eos=False)
    assert [len(r) for r in fixed.responses] == [7, 7]
    with torch.no_grad():
        model.base.final_logits_bias[0, EOS] = 20.0  # __end__ wins as soon as it is allowed
    short = generate(model, input_ids, attention_mask, max_new_tokens=7, min_new_tokens=3)
    assert [len(r) for r in short.responses] == [3, 3] and not {EOS} & {t for r in short.responses for t in r}
    long = generate(model, input_ids, attention_mask, max_new_tokens=7, stop_at_eos=False)
    assert [len(r) for r in long.responses] == [7, 7] and EOS not in long.responses[0]
    assert generate(model, input_ids, attention_mask, max_new_tokens=0).responses == [[], []]


def test_warp_logits_matches_transformers_processors() -> None:
    scores = torch.randn(3, V) * 3
    history = torch.randint(0, V, (3, 6))
    expected = scores
    for proc in (RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7), TopKLogitsWarper(30),
                 TopPLogitsWarper(0.3)):
        expected = proc(history, expected)
    got = warp_logits(scores, history, repetition_penalty=1.3, temperature=0.7, top_k=30, top_p=0.3)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.allclose(got[~torch.isinf(got)], expected[~torch.isinf(expected)])
    assert (~torch.isinf(got)).sum(-1).max() < 30  # top-p did cut below top-k


def test_sampling_is_reproducible_across_save_and_load(tmp_path) -> None:
    model = tiny_model()
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    input_ids, attention_mask = contexts()

    def sample(m, seed):
        return generate(m, input_ids, attention_mask, temperature=1.5, top_p=0.95,
                        generator=torch.Generator().manual_seed(seed)).responses

    assert sample(model, 1) == sample(loaded, 1)
    assert sample(model, 1) != sample(model, 2)  # the seed matters, so the equality above means something


def test_generate_restores_training_mode_and_rejects_bad_options() -> None:
    model = tiny_model().train()
    input_ids, attention_mask = contexts()
    generate(model, input_ids, attention_mask, max_new_tokens=2)
    assert model.training
    for bad, message in [(dict(temperature=0), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-1), "top_k"),
                         (dict(min_new_tokens=5, max_new_tokens=3), "min_new_tokens")]:
        with pytest.raises(ValueError, match=message):
            generate(model, input_ids, attention_mask, **bad)

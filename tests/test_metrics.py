"""SPEC section 3 metrics against values worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest

from star_training.metrics import (
    bleu,
    distinct,
    generation_scores,
    lcs_length,
    perplexity,
    rouge_l,
    strategy_scores,
    word_tokens,
)

E = math.exp


def test_strategy_accuracy_and_macro_f1_count_never_predicted_classes_as_zero() -> None:
    # gold 0 0 1 2, predicted 0 1 1 1: 2 of 4 right.
    # class 0: P 1/1, R 1/2 -> F1 2/3;  class 1: P 1/3, R 1/1 -> F1 1/2;
    # class 2 (never predicted): 0;  classes 3..7 (absent): 0.  Macro over 8 = (2/3 + 1/2) / 8.
    s = strategy_scores([0, 0, 1, 2], [0, 1, 1, 1])
    assert s["accuracy"] == pytest.approx(50.0)
    assert s["macro_f1"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 8)


def test_strategy_scores_all_right() -> None:
    s = strategy_scores(list(range(8)), list(range(8)))
    assert s == {"accuracy": pytest.approx(100.0), "macro_f1": pytest.approx(100.0)}


def test_perplexity() -> None:
    assert perplexity(4 * math.log(2), 2) == pytest.approx(4.0)  # exp(2 ln 2)


def test_tags_are_stripped_and_tokens_lower_cased() -> None:
    assert word_tokens("[Question] How ARE you? [others]") == ["how", "are", "you", "?"]
    assert word_tokens("") == []


def test_bleu_short_hypothesis_with_brevity_penalty_and_method3() -> None:
    # hyp "the cat", ref "the cat sat": BP = exp(1 - 3/2); p1 = 2/2, p2 = 1/1;
    # p3 = 0/1 and p4 = 0/1 become 1/2 and 1/4 under method3 (1 / (2^k * denominator)).
    s = bleu([["the", "cat"]], [["the", "cat", "sat"]])
    bp = E(-0.5)
    assert s["bleu_1"] == pytest.approx(100 * bp)
    assert s["bleu_2"] == pytest.approx(100 * bp)
    assert s["bleu_3"] == pytest.approx(100 * bp * 0.5 ** (1 / 3))
    assert s["bleu_4"] == pytest.approx(100 * bp * (0.5 * 0.25) ** (1 / 4))


def test_bleu_empty_hypothesis_counts_one_in_each_denominator() -> None:
    # NLTK's modified_precision gives an empty hypothesis 0 / max(1, 0) = 0/1 for every n.
    # hyp1 = ref1 = "the cat sat" (3 tokens), hyp2 = "" vs ref2 "a dog": BP = exp(1 - 5/3);
    # p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0/2 -> 1/(2 * 2) = 1/4.
    s = bleu([["the", "cat", "sat"], []], [["the", "cat", "sat"], ["a", "dog"]])
    bp = E(1 - 5 / 3)
    assert s["bleu_1"] == pytest.approx(100 * bp * 3 / 4)
    assert s["bleu_2"] == pytest.approx(100 * bp * (3 / 4 * 2 / 3) ** (1 / 2))
    assert s["bleu_3"] == pytest.approx(100 * bp * (3 / 4 * 2 / 3 * 1 / 2) ** (1 / 3))
    assert s["bleu_4"] == pytest.approx(100 * bp * 0.5)  # (1/16)^(1/4)


def test_bleu_no_match_is_zero() -> None:
    assert bleu([[]], [["a"]]) == {f"bleu_{n}": 0.0 for n in (1, 2, 3, 4)}


def test_lcs_and_rouge_l() -> None:
    assert lcs_length("abcbdab", "bdcaba") == 4  # the textbook pair (CLRS 15.4)
    # LCS 3 of 3 hyp / 4 ref tokens: P = 1, R = 3/4, F = 2.44 * 0.75 / (0.75 + 1.44).
    assert rouge_l(["the", "cat", "sat"], ["the", "cat", "sat", "down"]) == pytest.approx(2.44 * 0.75 / 2.19)
    assert rouge_l([], ["a"]) == 0.0
    assert rouge_l(["b"], ["a"]) == 0.0


def test_distinct() -> None:
    hyps = [["a", "b", "a"], [], ["a"]]
    assert distinct(hyps, 1) == pytest.approx(50.0)  # {a, b} of a b a a
    assert distinct(hyps, 2) == pytest.approx(100.0)  # (a b), (b a)
    assert distinct([[], []], 1) == 0.0


def test_generation_scores_end_to_end() -> None:
    # hyp tokens [the, cat] and [] vs refs [the, cat, sat] and [a, dog]: BP = exp(1 - 5/2);
    # p1 = 2/3, p2 = 1/2, p3 = 0/2 -> 1/4, p4 = 0/2 -> 1/8.
    s = generation_scores(["[Question] The cat", ""], ["the cat sat", "a dog"])
    bp = E(-1.5)
    assert s["bleu_1"] == pytest.approx(100 * bp * 2 / 3)
    assert s["bleu_2"] == pytest.approx(100 * bp * (1 / 3) ** 0.5)
    assert s["bleu_4"] == pytest.approx(100 * bp * (2 / 3 * 1 / 2 * 1 / 4 * 1 / 8) ** 0.25)
    # ROUGE-L: (P 1, R 2/3 -> 2.44 (2/3) / (2/3 + 1.44)) and 0 for the empty hypothesis, averaged.
    assert s["rouge_l"] == pytest.approx(100 * (2.44 * (2 / 3) / (2 / 3 + 1.44)) / 2)
    assert s["distinct_1"] == pytest.approx(100.0)
    assert s["distinct_2"] == pytest.approx(100.0)


@pytest.mark.parametrize(
    "call",
    [
        lambda: strategy_scores([], []),
        lambda: generation_scores([], []),
        lambda: perplexity(0.0, 0),
        lambda: strategy_scores([0], [0, 1]),
        lambda: generation_scores(["a"], []),
    ],
    ids=["strategies", "generation", "ppl", "strategy-lengths", "generation-lengths"],
)
def test_empty_or_mismatched_corpus_is_an_error(call) -> None:
    with pytest.raises(ValueError):
        call()

"""Evaluation metrics of SPEC section 3, so our numbers compare with the paper's Table 2.

All scores but PPL are reported x100.

    accuracy  = mean_i [pred_i == gold_i]                                   over the 8 classes
    macro-F1  = mean_c F1_c,  F1_c = 2 P_c R_c / (P_c + R_c)                sklearn, labels 0..7;
                a class with no true and no predicted example scores 0 (zero_division=0)
    PPL       = exp(sum NLL / number of tokens)                             response tokens + eos
    BLEU-n    = BP * exp(sum_{k<=n} (1/n) log p_k)                          NLTK corpus_bleu,
                cumulative uniform weights, one reference, SmoothingFunction().method3
    ROUGE-L   = mean_i (1 + b^2) P R / (R + b^2 P),  P = LCS/|hyp|, R = LCS/|ref|,  b = 1.2
    Distinct-n = |unique n-grams| / |n-grams|                               over all hypotheses

Text metrics read lower-cased Treebank word tokens (NLTK's TreebankWordTokenizer needs no
downloaded data, unlike `word_tokenize`), after removing strategy tags such as `[Question]`.
Generation metrics are computed from the PREDICTED strategy's replies; which strategy was fed is
the caller's business (star-eval).

Corner cases, our decisions: an empty hypothesis scores ROUGE-L 0 and adds no n-grams; an
empty corpus or zero PPL tokens is a ValueError (a score of nothing is a caller bug, not 0).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from nltk.tokenize import TreebankWordTokenizer
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu
from sklearn.metrics import f1_score

from star_runtime.strategies import STRATEGIES

N_STRATEGIES = len(STRATEGIES)
ROUGE_BETA = 1.2  # the coco-caption / nlg-eval value that ESC papers report with
_TAG = re.compile("|".join(re.escape(s) for s in STRATEGIES), re.IGNORECASE)
_TOKENIZER = TreebankWordTokenizer()


def strip_strategy_tags(text: str) -> str:
    """Remove every strategy tag (e.g. `[Question]`) and squeeze the spaces left behind."""
    return " ".join(_TAG.sub(" ", text).split())


def word_tokens(text: str) -> list[str]:
    """Lower-cased Treebank word tokens of `text` with strategy tags removed."""
    return _TOKENIZER.tokenize(strip_strategy_tags(text).lower())


def _require_nonempty(n: int, what: str) -> None:
    if n == 0:
        raise ValueError(f"cannot score an empty set of {what}")


def strategy_scores(gold: Sequence[int], predicted: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro-F1 (x100) of predicted strategy class ids 0..7 against gold ones.

    A predicted id outside 0..7 (-1: the responder named no strategy) is a miss for its gold
    class and a false positive for none."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold strategies but {len(predicted)} predictions")
    _require_nonempty(len(gold), "strategies")
    correct = sum(g == p for g, p in zip(gold, predicted))
    f1 = f1_score(gold, predicted, labels=list(range(N_STRATEGIES)), average="macro", zero_division=0)
    return {"accuracy": 100.0 * correct / len(gold), "macro_f1": 100.0 * float(f1)}


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(sum NLL / tokens): the corpus perplexity (not x100)."""
    _require_nonempty(n_tokens, "tokens for perplexity")
    return math.exp(nll_sum / n_tokens)


def bleu(hyp_tokens: Sequence[list[str]], ref_tokens: Sequence[list[str]]) -> dict[str, float]:
    """Cumulative corpus BLEU-1..4 (x100), one reference per hypothesis, smoothing method3."""
    weights = [tuple([1.0 / n] * n) for n in (1, 2, 3, 4)]
    scores = corpus_bleu(
        [[r] for r in ref_tokens], list(hyp_tokens), weights=weights,
        smoothing_function=SmoothingFunction().method3,
    )
    return {f"bleu_{n}": 100.0 * float(s) for n, s in zip((1, 2, 3, 4), scores)}


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, O(|a| |b|) with one row of memory."""
    row = [0] * (len(b) + 1)
    for x in a:
        diag = 0  # row[j-1] of the previous line
        for j, y in enumerate(b, start=1):
            diag, row[j] = row[j], diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(hyp: Sequence[str], ref: Sequence[str], beta: float = ROUGE_BETA) -> float:
    """Sentence-level ROUGE-L F-score in [0, 1]; 0 when either side is empty or nothing matches."""
    lcs = lcs_length(hyp, ref)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(hyp), lcs / len(ref)
    return (1 + beta**2) * p * r / (r + beta**2 * p)


def distinct(hyp_tokens: Sequence[list[str]], n: int) -> float:
    """Unique n-grams / all n-grams over every hypothesis (x100); 0 when there is no n-gram."""
    grams = [tuple(t[i : i + n]) for t in hyp_tokens for i in range(len(t) - n + 1)]
    return 100.0 * len(set(grams)) / len(grams) if grams else 0.0


def generation_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and Distinct-1/2 (x100) of hypothesis texts against reference texts."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    _require_nonempty(len(hypotheses), "hypotheses")
    hyps = [word_tokens(h) for h in hypotheses]
    refs = [word_tokens(r) for r in references]
    scores = bleu(hyps, refs)
    scores["rouge_l"] = 100.0 * sum(rouge_l(h, r) for h, r in zip(hyps, refs)) / len(hyps)
    scores["distinct_1"] = distinct(hyps, 1)
    scores["distinct_2"] = distinct(hyps, 2)
    return scores

"""The 8 ESConv support strategies, in class-id order (SPEC section 2).

Class id k is `STRATEGIES[k]`, the special token the decoder emits first (token id
`Tokenizer.strategy_ids[k]`, 54944 + k on the real vocabulary). The data files name a strategy
without brackets (`STRATEGY_NAMES[k]`); the order is that of thu-coai's `strategy.json`.
"""

from __future__ import annotations

STRATEGY_NAMES: tuple[str, ...] = (
    "Question",
    "Restatement or Paraphrasing",
    "Reflection of feelings",
    "Self-disclosure",
    "Affirmation and Reassurance",
    "Providing Suggestions",
    "Information",
    "Others",
)

STRATEGIES: tuple[str, ...] = tuple(f"[{name}]" for name in STRATEGY_NAMES)

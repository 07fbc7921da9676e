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

# What each strategy means, in class-id order: our wording of the definitions in the ESConv paper
# (Liu et al., ACL 2021, "Towards Emotional Support Dialog Systems"). An LLM that is told to use a
# strategy (star-eval --responder openai) is told this, so it reads the label as ESConv means it.
STRATEGY_DESCRIPTIONS: tuple[str, ...] = (
    "Ask for information about the problem, to help the help-seeker put into words what they face; "
    "open questions work best, closed ones can get specific details.",
    "Restate what the help-seeker said, more simply and concisely, so they can see their situation "
    "more clearly.",
    "Put into words the feelings the help-seeker has expressed.",
    "Share a similar experience you have had, or an emotion you share with the help-seeker, to "
    "show empathy.",
    "Affirm the help-seeker's strengths, motivation and abilities, and reassure and encourage them.",
    "Suggest ways to change, without overstepping or telling them what they must do.",
    "Give useful information, such as facts, data, opinions or resources, or answer their "
    "questions.",
    "Exchange pleasantries, or use a way of support that falls under none of the other strategies.",
)

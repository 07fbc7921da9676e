"""A conversation rebuilt from its saved history: the same context, the same replies, the same safety.

`Conversation.history()` and `Runtime.conversation(history=...)` (star_runtime.conversation,
"History") are what a caller that keeps no conversation object uses: star-serve for every
request, an app whose process was killed. On the shipped default bundle, greedy decoding.
"""

from __future__ import annotations

import pytest

from star_runtime.sampling import DecodingOptions

TURNS = ["I lost my job and I can't sleep.", "My wife says I am lazy.", "I don't know what to do anymore."]


def _live(rt, turns=TURNS, situation="I lost my job last month."):
    conv = rt.conversation(situation=situation, do_sample=False)
    for text in turns:
        conv.reply(text)
    return conv


def _plain(history):
    """The history as an OpenAI client keeps it: role and content only."""
    return [{"role": m["role"], "content": m["content"]} for m in history]


@pytest.mark.parametrize("keep_strategy", [True, False])
def test_a_rebuilt_conversation_reads_the_same_context_and_replies_the_same(shipped_rt, keep_strategy):
    live = _live(shipped_rt)
    saved = live.history()
    assert [m["role"] for m in saved] == ["user", "assistant"] * 3
    assert [m["content"] for m in saved[::2]] == TURNS and all(m["strategy"] for m in saved[1::2])
    given = saved if keep_strategy else _plain(saved)
    rebuilt = shipped_rt.conversation(situation=live.situation, do_sample=False, history=given)
    # Without the strategies they are predicted, and the prediction is the strategy the live
    # conversation chose (argmax on the same context), so the contexts are equal token for token.
    assert rebuilt.context_ids() == live.context_ids()
    assert rebuilt.history() == saved
    nxt = "Maybe I should look for a new job."
    a, b = live.reply(nxt), rebuilt.reply(nxt)
    assert (a.text, a.strategy, a.tokens) == (b.text, b.strategy, b.tokens)
    assert a.strategy_probs == pytest.approx(b.strategy_probs, abs=1e-9)
    assert rebuilt.history() == live.history()


def test_a_crisis_reply_in_the_history_is_left_out_of_the_context_and_keeps_the_crisis(shipped_rt):
    live = _live(shipped_rt, ["I feel so alone.", "I want to kill myself.", "I just need someone to talk to."])
    saved = live.history()
    assert saved[3] == {"role": "assistant", "content": shipped_rt.safety.crisis_reply("suicide_self_harm"),
                        "strategy": None}
    rebuilt = shipped_rt.conversation(situation=live.situation, do_sample=False, history=_plain(saved))
    assert rebuilt.context_ids() == live.context_ids()  # the crisis reply's text is in neither
    assert rebuilt.crisis_category == live.crisis_category == "suicide_self_harm"  # screened as a crisis
    after = rebuilt.reply("Thank you for listening.")
    assert not after.escalated  # it was answered: it is not given again at every turn


def test_an_unanswered_crisis_anywhere_in_the_history_is_given_its_crisis_reply(shipped_rt):
    policy = shipped_rt.safety
    history = [{"role": "user", "content": "I took a whole bottle of pills an hour ago"},
               {"role": "assistant", "content": "That sounds hard. How are you feeling?"},
               {"role": "user", "content": "I'm tired."},
               {"role": "assistant", "content": "I understand."}]
    conv = shipped_rt.conversation(do_sample=False, history=history)
    assert conv.crisis_category == "medical_emergency"
    probe = conv.strategy("ok")
    assert probe.escalated and probe.strategy is None and probe.escalation.trigger == "history"
    reply = conv.reply("ok")
    assert reply.escalated and (reply.escalation.trigger, reply.escalation.category) == ("history", "medical_emergency")
    assert reply.text == policy.crisis_reply("medical_emergency")
    assert not conv.reply("thanks").escalated  # given once, as a situation's crisis reply is
    # A later crisis reply of another category does not answer it; one of its own does.
    other = [*history, {"role": "user", "content": "my husband hits me"},
             {"role": "assistant", "content": policy.crisis_reply("abuse_safeguarding")}]
    assert shipped_rt.conversation(history=other).reply("ok").escalation.category == "medical_emergency"
    own = [*history, {"role": "assistant", "content": policy.crisis_reply("medical_emergency")}]
    assert not shipped_rt.conversation(do_sample=False, history=own).reply("ok").escalated


def test_of_several_crises_the_body_in_danger_comes_first(shipped_rt):
    overdose = [{"role": "user", "content": "I took all my pills"}, {"role": "assistant", "content": "Oh no."}]
    reply = shipped_rt.conversation(history=overdose).reply("I want to kill myself")
    assert (reply.escalation.trigger, reply.escalation.category) == ("history", "medical_emergency")
    abuse = [{"role": "user", "content": "my husband hits me"}, {"role": "assistant", "content": "I see."}]
    reply = shipped_rt.conversation(history=abuse).reply("I want to kill myself")
    assert (reply.escalation.trigger, reply.escalation.category) == ("user_message", "suicide_self_harm")
    # A live conversation whose situation is a crisis follows the same order.
    reply = shipped_rt.conversation(situation="I took a whole bottle of pills").reply("I want to die")
    assert (reply.escalation.trigger, reply.escalation.category) == ("situation", "medical_emergency")


def test_a_situation_in_crisis_is_answered_once_in_a_history_too(shipped_rt):
    situation = "I am going to kill myself tonight"
    live = shipped_rt.conversation(situation=situation, do_sample=False)
    first = live.reply("hello")
    assert first.escalation.trigger == "situation"
    live.reply("I just feel empty.")
    rebuilt = shipped_rt.conversation(situation=situation, do_sample=False, history=_plain(live.history()))
    assert rebuilt.context_ids() == live.context_ids() and rebuilt.crisis_category == "suicide_self_harm"
    assert not rebuilt.reply("ok").escalated
    unanswered = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi, how are you?"}]
    again = shipped_rt.conversation(situation=situation, history=unanswered).reply("ok")
    assert again.escalated and again.escalation.trigger == "situation"


def test_strategy_predicts_what_reply_would_choose_and_changes_nothing(shipped_rt):
    conv = shipped_rt.conversation(situation="I lost my job.", do_sample=False, history=_plain(_live(shipped_rt).history()))
    before = (conv.context_ids(), conv.history())
    probe = conv.strategy("Maybe I should look for a new job.")
    assert probe.text == "" and not probe.escalated and probe.tokens == ()
    assert sum(probe.strategy_probs.values()) == pytest.approx(1)
    assert (conv.context_ids(), conv.history()) == before
    reply = conv.reply("Maybe I should look for a new job.")
    assert reply.strategy == probe.strategy and reply.strategy_probs == pytest.approx(probe.strategy_probs, abs=1e-9)
    crisis = conv.strategy("I want to end my life")
    assert crisis.escalated and crisis.strategy is None and crisis.escalation.trigger == "user_message"


def test_an_opening_assistant_message_with_nothing_before_it_has_no_strategy_token(shipped_rt):
    tok, eos = shipped_rt.tokenizer, shipped_rt.manifest["special_ids"]["eos"]
    conv = shipped_rt.conversation(history=[{"role": "assistant", "content": "Hello, how are you today?"},
                                            {"role": "user", "content": "Not great."}])
    assert conv.context_ids() == [*tok.encode("Hello, how are you today?"), eos, *tok.encode("Not great.")]
    assert conv.history()[0]["strategy"] is None


@pytest.mark.parametrize("history, error, match", [
    ("hello", TypeError, "history must be a list of messages, not str"),
    ([("user", "hi")], TypeError, r"history\[0\] must be a mapping"),
    ([{"role": "system", "content": "hi"}], ValueError, r"history\[0\]: role must be one of user, assistant"),
    ([{"role": "user", "content": 3}], TypeError, r"history\[0\]: content must be text, not int"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], ValueError,
     r"history\[1\]: empty message"),
    ([{"role": "user", "content": "ab" + "\ufffd" * 4}], ValueError, r"history\[0\]: binary data"),
    ([{"role": "assistant", "content": "hi", "strategy": "Hugging"}], ValueError, r"history\[0\]: strategy must be"),
    ([{"role": "user", "content": "hi", "strategy": "Question"}], ValueError, r"history\[0\]: strategy must be"),
])
def test_a_history_that_cannot_be_used_is_refused_naming_the_message(shipped_rt, history, error, match):
    with pytest.raises(error, match=match):
        shipped_rt.conversation(history=history)


def test_decoding_options_come_as_one_object(shipped_rt):
    options = shipped_rt.options(temperature=0.9, top_p=0.5)
    assert shipped_rt.conversation(options=options).params == options
    assert shipped_rt.conversation(options=options, do_sample=False).params == options.greedy()
    assert shipped_rt.options() == DecodingOptions()  # the exporter wrote DecodingOptions' defaults

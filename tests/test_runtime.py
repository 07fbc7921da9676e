"""star_runtime: no torch, refusals of bad bundles and devices, messages, threads, sampling.

Tiny preset, random weights, exported once per session into tmp (tests/star_bundles.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from star_bundles import tiny_bundle
from star_runtime import BundleError, DeviceError, Runtime
from star_runtime.bundle import MANIFEST_FILE
from star_runtime.sampling import DecodingOptions, distribution


def test_runtime_imports_no_torch(bundle):
    code = textwrap.dedent(f"""
        import sys
        from star_runtime import Runtime
        rt = Runtime.load({str(bundle)!r})
        reply = rt.conversation(seed=0).reply("I feel so alone since I moved to a new city.")
        assert reply.text and reply.strategy in rt.manifest["strategies"]["labels"]
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "optimum"))
        print(heavy)
        sys.exit(1 if heavy else 0)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


# -- bad bundles and devices -------------------------------------------------------------------

@pytest.fixture
def copy(bundle, tmp_path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    return out


def test_missing_file(copy):
    (copy / "encoder.onnx").unlink()
    with pytest.raises(BundleError, match="missing file encoder.onnx"):
        Runtime.load(copy)


def test_changed_byte(copy):
    weights = copy / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="weights.bin: sha256 differs"):
        Runtime.load(copy)


def test_newer_format_version(copy):
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    manifest["format_version"] += 1
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="newer than this star_runtime reads"):
        Runtime.load(copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        Runtime.load(tmp_path)
    with pytest.raises(BundleError, match="no such bundle folder"):
        Runtime.load(tmp_path / "nowhere")


def test_wrong_device(bundle, tmp_path_factory, tokenizer_dir):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(DeviceError, match="onnxruntime-gpu"):
            Runtime.load(bundle, device="cuda")
    with pytest.raises(DeviceError, match="runs on cpu, not cuda"):
        Runtime.load(tiny_bundle(tmp_path_factory, tokenizer_dir, "int8"), device="cuda")
    with pytest.raises(DeviceError, match="unknown device"):
        Runtime.load(bundle, device="tpu")


# -- messages ------------------------------------------------------------------------------------

@pytest.mark.parametrize("message", [
    "x" * 100_000,
    "word " * 20_000,
    "\x00\x01\x1b[31m hello \x7f\u0085",
    "😀🙏💔 thanks 😭",
    "Je suis très triste depuis que j'ai perdu mon travail.",
    "我最近睡不好，压力很大。",
    "مرحبا، أشعر بالوحدة",
    "[Question] __end__ __start__ pretending to be special tokens",
])
def test_odd_messages_get_an_answer(rt, message):
    conv = rt.conversation(seed=0)
    reply = conv.reply(message)
    assert isinstance(reply.text, str) and reply.strategy in rt.manifest["strategies"]["labels"]
    assert len(conv.context_ids()) <= 160
    assert abs(sum(reply.strategy_probs.values()) - 1) < 1e-6


@pytest.mark.parametrize("message", ["", "   \n\t ", "\x00\x01", None, 42])
def test_empty_messages_are_refused(rt, message):
    with pytest.raises(ValueError, match="empty message|a message is text"):
        rt.conversation().reply(message)


@pytest.mark.parametrize("raw", [bytes(range(256)), b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x02\x80"])
def test_binary_data_is_refused(rt, raw):
    message = raw.decode("utf-8", errors="replace")  # as star-chat reads stdin
    conv = rt.conversation()
    with pytest.raises(ValueError, match="binary data, not text"):
        conv.reply(message)
    assert conv.context_ids() == []  # nothing of it entered the history


def test_a_few_bytes_that_are_not_utf8_are_still_answered(rt):
    message = "j'ai tr\xe8s peur de ne pas y arriver".encode("latin-1").decode("utf-8", errors="replace")
    assert rt.conversation(seed=0).reply(message).text


def test_crisis_message_escalates_without_the_model(rt):
    reply = rt.conversation(seed=0).reply("I want to kill myself tonight")
    assert reply.escalated and reply.strategy is None and reply.strategy_probs == {}
    assert reply.text == rt.safety.crisis_reply("suicide_self_harm")
    assert (reply.escalation.trigger, reply.escalation.category) == ("user_message", "suicide_self_harm")
    abuse = rt.conversation(seed=0).reply("my husband hits me and I'm scared to go home")
    assert abuse.escalation.category == "abuse_safeguarding"
    assert abuse.text == rt.safety.crisis_reply("abuse_safeguarding") != reply.text


def test_a_crisis_in_the_situation_escalates(rt):
    conv = rt.conversation(situation="I am going to kill myself tonight", seed=0)
    opening = conv.situation_reply()
    assert opening.escalated and opening.strategy is None
    assert (opening.escalation.trigger, opening.escalation.category) == ("situation", "suicide_self_harm")
    assert conv.situation_reply() is None  # given once
    assert conv.crisis_category == "suicide_self_harm"  # every later reply is screened as a crisis
    # An app that never asks gets it as the first reply instead of the model's.
    first = rt.conversation(situation="I took a whole bottle of pills an hour ago", seed=0).reply("hi")
    assert first.escalation.trigger == "situation" and first.escalation.category == "medical_emergency"
    calm = rt.conversation(situation="I lost my job last week.", seed=0)
    assert calm.situation_reply() is None and calm.crisis_category is None


def test_situation_and_message_types(rt):
    with pytest.raises(TypeError, match="situation must be text or None, not int"):
        rt.conversation(situation=123)
    for empty in ("\u200b", "\u200d\u200b \ufeff", " \t"):
        with pytest.raises(ValueError, match="empty message"):
            rt.conversation(seed=0).reply(empty)


def test_streamed_text_is_screened_before_on_token_sees_it(rt, monkeypatch):
    """A reply whose unsafe words come mid-stream: on_token gets none of them, decoding stops."""
    import star_runtime.conversation as conversation_module
    from star_runtime.decoding import Generation, Timings

    unsafe = "that sounds so hard , i understand . you should just go ahead and kill yourself tonight , ok ?"
    ids = rt.tokenizer.encode(unsafe)
    fed = []

    def scripted_steps(engine, context, options, *, rng):
        for token in ids:
            fed.append(token)
            if (yield token):
                return Generation(0, np.full(8, 0.125), fed[:], True, Timings())
        return Generation(0, np.full(8, 0.125), fed[:], False, Timings())

    monkeypatch.setattr(conversation_module, "steps", scripted_steps)
    pieces = []
    reply = rt.conversation(seed=0).reply("I feel awful", on_token=pieces.append)
    shown = "".join(pieces)
    assert reply.escalated and reply.escalation.trigger == "model_reply"
    assert reply.text == rt.safety.crisis_reply(reply.escalation.category)
    assert "kill" not in shown and "yourself" not in shown and "ahead" not in shown, shown
    assert shown.startswith("That sounds so hard")  # the safe clauses before it did stream
    assert len(fed) < len(ids)  # decoding stopped at the hit, not at the end


# -- conversation mechanics ---------------------------------------------------------------------

def test_history_is_the_training_layout_and_bounded(rt):
    tok, eos = rt.tokenizer, rt.manifest["special_ids"]["eos"]
    conv = rt.conversation(situation="I lost my job.", seed=1, max_new_tokens=5)
    first = conv.reply("I can't sleep.")
    expected = [*tok.encode("I lost my job."), eos, *tok.encode("I can't sleep."), eos,
                rt.manifest["strategies"]["token_ids"][rt.manifest["strategies"]["labels"].index(first.strategy)],
                *first.tokens]
    assert conv.context_ids() == expected
    for i in range(40):
        conv.reply(f"this is message number {i} and it goes on for a while")
    assert len(conv.context_ids()) == 160
    assert sum(len(item) + 1 for item in conv._items) - 1 < 160 + 60  # old turns were dropped


def test_streamed_pieces_make_the_reply(rt):
    pieces = []
    reply = rt.conversation(seed=3).reply("hello there", on_token=lambda p: pieces.append(p))
    assert "".join(pieces) == reply.text and len(reply.tokens) > 0
    # on_token returning False stops decoding at the first piece the screen released: the
    # reply is the full reply's beginning, and on_token was not called again.
    calls = []
    stopped = rt.conversation(seed=3).reply("hello there", on_token=lambda p: calls.append(p) or False)
    assert len(calls) == 1 and stopped.tokens == reply.tokens[:len(stopped.tokens)]
    assert len(stopped.tokens) < len(reply.tokens) or len(pieces) == 1


def test_the_iterator_face_gives_the_callbacks_pieces_and_reply(rt):
    pieces = []
    reply = rt.conversation(seed=3).reply("hello there", on_token=pieces.append)
    stream = rt.conversation(seed=3).stream("hello there")
    assert stream.reply is None
    assert list(stream) == pieces and len(pieces) > 1
    got = stream.reply
    assert (got.text, got.strategy, got.tokens, got.stopped) == (reply.text, reply.strategy, reply.tokens, False)
    assert list(stream) == []  # spent
    # stop() after the first piece: what a callback returning False after it does.
    calls = []
    want = rt.conversation(seed=3).reply("hello there", on_token=lambda p: calls.append(p) or False)
    stream = rt.conversation(seed=3).stream("hello there")
    first = next(stream)
    stopped = stream.stop()
    assert first == calls[0] and stopped.stopped and want.stopped
    assert (stopped.text, stopped.tokens) == (want.text, want.tokens)
    # A crisis message: no pieces, the crisis reply.
    crisis = rt.conversation(seed=0).stream("I want to kill myself tonight")
    assert list(crisis) == [] and crisis.reply.escalated


def test_a_reply_cut_inside_a_word_shows_no_bpe_mark(rt):
    cut = 0
    for seed in range(12):
        pieces = []
        reply = rt.conversation(seed=seed).reply("tell me more", on_token=pieces.append)
        cut += rt.tokenizer.id_to_token(reply.tokens[-1]).endswith("@@")
        assert not reply.text.endswith("@@") and "".join(pieces) == reply.text
    assert cut > 0  # the random tiny model ends some replies mid-word, so the case was exercised


def test_generate_fixed_length_and_timings(rt):
    g = rt.generate(list(range(10, 400)), max_new_tokens=12, stop_at_eos=False)
    assert len(g.tokens) == 12 and len(g.timings.token_ms) == 12
    t = g.timings
    assert 0 < t.encoder_ms <= t.strategy_ms <= t.first_token_ms <= t.total_ms
    assert g.strategy_probs.shape == (8,)
    same = rt.generate(list(range(10, 400)), do_sample=True, seed=5, max_new_tokens=12)
    assert same.tokens == rt.generate(list(range(10, 400)), do_sample=True, seed=5, max_new_tokens=12).tokens


def test_threads_share_one_runtime(rt):
    """8 threads x 5 conversations: each equals the same conversation run alone (same seed)."""
    messages = ["I feel lonely.", "My exams are next week and I am scared.", "Thank you."]

    def run(seed: int) -> list[tuple[str, str]]:
        conv = rt.conversation(situation=f"situation {seed}", seed=seed, max_new_tokens=12)
        return [(r.text, r.strategy) for r in map(conv.reply, messages)]

    alone = {seed: run(seed) for seed in range(40)}
    together: dict[int, list] = {}
    errors: list[BaseException] = []

    def worker(seeds: range) -> None:
        try:
            for seed in seeds:
                together[seed] = run(seed)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(range(5 * i, 5 * i + 5),)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and together == alone
    assert len({tuple(v) for v in alone.values()}) > 1  # the seeds do change the replies


# -- sampling semantics --------------------------------------------------------------------------

@pytest.mark.parametrize("params", [
    DecodingOptions(),
    DecodingOptions(top_k=0, top_p=0.9, temperature=1.3, repetition_penalty=1.2),
    DecodingOptions(top_k=5, top_p=1.0, temperature=0.5, repetition_penalty=1.0),
])
def test_distribution_matches_training_warp(params):
    """numpy's candidate set and probabilities = softmax of training/generate.py's warp_logits."""
    torch = pytest.importorskip("torch")
    from star_training.generate import warp_logits

    rng = np.random.default_rng(0)
    scores = (rng.standard_normal(500) * 3).astype(np.float32)
    scores[7] = scores[8]  # a tie
    history = np.array([3, 7, 7, 11, 42, 499])
    banned = np.array([0, 1, 2])
    ids, probs = distribution(scores.copy(), np.unique(history), banned, params)
    ref_scores = torch.from_numpy(scores.copy())[None]
    ref_scores[0, banned] = -float("inf")
    ref = warp_logits(ref_scores, torch.from_numpy(history)[None], repetition_penalty=params.repetition_penalty,
                      temperature=params.temperature, top_k=params.top_k, top_p=params.top_p).softmax(-1)[0]
    ref = ref.double().numpy()
    assert set(ids.tolist()) == set(np.flatnonzero(ref).tolist())
    np.testing.assert_allclose(probs, ref[ids], rtol=1e-5)

"""Continuous batching (star_runtime.batching): a sequence's tokens do not depend on what else is
in the batch, rows join and leave between steps, and a row is given back however decoding ends.

Tiny preset, random weights (tests/star_bundles.py), float32 and int8.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from star_runtime import Runtime
from star_runtime.batching import DecodeBatch, StepBatcher
from star_runtime.decoding import generate, steps


@pytest.fixture(scope="module", params=["float32", "int8"])
def brt(request, bundle, bundle_int8) -> Runtime:
    return Runtime.load(bundle if request.param == "float32" else bundle_int8, threads=1)


def _contexts(rt: Runtime, n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    first = max(rt.manifest["special_ids"].values()) + 1
    top = rt.spec.vocab_size - len(rt.spec.strategy_token_ids)
    return [rng.integers(first, top, int(rng.integers(1, rt.spec.max_source_length + 1))).tolist() for _ in range(n)]


def _limit(rt: Runtime, logits: np.ndarray) -> float:
    """How far a batched row's values may be from the engine's: float rounding (other kernels), or
    for int8 the activations' quantization, 5% of the logits' scale."""
    return 1e-4 if rt.spec.precision == "float32" else 0.05 * max(1.0, float(np.abs(logits).max()))


def _decode_all(decoder, contexts, options, lengths, threads: bool) -> list[list[int]]:
    """Each context's tokens (fixed length lengths[i], seed i), one after the other or all on threads at once."""
    out: list[list[int] | None] = [None] * len(contexts)

    def one(i: int) -> None:
        out[i] = generate(decoder, contexts[i], options.but(max_new_tokens=lengths[i]), stop_at_eos=False,
                          rng=np.random.default_rng(i)).tokens

    if not threads:
        for i in range(len(contexts)):
            one(i)
        return out
    workers = [threading.Thread(target=one, args=(i,)) for i in range(len(contexts))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    return out


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_a_sequence_gets_the_same_tokens_alone_and_among_fifteen_others(brt, do_sample):
    contexts = _contexts(brt, 16)
    lengths = [3 + 5 * (i % 4) for i in range(16)]  # rows leave at different steps: the last row moves into theirs
    options = brt.options(do_sample=do_sample)
    batcher = StepBatcher(brt.engine, rows=16)
    alone = _decode_all(batcher, contexts, options, lengths, threads=False)
    together = _decode_all(batcher, contexts, options, lengths, threads=True)
    assert together == alone
    assert [len(t) for t in together] == lengths
    assert batcher.rows_stepped > batcher.steps  # steps were shared (else the test proves nothing)
    assert batcher._batch.size == 0  # every row given back


def test_fewer_rows_than_threads_wait_for_a_free_row(brt):
    contexts = _contexts(brt, 6, seed=1)
    options = brt.options(do_sample=False)
    lengths = [4] * 6
    batcher = StepBatcher(brt.engine, rows=2)
    assert _decode_all(batcher, contexts, options, lengths, threads=True) == \
        _decode_all(StepBatcher(brt.engine, rows=6), contexts, options, lengths, threads=False)


def test_batched_logits_are_the_engines_within_float_rounding(brt):
    """A batched row computes the same function as the engine's run of one sequence (other kernels:
    two rows and padded cross-attention keys), so the bundle's self-check speaks for it too."""
    context = np.asarray([_contexts(brt, 1, seed=2)[0]])
    batch = DecodeBatch(brt.engine, rows=4)
    batch.add(brt.engine.encode(context), context.shape[1])
    other = np.asarray([_contexts(brt, 1, seed=3)[0]])
    batch.add(brt.engine.encode(other), other.shape[1])
    limit = _limit(brt, brt.engine.start(context).step(5))
    run = brt.engine.start(context)
    for t, token in enumerate([brt.spec.bos_id, 7, 11, 13]):
        batch.step({0: token, 1: 5})
        reference = run.step(token)
        assert np.abs(batch.logits[0] - reference).max() <= limit, t
        assert np.abs(batch.hidden[0] - run.hidden).max() <= limit, t


def test_an_idle_row_keeps_its_position_and_state(brt):
    """A row left out of a step (its thread was busy) continues as if that step had not run."""
    contexts = [np.asarray([c]) for c in _contexts(brt, 2, seed=4)]
    batch = DecodeBatch(brt.engine, rows=2)
    for c in contexts:
        batch.add(brt.engine.encode(c), c.shape[1])
    paused = DecodeBatch(brt.engine, rows=2)
    for c in contexts:
        paused.add(brt.engine.encode(c), c.shape[1])
    for token in (brt.spec.bos_id, 9, 10):
        batch.step({0: token, 1: token})
        paused.step({0: token})  # row 1 idle ...
        paused.step({0: 6, 1: token})  # ... then it catches up while row 0 moves on
        assert np.array_equal(batch.logits[1], paused.logits[1])
    assert list(paused.position[:2]) == [6, 3]


def test_a_row_is_given_back_when_the_caller_stops_early(brt):
    batcher = StepBatcher(brt.engine, rows=2)
    loop = steps(batcher, _contexts(brt, 1)[0], brt.options(do_sample=False), stop_at_eos=False)
    next(loop)
    assert batcher._batch.size == 1
    loop.close()  # the caller stopped iterating (a client went away)
    assert batcher._batch.size == 0


def test_a_failed_step_reaches_every_row_and_the_batcher_goes_on(brt, monkeypatch):
    batcher = StepBatcher(brt.engine, rows=4)
    context = _contexts(brt, 1, seed=5)[0]
    options = brt.options(do_sample=False, max_new_tokens=3)
    good = generate(batcher, context, options).tokens

    def broken(tokens):
        raise RuntimeError("onnxruntime failed")

    monkeypatch.setattr(batcher._batch, "step", broken)
    with pytest.raises(RuntimeError, match="onnxruntime failed"):
        generate(batcher, context, options)
    monkeypatch.undo()
    assert batcher._batch.size == 0
    assert generate(batcher, context, options).tokens == good


def test_bad_batches_are_refused(brt):
    with pytest.raises(ValueError, match="rows must be a positive integer"):
        DecodeBatch(brt.engine, rows=0)
    batcher = StepBatcher(brt.engine, rows=1)
    with pytest.raises(ValueError, match="batched context holds"):
        batcher.start(np.zeros((1, brt.spec.max_source_length + 1), np.int64))
    run = batcher.start(np.asarray([_contexts(brt, 1)[0]]), capacity=1)
    run.step(brt.spec.bos_id)
    with pytest.raises(ValueError, match="all are used"):
        run.step(5)
    run.close()
    run.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        run.step(5)


def test_a_run_of_its_own_refuses_a_step_past_its_capacity(brt):
    run = brt.engine.start(np.asarray([_contexts(brt, 1)[0]]), capacity=2)
    run.step(brt.spec.bos_id)
    run.step(5)
    with pytest.raises(ValueError, match="all are used"):
        run.step(6)
    with pytest.raises(ValueError, match="capacity must be"):
        brt.engine.start(np.asarray([[5]]), capacity=brt.spec.max_positions + 1)


def test_conversations_on_a_batched_runtime_reply_as_alone(brt):
    batched = brt.batched(4)
    assert batched.engine is brt.engine and batched.decoder is not brt.decoder
    texts = ["I lost my job.", "My sister does not call me.", "I cannot sleep.", "Exams are next week."]
    alone = [batched.conversation(seed=i).reply(t).text for i, t in enumerate(texts)]
    out: list[str | None] = [None] * 4

    def talk(i: int) -> None:
        out[i] = batched.conversation(seed=i).reply(texts[i]).text

    threads = [threading.Thread(target=talk, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == alone


def test_a_batched_runtime_passes_the_self_check_through_its_batch(brt, monkeypatch):
    """The golden self-check runs through the batch's kernels too: a platform whose two-row
    kernels compute wrong is refused before a batched reply."""
    from star_runtime import BundleError, batching

    assert brt.verified
    brt.batched(2)  # passes
    real = batching.DecodeBatch.step

    def off(self, tokens):
        real(self, tokens)
        self.logits[:] += 1.0  # every logit 1.0 off, far beyond either tolerance

    monkeypatch.setattr(batching.DecodeBatch, "step", off)
    with pytest.raises(BundleError, match=r"\(batched\): the self-check failed"):
        brt.batched(2)


def test_the_cross_buffers_grow_with_the_longest_context_and_keep_the_rows(brt):
    """A longer context joining re-lays the cross buffers out; the rows already there go on with
    the same results as in a batch that had room from the start."""
    ids = _contexts(brt, 1, seed=6)[0] * brt.spec.max_source_length  # long enough for any cut
    short, long_ = np.asarray([ids[:5]]), np.asarray([ids[:brt.spec.max_source_length]])
    grown, roomy = DecodeBatch(brt.engine, rows=2), DecodeBatch(brt.engine, rows=2)
    roomy._fit_source(brt.spec.max_source_length)
    for batch in (grown, roomy):
        batch.add(brt.engine.encode(short), short.shape[1])
    assert grown.source < roomy.source
    for batch in (grown, roomy):
        batch.step({0: brt.spec.bos_id})
        batch.add(brt.engine.encode(long_), long_.shape[1])
        batch.step({0: 7, 1: brt.spec.bos_id})
    assert grown.source == roomy.source
    assert np.array_equal(grown.logits[:2], roomy.logits[:2])
    grown.remove(1)
    grown.remove(0)
    assert grown.source == 0 and not grown.cross  # empty: the next rows start small again


def test_a_freed_row_stepped_as_the_spare_one_reads_inside_the_buffers(brt):
    """A long context leaves, the batch empties, a short one comes alone: the spare row that runs
    beside it (two rows at least) must not keep the long one's key count."""
    ids = _contexts(brt, 1, seed=7)[0] * brt.spec.max_source_length
    long_, short = np.asarray([ids[:brt.spec.max_source_length]]), np.asarray([ids[:3]])
    batch = DecodeBatch(brt.engine, rows=2)
    for c in (short, long_):
        batch.add(brt.engine.encode(c), c.shape[1])
    batch.step({0: brt.spec.bos_id, 1: brt.spec.bos_id})
    batch.remove(1)
    batch.remove(0)
    batch.add(brt.engine.encode(short), short.shape[1])
    assert batch.source < brt.spec.max_source_length and list(batch.source_length) == [3, 1]
    batch.step({0: brt.spec.bos_id})
    alone = brt.engine.start(short)
    alone.step(brt.spec.bos_id)
    assert np.abs(batch.logits[0] - alone.logits).max() <= _limit(brt, alone.logits)

"""benchmarks/ctranslate2_convert.py: CTranslate2 computes what transformers' BlenderbotSmall does
(logits, greedy ids), and the ctranslate2-* backends of benchmarks/latency.py keep its contract."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ctranslate2 = pytest.importorskip("ctranslate2")
torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from ctranslate2_convert import convert_checkpoint, convert_model, vocabulary  # noqa: E402

VOCAB, START, EOS = 300, 1, 2
SOURCE = [5, 17, 33, 100, 250, 7, 8, 9, 120, 64, 31]


def random_model(seed: int, init_std: float, ln_std: float, bias_std: float):
    """A tiny random BlenderbotSmall whose every part moves the logits: the layer norms' gains and
    biases and the final logits bias drawn away from their identity initialisation."""
    from transformers import BlenderbotSmallForConditionalGeneration

    from star_training.config import base_config

    torch.manual_seed(seed)
    config = base_config("tiny", VOCAB)
    config.update({"max_position_embeddings": 64, "init_std": init_std, "forced_eos_token_id": None})
    m = BlenderbotSmallForConditionalGeneration(config).eval()
    with torch.no_grad():
        for module in m.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1, ln_std)
                module.bias.normal_(0, bias_std)
        m.final_logits_bias.normal_(0, bias_std)
    return m


@pytest.fixture(scope="module")
def model():
    """Logits of order 1, as a trained model's: float32 rounding stays near 1e-7."""
    return random_model(0, 0.3, 0.3, 0.3)


@pytest.fixture(scope="module")
def lively():
    """Weights large enough (init_std 1, small biases) that greedy decoding does not repeat one
    token (6 distinct in 10 with this seed); its logits reach the hundreds."""
    return random_model(1, 1.0, 0.2, 0.02)


def convert(model, tmp_path_factory) -> Path:
    return convert_model(model, tmp_path_factory.mktemp("ct2") / "float32", "float32")


def test_logits_match_transformers(model, tmp_path_factory) -> None:
    n = 8
    tokens = vocabulary(model, None)
    translator = ctranslate2.Translator(str(convert(model, tmp_path_factory)), intra_threads=1)
    result = translator.translate_batch([[tokens[i] for i in SOURCE]], beam_size=1, max_decoding_length=n,
                                        min_decoding_length=n, return_logits_vocab=True)[0]
    del translator
    ids = [tokens.index(t) for t in result.hypotheses[0]]
    got = np.stack([np.array(step) for step in result.logits[0]])  # [n, V]: position k sees START + ids[:k]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([SOURCE]), decoder_input_ids=torch.tensor([[START, *ids[:-1]]])).logits[0]
    keep = np.arange(VOCAB) != EOS  # banned by min_decoding_length in CTranslate2
    diff = np.abs(got[:, keep] - want.numpy()[:, keep]).max()
    assert got.shape == (n, VOCAB) and diff < 1e-4, (diff, np.abs(want.numpy()).max())


def test_greedy_ids_match_transformers_generate(lively, tmp_path_factory) -> None:
    """Greedy, the benchmark's repetition penalty, __end__ banned, 10 tokens. __start__ is banned in
    both: transformers' penalty covers the decoder start token, CTranslate2's only generated ones."""
    from transformers import GenerationConfig

    from harness import REPETITION_PENALTY

    n = 10
    config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                              repetition_penalty=REPETITION_PENALTY, eos_token_id=EOS, pad_token_id=0,
                              decoder_start_token_id=START, bos_token_id=START, suppress_tokens=[START])
    with torch.no_grad():
        want = lively.generate(input_ids=torch.tensor([SOURCE]), attention_mask=torch.ones(1, len(SOURCE), dtype=torch.long),
                              generation_config=config)[0, 1:].tolist()
    tokens = vocabulary(lively, None)
    translator = ctranslate2.Translator(str(convert(lively, tmp_path_factory)), intra_threads=1)
    got = [step.token_id for step in translator.generate_tokens(
        [tokens[i] for i in SOURCE], max_decoding_length=n, min_decoding_length=n,
        repetition_penalty=REPETITION_PENALTY, suppress_sequences=[[tokens[START]]])]
    del translator
    assert got == want and len(set(got)) >= 3, (got, want)


def test_backend_replies_keep_the_contract(tmp_path_factory, tokenizer_dir: Path) -> None:
    """A STAR checkpoint's conversion (the tokenizer's strings as the vocabulary), float32 and int8,
    timed by backends.py: reply_len tokens and one timestamp each, the strategy's stand-in first."""
    from backends import load_ctranslate2
    from harness import WorkerSpec
    from star_bundles import tiny_checkpoint

    from star_runtime.tokenizer import Tokenizer

    checkpoint = tiny_checkpoint(tmp_path_factory, tokenizer_dir)
    tokenizer = Tokenizer.from_dir(checkpoint)
    special = {"pad": tokenizer.pad_id, "start": tokenizer.bos_id, "eos": tokenizer.eos_id}
    ids = [[100, 200, 300, 400, 500], [600, 700, 800, 900, 1000]]
    for quantization in ("float32", "int8"):
        folder = convert_checkpoint(checkpoint, tmp_path_factory.mktemp("ct2ckpt") / quantization, quantization)
        config = json.loads((folder / "config.json").read_text())
        assert (config["decoder_start_token"], config["eos_token"]) == ("__start__", "__end__")
        vocab = json.loads((folder / "shared_vocabulary.json").read_text())
        assert vocab[:4] == [tokenizer.id_to_token(i) for i in range(4)] and len(vocab) == tokenizer.vocab_size
        reply = load_ctranslate2(WorkerSpec(f"ctranslate2-{quantization}", str(folder), "cpu", 1, 0, 1, 6, ids,
                                            special))
        trace, responses = reply()
        del reply
        assert [len(r) for r in responses] == [6, 6] and tokenizer.eos_id not in sum(responses, [])
        assert len(trace.tokens) == 6 and trace.start < trace.strategy < trace.tokens[0] <= trace.end
        assert all(math.isfinite(v) and v >= 0 for v in trace.timings().values())

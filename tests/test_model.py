"""STAR on BlenderBot-Small (training/model.py, config.py, schedules.py, checkpoint.py), tiny random models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from transformers import BlenderbotSmallForConditionalGeneration

from star_training.checkpoint import CheckpointError, load_model, save_model
from star_training.config import PRESETS, StarConfig, base_config
from star_training.schedules import dynamic_lambda
from star_training.model import StarForConditionalGeneration, resize_vocab, trainable_parameters_for_stage

V = 64  # specials 0..3 as in the real vocabulary, ordinary tokens 4..55, strategy tokens 56..63
STRATEGY_IDS = list(range(56, 64))


def tiny_model(**star_options) -> StarForConditionalGeneration:
    star = StarConfig(strategy_token_ids=STRATEGY_IDS, **star_options)
    return StarForConditionalGeneration(base_config("tiny", V), star).eval()


def batch(B: int = 2, S: int = 9, T: int = 7) -> dict[str, torch.Tensor]:
    """Encoder input with padding in row 1; decoder input __start__ [strategy] r_1 ..."""
    input_ids = torch.randint(4, 56, (B, S))
    attention_mask = torch.ones(B, S, dtype=torch.long)
    attention_mask[1, S - 3 :] = 0
    input_ids[attention_mask == 0] = 0
    decoder_input_ids = torch.randint(4, 56, (B, T))
    decoder_input_ids[:, 0] = 1
    decoder_input_ids[:, 1] = torch.tensor(STRATEGY_IDS[:B])
    return dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)


# -- the model ------------------------------------------------------------------------------------
def test_star_starts_near_the_identity() -> None:
    out = tiny_model()(**batch())
    rel = (out.fused - out.hidden).norm() / out.hidden.norm()
    assert 0 < rel < 0.1, f"relative change of h by STAR at init: {rel:.4f}"


def test_bypassed_star_leaves_h_unchanged() -> None:
    out = tiny_model(use_star=False)(**batch())
    assert torch.equal(out.fused, out.hidden)


def test_changing_a_later_decoder_token_never_changes_an_earlier_fused_state() -> None:
    model, b = tiny_model(), batch(T=8)
    ref = model(**b)
    k = 4
    b["decoder_input_ids"][:, k] = torch.where(b["decoder_input_ids"][:, k] == 5, 6, 5)
    out = model(**b)
    assert torch.equal(out.fused[:, :k], ref.fused[:, :k])
    assert torch.equal(out.lm_logits[:, :k], ref.lm_logits[:, :k])
    assert not torch.allclose(out.fused[:, k], ref.fused[:, k])  # the change did reach position k


def test_right_padding_in_the_decoder_does_not_change_the_real_positions() -> None:
    model, b = tiny_model(), batch(T=8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    b["decoder_input_ids"][1, 5:] = 0
    padded = model(**b, decoder_attention_mask=mask)
    alone = model(b["input_ids"][1:, :6], b["attention_mask"][1:, :6], b["decoder_input_ids"][1:, :5])
    assert (padded.fused[1, :5] - alone.fused[0]).abs().max() < 1e-5
    assert (padded.lm_logits[1, :5] - alone.lm_logits[0]).abs().max() < 1e-5


@pytest.mark.parametrize("gate", ["vector", "scalar"])
def test_incremental_decoding_equals_the_teacher_forced_forward(gate: str) -> None:
    model, b = tiny_model(gate=gate), batch(T=8)
    with torch.no_grad():
        full = model(**b)
        e = model.encode(b["input_ids"], b["attention_mask"])
        state, cache, fused, logits = model.empty_star_state(2), None, [], []
        for t in range(b["decoder_input_ids"].size(1)):
            h, cache = model.decode(b["decoder_input_ids"][:, t : t + 1], e, b["attention_mask"], past_key_values=cache)
            f, state = model.fuse_step(h[:, 0], state)
            fused.append(f)
            logits.append(model.lm_logits(f))
    assert (torch.stack(fused, 1) - full.fused).abs().max() < 1e-5
    assert (torch.stack(logits, 1) - full.lm_logits).abs().max() < 1e-5


def test_losses_by_hand() -> None:
    model, b = tiny_model(), batch()
    # Make STAR change h a lot (gate about 1), so reading h' instead of h would show.
    torch.nn.init.constant_(model.star.gate_fc2.bias, 5.0)
    labels = torch.cat([b["decoder_input_ids"][:, 1:], torch.full((2, 1), 2)], dim=1)  # [strategy] r.. __end__
    labels[1, -2:] = -100  # padding
    strategy = torch.tensor([0, 1])
    out = model(**b, labels=labels, strategy=strategy)

    # Strategy: LM head of h (not h') at position 0, columns of the strategy tokens.
    head_h0 = out.hidden[:, 0] @ model.base.lm_head.weight.T + model.base.final_logits_bias[0]
    assert torch.allclose(out.strategy_logits, head_h0[:, STRATEGY_IDS], atol=1e-6)
    head_f0 = model.lm_logits(out.fused[:, 0])[:, STRATEGY_IDS]
    assert not torch.allclose(out.strategy_logits, head_f0, atol=1e-3)
    log_p = out.strategy_logits.log_softmax(-1)
    assert out.loss_st.item() == pytest.approx(-(log_p[0, 0] + log_p[1, 1]).item() / 2, rel=1e-6)

    # Response: positions 1..T-1 with a label, from h'; position 0's label (the strategy token) is not counted.
    log_q = model.lm_logits(out.fused).log_softmax(-1)
    terms = [-log_q[i, t, labels[i, t]] for i in range(2) for t in range(1, labels.size(1)) if labels[i, t] != -100]
    assert out.n_tokens.item() == len(terms) == 2 * 6 - 2
    assert out.nll_sum.item() == pytest.approx(sum(terms).item(), rel=1e-6)
    assert out.loss_lm.item() == pytest.approx(sum(terms).item() / len(terms), rel=1e-6)


def test_stage_2_trains_only_star_and_the_shared_embedding(capsys) -> None:
    model = tiny_model(use_star=False)
    got = trainable_parameters_for_stage(model, 2)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in model.named_parameters() if n.startswith("star.")} | {"base.model.shared.weight"}
    assert model.base.lm_head.weight.requires_grad  # tied: the same tensor
    assert model.star_config.use_star
    n_star = sum(p.numel() for p in model.star.parameters())
    assert got.n_trainable == n_star + V * 32 and got.n_tensors == len(names)
    assert f"{got.n_trainable:,} of {got.n_total:,}" in capsys.readouterr().out


def test_stage_1_trains_the_whole_base_with_star_bypassed() -> None:
    model = tiny_model()
    got = trainable_parameters_for_stage(model, 1)
    assert not model.star_config.use_star
    assert not any(p.requires_grad for p in model.star.parameters())
    assert got.n_trainable == sum(p.numel() for p in model.base.parameters())
    assert trainable_parameters_for_stage(model, "single").n_trainable == got.n_total
    with pytest.raises(ValueError, match="stage must be"):
        trainable_parameters_for_stage(model, 3)


def test_dynamic_lambda() -> None:
    assert dynamic_lambda(1, 10) == pytest.approx(0.8 * math.log(2) / math.log(10))  # 0.2408
    assert dynamic_lambda(10, 10) == pytest.approx(0.8 * math.log(11) / math.log(10))  # 0.8331
    assert dynamic_lambda(3, 4, lambda0=0.5) == pytest.approx(0.5)  # log 4 / log 4
    for bad in [(0, 10), (11, 10), (1, 1)]:
        with pytest.raises(ValueError):
            dynamic_lambda(*bad)


def test_resize_vocab_adds_rows_at_the_mean_and_keeps_the_head_tied() -> None:
    base = BlenderbotSmallForConditionalGeneration(base_config("tiny", 56))
    old = base.get_input_embeddings().weight.detach().clone()
    resize_vocab(base, V)
    new = base.get_input_embeddings().weight
    assert new.shape == (V, 32) and torch.equal(new[:56], old)
    assert torch.allclose(new[56:], old.mean(0).expand(8, -1))
    assert base.lm_head.weight is new
    assert base.final_logits_bias.shape == (1, V) and not base.final_logits_bias[0, 56:].any()


def test_base_preset_is_the_real_blenderbot_small_90m_config(tokenizer_dir) -> None:
    real = json.loads((tokenizer_dir / "config.json").read_text())
    ours = base_config("base", 54952).to_dict()
    keys = [*PRESETS["base"], "max_position_embeddings", "activation_function", "dropout", "attention_dropout",
            "activation_dropout", "init_std", "scale_embedding", "pad_token_id", "bos_token_id", "eos_token_id",
            "decoder_start_token_id", "unk_token_id", "model_type"]
    assert {k: ours[k] for k in keys} == {k: real[k] for k in keys}
    assert real["vocab_size"] + 8 == ours["vocab_size"]


def test_star_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="gate"):
        StarConfig(strategy_token_ids=STRATEGY_IDS, gate="matrix")
    with pytest.raises(ValueError, match="unknown StarConfig keys: colour"):
        StarConfig.from_dict({"strategy_token_ids": STRATEGY_IDS, "colour": 1})
    with pytest.raises(ValueError, match="do not fit"):
        StarForConditionalGeneration(base_config("tiny", 60), StarConfig(strategy_token_ids=STRATEGY_IDS))


# -- checkpoints ----------------------------------------------------------------------------------
def test_save_load_save_is_byte_identical(tmp_path) -> None:
    model = tiny_model()
    save_model(model, tmp_path / "a")
    loaded = load_model(tmp_path / "a")
    save_model(loaded, tmp_path / "b")
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    assert loaded.star_config == model.star_config
    b = batch()
    assert torch.equal(loaded.eval()(**b).lm_logits, model(**b).lm_logits)
    with safe_open(tmp_path / "a/model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.shared.weight" in keys and "lm_head.weight" not in keys  # tied weights once
    assert not any("embed_tokens" in k for k in keys)


def test_checkpoint_opens_in_transformers_and_keeps_the_tokenizer(tmp_path, tokenizer_dir) -> None:
    from star_runtime.tokenizer import Tokenizer

    model = tiny_model()
    save_model(model, tmp_path / "ckpt", tokenizer_dir=tokenizer_dir)
    assert Tokenizer.from_dir(tmp_path / "ckpt").strategy_ids == Tokenizer.from_dir(tokenizer_dir).strategy_ids
    base = BlenderbotSmallForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(base.lm_head.weight, model.base.lm_head.weight)


def test_a_base_folder_gets_the_strategy_tokens_and_a_fresh_star(tmp_path) -> None:
    base = BlenderbotSmallForConditionalGeneration(base_config("tiny", 56))
    base.save_pretrained(tmp_path / "base")
    star = StarConfig(strategy_token_ids=STRATEGY_IDS)
    model = load_model(tmp_path / "base", star_config=star)
    assert model.config.vocab_size == V
    assert torch.equal(model.base.model.shared.weight[:56], base.model.shared.weight)
    assert torch.equal(model.base.model.decoder.layers[1].fc2.weight, base.model.decoder.layers[1].fc2.weight)
    with pytest.raises(ValueError, match="pass star_config"):
        load_model(tmp_path / "base")


def test_a_stage_1_checkpoint_takes_a_new_star_config(tmp_path) -> None:
    save_model(tiny_model(use_star=False), tmp_path / "s1")
    model = load_model(tmp_path / "s1", star_config=StarConfig(strategy_token_ids=STRATEGY_IDS, gate="scalar"))
    assert model.star.gate_fc2.out_features == 1 and model.star_config.use_star
    save_model(tiny_model(), tmp_path / "s2")  # trained STAR weights must fit the new config
    with pytest.raises(CheckpointError, match="2 with wrong shapes: star.gate_fc2"):
        load_model(tmp_path / "s2", star_config=StarConfig(strategy_token_ids=STRATEGY_IDS, gate="scalar"))


def test_a_preset_builds_a_random_model() -> None:
    model = load_model(preset="tiny", star_config=StarConfig(strategy_token_ids=STRATEGY_IDS))
    assert model.config.d_model == 32 and model.config.vocab_size == V
    with pytest.raises(ValueError, match="not both or neither"):
        load_model("x", preset="tiny")


def _corrupt(folder, what: str) -> None:
    if what.startswith("missing "):
        (folder / what.removeprefix("missing ")).unlink()
    elif what == "corrupt safetensors":
        (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    elif what == "format version":
        d = json.loads((folder / "star_config.json").read_text())
        (folder / "star_config.json").write_text(json.dumps({**d, "format_version": 99}))
    elif what == "architecture":
        d = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**d, "model_type": "bart"}))
    elif what == "shapes":
        d = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**d, "decoder_ffn_dim": 48}))
    elif what == "layers":
        d = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**d, "decoder_layers": 3}))


@pytest.mark.parametrize(
    "what, message",
    [
        ("missing config.json", "missing config.json"),
        ("missing model.safetensors", "missing model.safetensors"),
        ("corrupt safetensors", "not a readable safetensors file"),
        ("format version", "format_version 99"),
        ("architecture", "another architecture"),
        ("shapes", r"6 with wrong shapes: model.decoder.layers.0.fc1.bias \(64,\) \(the config says \(48,\)\)"),
        ("layers", "26 missing: model.decoder.layers.2."),
    ],
)
def test_bad_checkpoints_raise_a_clear_checkpoint_error(tmp_path, what: str, message: str) -> None:
    save_model(tiny_model(), tmp_path / "ckpt")
    _corrupt(tmp_path / "ckpt", what)
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path / "ckpt")


def test_missing_folders_and_non_checkpoints(tmp_path) -> None:
    star = StarConfig(strategy_token_ids=STRATEGY_IDS)
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        load_model(tmp_path / "nowhere", star_config=star)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_model(tmp_path / "f.txt", star_config=star)
    with pytest.raises(CheckpointError, match="refusing to replace"):
        save_model(tiny_model(), tmp_path)
    assert (tmp_path / "f.txt").read_text() == "x"

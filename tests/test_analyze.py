"""star-analyze on random tiny models and the project-written ESConv fixture: the gradient cosine
is the cosine of the two losses' gradients over the parameters both reach, the interval and the
cluster scores are what they claim, and the command writes its JSON and figures or fails cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from esconv_fixture import write_esconv
from star_runtime.tokenizer import Tokenizer
from star_training import analyze_cli
from star_training.checkpoint import load_model, save_model
from star_training.config import StarConfig
from star_training.data import build_examples, collate, load_conversations
from star_training.hidden_clusters import cluster_states
from star_training.interference import Interval, batch_gradient_cosine, gradient_cosine, t_interval


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """Random tiny Joint and STAR model folders (with the tokenizer) and a fixture data folder."""
    root = tmp_path_factory.mktemp("analyze")
    tok = Tokenizer.from_dir(tokenizer_dir)
    for name, use_star in (("joint", False), ("star", True)):
        torch.manual_seed(0)
        model = load_model(preset="tiny", star_config=StarConfig(strategy_token_ids=tok.strategy_ids, use_star=use_star),
                           vocab_size=tok.vocab_size)
        save_model(model, root / name, tokenizer_dir=tokenizer_dir)
    return {"joint": root / "joint", "star": root / "star", "data": write_esconv(root / "data")}


def first_batch(setup, name: str, n: int = 4):
    tok = Tokenizer.from_dir(setup[name])
    model = load_model(setup[name]).eval()
    examples = build_examples(load_conversations(setup["data"], "valid"), tok)[:n]
    return model, collate(examples, tok.pad_id)


@pytest.mark.parametrize("name", ["joint", "star"])
def test_cosine_is_that_of_the_two_gradients_over_the_parameters_both_reach(setup, name) -> None:
    model, batch = first_batch(setup, name)
    result = batch_gradient_cosine(model, batch)

    # By hand: both gradients of every parameter, keep those both losses reach, flatten, cosine.
    named = list(model.named_parameters())
    out = model(**batch)
    g_lm = torch.autograd.grad(out.loss_lm, [p for _, p in named], retain_graph=True, allow_unused=True)
    g_st = torch.autograd.grad(out.loss_st, [p for _, p in named], allow_unused=True)
    both = [(n, a, b) for (n, _), a, b in zip(named, g_lm, g_st) if a is not None and b is not None]
    a = torch.cat([x.flatten() for _, x, _ in both]).double()
    b = torch.cat([y.flatten() for _, _, y in both]).double()
    assert result.cosine["shared"] == pytest.approx(float(F.cosine_similarity(a, b, dim=0)), abs=1e-9)
    emb = [(x, y) for n, x, y in both if n == "base.model.shared.weight"]
    assert len(emb) == 1
    expected_emb = F.cosine_similarity(emb[0][0].double().flatten(), emb[0][1].double().flatten(), dim=0)
    assert result.cosine["embedding"] == pytest.approx(float(expected_emb), abs=1e-9)

    # L_ST reaches the whole base (every decoder layer through position 0) and never STAR.
    assert list(result.shared_names) == [n for n, _ in named if n.startswith("base.")]
    assert result.shared_numel == sum(p.numel() for p in model.base.parameters())
    # STAR's parameters get an L_LM gradient only when STAR is applied.
    star_lm = [x for (n, _), x in zip(named, g_lm) if n.startswith("star.")]
    assert all((x is not None) == (name == "star") for x in star_lm)


def test_gradient_cosine_is_deterministic_and_leaves_the_model_as_it_was(setup) -> None:
    model, _ = first_batch(setup, "joint")
    tok = Tokenizer.from_dir(setup["joint"])
    examples = build_examples(load_conversations(setup["data"], "valid"), tok)[:8]
    batches = [collate(examples[:4], tok.pad_id), collate(examples[4:], tok.pad_id)]
    model.train()  # dropout 0.1 would make two runs differ; gradient_cosine switches it off
    model.star.requires_grad_(False)
    first = gradient_cosine(model, batches, device=torch.device("cpu"))
    second = gradient_cosine(model, batches, device=torch.device("cpu"))
    assert first.per_batch == second.per_batch and len(first.per_batch["shared"]) == 2
    assert model.training and not any(p.requires_grad for p in model.star.parameters())
    iv = first.interval["shared"]
    assert iv.low <= iv.mean <= iv.high and iv.mean == pytest.approx(np.mean(first.per_batch["shared"]))


def test_t_interval_is_the_student_t_interval() -> None:
    values = [0.1, 0.3, -0.2, 0.25, 0.05]
    iv = t_interval(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert (iv.low, iv.mean, iv.high) == pytest.approx((low, np.mean(values), high))
    assert iv.low < iv.mean < iv.high
    assert t_interval([0.4]) == Interval(0.4, None, None, 1)  # one batch: no spread to estimate
    with pytest.raises(ValueError):
        t_interval([])


def test_cluster_scores_are_in_range_and_perfect_for_separated_strategies() -> None:
    rng = np.random.default_rng(0)
    gold = np.repeat(np.arange(8), 12)  # 8 strategies, 12 points each
    centres = rng.normal(size=(8, 16)) * 20
    separated = cluster_states(centres[gold] + rng.normal(size=(96, 16)) * 0.1, gold, seed=0)
    assert separated.ari == 1.0 and 0.9 < separated.silhouette <= 1.0
    assert separated.points_2d.shape == (96, 2) and separated.clusters.shape == (96,)

    noise = cluster_states(rng.normal(size=(96, 16)), gold, seed=0)
    assert -1.0 <= noise.ari < 0.2 and -1.0 <= noise.silhouette < 0.5
    with pytest.raises(ValueError, match="at least 9"):
        cluster_states(rng.normal(size=(8, 16)), gold[:8], seed=0)


def test_cli_writes_json_and_figures_for_joint_and_star(setup, tmp_path, capsys) -> None:
    argv = ["--checkpoint", str(setup["joint"]), "--checkpoint", str(setup["star"]), "--data", str(setup["data"]),
            "--split", "valid", "--batches", "2", "--batch-size", "4", "--max-points", "12", "--out", str(tmp_path),
            "--device", "cpu", "--seed", "3"]
    assert analyze_cli.main(argv) == 0
    report = json.loads((tmp_path / "analysis.json").read_text())
    assert report["paper_table_1"] == {"BlenderBot-Joint": -0.05, "BlenderBot-Joint + STAR": 0.47}
    joint, star = report["models"]
    assert (joint["label"], joint["star"], star["star"]) == ("BlenderBot-Joint", False, True)
    for m in (joint, star):
        cos = m["gradient_cosine"]
        assert cos["batches"] == 2 and cos["examples"] == 8
        for group in ("shared", "embedding"):
            c = cos[group]
            assert len(c["per_batch"]) == 2 and all(-1 <= v <= 1 for v in c["per_batch"])
            assert c["ci95"][0] <= c["mean"] <= c["ci95"][1]
        hs = m["hidden_states"]
        assert hs["points"] == 12 and sum(hs["gold_counts"].values()) == 12
        assert -1 <= hs[hs["generation_state"]]["silhouette"] <= 1 and -1 <= hs[hs["generation_state"]]["ari"] <= 1
    assert joint["hidden_states"]["generation_state"] == "h" and "h'" not in joint["hidden_states"]
    assert star["hidden_states"]["generation_state"] == "h'" and "h" in star["hidden_states"]
    # Same seed, same data settings: both models are scored on the same batches.
    assert joint["gradient_cosine"]["shared_parameters"] == star["gradient_cosine"]["shared_parameters"]
    for png in (joint["figure"], star["figure"], report["figure"]):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["analysis.json", "clusters.png", "clusters_joint.png", "clusters_star.png"])  # no temporary files left
    out = capsys.readouterr().out
    assert "paper: BlenderBot-Joint" in out and "ours: BlenderBot-Joint + STAR" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (lambda s, t: ["--checkpoint", str(t / "nothing"), "--data", str(s["data"])], "no such folder"),
        (lambda s, t: ["--checkpoint", str(t), "--data", str(s["data"])], "nor a star-train run folder"),
        (lambda s, t: ["--checkpoint", str(s["joint"]), "--checkpoint", str(t / "later"), "--data", str(s["data"])],
         "later: no such folder"),
        (lambda s, t: ["--checkpoint", str(s["joint"]), "--data", str(t / "nowhere")], "does not exist"),
        (lambda s, t: ["--checkpoint", str(s["joint"]), "--data", str(t)], "file not found"),
    ],
    ids=["missing-checkpoint", "not-a-checkpoint", "second-checkpoint-missing", "missing-data", "data-without-split-files"],
)
def test_bad_input_is_one_clear_message(argv, message, setup, tmp_path, capsys) -> None:
    assert analyze_cli.main([*argv(setup, tmp_path), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("star-analyze: error: ") and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out" / "analysis.json").exists()


@pytest.mark.parametrize("flag, value", [("--batches", "0"), ("--max-points", "8"), ("--split", "train"),
                                         ("--device", "tpu"), ("--batch-size", "x")])
def test_out_of_range_options_exit_with_usage(flag, value, setup, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        analyze_cli.main(["--checkpoint", str(setup["joint"]), "--data", str(setup["data"]), "--out", str(tmp_path),
                          flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


def test_missing_checkpoint_flag_exits_with_usage(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        analyze_cli.main(["--out", "x"])
    assert exc.value.code == 2 and "--checkpoint" in capsys.readouterr().err

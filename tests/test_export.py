"""star-export: parity of the bundle with the PyTorch model, its layout, its refusals, its CLI.

Tiny preset, random weights, exported once per session into tmp (tests/star_bundles.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from star_bundles import tiny_bundle, tiny_checkpoint
from star_export import exporter
from star_export.cli import main as export_main
from star_export.validate import ValidationError
from star_export.weights import ExportError
from star_runtime import BundleError, Runtime
from star_runtime.bundle import FORMAT_VERSION, MANIFEST_FILE, load_manifest
from star_runtime.selfcheck import STEPS as SELFCHECK_STEPS
from star_training.checkpoint import load_model
from star_training.generate import generate as torch_generate

N_PROMPTS = 20
STEPS = 8
F32_ATOL = 1e-4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_dir) -> Path:
    return tiny_checkpoint(tmp_path_factory, tokenizer_dir)


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt).eval()


def _prompts(vocab_size: int, n: int = N_PROMPTS) -> list[np.ndarray]:
    """Random contexts of random lengths (1..160) over the ordinary vocabulary."""
    rng = np.random.default_rng(123)
    return [rng.integers(4, vocab_size - 8, size=int(rng.integers(1, 161))) for _ in range(n)]


def _torch_logits(model, ids: np.ndarray, decoder_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced forward: strategy logits [8] and response logits [T, V] (positions 1..)."""
    ids_t = torch.from_numpy(ids)[None]
    with torch.inference_mode():
        out = model(ids_t, torch.ones_like(ids_t), torch.tensor([decoder_ids]))
    return out.strategy_logits[0].numpy(), out.lm_logits[0, 1:].numpy()


def test_float32_bundle_matches_pytorch(model, bundle):
    """Incremental bundle decoding (KV cache, streaming STAR) vs PyTorch's teacher-forced forward,
    and greedy strategies + tokens vs training/generate.py, over 20 random prompts."""
    rt = Runtime.load(bundle)
    sids = rt.manifest["strategies"]["token_ids"]
    worst = 0.0
    for ids in _prompts(model.config.vocab_size):
        ours = rt.generate(ids, max_new_tokens=STEPS, stop_at_eos=False)
        ids_t = torch.from_numpy(ids)[None]
        ref = torch_generate(model, ids_t, torch.ones_like(ids_t), do_sample=False, max_new_tokens=STEPS,
                             stop_at_eos=False)
        assert ours.strategy_id == int(ref.strategy_id[0])
        assert ours.tokens == ref.responses[0]

        # Logits at every position, the bundle stepped with the same tokens.
        decoder_ids = [rt.manifest["special_ids"]["bos"], sids[ours.strategy_id], *ours.tokens]
        strategy_ref, logits_ref = _torch_logits(model, ids, decoder_ids)
        run = rt.engine.start(ids[None])
        run.step(decoder_ids[0])
        worst = max(worst, float(np.abs(rt.engine.strategy_logits(run.hidden) - strategy_ref).max()))
        for t, token in enumerate(decoder_ids[1:]):
            logits = run.step(token)
            worst = max(worst, float(np.abs(logits - logits_ref[t]).max()))
    print(f"float32: max |logit difference| over {N_PROMPTS} prompts x {STEPS + 2} positions: {worst:.2e}")
    assert worst <= F32_ATOL


def test_int8_strategy_agreement(model, bundle_int8):
    rt = Runtime.load(bundle_int8)
    prompts = _prompts(model.config.vocab_size)
    agree = 0
    for ids in prompts:
        ref, _ = _torch_logits(model, ids, [rt.manifest["special_ids"]["bos"]])
        agree += rt.generate(ids, max_new_tokens=0).strategy_id == int(ref.argmax())
    print(f"int8 strategy agreement with PyTorch: {agree}/{len(prompts)} = {agree / len(prompts):.0%}")
    assert agree / len(prompts) >= 0.9


def _external_tensors(graph_path: Path) -> dict[str, tuple[int, int]]:
    model = onnx.load(str(graph_path), load_external_data=False)
    out = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            out[t.name] = (int(info["offset"]), int(info["length"]))
    return out


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_every_weight_is_stored_once(model, tmp_path_factory, tokenizer_dir, precision):
    folder = tiny_bundle(tmp_path_factory, tokenizer_dir, precision)
    manifest = load_manifest(folder)
    enc = _external_tensors(folder / manifest["graphs"]["encoder"])
    step = _external_tensors(folder / manifest["graphs"]["step"])
    shared = set(manifest["shared_tensors"])
    if precision == "int8":  # initializers that both graphs declare
        assert set(enc) & set(step) == shared == {"embed.weight", "embed.weight.scale"}
    else:  # a graph input of both: stored once, read once
        assert set(enc) & set(step) == set() and shared == {"embed.weight_t"}
        for graph in ("encoder", "step"):
            model_proto = onnx.load(str(folder / manifest["graphs"][graph]), load_external_data=False)
            assert "embed.weight_t" in [i.name for i in model_proto.graph.input]
        spans_shared = manifest["shared_tensors"]["embed.weight_t"]
        enc["embed.weight_t"] = (spans_shared["offset"], spans_shared["length"])
    spans = sorted({**enc, **step}.values())
    assert all(a[0] + a[1] <= b[0] for a, b in zip(spans, spans[1:])), "two tensors overlap in weights.bin"
    # parameters() lists the tied embedding once; final_logits_bias is a buffer.
    n_weights = sum(p.numel() for p in model.parameters()) + model.base.final_logits_bias.numel()
    stored = sum(length for _, length in spans)
    if precision == "float32":
        assert stored == 4 * n_weights
    else:  # int8 matrices, plus float scales, LayerNorms, biases and positions
        assert n_weights <= stored <= 4 * n_weights / 2
    assert (folder / manifest["graphs"]["weights"]).stat().st_size < stored + 4096 * len(spans)


def test_export_refuses_a_bundle_that_disagrees(ckpt, tmp_path, monkeypatch):
    real = exporter.stored_arrays

    def broken(model, precision, output_ids=None):
        arrays = real(model, precision, output_ids)
        arrays["dec.0.ln1.gamma"] = arrays["dec.0.ln1.gamma"] * 1.1  # a 10% error in one LayerNorm
        return arrays

    monkeypatch.setattr(exporter, "stored_arrays", broken)
    with pytest.raises(ValidationError, match="disagrees"):
        exporter.export_bundle(ckpt, tmp_path / "out", log=lambda line: None)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind


def test_cli_exact_command(ckpt, tmp_path):
    """`star-export --checkpoint ckpt/ --out model.onnx` writes a bundle FOLDER named model.onnx,
    and running it again replaces that bundle."""
    cmd = [sys.executable, "-m", "star_export.cli", "--checkpoint", str(ckpt), "--out", "model.onnx"]
    for _ in range(2):
        done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "model.onnx" / MANIFEST_FILE).is_file()
    assert "validation (float32" in done.stderr
    assert Runtime.load(tmp_path / "model.onnx").generate([5, 6, 7], max_new_tokens=2).tokens


def _cli(capsys, *args: str) -> tuple[int, str]:
    try:
        code = export_main(list(args))
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_cli_bad_inputs(ckpt, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "not_a_bundle").mkdir()
    (tmp_path / "not_a_bundle" / "notes.txt").write_text("mine")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(ckpt, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 100)
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "star_config.json", "model.safetensors"):
        shutil.copy(ckpt / name, no_tokenizer / name)
    out = str(tmp_path / "out")
    cases = [
        (("--checkpoint", str(tmp_path / "missing"), "--out", out), "no such folder"),
        (("--checkpoint", str(corrupt), "--out", out), "not a readable safetensors file"),
        (("--checkpoint", str(no_tokenizer), "--out", out), "no usable tokenizer files"),
        (("--checkpoint", str(ckpt), "--out", str(tmp_path / "a_file")), "is a file"),
        (("--checkpoint", str(ckpt), "--out", str(tmp_path / "not_a_bundle")), "refusing to replace"),
        (("--checkpoint", str(ckpt), "--out", str(tmp_path / "a_file" / "sub")), "not a folder"),
    ]
    for args, message in cases:
        code, err = _cli(capsys, *args)
        assert code == 2 and err.startswith("star-export: error:") and message in err, (args, err)
        assert err.count("\n") == 1, err
    assert (tmp_path / "not_a_bundle" / "notes.txt").read_text() == "mine"
    code, err = _cli(capsys, "--checkpoint", str(ckpt), "--out", out, "--fp16", "--quantize", "int8")
    assert code == 2 and "not allowed" in err
    code, err = _cli(capsys, "--out", out)
    assert code == 2 and "--checkpoint" in err


def test_manifest_describes_the_bundle(bundle, tokenizer_dir):
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 4 and manifest["precision"] == "float32"
    assert manifest["strategies"]["labels"][0] == "Question"
    assert manifest["generation"] == {"do_sample": True, "top_p": 0.3, "top_k": 30, "temperature": 0.7,
                                      "repetition_penalty": 1.03, "max_new_tokens": 40, "max_source_length": 160}
    assert manifest["validation"]["max_abs_logit_diff"] <= F32_ATOL
    on_disk = {p.name for p in bundle.iterdir()} - {MANIFEST_FILE}
    assert set(manifest["files"]) == on_disk
    assert {"vocab.json", "merges.txt", "added_tokens.json"} <= on_disk


def test_float16_bundle_for_cuda(ckpt, bundle, tmp_path):
    """--fp16: float16 weights (half the float32 size), a CUDA-only manifest, and the exporter's check
    passes (on CUDA where there is one; here on the CPU, where onnxruntime runs float16 ops in float32)."""
    out = tmp_path / "fp16"
    lines: list[str] = []
    manifest = exporter.export_bundle(ckpt, out, precision="float16", log=lines.append)
    assert manifest["precision"] == "float16" and manifest["devices"] == ["cuda"]
    assert manifest["validation"]["strategy_agreement"] == 1.0
    assert any("validation (float16" in line for line in lines)
    f32 = load_manifest(bundle)["files"]["weights.bin"]["size"]
    assert 0.45 * f32 < manifest["files"]["weights.bin"]["size"] < 0.55 * f32


@pytest.mark.skipif("CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
                    reason="needs onnxruntime-gpu and a GPU")
def test_cuda_runs_float32_and_float16_bundles(ckpt, bundle, tmp_path):
    """On CUDA: the float32 bundle's greedy replies equal the CPU's; the float16 bundle is exported
    and checked against PyTorch on the GPU, then answers."""
    cpu, gpu = Runtime.load(bundle), Runtime.load(bundle, device="cuda")
    for ids in _prompts(cpu.manifest["io"]["vocab_size"], n=5):
        a = cpu.generate(ids, max_new_tokens=8, stop_at_eos=False)
        b = gpu.generate(ids, max_new_tokens=8, stop_at_eos=False)
        assert (a.strategy_id, a.tokens) == (b.strategy_id, b.tokens)
    manifest = exporter.export_bundle(ckpt, tmp_path / "fp16", precision="float16", log=print)
    assert manifest["validation"]["device"] == "cuda"
    reply = Runtime.load(tmp_path / "fp16", device="cuda").conversation(seed=0).reply("I feel lonely.")
    assert reply.text and reply.strategy


# -- what --out may replace ---------------------------------------------------------------------

def test_a_folder_with_someone_elses_manifest_is_not_replaced(ckpt, tmp_path, capsys):
    """A web app's folder (its own manifest.json, index.html, src/) survives `star-export --out`."""
    webapp = tmp_path / "webapp"
    (webapp / "src").mkdir(parents=True)
    (webapp / "manifest.json").write_text('{"name":"x"}')
    (webapp / "index.html").write_text("<html></html>")
    code, err = _cli(capsys, "--checkpoint", str(ckpt), "--out", str(webapp))
    assert code == 2 and "refusing to replace" in err and "star-export" in err and err.count("\n") == 1, err
    assert (webapp / "index.html").read_text() == "<html></html>" and (webapp / "src").is_dir()
    assert (webapp / "manifest.json").read_text() == '{"name":"x"}'


def test_a_bundle_with_a_users_file_added_is_not_replaced(ckpt, bundle, tmp_path, capsys):
    out = tmp_path / "mine"
    shutil.copytree(bundle, out)
    (out / "notes.txt").write_text("my notes")
    code, err = _cli(capsys, "--checkpoint", str(ckpt), "--out", str(out))
    assert code == 2 and "notes.txt" in err, err
    assert (out / "notes.txt").read_text() == "my notes"


def test_an_empty_folder_and_an_older_bundle_are_replaced(ckpt, bundle, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    exporter.export_bundle(ckpt, empty, log=lambda line: None)
    assert load_manifest(empty)["format_version"] == FORMAT_VERSION
    old = tmp_path / "old"  # a version-1 bundle as the previous star-export wrote it
    shutil.copytree(bundle, old)
    manifest = json.loads((old / MANIFEST_FILE).read_text())
    for key in ("fingerprint", "selfcheck"):
        del manifest[key]
    manifest["format_version"] = 1
    (old / MANIFEST_FILE).write_text(json.dumps(manifest))
    exporter.export_bundle(ckpt, old, log=lambda line: None)
    assert load_manifest(old)["format_version"] == FORMAT_VERSION


# -- NaN and infinities ---------------------------------------------------------------------------

def test_a_nan_checkpoint_is_refused(model, ckpt, tmp_path, capsys):
    nan = tmp_path / "nan_ckpt"
    shutil.copytree(ckpt, nan)
    from safetensors.torch import load_file, save_file

    weights = load_file(nan / "model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in weights.items()},
              nan / "model.safetensors", metadata={"format": "pt"})
    code, err = _cli(capsys, "--checkpoint", str(nan), "--out", str(tmp_path / "out"))
    assert code == 2 and "NaN" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_validation_cannot_pass_on_nan(ckpt, tmp_path, monkeypatch):
    """A NaN that reaches the graphs (one LayerNorm gamma) fails the check against PyTorch."""
    real = exporter.stored_arrays

    def broken(model, precision, output_ids=None):
        arrays = real(model, precision, output_ids)
        arrays["dec.0.ln1.gamma"] = np.full_like(arrays["dec.0.ln1.gamma"], np.nan)
        return arrays

    monkeypatch.setattr(exporter, "stored_arrays", broken)
    with pytest.raises(ValidationError, match="inf"):
        exporter.export_bundle(ckpt, tmp_path / "out", log=lambda line: None)
    assert not (tmp_path / "out").exists()


# -- the int8 layout and the golden record ----------------------------------------------------------

def test_int8_blocks_are_ones_every_onnxruntime_computes(bundle_int8):
    """MatMulNBits with blocks of at most 256 (512 gave garbage or a refusal before 1.32), in the
    tiny bundle and in the shipped default (d_model 256, FFN 1024)."""
    from star_export.weights import block_size
    from star_runtime.runtime import default_bundle

    assert [block_size(k) for k in (64, 256, 1024, 2048)] == [64, 256, 256, 256]
    for folder in (bundle_int8, default_bundle()):
        sizes = set()
        for graph in ("encoder.onnx", "decoder_step.onnx"):
            for node in onnx.load(str(folder / graph), load_external_data=False).graph.node:
                if node.op_type == "MatMulNBits":
                    attrs = {a.name: a.i for a in node.attribute}
                    assert attrs["bits"] == 8
                    sizes.add(attrs["block_size"])
        assert sizes and max(sizes) <= 256, (folder, sizes)


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_a_bundle_dequantizes_to_the_weights_its_graphs_compute_with(model, tmp_path_factory, tokenizer_dir,
                                                                     tmp_path, precision):
    """star_export.dequantize: float32 gives the checkpoint back bit for bit; int8 gives W_q s
    exactly, and exporting that checkpoint again stores the same int8 arrays."""
    from star_export.dequantize import to_checkpoint
    from star_export.weights import collect, quantize_blocks, quantize_int8, runs_on_the_encoder, stored_arrays

    folder = tiny_bundle(tmp_path_factory, tokenizer_dir, precision)
    rebuilt = to_checkpoint(folder, tmp_path / "ckpt")
    assert load_model(tmp_path / "ckpt") is not None
    original, back = model.state_dict(), rebuilt.state_dict()
    if precision == "float32":
        assert all(torch.equal(original[k], back[k]) for k in original)
        return
    mats, _ = collect(model)
    mats_back, _ = collect(rebuilt)
    for name, (w, _) in mats.items():
        q, s = (quantize_int8 if runs_on_the_encoder(name) else quantize_blocks)(w)
        exact = q * s if q.dtype == np.int8 else ((q.astype(np.float32) - 128) * s[..., None]).reshape(w.shape[1], -1).T
        np.testing.assert_array_equal(mats_back[name][0], exact)
    again, first = stored_arrays(rebuilt, "int8"), stored_arrays(model, "int8")
    assert all(np.array_equal(again[k], first[k]) for k in first)


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_the_golden_record_is_compact_and_reproduced(tmp_path_factory, tokenizer_dir, precision):
    folder = tiny_bundle(tmp_path_factory, tokenizer_dir, precision)
    record = load_manifest(folder)["selfcheck"]
    size = len(json.dumps(record))
    print(f"{precision}: golden record {size} bytes, {len(record['steps'])} steps")
    assert size < 4000 and len(record["steps"]) == SELFCHECK_STEPS
    rt = Runtime.load(folder)  # passes its own self-check
    sids = rt.manifest["strategies"]["token_ids"]
    gen = rt.generate(record["context_ids"], max_new_tokens=SELFCHECK_STEPS, stop_at_eos=False, repetition_penalty=1.0)
    assert sids[gen.strategy_id] == sids[int(np.argmax(record["strategy_logits"]))]
    assert gen.tokens == [s["token"] for s in record["steps"]]


# -- a trimmed LM head -------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_a_trimmed_head_computes_the_full_heads_logits_for_its_tokens(ckpt, tmp_path, precision):
    """`output_ids`: the head's rows are those tokens only, their logits the full head's (the
    exporter validates against PyTorch on them), and every reply token is one of them."""
    exporter.export_bundle(ckpt, tmp_path / "full", precision=precision, log=lambda line: None)
    full = Runtime.load(tmp_path / "full")
    keep = np.unique(np.r_[np.random.default_rng(0).integers(4, full.spec.vocab_size, 300), full.spec.eos_id])
    exporter.export_bundle(ckpt, tmp_path / "trim", precision=precision, log=lambda line: None, output_ids=keep)
    trim = Runtime.load(tmp_path / "trim")
    assert trim.spec.output_size == len(keep) and np.array_equal(trim.engine.output_ids, keep)
    shared = json.loads((tmp_path / "trim" / MANIFEST_FILE).read_text())["shared_tensors"]
    if precision == "float32":  # the head has its own matrix, so the lookups read rows of E itself
        assert shared["embed.weight"]["shape"] == [full.spec.vocab_size, full.spec.d_model]
        assert "embed.weight_t" not in shared and shared["embed.weight"]["binding"] == "initializer"
    for ids in _prompts(full.spec.vocab_size, 4):
        a, b = full.engine.start(ids[None]), trim.engine.start(ids[None])
        for token in (full.spec.bos_id, 9, 10):
            a.step(token)
            b.step(token)
            if token == full.spec.bos_id:  # the strategy head: the same 8 rows of the embedding
                strategy_limit = 1e-5 if precision == "float32" else 0.05
                assert np.abs(full.engine.strategy_logits(a.hidden) - trim.engine.strategy_logits(b.hidden)).max() \
                    <= strategy_limit
            limit = 1e-5 if precision == "float32" else 0.05 * max(1.0, float(np.abs(a.logits).max()))
            assert np.abs(b.logits - a.logits[keep]).max() <= limit
        reply = trim.generate(ids, max_new_tokens=12, do_sample=True, seed=1)
        assert set(reply.tokens) <= set(keep.tolist())
    assert trim.batched(2).generate([5, 6, 7], max_new_tokens=3).tokens == trim.generate([5, 6, 7], max_new_tokens=3).tokens


def test_a_trimmed_heads_tokens_must_hold_end_of_reply(ckpt, tmp_path):
    with pytest.raises(ExportError, match="__end__ among them"):
        exporter.export_bundle(ckpt, tmp_path / "out", log=lambda line: None, output_ids=[5, 6, 7])
    assert not (tmp_path / "out").exists()


def test_a_bundle_with_a_bad_token_table_is_refused(ckpt, tmp_path):
    """A hand-edited id table (not increasing, or without __end__) is one clear refusal."""
    out = tmp_path / "trim"
    exporter.export_bundle(ckpt, out, log=lambda line: None, output_ids=list(range(4, 40)) + [2])
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    table = manifest["shared_tensors"]["lm.ids"]
    weights = bytearray((out / "weights.bin").read_bytes())
    ids = np.frombuffer(bytes(weights[table["offset"]:table["offset"] + table["length"]]), np.int32).copy()
    ids[[0, 1]] = ids[[1, 0]]  # no longer increasing
    weights[table["offset"]:table["offset"] + table["length"]] = ids.tobytes()
    (out / "weights.bin").write_bytes(bytes(weights))
    with pytest.raises(BundleError, match="id table"):
        Runtime.load(out, verify=False)
    manifest["io"]["output_size"] = manifest["io"]["vocab_size"]
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="no id table"):
        load_manifest(out, verify=False)


def test_cli_trims_the_head_to_the_training_targets(ckpt, tmp_path, capsys):
    from esconv_fixture import write_esconv

    from star_export.output_vocab import training_target_ids
    from star_runtime.tokenizer import Tokenizer

    data = write_esconv(tmp_path / "esconv")
    code, err = _cli(capsys, "--checkpoint", str(ckpt), "--out", str(tmp_path / "b"), "--trim-vocab", str(data))
    assert code == 0, err
    kept, _ = training_target_ids(Tokenizer.from_dir(ckpt), data)
    assert "the LM head keeps" in err and np.array_equal(Runtime.load(tmp_path / "b").engine.output_ids, kept)
    code, err = _cli(capsys, "--checkpoint", str(ckpt), "--out", str(tmp_path / "c"), "--trim-vocab",
                     str(tmp_path / "nowhere"))
    assert code != 0 and err.startswith("star-export: error:") and err.count("\n") == 1, err


def test_a_trimmed_bundle_does_not_dequantize(ckpt, tmp_path, capsys):
    """Its head keeps the bias of its own tokens only: rebuilding a checkpoint from it would invent the rest."""
    from star_export.dequantize import main as dequantize_main

    exporter.export_bundle(ckpt, tmp_path / "trim", log=lambda line: None, output_ids=list(range(4, 40)) + [2])
    assert dequantize_main([str(tmp_path / "trim"), str(tmp_path / "ckpt")]) == 2
    assert "trimmed" in capsys.readouterr().err and not (tmp_path / "ckpt").exists()

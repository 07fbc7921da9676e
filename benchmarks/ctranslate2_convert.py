"""A STAR checkpoint's base model (BlenderBot-Small, WITHOUT STAR) as a CTranslate2 model folder.

    python benchmarks/ctranslate2_convert.py CKPT OUT [--quantization int8]

CTranslate2 (4.x) has no loader for BlenderbotSmall. Its Bart loader
(ctranslate2.converters.transformers.BartLoader) reads the same module layout (q/k/v/out_proj,
fc1/fc2, *_layer_norm, embed_tokens, embed_positions, layernorm_embedding, lm_head,
final_logits_bias), so `BlenderbotSmallLoader` below subclasses it and changes only what differs:

- BlenderbotSmallConfig has no `normalize_before`: the layers are post-norm (like Bart), and the
  activation is the config's (gelu, CTranslate2's erf GELU);
- the encoder computes LN(scale * E[x] + P[t]), which is CTranslate2's order (embeddings times
  scale_embeddings, plus positions, then layernorm_embedding): Bart's mapping as is;
- the decoder computes LN(E[x]) + P[t]: the layer norm before the positions, and no scale
  (`decoder_embed_scale`). CTranslate2 would normalise after adding them, so the decoder's
  embedding table is folded to LN(E) (row by row, exactly what BlenderbotSmall computes per
  token), its scale_embeddings set to 1 and its layernorm_embedding removed. The LM head keeps
  E (the tied weight), which CTranslate2 stores once with the encoder's table (aliased); the
  folded table is one more vocab x d_model matrix on disk (+7 MB tiny, +112 MB base in float32);
- positions are learned with no offset (Bart's has 2; BartLoader reads `offset`, 0 here);
- the vocabulary comes from the checkpoint's tokenizer, one token string per id (the benchmark
  passes ids, turned into these strings), with BOS, EOS, UNK and the decoder start token taken
  from the model config's ids.

The loader is also registered for "BlenderbotSmallConfig" in CTranslate2's table, but its
TransformersConverter cannot open a checkpoint folder (AutoTokenizer's fast conversion of the
BlenderBot-Small BPE files fails: "Token `_</w>` out of vocabulary"). So `convert_checkpoint`
feeds the loader star_training's model itself (load_model(path).base: transformers'
BlenderbotSmallForConditionalGeneration; the STAR tensors are not converted) through
CTranslate2's Converter (validation, quantization, saving).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ctranslate2.converters.converter import Converter
from ctranslate2.converters.transformers import _SUPPORTED_ACTIVATIONS, BartLoader, register_loader
from ctranslate2.specs import transformer_spec

QUANTIZATIONS = ("float32", "int8", "int8_float32", "int16", "float16", "bfloat16", "int8_float16")


def vocabulary(model: Any, tokenizer: Any) -> list[str]:
    """One unique token string per id of the model's vocabulary: the tokenizer's where it has the id
    (star_runtime's Tokenizer or a transformers tokenizer), else "<id N>"."""
    size = model.config.vocab_size
    if tokenizer is None:
        known: dict[int, str] = {}
    elif hasattr(tokenizer, "id_to_token"):  # star_runtime.tokenizer.Tokenizer
        known = {i: tokenizer.id_to_token(i) for i in range(min(size, tokenizer.vocab_size))}
    else:
        known = {i: t for t, i in tokenizer.get_vocab().items() if i < size}
    tokens = [known.get(i, f"<id {i}>") for i in range(size)]
    if len(set(tokens)) != size:
        tokens = [f"<id {i}>" for i in range(size)]  # only the ids matter to the benchmark
    return tokens


def decoder_embed_scale(model: Any) -> float:
    """The factor the decoder applies to E[x] before its layer norm, as measured on one token.
    Not `decoder.embed_scale`: transformers 4.57's BlenderbotSmallDecoder keeps that attribute
    (sqrt(d_model) with scale_embedding) but no longer multiplies by it, and the export
    (star_export/graphs.py) follows what transformers computes. The factor reaches the output only
    through the layer norm's epsilon, so it matters only where E's rows are small (random weights)."""
    import torch

    decoder, seen = model.model.decoder, []
    hook = decoder.layernorm_embedding.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    token = model.config.decoder_start_token_id
    try:
        with torch.no_grad():
            d = model.config.d_model
            decoder(input_ids=torch.tensor([[token]]), encoder_hidden_states=torch.zeros(1, 1, d), use_cache=False)
    finally:
        hook.remove()
    row = decoder.embed_tokens.weight[token]
    scale = float(seen[0][0, 0] @ row / (row @ row))
    if not torch.allclose(seen[0][0, 0], row * scale, rtol=1e-5, atol=1e-7):
        raise ValueError("the decoder's input to layernorm_embedding is not a multiple of the token embedding")
    return scale


@register_loader("BlenderbotSmallConfig")
class BlenderbotSmallLoader(BartLoader):
    @property
    def architecture_name(self) -> str:
        return "BlenderbotSmallForConditionalGeneration"

    def get_model_spec(self, model: Any) -> transformer_spec.TransformerSpec:
        import torch

        config = model.config
        if config.encoder_attention_heads != config.decoder_attention_heads:
            raise ValueError("CTranslate2's TransformerSpec has one head count for the encoder and the decoder")
        spec = transformer_spec.TransformerSpec.from_config(
            (config.encoder_layers, config.decoder_layers), config.encoder_attention_heads, pre_norm=False,
            activation=_SUPPORTED_ACTIVATIONS[config.activation_function], layernorm_embedding=True)
        self.set_encoder(spec.encoder, model.model.encoder)
        self.set_decoder(spec.decoder, model.model.decoder)
        self.set_linear(spec.decoder.projection, model.lm_head)
        final_logits_bias = getattr(model, "final_logits_bias", None)
        if final_logits_bias is not None and final_logits_bias.nonzero().numel() != 0:
            spec.decoder.projection.bias = final_logits_bias.squeeze()

        decoder = model.model.decoder  # LN before the positions: fold it into the table
        with torch.no_grad():
            spec.decoder.embeddings.weight = decoder.layernorm_embedding(
                decoder.embed_tokens.weight * decoder_embed_scale(model)).detach().clone()
        spec.decoder.scale_embeddings = 1.0
        del spec.decoder.layernorm_embedding
        return spec

    def __call__(self, model: Any, tokenizer: Any) -> transformer_spec.TransformerSpec:
        import torch

        eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
        if len(eps) != 1:
            raise ValueError(f"the layer norms have several epsilons {sorted(eps)}; CTranslate2 takes one")
        spec = self.get_model_spec(model)
        tokens = vocabulary(model, tokenizer)
        c = model.config
        spec.config.bos_token, spec.config.eos_token = tokens[c.bos_token_id], tokens[c.eos_token_id]
        spec.config.unk_token = tokens[c.unk_token_id]
        spec.config.decoder_start_token = tokens[c.decoder_start_token_id]
        spec.config.layer_norm_epsilon = eps.pop()
        self.set_vocabulary(spec, tokens)
        return spec


class ModelConverter(Converter):
    """CTranslate2's Converter (validate, quantize, save) on an in-memory BlenderbotSmall model."""

    def __init__(self, model: Any, tokenizer: Any = None) -> None:
        self.model, self.tokenizer = model, tokenizer

    def _load(self) -> transformer_spec.TransformerSpec:
        import torch

        with torch.no_grad():
            return BlenderbotSmallLoader()(self.model.eval(), self.tokenizer)


def convert_model(model: Any, out: Path, quantization: str = "float32", tokenizer: Any = None) -> Path:
    """Write `model` (a transformers BlenderbotSmallForConditionalGeneration) to the folder `out`
    (replaced if present), its weights stored as `quantization`."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    ModelConverter(model, tokenizer).convert(str(out), quantization=quantization, force=True)
    return Path(out)


def convert_checkpoint(checkpoint: Path, out: Path, quantization: str = "float32") -> Path:
    """A STAR checkpoint's base model (STAR left out) to the folder `out`; the tokenizer beside
    the weights, if there is one, names the vocabulary."""
    from star_runtime.tokenizer import Tokenizer
    from star_training.checkpoint import load_model

    checkpoint = Path(checkpoint)
    tokenizer = Tokenizer.from_dir(checkpoint) if (checkpoint / "vocab.json").is_file() else None
    return convert_model(load_model(checkpoint).base, out, quantization, tokenizer)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ctranslate2_convert.py", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a STAR checkpoint folder")
    p.add_argument("out", type=Path, help="the CTranslate2 model folder to write (replaced if present)")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="float32")
    args = p.parse_args(argv)
    print(convert_checkpoint(args.checkpoint, args.out, args.quantization))
    return 0


if __name__ == "__main__":
    sys.exit(main())

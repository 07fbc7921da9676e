"""The bundle specification: the model's side of a manifest, typed, and the graphs' tensor names.

The exporter writes the manifest's "precision", "io", "strategies", "special_ids" and
"generation" sections from a BundleSpec (`as_manifest`) and builds the graphs with the names
below; the runtime reads the sections back once (`BundleSpec.from_manifest`, after
star_runtime.manifest validated them) and binds the graphs by the same names, so neither side
spells a name or a key of its own.

Tensor names (optimum's scheme, so the graphs read like optimum's in benchmarks/):

    encoder   input_ids [1, S]                 -> present.{i}.encoder.{key,value} [1, n, S, hd]
    step      input_ids [B, 1], position [B],     -> logits [B, V_out], hidden [B, d] (HOST_OUTPUTS),
              source_length [B] (STEP_INPUTS),
              past_key_values.{i}.encoder.{key,value} [B, n, S, hd],
              past_key_values.{i}.decoder.{key,value} [B, n, C, hd] -> present.{i}.decoder.{key,value}
                                                                        (the same buffers, in place)
              past_star.{max,norm,sum}                              present_star.{max,norm,sum}

V_out = output_size: the LM head's rows, the whole vocabulary or the tokens the model was
trained to produce (then logit k is token OUTPUT_IDS[k], a table in weights.bin).
position (int32) is each row's decoder position t_b, which is also how many cache positions it
has filled; source_length (int32) how many of the S encoder positions are its own (the rest is a
batch's padding). The decoder cache has a capacity C <= max_positions: the step writes row b's
k, v at index t_b of past_key_values.{i}.decoder.*, bound as present.{i}.decoder.* too, so
`cache_pairs` are bound once per sequence and never passed from call to call. STAR's present_star.*
of one call are the past_star.* of the next (`recurrent`); the encoder's present.{i}.encoder.* are
the step's past_key_values.{i}.encoder.* for the whole reply (`cross`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from star_runtime.sampling import DecodingOptions

STAR_STATE = ("max", "norm", "sum")  # STAR's streaming pool: m [B, 1], l [B, 1], a [B, d]
HOST_OUTPUTS = ("logits", "hidden")  # the step graph's first outputs; the rest is the state it updates
STEP_INPUTS = ("input_ids", "position", "source_length")  # what the host writes before every step
OUTPUT_IDS = "lm.ids"  # the shared tensor of a trimmed LM head: logit k is vocabulary id lm.ids[k]


class KVNames(NamedTuple):
    past_key: str
    past_value: str
    present_key: str
    present_value: str


def kv_names(layer: int, kind: str) -> KVNames:
    """The names of decoder layer `layer`'s `kind` ("encoder" = cross, "decoder" = self) attention cache."""
    past, present = f"past_key_values.{layer}.{kind}", f"present.{layer}.{kind}"
    return KVNames(f"{past}.key", f"{past}.value", f"{present}.key", f"{present}.value")


def star_names(part: str) -> tuple[str, str]:
    """(past, present) names of one part of STAR's state (one of STAR_STATE)."""
    return f"past_star.{part}", f"present_star.{part}"


@dataclass(frozen=True)
class BundleSpec:
    """What the runtime needs to know of the model: sizes, ids, strategies, decoding defaults."""

    precision: str  # "float32" | "int8" | "float16": the weights (star_runtime.manifest.PRECISIONS)
    float_dtype: str  # "float32" | "float16": the graphs' activations and state
    d_model: int
    decoder_layers: int
    decoder_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int  # the decoder's position table
    output_size: int  # the LM head's rows (vocab_size, or fewer: OUTPUT_IDS)
    pad_id: int
    bos_id: int  # __start__, also the decoder's first input
    eos_id: int  # __end__, also the separator between the context's turns
    unk_id: int
    strategy_labels: tuple[str, ...]  # "Question", ...: what people read
    strategy_tokens: tuple[str, ...]  # "[Question]", ...: the vocabulary's tokens
    strategy_token_ids: tuple[int, ...]
    strategy_logit_bias: tuple[float, ...]  # the LM head's bias at the strategy ids
    decoding: DecodingOptions  # the defaults of every reply
    max_source_length: int  # encoder tokens: the context's last ones

    @property
    def max_new_tokens(self) -> int:
        """The longest reply the position table holds: position 0 reads __start__, position 1 the
        strategy token, response token t (from 0) is chosen at position t + 1."""
        return self.max_positions - 1

    def recurrent(self) -> dict[str, str]:
        """present name -> past name, for STAR's state, which a step passes to the next."""
        return dict(star_names(part)[::-1] for part in STAR_STATE)

    def cache_pairs(self) -> dict[str, str]:
        """past name -> present name of every self-attention cache buffer (bound to both)."""
        pairs = {}
        for layer in range(self.decoder_layers):
            names = kv_names(layer, "decoder")
            pairs |= {names.past_key: names.present_key, names.past_value: names.present_value}
        return pairs

    def cross(self) -> dict[str, str]:
        """The encoder's output name -> the step's input name, for every cross-attention tensor."""
        pairs = {}
        for layer in range(self.decoder_layers):
            names = kv_names(layer, "encoder")
            pairs |= {names.present_key: names.past_key, names.present_value: names.past_value}
        return pairs

    def as_manifest(self) -> dict[str, Any]:
        """The manifest sections this spec is (star_runtime.manifest's schema)."""
        return {
            "precision": self.precision,
            "io": {"float_dtype": self.float_dtype, "d_model": self.d_model, "decoder_layers": self.decoder_layers,
                   "decoder_heads": self.decoder_heads, "head_dim": self.head_dim, "vocab_size": self.vocab_size,
                   "max_positions": self.max_positions, "output_size": self.output_size},
            "strategies": {"labels": list(self.strategy_labels), "tokens": list(self.strategy_tokens),
                           "token_ids": list(self.strategy_token_ids),
                           "logit_bias": list(self.strategy_logit_bias)},
            "special_ids": {"pad": self.pad_id, "bos": self.bos_id, "eos": self.eos_id, "unk": self.unk_id},
            "generation": {**self.decoding.as_manifest(), "max_source_length": self.max_source_length},
        }

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> BundleSpec:
        """The spec of a validated manifest (star_runtime.manifest.validate checked every value)."""
        io, strategies, special = manifest["io"], manifest["strategies"], manifest["special_ids"]
        generation = manifest["generation"]
        return cls(
            precision=manifest["precision"], float_dtype=io["float_dtype"], d_model=io["d_model"], decoder_layers=io["decoder_layers"],
            decoder_heads=io["decoder_heads"], head_dim=io["head_dim"], vocab_size=io["vocab_size"],
            max_positions=io["max_positions"], output_size=io["output_size"],
            pad_id=special["pad"], bos_id=special["bos"], eos_id=special["eos"], unk_id=special["unk"],
            strategy_labels=tuple(strategies["labels"]), strategy_tokens=tuple(strategies["tokens"]),
            strategy_token_ids=tuple(strategies["token_ids"]),
            strategy_logit_bias=tuple(float(b) for b in strategies["logit_bias"]),
            decoding=DecodingOptions.from_manifest(generation),
            max_source_length=generation["max_source_length"],
        )

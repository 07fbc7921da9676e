"""Model configuration: the STAR options and the size presets of the BlenderBot-Small base.

`StarConfig` is stored in every checkpoint as a plain dict (`star_config.json`); the base's
architecture is a transformers `BlenderbotSmallConfig` (`config.json`), built from a preset
here or read from a pretrained checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from transformers import BlenderbotSmallConfig

from star_kernels.module import DEFAULT_GATE_BIAS


@dataclass
class StarConfig:
    """What STAR adds to the base model (SPEC section 1).

    use_star: False bypasses STAR (h' = h): the BlenderBot-Joint baseline and training stage 1.
    strategy_token_ids: vocabulary ids of the strategy tokens in class-id order (the 8 tokens of
        `star_runtime.strategies.STRATEGIES`); the strategy logits are the LM head restricted to them.
    gate_hidden / refine_hidden: widths of the gate and refiner FFNs; None means d_model.
    """

    strategy_token_ids: list[int] = field(default_factory=list)
    use_star: bool = True
    gate: str = "vector"  # "vector": g in (0,1)^d; "scalar": one g per position
    gate_hidden: int | None = None
    refine_hidden: int | None = None
    gate_bias_init: float = DEFAULT_GATE_BIAS  # sigmoid(-3) = 0.047: STAR starts near the identity
    lambda0: float = 0.8  # weight of L_ST at the last epoch, see losses.dynamic_lambda

    def __post_init__(self) -> None:
        self.strategy_token_ids = [int(i) for i in self.strategy_token_ids]
        if len(set(self.strategy_token_ids)) != len(self.strategy_token_ids):
            raise ValueError(f"strategy_token_ids has duplicates: {self.strategy_token_ids}")
        if self.gate not in ("vector", "scalar"):
            raise ValueError(f"gate must be 'vector' or 'scalar', not {self.gate!r}")
        for name in ("gate_hidden", "refine_hidden"):
            width = getattr(self, name)
            if width is not None and (not isinstance(width, int) or width < 1):
                raise ValueError(f"{name} must be a positive integer or None, not {width!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StarConfig":
        """Inverse of `to_dict`; unknown keys are an error (they mean another format)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown StarConfig keys: {', '.join(unknown)}")
        return cls(**d)


def sized(d_model: int, layers: int, ffn: int, heads: int) -> dict[str, int]:
    """The size of a base: `layers` encoder and `layers` decoder layers of width d_model."""
    return dict(d_model=d_model, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads,
                decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn)


# Sizes of the base. Everything not listed is the real facebook/blenderbot_small-90M config.
PRESETS: dict[str, dict[str, int]] = {
    # Unit tests: 1.8M parameters (1.76M of them the embedding at the real vocabulary size).
    "tiny": sized(32, 2, 64, heads=4),
    # A smaller BlenderBot-Small that trains on ESConv on a 2-core CPU in about an hour per stage
    # (4 epochs of 12,271 examples at ~1.1 s per batch of 16): 18.3M parameters at the real
    # vocabulary size (14.1M of them the embedding), against 87.5M for "base". Chosen by
    # validation PPL at equal training time among the sizes that fit that hour
    # (star_training.size_sweep; docs/results.md): 278.6 against 285.0 (d128, 4+4 layers) and
    # 299.0 (d192, 3+3) after 150 s each.
    "compact": sized(256, 2, 1024, heads=4),
    # Exactly facebook/blenderbot_small-90M (its config.json).
    "base": sized(512, 8, 2048, heads=16),
}

# The rest of facebook/blenderbot_small-90M's config.json that changes the computation.
_BLENDERBOT_SMALL_90M = dict(
    max_position_embeddings=512,
    activation_function="gelu",
    dropout=0.1,
    attention_dropout=0.0,
    activation_dropout=0.0,
    encoder_layerdrop=0.0,
    decoder_layerdrop=0.0,
    init_std=0.02,
    scale_embedding=True,  # the transformers default is False
)


def base_config(
    preset: str, vocab_size: int, *, pad_id: int = 0, start_id: int = 1, eos_id: int = 2, unk_id: int = 3
) -> BlenderbotSmallConfig:
    """The transformers config of a randomly initialised base of size `preset`.

    vocab_size: the tokenizer's, strategy tokens included (54,952 on the real vocabulary).
    The special ids default to the real BlenderBot-Small vocabulary's; pass the tokenizer's.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return BlenderbotSmallConfig(
        vocab_size=vocab_size,
        **PRESETS[preset],
        **_BLENDERBOT_SMALL_90M,
        pad_token_id=pad_id,
        bos_token_id=start_id,
        decoder_start_token_id=start_id,
        eos_token_id=eos_id,
        forced_eos_token_id=eos_id,
        unk_token_id=unk_id,
        architectures=["BlenderbotSmallForConditionalGeneration"],
    )

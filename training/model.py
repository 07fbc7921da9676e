"""STAR on BlenderBot-Small: one encoder-decoder, strategy first, then the response (SPEC section 1).

    e        = encoder(context)                                       [B, S, d]
    h        = decoder(__start__ [strategy] r_1 .. r_n | e)            [B, T, d]  final states, before the LM head
    strategy = (W_E h_0 + b)[strategy ids]                            [B, 8]     from h, position 0 only
    h'       = STAR(h)  (h' = h when use_star is False)               [B, T, d]
    logits   = W_E h' + b                                             [B, T, V]  W_E: the shared embedding (tied)

    L_ST = CE(strategy logits, gold strategy)
    L_LM = sum over positions t >= 1 with a label of -log p(label_t)  / number of such positions

Decoder position 0 reads `__start__` and predicts the strategy from the ORIGINAL state h_0; the
positions after it (strategy token, then the response) predict the response from the fused
state h' (the paper's disentangling). Labels are `[strategy] + response + __end__` and the
decoder input is `__start__ + labels[:-1]`, so the label at position 0 (the strategy token) is
not part of L_LM and PPL = exp(nll_sum / n_tokens) is exactly the SPEC's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BlenderbotSmallConfig, BlenderbotSmallForConditionalGeneration
from transformers.cache_utils import Cache

from star_kernels import StarModule, StarState, empty_state
from star_training.config import StarConfig

IGNORE_INDEX = -100  # label of a position that is not scored (padding)


class StarOutput(NamedTuple):
    strategy_logits: torch.Tensor  # [B, n_strategies], from h_0
    lm_logits: torch.Tensor  # [B, T, V], from h'
    loss_lm: torch.Tensor | None  # mean NLL per scored token; None without labels
    loss_st: torch.Tensor | None  # mean strategy CE; None without strategy
    nll_sum: torch.Tensor | None  # summed NLL of the scored tokens
    n_tokens: torch.Tensor | None  # number of scored tokens
    hidden: torch.Tensor  # h  [B, T, d]
    fused: torch.Tensor  # h' [B, T, d]


class StarForConditionalGeneration(nn.Module):
    """transformers' BlenderbotSmallForConditionalGeneration (`self.base`) + StarModule (`self.star`).

    The STAR module always exists (so a stage-1 checkpoint has the stage-2 architecture);
    `star_config.use_star` decides whether it is applied.
    """

    def __init__(
        self,
        config: BlenderbotSmallConfig,
        star_config: StarConfig,
        *,
        base: BlenderbotSmallForConditionalGeneration | None = None,
    ) -> None:
        super().__init__()
        self.base = base if base is not None else BlenderbotSmallForConditionalGeneration(config)
        self.config = self.base.config
        self.star_config = star_config
        ids = star_config.strategy_token_ids
        if not ids:
            raise ValueError("StarConfig.strategy_token_ids is empty: pass the tokenizer's strategy_ids")
        if min(ids) < 0 or max(ids) >= self.config.vocab_size:
            raise ValueError(
                f"strategy token ids {ids} do not fit the vocabulary of {self.config.vocab_size} tokens"
            )
        self.star = StarModule(
            self.config.d_model,
            gate=star_config.gate,
            gate_hidden=star_config.gate_hidden,
            refine_hidden=star_config.refine_hidden,
            gate_bias_init=star_config.gate_bias_init,
            init_std=self.config.init_std,
        )
        self.register_buffer("strategy_ids", torch.tensor(ids, dtype=torch.long), persistent=False)

    # -- the pieces the exporter and the decoding loop call --------------------------------------
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encoder states e [B, S, d] of the context ids [B, S] (mask 1 = real token)."""
        return self.base.model.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        past_key_values: Cache | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        use_cache: bool = True,
    ) -> tuple[torch.Tensor, Cache | None]:
        """Final decoder states of the new positions and the updated KV cache.

        decoder_input_ids [B, t] are the positions after those already in `past_key_values`
        (None: start from position 0); attention_mask [B, S] is the encoder's.
        Returns h [B, t, d] (before the LM head) and the cache (None when use_cache is False).
        """
        out = self.base.model.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoder_hidden,
            encoder_attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        return out.last_hidden_state, out.past_key_values

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """LM head with BlenderBot's final_logits_bias: [..., d] -> [..., V]."""
        return self.base.lm_head(h) + self.base.final_logits_bias[0]

    def strategy_logits(self, h0: torch.Tensor) -> torch.Tensor:
        """The LM head restricted to the strategy tokens: h_0 [B, d] -> [B, n_strategies].

        Only the 8 rows of W_E are multiplied (8 x d instead of V x d).
        """
        weight = self.base.lm_head.weight[self.strategy_ids]  # [n_strategies, d]
        return F.linear(h0, weight, self.base.final_logits_bias[0, self.strategy_ids])

    def fuse(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """h' = STAR(h) over a block [B, T, d] (mask [B, T]); h itself when STAR is bypassed."""
        return self.star(h, mask) if self.star_config.use_star else h

    def fuse_step(self, h_t: torch.Tensor, state: StarState) -> tuple[torch.Tensor, StarState]:
        """One decoding position of `fuse`: h_t [B, d] and the pooling state before it."""
        return self.star.step(h_t, state) if self.star_config.use_star else (h_t, state)

    def empty_star_state(self, batch: int) -> StarState:
        """Pooling state before decoder position 0."""
        w = self.base.lm_head.weight
        return empty_state(batch, self.config.d_model, device=w.device, dtype=w.dtype)

    # -- teacher-forced forward with the losses ----------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        strategy: torch.Tensor | None = None,
    ) -> StarOutput:
        """input_ids/attention_mask [B, S]; decoder_input_ids/decoder_attention_mask/labels [B, T]
        (labels -100 where not scored); strategy [B] class ids. Losses are None without targets."""
        e = self.encode(input_ids, attention_mask)  # [B, S, d]
        h, _ = self.decode(
            decoder_input_ids, e, attention_mask, decoder_attention_mask=decoder_attention_mask, use_cache=False
        )  # [B, T, d]
        strategy_logits = self.strategy_logits(h[:, 0])  # [B, n_strategies]
        fused = self.fuse(h, decoder_attention_mask)  # [B, T, d]
        lm_logits = self.lm_logits(fused)  # [B, T, V]

        loss_lm = nll_sum = n_tokens = loss_st = None
        if labels is not None:
            targets = labels[:, 1:]  # position 0's label is the strategy token: L_ST, not L_LM
            nll_sum = F.cross_entropy(
                lm_logits[:, 1:].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            n_tokens = (targets != IGNORE_INDEX).sum()
            loss_lm = nll_sum / n_tokens.clamp(min=1)
        if strategy is not None:
            loss_st = F.cross_entropy(strategy_logits, strategy)
        return StarOutput(strategy_logits, lm_logits, loss_lm, loss_st, nll_sum, n_tokens, h, fused)


def resize_vocab(base: BlenderbotSmallForConditionalGeneration, vocab_size: int) -> None:
    """Grow the shared (tied) embedding and final_logits_bias to `vocab_size` rows.

    New rows (the strategy tokens) start at the mean of the existing embeddings, so their logits
    start at the average logit rather than at a random one that could dominate the softmax
    (Hewitt 2021, "Initializing new word embeddings"); their logit bias starts at 0.
    """
    n_old = base.get_input_embeddings().num_embeddings
    if vocab_size <= n_old:
        raise ValueError(f"cannot grow a vocabulary of {n_old} tokens to {vocab_size}")
    base.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        weight = base.get_input_embeddings().weight  # [V, d], also the LM head
        weight[n_old:] = weight[:n_old].mean(dim=0)


class TrainableParameters(NamedTuple):
    params: list[nn.Parameter]
    n_tensors: int
    n_trainable: int
    n_total: int


def trainable_parameters_for_stage(model: StarForConditionalGeneration, stage: int | str) -> TrainableParameters:
    """Freeze all but what `stage` trains, switch STAR on or off, print and return the counts.

    stage 0:        the whole base, STAR bypassed (dialogue pretraining, language-model loss only).
    stage 1:        the whole base, STAR bypassed (BlenderBot-Joint).
    stage 2:        only STAR and the shared token embedding (tied with the LM head), STAR on.
    stage "single": everything, STAR on.
    """
    if stage in (0, 1):
        chosen = list(model.base.parameters())
    elif stage == 2:
        chosen = [*model.star.parameters(), model.base.get_input_embeddings().weight]
    elif stage == "single":
        chosen = list(model.parameters())
    else:
        raise ValueError(f"stage must be 0, 1, 2 or 'single', not {stage!r}")
    model.star_config.use_star = stage not in (0, 1)
    model.requires_grad_(False)
    for p in chosen:
        p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() lists tied ones once
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    print(
        f"stage {stage}: {len(params)} tensors, {n_trainable:,} of {n_total:,} parameters trainable "
        f"({100 * n_trainable / n_total:.1f}%), STAR {'on' if model.star_config.use_star else 'bypassed'}"
    )
    return TrainableParameters(params, len(params), n_trainable, n_total)

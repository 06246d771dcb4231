"""Heads beside the Backbone. ScoreModel = HF's `*ForSequenceClassification` with num_labels = 1: a reward model.
PolicyWithValue = a causal LM (Decoder) with a value head beside its LM head: PPO's policy and value model.

Conventions as in jaxft.models.decoder (B batch · S length · D hidden).

Parameter paths mirror transformers' GenericForSequenceClassification: `model.…` (the Backbone) and
`score.kernel` [D, 1] (HF `score.weight` [1, D], no bias). The score is read at one position per row:
the rightmost real token whose id is not `pad_id`, exactly as transformers pools
(`argmax(arange(S) · (input_ids != pad_token_id))`), so left and right padding both work, and when
pad == eos a trailing EOS counts as padding: the score is read at the token before it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.context import ON, Ctx
from jaxft.models.config import DecoderConfig
from jaxft.models.attention import AttentionKernel
from jaxft.models.decoder import CPU_TUNED, REMAT_POLICIES, Backbone, Decoder, Linear, Tuning


def pooled_index(tokens, segment_ids, pad_id: int):
    """[B] index of the rightmost position that is real (segment > 0) and not `pad_id`; 0 when none is.

    jaxft pads with segment 0 (token id 0, which may be a real id), transformers with pad_token_id: a
    position counts as padding here exactly when it would be a pad id in transformers' padded batch."""
    S = tokens.shape[1]
    keep = (segment_ids > 0) & (tokens != pad_id)  # [B, S]
    return jnp.argmax(jnp.arange(S, dtype=jnp.int32) * keep, axis=-1)


class ScoreModel(nnx.Module):
    """A sequence scorer: the Backbone (HF's `model.`) and a scalar `score` head beside it.

    `ScoreModel(cfg, pad_id=2, rngs=nnx.Rngs(0))` is random (head ~ normal(0, init_std), transformers'
    init); `jaxft.formats.hf.load_pretrained(path, head="score", pad_token_id=…)` fills real weights.
    pad_id: the pad token id the pooling skips (static: part of the graph, like HF's config.pad_token_id).
    """

    def __init__(self, cfg: DecoderConfig, *, pad_id: int, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: str = "proj", tuning: Tuning = CPU_TUNED, attention: AttentionKernel | str = "auto",
                 init_std: float = 0.02, rngs: nnx.Rngs):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}; expected one of {sorted(REMAT_POLICIES)}")
        self.config, self.dtype, self.remat, self.tuning, self.pad_id = cfg, dtype, remat, tuning, int(pad_id)
        self.model = Backbone(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs, tuning=tuning,
                              attention=attention)
        # fp32 compute: one [D] · [D, 1] product per row, and the loss reads differences of scores
        self.score = Linear(cfg.hidden_size, 1, bias=False, dtype=jnp.float32, param_dtype=param_dtype,
                            rngs=rngs, name="score", tuning=tuning)
        self.score.kernel[...] = (init_std * jax.random.normal(rngs.params(), (cfg.hidden_size, 1))).astype(
            param_dtype)

    def __call__(self, tokens, positions=None, segment_ids=None, ctx: Ctx = ON):
        """tokens [B, S] → scores [B] fp32 (see `Backbone.__call__` for positions / segment_ids)."""
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        h, _ = self.model(tokens, positions, segment_ids, None, ctx)  # [B, S, D]
        idx = pooled_index(tokens, segment_ids, self.pad_id)  # [B]
        last = jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0]  # [B, D]
        return self.score(last.astype(jnp.float32))[:, 0]


class PolicyWithValue(Decoder):
    """A causal LM (the Decoder: `model.`, `lm_head`) and a value head `value_head.kernel` [D, 1] (no bias,
    fp32 compute) over the same final hidden states: one backbone, one trainable tree (adapters + the
    value head, jaxft.adapters.trainable_filter), one optimizer.

    TRL's PPO value model is a second `*ForSequenceClassification` whose `score` runs at every position;
    here that head reads the policy's backbone, and PPO starts it from a reward model's `score` kernel.
    PPO's value loss stops at the hidden states (jaxft.objectives.ppo.policy_forward): like TRL's separate
    value model, it trains the head and leaves the policy's adapter to the policy loss.
    Everything a Decoder does (generate, log-probs, exports of the policy) ignores the value head.
    """

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "proj",
                 tuning: Tuning = CPU_TUNED, attention: AttentionKernel | str = "auto", init_std: float = 0.02,
                 rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, tuning=tuning, attention=attention,
                         rngs=rngs)
        self.value_head = Linear(cfg.hidden_size, 1, bias=False, dtype=jnp.float32, param_dtype=param_dtype,
                                 rngs=rngs, name="value_head", tuning=tuning)
        self.value_head.kernel[...] = (init_std * jax.random.normal(rngs.params(), (cfg.hidden_size, 1))).astype(
            param_dtype)

    def values(self, h):
        """Final hidden states h [..., D] → value estimates [...] fp32."""
        return self.value_head(h.astype(jnp.float32))[..., 0]

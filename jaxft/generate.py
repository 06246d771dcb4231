"""Sampling with a KV cache: one jitted prefill over the (left-padded) prompts, then jitted decode steps.

Prompts of different lengths are left-padded into one batch; padding has segment id 0, so it is
never attended to, and positions count real tokens only (as transformers does with an attention
mask). Greedy when temperature == 0, else temperature / top-k / top-p sampling from a seed.
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.models.decoder import Decoder


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0


def sample_logits(logits, key, s: Sampling):
    """logits [B, V] (fp32) → token ids [B]."""
    if s.temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / s.temperature
    if s.top_k:
        kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if s.top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        cutoff = jnp.min(jnp.where(before < s.top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


def _bucket(n: int, size: int = 32) -> int:
    return -(-n // size) * size


class Generator:
    """Compiled prefill / decode for one model; reuse it across calls to avoid recompiling.

    >>> gen = Generator(model)
    >>> gen([[1, 2, 3], [4, 5]], eos_ids={2}, sampling=Sampling(max_new_tokens=20))
    [[...], [...]]
    """

    def __init__(self, model: Decoder):
        self.graphdef, self.state = nnx.split(model)
        self.model_dtype = model.dtype

    @partial(jax.jit, static_argnums=(0, 6), donate_argnums=(2,))
    def _prefill(self, state, cache, tokens, positions, segment_ids, sampling, key):
        model = nnx.merge(self.graphdef, state)
        h, cache = model.hidden(tokens, positions, segment_ids, cache)
        logits = model.logits(h[:, -1]).astype(jnp.float32)
        return sample_logits(logits, key, sampling), cache

    @partial(jax.jit, static_argnums=(0, 5), donate_argnums=(2,))
    def _decode(self, state, cache, tokens, positions, sampling, key):
        model = nnx.merge(self.graphdef, state)
        h, cache = model.hidden(tokens[:, None], positions[:, None], jnp.ones_like(tokens)[:, None], cache)
        logits = model.logits(h[:, -1]).astype(jnp.float32)
        return sample_logits(logits, key, sampling), cache

    def __call__(self, prompts: list[list[int]], *, eos_ids: Iterable[int], sampling: Sampling = Sampling(),
                 on_token: Callable[[np.ndarray], None] | None = None) -> list[list[int]]:
        """Generate for each prompt; returns the new token ids of each, without the EOS that ended it.

        on_token(ids [B]) is called after every step (for streaming)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        B, P = len(prompts), _bucket(max(len(p) for p in prompts))
        tokens = np.zeros((B, P), np.int32)
        seg = np.zeros((B, P), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, P - len(p):], seg[i, P - len(p):] = p, 1
        pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
        cache = nnx.merge(self.graphdef, self.state).init_cache(B, P + _bucket(sampling.max_new_tokens))
        key = jax.random.key(sampling.seed)
        eos = jnp.asarray(sorted(set(eos_ids)), jnp.int32)

        key, sub = jax.random.split(key)
        tok, cache = self._prefill(self.state, cache, tokens, pos, seg, sampling, sub)
        next_pos = jnp.asarray(pos[:, -1] + 1)
        out, done = [], jnp.zeros((B,), bool)
        for step in range(sampling.max_new_tokens):
            out.append(tok)
            done = done | jnp.isin(tok, eos)
            if on_token is not None:
                on_token(np.asarray(tok))
            if step + 1 == sampling.max_new_tokens or (step % 8 == 7 and bool(done.all())):
                break
            key, sub = jax.random.split(key)
            tok, cache = self._decode(self.state, cache, tok, next_pos, sampling, sub)
            next_pos = next_pos + 1
        ids = np.stack([np.asarray(t) for t in out], axis=1)
        eos_set = set(int(e) for e in eos)
        result = []
        for row in ids.tolist():
            cut = next((i for i, t in enumerate(row) if t in eos_set), len(row))
            result.append(row[:cut])
        return result


def eos_token_ids(tokenizer, model_path=None) -> set[int]:
    """EOS ids from the tokenizer and, for an HF directory, generation_config.json / config.json."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if model_path is not None and Path(model_path).is_dir():
        for name in ("generation_config.json", "config.json"):
            f = Path(model_path) / name
            if f.is_file():
                e = json.loads(f.read_text()).get("eos_token_id")
                ids.update([e] if isinstance(e, int) else (e or []))
    return ids


def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` rendered with the tokenizer's chat template, ready for the answer."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]

"""Sampling with a KV cache, as a pure function of the weights: `generate(graphdef, weights, prompts)`.

One compiled program per shape bucket runs the prefill over the (left-padded) prompts and the decode
loop (`lax.while_loop`, stopping early once every row has produced an EOS), and returns the tokens
with their log-probs at the sampling temperature. Padding has segment id 0, so it is never attended
to, and positions count real tokens only (as transformers does with an attention mask). Greedy when
temperature == 0, else temperature / top-k / top-p sampling from a seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from functools import partial
from pathlib import Path
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback
from jax.sharding import NamedSharding, PartitionSpec as P_

from jaxft.adapters import bank
from jaxft.adapters.bank import names_of
from jaxft.context import ON, Ctx
from jaxft.models.decoder import Decoder, cache_rows
from jaxft.sharding import BATCH, batch_spec, to_host


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


def bucket(n: int, size: int = 32) -> int:
    return -(-n // size) * size


def row_bucket(n: int) -> int:
    """Batch rows padded to a bucket (1, 2, 4, 8, then multiples of 8): few compiles across batch sizes."""
    return 1 << (n - 1).bit_length() if n <= 8 else bucket(n, 8)


def shared_rows(keys: list) -> tuple[list[int], np.ndarray]:
    """(first, src): the row index of each distinct key in order of first appearance, and for every row the
    position of its key in `first` — rows that repeat a prompt run it once (prefill, reference forward)."""
    at: dict = {}
    src = np.asarray([at.setdefault(k, len(at)) for k in keys], np.int32)
    return np.unique(src, return_index=True)[1].tolist(), src  # src numbers keys by first appearance


def token_logprob(logits, tok, temperature: float):
    """log p(tok) [B] under softmax(logits / T) — T = 1 for greedy decoding — over the whole vocabulary
    (top-k / top-p truncation is not renormalized: the training forward's log-probs match it)."""
    return _logprob_entropy(logits, tok, temperature)[0]


def _logprob_entropy(logits, tok, temperature: float):
    """(log p(tok) [B], entropy [B] in nats) of softmax(logits / T) over the whole vocabulary."""
    z = logits / temperature if temperature > 0 else logits
    lsm = jax.nn.log_softmax(z, axis=-1)
    entropy = -jnp.sum(jnp.exp(lsm) * lsm, axis=-1)
    return jnp.take_along_axis(lsm, tok[:, None], axis=-1)[:, 0], entropy


@dataclasses.dataclass
class Generated:
    """What `generate` returns, per prompt row.

    tokens [B, n] int: every sampled token (EOS included; what follows it is filler)
    logprobs [B, n] fp32: each token's log-prob at the sampling temperature
    entropies [B, n] fp32: the entropy (nats) of the temperature-scaled distribution each token came from
    lengths [B]: tokens up to and including the first EOS (n when none came); stopped [B]: an EOS came
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray
    entropies: np.ndarray | None = None

    def ids(self) -> list[list[int]]:
        """Each row's new token ids without the EOS that ended it."""
        return [row[: n - int(s)].tolist() for row, n, s in zip(self.tokens, self.lengths, self.stopped)]


@partial(jax.jit, static_argnames=("graphdef", "sampling", "length", "on_token", "rows"))
def _run(weights, tokens, positions, segment_ids, alive, src, eos, key, max_new, ctx, *, graphdef,
         sampling: Sampling, length: int, on_token, rows):
    """Prefill + decode loop in one program. tokens/positions/segment_ids [U, P] (left-padded);
    alive [B] (False: a padding row); src [B]: the prefill row of each row (None: U = B, row i is
    prefill row i); eos [E]; max_new: a traced bound, so it costs no compile. rows: the PartitionSpec
    of the B rows on the context mesh (None without one).
    The KV cache ([L, U, P + length, K, H] for the prefill, then its rows gathered to B) is allocated inside
    and updated in place by the loop: it is never an input, so nothing needs donating and no copy of it
    crosses the program boundary."""
    model = nnx.merge(graphdef, *weights)
    U, P = tokens.shape
    B = alive.shape[0]
    T = sampling.temperature

    def pick(h, key):
        logits = model.logits(h[:, -1]).astype(jnp.float32)  # [B, V]
        tok = sample_logits(logits, key, sampling).astype(jnp.int32)
        return tok, *_logprob_entropy(logits, tok, T)

    cache = model.init_cache(U, P + length)
    h, cache = model.hidden(tokens, positions, segment_ids, cache, ctx)
    if src is not None:  # each distinct prompt was prefilled once: its last state and cache go to its rows
        h, positions = h[:, -1:][src], positions[src]
        cache = cache_rows(cache, src)
        if rows is not None:
            h, positions = (jax.lax.with_sharding_constraint(x, rows) for x in (h, positions))
            cache = dict(cache, segment_ids=jax.lax.with_sharding_constraint(cache["segment_ids"], rows),
                         **{n: jax.lax.with_sharding_constraint(cache[n], P_(None, *rows)) for n in ("k", "v")})
    key, sub = jax.random.split(key)
    tok, lp, ent = pick(h, sub)
    out_tok = jnp.zeros((B, length), jnp.int32).at[:, 0].set(tok)
    out_lp = jnp.zeros((B, length), jnp.float32).at[:, 0].set(lp)
    out_ent = jnp.zeros((B, length), jnp.float32).at[:, 0].set(ent)
    done = ~alive | jnp.isin(tok, eos)
    if on_token is not None:
        io_callback(on_token, None, tok, ordered=True)

    def cond(c):
        i, _, _, _, done, _, _ = c
        return (i < max_new) & ~jnp.all(done)

    def body(c):
        i, tok, pos, cache, done, key, outs = c
        key, sub = jax.random.split(key)
        h, cache = model.hidden(tok[:, None], pos[:, None], jnp.ones_like(tok)[:, None], cache, ctx)
        tok, lp, ent = pick(h, sub)
        if on_token is not None:
            io_callback(on_token, None, tok, ordered=True)
        outs = (outs[0].at[:, i].set(tok), outs[1].at[:, i].set(lp), outs[2].at[:, i].set(ent))
        return i + 1, tok, pos + 1, cache, done | jnp.isin(tok, eos), key, outs

    start = (jnp.ones((), jnp.int32), tok, positions[:, -1] + 1, cache, done, key, (out_tok, out_lp, out_ent))
    n, *_, (out_tok, out_lp, out_ent) = jax.lax.while_loop(cond, body, start)
    return out_tok, out_lp, out_ent, n


def generate(graphdef, weights, prompts: list[list[int]], *, eos_ids: Iterable[int], sampling: Sampling = Sampling(),
             ctx: Ctx = ON, mesh: jax.sharding.Mesh | None = None,
             on_token: Callable[[np.ndarray], None] | None = None, prompt_length: int = 0) -> Generated:
    """Sample a completion for each prompt from the model `nnx.merge(graphdef, *weights)`.

    A pure function of the weights: compiled once per (rows, prompt length, new-token) bucket and
    sampling settings, whatever the weights' values, and holding no reference to them once it returns —
    call it again after every update. weights: a tuple of nnx.State (e.g. (params, frozen)).
    ctx: adapters on / off, per-row adapter ids (padded rows reuse row 0's). mesh: run on it (the
    weights already placed; the rows split over (data, fsdp) when they divide). on_token(ids [B]) is
    called from inside the program after every step (streaming); it is part of the compile key, so
    pass the same callable for a session. prompt_length: pad the prompts to at least this many tokens (a caller's
    own shape bucket, e.g. jaxft.lm_eval's powers of two; by default the longest prompt rounded up to 32).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    B, P = len(prompts), max(bucket(max(len(p) for p in prompts)), prompt_length)
    R = row_bucket(B)
    # Rows that repeat a prompt (GRPO's G completions of each) share its prefill, unless adapters differ by row
    first, src = shared_rows([tuple(p) for p in prompts]) if ctx.adapter_ids is None else ([], None)
    if len(first) in (0, B):
        src, distinct = None, prompts + [prompts[0]] * (R - B)
    else:
        distinct = [list(prompts[i]) for i in first]
        distinct += [distinct[0]] * (row_bucket(len(distinct)) - len(distinct))
        src = np.concatenate([src, np.zeros(R - B, np.int32)])
    tokens = np.zeros((len(distinct), P), np.int32)
    seg = np.zeros((len(distinct), P), np.int32)
    for i, p in enumerate(distinct):
        tokens[i, P - len(p):], seg[i, P - len(p):] = p, 1
    pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    alive = np.arange(R) < B
    if ctx.adapter_ids is not None:
        ids = np.asarray(ctx.adapter_ids)
        ctx = dataclasses.replace(ctx, adapter_ids=jnp.asarray(np.concatenate([ids, np.full(R - B, ids[0])])))
    eos = np.asarray(sorted(set(int(e) for e in eos_ids)) or [-1], np.int32)
    prefill, per_row, spec = (tokens, pos, seg), (alive, src), None
    if mesh is not None:
        spec = batch_spec(mesh, R)
        ways = mesh.shape["data"] * mesh.shape["fsdp"]
        # a few distinct prompts (fewer than the devices): every device prefills all of them
        where = NamedSharding(mesh, P_(BATCH) if len(distinct) % ways == 0 else P_())
        prefill = tuple(jax.device_put(a, where) for a in prefill)
        per_row = tuple(None if a is None else jax.device_put(a, NamedSharding(mesh, spec)) for a in per_row)
    args = (*prefill, *per_row)
    with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
        out_tok, out_lp, out_ent, n = _run(tuple(weights), *args, eos, jax.random.key(sampling.seed),
                                  np.int32(sampling.max_new_tokens), ctx, graphdef=graphdef,
                                  sampling=dataclasses.replace(sampling, max_new_tokens=0, seed=0),
                                  length=bucket(sampling.max_new_tokens), on_token=on_token,
                                  rows=spec if src is not None else None)
    n = int(n)
    out_tok, out_lp, out_ent = (to_host(x) for x in (out_tok, out_lp, out_ent))
    toks, lps = out_tok[:B, :n], out_lp[:B, :n]
    is_eos = np.isin(toks, eos)
    stopped = is_eos.any(axis=1)
    lengths = np.where(stopped, is_eos.argmax(axis=1) + 1, n)
    return Generated(toks, lps, lengths, stopped, out_ent[:B, :n])


class Generator:
    """A model's weights bound to `generate` (the compiled program is shared by every Generator of the
    same model structure; the weights are arguments, never baked into it).

    >>> gen = Generator(model)
    >>> gen([[1, 2, 3], [4, 5]], eos_ids={2}, sampling=Sampling(max_new_tokens=20))
    [[...], [...]]
    """

    def __init__(self, model: Decoder, ctx: Ctx = ON, mesh=None):
        self.graphdef, self.state = nnx.split(model)
        self.ctx, self.mesh = ctx, mesh
        self.adapter_names = names_of(model)  # an adapter bank's names (id = position), or ()

    def __call__(self, prompts: list[list[int]], *, eos_ids: Iterable[int], sampling: Sampling = Sampling(),
                 on_token: Callable[[np.ndarray], None] | None = None,
                 adapters: list[str | None] | None = None) -> list[list[int]]:
        """The new token ids of each prompt, without the EOS that ended it. adapters: with an adapter bank
        (jaxft.adapters.bank), the adapter name of each prompt (None / "base": the base model)."""
        ctx = self.ctx
        if adapters is not None:
            ids = bank.ids(self.adapter_names, adapters)
            ctx = dataclasses.replace(ctx, adapter_ids=jnp.asarray(ids))
        return generate(self.graphdef, (self.state,), prompts, eos_ids=eos_ids, sampling=sampling, ctx=ctx,
                        mesh=self.mesh, on_token=on_token).ids()


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


def answer_chats(graphdef, weights, tokenizer, prompts: list[list[dict]], *, eos: set[int], max_new_tokens: int,
                     batch_size: int, system_prompt: str | None = None, progress: str = "",
                     adapter_ids: list[int] | None = None, mesh: jax.sharding.Mesh | None = None) -> list[str]:
    """Greedy answers to chat prompts, in batches, from `nnx.merge(graphdef, *weights)`. adapter_ids: with an
    adapter bank, prompt i is answered by adapter adapter_ids[i] (-1: the base), in mixed batches. mesh: as
    `generate`'s (every process of a multi-process mesh gets every answer)."""
    answers = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        ids = [chat_prompt(tokenizer, with_system(m, system_prompt)) for m in chunk]
        ctx = ON if adapter_ids is None else Ctx(adapter_ids=jnp.asarray(adapter_ids[i:i + batch_size], jnp.int32))
        out = generate(graphdef, weights, ids, eos_ids=eos, sampling=Sampling(max_new_tokens=max_new_tokens),
                       ctx=ctx, mesh=mesh).ids()
        answers += [tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]
        if progress:
            print(f"\r{progress}: {len(answers)}/{len(prompts)}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return answers


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """`messages` with a system turn first (`system`), unless they have one."""
    if system and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system}] + messages
    return messages

"""A reward model as a function: `scorer(prompts, completions) → list[float]`, for files (`jaxft score`) and RL.

    scorer = Scorer.load("runs/reward")    # a reward run, or a *ForSequenceClassification model directory
    scorer(["n=123"], ["123"])             # [3.87]
"""

from __future__ import annotations

from pathlib import Path

import contextlib

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jaxft.config import RunConfig, load_config, read_config
from jaxft.data.encode import Encoder, Example, layout
from jaxft.data.rows import RowError, prompt_completion
from jaxft.errors import JaxftError
from jaxft.generate import bucket
from jaxft.runs import is_run, load_run
from jaxft.sharding import batch_spec, to_host


class Scorer:
    """A reward function: `scorer(prompts, completions) → list[float]`, one score per (prompt, completion).

    prompts: strings or chat message lists; completions: strings or assistant message lists (encoded
    like a preference pair's side: chat template, EOS). A sequence longer than max_length keeps its last
    max_length tokens (the score reads the end); a row that cannot be encoded scores NaN (TRL's "no reward").
    Batches of `batch_size` rows, lengths in multiples of 64: one compiled program per length, reused for
    new weights (`scorer.params = ...`, or `params=` per call). mesh: the weights' mesh (placed on it already);
    each batch's rows split over it, the scores gathered (over processes too: every process calls with the same rows).
    """

    def __init__(self, graphdef, params, frozen, tokenizer, *, batch_size: int = 8, max_length: int = 1024,
                 system_prompt: str | None = None, mesh: jax.sharding.Mesh | None = None):
        self.graphdef, self.params, self.frozen, self.tokenizer = graphdef, params, frozen, tokenizer
        self.batch_size, self.max_length, self.mesh = batch_size, max_length, mesh
        self.encoder = Encoder(tokenizer, False, system_prompt)
        self.fn = jax.jit(lambda p, f, b: nnx.merge(graphdef, p, f)(b["tokens"], b["positions"], b["segment_ids"]))

    @classmethod
    def load(cls, model_or_run: str, mesh: jax.sharding.Mesh | None = None, **kw) -> "Scorer":
        """From a reward run directory (its newest checkpoint) or a `*ForSequenceClassification` model
        directory (or "example" and other causal LMs: a new, untrained head); mesh: read into its shards."""
        loaded = load_run(_scoring_run(model_or_run), mesh=mesh, restore=is_run(model_or_run))
        kw.setdefault("max_length", loaded.run.data.max_length)
        kw.setdefault("system_prompt", loaded.run.data.system_prompt)
        return cls(loaded.setup.graphdef, loaded.params, loaded.setup.frozen, loaded.setup.tokenizer, mesh=mesh, **kw)

    def __call__(self, prompts, completions, params=None) -> list[float]:
        if len(prompts) != len(completions):
            raise JaxftError(f"Scorer: {len(prompts)} prompts but {len(completions)} completions")
        parsed = []
        for p, c in zip(prompts, completions):
            try:
                parsed.append(prompt_completion(p, c))
            except RowError as e:
                parsed.append(e)
        return self.score_parsed(parsed, params).tolist()

    def score_parsed(self, parsed: list, params=None) -> np.ndarray:
        """Scores [N] of parsed rows (jaxft.data.rows Chat / Pair; a RowError in the list scores NaN)."""
        docs = []
        for i, p in enumerate(parsed):
            try:
                if not isinstance(p, RowError):
                    docs.append((i, self.encoder.render(p, f"row {i}")))
            except RowError:  # the chat template rejects it: no score
                pass
        out = np.full(len(parsed), np.nan, np.float32)
        encoded = self.encoder.tokenize([d for _, d in docs]) if docs else []
        rows = [(i, Example(e[0][-self.max_length:], e[1][-self.max_length:]))
                for (i, _), e in zip(docs, encoded) if not isinstance(e, RowError)]
        params = self.params if params is None else params
        B = self.batch_size
        for k in range(0, len(rows), B):
            chunk = rows[k:k + B]
            S = min(bucket(max(len(ex) for _, ex in chunk), 64), self.max_length)
            batch = layout([[ex] for _, ex in chunk], B, S)
            batch = {n: batch[n] for n in ("tokens", "positions", "segment_ids")}
            if self.mesh is not None:
                where = NamedSharding(self.mesh, batch_spec(self.mesh, B))
                batch = {n: jax.make_array_from_callback(v.shape, where, lambda i, v=v: v[i]) for n, v in batch.items()}
            with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
                r = to_host(self.fn(params, self.frozen, batch))
            out[[i for i, _ in chunk]] = r[:len(chunk)]
        return out


def _scoring_run(model_or_run: str) -> RunConfig:
    """The run config that rebuilds a reward run's model, or a plain one around a model path."""
    p = Path(model_or_run).expanduser()
    if is_run(p):
        run = read_config(p)
        if run.objective != "reward":
            raise JaxftError(f"{p}: a run of objective {run.objective!r}; scoring needs a reward run")
        return run
    return load_config(None, ["objective=reward", f"model.path={model_or_run}", "lora.enabled=false"])

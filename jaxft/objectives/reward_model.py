"""Reward models: Bradley–Terry on preference pairs with a ScoreModel (TRL RewardTrainer's definitions),
and a scorer for files and for RL.

    loss_fn = make_loss(run.reward)        # (model, batch, ctx) → (sum of pair losses, pairs, metric sums)
    obj = make(run, setup, say)            # a jaxft.objective.Objective
    scorer = Scorer.load("runs/reward")    # scorer(prompts, completions) → list[float]

Chosen and rejected run in one forward pass (PairBatches' [2B, S]: chosen rows, then rejected rows);
r = the score at each row's last non-pad token (jaxft.models.heads). Per pair, with the row's optional
`margin` m and c = reward.center_rewards_coefficient:

    loss      −log σ(r_c − r_r − m)  (+ c · (r_c + r_r)²  when c is set; TRL adds c · mean((r_c + r_r)²))
              with a `confidence` column p (soft labels, e.g. `jaxft cai label`): −p log σ(d) − (1 − p) log σ(−d),
              d = r_c − r_r − m
    accuracy  r_c > r_r (strict: a tie counts 0)       margin  r_c − r_r       mean_reward  (r_c + r_r) / 2

min_reward / max_reward are extrema, not sums. In training (per step) they are the smallest / largest of
the 2B scores of each micro-batch, averaged over the step's micro-batches weighted by pairs: with
grad_accum = 1 the step's batch extremum, and TRL's per-micro-batch value averaged over a logging window.
In evaluation, eval_min_reward / eval_max_reward are the extrema over every evaluated score.

Pairs longer than data.max_length (either side) are dropped and counted, as TRL drops them (no truncation).
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.context import ON, Ctx
from jaxft.config import DpoConfig, RewardConfig, RunConfig
from jaxft.errors import JaxftError
from jaxft.objective import Objective, Prefetched, mean_over_batches
from jaxft.sharding import to_host

METRICS = ("accuracy", "margin", "min_reward", "mean_reward", "max_reward")
PAIRS = DpoConfig(truncate_prompt=False)  # TRL drops over-length pairs: no prompt truncation


def pair_losses(chosen, rejected, margin=None, center: float | None = None, soft=None):
    """Per-pair losses [B] and per-pair metrics {name: [B]} from the scores r_c, r_r [B] (fp32).
    soft = (p, 1 − p) [B], the pairs' soft labels: the Bradley–Terry cross-entropy −p log σ(d) − (1−p) log σ(−d)."""
    delta = chosen - rejected
    d = delta if margin is None else delta - margin
    if soft is None:
        loss = -jax.nn.log_sigmoid(d)
    else:
        loss = -soft[0] * jax.nn.log_sigmoid(d) - soft[1] * jax.nn.log_sigmoid(-d)
    if center is not None:
        loss = loss + center * (chosen + rejected) ** 2
    return loss, {"accuracy": (chosen > rejected).astype(delta.dtype), "margin": delta,
                  "mean_reward": (chosen + rejected) / 2}


def _forward(model, batch: dict, ctx: Ctx, center):
    """(loss sum, pairs, metric sums, scores [2B] with NaN on the empty rows) of a pair batch."""
    m = batch["pair_mask"]  # [B]
    B = m.shape[0]
    r = model(batch["tokens"], batch["positions"], batch["segment_ids"], ctx)  # [2B] fp32
    soft = (batch["confidence"], batch["smoothing"]) if "confidence" in batch else None
    losses, per_pair = pair_losses(r[:B], r[B:], batch.get("margin"), center, soft)
    pairs = jnp.sum(m)
    sums = {k: jnp.sum(v * m) for k, v in per_pair.items()}
    real = jnp.concatenate([m, m]) > 0
    some = pairs > 0  # an all-empty micro-batch has no extrema: it adds 0 (weight 0) instead of ±inf
    sums["min_reward"] = jnp.where(some, jnp.min(jnp.where(real, r, jnp.inf)), 0.0) * pairs
    sums["max_reward"] = jnp.where(some, jnp.max(jnp.where(real, r, -jnp.inf)), 0.0) * pairs
    return jnp.sum(losses * m), pairs, sums, jnp.where(real, r, jnp.nan)


def make_loss(cfg: RewardConfig):
    """loss_fn(model, batch, ctx) → (sum of pair losses, number of pairs, {metric: sum over pairs})."""

    def loss_fn(model, batch, ctx: Ctx = ON):
        return _forward(model, batch, ctx, cfg.center_rewards_coefficient)[:3]

    return loss_fn


def make_eval_fn(graphdef, cfg: RewardConfig):
    """(params, frozen, batch) → (sum, pairs, metric sums, scores [2B]): the loss plus the scores, whose
    extrema over the whole validation set are eval_min_reward / eval_max_reward."""
    return jax.jit(lambda p, f, b: _forward(nnx.merge(graphdef, p, f), b, Ctx(), cfg.center_rewards_coefficient))


def evaluator(eval_fn, batches, n: int):
    """evaluate(params, frozen) → eval_loss, eval_<metric> (means over pairs), true extrema, eval_pairs."""

    def evaluate(params, frozen):
        seen = []

        def step(p, f, b):
            s, c, sums, r = eval_fn(p, f, b)
            seen.append(r)
            return s, c, sums

        out = mean_over_batches(step, params, frozen, batches, n, "eval_pairs")
        r = np.concatenate([to_host(x) for x in seen])
        out["eval_min_reward"], out["eval_max_reward"] = float(np.nanmin(r)), float(np.nanmax(r))
        return out

    return evaluate


# ---------------------------------------------------------------- the objective


def pair_batches(run: RunConfig, setup, split: str, batch_size: int, say=lambda *a: None):
    """The split's PairBatches (None for an unconfigured validation split); over-length pairs dropped."""
    from jaxft.data.pairs import PairBatches, load_pairs

    pairs, report = load_pairs(run.data, PAIRS, setup.tokenizer, split)
    if not pairs:
        return None
    say(f"{split} pairs: {report.summary()}")
    return PairBatches(pairs, batch_size, run.data.max_length, run.data.seed)


def make(run: RunConfig, setup, say=lambda *a: None, wrap=lambda b: b, train: bool = True) -> Objective:
    """The reward-model objective: pair batches, the Bradley–Terry loss, validation (eval_loss,
    eval_accuracy, eval_margin, eval_{min,mean,max}_reward, eval_pairs)."""
    loss_fn = make_loss(run.reward)
    source = None
    if train:
        b = wrap(pair_batches(run, setup, "train", run.train.batch_size, say))
        source = Prefetched(lambda step: b.step(step - 1, run.train.grad_accum), len(b))
    val = pair_batches(run, setup, "validation", run.train.batch_size, say)
    evaluate = None
    if val is not None:
        evaluate = evaluator(make_eval_fn(setup.graphdef, run.reward), wrap(val), run.train.eval_batches)
    return Objective(name="reward", train=source, loss_fn=loss_fn, evaluate=evaluate, count_name="pairs",
                     metrics=METRICS, headline=("eval_accuracy", "eval_margin"))


# ---------------------------------------------------------------- scoring


def _bucket(n: int, limit: int) -> int:
    """Sequence length of a scoring batch: the next multiple of 64 (fewer shapes to compile), ≤ limit."""
    return min(limit, 64 * math.ceil(n / 64))


class Scorer:
    """A reward function: `scorer(prompts, completions) → list[float]`, one score per (prompt, completion).

    prompts: strings or chat message lists; completions: strings or assistant message lists (encoded
    like a preference pair's side: chat template, EOS). A sequence longer than max_length keeps its last
    max_length tokens (the score reads the end); a row that cannot be encoded scores NaN (TRL's "no reward").
    Batches of `batch_size` rows, lengths in multiples of 64: one compiled program per length, reused for
    new weights (`scorer.params = ...`, or `params=` per call).
    """

    def __init__(self, graphdef, params, frozen, tokenizer, *, batch_size: int = 8, max_length: int = 1024,
                 system_prompt: str | None = None):
        from jaxft.data.encode import Encoder

        self.graphdef, self.params, self.frozen, self.tokenizer = graphdef, params, frozen, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.encoder = Encoder(tokenizer, False, system_prompt)
        self.fn = jax.jit(lambda p, f, b: nnx.merge(graphdef, p, f)(b["tokens"], b["positions"], b["segment_ids"]))

    @classmethod
    def load(cls, model_or_run: str, **kw) -> "Scorer":
        """From a reward run directory (its newest checkpoint) or a `*ForSequenceClassification` model
        directory (or "example" and other causal LMs: a new, untrained head)."""
        from jaxft.setup import build

        run = _scoring_run(model_or_run)
        setup = build(run)
        params = setup.params
        if (Path(model_or_run) / "checkpoints").is_dir():
            from jaxft.checkpoint import restore_trainable

            params, _ = restore_trainable(model_or_run, setup.params)
        kw.setdefault("max_length", run.data.max_length)
        kw.setdefault("system_prompt", run.data.system_prompt)
        return cls(setup.graphdef, params, setup.frozen, setup.tokenizer, **kw)

    def __call__(self, prompts, completions, params=None) -> list[float]:
        from jaxft.data.rows import RowError, _prompt_completion

        if len(prompts) != len(completions):
            raise JaxftError(f"Scorer: {len(prompts)} prompts but {len(completions)} completions")
        parsed = []
        for p, c in zip(prompts, completions):
            try:
                parsed.append(_prompt_completion(p, c))
            except RowError as e:
                parsed.append(e)
        return self.score_parsed(parsed, params).tolist()

    def score_parsed(self, parsed: list, params=None) -> np.ndarray:
        """Scores [N] of parsed rows (jaxft.data.rows Chat / Pair; a RowError in the list scores NaN)."""
        from jaxft.data.encode import Example, layout
        from jaxft.data.rows import RowError

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
            S = _bucket(max(len(ex) for _, ex in chunk), self.max_length)
            batch = layout([[ex] for _, ex in chunk], B, S)
            r = to_host(self.fn(params, self.frozen, {n: batch[n] for n in ("tokens", "positions", "segment_ids")}))
            out[[i for i, _ in chunk]] = r[:len(chunk)]
        return out


def _scoring_run(model_or_run: str) -> RunConfig:
    """The run config that rebuilds a reward run's model, or a plain one around a model path."""
    from jaxft.config import load_config

    p = Path(model_or_run).expanduser()
    if p.is_dir() and (p / "config.json").is_file() and (p / "checkpoints").is_dir():
        run = load_config(p / "config.json")
        if run.objective != "reward":
            raise JaxftError(f"{p}: a run of objective {run.objective!r}; scoring needs a reward run")
        return run
    return load_config(None, ["objective=reward", f"model.path={model_or_run}", "lora.enabled=false"])


def score_file(model_or_run: str, input_path: str, out_path: str | None = None, *, batch_size: int = 8,
               max_length: int | None = None) -> dict:
    """Score every row of a JSONL: preference pairs (chosen_score, rejected_score; accuracy overall) or
    prompt/completion rows (score; `messages` rows: the last message is the completion). Bad rows are
    skipped and counted. Writes `out_path` (default <input>.scores.jsonl) atomically; returns the summary."""
    from jaxft.data.pairs import parse_pair
    from jaxft.data.rows import RowError, _prompt_completion, read_rows, write_jsonl_atomic

    kw = {} if max_length is None else {"max_length": max_length}
    scorer = Scorer.load(model_or_run, batch_size=batch_size, **kw)
    records = read_rows(input_path)
    kinds, parsed, bad = [], [], 0
    for rec in records:
        try:
            row = rec.row
            if isinstance(row, RowError):
                raise row
            if isinstance(row, dict) and "chosen" in row:
                parsed += list(parse_pair(row))
                kinds.append((rec.where, 2))
            elif isinstance(row, dict) and "messages" in row and "prompt" not in row:
                parsed.append(_prompt_completion(row["messages"][:-1], row["messages"][-1:]))
                kinds.append((rec.where, 1))
            else:
                parsed.append(_prompt_completion(row.get("prompt") if isinstance(row, dict) else row,
                                                 row.get("completion") if isinstance(row, dict) else None))
                kinds.append((rec.where, 1))
        except (RowError, TypeError):
            bad += 1
    scores = scorer.score_parsed(parsed)
    rows, k, right, n_pairs = [], 0, 0, 0
    for where, n in kinds:
        s = scores[k:k + n]
        k += n
        if np.isnan(s).any():
            bad += 1
        elif n == 2:
            rows.append(dict(row=where, chosen_score=float(s[0]), rejected_score=float(s[1])))
            right, n_pairs = right + int(s[0] > s[1]), n_pairs + 1
        else:
            rows.append(dict(row=where, score=float(s[0])))
    out = Path(out_path or Path(input_path).with_suffix(".scores.jsonl"))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out, rows)
    summary = dict(scored=len(rows), bad=bad, out=str(out))
    if n_pairs:
        summary.update(pairs=n_pairs, accuracy=right / n_pairs)
    return summary

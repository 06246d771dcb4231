"""PPO with a reward model (TRL 1.12's experimental PPOTrainer, the last TRL release that had it).

    obj = make(run, setup, say, wrap)      # a jaxft.objective.Objective over a PolicyWithValue

Conventions: N rollout rows · P prompt length (left-padded to a multiple of 32, jaxft.objectives.rollout.layout)
· T = rollout.max_completion_length (TRL's response_length) · B micro-batch rows · A = train.grad_accum ·
M = ppo.num_mini_batches.

One rollout batch is N = B·A·M prompts. Its first optimizer step samples a response per prompt from the
current weights (jaxft.generate at rollout.temperature + 1e-7, as TRL) and scores it; the old log-probs and
values come from one forward pass of those weights (so the first ratio is exactly 1); then num_ppo_epochs passes,
each over a fresh permutation cut into M minibatches of A micro-batches, are that many optimizer steps
(`train.steps` counts optimizer steps). Per response token t (0-based), with s = index of the last kept
token (the first EOS, or T − 1) and W = the generated width (TRL's `responses.shape[1]`):

    logp, ref     log-probs at temperature (policy: adapters on; reference: adapters off, no weight copy)
    values        the value head at the position that predicts token t (TRL's shift); s + 1 reads the last
                  kept token itself, so no padding position is ever read
    padding       t > s (logp = ref := 1.0, TRL's INVALID_LOGPROB);  value padding  t > s + 1 (V := 0)
    kl            k1: logp − ref   |   k3: (e^(ref−logp) − 1) − (ref − logp)
    reward        −kl_coef·kl, plus the score at t = s + 1 (s when s + 1 = W) — the reward model's score
                  at the last kept token, minus missing_eos_penalty without an EOS
    GAE           δ_t = r_t + γV_{t+1} − V_t,  A_t = δ_t + γλA_{t+1};  returns = A + V;  A whitened over
                  t ≤ s (Bessel variance, rsqrt(var + 1e-8)), 0 on padding; optional reward whitening first
    loss          masked_mean(max(−A·ρ, −A·clip(ρ, 1 ± cliprange)), t ≤ s)
                  + vf_coef · 0.5 · masked_mean(max((v−R)², (clip(v, V ± cliprange_value)−R)²), t ≤ s + 1)
                  (v reads the backbone's hidden states outside the gradient: the value loss trains the value
                  head only, as TRL's separate value model leaves the policy's weights alone)

Means are per micro-batch, as TRL's; the loss returns (mean·B, B, metric means·B), so a step's loss
and metrics are the mean over its micro-batches. Metrics (TRL's names): objective/{kl, entropy,
non_score_reward, rlhf_reward, scores} of the rows a step trains on, policy/{approxkl_avg,
clipfrac_avg, entropy_avg}, loss/{policy_avg, value_avg}, val/{clipfrac_avg, ratio}.

The rollout batch (tokens, masks, old log-probs and values, advantages, returns) is written to
<out_dir>/rollouts/ when sampled, so a run resumed mid-batch continues on the same rollouts; sampling
is seeded by (train.seed, rollout index) and minibatch permutations by (data.seed, rollout, epoch).
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft import sharding
from jaxft.config import PpoConfig, RunConfig
from jaxft.context import OFF, ON, Ctx
from jaxft.data.prompts import load_prompts
from jaxft.errors import JaxftError
from jaxft.files import atomic_path
from jaxft.generate import Sampling, eos_token_ids, generate
from jaxft.losses import token_logprobs
from jaxft.objective import Objective
from jaxft.objectives.rollout import Split, layout, mesh_of
from jaxft.scoring import Scorer
from jaxft.sharding import to_host

INVALID_LOGPROB = 1.0  # TRL's fill value on padding: logp − ref = 0 there
TEMPERATURE_EPS = 1e-7  # TRL samples and scores at temperature + 1e-7
ROW_METRICS = ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
               "objective/scores")
METRICS = (*ROW_METRICS, "policy/approxkl_avg", "policy/clipfrac_avg", "policy/entropy_avg", "loss/policy_avg",
           "loss/value_avg", "val/clipfrac_avg", "val/ratio",
           "val/num_eos_tokens", "time/rollout", "time/score")  # the last three: the sampling step's only


# ---------------------------------------------------------------- pure functions of arrays


def masked_mean(x, mask):
    return jnp.sum(x * mask) / jnp.sum(mask)


def masked_whiten(x, mask, shift_mean: bool = True):
    """(x − mean)·rsqrt(var + 1e-8) over the masked entries, var Bessel-corrected (TRL's masked_whiten)."""
    mean = masked_mean(x, mask)
    n = jnp.sum(mask)
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1)
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def gae(rewards, values, gamma: float, lam: float):
    """Advantages [N, T] by generalized advantage estimation, backwards over t (V_T = 0)."""
    next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1)))
    delta = rewards + gamma * next_values - values  # [N, T]

    def back(last, d):
        last = d + gamma * lam * last
        return last, last

    _, adv = jax.lax.scan(back, jnp.zeros_like(delta[:, 0]), delta.T, reverse=True)
    return adv.T


def score_rollout(logp, ref, values, scores, seq_len, stopped, width, cfg: PpoConfig) -> dict:
    """Rewards, advantages and returns of a rollout batch (TRL 1.12 PPOTrainer.train, steps 3–6).

    logp, ref, values [N, T] fp32 (raw: any value on padding); scores [N] (the reward model's); seq_len
    [N] index of each row's last kept token; stopped [N] bool (an EOS came); width: the generated width
    W ≤ T (TRL's arrays are W wide; the positions ≥ W here are padding and change nothing).
    Returns [N, T] logprobs, values, rewards, advantages, returns, kl, masks (mask_p: t ≤ s, mask_v:
    t ≤ s + 1 and t < W, mask_w: t < W) and [N] scores (after the EOS penalty) and per-row sums.
    """
    T = logp.shape[1]
    t = jnp.arange(T)[None, :]
    pad = t > seq_len[:, None]  # [N, T]
    pad_v = (t > seq_len[:, None] + 1) | (t >= width)
    logp, ref = jnp.where(pad, INVALID_LOGPROB, logp), jnp.where(pad, INVALID_LOGPROB, ref)
    values = jnp.where(pad_v, 0.0, values)
    if cfg.missing_eos_penalty is not None:
        scores = scores - cfg.missing_eos_penalty * (~stopped)
    logr = ref - logp
    kl = -logr if cfg.kl_estimator == "k1" else jnp.expm1(logr) - logr
    non_score = -cfg.kl_coef * kl
    end = jnp.where(seq_len + 1 < width, seq_len + 1, seq_len)  # one past the last kept token, if it exists
    rewards = non_score + jax.nn.one_hot(end, T, dtype=non_score.dtype) * scores[:, None]
    if cfg.whiten_rewards:
        rewards = jnp.where(pad_v, 0.0, masked_whiten(rewards, ~pad_v, shift_mean=False))
    adv = gae(rewards, values, cfg.gamma, cfg.lam)
    returns = adv + values
    adv = jnp.where(pad, 0.0, masked_whiten(adv, ~pad))
    f = lambda m: m.astype(logp.dtype)  # noqa: E731
    return dict(logprobs=logp, values=values, rewards=rewards, advantages=adv, returns=returns, kl=kl,
                scores=scores, mask_p=f(~pad), mask_v=f(~pad_v), mask_w=f(jnp.broadcast_to(t < width, pad.shape)),
                kl_sum=kl.sum(1), entropy_sum=(-logp * f(~pad)).sum(1), non_score_sum=non_score.sum(1))


def ppo_losses(new_logp, vpred, mb: dict, cfg: PpoConfig):
    """The clipped policy and value losses of one micro-batch → (loss·B, B, {metric: value·B}).

    new_logp, vpred [B, T] fp32 from the current weights; mb holds the rollout's logprobs, values,
    advantages, returns and masks [B, T] (see `score_rollout`). Means over the micro-batch as TRL's."""
    B = new_logp.shape[0]
    m_p, m_v, m_w = mb["mask_p"], mb["mask_v"], mb["mask_w"]
    new_logp = jnp.where(m_p > 0, new_logp, INVALID_LOGPROB)
    vpred = jnp.where(m_v > 0, vpred, 0.0)
    old_v, ret, adv = mb["values"], mb["returns"], mb["advantages"]
    v_clip = jnp.clip(vpred, old_v - cfg.cliprange_value, old_v + cfg.cliprange_value)
    vf1, vf2 = (vpred - ret) ** 2, (v_clip - ret) ** 2
    vf_loss = 0.5 * masked_mean(jnp.maximum(vf1, vf2), m_v)
    diff = new_logp - mb["logprobs"]
    ratio = jnp.exp(diff)
    pg1, pg2 = -adv * ratio, -adv * jnp.clip(ratio, 1.0 - cfg.cliprange, 1.0 + cfg.cliprange)
    pg_loss = masked_mean(jnp.maximum(pg1, pg2), m_p)
    loss = pg_loss + cfg.vf_coef * vf_loss
    sg = jax.lax.stop_gradient
    metrics = {"loss/policy_avg": pg_loss, "loss/value_avg": vf_loss,
               "policy/clipfrac_avg": masked_mean((pg2 > pg1).astype(ratio.dtype), m_p),
               "val/clipfrac_avg": masked_mean((vf2 > vf1).astype(ratio.dtype), m_v),
               "policy/approxkl_avg": 0.5 * masked_mean(diff ** 2, m_w),  # TRL: over every position < W
               "val/ratio": masked_mean(ratio, m_w)}
    return loss * B, jnp.asarray(B, jnp.float32), {k: sg(v) * B for k, v in metrics.items()}


def row_metrics(mb: dict) -> dict:
    """Sums over the micro-batch's rows of the rollout's per-row objective/* values."""
    return {"objective/kl": mb["kl_sum"].sum(), "objective/entropy": mb["entropy_sum"].sum(),
            "objective/non_score_reward": mb["non_score_sum"].sum(), "objective/scores": mb["scores"].sum(),
            "objective/rlhf_reward": (mb["non_score_sum"] + mb["scores"]).sum()}


# ---------------------------------------------------------------- the model's side


def policy_forward(model, mb: dict, ctx: Ctx, temperature: float, values: bool = True):
    """Response log-probs [B, T] at `temperature` and value estimates [B, T] (or None) of a rollout
    micro-batch: tokens/positions/segment_ids [B, P + T] (prompt, then response), responses [B, T].
    Token t is predicted from position P − 1 + t, and its value is read there too (TRL's shift).

    The value head reads the hidden states outside the gradient: TRL's value model is a network of its
    own, so the value loss trains the value head alone and the policy's adapter gets the policy loss's
    gradient only (through the shared adapter, the value loss damped each step's policy change 3-30×)."""
    T = mb["responses"].shape[1]
    h, _ = model.hidden(mb["tokens"], mb["positions"], mb["segment_ids"], ctx=ctx)
    hr = h[:, h.shape[1] - T - 1:-1]  # [B, T, D]
    lp = token_logprobs(model, hr, mb["responses"], temperature=temperature + TEMPERATURE_EPS)
    return lp, (model.values(jax.lax.stop_gradient(hr)) if values else None), hr


def _entropy(model, hr, temperature: float, mask):
    """Mean over the masked tokens of the sampling distribution's entropy, outside the gradient (TRL
    averages every position < W; the padding positions' logits are not defined the same way here)."""
    z = model.logits(jax.lax.stop_gradient(hr)).astype(jnp.float32) / (temperature + TEMPERATURE_EPS)  # [B, T, V]
    ent = jax.nn.logsumexp(z, axis=-1) - jnp.sum(jax.nn.softmax(z, axis=-1) * z, axis=-1)  # [B, T]
    return masked_mean(jax.lax.stop_gradient(ent), mask)


def make_loss(cfg: PpoConfig, temperature: float):
    """loss_fn(model, micro-batch, ctx) → (loss·B, B, {metric: ·B}) for a PolicyWithValue."""

    def loss_fn(model, mb, ctx: Ctx = ON):
        lp, v, hr = policy_forward(model, mb, ctx, temperature)
        s, c, sums = ppo_losses(lp, v, mb, cfg)
        sums["policy/entropy_avg"] = _entropy(model, hr, temperature, mb["mask_p"]) * c
        return s, c, {**sums, **row_metrics(mb)}

    return loss_fn


def make_rollout_fn(graphdef, rm_graphdef, temperature: float):
    """jit (params, frozen, rm_weights, mb) → old logprobs, values, reference logprobs [B, T] and the
    reward model's score [B] at each row's last kept token (position P + seq_len)."""

    def fn(params, frozen, rm_weights, mb):
        model = nnx.merge(graphdef, params, frozen)
        lp, v, _ = policy_forward(model, mb, ON, temperature)
        ref, _, _ = policy_forward(model, mb, OFF, temperature, values=False)
        rm = nnx.merge(rm_graphdef, *rm_weights)
        h, _ = rm.model(mb["tokens"], mb["positions"], mb["segment_ids"])  # [B, P + T, D]
        at = h.shape[1] - mb["responses"].shape[1] + mb["seq_len"]  # [B]
        last = jnp.take_along_axis(h, at[:, None, None], axis=1)[:, 0]  # [B, D]
        score = rm.score(last.astype(jnp.float32))[:, 0]
        return dict(logp=lp, values=v, ref=jax.lax.stop_gradient(ref), score=score)

    return jax.jit(fn)


# ---------------------------------------------------------------- rollouts on the host


def responses_of(tokens: np.ndarray, lengths: np.ndarray, T: int) -> tuple[np.ndarray, np.ndarray]:
    """Sampled tokens [N, W] (W ≤ T) and lengths [N] (up to and including the first EOS) → the responses
    [N, T] (0 after the last kept token) and seq_len [N] (the index of that token)."""
    seq_len = lengths.astype(np.int32) - 1
    keep = np.arange(T)[None, :] <= seq_len[:, None]
    return np.where(keep, np.pad(tokens, ((0, 0), (0, T - tokens.shape[1]))), 0).astype(np.int32), seq_len


TRAIN_KEYS = ("tokens", "positions", "segment_ids", "responses", "logprobs", "values", "advantages", "returns",
              "mask_p", "mask_v", "mask_w", "scores", "kl_sum", "entropy_sum", "non_score_sum")


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] >> 1)


class PpoSource:
    """The PPO BatchSource: `source(step, params)` → the micro-batches [A, B, ...] of optimizer step `step`.

    Keys (placed by `wrap`): tokens / positions / segment_ids [A, B, P + T] (jaxft.objectives.rollout.layout);
    responses, logprobs, values, advantages, returns, mask_p, mask_v, mask_w [A, B, T]; scores, kl_sum,
    entropy_sum, non_score_sum [A, B]. All of them are computed outside the gradient, once per rollout
    batch, from the weights of that batch's first step: sampling, the policy's log-probs and values, the
    adapter-off reference's log-probs, the reward model's score, then `score_rollout`.
    """

    def __init__(self, run: RunConfig, setup, prompts: list, reward, wrap=lambda b: b, say=lambda *a: None):
        c, t, r = run.ppo, run.train, run.rollout
        self.cfg, self.run, self.setup, self.prompts, self.wrap, self.say = c, run, setup, prompts, wrap, say
        self.B, self.A, self.M = t.batch_size, t.grad_accum, c.num_mini_batches
        self.N = self.B * self.A * self.M
        if len(prompts) < self.N:
            raise JaxftError(f"data.train: {len(prompts)} usable prompts, but a rollout batch needs {self.N} "
                             f"(train.batch_size × train.grad_accum × ppo.num_mini_batches)")
        self.per_rollout = c.num_ppo_epochs * self.M  # optimizer steps per rollout batch
        self.T, self.temperature = r.max_completion_length, r.temperature
        self.eos = sorted(eos_token_ids(setup.tokenizer, setup.model_path))
        self.reward_graphdef, self.reward_weights = reward
        mesh = mesh_of(setup.params)
        if mesh is not None:  # the reward model's weights on the policy's mesh, sharded by the same rules
            self.reward_weights = sharding.place(self.reward_weights, sharding.tree_shardings(
                self.reward_weights, mesh, run.mesh.strategy))
        self.rollout_fn = make_rollout_fn(setup.graphdef, self.reward_graphdef, self.temperature)
        self.score_fn = jax.jit(lambda *a: score_rollout(*a, cfg=c))
        self.dir = Path(t.out_dir) / "rollouts"
        # rollout batches a kept checkpoint may resume inside (jaxft.checkpoint keeps train.keep of them)
        self.kept = (t.keep * t.save_every) // self.per_rollout + 2
        self.index, self.arrays, self.metrics, self.fresh = None, {}, {}, False

    def __len__(self) -> int:
        return (len(self.prompts) // self.N) * self.A * self.M

    def close(self) -> None:
        self.arrays = {}

    def pick(self, k: int) -> list:
        """The N prompts of rollout batch k: a seeded shuffle per epoch, an incomplete last batch of an epoch
        skipped (TRL's PPO dataloader: shuffle, drop_last)."""
        per_epoch = len(self.prompts) // self.N
        epoch, chunk = divmod(k, per_epoch)
        order = np.random.default_rng([self.run.data.seed, epoch]).permutation(len(self.prompts))
        return [self.prompts[i] for i in order[chunk * self.N:(chunk + 1) * self.N]]

    def sample(self, k: int, params) -> dict[str, np.ndarray]:
        """Rollout batch k from the weights `params`: sample, forward, score, advantages (host arrays)."""
        r = self.run.rollout
        ids = [p.ids for p in self.pick(k)]
        s = Sampling(temperature=r.temperature + TEMPERATURE_EPS, top_k=r.top_k, top_p=r.top_p,
                     max_new_tokens=self.T, seed=_seed(self.run.train.seed, k))
        t0 = time.perf_counter()
        gen = generate(self.setup.graphdef, (params, self.setup.frozen), ids, eos_ids=self.eos, sampling=s,
                       mesh=mesh_of(params))
        t1 = time.perf_counter()
        responses, seq_len = responses_of(gen.tokens, gen.lengths, self.T)
        tokens, positions, segment_ids = layout(ids, responses, seq_len + 1)
        fwd = dict(tokens=tokens, positions=positions, segment_ids=segment_ids, responses=responses, seq_len=seq_len)
        split = self.wrap(Split(fwd, self.N // self.B))  # the forward passes in training's micro-batches
        outs = [jax.tree.map(to_host, self.rollout_fn(params, self.setup.frozen, self.reward_weights, split.batch(i)))
                for i in range(self.N // self.B)]
        got = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
        scored = jax.tree.map(to_host, self.score_fn(got["logp"], got["ref"], got["values"], got["score"], seq_len,
                                              gen.stopped, np.int32(gen.tokens.shape[1])))
        self.metrics = {"time/rollout": t1 - t0, "time/score": time.perf_counter() - t1,
                        "val/num_eos_tokens": float(np.isin(gen.tokens, self.eos).sum())}
        return {**fwd, **{k: np.asarray(scored[k]) for k in TRAIN_KEYS if k in scored}}

    def _load(self, k: int) -> dict[str, np.ndarray]:
        """Rollout batch k as its first step saved it (a run resumed inside the batch trains on it again)."""
        path = self.dir / f"{k}.npz"
        if not path.is_file():
            raise JaxftError(f"{path}: missing; a PPO run resumed inside a rollout batch needs the rollouts it "
                             f"trained on (written beside the checkpoints)")
        with np.load(path) as f:
            return dict(f)

    def _save(self, k: int, arrays: dict) -> None:
        if jax.process_index() != 0:
            return
        with atomic_path(self.dir / f"{k}.npz", ".npz") as tmp:
            np.savez(tmp, **arrays)
        for old in self.dir.glob("*.npz"):
            if old.stem.isdigit() and int(old.stem) <= k - self.kept:
                old.unlink()

    def __call__(self, step: int, params) -> dict:
        k, i = divmod(step - 1, self.per_rollout)
        self.fresh = False
        if self.index != k:
            if i == 0:
                jax.block_until_ready(params)  # the previous step's update is not part of the rollout's time
                self.arrays, self.fresh = self.sample(k, params), True
                self._save(k, self.arrays)
            else:
                self.say(f"\nstep {step}: resumed inside rollout batch {k}; its saved rollouts are read back")
                self.arrays = self._load(k)
            self.index = k
        epoch, mb = divmod(i, self.M)
        rows = np.random.default_rng([self.run.data.seed, k, epoch]).permutation(self.N)[
            mb * self.A * self.B:(mb + 1) * self.A * self.B]
        return self.wrap(Split({key: v[rows] for key, v in self.arrays.items()}, self.A)).step(0, self.A)

    def host_metrics(self, step: int) -> dict:
        """The sampling step's timings and EOS count (TRL's val/num_eos_tokens); {} on the other steps."""
        return {k: np.float64(v) for k, v in self.metrics.items()} if self.fresh else {}


# ---------------------------------------------------------------- the objective


def load_reward(path: str, setup):
    """The frozen reward model (graphdef, (params, frozen)) on one device, checked against the policy."""
    scorer = Scorer.load(path)
    rm = nnx.merge(scorer.graphdef, scorer.params, scorer.frozen)
    vocab = setup.frozen["model"]["embed_tokens"]["embedding"].shape[0]  # the reward model reads the policy's ids
    if rm.config.vocab_size != vocab:
        raise JaxftError(f"ppo.reward_model: {path} has a vocabulary of {rm.config.vocab_size} tokens, the policy "
                         f"{vocab}; PPO scores the policy's token ids, so both need the same tokenizer")
    return scorer.graphdef, (scorer.params, scorer.frozen), rm.score.kernel[...]


def init_value_head(setup, kernel) -> None:
    """Start the value head from the reward model's score kernel [D, 1] (TRL's example initializes the
    value model from the reward model), on the head's own sharding."""
    old = setup.params["value_head"]["kernel"]
    if tuple(kernel.shape) != tuple(old.shape):
        raise JaxftError(f"ppo.value_init=reward: the reward model's score head is {list(kernel.shape)}, the "
                         f"policy's value head {list(old.shape)} (different hidden sizes); use ppo.value_init=random")
    old.set_value(jax.device_put(jnp.asarray(kernel, old.get_value().dtype), old.get_value().sharding))


def make(run: RunConfig, setup, say=lambda *a: None, wrap=lambda b: b, train: bool = True) -> Objective:
    """The PPO objective over setup's PolicyWithValue: the rollout source, the clipped losses, no validation."""
    source = None
    if train:
        graphdef, weights, kernel = load_reward(run.ppo.reward_model, setup)
        if run.ppo.value_init == "reward":
            init_value_head(setup, kernel)
        prompts, report = load_prompts(run.data, setup.tokenizer, "train")
        say(f"train prompts: {report.summary()}")
        source = PpoSource(run, setup, prompts, (graphdef, weights), wrap, say)
    return Objective(name="ppo", train=source, loss_fn=make_loss(run.ppo, run.rollout.temperature),
                     count_name="episodes", metrics=METRICS, progress=("objective/scores", "objective/kl"),
                     heldout=run.data.validation)

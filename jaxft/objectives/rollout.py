"""On-policy batches: prompts → the jitted sampler on the CURRENT weights → rewards → the objective's batch.

    source = RolloutSource(run, setup, prompts, funcs, G=8, iterations=1, finish=finish, wrap=wrap)
    batch = source(step, params)           # micro-batches [A, B, …] for optimizer step `step`
    source.host_metrics(step)              # reward, completions/*, time/* of the rollout made for `step`

Every `iterations` steps (μ, TRL's num_iterations) one generation batch of N = A·B completions is sampled:
N / G prompts, each G times in consecutive rows, picked by a seeded permutation per epoch (an incomplete
last chunk of an epoch is skipped, as TRL's RepeatSampler does); the sampler's key is derived from
(train.seed, rollout index), so a resumed run samples exactly what the uninterrupted run did. The sampler
runs on the training arrays themselves (same mesh, adapters on): no weight copy, no sync.

The `Rollout` handed to the objective's `finish(rollout, params)`; rows N = A·B, S = P + L:
    tokens, positions, segment_ids [N, S] int32   prompt left-padded to P (a multiple of 32) + completion
                                                  right-padded to L = rollout.max_completion_length
    mask [N, L] f32       1 on each completion's tokens up to and including its first EOS (a row without
                          EOS is truncated: all 0 under rollout.mask_truncated_completions)
    logps, entropies [N, L] f32   the sampler's, at the sampling temperature
    rewards [N, K] f64    NaN where a function returned None
`finish` returns the micro-batches as {key: array [N, …]} (split into A micro-batches of B rows here,
groups kept whole in order, plus `prompt_sharing`'s keys) and its host metrics. `completion_logps` is the
training forward on that layout: log-probs [B, L] of the completion tokens, at the sampling temperature, each
distinct prompt of a micro-batch run once.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.config import residual_init
from jaxft.context import OFF, ON, Ctx
from jaxft.errors import JaxftError
from jaxft.generate import Sampling, eos_token_ids, generate, row_bucket, shared_rows
from jaxft.losses import token_logprobs
from jaxft.objectives.reward_funcs import score_all
from jaxft.sharding import to_host

PROMPT_BUCKET = 32  # prompt widths are multiples of this: a bounded number of train-step compiles


def completion_logps(model, batch: dict, ctx: Ctx, temperature: float) -> jax.Array:
    """log p(completion token) [B, L] fp32 under softmax(logits / T) (soft-cap first, as the sampler).
    Only the L positions that predict completion tokens go through the vocabulary projection.

    With `prefix_rows` [U] and `src` [B] in the batch (`prompt_sharing`) the prompt part of rows
    prefix_rows runs once and row b attends to the keys / values of prompt src[b]: (U·P + B·L) / (B·(P + L))
    of the tokens, forward and backward (each prompt's gradient is the sum over its rows); equal to the
    whole rows' forward but for the fp32 summation order. Not with per-row adapter ids or adapter dropout
    (every row draws its own dropout mask): those run whole rows."""
    L = batch["mask"].shape[1]
    cols = [batch[k] for k in ("tokens", "positions", "segment_ids")]
    if "src" not in batch or ctx.adapter_ids is not None or ctx.dropout_key is not None:
        h, _ = model.hidden(*cols, ctx=ctx)  # [B, S, D]
        return token_logprobs(model, h[:, -L - 1:-1], cols[0][:, -L:], temperature=temperature)
    P, first, src = cols[0].shape[1] - L, batch["prefix_rows"], batch["src"]
    h, kv = model.hidden(*(c[first, :P] for c in cols), ctx=ctx, keep_kv=True)
    hc, _ = model.hidden(*(c[:, P:] for c in cols), ctx=ctx, prefix=(kv, src))
    h = jnp.concatenate([h[:, -1:][src], hc[:, :-1]], axis=1)  # the states that predict each completion token
    return token_logprobs(model, h, cols[0][:, P:], temperature=temperature)


def prompt_sharing(rows: dict, L: int, A: int = 1, U: int | None = None, ways: int = 1) -> dict[str, np.ndarray]:
    """The keys that let `completion_logps` run each micro-batch's distinct prompts once: prefix_rows [A·U]
    (per micro-batch of B = N / A rows, the row of each distinct prompt, padded with the first) and src
    [A·B] (each row's prompt among them); {} when that saves nothing. U: the padded prompt count (default:
    the most any micro-batch has, bucketed); `ways`: the mesh's batch split, which U must divide (prompt
    rows split like whole rows: replicated, the fp32 sums over fsdp-split weights would change order)."""
    tokens, seg = np.asarray(rows["tokens"]), np.asarray(rows["segment_ids"])
    P = tokens.shape[1] - L
    B = tokens.shape[0] // A
    parts = [shared_rows([(t[:P].tobytes(), g[:P].tobytes()) for t, g in zip(tokens[i:i + B], seg[i:i + B])])
             for i in range(0, A * B, B)]
    most = max(len(first) for first, _ in parts)
    U = row_bucket(most) if U is None else U
    assert most <= U, (most, U)
    U = -(-U // ways) * ways
    if U >= B:
        return {}
    first = np.asarray([f + [f[0]] * (U - len(f)) for f, _ in parts], np.int32).reshape(-1)
    return dict(prefix_rows=first, src=np.concatenate([s for _, s in parts]).astype(np.int32))


@dataclasses.dataclass
class Rollout:
    prompts: list  # [N] jaxft.data.prompts.Prompt (each prompt G times)
    tokens: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    mask: np.ndarray
    logps: np.ndarray
    entropies: np.ndarray
    lengths: np.ndarray  # [N] completion tokens, EOS included
    truncated: np.ndarray  # [N] bool: no EOS within L
    rewards: np.ndarray
    index: int  # rollout number (0-based)

    def rows(self) -> dict[str, np.ndarray]:
        return dict(tokens=self.tokens, positions=self.positions, segment_ids=self.segment_ids, mask=self.mask)


def layout(prompts: list[list[int]], completions: np.ndarray, lengths: np.ndarray, bucket: int = PROMPT_BUCKET):
    """(tokens, positions, segment_ids) [N, P + L]: prompts left-padded to P, completions [N, L] kept up to
    `lengths` (later positions are padding, segment 0). Positions count real tokens, as the sampler's."""
    N, L = completions.shape
    P = -(-max(len(p) for p in prompts) // bucket) * bucket
    tokens = np.zeros((N, P + L), np.int32)
    seg = np.zeros((N, P + L), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):P] = p
        seg[i, P - len(p):P] = 1
    keep = np.arange(L)[None, :] < lengths[:, None]
    tokens[:, P:] = np.where(keep, completions, 0)
    seg[:, P:] = keep
    pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    return tokens, pos, seg


def initial_copy(params):
    """A copy of the trainable weights as they are now (a reference that training does not move; the
    training state is donated, so it must not share buffers with it)."""
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t))(params)


class Reference:
    """Log-probs of the reference policy on a rollout batch, outside the gradient.

    LoRA / DoRA / IA3 whose start is the base model: the same weights with the adapters switched off
    (`Ctx(enabled=False)`, no copy). Full fine-tuning, modules_to_save, PiSSA / OLoRA (a residual base) and a
    run that continues an adapter (lora.init_adapter): a frozen copy of the initial trainable weights, adapters
    on — the initial policy, as TRL's second model copy / "ref" adapter."""

    def __init__(self, run, setup):
        lora = run.lora
        self.off = lora.enabled and not lora.modules_to_save and not lora.init_adapter and not residual_init(lora.init)
        self.params = None if self.off else initial_copy(setup.params)
        self.kind = "adapters off" if self.off else "a frozen copy of the initial trainable weights"

    def weights(self, params):
        return (params, OFF) if self.off else (self.params, ON)


class RolloutSource:
    """The BatchSource of on-policy objectives (see the module docstring)."""

    def __init__(self, run, setup, prompts: list, funcs: list, *, G: int, iterations: int, finish,
                 wrap=lambda b: b, say=lambda *a: None):
        self.run, self.setup, self.prompts, self.funcs, self.G = run, setup, prompts, funcs, G
        self.iterations, self.finish, self.wrap, self.say = iterations, finish, wrap, say
        self.A, self.B = run.train.grad_accum, run.train.batch_size
        self.N = self.A * self.B
        self.n_prompts = self.N // G
        # the most prompts a micro-batch of B consecutive rows (groups of G in order) can hold, bucketed
        self.U = row_bucket(max(((j + 1) * self.B - 1) // G - j * self.B // G + 1 for j in range(self.A)))
        if len(prompts) < self.n_prompts:
            raise JaxftError(f"data.train: {len(prompts)} usable prompts, but a generation batch needs "
                             f"{self.n_prompts} (train.batch_size × train.grad_accum / num_generations)")
        r = run.rollout
        self.L = r.max_completion_length
        self.eos = eos_token_ids(setup.tokenizer, setup.model_path)
        if not self.eos:
            raise JaxftError("tokenizer: no EOS token id; a completion could never end")
        self.sampling = Sampling(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, max_new_tokens=self.L)
        self.cached: tuple[int, dict, dict] | None = None
        self.fresh_step = None

    def __len__(self) -> int:
        """Micro-batches per epoch of prompts."""
        return (len(self.prompts) // self.n_prompts) * self.A

    def close(self) -> None:
        self.cached = None

    def pick(self, r: int) -> list:
        """The prompts of rollout r (each G times in a row)."""
        per_epoch = len(self.prompts) // self.n_prompts
        epoch, chunk = divmod(r, per_epoch)
        order = np.random.default_rng([self.run.data.seed, epoch]).permutation(len(self.prompts))
        idx = order[chunk * self.n_prompts:(chunk + 1) * self.n_prompts]
        return [self.prompts[i] for i in idx for _ in range(self.G)]

    def sample(self, r: int, params) -> Rollout:
        """Rollout r from the weights `params` (completions, the sampler's log-probs, rewards)."""
        chosen = self.pick(r)
        seed = (self.run.train.seed * 1_000_003 + r) % (2**31 - 1)
        mesh = mesh_of(params)
        gen = generate(self.setup.graphdef, (params, self.setup.frozen), [p.ids for p in chosen], eos_ids=self.eos,
                       sampling=dataclasses.replace(self.sampling, seed=seed), mesh=mesh)
        return self.assemble(chosen, gen, r)

    def assemble(self, chosen: list, gen, r: int = 0) -> Rollout:
        """The Rollout of sampled completions (a jaxft.generate.Generated, one row per entry of `chosen`)."""
        N, L = len(chosen), self.L
        comp, lp, ent = (np.zeros((N, L), dt) for dt in (np.int32, np.float32, np.float32))
        n = gen.tokens.shape[1]
        comp[:, :n], lp[:, :n], ent[:, :n] = gen.tokens, gen.logprobs, gen.entropies
        lengths, truncated = gen.lengths.astype(np.int32), ~gen.stopped
        keep = np.arange(L)[None, :] < lengths[:, None]
        mask = keep.astype(np.float32)
        if self.run.rollout.mask_truncated_completions:
            mask[truncated] = 0.0
        tokens, pos, seg = layout([p.ids for p in chosen], comp, lengths)
        tok = self.setup.tokenizer
        ids = [comp[i, :lengths[i]].tolist() for i in range(N)]  # EOS included, as TRL passes them
        texts = tok.batch_decode(ids, skip_special_tokens=True)
        completions = [t if isinstance(p.prompt, str) else [{"role": "assistant", "content": t}]
                       for t, p in zip(texts, chosen)]
        columns = {k: [p.columns.get(k) for p in chosen] for k in dict.fromkeys(k for p in chosen for k in p.columns)}
        rewards = score_all(self.funcs, [p.prompt for p in chosen], completions, ids, columns)
        return Rollout(chosen, tokens, pos, seg, mask, lp * keep, ent * keep, lengths, truncated, rewards, r)

    def __call__(self, step: int, params) -> dict:
        r = (step - 1) // self.iterations
        if self.cached is None or self.cached[0] != r:
            if (step - 1) % self.iterations:
                self.say(f"\nstep {step}: resumed inside a generation batch; rollout {r} is sampled again from the "
                         f"current weights")
            t0 = time.perf_counter()
            jax.block_until_ready(params)  # the previous step's update: not part of the rollout's time
            t1 = time.perf_counter()
            rollout = self.sample(r, params)
            t2 = time.perf_counter()
            rows, metrics = self.finish(rollout, params)
            jax.block_until_ready(rows)
            t3 = time.perf_counter()
            metrics.update(completion_metrics(rollout))
            metrics.update({"time/rollout": t2 - t1, "time/score": t3 - t2, "time/wait_train": t1 - t0})
            self.cached = (r, self.place(rows, params), metrics)
            self.fresh_step = step
        return self.cached[1]

    def host_metrics(self, step: int) -> dict:
        """The rollout's metrics on the step that sampled it; {} on the steps that reuse it."""
        fresh = self.cached is not None and self.fresh_step == step
        return {k: np.float64(v) for k, v in self.cached[2].items()} if fresh else {}

    def place(self, rows: dict, params=None) -> dict:
        """{key: [N, …]} → micro-batches {key: [A, B, …]} on the mesh (via `wrap`), with the keys that run
        each micro-batch's prompts once in the training forward (`prompt_sharing`): groups are whole and in
        order, so a micro-batch holds at most `self.U` prompts whatever the rollout (one compiled step)."""
        mesh = None if params is None else mesh_of(params)
        ways = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        rows = dict(rows, **prompt_sharing(rows, self.L, self.A, self.U, ways))
        return self.wrap(Split(rows, self.A)).step(0, self.A)


class Split:
    """A generation batch as `jaxft.sharding.ShardedBatches` reads one: micro-batch j = part j of A equal
    parts of every key (rows [jB, (j+1)B) of the [N, …] keys; the prompt-sharing keys have their own sizes)."""

    row_subsets = False  # keys of different shapes: every process assembles the whole batch

    def __init__(self, rows: dict, A: int):
        self.rows, self.A = {k: np.asarray(v) for k, v in rows.items()}, A
        self.batch_size, self.seq_len = len(rows["tokens"]) // A, rows["tokens"].shape[1]

    def __len__(self) -> int:
        return self.A

    def batch(self, i: int, rows=slice(None)) -> dict:
        return {k: v.reshape(self.A, -1, *v.shape[1:])[i][rows] for k, v in self.rows.items()}

    def step(self, step: int, accum: int) -> dict:
        """Without a mesh: the stacked micro-batches, as host arrays."""
        return {k: v.reshape(accum, -1, *v.shape[1:]) for k, v in self.rows.items()}


def mesh_of(params):
    sh = getattr(jax.tree.leaves(params)[0], "sharding", None)
    return sh.mesh if isinstance(sh, jax.sharding.NamedSharding) and sh.mesh.size > 1 else None


def completion_metrics(ro: Rollout) -> dict[str, float]:
    """TRL's completions/* metrics of a rollout."""
    n = ro.lengths.astype(np.float64)
    term = n[~ro.truncated] if (~ro.truncated).any() else np.zeros(1)
    return {"completions/mean_length": n.mean(), "completions/min_length": n.min(),
            "completions/max_length": n.max(), "completions/clipped_ratio": float(ro.truncated.mean()),
            "completions/mean_terminated_length": term.mean(), "completions/min_terminated_length": term.min(),
            "completions/max_terminated_length": term.max()}


def make_forward(graphdef, temperature: float):
    """(params, frozen, batch [B, S] host arrays, ctx) → completion log-probs [B, L], outside any gradient.
    Rows that repeat a prompt (GRPO / RLOO's groups) run it once (`prompt_sharing`, `completion_logps`)."""
    fn = jax.jit(lambda p, f, b, ctx: jax.lax.stop_gradient(
        completion_logps(nnx.merge(graphdef, p, f), b, ctx, temperature)))

    def forward(p, f, batch, ctx: Ctx):
        if ctx.adapter_ids is None:
            mesh = mesh_of(p)
            ways = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
            batch = dict(batch, **prompt_sharing(batch, batch["mask"].shape[1], ways=ways))
        return fn(p, f, batch, ctx)

    forward.compiled = fn  # for compile counts
    return forward


def per_micro_batch(fn, rows: dict, B: int) -> np.ndarray:
    """fn(micro-batch rows) for each group of B rows, concatenated [N, …] (one compiled shape)."""
    N = rows["tokens"].shape[0]
    return np.concatenate([to_host(fn({k: v[i:i + B] for k, v in rows.items()})) for i in range(0, N, B)])

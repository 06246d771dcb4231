"""GRPO / RLOO pinned to TRL 1.16's own code: losses, gradients and metrics (`_compute_loss` with a fake
self, float64), advantages (a real GRPOTrainer / RLOOTrainer on fixed rollouts), RL.md §1.9 / §2 check
values, and the objective end to end through `jaxft train` on a toy verifiable reward."""

import itertools
import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxft.objectives import policy_gradient as pg


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)


def _accelerator():
    return types.SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction="sum": x, num_processes=1,
                                 gather_for_metrics=lambda x: x, device="cpu")


def _trl_inputs(mask, adv, **extra):
    """The tensors `_compute_loss` reads besides the log-probs (one dummy prompt token per row)."""
    B, T = mask.shape
    return dict(prompt_ids=torch.zeros((B, 1), dtype=torch.long), prompt_mask=torch.ones((B, 1), dtype=torch.long),
                completion_ids=torch.zeros((B, T), dtype=torch.long), completion_mask=torch.tensor(mask),
                advantages=torch.tensor(adv), **extra)


def _trl_grpo(cfg: pg.PgLoss, logp, old, ref, adv, mask, entropy, num_items, ga, spg):
    """TRL's GRPOTrainer._compute_loss (training mode) → (loss, d loss / d logp, metrics)."""
    from trl import GRPOTrainer

    lp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    me = types.SimpleNamespace(
        args=types.SimpleNamespace(use_bias_correction_kl=cfg.bias_correction_kl, delta=cfg.delta,
                                   sapo_temperature_pos=cfg.sapo_pos, sapo_temperature_neg=cfg.sapo_neg,
                                   steps_per_generation=spg),
        beta=cfg.beta, loss_type=cfg.loss_type, epsilon_low=cfg.eps_low, epsilon_high=cfg.eps_high,
        importance_sampling_level=cfg.level, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        max_completion_length=cfg.max_completion_length, current_gradient_accumulation_steps=ga, use_vllm=False,
        vllm_importance_sampling_correction=False, aux_loss_enabled=False, _entropy_bonus_enabled=False,
        model=types.SimpleNamespace(training=True), accelerator=_accelerator(),
        _metrics=defaultdict(lambda: defaultdict(list)))
    me._get_per_token_logps_and_entropies = lambda *a, **k: (lp, torch.tensor(entropy), None)
    inputs = _trl_inputs(mask, adv, num_items_in_batch=torch.tensor(float(num_items), dtype=torch.float64))
    if old is not None:
        inputs["old_per_token_logps"] = torch.tensor(old)
    if cfg.beta:
        inputs["ref_per_token_logps"] = torch.tensor(ref)
    loss = GRPOTrainer._compute_loss(me, None, inputs)
    loss.backward()
    return float(loss), lp.grad.numpy(), {k: v[0] for k, v in me._metrics["train"].items()}


def _random(seed, B=5, T=6):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.1, 3.0, (B, T))
    old = logp + rng.normal(0, 0.3, (B, T))
    ref = logp + rng.normal(0, 0.5, (B, T))
    lengths = np.array([T, 3, 0, 1, T - 1][:B])
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float64)
    adv = rng.normal(0, 1, B)
    entropy = rng.uniform(0, 3, (B, T))
    return logp, old, ref, adv, mask, entropy


GRID = list(itertools.product(
    ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"], ["token", "sequence"],
    [(0.0, True), (0.04, True), (0.04, False)],
    [(None, None, 1, 1, True), (0.28, 1.5, 2, 4, True), (None, 1.5, 2, 2, False)]))


def test_grpo_loss_gradient_and_metrics_equal_trl(x64):
    worst = 0.0
    for i, (loss_type, level, (beta, bias), (eps_high, delta, ga, spg, stored_old)) in enumerate(GRID):
        cfg = pg.PgLoss(loss_type=loss_type, beta=beta, eps_low=0.2,
                        eps_high=(5.0 if loss_type == "cispo" else 0.2) if eps_high is None else eps_high,
                        delta=delta, level=level, bias_correction_kl=bias, max_completion_length=7,
                        sapo_neg=1.25)  # TRL's torch.where makes the SAPO temperatures float32: exact in fp32
        logp, old, ref, adv, mask, entropy = _random(i)
        num_items = mask.sum() * spg / ga  # the generation batch spans spg / ga optimizer steps' micro-batches
        want_loss, want_grad, want_m = _trl_grpo(cfg, logp, old if stored_old else None, ref, adv, mask, entropy,
                                                 num_items, ga, spg)

        def f(lp):
            o = old if stored_old else jax.lax.stop_gradient(lp)
            return pg.grpo_loss(lp, o, ref, adv, mask, cfg, num_items=num_items, ga=ga, spg=spg, entropy=entropy)

        (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
        case = (loss_type, level, beta, bias, eps_high, delta, ga, spg, stored_old)
        np.testing.assert_allclose(float(loss), want_loss, rtol=1e-12, atol=1e-12, err_msg=str(case))
        np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-12, atol=1e-12, err_msg=str(case))
        assert set(metrics) == set(want_m), case
        for k, v in want_m.items():  # TRL counts clipped tokens in float32 (`.float()`)
            tol = 1e-7 if "clip" in k else 1e-12
            np.testing.assert_allclose(float(metrics[k]), v, rtol=tol, atol=tol, err_msg=f"{case} {k}")
        worst = max(worst, float(np.abs(np.asarray(grad) - want_grad).max()))
    assert worst < 1e-12


# ---------------------------------------------------------------- a real GRPOTrainer on fixed rollouts

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import rl_toy  # noqa: E402

TOY = str(Path(__file__).parent / "rl_toy.py")


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy_model")
    rl_toy.save_toy_model(d)
    rl_toy.write_prompts(d / "prompts.jsonl", 16)
    return d


def _trl_trainer(toy_model, tmp, cls="grpo", **args):
    import os

    import datasets
    from transformers import AutoTokenizer

    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    C = rl_toy.COMPLETIONS
    rollout = lambda prompts, tr: {  # noqa: E731
        "prompt_ids": [(rl_toy.P0, rl_toy.P1)[i // 4] for i in range(len(prompts))],
        "completion_ids": C[:len(prompts)], "logprobs": [[0.0] * len(c) for c in C[:len(prompts)]]}
    Config, Trainer = (GRPOConfig, GRPOTrainer) if cls == "grpo" else (RLOOConfig, RLOOTrainer)
    cfg = Config(output_dir=str(tmp), per_device_train_batch_size=8, num_generations=4, max_completion_length=4,
                 use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[], shuffle_dataset=False, **args)
    tok = AutoTokenizer.from_pretrained(toy_model)
    ds = datasets.Dataset.from_list([{"prompt": "t0 t1"}] * 8)
    tr = Trainer(model=str(toy_model), reward_funcs=[rl_toy.r1, rl_toy.r2], args=cfg, train_dataset=ds,
                 processing_class=tok, **({"rollout_func": rollout} if cls == "grpo" else {}))
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    return tr


_SETUPS = {}


def _jaxft(toy_model, tmp, objective="grpo", overrides=()):
    """(run, setup, objective) on the toy model; the model is loaded once per directory and adapter kind."""
    from jaxft.config import load_config
    from jaxft.objectives import make as make_objective
    from jaxft.setup import build

    run = load_config(None, [f"objective={objective}", f"model.path={toy_model}",
                             f"data.train={toy_model / 'prompts.jsonl'}", "data.max_length=16",
                             "rollout.reward_funcs=[rl_toy:r1,rl_toy:r2]", "rollout.max_completion_length=4",
                             "rollout.num_generations=4", "train.batch_size=8", f"train.out_dir={tmp}", *overrides])
    key = (str(toy_model), run.lora.enabled)  # LoRA and full fine-tuning split the weights differently
    if key not in _SETUPS:
        _SETUPS[key] = build(run)
    setup = _SETUPS[key]
    return run, setup, make_objective(run, setup)


def _fixed_generated():
    from jaxft.generate import Generated

    C = rl_toy.COMPLETIONS
    tokens = np.array([c + [0] * (4 - len(c)) for c in C], np.int32)
    lengths = np.array([len(c) for c in C])
    stopped = np.array([c[-1] == 2 for c in C])
    z = np.zeros(tokens.shape, np.float32)
    return Generated(tokens, z, lengths, stopped, z)


def _fixed_prompts():
    from jaxft.data.prompts import Prompt

    return [Prompt(rl_toy.P0 if i < 4 else rl_toy.P1, "t0 t1", {}) for i in range(8)]


SETTINGS = [dict(scale_rewards="group"), dict(scale_rewards="batch"), dict(scale_rewards="none"),
            dict(multi_objective_aggregation="normalize_then_sum", reward_weights=[0.5, 2.0]),
            dict(reward_weights=[1.0, 0.25], none_rows=(1, 5, 6)), dict(mask_truncated_completions=True),
            dict(none_rows=(0, 1, 2, 3), scale_rewards="batch")]


def test_grpo_advantages_masks_and_metrics_equal_a_real_trainer(toy_model, tmp_path):
    tr = _trl_trainer(toy_model, tmp_path / "trl")
    for setting in SETTINGS:
        s = dict(setting)
        rl_toy.NONE_ROWS.clear()
        rl_toy.NONE_ROWS.update(s.pop("none_rows", ()))
        tr.scale_rewards = s.get("scale_rewards", "group")
        tr.multi_objective_aggregation = s.get("multi_objective_aggregation", "sum_then_normalize")
        tr.reward_weights = torch.tensor(s.get("reward_weights", [1.0, 1.0]), dtype=torch.float32)
        tr.mask_truncated_completions = s.get("mask_truncated_completions", False)
        tr._metrics = defaultdict(lambda: defaultdict(list))
        out = tr._generate_and_score_completions([{"prompt": "t0 t1"}] * 8)
        want = {k: v[0] for k, v in tr._metrics["train"].items()}

        ov = [f"grpo.{k}={v}" for k, v in s.items() if k in ("scale_rewards", "multi_objective_aggregation")]
        ov += [f"rollout.reward_weights=[{','.join(map(str, s['reward_weights']))}]"] if "reward_weights" in s else []
        ov += ["rollout.mask_truncated_completions=true"] if s.get("mask_truncated_completions") else []
        run, setup, obj = _jaxft(toy_model, tmp_path / "jaxft", overrides=ov)
        ro = obj.train.assemble(_fixed_prompts(), _fixed_generated())
        rows, stats = obj.train.finish(ro, setup.params)
        from jaxft.objectives.rollout import completion_metrics

        stats.update(completion_metrics(ro))
        np.testing.assert_allclose(rows["advantages"], out["advantages"].numpy(), rtol=1e-6, atol=1e-6,
                                   err_msg=str(setting))  # TRL's rewards and statistics are float32
        np.testing.assert_array_equal(rows["mask"], out["completion_mask"].numpy(), err_msg=str(setting))
        assert rows["num_items"][0] == float(out["num_items_in_batch"]), setting
        for k, v in want.items():
            if k == "num_tokens":
                continue
            assert k in stats, (setting, k)
            np.testing.assert_allclose(stats[k], v, rtol=1e-6, atol=1e-6, err_msg=f"{setting} {k}")
    rl_toy.NONE_ROWS.clear()


def test_training_logps_equal_trl_at_the_sampling_temperature(toy_model, tmp_path):
    """The completion log-probs of jaxft's training forward on a rollout batch equal TRL's
    `_get_per_token_logps_and_entropies` on TRL's own batch of the same rollouts (T = 0.7)."""
    from flax import nnx

    from jaxft.context import ON
    from jaxft.objectives.rollout import completion_logps

    tr = _trl_trainer(toy_model, tmp_path / "trl", temperature=0.7)
    out = tr._generate_and_score_completions([{"prompt": "t0 t1"}] * 8)
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    am = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    with torch.no_grad():
        want, _, _ = tr._get_per_token_logps_and_entropies(tr.model, ids, am, out["completion_ids"].shape[1])
    run, setup, obj = _jaxft(toy_model, tmp_path / "jaxft", overrides=["rollout.temperature=0.7"])
    rows = obj.train.assemble(_fixed_prompts(), _fixed_generated()).rows()
    got = completion_logps(nnx.merge(setup.graphdef, setup.params, setup.frozen), rows, ON, 0.7)
    m = out["completion_mask"].numpy() > 0
    np.testing.assert_allclose(np.asarray(got)[m], want.numpy()[m], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- RLOO


def _trl_rloo_loss(logp, old_seq, adv, mask, entropy, eps_low, eps_high):
    from trl import RLOOTrainer

    lp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    me = types.SimpleNamespace(epsilon_low=eps_low, epsilon_high=eps_high, aux_loss_enabled=False,
                               model=types.SimpleNamespace(training=True), accelerator=_accelerator(),
                               _metrics=defaultdict(lambda: defaultdict(list)))
    me._get_per_token_logps_and_entropies = lambda *a, **k: (lp, torch.tensor(entropy), None)
    inputs = _trl_inputs(mask, adv, old_logps=torch.tensor(old_seq))
    loss = RLOOTrainer._compute_loss(me, None, inputs)
    loss.backward()
    return float(loss), lp.grad.numpy(), {k: v[0] for k, v in me._metrics["train"].items()}


def test_rloo_loss_gradient_and_metrics_equal_trl(x64):
    for seed, (eps_low, eps_high) in enumerate([(0.2, 0.2), (0.2, 0.28), (0.1, 0.05)]):
        logp, old, _, adv, mask, entropy = _random(seed)
        old_seq = (old * mask).sum(-1)
        want_loss, want_grad, want_m = _trl_rloo_loss(logp, old_seq, adv, mask, entropy, eps_low, eps_high)
        f = lambda lp: pg.rloo_loss(lp, old_seq, adv, mask, eps_low, eps_high, entropy=entropy)  # noqa: E731
        (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
        np.testing.assert_allclose(float(loss), want_loss, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-12, atol=1e-12)
        assert set(metrics) == set(want_m)
        for k, v in want_m.items():
            tol = 1e-7 if "clip" in k else 1e-12  # TRL counts clipped sequences in float32
            np.testing.assert_allclose(float(metrics[k]), v, rtol=tol, atol=tol, err_msg=k)


def test_rloo_rl_md_check_values(x64):
    """RL.md §2: the loss of two sequences, and the advantages of §1.9(g)'s rewards (and with KL in the reward)."""
    logp = np.array([[-1.0, -2.0], [-1.5, 0.0]])
    mask = np.array([[1.0, 1.0], [1.0, 0.0]])
    (loss, m), grad = jax.value_and_grad(lambda lp: pg.rloo_loss(lp, np.array([-3.1, -1.2]), np.array([1.0, -1.0]),
                                                                 mask, 0.2, 0.2), has_aux=True)(jnp.asarray(logp))
    np.testing.assert_allclose(float(loss), -0.152585, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), [[-0.552585, -0.552585], [0, 0]], atol=1e-6)
    assert float(m["clip_ratio/low_mean"]) == 0.5
    r = np.array([[1, 0, 0, 1, 0.3, 0.9, 0.5, 0.1]]).T
    A, _ = pg.rloo_advantages(r, np.ones(1), 4)
    np.testing.assert_allclose(A, [0.666667, -0.666667, -0.666667, 0.666667, -0.2, 0.6, 0.066667, -0.466667], atol=1e-6)
    A, _ = pg.rloo_advantages(r, np.ones(1), 4, normalize=True)
    np.testing.assert_allclose(A, [1.138356, -1.138356, -1.138356, 1.138356, -0.341507, 1.02452, 0.113836, -0.796849],
                               atol=1e-6)
    A, _ = pg.rloo_advantages(r[:4], np.ones(1), 4, kl=np.array([0.2, -0.1, 0, 0.4]), beta=0.05)
    np.testing.assert_allclose(A, [0.661667, -0.651667, -0.658333, 0.648333], atol=1e-6)


def test_rloo_advantages_and_kl_equal_a_real_trainer(toy_model, tmp_path):
    """A real RLOOTrainer (generation replaced by the fixed rollouts) against jaxft's rloo objective: the
    policy is a perturbed copy of the toy model and the reference the original (full fine-tuning: jaxft's
    reference is the initial weights), so the KL in the reward is not 0."""
    from transformers import AutoModelForCausalLM

    from jaxft.setup import build

    pert = tmp_path / "perturbed"
    model = AutoModelForCausalLM.from_pretrained(toy_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(pert)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (toy_model / f).exists():
            (pert / f).write_bytes((toy_model / f).read_bytes())
    C = rl_toy.COMPLETIONS
    for beta, normalize, clip in [(0.0, False, None), (0.05, False, None), (0.05, True, (0.0, 0.6))]:
        tr = _trl_trainer(pert, tmp_path / "trl", cls="rloo", beta=beta, normalize_advantages=normalize,
                          reward_clip_range=clip)
        if beta:
            tr.ref_model.load_state_dict(AutoModelForCausalLM.from_pretrained(toy_model).state_dict())
        tr._tokenize_prompts = lambda prompts: ([(rl_toy.P0, rl_toy.P1)[i // 4] for i in range(len(prompts))],
                                                None, None)
        tr._generate_single_turn = lambda ids, images, mm: [list(c) for c in C[:len(ids)]]
        out = tr._generate_and_score_completions([{"prompt": "t0 t1"}] * 8)
        want = {k: v[0] for k, v in tr._metrics["train"].items()}
        ov = ["lora.enabled=false", f"rloo.beta={beta}", f"rloo.normalize_advantages={normalize}"]
        ov += [f"rloo.reward_clip_range=[{clip[0]},{clip[1]}]"] if clip else []
        run, setup, obj = _jaxft(toy_model, tmp_path / "jaxft", "rloo", overrides=ov + ["lora.enabled=false"])
        if "perturbed" not in _SETUPS:
            _SETUPS["perturbed"] = build(dataclasses_replace_model(run, pert))
        policy = _SETUPS["perturbed"].params
        ro = obj.train.assemble(_fixed_prompts(), _fixed_generated())
        rows, stats = obj.train.finish(ro, policy)
        case = (beta, normalize, clip)
        np.testing.assert_allclose(rows["advantages"], out["advantages"].numpy(), rtol=1e-5, atol=1e-5,
                                   err_msg=str(case))
        if beta:
            np.testing.assert_allclose(rows["old_seq"], out["old_logps"].numpy(), rtol=0, atol=1e-5, err_msg=str(case))
        for k in ("reward", "reward_std", "frac_reward_zero_std", "kl", "rewards/r1/mean", "rewards/r2/std"):
            if k in want:
                np.testing.assert_allclose(stats[k], want[k], rtol=1e-5, atol=1e-6, err_msg=f"{case} {k}")
        assert ("kl" in stats) == bool(beta)


def dataclasses_replace_model(run, path):
    import dataclasses

    return dataclasses.replace(run, model=dataclasses.replace(run.model, path=str(path)))


def test_grpo_rl_md_check_values(x64):
    """RL.md §1.9 (a)-(e), from TRL's own code."""
    r = np.array([[1, 0, 0, 1, 2, 2, 2, 2]], float).T
    for scale, want in [("group", [0.865875, -0.865875, -0.865875, 0.865875, 0, 0, 0, 0]),
                        ("batch", [0.564012, -0.564012, -0.564012, 0.564012, 0, 0, 0, 0]),
                        ("none", [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])]:
        A, st = pg.group_advantages(r, np.ones(1), 4, scale)
        np.testing.assert_allclose(A, want, atol=1e-6)
    assert pg.group_advantages(r, np.ones(1), 4)[1]["frac_reward_zero_std"] == 0.5
    two = np.array([[1, 0, 0, 1], [0.3, 0.9, 0.5, 0.1]]).T
    np.testing.assert_allclose(pg.group_advantages(two, np.ones(2), 4)[0], [1.024395, -0.146342, -1.317079, 0.439027],
                               atol=1e-6)
    np.testing.assert_allclose(pg.group_advantages(two, np.ones(2), 4, aggregation="normalize_then_sum")[0],
                               [0.767066, 0.810833, -1.293032, -0.284867], atol=1e-6)
    two[1, 1] = np.nan
    np.testing.assert_allclose(pg.group_advantages(two, np.ones(2), 4)[0], [0.972922, -1.226728, -0.380709, 0.634514],
                               atol=1e-6)

    def run(loss_type, logp, old, adv, mask, ref=None, **kw):
        cfg = pg.PgLoss(loss_type=loss_type, max_completion_length=kw.pop("L", 4), **kw)
        f = lambda lp: pg.grpo_loss(  # noqa: E731
            lp, jax.lax.stop_gradient(lp) if old is None else old, ref, np.asarray(adv), mask, cfg,
            num_items=kw_items.get("n", mask.sum()), ga=kw_items.get("ga", 1), spg=kw_items.get("spg", 1))
        (loss, m), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
        return float(loss), np.asarray(g), m

    kw_items = {}
    logp = np.array([[-1, -2, -0.5, 0], [-1.5, 0, 0, 0]])
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], float)
    for t, loss, g1, g2 in [("grpo", 0.0, -0.166667, 0.5), ("bnpo", -0.5, -0.25, 0.25), ("dapo", -0.5, -0.25, 0.25),
                            ("dr_grpo", -0.25, -0.125, 0.125), ("luspo", -1.0, -0.5, 0.5)]:
        got, g, _ = run(t, logp, None, [1, -1], mask)
        np.testing.assert_allclose([got, g[0, 0], g[1, 0]], [loss, g1, g2], atol=1e-6, err_msg=t)
    got, g, _ = run("cispo", logp, None, [1, -1], mask)  # ε_high = 0.2 caps the weight at 0.2
    np.testing.assert_allclose([got, g[0, 0], g[1, 0]], [0.1, -0.05, 0.05], atol=1e-6)
    new, old = np.array([[-0.8, -1.3], [-0.8, -1.3]]), np.full((2, 2), -1.0)
    m2 = np.ones((2, 2))
    got, g, m = run("dapo", new, old, [1, -1], m2)
    np.testing.assert_allclose(got, 0.020146, atol=1e-6)
    np.testing.assert_allclose(g, [[0, -0.185205], [0.305351, 0]], atol=1e-6)
    np.testing.assert_allclose([float(m[k]) for k in ("clip_ratio/low_mean", "clip_ratio/high_mean",
                                                      "clip_ratio/region_mean", "clip_ratio/low_min",
                                                      "clip_ratio/high_max")], [0.25, 0.25, 0.5, 0.0, 0.5])
    got, g, _ = run("dapo", new, old, [1, -1], m2, eps_high=0.28)
    np.testing.assert_allclose([got, *g.ravel()], [0.014795, -0.305351, -0.185205, 0.305351, 0], atol=1e-6)
    got, g, _ = run("grpo", new, old, [1, -1], m2, level="sequence")  # GSPO
    np.testing.assert_allclose([got, *g.ravel()], [0.0, -0.237807, -0.237807, 0.237807, 0.237807], atol=1e-6)
    one = np.ones((1, 2))
    got, g, _ = run("dapo", np.full((1, 2), -0.3), np.full((1, 2), -1.0), [-1], one)
    np.testing.assert_allclose([got, *g.ravel()], [2.013753, 1.006876, 1.006876], atol=1e-6)
    got, g, _ = run("dapo", np.full((1, 2), -0.3), np.full((1, 2), -1.0), [-1], one, delta=1.5)
    np.testing.assert_allclose([got, *g.ravel()], [1.5, 0, 0], atol=1e-6)
    ref = np.array([[-1.5, -1.0]])
    got, g, m = run("dapo", np.array([[-1.0, -2.0]]), None, [0.5], one, ref=ref, beta=0.04)
    np.testing.assert_allclose([got, float(m["kl"]), *g.ravel()], [-0.483504, 0.412406, -0.24, -0.27], atol=1e-6)
    got, g, m = run("dapo", np.array([[-1.0, -2.0]]), None, [0.5], one, ref=ref, beta=0.04, bias_correction_kl=False)
    np.testing.assert_allclose(g.ravel(), [-0.242131, -0.284366], atol=1e-6)
    kw_items.update(n=8, ga=2, spg=2)
    got, _, _ = run("dapo", np.array([[-1.0, -2.0]]), None, [1.0], one)
    np.testing.assert_allclose(got, -0.25, atol=1e-6)


# ---------------------------------------------------------------- the objective end to end

import json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _toy_overrides(toy_model, out, **extra):
    o = {"model.path": toy_model, "data.train": toy_model / "prompts.jsonl", "data.max_length": 32,
         "rollout.reward_funcs": f"[{TOY}:emit_k]", "rollout.max_completion_length": 8, "rollout.num_generations": 8,
         "train.batch_size": 16, "train.grad_accum": 1, "lora.enabled": False, "optim.lr": 1e-2,
         "optim.warmup_steps": 0, "optim.schedule": "constant", "train.out_dir": out, "eval.file": "null",
         "data.validation": "null", "train.save_every": 0}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def _rows(out):
    return [json.loads(r) for r in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def learned(toy_model, tmp_path_factory):
    """A 20-step GRPO run of the toy model through `jaxft train` (checkpoints at 10 and 20)."""
    from tiny import run_cli

    out = tmp_path_factory.mktemp("learned") / "run"
    r = run_cli("train", ROOT / "configs" / "grpo_lora.yaml",
                *_toy_overrides(toy_model, out, **{"train.steps": 20, "train.save_every": 10}))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_a_tiny_model_learns_to_emit_token_k_through_jaxft_train(learned):
    rows = _rows(learned)
    for k in ("reward", "reward_std", "rewards/emit_k/mean", "rewards/emit_k/std", "frac_reward_zero_std",
              "entropy", "clip_ratio/region_mean", "clip_ratio/high_max", "completions/mean_length",
              "completions/clipped_ratio", "completions/mean_terminated_length", "time/rollout", "time/score",
              "loss", "grad_norm", "completions"):
        assert k in rows[0], k
    assert "kl" not in rows[0]  # beta = 0: no reference
    first, last = rows[0]["reward"], np.mean([x["reward"] for x in rows[-3:]])
    assert first < 0.1 and last > 0.6, (first, last)
    png = (learned / "loss.png").read_bytes()
    assert int.from_bytes(png[20:24], "big") == 650  # PNG height: the loss panel + the reward panel (7 x 6.5 in)


def test_resume_reproduces_the_run(toy_model, learned, tmp_path):
    """The run cut after its step-10 checkpoint (the step-20 one and later rows gone, as after a kill) and
    resumed: the same rollouts (sampler keys from seed and step) and bit-identical metrics."""
    import shutil

    from jaxft.config import load_config
    from jaxft.commands.train import train

    out = tmp_path / "run"
    shutil.copytree(learned, out)
    shutil.rmtree(out / "checkpoints" / "20")
    rows = _rows(learned)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= 10))
    run = load_config(ROOT / "configs" / "grpo_lora.yaml",
                      _toy_overrides(toy_model, out, **{"train.steps": 20, "train.save_every": 10}))
    train(run, resume=True, progress=False)
    got = _rows(out)
    assert [r["step"] for r in got] == [r["step"] for r in rows]
    for want, have in zip(rows, got):
        for k, v in want.items():
            if not k.startswith("time/") and k not in ("elapsed", "tokens_per_s"):
                assert have[k] == v, (want["step"], k)


def _one_step(toy_model, tmp, overrides, mesh=None):
    """One GRPO optimizer step (SGD, lr 1) on the fixed rollouts: (new trainable weights, metrics)."""
    import optax

    from jaxft import sharding
    from jaxft.train import init_state, make_train_step

    run, setup, obj = _jaxft(toy_model, tmp, overrides=["grpo.beta=0.04", *overrides])
    params, frozen = setup.params, setup.frozen
    # a nonzero adapter, so that the adapters-on policy differs from the adapters-off reference
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), params)
    src = obj.train
    if mesh is not None:
        params = sharding.place(params, sharding.tree_shardings(params, mesh, "fsdp"))
        frozen = sharding.place(frozen, sharding.tree_shardings(frozen, mesh, "fsdp"))
        src.wrap = lambda b: sharding.ShardedBatches(b, mesh)
    ro = src.assemble(_fixed_prompts(), _fixed_generated())
    rows, _ = src.finish(ro, params)
    tx = optax.sgd(1.0)
    step = make_train_step(setup.graphdef, tx, obj.loss_fn)
    batch = src.place(rows, params)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        state, metrics = step(init_state(params, tx), frozen, batch)
    return jax.device_get(state["params"]), dict(jax.device_get(metrics), shared=float("src" in batch))


import contextlib  # noqa: E402


def test_accumulation_and_devices_do_not_change_the_step(toy_model, tmp_path):
    """dapo with KL: (B = 8, accumulation 1) == (B = 4, accumulation 2) on a 4-device mesh == 8 devices ==
    2 fsdp devices. The training forward runs each group's prompt once where that saves rows (one device: 2
    prompt rows for 8; 2 devices: 2 for 8), whole rows where the mesh needs as many prompt rows (4, 8)."""
    from jaxft import sharding
    from jaxft.config import MeshConfig

    p1, m1 = _one_step(toy_model, tmp_path, [])
    p2, m2 = _one_step(toy_model, tmp_path, ["train.batch_size=4", "train.grad_accum=2"],
                       mesh=sharding.make_mesh(MeshConfig(data=2, fsdp=2)))
    p8, m8 = _one_step(toy_model, tmp_path, [], mesh=sharding.make_mesh(MeshConfig(data=2, fsdp=4)))
    pf, mf = _one_step(toy_model, tmp_path, [], mesh=sharding.make_mesh(MeshConfig(data=1, fsdp=2)))
    assert m1["grad_norm"] > 0 and m1["kl"] > 0
    assert [m["shared"] for m in (m1, m2, m8, mf)] == [1, 0, 0, 1]
    for p, m in ((p2, m2), (p8, m8), (pf, mf)):
        for k in ("loss", "kl", "entropy", "clip_ratio/region_mean"):
            np.testing.assert_allclose(m[k], m1[k], rtol=1e-5, atol=1e-7, err_msg=k)
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p1)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: final-logit soft-cap
def test_sampler_logps_equal_the_training_forward(arch, tmp_path):
    """The sampler's log-probs (temperature 0.7) equal the training forward's on the same tokens (fp32), and
    the adapters-off forward of a LoRA model equals the base model's."""
    from flax import nnx

    from jaxft.formats.hf import load_pretrained
    from jaxft import adapters
    from jaxft.context import OFF, ON
    from jaxft.config import LoraConfig
    from jaxft.generate import Sampling, generate
    from jaxft.objectives.rollout import completion_logps, layout, make_forward
    from tiny import save_model

    save_model(arch, tmp_path)
    base = load_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    cfg = LoraConfig(r=4, alpha=8)
    adapters.attach(model, cfg, jax.random.key(0))
    graphdef, params, frozen = adapters.split(model, cfg)
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape, x.dtype), params)
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12], [13]]
    gen = generate(graphdef, (params, frozen), prompts, eos_ids={95}, sampling=Sampling(0.7, max_new_tokens=12, seed=3))
    L = gen.tokens.shape[1]
    tokens, pos, seg = layout(prompts, gen.tokens, gen.lengths)
    rows = dict(tokens=tokens, positions=pos, segment_ids=seg, mask=np.zeros((len(prompts), L), np.float32))
    keep = np.arange(L)[None] < gen.lengths[:, None]
    lp = completion_logps(nnx.merge(graphdef, params, frozen), rows, ON, 0.7)
    assert np.abs(np.asarray(lp) - gen.logprobs)[keep].max() <= 1e-5
    off = completion_logps(nnx.merge(graphdef, params, frozen), rows, OFF, 0.7)
    plain = completion_logps(base, rows, ON, 0.7)
    assert np.abs(np.asarray(off) - np.asarray(plain))[keep].max() <= 1e-6
    assert np.abs(np.asarray(off) - np.asarray(lp))[keep].max() > 1e-3  # the adapter does change them

    # the no-gradient forward (reference / old log-probs) runs a repeated prompt once for its rows: equal to
    # the whole rows' forward, adapters on and off; one compile for new weights and new tokens
    forward = make_forward(graphdef, 0.7)
    rep = [prompts[0]] * 3 + [prompts[2]] * 2 + [prompts[3]]
    for seed in (5, 6):
        g = generate(graphdef, (params, frozen), rep, eos_ids={95}, sampling=Sampling(0.7, max_new_tokens=12, seed=seed))
        tokens, pos, seg = layout(rep, g.tokens, g.lengths)
        rows = dict(tokens=tokens, positions=pos, segment_ids=seg, mask=np.zeros(g.tokens.shape, np.float32))
        keep = np.arange(g.tokens.shape[1])[None] < g.lengths[:, None]
        for ctx in (ON, OFF):
            whole = completion_logps(nnx.merge(graphdef, params, frozen), rows, ctx, 0.7)
            assert np.abs(np.asarray(forward(params, frozen, rows, ctx)) - np.asarray(whole))[keep].max() <= 1e-5
        params = jax.tree.map(lambda x: x * 1.01, params)
    assert forward.compiled._cache_size() == 2  # one per ctx (ON / OFF are static)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3_text"])  # soft-caps, sliding windows, local RoPE
def test_shared_prompts_give_the_whole_rows_logps_and_gradients(arch, tmp_path):
    """The training forward with prompt_sharing's keys (each distinct prompt once, its rows attending to its
    keys / values) equals the whole rows' forward: log-probs, and the gradients of a weighted sum of them
    w.r.t. the adapter and the base weights; per-row adapter ids fall back to whole rows."""
    from flax import nnx

    from jaxft.formats.hf import load_pretrained
    from jaxft import adapters
    from jaxft.context import ON, Ctx
    from jaxft.config import LoraConfig
    from jaxft.objectives.rollout import completion_logps, prompt_sharing
    from tiny import save_model, shared_prompt_rows

    save_model(arch, tmp_path)
    model = load_pretrained(tmp_path)
    cfg = LoraConfig(r=4, alpha=8)
    adapters.attach(model, cfg, jax.random.key(0))
    graphdef, params, frozen = adapters.split(model, cfg)
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape, x.dtype), params)
    rows, keys, keep, w = shared_prompt_rows()
    L = keep.shape[1]
    assert keys["prefix_rows"].tolist() == [0, 3, 5, 0] and keys["src"].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert prompt_sharing(rows, L, ways=8) == {} and prompt_sharing(rows, L, A=2)["prefix_rows"].shape == (4,)

    def f(p, fr, b, ctx=ON):
        lp = completion_logps(nnx.merge(graphdef, p, fr), b, ctx, 0.7)
        return jnp.sum(lp * w), lp

    (l0, lp0), g0 = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, frozen, rows)
    (l1, lp1), g1 = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, frozen, dict(rows, **keys))
    assert np.abs(np.asarray(lp1) - np.asarray(lp0))[keep].max() <= 1e-5
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):  # fp32 sums in another order: relative to the leaf
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
    assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g0)) > 1e-2
    ids = Ctx(adapter_ids=jnp.zeros(8, jnp.int32))  # one adapter, by id: whole rows, the same values
    lp2 = jax.jit(lambda p, fr, b: f(p, fr, b, ids)[1])(params, frozen, dict(rows, **keys))
    assert np.abs(np.asarray(lp2) - np.asarray(lp0))[keep].max() <= 1e-5


def test_rollouts_reference_and_step_compile_once_and_beta_0_runs_no_reference(toy_model, tmp_path):
    """Two rollouts and two steps with new weights: one compile each (sampler, reference forward, step);
    beta = 0 computes no reference log-probs at all."""
    import optax

    from jaxft.generate import _run
    from jaxft.train import init_state, make_train_step

    def perturbed(params, seed):
        return jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(seed), x.shape, x.dtype), params)

    run, setup, obj = _jaxft(toy_model, tmp_path, overrides=["grpo.beta=0.04", "rollout.max_completion_length=6",
                                                              "rollout.reward_funcs=[rl_toy:emit_k]"])
    src, params = obj.train, setup.params
    batch = src(1, perturbed(params, 1))
    assert "ref_logps" in batch and "old_logps" not in batch
    before = _run._cache_size()
    batch2 = src(2, perturbed(params, 2))
    assert _run._cache_size() == before and src.forward.compiled._cache_size() == 1
    assert src.host_metrics(2)["time/rollout"] > 0 and src.host_metrics(1) == {}
    tx = optax.adam(1e-3)
    step = make_train_step(setup.graphdef, tx, obj.loss_fn)
    state = jax.device_put(init_state(perturbed(params, 3), tx), jax.devices()[0])  # committed, as the output
    state, _ = step(state, setup.frozen, batch)
    state, m = step(state, setup.frozen, batch2)
    assert step._cache_size() == 1 and np.isfinite(float(m["loss"]))

    run, setup, obj = _jaxft(toy_model, tmp_path, overrides=["grpo.beta=0", "grpo.num_iterations=2",
                                                              "rollout.reward_funcs=[rl_toy:emit_k]"])
    b1 = obj.train(1, setup.params)
    assert "ref_logps" not in b1 and "old_logps" in b1  # μ = 2 stores the old log-probs, no reference
    assert obj.train(2, perturbed(setup.params, 4)) is b1  # the generation batch is reused, not resampled
    assert obj.train.host_metrics(2) == {}


def test_bad_reward_functions_and_prompt_rows_are_one_line_errors(tmp_path):
    from jaxft.config import DataConfig
    from jaxft.errors import JaxftError
    from jaxft.objectives.reward_funcs import load_reward_funcs, score_all
    from jaxft.data.prompts import load_prompts

    args = (["p"] * 2, ["c"] * 2, [[1], [2]], {})
    for fn, msg in [("raises", "reward function raises: raised RuntimeError: scorer offline"),
                    ("short", "reward function short: returned 1 values for 2 completions"),
                    ("nan", "reward function nan: value 0 is nan"),
                    ("text", "reward function text: value 0 is a str")]:
        with pytest.raises(JaxftError, match=msg):
            score_all(load_reward_funcs([f"rl_toy:{fn}"], 8), *args)
    for spec, msg in [("nope", "is not a built-in"), ("rl_toy:missing", "has no function 'missing'"),
                      ("no_such_module:f", "cannot import no_such_module"), ("regex:(", "not a valid regular"),
                      (f"{tmp_path}/absent.py:f", "no such file"), ("overlong:99", "the cache must be")]:
        with pytest.raises(JaxftError, match=msg):
            load_reward_funcs([spec], 8)
    with pytest.raises(JaxftError, match="needs a 'solution' column"):
        score_all(load_reward_funcs(["json_fields"], 8), *args)
    funcs = load_reward_funcs(["json_fields", "json_valid", "exact_match", r"regex:\{.*\}", "length_penalty",
                               "overlong:2", f"{TOY}:emit_k"], 4)
    assert [n for n, _ in funcs] == ["json_fields", "json_valid", "exact_match", "regex", "length_penalty",
                                     "overlong", "emit_k"]
    got = score_all(funcs, ["p", "p"], ['{"a": 1, "b": 2}', "no"], [[10, 10, 10, 2], [10]],
                    {"solution": ['{"a": 1, "b": 3}', None]})
    np.testing.assert_allclose(got[0], [0.5, 1, 0, 1, -1.0, -1.0, 1])
    np.testing.assert_allclose(got[1], [np.nan, 0, np.nan, 0, -0.25, 0.0, 1])  # None → NaN

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A"}], "k": 1},
            {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "B"}]},
            {"prompt": "plain", "solution": "C"}, {"messages": [{"role": "assistant", "content": "x"}]},
            {"other": 1}, {"prompt": "x " * 50}]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from tiny import example_tokenizer

    prompts, report = load_prompts(DataConfig(train=str(f), max_length=40), example_tokenizer())
    assert [p.columns.get("solution") for p in prompts] == ["A", "B", "C"]
    assert prompts[0].prompt == [{"role": "user", "content": "hi"}] and prompts[0].columns["k"] == 1
    assert prompts[2].prompt == "plain"
    assert (report.skipped, report.dropped) == (2, 1), report.summary()


def test_grpo_on_the_json_task_evaluates_and_exports_a_peft_adapter(chat_model, tmp_path):
    """configs/grpo_lora.yaml's shape on the quickstart task (chat prompts, `solution` from the final
    assistant turn, json_fields reward) with a tiny chat model and KL: trains, `jaxft eval` scores the
    held-out answers, and the adapter exports as PEFT and loads with equal logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jaxft.config import load_config
    from jaxft.commands.evaluate import evaluate
    from jaxft.commands.export import export
    from jaxft.data.task import write_task_files
    from jaxft.commands.train import train

    paths = write_task_files(tmp_path / "data", 8, 4, 4, seed=0)
    out = tmp_path / "run"
    run = load_config(ROOT / "configs" / "grpo_lora.yaml", [
        f"model.path={chat_model}", f"data.train={paths['train']}", f"data.validation={paths['validation']}",
        f"eval.file={paths['test']}", "eval.max_examples=4", "eval.max_new_tokens=8", "rollout.max_completion_length=8",
        "rollout.num_generations=2", "train.batch_size=4", "train.grad_accum=1", "train.steps=2",
        "train.save_every=2", f"train.out_dir={out}", "grpo.beta=0.04",
        f"rollout.reward_funcs=[json_fields,length_penalty,{TOY}:token_mean]", "lora.r=4", "lora.alpha=8", "optim.lr=1e-2"])
    last = train(run, progress=False)
    assert "kl" in last and "rewards/json_fields/mean" in last and "rewards/length_penalty/mean" in last
    assert last["completions"] == 4 and last["frac_reward_zero_std"] == 0.0  # token_mean: the adapter must move
    res = evaluate(run, progress=False)
    assert {"valid_json", "exact", "field_accuracy"} <= set(res["tuned"]) and res["tuned"]["n"] == 4
    path, step = export(run, "peft", tmp_path / "peft", dtype="fp32")
    assert step == 2
    base = AutoModelForCausalLM.from_pretrained(chat_model)
    ids = torch.tensor([[1, 5, 9, 300, 2000]])
    tuned = PeftModel.from_pretrained(base, str(path)).eval()
    from flax import nnx

    from jaxft.checkpoint import restore_trainable
    from jaxft.setup import build

    setup = build(run)
    params, _ = restore_trainable(out, setup.params)
    want = tuned(ids).logits.detach().numpy()
    got = np.asarray(nnx.merge(setup.graphdef, params, setup.frozen)(jnp.asarray(ids.numpy()))[0])
    assert np.abs(got - want).max() < 2e-4
    plain = AutoModelForCausalLM.from_pretrained(chat_model)(ids).logits.detach().numpy()
    assert np.abs(want - plain).max() > 1e-4  # the adapter trained


def test_two_processes_match_one_process(toy_model, tmp_path):
    """scripts/launch_local.sh 2 (2 processes × 2 devices, gloo) on one fsdp = 4 mesh equals one process with 4
    devices, step for step: rollouts sampled on the sharded weights, the reference forward (beta > 0), the
    rewards and the step. Process 0 alone writes the metrics."""
    from jaxft.config import load_config
    from jaxft.commands.train import train
    from tiny import launch_local

    o = {"train.steps": 3, "grpo.beta": 0.04}
    single = tmp_path / "single"  # in this process: 4 of its 8 simulated devices, the same (1, 4, 1) mesh
    train(load_config(ROOT / "configs" / "grpo_lora.yaml", _toy_overrides(toy_model, single, **o, **{"mesh.fsdp": 4})),
          progress=False)
    o["mesh.fsdp"] = -1
    multi = tmp_path / "multi"
    r = launch_local(2, ROOT / "configs" / "grpo_lora.yaml", *_toy_overrides(toy_model, multi, **o))
    assert r.returncode == 0, r.stderr[-3000:]
    want, got = _rows(single), _rows(multi)
    assert [x["step"] for x in got] == [1, 2, 3]
    for a, b in zip(want, got):
        assert b["completions"] == a["completions"]
        for k in ("reward", "reward_std", "completions/mean_length", "kl", "entropy", "loss", "grad_norm"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=f"step {a['step']} {k}")

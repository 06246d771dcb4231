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
    B, T = mask.shape
    inputs = dict(prompt_ids=torch.zeros((B, 1), dtype=torch.long), prompt_mask=torch.ones((B, 1), dtype=torch.long),
                  completion_ids=torch.zeros((B, T), dtype=torch.long), completion_mask=torch.tensor(mask),
                  advantages=torch.tensor(adv), num_items_in_batch=torch.tensor(float(num_items), dtype=torch.float64))
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
    """(run, setup, objective) on the toy model; the model is loaded once per directory."""
    from jaxft.config import load_config
    from jaxft.setup import build, objective as make_objective

    run = load_config(None, [f"objective={objective}", f"model.path={toy_model}",
                             f"data.train={toy_model / 'prompts.jsonl'}", "data.max_length=16",
                             "rollout.reward_funcs=[rl_toy:r1,rl_toy:r2]", "rollout.max_completion_length=4",
                             "rollout.num_generations=4", "train.batch_size=8", f"train.out_dir={tmp}", *overrides])
    if str(toy_model) not in _SETUPS:
        _SETUPS[str(toy_model)] = build(run)
    setup = _SETUPS[str(toy_model)]
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
    from jaxft.prompts import Prompt

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

    from jaxft.adapters.base import ON
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
    B, T = mask.shape
    inputs = dict(prompt_ids=torch.zeros((B, 1), dtype=torch.long), prompt_mask=torch.ones((B, 1), dtype=torch.long),
                  completion_ids=torch.zeros((B, T), dtype=torch.long), completion_mask=torch.tensor(mask),
                  old_logps=torch.tensor(old_seq), advantages=torch.tensor(adv))
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
        tr._tokenize_prompts = lambda prompts: ([(rl_toy.P0, rl_toy.P1)[i // 4] for i in range(len(prompts))], None, None)
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

"""Adapter bank (jaxft.adapters.bank): mixed-adapter batches against PEFT's adapter_names=, and bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from jaxft.formats.hf import load_pretrained
from jaxft.adapters import bank
from jaxft.context import Ctx
from jaxft.errors import JaxftError
from jaxft.formats.peft import load_adapter
from jaxft.optim import bank_optimizer
from jaxft import runs
from tiny import make_model, save_model

ROWS = ["default", "b", "__base__", "default", "b"]


def _peft_pair(arch, root):
    """A PEFT model with two trained-looking adapters (r=4 α=8 on attention; r=8 α=4 rsLoRA on all linears),
    saved as PEFT's multi-adapter folder: `default` at `root`, `b` in `root/b`."""
    torch.manual_seed(0)
    pm = get_peft_model(make_model(arch), PeftLoraConfig(r=4, lora_alpha=8,
                                                         target_modules=["q_proj", "v_proj", "o_proj"]))
    pm.add_adapter("b", PeftLoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    pm.eval()
    pm.save_pretrained(root)
    return pm


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mixed_batch_equals_peft_adapter_names_and_each_row_alone(arch, tmp_path, monkeypatch):
    save_model(arch, tmp_path / "base")
    pm = _peft_pair(arch, tmp_path / "adapters")
    toks = np.random.RandomState(0).randint(0, 96, (len(ROWS), 12))
    with torch.no_grad():
        ref = pm(torch.tensor(toks), adapter_names=ROWS).logits.numpy()

    model = load_pretrained(tmp_path / "base")
    names = runs.load_bank(model, [str(tmp_path / "adapters")])
    assert names == ("default", "b")
    ids = bank.ids(model, ROWS)
    np.testing.assert_array_equal(ids, [0, 1, -1, 0, 1])
    for rows in (0, 10**6):  # both forms of the bank: one-hot GEMM over all adapters, per-row gather (decode)
        monkeypatch.setattr(bank, "GATHER_ROWS", rows)
        ours = np.asarray(model(jnp.asarray(toks), ctx=Ctx(adapter_ids=jnp.asarray(ids)))[0])
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)

    for name, sub in (("default", ""), ("b", "b"), ("__base__", None)):  # each row alone, one plain adapter
        single = load_pretrained(tmp_path / "base")
        if sub is not None:
            load_adapter(single, tmp_path / "adapters" / sub)
        rows = [i for i, r in enumerate(ROWS) if r == name]
        alone = np.asarray(single(jnp.asarray(toks[rows]))[0])
        np.testing.assert_allclose(ours[rows], alone, atol=1e-4, rtol=0)  # the bound (fp32 reassociation)
    assert np.abs(ours[0] - ours[2]).max() > 1e-2 and np.abs(ours[1] - ours[2]).max() > 1e-2


def test_mixed_greedy_generation_equals_peft(tmp_path):
    from jaxft.generate import Sampling, generate
    from flax import nnx

    save_model("llama", tmp_path / "base")
    pm = _peft_pair("llama", tmp_path / "adapters")
    prompts = np.random.RandomState(1).randint(3, 96, (4, 6))
    rows = ["b", "default", "__base__", "b"]
    with torch.no_grad():
        ref = pm.generate(input_ids=torch.tensor(prompts), attention_mask=torch.ones_like(torch.tensor(prompts)),
                          adapter_names=rows, max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=0).numpy()[:, 6:]
    model = load_pretrained(tmp_path / "base")
    runs.load_bank(model, [f"default={tmp_path / 'adapters'}", f"b={tmp_path / 'adapters' / 'b'}"])
    graphdef, state = nnx.split(model)
    out = generate(graphdef, (state,), prompts.tolist(), eos_ids=[], sampling=Sampling(max_new_tokens=8),
                   ctx=Ctx(adapter_ids=jnp.asarray(bank.ids(model, rows))))
    np.testing.assert_array_equal(out.tokens, ref)


def test_sharded_mixed_forward_equals_one_device(tmp_path):
    from flax import nnx

    from jaxft import sharding
    from jaxft.config import MeshConfig

    save_model("llama", tmp_path / "base")
    _peft_pair("llama", tmp_path / "adapters")
    model = load_pretrained(tmp_path / "base")
    runs.load_bank(model, [str(tmp_path / "adapters")])
    toks = jnp.asarray(np.random.RandomState(0).randint(0, 96, (8, 12)))
    ids = jnp.asarray([0, 1, -1, 0, 1, 1, -1, 0])
    one = np.asarray(model(toks, ctx=Ctx(adapter_ids=ids))[0])
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4))
    graphdef, state = nnx.split(model)
    state = sharding.place(state, sharding.tree_shardings(state, mesh, "fsdp"))
    a = [v for p, v in nnx.to_flat_state(state) if p[-1] == "a" and "q_proj" in p][0]
    assert a.get_value().shape[1] == 2 and "fsdp" in str(a.get_value().sharding.spec)  # [L, N, in, r]: in over fsdp
    rows = jax.sharding.NamedSharding(mesh, sharding.batch_spec(mesh, 8))

    @jax.jit
    def fwd(state, toks, ids):
        return nnx.merge(graphdef, state)(toks, ctx=Ctx(adapter_ids=ids))[0]

    with jax.set_mesh(mesh):
        got = np.asarray(fwd(state, jax.device_put(toks, rows), jax.device_put(ids, rows)))
    # fsdp splits the contractions over `embed`: fp32 partial sums, bounded relative to the largest logit
    np.testing.assert_allclose(got, one, atol=1e-5 * max(1.0, np.abs(one).max()), rtol=0)


def test_mixed_forward_compiles_once_for_new_weights_and_ids(tmp_path):
    from flax import nnx

    save_model("llama", tmp_path / "base")
    _peft_pair("llama", tmp_path / "adapters")
    model = load_pretrained(tmp_path / "base")
    runs.load_bank(model, [str(tmp_path / "adapters")])
    graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)

    @jax.jit
    def fwd(params, frozen, toks, ids):
        return nnx.merge(graphdef, params, frozen)(toks, ctx=Ctx(adapter_ids=ids))[0]

    toks = jnp.zeros((4, 8), jnp.int32)
    a = fwd(params, frozen, toks, jnp.asarray([0, 1, -1, 0]))
    params2 = jax.tree.map(lambda x: x * 2.0, params)
    b = fwd(params2, frozen, toks, jnp.asarray([1, 1, 0, -1]))
    assert fwd._cache_size() == 1 and np.abs(np.asarray(a) - np.asarray(b)).max() > 0


def test_bad_banks_are_one_line_errors(tmp_path):
    save_model("llama", tmp_path / "base")
    save_model("qwen2", tmp_path / "other")
    torch.manual_seed(0)
    for name, arch, r in (("r4", "llama", 4), ("r16", "llama", 16), ("other", "qwen2", 4)):
        pm = get_peft_model(make_model(arch), PeftLoraConfig(r=r, lora_alpha=8, target_modules=["q_proj"],
                                                             base_model_name_or_path=None))
        pm.peft_config["default"].base_model_name_or_path = str(tmp_path / ("base" if arch == "llama" else "other"))
        pm.save_pretrained(tmp_path / name)
    model = load_pretrained(tmp_path / "base")
    cases = [([f"a={tmp_path / 'r4'}", f"b={tmp_path / 'r16'}"], "outside the rank bucket"),
             ([f"a={tmp_path / 'r4'}", f"b={tmp_path / 'other'}"], "different bases"),
             ([f"a={tmp_path / 'r4'}", f"a={tmp_path / 'r4'}"], "two adapters are named"),
             ([f"a={tmp_path / 'nowhere'}"], "no such directory")]
    for specs, msg in cases:
        with pytest.raises(JaxftError, match=msg) as e:
            runs.load_bank(model, specs)
        assert "\n" not in str(e.value)
    runs.load_bank(model, [f"a={tmp_path / 'r4'}"])
    with pytest.raises(JaxftError, match="unknown adapter 'zzz'"):
        bank.ids(model, ["a", "zzz"], where="prompts.jsonl line 2")


def test_joint_train_step_compiles_once_and_plain_layout_matches(tmp_path):
    from flax import nnx

    from jaxft.config import load_config
    from jaxft.models.decoder import PLAIN
    from jaxft.objectives.multi import make_loss
    from jaxft.train import init_state, make_train_step

    save_model("llama", tmp_path / "base")
    run = load_config(None, ["adapters=[{name: a, train: x, r: 4}, {name: b, train: y, r: 8, lr: 1e-3}]",
                             "optim.warmup_steps=0"])
    model = bank.attach_for_training(load_pretrained(tmp_path / "base"), run)
    graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)
    tx = bank_optimizer(run, 10, params)
    step = make_train_step(graphdef, tx, make_loss(("a", "b")))
    rng = np.random.RandomState(0)

    def batch():
        t = rng.randint(0, 96, (1, 4, 8)).astype(np.int32)
        return dict(tokens=t, positions=np.broadcast_to(np.arange(8, dtype=np.int32), t.shape).copy(),
                    segment_ids=np.ones_like(t), targets=np.roll(t, -1, -1), loss_mask=np.ones(t.shape, np.float32),
                    adapter_ids=np.asarray([[0, 0, 1, 1]], np.int32), adapter_targets=np.full((1, 4), 16.0, np.float32))

    dev = jax.devices()[0]  # committed arrays, as jaxft.train places them (uncommitted ones are another key)
    state, m1 = step(jax.device_put(init_state(params, tx), dev), frozen, batch())
    state, m2 = step(state, frozen, batch())
    assert step._cache_size() == 1 and float(m1["loss_a"]) != float(m2["loss_a"])
    assert float(m2["loss"]) == pytest.approx(float(m2["loss_a"]) + float(m2["loss_b"]), rel=1e-6)

    trained = nnx.merge(graphdef, state["params"], frozen)  # the trained bank, CPU-tuned vs plain layouts
    plain = load_pretrained(tmp_path / "base", tuning=PLAIN)
    toks, ids = jnp.asarray(rng.randint(0, 96, (3, 8))), jnp.asarray([1, -1, 0])
    want = np.asarray(trained(toks, ctx=Ctx(adapter_ids=ids))[0])
    configs = bank.banks(trained)[0][1].adapter.configs
    entries = [bank.Entry(n, c, {p: (np.asarray(lin.adapter.a[:, i, :, :c.r]), np.asarray(lin.adapter.b[:, i, :c.r]))
                                 for p, lin in bank.banks(trained)}) for i, (n, c) in enumerate(zip(("a", "b"), configs))]
    bank.install(plain, entries)
    np.testing.assert_allclose(np.asarray(plain(toks, ctx=Ctx(adapter_ids=ids))[0]), want, atol=2e-5, rtol=0)


def test_bank_optimizer_equals_one_optimizer_per_adapter():
    """Clipping (one adapter over the norm, one under), AdamW, weight decay, LoRA+ and per-adapter lr schedules."""
    import optax

    from jaxft.config import load_config
    from jaxft.optim import make_optimizer

    run = load_config(None, ["adapters=[{name: a, train: x, lr: 1e-2}, {name: b, train: y, lr: 3e-3}]",
                             "optim.clip_norm=1.0", "optim.weight_decay=0.1", "optim.lora_b_lr_ratio=4",
                             "optim.warmup_steps=2"])
    rng = np.random.RandomState(0)
    params = {"x": {"a": jnp.asarray(rng.randn(3, 2, 5, 4), jnp.float32),  # [L, N, in, r]
                    "b": jnp.asarray(rng.randn(3, 2, 4, 6), jnp.float32)}}
    tx = bank_optimizer(run, 10, params)
    state, p = tx.init(params), params
    singles = [(make_optimizer(dataclasses.replace(run.optim, lr=lr), 10, jax.tree.map(lambda t: t[:, n], params)),
                jax.tree.map(lambda t: t[:, n], params)) for n, lr in enumerate((1e-2, 3e-3))]
    singles = [(t, t.init(q), q) for t, q in singles]
    for _ in range(4):
        g = jax.tree.map(lambda t: jnp.asarray(rng.randn(*t.shape), jnp.float32)
                         * jnp.asarray([0.01, 10.0])[None, :, None, None], params)  # a under the clip, b over it
        u, state = tx.update(g, state, p)
        p = optax.apply_updates(p, u)
        for n, (t, s, q) in enumerate(singles):
            un, s = t.update(jax.tree.map(lambda x: x[:, n], g), s, q)
            q = optax.apply_updates(q, un)
            singles[n] = (t, s, q)
            jax.tree.map(lambda x, y: np.testing.assert_allclose(x[:, n], y, atol=1e-6, rtol=0), p, q)  # fp32 ulps

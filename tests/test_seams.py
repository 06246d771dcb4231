"""The seams new objectives and adapters plug into: the forward context, the adapter protocol, generation
as a pure function of the weights (compile counts, no retained weights, log-probs equal training's),
one compile per jitted entry point, and the one list of projections (the import layers: test_layers.py)."""

import ast
import gc
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxft
from jaxft.formats.hf import load_pretrained
from jaxft.models.decoder import Decoder
from jaxft.models.config import DecoderConfig
from jaxft import adapters, sharding
from jaxft.context import OFF, Ctx
from jaxft.config import LoraConfig, OptimConfig
from jaxft.generate import Sampling, _run, generate
from jaxft.losses import sft_loss, token_logprobs
from jaxft.objective import make_eval_step
from jaxft.optim import make_optimizer
from jaxft.train import init_state, make_train_step
from test_lora_train import _batch
from tiny import save_model

PROMPTS = [[5, 17, 33, 2, 9, 41, 7], [12, 3], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72]]
PKG = Path(jaxft.__file__).parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    save_model("llama", d)
    return d


def _trained_lora(path, seed=0, scale=0.2):
    """A model with a LoRA adapter whose B is non-zero (a "trained" adapter)."""
    model = load_pretrained(path)
    adapters.attach(model, LoraConfig(r=4, alpha=8), jax.random.key(seed))
    for i, (_, lin) in enumerate(adapters.targets(model, ("all-linear",))):
        lin.adapter.b[...] = scale * jax.random.normal(jax.random.key(100 + i + seed), lin.adapter.b.shape)
    return model


# ---------------------------------------------------------------- forward context and adapter protocol


def test_adapters_off_equals_the_base_model_bit_for_bit(tiny):
    base = load_pretrained(tiny)
    model = _trained_lora(tiny)
    toks = jnp.asarray(_batch()["tokens"])
    on, _ = model(toks)
    off, _ = model(toks, ctx=OFF)
    want, _ = base(toks)
    np.testing.assert_array_equal(np.asarray(off), np.asarray(want))
    assert float(jnp.max(jnp.abs(on - want))) > 1e-2  # the adapter does change the model when on


class ScaledIdentity(nnx.Module):
    """A toy adapter written only here: y = base(x) · (1 + g) with a learned per-output gain g [L, out]."""

    method = "scaled_identity"

    def __init__(self, shape, axes):
        L, _, d_out = shape
        self.g = nnx.LoRAParam(jnp.zeros((L, d_out)), axes=(axes[1],))

    def __call__(self, x, base, kernel, ctx):
        return base(x) * (1 + self.g[...]).astype(x.dtype)

    def merge(self, kernel):
        return kernel.astype(jnp.float32) * (1 + self.g[...])[:, None, :]

    def peft_tensors(self, name, layer):
        return {f"{name}.gain": np.asarray(self.g[layer])}


def test_a_new_adapter_type_plugs_in_through_the_protocol(tiny):
    """No library file knows ScaledIdentity: the forward, adapters-off, split, the gradient, the merge
    and the sharding axes all go through the protocol."""
    model = load_pretrained(tiny)
    for i, (_, lin) in enumerate(adapters.targets(model, ("q_proj", "down_proj"))):  # q_proj has no bias
        lin.adapter = ScaledIdentity(lin.kernel.shape, lin.axes)
        lin.adapter.g[...] = 0.3 * jax.random.normal(jax.random.key(i), lin.adapter.g.shape)
    merged = load_pretrained(tiny)
    for (_, lin), (_, m) in zip(adapters.targets(model, ("q_proj", "down_proj")),
                                adapters.targets(merged, ("q_proj", "down_proj"))):
        m.kernel[...] = adapters.merged_kernel(lin)
    b = _batch()
    toks = jnp.asarray(b["tokens"])
    np.testing.assert_allclose(np.asarray(model(toks)[0]), np.asarray(merged(toks)[0]), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(model(toks, ctx=OFF)[0]), np.asarray(load_pretrained(tiny)(toks)[0]))

    graphdef, params, frozen = adapters.split(model, LoraConfig())
    assert {p[-2:] for p, _ in nnx.to_flat_state(params)} == {("adapter", "g")}
    g = jax.grad(lambda p: sft_loss(nnx.merge(graphdef, p, frozen), b)[0])(params)
    assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g))

    mesh = sharding.make_mesh(jaxft.config.MeshConfig(fsdp=2, tensor=2, strategy="fsdp_tp"))
    sh = sharding.tree_shardings(params, mesh, "fsdp_tp")
    specs = {"/".join(map(str, p)): tuple(v.get_value().spec) for p, v in nnx.to_flat_state(sh)}
    assert specs["model/layers/self_attn/q_proj/adapter/g"] == (None, "tensor")  # heads → tensor
    assert specs["model/layers/mlp/down_proj/adapter/g"] == (None, "fsdp")  # embed → fsdp


def test_dropout_key_reaches_every_module_and_layer_distinctly(tiny):
    """Dropout travels in Ctx: each layer (scan fold) and projection (index fold) draws its own mask."""
    model = load_pretrained(tiny)
    adapters.attach(model, LoraConfig(r=4, alpha=8, dropout=0.5), jax.random.key(0))
    for i, (_, lin) in enumerate(adapters.targets(model, ("all-linear",))):  # B ≠ 0: dropout changes the output
        lin.adapter.b[...] = 0.2 * jax.random.normal(jax.random.key(100 + i), lin.adapter.b.shape)
    key = jax.random.key(3)
    ctx = Ctx(dropout_key=key)
    layer_keys = [jax.random.key_data(ctx.fold(i).dropout_key) for i in range(3)]
    assert len({bytes(np.asarray(k)) for k in layer_keys}) == 3
    proj = [bytes(np.asarray(jax.random.key_data(ctx.fold(0).fold(j).dropout_key))) for j in range(7)]
    assert len(set(proj)) == 7
    b = _batch()
    assert float(sft_loss(model, b, ctx)[0]) == float(sft_loss(model, b, ctx)[0])
    assert float(sft_loss(model, b, ctx)[0]) != float(sft_loss(model, b)[0])


def test_plain_layouts_equal_the_cpu_tuned_ones(tiny):
    """Tuning's switches (2-D GEMMs, heads-major attention, the loss's exp barrier) change the layout only."""
    from jaxft.models.decoder import PLAIN

    b = _batch()
    tuned = _trained_lora(tiny)
    plain = load_pretrained(tiny, tuning=PLAIN)
    adapters.attach(plain, LoraConfig(r=4, alpha=8), jax.random.key(0))
    for (_, a), (_, p) in zip(adapters.targets(tuned, ("all-linear",)), adapters.targets(plain, ("all-linear",))):
        p.adapter.b[...] = a.adapter.b[...]
    toks = jnp.asarray(b["tokens"])
    np.testing.assert_allclose(np.asarray(plain(toks)[0]), np.asarray(tuned(toks)[0]), atol=2e-5, rtol=0)
    grads = [jax.grad(lambda p, g=g, f=f: sft_loss(nnx.merge(g, p, f), b)[0])(p)
             for g, p, f in (adapters.split(m, LoraConfig()) for m in (tuned, plain))]
    for x, y in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        # the layouts sum in different orders: fp32 differences scale with the tensor's largest entry
        # (here up to ~5), so the bound is 2 ulps-ish of that, not of each element
        scale = float(jnp.abs(x).max())
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5 * max(scale, 1.0), rtol=0)
    # the KV cache follows the attention's layout ([L, B, K, T, H] heads-major, else [L, B, T, K, H])
    from jaxft.generate import Sampling, generate

    prompts, s = [[3, 5, 7], [9, 4]], Sampling(temperature=0.7, max_new_tokens=6, seed=1)
    outs = [generate(nnx.split(m)[0], (nnx.split(m)[1],), prompts, eos_ids=set(), sampling=s) for m in (tuned, plain)]
    np.testing.assert_array_equal(outs[1].tokens, outs[0].tokens)
    np.testing.assert_allclose(outs[1].logprobs, outs[0].logprobs, atol=1e-5, rtol=0)


def test_restore_trainable_reads_params_without_the_optimizer(tmp_path):
    """eval / export read state/params only: the optimizer that wrote the checkpoint need not be known."""
    from jaxft.checkpoint import Checkpoints, restore_trainable

    model = _trained_lora_small()
    graphdef, params, frozen = adapters.split(model, LoraConfig())
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))  # a structure eval never rebuilds
    state = init_state(params, tx)
    ckpts = Checkpoints(tmp_path, 2)
    ckpts.save(7, state, {"step": 7})
    ckpts.close()
    got, meta = restore_trainable(tmp_path, params)
    assert meta["step"] == 7
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(jaxft.JaxftError, match="no checkpoint"):
        restore_trainable(tmp_path / "nothing", params)


def _trained_lora_small():
    """A random tiny decoder with a LoRA adapter, built without files."""
    from tiny import make_config

    model = Decoder(DecoderConfig.from_hf(make_config("llama")), rngs=nnx.Rngs(0))
    adapters.attach(model, LoraConfig(r=4, alpha=8), jax.random.key(0))
    return model


# ---------------------------------------------------------------- compile counts


def test_train_and_eval_steps_compile_once_for_new_weights(tiny):
    model = _trained_lora(tiny)
    cfg = LoraConfig(r=4, alpha=8)
    graphdef, params, frozen = adapters.split(model, cfg)
    tx = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=0), 10, params)
    step = make_train_step(graphdef, tx)
    batch = jax.tree.map(lambda x: x[None], _batch())
    dev = jax.devices()[0]  # committed arrays, as jaxft.train places them (uncommitted ones are another key)
    ev = make_eval_step(graphdef, sft_loss)
    a = ev(jax.device_put(params, dev), frozen, _batch())
    state = jax.device_put(init_state(params, tx), dev)
    for _ in range(3):  # every call gets a new (donated) state: new weights, same program
        state, _ = step(state, frozen, batch)
    assert step._cache_size() == 1
    b = ev(state["params"], frozen, _batch())
    assert ev._cache_size() == 1 and float(a[0]) != float(b[0])


def test_generation_does_not_recompile_or_keep_old_weights(tiny):
    """Weights are arguments of the compiled program: new weights reuse it, and the old ones are freed."""
    refs, answers, sizes = [], [], []
    for seed in range(3):
        model = _trained_lora(tiny, seed=seed)
        graphdef, params, frozen = adapters.split(model, LoraConfig())
        out = generate(graphdef, (params, frozen), PROMPTS, eos_ids={95}, sampling=Sampling(max_new_tokens=8))
        answers.append(out.ids())
        sizes.append(_run._cache_size())  # the jit cache is global: other tests may have filled it before
        refs += [weakref.ref(x) for x in jax.tree.leaves(params)]
        del model, params, frozen, out
    gc.collect()
    assert sizes[1] == sizes[2] == sizes[0]  # new weights: no new program
    assert answers[0] != answers[1]  # the weights did change the answers
    assert all(r() is None for r in refs)  # no previous adapter weights kept alive by the jit cache


# ---------------------------------------------------------------- generation's log-probs


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: final and attention soft-caps
def test_sampled_logprobs_equal_the_training_forward(arch, tmp_path):
    save_model(arch, tmp_path)
    model = _trained_lora(tmp_path, scale=0.1)
    graphdef, state = nnx.split(model)
    T = 0.7
    s = Sampling(temperature=T, top_k=20, max_new_tokens=10, seed=4)
    out = generate(graphdef, (state,), PROMPTS, eos_ids={95}, sampling=s)
    assert out.tokens.shape[1] == 10 and not (out.tokens == out.tokens[:, :1]).all()
    for i, p in enumerate(PROMPTS):
        n = int(out.lengths[i])
        seq = np.asarray(p + out.tokens[i, :n].tolist(), np.int32)[None]
        h, _ = model.hidden(jnp.asarray(seq[:, :-1]))
        lp = token_logprobs(model, h, jnp.asarray(seq[:, 1:]), temperature=T)[0, len(p) - 1:]
        np.testing.assert_allclose(out.logprobs[i, :n], np.asarray(lp), atol=1e-5, rtol=0)


def test_adapters_off_generation_equals_the_base_model(tiny):
    model = _trained_lora(tiny)
    graphdef, state = nnx.split(model)
    bg, bstate = nnx.split(load_pretrained(tiny))
    s = Sampling(max_new_tokens=12)
    off = generate(graphdef, (state,), PROMPTS, eos_ids={95}, sampling=s, ctx=OFF)
    base = generate(bg, (bstate,), PROMPTS, eos_ids={95}, sampling=s)
    on = generate(graphdef, (state,), PROMPTS, eos_ids={95}, sampling=s)
    assert off.ids() == base.ids() != on.ids()
    np.testing.assert_array_equal(off.logprobs, base.logprobs)


def test_sharded_generation_equals_one_device(tiny):
    model = _trained_lora(tiny)
    graphdef, params, frozen = adapters.split(model, LoraConfig())
    s = Sampling(temperature=0.8, max_new_tokens=10, seed=1)
    prompts = PROMPTS * 3  # 9 rows → padded to 16: divisible by data × fsdp = 4
    one = generate(graphdef, (params, frozen), prompts, eos_ids={95}, sampling=s)
    mesh = sharding.make_mesh(jaxft.config.MeshConfig(data=2, fsdp=2, tensor=2, strategy="fsdp_tp"))
    placed = [sharding.place(t, sharding.tree_shardings(t, mesh, "fsdp_tp")) for t in (params, frozen)]
    kernel = placed[1]["model"]["layers"]["self_attn"]["q_proj"]["kernel"][...]
    assert len({sh.data.shape for sh in kernel.addressable_shards}) == 1 and kernel.addressable_shards[0].data.size \
        < kernel.size  # really sharded
    many = generate(graphdef, tuple(placed), prompts, eos_ids={95}, sampling=s, mesh=mesh)
    assert many.ids() == one.ids()
    np.testing.assert_allclose(many.logprobs, one.logprobs, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- module boundaries


def test_projection_list_lives_in_one_place():
    """No module but models/names.py spells out a list (tuple, set, dict) of the layer projections."""
    from jaxft.models.names import PROJECTIONS

    def lists(tree):
        for node in ast.walk(tree):
            elts = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
            if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)) and elts:
                found = {e.value for e in elts if isinstance(e, ast.Constant) and e.value in PROJECTIONS}
                if len(found) >= 3:
                    yield found

    holders = sorted(f.relative_to(PKG).as_posix() for f in PKG.rglob("*.py") if any(lists(ast.parse(f.read_text()))))
    assert holders == ["models/names.py"], holders

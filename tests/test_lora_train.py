"""LoRA and the train step on tiny random models: freezing, exact gradients, accumulation, NaN skipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxft
import jaxft.train
from jaxft.formats.hf import load_pretrained
from jaxft import adapters
from jaxft.config import LoraConfig, OptimConfig
from jaxft.context import Ctx
from jaxft.losses import sft_loss, token_logprob_sum, token_logprobs
from jaxft.optim import make_optimizer
from jaxft.train import init_state, make_train_step
from tiny import save_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    save_model("qwen3", d)
    return d


def _batch(B=2, S=16, seed=0, vocab=96):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, vocab, (B, S)).astype(np.int32)
    return dict(tokens=tokens, positions=np.tile(np.arange(S, dtype=np.int32), (B, 1)),
                segment_ids=np.ones((B, S), np.int32),
                targets=np.concatenate([tokens[:, 1:], np.zeros((B, 1), np.int32)], 1),
                loss_mask=np.concatenate([np.ones((B, S - 1)), np.zeros((B, 1))], 1).astype(np.float32) *
                (rng.rand(B, S) > 0.3))


def _lora_model(tiny_dir, **kw):
    model = load_pretrained(tiny_dir)
    cfg = LoraConfig(r=4, alpha=8, **kw)
    adapters.attach(model, cfg, jax.random.key(0))
    return model, cfg


def test_fresh_adapter_leaves_logits_unchanged(tiny_dir):
    base = load_pretrained(tiny_dir)
    model, _ = _lora_model(tiny_dir)
    toks = jnp.asarray(_batch()["tokens"])
    np.testing.assert_array_equal(np.asarray(model(toks)[0]), np.asarray(base(toks)[0]))
    assert model.model.layers.self_attn.q_proj.adapter.a.shape == (3, 64, 4)
    assert model.model.layers.mlp.down_proj.adapter.b.shape == (3, 4, 64)
    # base paths unchanged
    assert model.model.layers.self_attn.q_proj.kernel.shape == base.model.layers.self_attn.q_proj.kernel.shape


def test_target_modules_and_scaling(tiny_dir):
    model, cfg = _lora_model(tiny_dir, target_modules=("q_proj", "v_proj"))
    assert model.model.layers.self_attn.q_proj.adapter is not None
    assert model.model.layers.self_attn.k_proj.adapter is None and model.model.layers.mlp.up_proj.adapter is None
    assert model.model.layers.self_attn.q_proj.adapter.scale == 2.0
    assert adapters.scale(LoraConfig(r=16, alpha=8, rslora=True)) == 2.0
    with pytest.raises(jaxft.JaxftError, match="'qkv' is not a linear layer"):
        adapters.attach(load_pretrained(tiny_dir), LoraConfig(target_modules=("qkv",)), jax.random.key(0))


def test_lora_forward_is_peft_formula(tiny_dir):
    """Layer 0's q_proj with an adapter computes x W + s (x A) B, and merged_kernel is W + s A B."""
    model, _ = _lora_model(tiny_dir)
    q = model.model.layers.self_attn.q_proj
    q.adapter.b[...] = jax.random.normal(jax.random.key(1), q.adapter.b.shape)
    graphdef, state = nnx.split(model.model.layers)
    layer0 = nnx.merge(graphdef, jax.tree.map(lambda v: v[0], state))  # unstack layer 0
    x = jax.random.normal(jax.random.key(2), (5, 64))
    W, A, B = q.kernel[0], q.adapter.a[0], q.adapter.b[0]
    want = x @ W + 2.0 * (x @ A) @ B  # alpha / r = 8 / 4
    np.testing.assert_allclose(np.asarray(layer0.self_attn.q_proj(x)), np.asarray(want), rtol=1e-5, atol=1e-5)
    merged = adapters.merged_kernel(q)
    np.testing.assert_allclose(np.asarray(merged[0]), np.asarray(W + 2.0 * A @ B), rtol=1e-5, atol=1e-6)


def test_split_trains_only_the_adapter(tiny_dir):
    model, cfg = _lora_model(tiny_dir)
    graphdef, params, frozen = adapters.split(model, cfg)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    assert leaves and all(str(p[-2].key) in ("a", "b") for p, _ in leaves)
    full = LoraConfig(enabled=False)
    g2, p2, f2 = adapters.split(load_pretrained(tiny_dir), full)
    assert len(jax.tree.leaves(f2)) == 0
    g3, p3, f3 = adapters.split(_lora_model(tiny_dir, modules_to_save=("lm_head",))[0],
                            LoraConfig(modules_to_save=("lm_head",)))
    assert any("lm_head" in str(p) for p, _ in jax.tree_util.tree_leaves_with_path(p3))


def test_step_changes_only_trainable_leaves(tiny_dir):
    model, cfg = _lora_model(tiny_dir)
    graphdef, params, frozen = adapters.split(model, cfg)
    frozen_before = jax.tree.map(np.array, frozen)
    params_before = jax.tree.map(np.array, params)
    tx = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), 10, params)
    step = make_train_step(graphdef, tx)
    batch = jax.tree.map(lambda x: x[None], _batch())
    state, m = step(init_state(params, tx), frozen, batch)
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before)):
        np.testing.assert_array_equal(np.asarray(a), b)  # frozen: bit-identical
    names = [str(p[-2].key) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    moved = [not np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(state["params"]),
                                                                   jax.tree.leaves(params_before))]
    # step 1: B = 0, so A has no gradient yet; every B moves
    assert [n for n, m_ in zip(names, moved) if m_] == [n for n in names if n == "b"]
    assert int(state["step"]) == 1 and bool(m["finite"])
    state, m = step(state, frozen, batch)
    moved = [not np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(state["params"]),
                                                                   jax.tree.leaves(params_before))]
    assert all(moved)
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_lora_gradients_equal_full_model_gradients(tiny_dir):
    """Gradient through the split equals the whole-model gradient restricted to the adapter, and finite differences."""
    model, cfg = _lora_model(tiny_dir)
    for _, lin in adapters.targets(model, ("all-linear",)):
        lin.adapter.b[...] = 0.05 * jax.random.normal(jax.random.key(3), lin.adapter.b.shape)
    batch = _batch()
    graphdef, params, frozen = adapters.split(model, cfg)

    def loss_split(p):
        s, c = sft_loss(nnx.merge(graphdef, p, frozen), batch)
        return s / c

    g_split = jax.grad(loss_split)(params)
    g_full = nnx.grad(lambda m: (lambda s, c: s / c)(*sft_loss(m, batch)), argnums=nnx.DiffState(0, nnx.Param))(model)
    g_full_lora = nnx.state(g_full, nnx.LoRAParam)
    for a, b in zip(jax.tree.leaves(g_split), jax.tree.leaves(g_full_lora)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    # central finite differences on a few entries of one B
    flat, unflatten = jax.flatten_util.ravel_pytree(params)
    gflat, _ = jax.flatten_util.ravel_pytree(g_split)
    f = jax.jit(lambda v: loss_split(unflatten(v)))
    idx = np.argsort(-np.abs(np.asarray(gflat)))[:5]
    for i in idx:
        e = jnp.zeros_like(flat).at[i].set(1e-2)
        fd = (f(flat + e) - f(flat - e)) / 2e-2
        np.testing.assert_allclose(float(fd), float(gflat[i]), rtol=2e-2)


def test_accumulation_4x1_equals_1x4(tiny_dir):
    model, cfg = _lora_model(tiny_dir)
    for _, lin in adapters.targets(model, ("all-linear",)):  # B ≠ 0, so A has a gradient too
        lin.adapter.b[...] = 0.1 * jax.random.normal(jax.random.key(7), lin.adapter.b.shape)
    graphdef, params, frozen = adapters.split(model, cfg)
    # plain SGD, lr 1: the update is the gradient itself (Adam's first step is ~sign(g), blind to its size
    # and, where |g| ~ eps, amplifying last-bit differences)
    tx = optax.sgd(1.0)
    step = make_train_step(graphdef, tx)
    big = _batch(B=4, seed=5)
    one = jax.tree.map(lambda x: x[None], big)  # [1, 4, S]
    four = jax.tree.map(lambda x: x[:, None], big)  # [4, 1, S]
    before = jax.tree.map(np.array, params)
    s1, m1 = step(init_state(jax.tree.map(jnp.copy, params), tx), frozen, one)
    s4, m4 = step(init_state(params, tx), frozen, four)
    np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-6)
    assert float(m1["targets"]) == float(m4["targets"]) == big["loss_mask"].sum()
    for p0, a, b in zip(jax.tree.leaves(before), jax.tree.leaves(s1["params"]), jax.tree.leaves(s4["params"])):
        g1, g4 = p0 - np.asarray(a), p0 - np.asarray(b)
        assert np.abs(g1).max() > 0
        np.testing.assert_allclose(g1, g4, rtol=1e-5, atol=1e-5 * np.abs(g1).max())


def test_nonfinite_step_is_skipped(tiny_dir):
    model, cfg = _lora_model(tiny_dir)
    graphdef, params, frozen = adapters.split(model, cfg)
    tx = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), 10, params)

    def poisoned(m, batch, ctx):
        s, c = sft_loss(m, batch, ctx)
        return s * jnp.where(batch["tokens"][0, 0] == 0, jnp.nan, 1.0), c

    step = make_train_step(graphdef, tx, loss_fn=poisoned)
    good = jax.tree.map(lambda x: x[None], _batch())
    bad = jax.tree.map(lambda x: x.copy(), good)
    bad["tokens"][0, 0, 0] = 0
    state = init_state(params, tx)
    before = jax.tree.map(np.array, state["params"])
    state, m = step(state, frozen, bad)
    assert not bool(m["finite"]) and int(state["bad_steps"]) == 1 and int(state["skipped"]) == 1
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    state, m = step(state, frozen, good)
    assert bool(m["finite"]) and int(state["bad_steps"]) == 0 and int(state["skipped"]) == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_finds_one_bad_entry_in_any_leaf(bad):
    """jaxft.train's finiteness check of the new weights and moments (a max |x| reduction per leaf)
    flags a single NaN / ±Inf anywhere, in fp32 and bf16, and passes finite extremes and empty leaves."""
    tree = {"a": jnp.full((300, 7), np.finfo(np.float32).max), "b": jnp.ones((5,), jnp.bfloat16),
            "e": jnp.zeros((0,)), "i": jnp.arange(3)}
    assert bool(jaxft.train._all_finite(tree))
    for name in ("a", "b"):
        x = np.array(tree[name], np.float32)
        x.flat[x.size // 2] = bad
        assert not bool(jax.jit(jaxft.train._all_finite)({**tree, name: jnp.asarray(x, tree[name].dtype)}))


def test_loss_falls_when_memorizing(tiny_dir):
    for enabled in (True, False):
        model = load_pretrained(tiny_dir)
        cfg = LoraConfig(r=8, alpha=16, enabled=enabled)
        if enabled:
            adapters.attach(model, cfg, jax.random.key(0))
        graphdef, params, frozen = adapters.split(model, cfg)
        tx = make_optimizer(OptimConfig(lr=3e-3 if not enabled else 2e-2, warmup_steps=0), 30, params)
        step = make_train_step(graphdef, tx)
        batch = jax.tree.map(lambda x: x[None], _batch())
        state = init_state(params, tx)
        losses = []
        for _ in range(30):
            state, m = step(state, frozen, batch)
            losses.append(float(m["loss"]))
        assert losses[-1] < 0.3 * losses[0], (enabled, losses)


def test_chunked_logprobs_equal_full_logits(tiny_dir):
    model = load_pretrained(tiny_dir)
    b = _batch(S=40)
    h, _ = model.hidden(jnp.asarray(b["tokens"]))
    full = jax.nn.log_softmax(model.logits(h).astype(jnp.float32), -1)
    want = jnp.take_along_axis(full, jnp.asarray(b["targets"])[..., None], -1)[..., 0]
    for chunk in (7, 16, 64):
        np.testing.assert_allclose(np.asarray(token_logprobs(model, h, jnp.asarray(b["targets"]), chunk)),
                                   np.asarray(want), atol=1e-5)


def test_lora_dropout_is_seeded_and_active(tiny_dir):
    model, cfg = _lora_model(tiny_dir, dropout=0.5)
    for _, lin in adapters.targets(model, ("all-linear",)):
        lin.adapter.b[...] = 0.1 * jax.random.normal(jax.random.key(3), lin.adapter.b.shape)
    b = _batch()
    l0 = sft_loss(model, b)[0]
    l1 = sft_loss(model, b, Ctx(dropout_key=jax.random.key(1)))[0]
    l1b = sft_loss(model, b, Ctx(dropout_key=jax.random.key(1)))[0]
    l2 = sft_loss(model, b, Ctx(dropout_key=jax.random.key(2)))[0]
    assert float(l1) == float(l1b) and float(l1) != float(l2) and float(l0) != float(l1)


def test_bf16_compute_keeps_fp32_adapter_and_optimizer_state(tiny_dir):
    model = load_pretrained(tiny_dir, dtype=jnp.bfloat16)
    cfg = LoraConfig(r=4, alpha=8)
    adapters.attach(model, cfg, jax.random.key(0))
    graphdef, params, frozen = adapters.split(model, cfg)
    assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    tx = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), 10, params)
    state = init_state(params, tx)
    assert {x.dtype for x in jax.tree.leaves(state["opt_state"]) if x.ndim} == {jnp.dtype(jnp.float32)}
    step = make_train_step(graphdef, tx)
    batch = jax.tree.map(lambda x: x[None], _batch())
    losses = []
    for _ in range(5):
        state, m = step(state, frozen, batch)
        losses.append(float(m["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # untied head; tied head with a final soft-cap
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("form", ["per_token", "sum"])
def test_chunked_logprobs_gradients_equal_autodiff(tmp_path, arch, dtype, form):
    """The hand-written head gradients equal autodiff of full logits, for a frozen head (gradient to h
    only: the dh-in-forward path) and a trainable one: per token (jaxft.losses._chunk_logprobs, whose
    trainable head recomputes in the backward pass) and the weighted sum (jaxft.losses._logprob_sum,
    whose forward computes the head's gradient too)."""
    save_model(arch, tmp_path)
    model = load_pretrained(tmp_path, dtype=jnp.dtype(dtype), compute_dtype=jnp.dtype(dtype))
    b = _batch(S=19)
    h, _ = model.hidden(jnp.asarray(b["tokens"]))
    t = jnp.asarray(b["targets"])
    w = jnp.asarray(np.random.RandomState(1).randn(*t.shape), jnp.float32)  # arbitrary per-token cotangents
    g, state = nnx.split(model)

    def ours(state, h):
        if form == "sum":
            return token_logprob_sum(nnx.merge(g, state), h, t, w, chunk=8)
        return jnp.sum(w * token_logprobs(nnx.merge(g, state), h, t, chunk=8))

    def autodiff(state, h):
        full = jax.nn.log_softmax(nnx.merge(g, state).logits(h).astype(jnp.float32), -1)
        return jnp.sum(w * jnp.take_along_axis(full, t[..., None], -1)[..., 0])

    # fp32 is the exactness check. bf16: the two round the [B, S, V] cotangent before or after the
    # per-token scale and sum chunks in another order, so they differ by bf16 roundings (one ulp = 2^-7
    # relative; up to 1.03% of the largest entry seen, on the tied embedding): 2e-2 is under 3 ulps
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=0, atol=2e-2)
    frozen = [jax.grad(f, argnums=1)(state, h) for f in (ours, autodiff)]
    scale = float(jnp.abs(frozen[1].astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(frozen[0], np.float32) / scale, np.asarray(frozen[1], np.float32) / scale,
                               **tol)
    both = [jax.grad(f, argnums=(0, 1))(state, h) for f in (ours, autodiff)]
    for x, y in zip(jax.tree.leaves(both[0]), jax.tree.leaves(both[1])):
        scale = max(float(jnp.abs(y.astype(jnp.float32)).max()), 1e-30)
        np.testing.assert_allclose(np.asarray(x, np.float32) / scale, np.asarray(y, np.float32) / scale, **tol)
    head_grads = jax.tree.leaves(nnx.state(nnx.merge(g, both[0][0]).head))
    assert head_grads and all(float(jnp.abs(x).max()) > 0 for x in head_grads)  # the trainable path ran


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # untied head; tied embeddings with a final soft-cap
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_full_finetuning_gradients_equal_autodiff(tmp_path, arch, dtype):
    """Every weight trainable: sft_loss's value and gradients (the head's from the forward pass of
    jaxft.losses._logprob_sum; tied: added to the embedding lookup's) equal autodiff of full logits,
    for every parameter, embeddings and head included."""
    save_model(arch, tmp_path)
    model = load_pretrained(tmp_path, dtype=jnp.dtype(dtype), compute_dtype=jnp.dtype(dtype))
    b = jax.tree.map(jnp.asarray, _batch(S=19))
    g, state = nnx.split(model)

    def autodiff(state):
        model = nnx.merge(g, state)
        h, _ = model.hidden(b["tokens"], b["positions"], b["segment_ids"])
        full = jax.nn.log_softmax(model.logits(h).astype(jnp.float32), -1)
        lp = jnp.take_along_axis(full, b["targets"][..., None], -1)[..., 0]
        return -jnp.sum(lp * b["loss_mask"])

    ours = lambda state: sft_loss(nnx.merge(g, state), b)[0]  # noqa: E731
    (l0, g0), (l1, g1) = jax.value_and_grad(ours)(state), jax.value_and_grad(autodiff)(state)
    # bf16: the chunked and the full logits' elementwise ops (soft-cap) round at other fusion boundaries,
    # so the losses differ by bf16 roundings (2^-8 relative each) averaged over tokens
    np.testing.assert_allclose(float(l0), float(l1), rtol=1e-5 if dtype == "float32" else 1e-3)
    # undifferentiated (evaluation) the custom gradient's primal runs instead of its forward rule: same value
    np.testing.assert_allclose(float(ours(state)), float(l1), rtol=1e-5 if dtype == "float32" else 1e-3)
    # tolerances as test_chunked_logprobs_gradients_equal_autodiff's: fp32 exact up to reassociation, bf16 < 3 ulps
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=0, atol=2e-2)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(g1)[0]]
    assert any("embed_tokens" in n for n in names) and (arch == "gemma2") == (not any("lm_head" in n for n in names))
    for name, x, y in zip(names, jax.tree.leaves(g0), jax.tree.leaves(g1)):
        scale = max(float(jnp.abs(y.astype(jnp.float32)).max()), 1e-30)
        np.testing.assert_allclose(np.asarray(x, np.float32) / scale, np.asarray(y, np.float32) / scale,
                                   err_msg=name, **tol)

"""The attention kernels (jaxft.models.attention) against the XLA reference (today's einsum → fp32 softmax →
einsum) and transformers eager: one call on its own, then whole models of every attention family (sliding
windows, soft-caps, GQA / MQA) with packing, left padding, the KV-cache decode and GRPO's shared prompts; the
blockwise kernel's memory growth and compile count. cuDNN itself runs only on a GPU: here its call runs with
implementation="xla" (the same arguments: layouts, GQA, window, scale, mask)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxft import adapters
from jaxft.config import LoraConfig, OptimConfig, load_config
from jaxft.context import ON
from jaxft.errors import JaxftError
from jaxft.formats.hf import load_pretrained
from jaxft.generate import Sampling, generate
from jaxft.losses import sft_loss
from jaxft.models.attention import (NO_WINDOW, AttentionKernel, Mask, attend, blockwise_attention, choose,
                                    fused_attention, xla_attention)
from jaxft.models.decoder import PLAIN
from jaxft.optim import make_optimizer
from jaxft.train import init_state, make_train_step
from tiny import make_model, save_chat_model, shared_prompt_rows

FAMILIES = ["llama", "mistral", "qwen2_sliding", "gemma2", "gemma3_text"]  # windows, soft-cap, local / global
ODD = AttentionKernel("blockwise", 7, 5)  # tiles that divide none of the lengths below
XLA = AttentionKernel("xla")
HEADS = "bkgsh,bkth->bkgst", "bkgst,bkth->bkgsh"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """arch → (directory, the transformers model saved there)."""
    out = {}
    for arch in FAMILIES:
        d = tmp_path_factory.mktemp(arch)
        model = make_model(arch)
        model.save_pretrained(d)
        out[arch] = (d, model)
    return out


# ---------------------------------------------------------------- one call


def _qkv(B=2, K=2, G=3, S=19, T=19, H=8, seed=0):
    r = np.random.default_rng(seed)
    return [jnp.asarray(r.normal(size=s), jnp.float32) for s in ((B, K, G, S, H), (B, K, T, H), (B, K, T, H))]


def _mask(q_seg, kv_seg, q_slot, kv_slot, window=NO_WINDOW, aligned=False):
    i = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    return Mask(i(q_seg), i(kv_seg), i(q_slot), i(kv_slot), i(window), aligned)


def _masks():
    """name → (Mask, S, T): packing, left padding, a window, a decode step into a half-filled cache, a prefix."""
    S = 19
    seg = np.ones((2, S), np.int32)
    seg[0, :4] = 0  # left padding
    seg[1, 8:] = 2  # two packed documents
    seg[1, 17:] = 0  # right padding
    ar = np.arange(S)
    cache = np.zeros((2, 23), np.int32)
    cache[:, 3:12] = 1  # a left-padded prompt of 9, then 3 new tokens at slots 12..14; slots 15.. empty
    cache[1, 12:15] = 1
    cache[0, 12:15] = 1
    return {
        "packed_padded": (_mask(seg, seg, ar, ar, aligned=True), S, S),
        "window": (_mask(seg, seg, ar, ar, 5, aligned=True), S, S),
        "decode": (_mask(cache[:, 12:15], cache, 12 + np.arange(3), np.arange(23), 5), 3, 23),
        "prefix": (_mask(np.ones((2, 6)), np.ones((2, 13)), 7 + np.arange(6), np.arange(13)), 6, 13),
    }


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("case", ["packed_padded", "window", "decode", "prefix"])
def test_blockwise_equals_the_reference_on_one_call(case, softcap):
    """Values and gradients of q, k, v to 1e-5 on the rows that see a key; rows that see none give zeros.
    Tiles that divide nothing, tiles longer than the sequence, one-row tiles."""
    mask, S, T = _masks()[case]
    q, k, v = _qkv(S=S, T=T)
    seen = np.asarray(mask.allowed().any(-1))[:, None, None, :, None]  # [B, 1, 1, S, 1]
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape[:4] + (v.shape[-1],)) * seen, jnp.float32)

    def value_and_grads(fn):
        return jax.jit(lambda *a: (fn(*a), jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2))(*a)))(q, k, v)

    want, grads = value_and_grads(lambda q, k, v: xla_attention(q, k, v, mask, 0.3, softcap, *HEADS))
    for bq, bk in ((7, 5), (64, 64), (1, 3)):
        got, g = value_and_grads(lambda q, k, v: blockwise_attention(q, k, v, mask, 0.3, softcap, bq, bk))
        assert np.abs(np.asarray(got - want) * seen).max() <= 1e-5, (bq, bk)
        assert not np.asarray(got * (1 - seen)).any()  # rows that see nothing: zeros
        for a, b in zip(g, grads):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [NO_WINDOW, 5])
def test_the_cudnn_call_with_xla_equals_the_reference(window):
    """The arguments the cuDNN path passes to jax.nn.dot_product_attention (layout, GQA heads, scale, causal,
    the left window picked by lax.cond on the traced window, packing as a mask) are right: the same call with
    implementation="xla" equals the reference. cuDNN itself needs a GPU (bf16) and is not run here."""
    mask, S, _ = _masks()["packed_padded"]
    mask = Mask(mask.q_seg, mask.kv_seg, mask.q_slot, mask.kv_slot, jnp.asarray(window, jnp.int32), True)
    q, k, v = _qkv(S=S, T=S)
    seen = np.asarray(mask.allowed().any(-1))[:, None, None, :, None]
    want = xla_attention(q, k, v, mask, 0.3, None, *HEADS)
    got = jax.jit(lambda q, k, v, m: fused_attention(q, k, v, m, 0.3, 5, "xla"))(q, k, v, mask)
    assert np.abs(np.asarray(got - want) * seen).max() <= 1e-5
    assert not np.asarray(got * (1 - seen)).any()


def test_splash_in_the_pallas_interpreter_equals_the_reference():
    """Pallas splash attention (the TPU kernel) run by the Pallas interpreter on CPU, through `attend`: GQA (its
    MQA kernel vmapped over kv heads and rows), soft-cap, packing, left and right padding, a global and a local
    layer (lax.cond on the traced window); values and gradients. Its speed can only be measured on a TPU."""
    B, K, G, S, H = 2, 2, 2, 128, 16  # 128: splash's smallest tile
    seg = np.ones((B, S), np.int32)
    seg[0, :9] = 0
    seg[1, 50:] = 2
    seg[1, 120:] = 0
    seen = (seg != 0)[:, None, None, :, None]
    q, k, v = _qkv(B, K, G, S, S, H)
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape) * seen, jnp.float32)
    splash = AttentionKernel("splash", 128, 128, interpret=True)

    def value_and_grads(kernel, window):
        mask = _mask(seg, seg, np.arange(S), np.arange(S), window, aligned=True)
        fn = lambda q, k, v: attend(kernel, q, k, v, mask, scale=0.3, softcap=2.0, sliding_window=7,  # noqa: E731
                                    heads_major=True, backend="tpu")
        return jax.jit(lambda *a: (fn(*a), jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2))(*a)))(q, k, v)

    for window in (NO_WINDOW, 7):
        want, grads = value_and_grads(XLA, window)
        got, g = value_and_grads(splash, window)
        assert np.abs(np.asarray(got - want) * seen).max() <= 1e-5
        assert not np.asarray(got * (1 - seen)).any()
        for a, b in zip(g, grads):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_what_each_backend_runs():
    q16 = jnp.zeros((1, 2, 2, 256, 64), jnp.bfloat16)
    aligned, decode = _masks()["packed_padded"][0], _masks()["decode"][0]
    auto = AttentionKernel()
    assert choose(auto, q16, aligned, None, "cpu") == "blockwise"
    assert choose(auto, q16, aligned, None, "gpu") == "cudnn"
    assert choose(auto, q16, aligned, 50.0, "gpu") == "blockwise"  # soft-cap: cuDNN has none
    assert choose(auto, q16, decode, None, "gpu") == "blockwise"  # a query offset: not a causal mask from 0
    assert choose(auto, q16.astype(jnp.float32), aligned, None, "gpu") == "blockwise"  # cuDNN: half precision
    assert choose(auto, q16, aligned, 50.0, "tpu") == "splash"
    assert choose(auto, q16, decode, None, "tpu") == "blockwise"
    assert choose(XLA, q16, aligned, None, "gpu") == "xla"
    assert choose(AttentionKernel("cudnn"), q16, aligned, None, "cpu") == "blockwise"  # no cuDNN on a CPU
    assert choose(AttentionKernel("splash"), q16, aligned, None, "cpu") == "blockwise"
    assert choose(AttentionKernel("splash", interpret=True), q16, aligned, None, "cpu") == "splash"
    with pytest.raises(ValueError, match="flash"):
        AttentionKernel("flash")


# ---------------------------------------------------------------- whole models


def _rows(S=24):
    """A left-padded row and a row of two packed documents with right padding: tokens, positions, segments."""
    r = np.random.RandomState(0)
    toks = r.randint(0, 96, (2, S))
    seg = np.ones((2, S), np.int32)
    seg[0, :7] = 0
    seg[1, 11:] = 2
    seg[1, 21:] = 0
    pos = np.stack([np.maximum(np.arange(S) - 7, 0), np.concatenate([np.arange(11), np.arange(S - 11)])])
    return toks, pos, seg


def _grads(model, toks, pos, seg):
    """(logits, gradient of every weight) of a loss on the real tokens' logits."""
    graphdef, state = nnx.split(model)
    keep = jnp.asarray(seg != 0)[..., None]
    w = jnp.asarray(np.random.default_rng(3).normal(size=(*toks.shape, 96)), jnp.float32) * keep

    def f(s):
        out, _ = nnx.merge(graphdef, s)(jnp.asarray(toks), jnp.asarray(pos), jnp.asarray(seg))
        return jnp.sum(out * w), out

    (_, out), g = jax.jit(jax.value_and_grad(f, has_aux=True))(state)
    return np.asarray(out), g


@pytest.mark.parametrize("arch", FAMILIES)
def test_every_kernel_equals_the_reference_and_transformers(arch, saved):
    """Logits and gradients of blockwise (odd tiles; auto's; the sequence-major layout) equal the XLA reference
    on packed and left-padded rows; logits and the embedding gradient equal transformers eager on left padding."""
    path, hf = saved[arch]
    toks, pos, seg = _rows()
    keep = seg != 0
    ref, g_ref = _grads(load_pretrained(path, attention=XLA), toks, pos, seg)
    odd = load_pretrained(path, attention=ODD)
    more = {"llama": [(AttentionKernel(), None)], "gemma2": [(ODD, PLAIN)]}.get(arch, [])
    for model in [odd] + [load_pretrained(path, attention=k, tuning=t) for k, t in more]:
        out, g = _grads(model, toks, pos, seg)
        assert np.abs(out - ref)[keep].max() <= 1e-5, model.attention
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
            np.testing.assert_allclose(a, b, atol=1e-5 * max(float(jnp.abs(b).max()), 1.0), rtol=0)
    # transformers eager: left padding as an attention mask (it has no packed rows), embedding gradient
    mask = (np.arange(24) >= 7).astype(np.int64)[None].repeat(2, 0)
    mask[1] = 1
    hpos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    hf.zero_grad()
    out = hf(torch.tensor(toks), attention_mask=torch.tensor(mask), position_ids=torch.tensor(hpos)).logits
    w = np.random.default_rng(3).normal(size=out.shape).astype(np.float32) * mask[..., None]
    (out * torch.tensor(w)).sum().backward()
    seg_hf = mask.astype(np.int32)
    got, g = _grads(odd, toks, hpos, seg_hf)
    ours = np.abs(got - out.detach().numpy())[mask == 1].max()
    assert ours <= 1e-5, ours  # measured 2e-6 to 9.6e-6 (llama), as the reference's own difference
    emb = np.asarray(g["model"]["embed_tokens"]["embedding"][...])
    theirs = hf.get_input_embeddings().weight.grad.numpy()
    assert np.abs(emb - theirs).max() <= 1e-5 * max(np.abs(theirs).max(), 1.0)  # fp32 sums in another order


def _lora(path, kernel):
    model = load_pretrained(path, attention=kernel)
    cfg = LoraConfig(r=4, alpha=8)
    adapters.attach(model, cfg, jax.random.key(0))
    graphdef, params, frozen = adapters.split(model, cfg)
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape, x.dtype), params)
    return graphdef, params, frozen


@pytest.mark.parametrize("arch", ["gemma2"])  # soft-cap, a window, local and global layers
def test_training_loss_and_gradients_are_unchanged_with_padding(arch, saved):
    """Padding rows differ (zeros instead of the reference's mean of every value) and never reach a real token:
    the SFT loss and the LoRA gradients on packed and left-padded rows are today's."""
    toks, pos, seg = _rows()
    batch = dict(tokens=toks, positions=pos, segment_ids=seg, targets=np.roll(toks, -1, 1),
                 loss_mask=((seg != 0) & (np.roll(seg, -1, 1) == seg)).astype(np.float32))
    out = []
    for kernel in (XLA, ODD):
        graphdef, params, frozen = _lora(saved[arch][0], kernel)
        out.append(jax.jit(jax.value_and_grad(lambda p, f: sft_loss(nnx.merge(graphdef, p, f), batch)[0]))(
            params, frozen))
    np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(out[1][1]), jax.tree.leaves(out[0][1])):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(float(jnp.abs(b).max()), 1.0), rtol=0)


@pytest.mark.parametrize("arch", ["gemma2"])
def test_decode_with_a_cache_equals_the_reference(arch, saved):
    """generate (left-padded prompts, a prefill, then one token a step against the cache): the same tokens
    and log-probs with blockwise attention as with the reference."""
    prompts, s = [[3, 5, 7, 9, 11, 13, 15, 17], [9, 4]], Sampling(temperature=0.7, max_new_tokens=12, seed=1)
    outs = []
    for kernel in (XLA, ODD):
        graphdef, params, frozen = _lora(saved[arch][0], kernel)
        outs.append(generate(graphdef, (params, frozen), prompts, eos_ids=set(), sampling=s))
    np.testing.assert_array_equal(outs[1].tokens, outs[0].tokens)
    np.testing.assert_allclose(outs[1].logprobs, outs[0].logprobs, atol=1e-5, rtol=0)


def test_shared_prompt_prefix_equals_whole_rows_of_the_reference(saved):
    """GRPO's shared prompts (keys = the prompt's keys, then the row's own) under blockwise attention give the
    reference's whole-row log-probs and gradients (gemma2: soft-cap, local / global layers)."""
    from jaxft.objectives.rollout import completion_logps

    rows, keys, keep, w = shared_prompt_rows()
    res = []
    for kernel, batch in ((XLA, rows), (ODD, dict(rows, **keys))):
        graphdef, params, frozen = _lora(saved["gemma2"][0], kernel)

        def f(p, fr):
            lp = completion_logps(nnx.merge(graphdef, p, fr), batch, ON, 0.7)
            return jnp.sum(lp * w), lp

        res.append(jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, frozen))
    (l0, lp0), g0 = res[0]
    (l1, lp1), g1 = res[1]
    assert np.abs(np.asarray(lp1) - np.asarray(lp0))[keep].max() <= 1e-5
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


# ---------------------------------------------------------------- memory, compiles, the config key


def _step_temp(path, kernel, T):
    graphdef, params, frozen = _lora(path, kernel)
    toks = np.random.RandomState(0).randint(0, 96, (1, T)).astype(np.int32)
    batch = dict(tokens=toks, positions=np.arange(T, dtype=np.int32)[None], segment_ids=np.ones_like(toks),
                 targets=toks, loss_mask=np.ones(toks.shape, np.float32))
    grad = jax.jit(jax.grad(lambda p, f: sft_loss(nnx.merge(graphdef, p, f), batch)[0]))
    return grad.lower(params, frozen).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_memory_grows_linearly(saved):
    """XLA's compiled temp bytes of a LoRA step at T and 2T: ≤ 2.2x with blockwise attention; with the reference
    2.9x (its S × T scores grow 4x; at this tiny width the linear terms still weigh)."""
    path = saved["llama"][0]
    blockwise = AttentionKernel("blockwise", 64, 64)
    growth = {name: _step_temp(path, kernel, 1024) / _step_temp(path, kernel, 512)
              for name, kernel in (("blockwise", blockwise), ("xla", XLA))}
    assert growth["blockwise"] <= 2.2, growth
    assert growth["xla"] >= 2.6, growth


def test_blockwise_train_step_compiles_once_for_new_weights(saved):
    graphdef, params, frozen = _lora(saved["gemma2"][0], ODD)
    tx = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=0), 10, params)
    step = make_train_step(graphdef, tx)
    toks, pos, seg = _rows()
    batch = dict(tokens=toks, positions=pos, segment_ids=seg, targets=np.roll(toks, -1, 1),
                 loss_mask=(seg != 0).astype(np.float32))
    batch = jax.tree.map(lambda x: x[None], batch)
    dev = jax.devices()[0]
    state = jax.device_put(init_state(params, tx), dev)
    losses = []
    for _ in range(3):  # a new (donated) state each call: new weights, the same program
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert step._cache_size() == 1
    assert losses[0] != losses[2]


def test_model_attention_key_reaches_the_decoder(tmp_path):
    from jaxft.setup import build

    save_chat_model(tmp_path)
    run = load_config(overrides=[f"model.path={tmp_path}", "model.attention=xla", "data.train=x.jsonl"])
    setup = build(run)
    assert nnx.merge(setup.graphdef, setup.params, setup.frozen).attention == XLA
    with pytest.raises(JaxftError, match="model.attention"):
        load_config(overrides=["model.attention=flash", "data.train=x.jsonl"])

"""Decoder parity with transformers, one tiny random model per family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxft.formats.hf import load_pretrained
from jaxft.models.config import DecoderConfig
from jaxft.models.decoder import Decoder
from tiny import ARCHS, make_config, make_model, save_model

SEQ = 24  # longer than the sliding windows (5) and the llama3 rope's original context (16)


def _tokens(batch=2, seq=SEQ, seed=0):
    return np.random.RandomState(seed).randint(0, 96, (batch, seq))


def _hf_logits(model, toks, **kw):
    with torch.no_grad():
        return model(torch.tensor(toks), **kw).logits.float().numpy()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fp32_logits_match_transformers(arch, tmp_path):
    ref_model = save_model(arch, tmp_path)
    toks = _tokens()
    ref = _hf_logits(ref_model, toks)
    assert ref.std() > 0.3, "logits too flat for the comparison to mean anything"
    model = load_pretrained(tmp_path)
    out, _ = model(jnp.asarray(toks))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)


def test_sharded_checkpoint(tmp_path):
    ref_model = save_model("qwen3", tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    toks = _tokens()
    out, _ = load_pretrained(tmp_path)(jnp.asarray(toks))
    np.testing.assert_allclose(np.asarray(out), _hf_logits(ref_model, toks), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3"])
def test_bf16_loading(arch, tmp_path):
    """bf16 weights and compute: judged against the fp32 truth next to transformers' own bf16 run.

    Stated tolerance: jaxft-bf16's error vs fp32 is at most 1.2x transformers-bf16's (mean abs) and
    1.5x (max abs), and the two bf16 runs differ by at most 5% of the largest logit."""
    ref_model = save_model(arch, tmp_path)
    toks = _tokens()
    ref32 = _hf_logits(ref_model, toks)
    ref16 = _hf_logits(ref_model.to(torch.bfloat16), toks)
    model = load_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert model.model.layers.self_attn.q_proj.kernel.dtype == jnp.bfloat16
    out, _ = model(jnp.asarray(toks))
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out, np.float32)
    ours, theirs = np.abs(out - ref32), np.abs(ref16 - ref32)
    assert ours.mean() <= 1.2 * theirs.mean()
    assert ours.max() <= 1.5 * theirs.max()
    assert np.abs(out - ref16).max() <= 0.05 * np.abs(ref32).max()


def test_padding_and_positions_match_transformers(tmp_path):
    """Left padding via segment_ids / positions equals transformers with an attention mask."""
    ref_model = save_model("gemma2", tmp_path)
    toks = _tokens()
    mask = np.ones_like(toks)
    mask[0, :7] = 0
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ref = _hf_logits(ref_model, toks, attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    out, _ = load_pretrained(tmp_path)(jnp.asarray(toks), jnp.asarray(pos), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(out)[mask == 1], ref[mask == 1], atol=1e-4, rtol=0)


def test_packed_documents_do_not_see_each_other(tmp_path):
    """Two documents packed in one row give the logits each gets alone."""
    save_model("mistral", tmp_path)
    model = load_pretrained(tmp_path)
    a, b = _tokens(1, 10, seed=1), _tokens(1, 14, seed=2)
    packed = np.concatenate([a, b], axis=1)
    pos = np.concatenate([np.arange(10), np.arange(14)])[None]
    seg = np.concatenate([np.full(10, 1), np.full(14, 2)])[None]
    out, _ = model(jnp.asarray(packed), jnp.asarray(pos), jnp.asarray(seg))
    la, _ = model(jnp.asarray(a))
    lb, _ = model(jnp.asarray(b))
    np.testing.assert_allclose(np.asarray(out[0, :10]), np.asarray(la[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out[0, 10:]), np.asarray(lb[0]), atol=1e-5)


def test_remat_policies_same_logits_and_grads(tmp_path):
    save_model("llama", tmp_path)
    toks = jnp.asarray(_tokens())
    results = []
    for remat in ("none", "proj", "dots", "full"):
        model = load_pretrained(tmp_path, remat=remat)
        from flax import nnx

        def loss(m):
            return jnp.mean(m(toks)[0] ** 2)

        l, g = nnx.value_and_grad(loss)(model)
        results.append((l, jax.tree.leaves(g)))
    for l, g in results[1:]:
        np.testing.assert_allclose(l, results[0][0], rtol=1e-6)
        for x, y in zip(g, results[0][1]):
            np.testing.assert_allclose(x, y, atol=1e-6)


def test_remat_proj_keeps_less_than_none(tmp_path):
    """remat="proj" keeps the projections only: less compiled temp memory than "none", more than "full"."""
    from flax import nnx

    from jaxft import adapters
    from jaxft.config import LoraConfig
    from jaxft.losses import sft_loss

    make_model("llama", num_hidden_layers=8).save_pretrained(tmp_path)
    toks = np.asarray(_tokens(), np.int32)
    batch = dict(tokens=toks, positions=np.broadcast_to(np.arange(toks.shape[1]), toks.shape), targets=toks,
                 segment_ids=np.ones_like(toks), loss_mask=np.ones(toks.shape, np.float32))
    temp = {}
    for remat in ("none", "proj", "full"):
        model = load_pretrained(tmp_path, remat=remat)
        cfg = LoraConfig(r=4, alpha=8)
        adapters.attach(model, cfg, jax.random.key(0))
        g, p, f = adapters.split(model, cfg)
        grad = jax.jit(jax.grad(lambda p, f: sft_loss(nnx.merge(g, p, f), batch)[0]))
        temp[remat] = grad.lower(p, f).compile().memory_analysis().temp_size_in_bytes
    assert temp["full"] < temp["proj"] < temp["none"], temp


def test_compile_does_not_grow_with_depth():
    """Scanned layers: the lowered program has one layer body whatever the depth."""
    from flax import nnx

    sizes = []
    for layers in (2, 16):
        cfg = DecoderConfig.from_hf(make_config("llama", num_hidden_layers=layers))
        model = Decoder(cfg, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        f = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
        sizes.append(len(f.lower(state, jnp.zeros((1, 8), jnp.int32)).as_text()))
    assert sizes[1] < sizes[0] * 1.05

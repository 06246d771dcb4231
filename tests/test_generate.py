"""KV-cache generation against transformers' generate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxft.context import ON
from jaxft.formats.hf import load_pretrained
from jaxft.generate import Generator, Sampling, sample_logits
from tiny import save_model

PROMPTS = [[5, 17, 33, 2, 9, 41, 7], [12, 3], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72]]


def _hf_greedy(model, prompts, max_new, eos):
    P = max(map(len, prompts))
    ids = torch.zeros((len(prompts), P), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             eos_token_id=eos, pad_token_id=0)
    res = []
    for row in out[:, P:].tolist():
        res.append(row[:row.index(eos)] if eos in row else row)
    return res


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen2_sliding", "gemma3_text"])
def test_greedy_batched_matches_transformers(arch, tmp_path):
    ref = save_model(arch, tmp_path)
    eos = 95
    expected = _hf_greedy(ref, PROMPTS, 20, eos)
    got = Generator(load_pretrained(tmp_path))(PROMPTS, eos_ids={eos}, sampling=Sampling(max_new_tokens=20))
    assert got == expected


def test_stops_at_eos_per_row(tmp_path):
    save_model("qwen3", tmp_path, seed=3)
    gen = Generator(load_pretrained(tmp_path))
    free = gen(PROMPTS, eos_ids={10_000}, sampling=Sampling(max_new_tokens=12))
    assert all(len(r) == 12 for r in free)
    r, eos = next((r, t) for r, row in enumerate(free) for t in row if t != row[0])  # emitted, not first
    stopped = gen(PROMPTS, eos_ids={eos}, sampling=Sampling(max_new_tokens=12))
    assert 0 < len(stopped[r]) < 12
    for got, full in zip(stopped, free):
        assert got == full[:full.index(eos)] if eos in full else got == full


def test_batched_equals_one_by_one(tmp_path):
    save_model("qwen3", tmp_path)
    gen = Generator(load_pretrained(tmp_path))
    s = Sampling(max_new_tokens=10)
    batched = gen(PROMPTS, eos_ids={95}, sampling=s)
    assert batched == [gen([p], eos_ids={95}, sampling=s)[0] for p in PROMPTS]


def test_sampling_seeded_and_filtered():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    def draw(**kw):
        return np.asarray(sample_logits(logits, jax.random.key(0), Sampling(temperature=1.0, **kw)))
    assert (draw() == draw()).all()  # same seed, same draw
    freq = np.bincount(draw(), minlength=4) / 2000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.04)
    assert set(draw(top_k=2)) == {0, 1}
    assert set(draw(top_p=0.7)) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    assert set(draw(top_p=0.5)) == {0}
    assert (np.asarray(sample_logits(logits, jax.random.key(1), Sampling())) == 0).all()  # greedy


def test_repeated_prompts_share_one_prefill(tmp_path):
    """G rows of one prompt (GRPO's groups) prefill it once and copy its cache: greedy rows equal the prompt
    generated alone; sampled rows differ within a group, their log-probs equal the training forward's, and a
    4-device mesh (3 distinct prompts: the prefill replicated, the rows split) samples the same tokens."""
    from flax import nnx

    from jaxft import sharding
    from jaxft.config import MeshConfig
    from jaxft.generate import generate
    from jaxft.objectives.rollout import completion_logps, layout

    save_model("qwen3", tmp_path)
    model = load_pretrained(tmp_path)
    gen = Generator(model)
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 4 + [PROMPTS[2]]
    s = Sampling(max_new_tokens=10)
    assert gen(prompts, eos_ids={95}, sampling=s) == [gen([p], eos_ids={95}, sampling=s)[0] for p in prompts]

    graphdef, state = nnx.split(model)
    s = Sampling(temperature=1.0, max_new_tokens=10, seed=4)
    out = generate(graphdef, (state,), prompts, eos_ids={95}, sampling=s)
    assert len({tuple(r) for r in out.tokens[3:7].tolist()}) > 1
    tokens, pos, seg = layout(prompts, out.tokens, out.lengths)
    L = out.tokens.shape[1]
    lp = completion_logps(model, dict(tokens=tokens, positions=pos, segment_ids=seg,
                                      mask=np.zeros((len(prompts), L), np.float32)), ON, 1.0)
    keep = np.arange(L)[None] < out.lengths[:, None]
    assert np.abs(np.asarray(lp) - out.logprobs)[keep].max() <= 1e-5

    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2))
    placed = sharding.place(state, sharding.tree_shardings(state, mesh, "fsdp"))
    on_mesh = generate(graphdef, (placed,), prompts, eos_ids={95}, sampling=s, mesh=mesh)
    assert (on_mesh.tokens == out.tokens).all() and (on_mesh.lengths == out.lengths).all()
    np.testing.assert_allclose(on_mesh.logprobs, out.logprobs, atol=1e-5)

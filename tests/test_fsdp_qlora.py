"""FSDP-QLoRA on 8 simulated CPU devices: the NF4 / int8 arrays split like the kernel they encode, a QLoRA run
on the mesh equals one device, the compiled step gathers codes (u8 / s8), never dequantized kernels, and a
dimension the mesh cannot split on a block boundary is refused."""

import json
import os
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxft import sharding
from jaxft.commands.plan import model_config, plan
from jaxft.config import load_config
from jaxft.data.task import make_examples
from jaxft.errors import JaxftError
from jaxft.optim import make_optimizer
from jaxft.quant import BLOCK, QuantKernel, quantized_kernels
from jaxft.setup import build as build_model
from jaxft.train import init_state, make_train_step
from flax import nnx
from test_sft import _losses, _train_cli
from tiny import launch_local, save_chat_model

ROOT = Path(__file__).resolve().parents[1]
CFG = str(ROOT / "configs" / "sft_lora.yaml")
VOCAB = 512
MESHES = (((1, 8, 1), "fsdp"), ((1, 2, 2), "fsdp_tp"))  # fsdp 8; fsdp 2 x tensor 2
# Adam with eps=1 moves each factor by ~lr·gradient. At eps=1e-8 it moves every element by ~lr, the
# near-zero gradients too (B = 0 leaves A's first gradient 0): a 1e-7 sum-order difference of such an
# element then moves it by up to ~2e-4 at hidden 512 with LoRA alone, no quantization (measured), which
# would test Adam's normalisation instead of the sharded forward and backward.
OPTIM = {"optim.lr": 0.1, "optim.eps": 1.0}


@pytest.fixture(scope="module")
def model512(tmp_path_factory):
    """Every linear input a multiple of 64 x 8 (hidden 512, 8 heads x 64, 2 kv heads, mlp 512): NF4 blocks
    split evenly over 8 devices. A small vocabulary keeps the unquantized embeddings cheap."""
    d = tmp_path_factory.mktemp("model512")
    save_chat_model(d, vocab_size=VOCAB, hidden_size=512, intermediate_size=512, num_attention_heads=8,
                    num_key_value_heads=2)
    return d


def _run(path, mesh=(1, 1, 1), strategy="fsdp", **extra):
    o = {"model.path": path, "mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2],
         "mesh.strategy": strategy, "lora.r": 4, "lora.alpha": 8, "lora.dropout": 0, **OPTIM,
         "optim.schedule": "constant", "optim.warmup_steps": 0, "train.grad_accum": 1, **extra}
    return load_config(CFG, [f"{k}={v}" for k, v in o.items()])


def _batches(n, B=8, S=16):
    rng = np.random.RandomState(0)
    out = []
    for _ in range(n):
        tokens = rng.randint(0, VOCAB, (1, B, S)).astype(np.int32)
        out.append(dict(tokens=tokens, positions=np.broadcast_to(np.arange(S, dtype=np.int32), (1, B, S)).copy(),
                        segment_ids=np.ones((1, B, S), np.int32), targets=np.roll(tokens, -1, axis=-1),
                        loss_mask=np.ones((1, B, S), np.float32)))
    return out


def _train(run, batches, hlo=False):
    """2 optimizer steps on run.mesh → (losses, trainable params as numpy, the step's HLO text or None, setup)."""
    mesh = sharding.make_mesh(run.mesh)
    setup = build_model(run, mesh)
    tx = make_optimizer(run.optim, 10, setup.params)
    state, sh = sharding.sharded_init(lambda p: init_state(p, tx), setup.params, mesh, run.mesh.strategy)
    step = make_train_step(setup.graphdef, tx, out_shardings=(sh, sharding.replicated(mesh)))
    place = lambda v: jax.device_put(v, jax.sharding.NamedSharding(mesh, sharding.batch_spec(mesh, v.shape[1], 1)))  # noqa: E731
    losses, text = [], None
    for b in batches:
        b = {k: place(v) for k, v in b.items()}
        if hlo and text is None:
            text = step.lower(state, setup.frozen, b).compile().as_text()
        state, m = step(state, setup.frozen, b)
        losses.append(float(m["loss"]))
    assert step._cache_size() == 1  # new weights, same program
    return losses, jax.device_get(state["params"]), text, setup


def _quant_arrays(frozen):
    """{path: array} of every quantized array (QuantState) of a frozen tree."""
    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(frozen, is_leaf=lambda v: isinstance(v, nnx.Variable)):
        names = "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        if "/arrays/" in names:
            out[names] = x[...]
    return out


def _per_device(tree) -> dict:
    held = {}
    for x in jax.tree.leaves(tree):
        for s in x.addressable_shards:
            held[s.device] = held.get(s.device, 0) + s.data.nbytes
    return held


def _gathers(text):
    """(dtype, shape) of every all-gather's result in compiled HLO text."""
    return [(m.group(1), tuple(int(d) for d in m.group(2).split(",") if d))
            for m in re.finditer(r"= (\w+)\[([\d,]*)\][^=]*? all-gather(?:-start)?\(", text)]


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_qlora_on_the_mesh_equals_one_device(model512, quant):
    """fsdp 8 and fsdp 2 x tensor 2 against one device, 2 steps, ≤ 1e-5; on each mesh every quantized
    array's bytes per device are 1/N of its total, but for the per-layer scalars (NF4's offset, a second-level
    scale array shorter than N: "one block row", fewer than N fp32 values per layer); and the compiled
    step all-gathers 4 / 8-bit codes, never a dequantized kernel."""
    extra = {"quant.base": quant, "quant.double_quant": True}
    batches = _batches(2)
    ref_losses, ref_params, _, ref = _train(_run(model512, **extra), batches)
    ref_arrays = _quant_arrays(ref.frozen)
    L = 2
    for mesh, strategy in MESHES:
        losses, params, hlo, setup = _train(_run(model512, mesh, strategy, **extra), batches, hlo=True)
        np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0, err_msg=str(mesh))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0, err_msg=str(mesh)),
                     params, ref_params)
        n = int(np.prod(mesh))
        arrays = _quant_arrays(setup.frozen)
        assert arrays.keys() == ref_arrays.keys() and len(arrays) >= 7 * 2
        for name, x in arrays.items():
            np.testing.assert_array_equal(np.asarray(x), np.asarray(ref_arrays[name]), err_msg=name)  # bit for bit
            held = _per_device(x)
            assert len(held) == n and max(held.values()) <= x.nbytes / n + L * n * 4, (name, mesh, x.sharding.spec)
            if name.endswith(("codes", "/q")):
                assert max(held.values()) == x.nbytes // n, (name, x.sharding.spec)
        busiest = lambda tree: max(_per_device(tree).values())  # noqa: E731
        p = plan(model_config(str(model512)), _run(model512, mesh, strategy, **extra))
        assert p.per_device[:2] == (busiest(setup.frozen), busiest(setup.params)), mesh  # `jaxft plan` is exact
        gathers = _gathers(hlo)
        code_dtype = "u8" if quant == "nf4" else "s8"
        assert any(dt == code_dtype for dt, _ in gathers), gathers
        kernels = set()
        for _, k in quantized_kernels(nnx.merge(setup.graphdef, setup.params, setup.frozen)):
            d_in, d_out = k.shape[-2:]
            nb = -(-d_in // BLOCK)
            kernels |= {(d_in, d_out), (nb, BLOCK, d_out), (nb * BLOCK, d_out), (L, d_in, d_out)}
        floats = [(dt, shp) for dt, shp in gathers if dt in ("f32", "bf16", "f16") and shp in kernels]
        assert not floats, floats
    assert ref_losses[1] != ref_losses[0]


def test_pissa_on_a_quantized_base_on_the_mesh_equals_one_device(model512):
    """PiSSA's residual is quantized after the SVD (setup's requant path), here into its shards. One target
    on fsdp 2: the SVD of a sharded kernel runs on every device that holds a piece (8 took minutes here)."""
    extra = {"quant.base": "nf4", "lora.init": "pissa", "lora.target_modules": "q_proj"}
    batches = _batches(2)
    ref_losses, ref_params, _, ref = _train(_run(model512, **extra), batches)
    losses, params, _, setup = _train(_run(model512, (1, 2, 1), "fsdp", **extra), batches)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), params, ref_params)
    codes = _quant_arrays(setup.frozen)["model/layers/self_attn/q_proj/kernel/arrays/codes"]
    assert tuple(codes.sharding.spec)[:2] == (None, "fsdp")
    assert isinstance(nnx.merge(setup.graphdef, setup.params, setup.frozen).model.layers.self_attn.q_proj.kernel,
                      QuantKernel)


def test_a_dimension_the_mesh_cannot_split_on_a_block_boundary_is_refused(chat_model):
    """hidden 64 is one NF4 block along `in`: 8 devices cannot share it (the full-precision kernel would be
    split, with a warning only for the dims that do not divide)."""
    with pytest.raises(JaxftError, match=r"^[^\n]*model/layers/mlp/gate_proj/kernel/codes: dimension embed=1 "
                                         r"does not divide mesh axis fsdp=8, and a quantized array is split only "
                                         r"on whole blocks[^\n]*$"):
        build_model(_run(chat_model, (1, 8, 1), "fsdp", **{"quant.base": "nf4"}),
                    sharding.make_mesh(_run(chat_model, (1, 8, 1)).mesh))


def test_two_processes_read_and_quantize_their_own_slices(tmp_path):
    """scripts/launch_local.sh 2 (2 processes × 2 devices, gloo, fsdp 4) on an NF4 base: each process reads and
    quantizes only its blocks of the checkpoint, the double quantization's whole-layer scales agreed across
    processes; the run equals one process with 4 devices. Hidden 256: `in`/64 = 4 blocks split over fsdp 4."""
    model = tmp_path / "model256"
    save_chat_model(model, hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_examples(24, seed=3)))
    o = {"model.path": model, "data.train": tmp_path / "train.jsonl", "data.validation": "null",
         "data.max_length": 128, "train.batch_size": 4, "train.grad_accum": 1, "train.steps": 3,
         "train.eval_every": 0, "quant.base": "nf4", "quant.double_quant": "true", "mesh.fsdp": -1,
         "lora.r": 4, "lora.alpha": 8, "lora.dropout": 0, **OPTIM, "optim.schedule": "constant",
         "optim.warmup_steps": 0}
    args = lambda out: [f"{k}={v}" for k, v in {**o, "train.out_dir": out}.items()]  # noqa: E731
    p = _train_cli([CFG, *args(tmp_path / "single")],
                   env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    r = launch_local(2, CFG, *args(tmp_path / "multi"))
    assert r.returncode == 0, r.stderr[-3000:]
    single, multi = _losses(tmp_path / "single"), _losses(tmp_path / "multi")
    assert sorted(multi) == sorted(single) == [1, 2, 3]
    np.testing.assert_allclose([multi[s] for s in (1, 2, 3)], [single[s] for s in (1, 2, 3)], atol=1e-5, rtol=0)

"""QLoRA: the NF4 / int8 codecs against the paper and bitsandbytes, quantized models against
transformers + bitsandbytes, LoRA on a quantized base, merged export from the original weights."""

from pathlib import Path

import bitsandbytes.functional as bnbf
import bitsandbytes.nn as bnb_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx

import jaxft
from jaxft.formats.hf import load_pretrained
from jaxft import adapters, quant
from jaxft.config import LoraConfig, OptimConfig, QuantConfig
from jaxft.optim import make_optimizer
from jaxft.train import init_state, make_train_step
from tiny import example_tokenizer, make_model

HALF_GAP_NF4 = float(np.max(np.diff(quant.NF4)) / 2)  # worst rounding error of a normalised weight (0.152)
HALF_GAP_CODE8 = float(np.max(np.diff(quant.CODE8)) / 2)


def _jnp(q):
    return {k: jnp.asarray(v) for k, v in q.items()}


def _nf4_round_trip(w, double_quant):
    return np.asarray(quant.nf4_dequantize(_jnp(quant.nf4_quantize(w, double_quant)), w.shape[0], jnp.float32))


def test_nf4_code_values_are_the_papers():
    """QLoRA's construction (bitsandbytes create_normal_map): 8 positive and 7 negative quantiles of N(0, 1)
    between offset 0.9677083 and 1/2, a zero, normalised by the largest."""
    from scipy.stats import norm

    offset = 0.9677083
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    np.testing.assert_allclose(quant.NF4, v / v.max(), atol=2e-7, rtol=0)
    np.testing.assert_array_equal(quant.NF4, bnbf.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_allclose(quant.CODE8, bnbf.create_dynamic_map(signed=True).numpy(), atol=1e-7, rtol=0)


@pytest.mark.parametrize("d_in", [256, 96])  # 96: the last block of each column is zero-padded
def test_nf4_round_trip_within_the_codec_bound(d_in):
    w = np.random.RandomState(0).randn(d_in, 48).astype(np.float32)
    q = quant.nf4_quantize(w, double_quant=False)
    assert q["codes"].dtype == np.uint8 and q["codes"].shape == (-(-d_in // 64), 32, 48)
    err = np.abs(_nf4_round_trip(w, False) - w)
    absmax = np.repeat(q["absmax"], 64, axis=0)[:d_in]  # the block scale of every weight
    assert np.all(err <= HALF_GAP_NF4 * absmax + 1e-6)  # nearest code: at most half the widest gap
    # NF4's levels follow the normal distribution: on normal weights it beats 16 evenly spaced levels
    # with the same absmax scaling (RMS 0.091 vs 0.100 here)
    uniform = np.linspace(-1, 1, 16, dtype=np.float32)
    blocks = np.pad(w, ((0, -d_in % 64), (0, 0))).reshape(-1, 64, 48)
    amax = np.abs(blocks).max(1, keepdims=True)
    u = (uniform[np.abs((blocks / amax)[..., None] - uniform).argmin(-1)] * amax).reshape(-1, 48)[:d_in]
    assert np.sqrt(np.mean(err ** 2)) < np.sqrt(np.mean((u - w) ** 2))


def test_nf4_equals_bitsandbytes():
    """Same blocks, codes and scales as bitsandbytes' quantize_4bit (HF weight [out, in], in % 64 == 0)."""
    W = np.random.RandomState(1).randn(192, 320).astype(np.float32)  # HF [out, in]
    qb, st = bnbf.quantize_4bit(torch.from_numpy(W), blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = quant.nf4_quantize(W.T, double_quant=False)
    np.testing.assert_array_equal(ours["absmax"].T.reshape(-1), st.absmax.numpy())
    np.testing.assert_array_equal(_nf4_round_trip(W.T, False).T, bnbf.dequantize_4bit(qb, st).numpy())
    hi_lo = np.stack([qb.numpy().reshape(192, 160) >> 4, qb.numpy().reshape(192, 160) & 15], -1).reshape(192, 320)
    ours_idx = np.stack([ours["codes"] >> 4, ours["codes"] & 15], 2).reshape(320, 192)
    np.testing.assert_array_equal(ours_idx.T, hi_lo)  # first weight in the high nibble, as bitsandbytes packs


def test_double_quantized_scales_reproduce_single():
    W = np.random.RandomState(2).randn(192, 320).astype(np.float32)
    single, double = quant.nf4_quantize(W.T, False), quant.nf4_quantize(W.T, True)
    assert double["qabsmax"].dtype == np.uint8 and "absmax" not in double
    got = np.asarray(quant.nf4_absmax(_jnp(double), 5, 192))
    want = single["absmax"]
    # bound: half the widest gap of the 8-bit code, times each 256-block's scale of (absmax - mean)
    a2 = np.repeat(double["absmax2"], 256)[:want.size].reshape(192, 5).T
    assert np.all(np.abs(got - want) <= HALF_GAP_CODE8 * a2 + 1e-6)
    assert np.max(np.abs(got - want) / want) < 0.01
    # bitsandbytes' CPU kernel rounds a few scales to a neighbouring code (its 8-bit search is not exactly
    # nearest); ours are the nearest: never farther from the true scale, and equal for all but a few
    _, st = bnbf.quantize_4bit(torch.from_numpy(W), blocksize=64, quant_type="nf4", compress_statistics=True)
    bnb_absmax = bnbf.dequantize_blockwise(st.absmax, st.state2).numpy() + st.offset.item()
    ref = want.T.reshape(-1)
    ours = got.T.reshape(-1)
    assert np.mean(np.abs(ours - bnb_absmax) > 1e-6) < 0.01
    assert np.all(np.abs(ours - ref) <= np.abs(bnb_absmax - ref) + 1e-6)
    np.testing.assert_array_equal(double["absmax2"], st.state2.absmax.numpy())


def test_int8_round_trip():
    w = np.random.RandomState(3).randn(96, 40).astype(np.float32) * np.linspace(0.1, 3, 40, dtype=np.float32)
    q = quant.int8_quantize(w)
    assert q["q"].dtype == np.int8 and q["scale"].shape == (40,)
    back = np.asarray(quant.int8_dequantize(_jnp(q), 96, jnp.float32))
    assert np.all(np.abs(back - w) <= q["scale"] / 2 + 1e-6)  # round to nearest on a per-channel grid
    np.testing.assert_allclose(np.abs(back).max(0), np.abs(w).max(0), rtol=1e-6)  # absmax maps to ±127 exactly


@pytest.fixture(scope="module")
def tiny128(tmp_path_factory):
    """A tiny Llama whose every linear input is a multiple of 64 (the blocks bitsandbytes also forms)."""
    d = tmp_path_factory.mktemp("tiny128")
    make_model("llama", intermediate_size=128).save_pretrained(d)
    return d


TOKS = np.random.RandomState(0).randint(0, 96, (2, 12))


def _logits(model):
    return np.asarray(model(jnp.asarray(TOKS))[0])


def _pin_bnb_fp32_path(model):
    """Make every bitsandbytes Linear4bit compute in fp32 whatever CPU runs the test.

    On a CPU with AVX512-BF16 (and AMX), `Linear4bit.__init__` sets `support_avx512bf16_for_cpu =
    has_avx512bf16()`, and then its first eval-mode forward repacks the weight
    (`_convert_weight_packed_for_cpu`) and `matmul_4bit` runs the fused bf16 kernel (`gemv_4bit`, input
    and scales cast to bf16): logits 4.8e-2 off, where the fp32 path (dequantize_4bit, then an fp32
    `linear`) that every other CPU takes matches jaxft to ~3e-6. The flag is read at each forward, so
    clearing it before the first one pins the fp32 path; the test then checks the same thing on every
    CPU. (bitsandbytes 0.50: bitsandbytes/nn/modules.py Linear4bit.forward.)"""
    layers = [m for m in model.modules() if isinstance(m, bnb_nn.Linear4bit)]
    assert layers, "no bitsandbytes Linear4bit in the reference model"
    for m in layers:
        assert hasattr(m, "support_avx512bf16_for_cpu"), "bitsandbytes changed how it picks its CPU bf16 path"
        m.support_avx512bf16_for_cpu = False


@pytest.mark.parametrize("double_quant,atol", [(False, 1e-4), (True, 2e-3)])
def test_nf4_model_equals_transformers_bitsandbytes(tiny128, double_quant, atol):
    """transformers + bitsandbytes (load_in_4bit, nf4) is the reference QLoRA base. Single quantization:
    the same weights, logits ≤ 1e-4. Double: bitsandbytes' CPU kernel picks a neighbouring 8-bit code for
    a few scales (test above), a ≤ 0.7% change of those blocks: logits ≤ 2e-3 (the NF4 error itself is ~1)."""
    bnb = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=torch.float32)
    ref_model = tf.AutoModelForCausalLM.from_pretrained(tiny128, quantization_config=bnb, dtype=torch.float32,
                                                        device_map="cpu").eval()
    _pin_bnb_fp32_path(ref_model)
    with torch.no_grad():
        ref = ref_model(torch.tensor(TOKS)).logits.numpy()
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)  # the pin held: no bf16 repack
                   for m in ref_model.modules() if isinstance(m, bnb_nn.Linear4bit))
    ours = _logits(load_pretrained(tiny128, quant=QuantConfig(base="nf4", double_quant=double_quant)))
    np.testing.assert_allclose(ours, ref, atol=atol, rtol=0)


def test_int8_model_equals_transformers_with_int8_weights(tiny128):
    hf = make_model("llama", intermediate_size=128)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.startswith("model.layers.") and name.endswith("proj.weight"):
                q = quant.int8_quantize(p.numpy().T)
                p.copy_(torch.from_numpy((q["q"].astype(np.float32) * q["scale"]).T))
        ref = hf(torch.tensor(TOKS)).logits.numpy()
    np.testing.assert_allclose(_logits(load_pretrained(tiny128, quant=QuantConfig(base="int8"))), ref,
                               atol=1e-4, rtol=0)


def _rel(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


def test_quantized_logits_close_to_full_precision(tiny128):
    """The bound: quantization error acts like noise. A quantized model's logits are no farther from the
    full-precision ones than with Gaussian noise of the same RMS added to every quantized weight (×1.25
    slack for the noise draw); int8 (per-weight error ~1/250 of the absmax) is ≥ 5× closer than NF4."""
    full = load_pretrained(tiny128)
    ref = _logits(full)
    errs = {}
    for mode in ("nf4", "int8"):
        q = load_pretrained(tiny128, quant=QuantConfig(base=mode))
        errs[mode] = _rel(_logits(q), ref)
        noisy = load_pretrained(tiny128)
        for i, ((_, lin), (_, qlin)) in enumerate(zip(adapters.targets(noisy, ("all-linear",)),
                                                      adapters.targets(q, ("all-linear",)))):
            w = lin.kernel[...]
            rms = jnp.sqrt(jnp.mean((qlin.kernel[...] - w) ** 2))
            lin.kernel[...] = w + rms * jax.random.normal(jax.random.key(i), w.shape)
        assert errs[mode] <= 1.25 * _rel(_logits(noisy), ref), (mode, errs)
    assert errs["int8"] * 5 < errs["nf4"]
    bf16 = load_pretrained(tiny128, dtype=jnp.bfloat16, quant=QuantConfig(base="nf4"))
    assert bf16.model.layers.self_attn.q_proj.kernel[...].dtype == jnp.bfloat16  # dequantized in compute dtype
    assert _rel(_logits(bf16).astype(np.float32), ref) < 1.5 * errs["nf4"]


def _batch(B=2, S=16, seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, 96, (B, S)).astype(np.int32)
    return {k: v[None] for k, v in dict(
        tokens=tokens, positions=np.tile(np.arange(S, dtype=np.int32), (B, 1)), segment_ids=np.ones((B, S), np.int32),
        targets=np.concatenate([tokens[:, 1:], tokens[:, :1]], 1), loss_mask=np.ones((B, S), np.float32)).items()}


def _lora_losses(path, quant_cfg, steps=12):
    model = load_pretrained(path, quant=quant_cfg)
    cfg = LoraConfig(r=8, alpha=16)
    adapters.attach(model, cfg, jax.random.key(0))
    graphdef, params, frozen = adapters.split(model, cfg)
    assert all(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(params))
    frozen_before = jax.tree.map(np.asarray, frozen)
    tx = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"), steps, params)
    state, step = init_state(params, tx), make_train_step(graphdef, tx)
    losses = []
    for _ in range(steps):
        state, m = step(state, frozen, _batch())
        losses.append(float(m["loss"]))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, frozen), frozen_before)
    return losses, frozen


def test_lora_on_nf4_base_reduces_loss_like_on_the_full_base(tiny128):
    full, _ = _lora_losses(tiny128, None)
    nf4, frozen = _lora_losses(tiny128, QuantConfig(base="nf4"))
    codes = [v for p, v in nnx.to_flat_state(frozen) if "codes" in map(str, p)]
    assert len(codes) == 7 and all(c.get_value().dtype == jnp.uint8 for c in codes)  # frozen, never differentiated
    assert full[-1] < 0.5 * full[0] and nf4[-1] < 0.5 * nf4[0]
    assert abs((nf4[0] - nf4[-1]) / nf4[0] - (full[0] - full[-1]) / full[0]) < 0.1  # the same relative progress


def test_quant_config_errors_name_the_key():
    from jaxft.config import load_config

    with pytest.raises(jaxft.JaxftError, match="quant.base: 'nf3' is not one of"):
        load_config(None, ["quant.base=nf3"])
    with pytest.raises(jaxft.JaxftError, match="quant.base: a quantized base cannot be fine-tuned in full"):
        load_config(None, ["quant.base=nf4", "lora.enabled=false"])
    with pytest.raises(jaxft.JaxftError, match="quant.skip_modules: 'qkv' is not one of"):
        load_config(None, ["quant.base=int8", "quant.skip_modules=qkv"])
    with pytest.raises(jaxft.JaxftError, match="quant.lm_head"):
        load_config(None, ["quant.base=int8", "quant.lm_head=true", "lora.modules_to_save=lm_head"])


def test_skip_modules_and_lm_head(tiny128):
    m = load_pretrained(tiny128, quant=QuantConfig(base="int8", skip_modules=("down_proj",), lm_head=True))
    assert isinstance(m.model.layers.mlp.down_proj.kernel, nnx.Param)
    assert isinstance(m.model.layers.mlp.up_proj.kernel, quant.QuantKernel)
    assert isinstance(m.lm_head.kernel, quant.QuantKernel) and m.lm_head.kernel.shape == (64, 96)
    assert isinstance(m.model.embed_tokens.embedding, nnx.Param)
    assert _rel(_logits(m), _logits(load_pretrained(tiny128))) < 0.05  # int8: about 1% here


def test_merged_export_of_a_qlora_run_is_original_weights_plus_adapter(tmp_path):
    """A QLoRA run (NF4 base) exported merged = PEFT's merge_and_unload of the exported
    adapter into the ORIGINAL weights (transformers loading both, logits ≤ 1e-4); merging into the 4-bit weights
    would not be. Exported on fsdp 8 (the fp32 base re-read into its 8 shards, streamed out a layer at a time),
    the files are the one-device export's byte for byte."""
    import dataclasses
    import json
    from peft import PeftModel

    from jaxft.commands.export import export
    from jaxft.config import MeshConfig, load_config, read_config
    from jaxft.data.task import make_examples
    from jaxft.commands.train import train
    from jaxft.runs import load_run
    from jaxft.sharding import make_mesh
    from tiny import ROOT, run_cli, save_chat_model

    save_chat_model(tmp_path / "base")
    rows = make_examples(12, seed=3)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = load_config(ROOT / "configs" / "qlora.yaml", [
        f"model.path={tmp_path / 'base'}", f"data.train={tmp_path / 'train.jsonl'}", "data.validation=null",
        "data.max_length=128", "train.batch_size=2", "train.grad_accum=1", "train.steps=3", "train.eval_every=0",
        "train.save_every=0", "optim.lr=1e-2", "optim.warmup_steps=0", "lora.r=8", "lora.alpha=16",
        f"train.out_dir={tmp_path / 'run'}"])
    assert run.quant.base == "nf4"
    train(run, progress=False)
    for fmt in ("peft", "merged"):  # one device
        r = run_cli("export", tmp_path / "run", "--format", fmt, "--out", tmp_path / fmt, "--dtype", "fp32")
        assert r.returncode == 0, r.stderr
    fsdp8 = dataclasses.replace(read_config(tmp_path / "run"), mesh=MeshConfig(fsdp=8))
    export(fsdp8, "merged", tmp_path / "merged8", dtype="fp32")
    files = sorted(f.name for f in (tmp_path / "merged").iterdir())
    assert sorted(f.name for f in (tmp_path / "merged8").iterdir()) == files
    assert [f for f in files if (tmp_path / "merged8" / f).read_bytes() != (tmp_path / "merged" / f).read_bytes()] == []
    kernel = load_run(fsdp8, mesh=make_mesh(fsdp8.mesh), unquantized=True).setup.frozen["model"]["layers"]["mlp"][
        "down_proj"]["kernel"].get_value()  # what that export merged from: fp32, in 8 shards
    assert kernel.dtype == np.float32 and kernel.addressable_shards[0].data.size * 8 == kernel.size
    toks = torch.tensor(np.random.RandomState(0).randint(0, 49152, (1, 24)))
    with torch.no_grad():
        original = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
        base_logits = original(toks).logits.numpy()
        ref = PeftModel.from_pretrained(original, tmp_path / "peft").merge_and_unload().eval()
        ref_logits = ref(toks).logits.numpy()
        merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        np.testing.assert_allclose(merged(toks).logits.numpy(), ref_logits, atol=1e-4, rtol=0)
        assert np.abs(ref_logits - base_logits).max() > 1e-3  # the adapter moved the model
        # the merged weights are W (not its 4-bit version) + s·B·A
        w = original.model.layers[1].mlp.down_proj.weight.numpy()
        got = merged.model.layers[1].mlp.down_proj.weight.numpy()
        np.testing.assert_allclose(got, ref.model.layers[1].mlp.down_proj.weight.numpy(), atol=1e-6, rtol=0)
        assert np.abs(got - w).max() < 0.1 * np.abs(_nf4_round_trip(w.T, True).T - w).max()


@pytest.mark.parametrize("overrides", [["quant.base=nf4"], ["quant.base=nf4", "quant.double_quant=false"],
                                       ["quant.base=int8", "quant.lm_head=true", "quant.skip_modules=down_proj"],
                                       ["model.dtype=bf16", "lora.target_modules=q_proj,v_proj",
                                        "lora.modules_to_save=embed_tokens"],
                                       ["lora.enabled=false"]])
def test_plan_equals_the_arrays_of_a_loaded_model(tmp_path, overrides):
    """`jaxft plan`'s exact parts (base weights, trainable, optimizer) are the bytes jaxft really allocates."""
    from jaxft.config import load_config
    from jaxft.commands.plan import model_config, plan
    from jaxft.setup import build as build_model

    make_model("llama", intermediate_size=96).save_pretrained(tmp_path)  # 96: padded NF4 blocks
    example_tokenizer().save_pretrained(tmp_path)  # build_model loads one
    run = load_config(None, [f"model.path={tmp_path}", "lora.r=4", *overrides])
    setup = build_model(run)
    tx = make_optimizer(run.optim, 10, setup.params)
    opt = tx.init(setup.params)
    size = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree) if x.ndim > 0)  # noqa: E731
    p = plan(model_config(str(tmp_path)), run)
    assert (p.base, p.trainable, p.optimizer) == (size(setup.frozen), size(setup.params), size(opt))
    assert p.total > p.base + p.trainable + p.optimizer


def test_plan_cli_for_llama3_shapes(capsys):
    from jaxft.cli import main
    from jaxft.commands.plan import kernel_bytes

    root = Path(__file__).resolve().parents[1]
    assert main(["plan", str(root / "configs" / "qlora.yaml"), "--model", "llama3-70b"]) == 0
    out = capsys.readouterr().out
    assert "80 layers, hidden 8192" in out and "base weights (nf4)" in out
    # NF4 with double quantization: 4 + 8/64 + 32/(64·256) bits per weight (4096 x 4096: no padding)
    assert kernel_bytes(4096, 4096, "nf4", True, 2) == 4096 * 4096 * (4 + 8 / 64 + 32 / (64 * 256)) / 8 + 4
    assert main(["plan", str(root / "configs" / "qlora.yaml"), "--model", "nope"]) == 2
    assert "nope: not a model directory, .gguf file or preset" in capsys.readouterr().err

"""DoRA, PiSSA / OLoRA and IA3 against PEFT 0.21 (PyTorch): imports, exports, merges, gradients, inits,
the DPO reference of a PiSSA model, the sharded step and the compile count."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import IA3Config, PeftModel, get_peft_model
from peft import LoraConfig as PeftLoraConfig
from safetensors.numpy import load_file

import jaxft
from jaxft.formats.hf import load_pretrained
from jaxft import context
from jaxft import adapters
from jaxft.config import LoraConfig, OptimConfig, load_config
from jaxft.errors import JaxftError
from jaxft.formats.peft import adapter_config, adapter_tensors, export_adapter, export_merged, load_adapter, vllm_problems
from tiny import ARCHS, example_tokenizer, make_model, save_model

CHEAP = ["llama", "llama_mqa_tied_bias_headdim", "qwen2", "gemma2"]  # biases, MQA, tied heads, soft-caps
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]

JAXFT_CFGS = {  # method → a jaxft config
    "dora": lambda arch: LoraConfig(r=4, alpha=8, use_dora=True, rslora=arch == "qwen2"),
    "pissa": lambda arch: LoraConfig(r=4, alpha=8, init="pissa", rslora=arch == "qwen2"),
    "olora": lambda arch: LoraConfig(r=4, alpha=8, init="olora"),
    "ia3": lambda arch: LoraConfig(method="ia3"),
}


def _toks(seed=0, shape=(2, 20)):
    return np.random.RandomState(seed).randint(0, 96, shape)


def _logits(model, toks, **kw):
    return np.asarray(model(jnp.asarray(toks), **kw)[0])


def _peft_logits(pm, toks):
    with torch.no_grad():
        return pm(torch.tensor(toks)).logits.numpy()


def _train_jaxft_like(model, seed=1):
    """Stand in for training: move every trainable adapter leaf (a, b, m, l) by a random amount."""
    i = 0
    for _, lin in adapters.adapted(model):
        for name in ("a", "b", "m", "l"):
            if hasattr(lin.adapter, name):
                v = getattr(lin.adapter, name)
                noise = jax.random.normal(jax.random.key(100 * seed + i), v.shape)
                v[...] = v[...] + (0.2 if name in ("a", "b") else 0.3) * noise * (jnp.abs(v[...]).mean() + 0.1)
                i += 1
    return model


def _jaxft_model(method, arch, path, seed=1):
    cfg = JAXFT_CFGS[method](arch)
    model = load_pretrained(path)
    adapters.attach(model, cfg, jax.random.key(0))
    return _train_jaxft_like(model, seed), cfg


def _peft_trained(method, arch, tmp_path, steps=3):
    """A PEFT model of `method` trained `steps` AdamW steps, in eval mode, saved to tmp_path/peft (PiSSA /
    OLoRA: converted to a plain LoRA against the original base, as PEFT's docs do it)."""
    torch.manual_seed(0)
    if method == "ia3":
        config = IA3Config(task_type="CAUSAL_LM")
    else:
        config = PeftLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=method == "dora",
                                init_lora_weights={"dora": True, "pissa": "pissa", "olora": "olora"}[method])
    pm = get_peft_model(make_model(arch), config)
    if method in ("pissa", "olora"):
        pm.peft_config["default"].init_lora_weights = True
        pm.save_pretrained(tmp_path / "init")
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-2)
    toks = torch.tensor(_toks(1, (2, 16)))
    for _ in range(steps):
        pm(toks, labels=toks).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    kw = {"path_initial_model_for_weight_conversion": str(tmp_path / "init")} if method in ("pissa", "olora") else {}
    pm.save_pretrained(tmp_path / "peft", **kw)
    return pm


# ---------------------------------------------------------------- PEFT ⇄ jaxft, every method


@pytest.mark.parametrize("method", ["dora", "ia3", "pissa", "olora"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_peft_trained_adapter_imports_and_round_trips(method, arch, tmp_path):
    if method in ("pissa", "olora") and arch not in CHEAP:
        pytest.skip("PiSSA / OLoRA export a plain LoRA: test_peft.py covers every family for those")
    save_model(arch, tmp_path / "base")
    pm = _peft_trained(method, arch, tmp_path)
    toks = _toks()
    ref = _peft_logits(pm, toks)
    model = load_pretrained(tmp_path / "base")
    cfg = load_adapter(model, tmp_path / "peft")
    assert adapters.method_of(cfg) == {"pissa": "lora", "olora": "lora"}.get(method, method)
    ours = _logits(model, toks)
    assert np.abs(ours - _logits(load_pretrained(tmp_path / "base"), toks)).max() > 1e-2  # it was trained
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    export_adapter(model, cfg, tmp_path / "back")
    original, back = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "back"))
    assert set(original) == set(back)
    for k in original:
        np.testing.assert_array_equal(original[k], back[k], err_msg=k)


@pytest.mark.parametrize("method", ["dora", "ia3", "pissa", "olora"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_jaxft_adapter_loads_in_peft_with_equal_logits(method, arch, tmp_path):
    """PiSSA / OLoRA: the converted rank-2r LoRA, loaded by PEFT over the ORIGINAL base, is the jaxft model."""
    if method in ("pissa", "olora") and arch not in CHEAP:
        pytest.skip("PiSSA / OLoRA: the cheap families (the conversion does not depend on the family)")
    save_model(arch, tmp_path / "base")
    model, cfg = _jaxft_model(method, arch, tmp_path / "base")
    export_adapter(model, cfg, tmp_path / "adapter")
    toks = _toks()
    ours = _logits(model, toks)
    assert np.abs(ours - _logits(load_pretrained(tmp_path / "base"), toks)).max() > 1e-2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(make_model(arch), tmp_path / "adapter").eval()
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    np.testing.assert_allclose(ours, _peft_logits(pm, toks), atol=1e-4, rtol=0)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    if method in ("pissa", "olora"):
        assert config["r"] == 2 * cfg.r and config["init_lora_weights"] is True
        assert config["lora_alpha"] == pytest.approx(cfg.alpha * (2 ** 0.5 if cfg.rslora else 2))
    assert config.get("use_dora", False) == (method == "dora")


@pytest.mark.parametrize("method", ["dora", "ia3", "pissa"])
@pytest.mark.parametrize("arch", CHEAP)
def test_merged_export_equals_the_adapted_model(method, arch, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    save_model(arch, tmp_path / "base")
    model, _ = _jaxft_model(method, arch, tmp_path / "base")
    export_merged(model, example_tokenizer(), AutoConfig.from_pretrained(tmp_path / "base"), tmp_path / "merged",
                  dtype="fp32")
    toks = _toks()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(toks)).logits.numpy()
    np.testing.assert_allclose(_logits(model, toks), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_merged_weights_equal_peft_merge_and_unload(method, tmp_path):
    save_model("qwen2", tmp_path / "base")  # q/k/v biases: IA3's output scaling scales them on merge
    pm = _peft_trained(method, "qwen2", tmp_path)
    model = load_pretrained(tmp_path / "base")
    load_adapter(model, tmp_path / "peft")
    from jaxft.formats.peft import merged_tensors

    ours = merged_tensors(model, np.float32)
    theirs = {k: v.detach().numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    changed = 0
    for k, v in ours.items():
        np.testing.assert_allclose(v, theirs[k], atol=1e-6, rtol=0, err_msg=k)
        changed += int(np.abs(v - load_file(tmp_path / "base" / "model.safetensors")[k]).max() > 1e-4)
    assert changed >= 3 * 3  # three projections of three layers at least


# ---------------------------------------------------------------- DoRA


def _peft_dora_linear(d_in=24, d_out=16, p=0.0, seed=0):
    from peft.tuners.lora.layer import Linear as PeftLinear

    torch.manual_seed(seed)
    base = torch.nn.Linear(d_in, d_out, bias=True)
    config = PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=p, use_dora=True, target_modules=["x"])
    lin = PeftLinear(base, "default", config, r=4, lora_alpha=8)
    with torch.no_grad():
        lin.lora_B["default"].weight.normal_()
        lin.lora_magnitude_vector["default"].weight.mul_(1 + 0.3 * torch.randn(d_out))
    return lin


def _jaxft_dora_from(lin):
    """The jaxft DoRA (one layer, L = 1) with the PEFT layer's weights, and its base callable."""
    from jaxft.adapters.dora import DoRA

    w = jnp.asarray(lin.base_layer.weight.detach().numpy().T)  # [in, out]
    bias = jnp.asarray(lin.base_layer.bias.detach().numpy())
    a = jnp.asarray(lin.lora_A["default"].weight.detach().numpy().T)[None]
    b = jnp.asarray(lin.lora_B["default"].weight.detach().numpy().T)[None]
    m = jnp.asarray(lin.lora_magnitude_vector["default"].weight.detach().numpy())[None]
    dora = DoRA(a, b, m, lin.scaling["default"], getattr(lin.lora_dropout["default"], "p", 0.0))
    return dora, w, (lambda x: x @ w + bias)


def test_dora_layer_forward_and_gradients_equal_peft():
    """Output and dL/d(A, B, m) of one DoRA layer vs PEFT autograd: equal only with the norm detached."""
    lin = _peft_dora_linear()
    x = np.random.RandomState(0).randn(5, 24).astype(np.float32)
    g = np.random.RandomState(1).randn(5, 16).astype(np.float32)  # dL/dy
    lin.train()
    y = lin(torch.tensor(x))
    (y * torch.tensor(g)).sum().backward()
    want = {"a": lin.lora_A["default"].weight.grad.numpy().T, "b": lin.lora_B["default"].weight.grad.numpy().T,
            "m": lin.lora_magnitude_vector["default"].weight.grad.numpy()}
    dora, w, base = _jaxft_dora_from(lin)
    graphdef, params, rest = nnx.split(dora, nnx.LoRAParam, ...)

    def f(p):
        d = nnx.merge(graphdef, jax.tree.map(lambda v: v[0], p), rest)  # one layer, as inside the scan
        out = d(jnp.asarray(x), base, w, context.ON)
        return jnp.sum(out * g), out

    grads, out = jax.grad(f, has_aux=True)(params)
    np.testing.assert_allclose(np.asarray(out), y.detach().numpy(), atol=1e-5, rtol=0)
    for k in ("a", "b", "m"):
        np.testing.assert_allclose(np.asarray(grads[k][...][0]), want[k], atol=1e-5, rtol=1e-5, err_msg=k)
    assert float(np.abs(want["a"]).max()) > 1e-2 and float(np.abs(want["m"]).max()) > 1e-2


def test_dora_dropout_matches_peft_with_the_same_mask():
    """PEFT drops x for the whole DoRA term (and recomputes its x W) while base(x) stays undropped."""
    lin = _peft_dora_linear(p=0.5)
    x = np.random.RandomState(0).randn(6, 24).astype(np.float32)
    key = jax.random.key(7)
    keep = np.asarray(jax.random.bernoulli(key, 0.5, x.shape))  # the mask jaxft draws from this key

    class Fixed(torch.nn.Module):
        def forward(self, t):
            return torch.where(torch.tensor(keep), t / 0.5, torch.zeros_like(t))

    lin.lora_dropout["default"] = Fixed()
    lin.train()
    want = lin(torch.tensor(x)).detach().numpy()
    dora, w, base = _jaxft_dora_from(lin)
    dora.dropout = 0.5
    one = nnx.merge(*(lambda g, s: (g, jax.tree.map(lambda v: v[0], s)))(*nnx.split(dora)))
    got = one(jnp.asarray(x), base, w, context.Ctx(dropout_key=key))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
    no_drop = one(jnp.asarray(x), base, w, context.ON)
    assert float(jnp.abs(got - no_drop).max()) > 1e-2  # the mask does change the output


def test_dora_whole_model_gradients_equal_peft(tmp_path):
    arch = "llama"
    save_model(arch, tmp_path / "base")
    pm = _peft_trained("dora", arch, tmp_path, steps=2)  # non-trivial A, B, m
    model = load_pretrained(tmp_path / "base")
    load_adapter(model, tmp_path / "peft")
    toks = _toks(3, (2, 12))
    pm.train()  # lora_dropout = 0: train mode only switches PEFT to its training path
    logits = pm(torch.tensor(toks)).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), torch.tensor(toks[:, 1:]).reshape(-1))
    loss.backward()
    graphdef, params, frozen = adapters.split(model, LoraConfig())

    def f(p):
        lg = nnx.merge(graphdef, p, frozen)(jnp.asarray(toks))[0][:, :-1]
        lp = jax.nn.log_softmax(lg, -1)
        return -jnp.mean(jnp.take_along_axis(lp, jnp.asarray(toks[:, 1:])[..., None], -1))

    grads = jax.grad(f)(params)
    np.testing.assert_allclose(float(f(params)), float(loss), atol=1e-5)
    g = grads["model"]["layers"]["self_attn"]["q_proj"]["adapter"]
    for i in range(3):
        mod = pm.base_model.model.model.layers[i].self_attn.q_proj
        np.testing.assert_allclose(np.asarray(g["m"][...][i]), mod.lora_magnitude_vector["default"].weight.grad.numpy(),
                                   atol=1e-6, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(g["a"][...][i]), mod.lora_A["default"].weight.grad.numpy().T,
                                   atol=1e-6, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(g["b"][...][i]), mod.lora_B["default"].weight.grad.numpy().T,
                                   atol=1e-6, rtol=1e-4)


def test_dora_init_magnitude_and_file_layout(tmp_path):
    save_model("llama", tmp_path / "base")
    model = load_pretrained(tmp_path / "base")
    cfg = LoraConfig(r=2, alpha=4, use_dora=True, target_modules=("q_proj", "v_proj"))
    adapters.attach(model, cfg, jax.random.key(0))
    toks = _toks()
    np.testing.assert_allclose(_logits(model, toks), _logits(load_pretrained(tmp_path / "base"), toks),
                               atol=1e-5, rtol=0)  # m = ‖W‖ and B = 0: unchanged at init
    lin = model.model.layers.self_attn.q_proj
    np.testing.assert_allclose(np.asarray(lin.adapter.m[...]), np.linalg.norm(np.asarray(lin.kernel[...]), axis=1),
                               rtol=1e-6)
    names = adapter_tensors(model)
    assert names["base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector"].shape == (32,)
    assert not any(k.endswith("lora_magnitude_vector.weight") for k in names)
    config = adapter_config(model, cfg)
    assert config["use_dora"] is True
    problems = vllm_problems(config, names)
    assert any("DoRA" in p and "--format merged" in p for p in problems)


def test_dora_on_a_quantized_base_uses_the_dequantized_norm(tmp_path):
    from jaxft.config import QuantConfig

    save_model("llama", tmp_path / "base")
    q = load_pretrained(tmp_path / "base", quant=QuantConfig(base="nf4"))
    cfg = LoraConfig(r=2, alpha=4, use_dora=True, target_modules=("q_proj", "down_proj"))
    adapters.attach(q, cfg, jax.random.key(0))
    _train_jaxft_like(q)
    f = load_pretrained(tmp_path / "base")  # fp32, with the dequantized weights and the same adapters
    for (_, lq), (_, lf) in zip(adapters.targets(q, ("all-linear",)), adapters.targets(f, ("all-linear",))):
        lf.kernel[...] = lq.kernel[...]
        lf.adapter = lq.adapter
    np.testing.assert_allclose(np.asarray(q.model.layers.self_attn.q_proj.adapter.m[...]) > 0, True)
    toks = _toks()
    np.testing.assert_allclose(_logits(q, toks), _logits(f, toks), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- PiSSA / OLoRA


def _peft_init(init, arch, tmp_path, r=4, alpha=8):
    torch.manual_seed(0)
    pm = get_peft_model(make_model(arch), PeftLoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS,
                                                          init_lora_weights=init))
    out = {}
    for i, layer in enumerate(pm.base_model.model.model.layers):
        for name in TARGETS:
            mod = getattr(layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp, name)
            ba = (mod.lora_B["default"].weight @ mod.lora_A["default"].weight).detach().numpy()  # [out, in]
            out[(name, i)] = (mod.scaling["default"] * ba, mod.base_layer.weight.detach().numpy())
    return out


def _jaxft_init(init, path, r=4, alpha=8):
    model = load_pretrained(path)
    adapters.attach(model, LoraConfig(r=r, alpha=alpha, init=init, target_modules=tuple(TARGETS)), jax.random.key(0))
    out = {}
    for p, lin in adapters.adapted(model):
        ad = lin.adapter
        for i in range(lin.kernel.shape[0]):
            ba = ad.scale * (np.asarray(ad.a0[i]) @ np.asarray(ad.b0[i])).T
            out[(p[-1], i)] = (ba, np.asarray(lin.kernel[i]).T)
    return out, model


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_factors_and_residual_equal_peft(init, tmp_path):
    save_model("llama", tmp_path / "base")
    theirs = _peft_init(init, "llama", tmp_path)
    ours, _ = _jaxft_init(init, tmp_path / "base")
    w = {k: v.detach().numpy() for k, v in make_model("llama").state_dict().items()}
    for key, (ba, res) in theirs.items():
        # products, not factors: singular vectors / QR columns are sign-ambiguous across libraries
        np.testing.assert_allclose(ours[key][0], ba, atol=2e-5, rtol=0, err_msg=str(key))
        np.testing.assert_allclose(ours[key][1], res, atol=2e-5, rtol=0, err_msg=str(key))
        assert np.abs(ba).max() > 0.1  # the principal part is not small
    name = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_allclose(ours[("q_proj", 0)][0] + ours[("q_proj", 0)][1], w[name], atol=1e-5, rtol=0)


def test_pissa_niter_reconstruction_error_equals_peft(tmp_path):
    """Randomized SVD: different draws, so only the residual's size compares (both near the full SVD's)."""
    save_model("llama", tmp_path / "base")
    theirs = _peft_init("pissa_niter_4", "llama", tmp_path)
    ours, _ = _jaxft_init("pissa_niter_4", tmp_path / "base")
    full, _ = _jaxft_init("pissa", tmp_path / "base")
    for key, (ba, res) in theirs.items():
        np.testing.assert_allclose(ours[key][0] + ours[key][1], ba + res, atol=1e-5, rtol=0)  # W_res + sB0A0 = W
        e_ours, e_peft, e_best = (np.linalg.norm(x[key][1]) for x in (ours, theirs, full))
        assert e_best <= e_ours * (1 + 1e-5) and abs(e_ours - e_peft) <= 0.02 * e_peft, (key, e_ours, e_peft, e_best)


def test_pissa_adapters_off_is_the_original_model_and_dpo_reference(tmp_path):
    from jaxft.objectives.dpo import reference_logps

    save_model("qwen2", tmp_path / "base")
    model, _ = _jaxft_model("pissa", "qwen2", tmp_path / "base")
    base = load_pretrained(tmp_path / "base")
    toks = _toks(0, (4, 16))
    B, S = toks.shape
    batch = dict(tokens=jnp.asarray(toks), positions=jnp.tile(jnp.arange(S), (B, 1)),
                 segment_ids=jnp.ones((B, S), jnp.int32), targets=jnp.asarray(np.roll(toks, -1, 1)),
                 loss_mask=jnp.ones((B, S)).at[:, -1].set(0))
    h, _ = base.hidden(batch["tokens"], batch["positions"], batch["segment_ids"])
    want = jnp.sum(jaxft.losses.token_logprobs(base, h, batch["targets"]) * batch["loss_mask"], -1)
    np.testing.assert_allclose(reference_logps(model, batch), want, rtol=0, atol=1e-4)
    np.testing.assert_allclose(_logits(model, toks, ctx=context.OFF), _logits(base, toks), atol=1e-4, rtol=0)
    residual = load_pretrained(tmp_path / "base")  # the residual kernels without their adapter
    for (_, lr), (_, lm) in zip(adapters.targets(residual, ("all-linear",)), adapters.targets(model, ("all-linear",))):
        lr.kernel[...] = lm.kernel[...]
    assert np.abs(_logits(residual, toks) - _logits(base, toks)).max() > 1e-1  # so `off` really adds W back
    assert np.abs(_logits(model, toks) - _logits(base, toks)).max() > 1e-2  # and the policy moved


def test_pissa_on_a_quantized_base_quantizes_the_residual(chat_model):
    """QLoRA + PiSSA: the SVD sees the fp32 W, the 4-bit codes are those of W_res (not of W)."""
    import dataclasses

    from jaxft.config import ModelConfig, QuantConfig, RunConfig
    from jaxft.quant import QuantKernel, nf4_quantize
    from jaxft.setup import build

    lora = LoraConfig(r=4, alpha=8, init="pissa", target_modules=("q_proj", "down_proj"))
    run = dataclasses.replace(RunConfig(), model=ModelConfig(path=str(chat_model)), lora=lora,
                              quant=QuantConfig(base="nf4"))
    setup = build(run)
    model = nnx.merge(setup.graphdef, setup.params, setup.frozen)
    ref = load_pretrained(chat_model)  # the same PiSSA on the fp32 base: its residual kernels
    adapters.attach(ref, lora, jax.random.key(run.train.seed))
    for name in ("q_proj", "down_proj", "k_proj"):  # k_proj: quantized as it is (not an adapter target)
        blk = "mlp" if name == "down_proj" else "self_attn"
        got = getattr(getattr(model.model.layers, blk), name).kernel
        want = np.asarray(getattr(getattr(ref.model.layers, blk), name).kernel[...])
        assert isinstance(got, QuantKernel)
        for i in range(want.shape[0]):
            np.testing.assert_array_equal(np.asarray(got.arrays["codes"][...][i]), nf4_quantize(want[i])["codes"])
    toks = np.random.RandomState(0).randint(0, 49152, (2, 16))
    base = _logits(load_pretrained(chat_model), toks)
    qlora = _logits(load_pretrained(chat_model, quant=QuantConfig(base="nf4")), toks)
    e_pissa, e_qlora = np.abs(_logits(model, toks, ctx=context.OFF) - base).mean(), np.abs(qlora - base).mean()
    assert e_pissa < 1.1 * e_qlora, (e_pissa, e_qlora)  # the original model up to NF4 rounding, as plain QLoRA


def test_pissa_peft_import_of_an_unconverted_adapter_is_refused(tmp_path):
    save_model("llama", tmp_path / "base")
    pm = get_peft_model(make_model("llama"), PeftLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                            init_lora_weights="pissa"))
    pm.save_pretrained(tmp_path / "raw")
    with pytest.raises(JaxftError, match=r"init_lora_weights='pissa'.*path_initial_model_for_weight_conversion"):
        load_adapter(load_pretrained(tmp_path / "base"), tmp_path / "raw")


# ---------------------------------------------------------------- IA3


def test_ia3_defaults_per_family_and_feedforward_semantics(tmp_path):
    save_model("qwen2", tmp_path / "q")
    save_model("mistral", tmp_path / "m")
    for path, want in ((tmp_path / "q", {"q_proj", "v_proj", "down_proj"}),
                       (tmp_path / "m", {"k_proj", "v_proj", "down_proj"})):
        model = load_pretrained(path)
        adapters.attach(model, LoraConfig(method="ia3"), jax.random.key(0))
        got = {p[-1]: lin.adapter for p, lin in adapters.adapted(model)}
        assert set(got) == want
        assert got["down_proj"].is_feedforward and got["v_proj"].l.shape == (3, 32)
        assert got["down_proj"].l.shape == (3, 96) and not got["v_proj"].is_feedforward
    config = adapter_config(model, LoraConfig(method="ia3"))
    assert config["peft_type"] == "IA3" and config["feedforward_modules"] == ["down_proj"]
    names = adapter_tensors(model)
    assert names["base_model.model.model.layers.2.mlp.down_proj.ia3_l"].shape == (1, 96)
    assert names["base_model.model.model.layers.2.self_attn.k_proj.ia3_l"].shape == (32, 1)
    assert any("--format merged" in p for p in vllm_problems(config, names))


def test_ia3_config_is_validated():
    import dataclasses

    from jaxft.config import QuantConfig, RunConfig, validate

    def check(**lora):
        validate(dataclasses.replace(RunConfig(), lora=LoraConfig(**lora)))

    check(method="ia3", target_modules=("k_proj", "down_proj"), feedforward_modules=("down_proj",))
    with pytest.raises(JaxftError, match="lora.feedforward_modules: 'up_proj' is not one of lora.target_modules"):
        check(method="ia3", target_modules=("k_proj", "down_proj"), feedforward_modules=("up_proj",))
    with pytest.raises(JaxftError, match="lora.feedforward_modules: applies to lora.method=ia3 only"):
        check(feedforward_modules=("down_proj",))
    with pytest.raises(JaxftError, match="lora.method: ia3 has no low-rank factors"):
        check(method="ia3", use_dora=True)
    with pytest.raises(JaxftError, match="lora.init: 'pissa_niter_x' is not"):
        check(init="pissa_niter_x")
    with pytest.raises(JaxftError, match="lora.use_dora: DoRA with lora.init=olora"):
        check(use_dora=True, init="olora")
    validate(dataclasses.replace(RunConfig(), lora=LoraConfig(init="pissa"), quant=QuantConfig(base="nf4")))


# ---------------------------------------------------------------- the step: sharded, compiled once


@pytest.mark.parametrize("extra", [{"lora.use_dora": True}, {"lora.method": "ia3"}], ids=["dora", "ia3"])
def test_sharded_step_equals_one_device(chat_model, extra):
    from test_sharding import _random_batches, _run, _train_steps

    batches = _random_batches(2)
    ref_losses, ref_params = _train_steps(_run(chat_model, (1, 1, 1), "fsdp", True, **extra), batches)
    for mesh, strategy in (((1, 8, 1), "fsdp"), ((2, 2, 2), "fsdp_tp")):
        losses, params = _train_steps(_run(chat_model, mesh, strategy, True, **extra), batches)
        np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0, err_msg=str(mesh))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=str(mesh)),
                     params, ref_params)
    assert ref_losses[1] != ref_losses[0]


def test_magnitude_and_scales_shard_like_their_axis(chat_model):
    from jaxft import sharding
    from jaxft.setup import build
    from test_sharding import _run, _specs

    from jax.sharding import PartitionSpec as P

    for extra, want in (({"lora.use_dora": True}, {"model/layers/self_attn/o_proj/adapter/m": P(None, "fsdp"),
                                                   "model/layers/self_attn/q_proj/adapter/m": P(None, None)}),
                        ({"lora.method": "ia3"}, {"model/layers/mlp/down_proj/adapter/l": P(None, None),
                                                  "model/layers/self_attn/k_proj/adapter/l": P(None, None)})):
        run = _run(chat_model, (1, 8, 1), "fsdp", True, **extra)
        specs = _specs(build(run, sharding.make_mesh(run.mesh)).params)
        for k, v in want.items():
            assert specs[k] == v, (k, specs[k])
    run = _run(chat_model, (1, 2, 4), "fsdp_tp", True, **{"lora.method": "ia3"})
    specs = _specs(build(run, sharding.make_mesh(run.mesh)).params)
    assert specs["model/layers/mlp/down_proj/adapter/l"] == P(None, "tensor")  # input scaling: the mlp axis


@pytest.mark.parametrize("method", ["dora", "pissa", "ia3"])
def test_step_compiles_once_for_new_weights(method, tmp_path):
    from jaxft.optim import make_optimizer
    from jaxft.train import init_state, make_train_step
    from test_seams import _batch

    save_model("llama", tmp_path / "base")
    model, cfg = _jaxft_model(method, "llama", tmp_path / "base")
    graphdef, params, frozen = adapters.split(model, cfg)
    tx = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), 10, params)
    step = make_train_step(graphdef, tx)
    batch = jax.tree.map(lambda x: x[None], _batch())
    state = jax.device_put(init_state(params, tx), jax.devices()[0])
    losses = []
    for _ in range(3):
        state, m = step(state, frozen, batch)
        losses.append(float(m["loss"]))
    assert step._cache_size() == 1 and losses[2] < losses[0]


@pytest.mark.parametrize("overrides", [["lora.use_dora=true"], ["lora.init=pissa"], ["lora.method=ia3"],
                                       ["lora.init=olora", "quant.base=nf4"]])
def test_plan_equals_the_arrays_of_each_method(tmp_path, overrides):
    """`jaxft plan` counts DoRA's magnitudes, PiSSA's frozen initial factors and IA3's scales exactly."""
    from jaxft.commands.plan import model_config, plan
    from jaxft.setup import build
    from jaxft.optim import make_optimizer

    make_model("llama", intermediate_size=128).save_pretrained(tmp_path)
    example_tokenizer().save_pretrained(tmp_path)
    run = load_config(None, [f"model.path={tmp_path}", "lora.r=4", *overrides])
    setup = build(run)
    opt = make_optimizer(run.optim, 10, setup.params).init(setup.params)
    size = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree) if x.ndim > 0)  # noqa: E731
    p = plan(model_config(str(tmp_path)), run)
    assert (p.base, p.trainable, p.optimizer) == (size(setup.frozen), size(setup.params), size(opt))

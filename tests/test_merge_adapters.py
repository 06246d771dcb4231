"""`jaxft merge-adapters` against PEFT 0.21's `add_weighted_adapter` on the same adapters: tensors, configs,
logits through PEFT and through jaxft, a jaxft run as an input, and the refusals."""

import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict

from jaxft.formats.hf import load_pretrained
from jaxft.commands.merge_adapters import merge_adapters, read
from jaxft.formats.peft_merge import combine
from jaxft.errors import JaxftError
from jaxft.formats.peft import load_adapter, vllm_problems
from tiny import make_model

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
# name: (r, lora_alpha, use_rslora, init_lora_weights); the init decides how many draws PEFT spends before a
# dare merge's masks, so each kind leads one seeded case
SOURCES = {"x1": (4, 8, False, True), "x2": (4, 4, True, True), "x3": (4, 16, False, "gaussian"),
           "x4": (8, 8, False, True), "x5": (4, 2, False, False)}
EPS = np.finfo(np.float32).eps


def _make_sources(arch, root, sources, targets=TARGETS, seed=1):
    """PEFT adapters with random ("trained") A and B over make_model(arch), saved under root/<name>."""
    for i, (name, (r, alpha, rslora, init)) in enumerate(sources.items()):
        torch.manual_seed(seed + i)
        pm = get_peft_model(make_model(arch), PeftLoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora,
                                                               init_lora_weights=init, target_modules=targets))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(0.3 * torch.randn_like(p))
        pm.save_pretrained(root / name)


def _peft_with(arch, root, names):
    pm = PeftModel.from_pretrained(make_model(arch), root / names[0], adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(root / n, adapter_name=n)
    return pm.eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(root with the PEFT adapters, one PeftModel holding all of them)."""
    root = tmp_path_factory.mktemp("merge_sources")
    _make_sources("llama", root, SOURCES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return root, _peft_with("llama", root, list(SOURCES))


_count = [0]


def _peft_merge(pm, names, weights, method, seed=0, **kw):
    """PEFT's merged adapter: (its config, {tensor name: array}) under torch.manual_seed(seed)."""
    _count[0] += 1
    name = f"merged{_count[0]}"
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # density >= 1: "no pruning will be performed"
        pm.add_weighted_adapter(names, weights, name, combination_type=method, **kw)
    return pm.peft_config[name], {k: v.numpy() for k, v in get_peft_model_state_dict(pm, adapter_name=name).items()}


def _ours(root, names, weights, method, seed=0, **kw):
    return combine([read(root / n) for n in names], weights, method, seed=seed, density=kw.get("density"),
                   sign_method=kw.get("majority_sign_method", "total"), svd_rank=kw.get("svd_rank"))


def _assert_svd_close(ours, ref, root, names, weights, rank):
    """svd methods: signs of singular vectors are LAPACK's choice (MKL in torch, OpenBLAS in numpy), so
    compare B·A and the factors up to one sign per component. Both sides are fp32 SVDs: a singular
    vector moves by about eps·σ1 / gap, so the bound is 16·eps / (smallest gap between the kept singular
    values and the first dropped one, relative to σ1), from the float64 ΔW. Only used where the pruned ΔW
    is the plain one (svd); for the pruned svd variants the gaps of the plain ΔW are still a fair scale."""
    ads = [read(root / n) for n in names]
    for ka in (k for k in ref if k.endswith("lora_A.weight")):
        kb, m = ka.replace("lora_A", "lora_B"), ka.removesuffix(".lora_A.weight")
        d64 = sum(w * ad.scaling * (ad.tensors[m + ".lora_B.weight"].astype(np.float64)
                                    @ ad.tensors[m + ".lora_A.weight"].astype(np.float64)) for ad, w in zip(ads, weights))
        s = np.append(np.linalg.svd(d64, compute_uv=False), 0.0)
        tol = 16 * EPS * s[0] / min(s[j] - s[j + 1] for j in range(rank))
        (oa, ob), (ra, rb) = (ours[ka], ours[kb]), (ref[ka], ref[kb])
        assert oa.shape == ra.shape == (rank, d64.shape[1]) and ob.shape == rb.shape == (d64.shape[0], rank)
        np.testing.assert_allclose(ob @ oa, rb @ ra, rtol=0, atol=tol * np.abs(rb @ ra).max())
        sign = np.sign((oa * ra).sum(1))
        np.testing.assert_allclose(oa * sign[:, None], ra, rtol=0, atol=tol * np.abs(ra).max())
        np.testing.assert_allclose(ob * sign[None], rb, rtol=0, atol=tol * np.abs(rb).max())


CASES = [  # (adapters, weights, method, seed, PEFT kwargs); negative weights everywhere, x2 is rsLoRA
    (["x1", "x2", "x3"], [1.0, -0.7, 0.4], "linear", 0, {}),
    (["x1", "x2", "x4"], [1.0, -0.7, 0.4], "cat", 0, {}),  # ranks 4 + 4 + 8
    (["x1", "x3", "x2"], [0.8, 0.6, -1.2], "ties", 0, dict(density=0.5)),
    (["x1", "x3", "x2"], [0.8, 0.6, -1.2], "ties", 0, dict(density=0.3, majority_sign_method="frequency")),
    (["x1", "x2", "x3"], [1.0, -0.7, 0.4], "magnitude_prune", 0, dict(density=0.4)),
    (["x1", "x2", "x3"], [1.0, -0.7, 0.4], "dare_linear", 5, dict(density=0.4)),
    (["x3", "x1", "x2"], [1.0, -0.7, 0.4], "dare_ties", 11, dict(density=0.6)),  # gaussian-init first
    (["x5", "x1"], [-1.0, 2.0], "dare_linear", 3, dict(density=0.7)),  # init_lora_weights=False first
    (["x1", "x2"], [0.5, 0.5], "dare_ties", 3, dict(density=1.0)),  # density 1: no pruning, no draws
    (["x1", "x5", "x2", "x3"], [0.3, 0.3, -0.3, 0.3], "ties", 0, dict(density=0.9, majority_sign_method="frequency")),
    (["x2"], [-0.6], "ties", 0, dict(density=0.5)),  # one adapter: PEFT scales it (linear) whatever the method
]
SVD_CASES = [
    (["x1", "x2", "x4"], [1.0, -0.7, 0.4], "svd", 0, {}),  # rank max(4, 4, 8) = 8 of 16
    (["x2", "x4"], [-0.5, 1.5], "svd", 0, dict(svd_rank=12)),  # the full rank 4 + 8: B·A = Σ w ΔW
    (["x1", "x4"], [1.0, 0.5], "magnitude_prune_svd", 0, dict(density=1.0, svd_rank=6)),
]


@pytest.mark.parametrize("names,weights,method,seed,kw", CASES)
def test_method_equals_peft_tensor_for_tensor(llama, names, weights, method, seed, kw):
    root, pm = llama
    ref_cfg, ref = _peft_merge(pm, names, weights, method, seed, **kw)
    cfg, ours = _ours(root, names, weights, method, seed, **kw)
    assert set(ours) == set(ref)
    for k in ref:  # no matmul on these paths: the same fp32 operations in the same order
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-6, atol=0, err_msg=k)
    _assert_config_is_peft(cfg, ref_cfg)


def _assert_config_is_peft(cfg, ref_cfg):
    """Key for key PEFT's merged config, but use_rslora: PEFT inherits the first adapter's (an rsLoRA merge
    is then scaled by √r instead of 1, peft#3449); jaxft writes false."""
    ref = ref_cfg.to_dict()
    ref["target_modules"] = sorted(ref["target_modules"])
    assert cfg["use_rslora"] is False and {**cfg, "use_rslora": ref["use_rslora"]} == ref


@pytest.mark.parametrize("names,weights,method,seed,kw", SVD_CASES)
def test_svd_methods_equal_peft_up_to_singular_vector_signs(llama, names, weights, method, seed, kw):
    root, pm = llama
    ref_cfg, ref = _peft_merge(pm, names, weights, method, seed, **kw)
    cfg, ours = _ours(root, names, weights, method, seed, **kw)
    assert set(ours) == set(ref) and cfg["r"] == kw.get("svd_rank", 8)
    _assert_config_is_peft(cfg, ref_cfg)
    _assert_svd_close(ours, ref, root, names, weights, cfg["r"])


def test_a_different_seed_draws_different_dare_masks(llama):
    root, _ = llama
    args = (root, ["x1", "x2"], [1.0, 1.0], "dare_linear")
    a, b = _ours(*args, seed=1, density=0.5)[1], _ours(*args, seed=2, density=0.5)[1]
    k = next(iter(a))
    assert not np.array_equal(a[k], b[k]) and np.array_equal(a[k], _ours(*args, seed=1, density=0.5)[1][k])


def _peft_load(base, adapter_dir):
    """PeftModel.from_pretrained, which only warns about tensors it did not find: none may be missing."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(base, adapter_dir).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower()], [str(w.message) for w in caught]
    return pm


def _jaxft_logits(base_dir, adapter_dir, toks):
    model = load_pretrained(base_dir)
    load_adapter(model, adapter_dir)
    return np.asarray(model(jnp.asarray(toks))[0])


@pytest.mark.parametrize("arch,method,kw", [("llama", "cat", {}), ("qwen2", "ties", dict(density=0.5))])
def test_merged_adapter_logits_in_peft_equal_jaxft_and_peft_own_merge(arch, method, kw, tmp_path):
    """The written adapter: PEFT loads it and gives the logits of its own in-memory merge and of jaxft's
    forward with the adapter imported; it passes jaxft's vLLM rules (rank 8)."""
    sources = {"y1": (4 if method == "cat" else 8, 8, False, True), "y2": (4 if method == "cat" else 8, 16, False, True)}
    _make_sources(arch, tmp_path, sources, targets=["q_proj", "k_proj", "up_proj", "down_proj"])
    make_model(arch).save_pretrained(tmp_path / "base")
    out = merge_adapters([tmp_path / "y1", tmp_path / "y2"], [0.7, -1.3], method, tmp_path / "merged", **kw)
    config = json.loads((out / "adapter_config.json").read_text())
    from safetensors.numpy import load_file

    assert config["r"] == 8 and vllm_problems(config, load_file(out / "adapter_model.safetensors")) == []
    toks = np.random.RandomState(0).randint(0, 96, (2, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = _peft_with(arch, tmp_path, ["y1", "y2"])
        _, ref = _peft_merge(pm, ["y1", "y2"], [0.7, -1.3], method, **kw)
        pm.set_adapter(f"merged{_count[0]}")
    ours = read(out).tensors
    assert set(ours) == set(ref)
    for k in ref:
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-6, atol=0, err_msg=k)
    loaded = _peft_load(make_model(arch), out)
    with torch.no_grad():
        peft_own, peft_file = pm(torch.tensor(toks)).logits.numpy(), loaded(torch.tensor(toks)).logits.numpy()
        base = make_model(arch)(torch.tensor(toks)).logits.numpy()
    assert np.abs(peft_file - base).max() > 1e-2  # the merged adapter really changes the model
    np.testing.assert_allclose(peft_file, peft_own, atol=1e-5, rtol=0)
    np.testing.assert_allclose(_jaxft_logits(tmp_path / "base", out, toks), peft_file, atol=1e-4, rtol=0)


def test_a_jaxft_run_merges_with_a_peft_adapter(chat_model, tmp_path):
    """Inputs may be jaxft run directories (their newest checkpoint, exported as `jaxft export` does)."""
    from transformers import AutoModelForCausalLM

    from jaxft.config import load_config
    from jaxft.commands.export import export
    from jaxft.data.task import make_examples
    from jaxft.commands.train import train

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_examples(4, seed=3)))
    run = load_config(None, [f"model.path={chat_model}", f"data.train={tmp_path / 'train.jsonl'}", "train.steps=1",
                             "data.max_length=256", "train.batch_size=1", f"train.out_dir={tmp_path / 'run'}",
                             "lora.r=4", "lora.alpha=8", "optim.lr=0.05", "lora.target_modules=[q_proj,v_proj]",
                             "optim.warmup_steps=0", "eval.max_examples=0"])
    train(run, progress=False)
    torch.manual_seed(0)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(chat_model, dtype=torch.float32),
                        PeftLoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.1 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "peft")
    merge_adapters([tmp_path / "run", tmp_path / "peft"], [1.0, -0.5], "cat", tmp_path / "merged")

    export(run, "peft", tmp_path / "run_peft")  # the reference: PEFT merging the run's exported adapter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(chat_model, dtype=torch.float32),
                                           tmp_path / "run_peft", adapter_name="run").eval()
        ref_pm.load_adapter(tmp_path / "peft", adapter_name="other")
        _, ref = _peft_merge(ref_pm, ["run", "other"], [1.0, -0.5], "cat")
    ours = read(tmp_path / "merged").tensors
    assert set(ours) == set(ref)
    for k in ref:
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-6, atol=0, err_msg=k)
    assert np.abs(ours[k]).max() > 0  # the run's half of B is trained (non-zero)
    toks = np.random.RandomState(1).randint(0, 49152, (1, 12))
    loaded = _peft_load(AutoModelForCausalLM.from_pretrained(chat_model, dtype=torch.float32), tmp_path / "merged")
    with torch.no_grad():
        peft_logits = loaded(torch.tensor(toks)).logits.numpy()
    np.testing.assert_allclose(_jaxft_logits(chat_model, tmp_path / "merged", toks), peft_logits, atol=1e-4, rtol=0)


def _edit_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    c = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**c, **changes}))
    return dst


def test_bad_inputs_are_one_line_errors(llama, tmp_path, capsys):
    root, _ = llama
    _make_sources("llama", tmp_path, {"qonly": (4, 8, False, True)}, targets=["q_proj", "v_proj"])
    _make_sources("llama", tmp_path, {"wide": (4, 8, False, True)}, targets=TARGETS)
    one_base = _edit_config(root / "x1", tmp_path / "one_base", base_model_name_or_path="/models/one")
    other_base = _edit_config(root / "x2", tmp_path / "other_base", base_model_name_or_path="/models/another")
    dora = _edit_config(root / "x1", tmp_path / "dora", use_dora=True)
    x1, x2, x4 = root / "x1", root / "x2", root / "x4"
    cases = [
        (([x1, x2], [1.0], "linear"), {}, "--weights: 1 weight(s) for 2 adapter(s)"),
        (([x1, x4], [1.0, 1.0], "linear"), {}, "ranks [4, 8]: --method linear needs adapters of one rank"),
        (([x1, x4], [1.0, 1.0], "dare_ties"), dict(density=0.5), "needs adapters of one rank"),
        (([x1, x2], [1.0, 1.0], "ties"), {}, "--density None: --method ties needs the kept fraction in [0, 1]"),
        (([x1, x2], [1.0, 1.0], "ties"), dict(density=1.5), "--density 1.5: --method ties needs"),
        (([x1, x2], [1.0, 1.0], "magnitude_prune"), dict(density=-0.1), "--density -0.1"),
        (([x1, x2], [1.0, 1.0], "dare_linear"), dict(density=0.0), "in (0, 1]: dare divides by it"),
        (([x1, x2], [1.0, 1.0], "cat"), dict(density=0.5), "--density: --method cat prunes nothing"),
        (([x1, x2], [1.0, 1.0], "svd"), dict(svd_rank=0), "--svd-rank 0: must be in [1, 32]"),
        (([x1, x2], [1.0, 1.0], "cat"), dict(svd_rank=4), "--svd-rank: --method cat has no SVD step"),
        (([x1, x2], [1.0, 1.0], "mean"), {}, "--method 'mean': expected one of cat, linear"),
        (([x1, x2], [1.0, float("nan")], "cat"), {}, "is not finite"),
        (([x1, tmp_path / "qonly"], [1.0, 1.0], "cat"), {}, "does not adapt base_model.model.model.layers.0.self_attn.o_proj"),
        (([one_base, other_base], [1.0, 1.0], "cat"), {}, "adapters of different bases cannot be merged"),
        (([x1, dora], [1.0, 1.0], "cat"), {}, "use_dora=True: only plain LoRA adapters can be merged"),
        (([x1, tmp_path], [1.0, 1.0], "cat"), {}, "neither a PEFT adapter directory"),
        (([x1, x2], [1.0, 1.0], "cat"), dict(sign_method="most"), "--majority-sign-method 'most'"),
    ]
    for args, kw, msg in cases:
        with pytest.raises(JaxftError) as e:
            merge_adapters(*args, tmp_path / "out", **kw)
            pytest.fail(msg)
        assert msg in str(e.value) and "\n" not in str(e.value), (msg, str(e.value))
    assert not (tmp_path / "out").exists()
    # a base of another size: the shapes tell
    cfg, tensors = json.loads((x1 / "adapter_config.json").read_text()), read(x1).tensors
    k = next(k for k in tensors if "q_proj.lora_A" in k)
    small = tmp_path / "small"
    from jaxft.formats.peft import write_adapter

    write_adapter(cfg, {**tensors, k: tensors[k][:, :32].copy()}, small)
    with pytest.raises(JaxftError, match=r"is \[64, 32\], .*'s is \[64, 64\]: adapters of different bases"):
        merge_adapters([x1, small], [1.0, 1.0], "cat", tmp_path / "out")
    merge_adapters([x1, tmp_path / "wide"], [1.0, 1.0], "cat", tmp_path / "out")
    with pytest.raises(JaxftError, match="already exists"):
        merge_adapters([x1, x2], [1.0, 1.0], "cat", tmp_path / "out")
    merge_adapters([x1, x2], [1.0, 1.0], "cat", tmp_path / "out", overwrite=True)  # replaced atomically
    assert read(tmp_path / "out").config["r"] == 8 and sorted(p.name for p in tmp_path.iterdir() if
                                                              p.name.startswith(".")) == []
    from jaxft.cli import main  # the command line in process (tiny.run_cli costs a fresh jax import per call)

    assert main(["merge-adapters", str(x1), str(x2), "--weights", "1", "-0.5", "--method", "cat",
                 "--out", str(tmp_path / "cli")]) == 0
    assert "merged 2 adapter(s) (cat)" in capsys.readouterr().out
    for k, v in combine([read(x1), read(x2)], [1.0, -0.5], "cat")[1].items():
        np.testing.assert_array_equal(read(tmp_path / "cli").tensors[k], v)
    assert main(["merge-adapters", str(x1), str(x2), "--weights", "1", "--method", "cat", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxft: error: --weights: 1 weight(s)") and err.count("\n") == 1

"""GGUF export (`jaxft export --format gguf | gguf-lora`): the file transformers' GGUF loader reads back gives
the merged model's logits, tensors are what llama.cpp's converter writes (names, row order, norm
convention, per-tensor types), metadata and tokenizer fields are llama.cpp's, and what llama.cpp cannot
represent is refused."""

import json

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

from jaxft.formats.hf import load_pretrained
from jaxft import adapters
from jaxft.config import LoraConfig
from jaxft.errors import JaxftError
from jaxft.formats.gguf import _tokenizer, _unpermute_rows, permute_rows, write_gguf, write_gguf_lora
from jaxft.formats.peft import adapter_config, adapter_tensors, merged_tensors
from test_sft import task_data  # noqa: F401 — the shared task-data fixture
from tiny import ROOT, example_tokenizer, run_cli, save_chat_model, save_spm_gemma

# families llama.cpp knows; gemma2 as its GGUF can express it (attention scaled by 1/sqrt(head_dim), and
# transformers' loader then assumes its default soft-caps and query_pre_attn_scalar of 256); gemma3 with a
# global layer between sliding ones (not llama.cpp's default every-6th pattern: the file must state it) and
# its own rope per layer type; gemma (1) with a SentencePiece tokenizer.model, as Gemma checkpoints ship
FAMILIES = {"llama": {}, "llama_mqa_tied_bias_headdim": {}, "llama3_rope": {}, "llama_linear_rope": {},
            "qwen2": {}, "qwen3": {},
            "gemma2": dict(head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                           final_logit_softcapping=30.0),
            "gemma3_text": dict(query_pre_attn_scalar=32, num_hidden_layers=3),
            "gemma": {}}
TRANSFORMERS_READS = sorted(set(FAMILIES) - {"gemma"})  # its GGUF loader has no `gemma` (1) architecture


def _save(d, arch):
    if arch == "gemma":
        save_spm_gemma(d)
    else:
        save_chat_model(d, arch, **FAMILIES[arch])


def _adapted(path, rslora=False):
    """The tiny model with a LoRA whose B is non-zero, and its config."""
    model = load_pretrained(path)
    cfg = LoraConfig(r=4, alpha=8, rslora=rslora)
    adapters.attach(model, cfg, jax.random.key(0))
    for i, (_, lin) in enumerate(adapters.targets(model, ("all-linear",))):
        lin.adapter.b[...] = 0.2 * jax.random.normal(jax.random.key(50 + i), lin.adapter.b.shape)
    return model, cfg


def _export(tmp_path, arch, gguf_type="f32"):
    d = tmp_path / "hf"
    _save(d, arch)
    model, cfg = _adapted(d)
    hf_config = tf.AutoConfig.from_pretrained(d)
    out = write_gguf(merged_tensors(model, np.float32), hf_config, example_tokenizer(), tmp_path / f"m-{gguf_type}.gguf",
                     gguf_type=gguf_type, source=d)
    return model, cfg, hf_config, out


IDS = np.array([[1, 17, 250, 3000, 42, 7, 9000, 12, 600, 2]], np.int32)


def _hf_logits(path, config=None):
    """transformers' forward with the GGUF's tensors. config: the original one, for what transformers' GGUF
    config reader drops (rope scaling, qwen3's head_dim); the metadata tests check those keys instead."""
    m = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                config=config).eval()
    with torch.no_grad():
        return m(torch.from_numpy(IDS.astype(np.int64))).logits.numpy()


@pytest.mark.parametrize("arch", TRANSFORMERS_READS)
def test_f32_gguf_loaded_by_transformers_gives_the_merged_logits(arch, tmp_path):
    model, _, hf_config, out = _export(tmp_path, arch)
    want = np.asarray(model(jnp.asarray(IDS))[0])
    readable = arch in ("llama", "llama_mqa_tied_bias_headdim", "qwen2", "gemma2")  # config read from the GGUF too
    np.testing.assert_allclose(_hf_logits(out, None if readable else hf_config), want, atol=1e-4, rtol=0)
    if readable:
        back = tf.AutoConfig.from_pretrained(out.parent, gguf_file=out.name)
        for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "vocab_size"):
            assert getattr(back, k) == pytest.approx(getattr(hf_config, k)), k


@pytest.mark.parametrize("gguf_type,tol", [("bf16", 3e-2), ("f16", 5e-3), ("q8_0", 6e-2)])
def test_reduced_types_are_llamacpp_encodings_within_their_error(gguf_type, tol, tmp_path):
    """Every matrix holds exactly gguf-py's encoding of the (permuted) merged weight, as llama.cpp's converter
    writes it; norms stay F32. Logit error on the tiny model (scale ~5) measured: bf16 1.3e-2, f16 1.7e-3,
    q8_0 2.7e-2; the bounds are about twice that."""
    model, _, hf_config, out = _export(tmp_path, "llama", gguf_type)
    merged = merged_tensors(model, np.float32)
    reader = gguf.GGUFReader(out)
    by_name = {t.name: t for t in reader.tensors}
    q = merged["model.layers.1.self_attn.q_proj.weight"]
    want_q = permute_rows(q, hf_config.num_attention_heads)
    t = by_name["blk.1.attn_q.weight"]
    if gguf_type == "f16":
        np.testing.assert_array_equal(np.asarray(t.data), want_q.astype(np.float16))
    else:
        qtype = gguf.GGMLQuantizationType[gguf_type.upper()]
        assert t.tensor_type == qtype
        np.testing.assert_array_equal(np.asarray(t.data).reshape(-1),
                                      gguf.quants.quantize(want_q, qtype).reshape(-1))
    assert by_name["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert by_name["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    want = np.asarray(model(jnp.asarray(IDS))[0])
    err = np.abs(_hf_logits(out, hf_config) - want).max()
    assert 0 < err <= tol, err


def test_metadata_and_names_are_llamacpps(tmp_path):
    """The keys llama.cpp's converter writes for a llama model (GGUF.md §4.2), with their values."""
    _, _, c, out = _export(tmp_path, "llama3_rope")
    r = gguf.GGUFReader(out)
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    want = {"general.architecture": "llama", "general.type": "model", "llama.block_count": 2,
            "llama.context_length": 256, "llama.embedding_length": 64, "llama.feed_forward_length": 96,
            "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.rope.freq_base": 10000.0,
            "llama.vocab_size": 49152, "llama.rope.dimension_count": 16, "general.file_type": 0,
            "general.quantization_version": 2, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    for k, v in want.items():
        assert kv[k] == pytest.approx(v), k
    assert kv["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.rms_norm_eps)
    assert kv["tokenizer.chat_template"] == example_tokenizer().chat_template
    names = {t.name for t in r.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight", "blk.0.attn_q.weight",
            "blk.1.ffn_down.weight", "blk.1.ffn_norm.weight"} <= names
    freqs = next(t for t in r.tensors if t.name == "rope_freqs.weight")
    assert freqs.data.shape == (8,) and set(np.round(np.asarray(freqs.data), 4)) - {1.0, 8.0}  # smooth band too


def test_tokenizer_read_back_by_transformers_encodes_the_same(tmp_path):
    _, _, _, out = _export(tmp_path, "qwen2")
    back = tf.AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    ours = example_tokenizer()
    text = "Hello world! {\"name\": \"Ada\", \"age\": 36}\n  tabs\tand ünïcödé 123456"
    assert back(text)["input_ids"] == ours(text)["input_ids"]
    assert back.chat_template == ours.chat_template


def test_gguf_base_keeps_its_tokenizer_fields_verbatim(tmp_path):
    from jaxft.example import example_model

    src = example_model()
    path = tmp_path / "tok.gguf"
    w = gguf.GGUFWriter(path, "llama")
    _tokenizer(w, None, None, src)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    got, want = gguf.GGUFReader(path).fields, gguf.GGUFReader(src).fields
    keys = [k for k in want if k.startswith("tokenizer.")]
    assert keys and all(k in got for k in keys)
    for k in keys:
        assert got[k].contents() == want[k].contents(), k


def test_pre_tokenizer_names_are_llamacpps():
    from jaxft.formats.gguf import bpe_pre
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    split = lambda r: {"type": "Sequence", "pretokenizers": [  # noqa: E731
        {"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated"}, {"type": "ByteLevel", "use_regex": False}]}
    assert bpe_pre(split(PRETOKENIZE_REGEX)) == "qwen2"
    assert bpe_pre({"type": "ByteLevel", "use_regex": True}) == "gpt-2"
    assert bpe_pre({"type": "Sequence", "pretokenizers": [{"type": "Digits"}, {"type": "ByteLevel"}]}) == "smollm"
    with pytest.raises(JaxftError, match="has no llama.cpp name"):
        bpe_pre(split("[a-z]+"))


def test_qk_permutation_is_llamacpps_and_inverts():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    p = permute_rows(w, 8)
    np.testing.assert_array_equal(_unpermute_rows(p, 8), w)
    # llama.cpp's LlamaModel.permute: within a head, rows [x0..x7, y0..y7] become [x0, y0, x1, y1, ...]
    head = w[:16]
    np.testing.assert_array_equal(p[:16], np.stack([head[:8], head[8:]], 1).reshape(16, 3))


@pytest.mark.parametrize("rslora", [False, True])
def test_gguf_lora_names_shapes_alpha_and_round_trip(rslora, tmp_path):
    d = tmp_path / "hf"
    save_chat_model(d, "llama")
    model, cfg = _adapted(d, rslora=rslora)
    hf_config = tf.AutoConfig.from_pretrained(d)
    peft = adapter_tensors(model)
    out = write_gguf_lora(peft, adapter_config(model, cfg), hf_config, tmp_path / "lora.gguf")
    r = gguf.GGUFReader(out)
    kv = {k: f.contents() for k, f in r.fields.items()}
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    assert kv["adapter.lora.alpha"] == pytest.approx(8 * 2 if rslora else 8)  # llama.cpp scales by alpha / r
    t = {x.name: np.asarray(x.data) for x in r.tensors}
    assert len(t) == len(peft)
    a, b = t["blk.1.attn_q.weight.lora_a"], t["blk.1.attn_q.weight.lora_b"]
    assert a.shape == (4, 64) and b.shape == (64, 4)  # [r, in] and [out, r] (ne reversed)
    pre = "base_model.model.model.layers.1.self_attn."
    np.testing.assert_array_equal(a, peft[pre + "q_proj.lora_A.weight"])
    np.testing.assert_array_equal(_unpermute_rows(b, 4), peft[pre + "q_proj.lora_B.weight"])  # B permuted like W_q
    np.testing.assert_array_equal(_unpermute_rows(t["blk.1.attn_k.weight.lora_b"], 2), peft[pre + "k_proj.lora_B.weight"])
    np.testing.assert_array_equal(t["blk.1.attn_v.weight.lora_b"], peft[pre + "v_proj.lora_B.weight"])  # not permuted
    # the scale llama.cpp applies (alpha_gguf / r) is the adapter's own
    assert kv["adapter.lora.alpha"] / 4 == pytest.approx(adapters.scale(cfg))


def test_refusals(tmp_path):
    d = tmp_path / "hf"
    save_chat_model(d, "llama")
    model, cfg = _adapted(d)
    c = tf.AutoConfig.from_pretrained(d)
    peft, pcfg = adapter_tensors(model), adapter_config(model, cfg)
    for key, value in (("use_dora", True), ("modules_to_save", ["lm_head"])):
        with pytest.raises(JaxftError, match=f"GGUF LoRA export: {key}=.*use --format gguf"):
            write_gguf_lora(peft, {**pcfg, key: value}, c, tmp_path / "x.gguf")
    phi3 = tf.AutoConfig.for_model("phi3", **{k: getattr(c, k) for k in ("vocab_size", "hidden_size")})
    with pytest.raises(JaxftError, match="model_type 'phi3' is not supported"):
        write_gguf({}, phi3, None, tmp_path / "g.gguf")
    for config, match in (
            (tf.Gemma2Config(head_dim=16, query_pre_attn_scalar=24), "query_pre_attn_scalar=24 differs from head_dim=16"),
            (tf.Gemma3TextConfig(head_dim=16, query_pre_attn_scalar=24), "gemma3_text query_pre_attn_scalar=24"),
            (tf.Gemma3TextConfig(head_dim=16, query_pre_attn_scalar=16, rope_parameters=dict(
                full_attention=dict(rope_type="default", rope_theta=1e6),
                sliding_attention=dict(rope_type="linear", rope_theta=1e4, factor=2.0))),
             "sliding_attention rope_type 'linear'"),
            (tf.GemmaConfig(tie_word_embeddings=False), "gemma tie_word_embeddings=false"),
            (tf.GemmaConfig(hidden_act="silu"), "gemma activation .silu.")):
        with pytest.raises(JaxftError, match=match):
            write_gguf({}, config, None, tmp_path / "g.gguf")
    mistral = tf.MistralConfig(sliding_window=5, max_position_embeddings=256)
    with pytest.raises(JaxftError, match="sliding_window=5 is not represented"):
        write_gguf({}, mistral, None, tmp_path / "g.gguf")
    (tmp_path / "exists.gguf").write_bytes(b"x")
    with pytest.raises(JaxftError, match="already exists"):
        write_gguf(merged_tensors(model, np.float32), c, example_tokenizer(), tmp_path / "exists.gguf")
    assert (tmp_path / "exists.gguf").read_bytes() == b"x"
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left behind


def test_cli_export_gguf_of_a_trained_run(chat_model, task_data, tmp_path):  # noqa: F811
    """train → export --format gguf / gguf-lora → transformers reads the GGUF back with the tuned logits."""
    from jaxft.checkpoint import restore_trainable
    from jaxft.config import load_config
    from jaxft.setup import build
    from flax import nnx

    cfg = ROOT / "configs" / "sft_lora.yaml"
    o = [f"model.path={chat_model}", f"data.train={task_data / 'train.jsonl'}", "train.steps=2", "train.batch_size=2",
         "data.validation=null", "data.max_length=128", f"train.out_dir={tmp_path / 'run'}", "lora.r=4", "lora.alpha=8", "optim.lr=1e-2"]
    r = run_cli("train", cfg, *o)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "model.gguf"
    r = run_cli("export", tmp_path / "run", "--format", "gguf", "--gguf-type", "f32", "--out", out)
    assert r.returncode == 0, r.stderr
    r = run_cli("export", tmp_path / "run", "--format", "gguf", "--out", out)
    assert r.returncode == 2 and "already exists" in r.stderr
    r = run_cli("export", tmp_path / "run", "--format", "gguf-lora", "--out", tmp_path / "lora.gguf")
    assert r.returncode == 0, r.stderr
    run = load_config(cfg, o)
    setup = build(run)
    params, _ = restore_trainable(tmp_path / "run", setup.params)
    tuned = nnx.merge(setup.graphdef, params, setup.frozen)
    np.testing.assert_allclose(_hf_logits(out), np.asarray(tuned(jnp.asarray(IDS))[0]), atol=1e-4, rtol=0)
    meta = json.loads(json.dumps({k: str(v.contents()) for k, v in gguf.GGUFReader(tmp_path / "lora.gguf").fields.items()
                                  if k.startswith("adapter")}))
    assert meta["adapter.type"] == "lora"


def _converter():
    """llama.cpp's convert_hf_to_gguf.py from the llama-cpp-python 0.3.36 sdist (fetched from the package
    registry once into $JAXFT_CACHE/sdist; no build), or None when it cannot be had."""
    import os
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    cache = Path(os.environ.get("JAXFT_CACHE", Path.home() / ".cache" / "jaxft")) / "sdist"
    root = cache / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    if not (root / "convert_hf_to_gguf.py").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                            "llama-cpp-python==0.3.36", "-d", str(cache)], capture_output=True, timeout=600)
        sdist = cache / "llama_cpp_python-0.3.36.tar.gz"
        if r.returncode or not sdist.is_file():
            return None
        with tarfile.open(sdist) as t:
            t.extractall(cache, members=[m for m in t.getmembers() if m.name.startswith(
                ("llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py",
                 "llama_cpp_python-0.3.36/vendor/llama.cpp/conversion/",
                 "llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py/"))], filter="data")
    return root


# not qwen2: the converter's Qwen2 path names the pre-tokenizer by its probe-text hash alone and does not
# recognize this (SmolLM2) vocabulary there, so it refuses to convert the tiny qwen2 model; not gemma2: the
# converter's gemma2 takes only a SentencePiece tokenizer.model, and llama.cpp's gemma2 graph scales the
# sliding window pattern as Gemma 2 ships it (jaxft's gemma2 export is pinned by the transformers test)
@pytest.mark.parametrize("arch,gguf_type", [("llama", "f32"), ("llama", "q8_0"), ("llama_mqa_tied_bias_headdim", "bf16"),
                                            ("gemma", "f32"), ("gemma", "bf16"), ("gemma3_text", "f32")])
def test_equals_llamacpps_own_converter(arch, gguf_type, tmp_path):
    """Against convert_hf_to_gguf.py on the same base weights: every tensor byte-identical (names, types,
    row order, gemma's 1 + w norms) and every key equal, but the free-form general.name / size_label and,
    for a BPE vocabulary, tokenizer.ggml.pre: the converter names the pre-tokenizer by a hash of a probe
    text's token ids, which cannot tell this vocabulary's GPT-2 split from SmolLM's digit split and says
    `smollm`; jaxft reads the split off tokenizer.json and says `gpt-2`; and jaxft states add_eos_token where
    the converter leaves the default. The gemma (1) model has a SentencePiece tokenizer.model: its pieces,
    scores and types are the converter's too. The gemma3 one has a global layer between two sliding ones:
    jaxft states that pattern, which the converter leaves to llama.cpp's every-6th default (wrong here)."""
    import subprocess
    import sys

    root = _converter()
    if root is None:
        pytest.skip("llama-cpp-python's sdist (its converter) could not be fetched from the package registry")
    d = tmp_path / "hf"
    _save(d, arch)
    base = load_pretrained(d)
    ours = write_gguf(merged_tensors(base, np.float32), tf.AutoConfig.from_pretrained(d), example_tokenizer(),
                      tmp_path / "ours.gguf", gguf_type=gguf_type, source=d)
    import os

    env = {**os.environ, "PYTHONPATH": f"{root / 'gguf-py'}:{root}", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(root / "convert_hf_to_gguf.py"), str(d), "--outtype", gguf_type,
                        "--outfile", str(tmp_path / "theirs.gguf")], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(tmp_path / "theirs.gguf")
    free = {"general.name", "general.size_label"} | ({"tokenizer.ggml.pre"} if arch != "gemma" else set())
    ka = {k: f.contents() for k, f in a.fields.items() if not k.startswith("GGUF.") and k not in free}
    kb = {k: f.contents() for k, f in b.fields.items() if not k.startswith("GGUF.") and k not in free}
    if arch != "gemma":  # BPE: jaxft states add_eos_token (and add_bos_token) = false where the converter leaves
        for k in ("tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_bos_token"):  # llama.cpp's default
            if k not in kb:
                assert ka.pop(k) is False, k
    if arch == "gemma3_text":
        assert ka.pop("gemma3.attention.sliding_window_pattern") == [True, False, True]
    assert ka.keys() == kb.keys()
    for k in ka:
        assert ka[k] == kb[k], k
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert ta.keys() == tb.keys()
    for n in ta:
        assert ta[n].tensor_type == tb[n].tensor_type, n
        np.testing.assert_array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data), err_msg=n)

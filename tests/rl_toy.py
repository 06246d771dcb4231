"""A toy world for the RL tests: a tiny Llama over a 32-word vocabulary (WordLevel tokenizer, no chat
template), plain-text prompts, and verifiable rewards on the completion's token ids."""

import json
from pathlib import Path

import numpy as np
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


# Fixed rollouts of RL.md §1.9(g) (EOS = 2 here): two prompts, G = 4, one completion truncated at L = 4.
P0, P1 = [5, 6, 7], [8, 9]
COMPLETIONS = [[10, 11, 2], [12, 2], [13, 14, 15, 16], [17, 2], [18, 2], [19, 20, 2], [21, 2], [22, 23, 24, 2]]
TABLE = {"r1": [1, 0, 0, 1, 0.3, 0.9, 0.5, 0.1], "r2": [0.3, 0.9, 0.5, 0.1, 2, 2, None, 2]}
NONE_ROWS: set = set()  # completion indices for which r1 returns None (set by a test)


def _lookup(name, completion_ids):
    out = []
    for ids in completion_ids:
        i = COMPLETIONS.index(list(ids))
        out.append(None if name == "r1" and i in NONE_ROWS else TABLE[name][i])
    return out


def r1(prompts, completions, completion_ids, **kw):
    return _lookup("r1", completion_ids)


def r2(prompts, completions, completion_ids, **kw):
    return _lookup("r2", completion_ids)


def token_mean(prompts, completions, completion_ids, **kw):
    """A reward that differs between any two different completions (their mean token id, scaled): a group's
    rewards vary unless its completions are identical, so a step always has advantages to learn from."""
    return [float(np.mean(ids)) / 50_000 if len(ids) else 0.0 for ids in completion_ids]


def raises(prompts, completions, completion_ids, **kw):
    raise RuntimeError("scorer offline")


def short(prompts, completions, completion_ids, **kw):
    return [1.0]


def nan(prompts, completions, completion_ids, **kw):
    return [float("nan")] * len(completions)


def text(prompts, completions, completion_ids, **kw):
    return ["1.0"] * len(completions)

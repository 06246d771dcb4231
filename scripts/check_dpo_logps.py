"""Summed completion log-probs of the same token ids: jaxft, transformers and TRL's fused LM head.

    python scripts/check_dpo_logps.py [--batch 4] [--prompt 128] [--completion 128]

The ids are bench_dpo.py's first batch of chosen sequences (seeded random prompt + completion + EOS)
on the example model. Prints the three per-sequence sums and their largest difference: what the DPO
benchmark's policy / reference log-probs should be at step 1, whatever each trainer logs.
"""

import argparse
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch
from transformers import AutoModelForCausalLM
from trl.trainer.utils import add_fused_lm_head

from jaxft.formats.hf import load_pretrained
from jaxft.example import example_model
from jaxft.losses import token_logprobs

sys.path.insert(0, str(Path(__file__).parent))
import bench_dpo  # noqa: E402 — pair_ids


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--completion", type=int, default=128)
    a = ap.parse_args()
    args = argparse.Namespace(seed=0, warmup=1, steps=1, batch=a.batch, prompt=a.prompt, completion=a.completion,
                              vocab=49152)
    ids = np.array([p + c for p, c, _ in bench_dpo.pair_ids(args)[:a.batch]])
    completion = np.zeros(ids.shape, bool)
    completion[:, a.prompt:] = True
    path = example_model()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    x = torch.as_tensor(ids)
    labels = x.masked_fill(~torch.as_tensor(completion), -100)
    with torch.no_grad():
        lp = torch.log_softmax(hf(x).logits[:, :-1].float(), -1).gather(-1, x[:, 1:, None])[..., 0]
        plain = (lp * torch.as_tensor(completion[:, 1:])).sum(1).numpy()
        add_fused_lm_head(hf)
        fused = hf(x, labels=labels, fused_lm_head=True).log_probs.sum(1).numpy()
    model = load_pretrained(path)
    h, _ = model.hidden(jnp.asarray(ids, jnp.int32))
    ours = np.asarray((token_logprobs(model, h[:, :-1], jnp.asarray(ids[:, 1:], jnp.int32)) * completion[:, 1:]).sum(1))
    for name, v in (("jaxft", ours), ("transformers", plain), ("TRL fused head", fused)):
        print(f"{name:15s} {np.array2string(v, precision=4)}  mean {v.mean():.4f}")
    print(f"largest difference: {max(np.abs(ours - plain).max(), np.abs(ours - fused).max()):.2e}")


if __name__ == "__main__":
    main()

"""A/B of the whole SFT train step (jaxft.train.make_train_step, losses.sft_loss) against another commit's, interleaved.

    python scripts/ab_step.py --against REV [--mode full|lora] [--layers 30] [--batch 4] [--seq 256] [--repeats 8]

Model: SmolLM2-135M-shaped, random weights (scripts/profile_step.py's SMOLLM2); --mode full trains every
weight (134.5 M), lora r=16 on every layer linear. Optimizer as scripts/bench_sft.py: AdamW, constant lr,
no decay or clipping. `jaxft/train.py` and `jaxft/losses.py` at REV (`git show REV:...`) are loaded as second
modules (the B side's step is REV's make_train_step with REV's sft_loss), everything else is this tree's, so the
two steps differ only by those two files. Both are compiled, then they run
in turn, `--repeats` rounds, each on its own donated state, so a noisy machine slows them alike. Prints per
side the wall and process CPU medians, the compiled temp memory, and the largest relative difference of the
weights after the last step against this tree's. A tiny batch (--batch 1 --seq 16) leaves mostly the
weight-sized work: the update, the gradient norm, the finiteness checks, the gradients' zero fills.
"""

import argparse
import dataclasses
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxft.losses
import jaxft.train
from jaxft import adapters
from jaxft.config import LoraConfig, OptimConfig
from jaxft.models.decoder import Decoder
from jaxft.optim import make_optimizer
from profile_step import SMOLLM2

ROOT = Path(__file__).resolve().parent.parent


def module_at(rev: str, path: str) -> types.ModuleType:
    """jaxft/<path> as it was at commit `rev`, as a module of its own (importing this tree's jaxft)."""
    src = subprocess.check_output(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], text=True)
    module = types.ModuleType(f"{path.replace('/', '_')[:-3]}_at_{rev}")
    sys.modules[module.__name__] = module  # before exec: a dataclass looks its module up while it is built
    exec(compile(src, f"{rev}:{path}", "exec"), module.__dict__)
    return module


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--against", required=True, help="a commit: its jaxft/train.py is the B side")
    ap.add_argument("--mode", choices=["lora", "full"], default="full")
    ap.add_argument("--layers", type=int, default=SMOLLM2.num_layers)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=8)
    a = ap.parse_args()
    model = Decoder(dataclasses.replace(SMOLLM2, num_layers=a.layers, layer_types=()), rngs=nnx.Rngs(0))
    cfg = LoraConfig(r=16, alpha=32, enabled=a.mode == "lora")
    if cfg.enabled:
        adapters.attach(model, cfg, jax.random.key(0))
    g, p, f = adapters.split(model, cfg)
    toks = np.random.RandomState(0).randint(0, SMOLLM2.vocab_size, (1, a.batch, a.seq)).astype(np.int32)
    batch = dict(tokens=toks, positions=np.broadcast_to(np.arange(a.seq, dtype=np.int32), toks.shape).copy(),
                 segment_ids=np.ones_like(toks), targets=toks, loss_mask=np.ones(toks.shape, np.float32))
    tx = make_optimizer(OptimConfig(lr=1e-4, schedule="constant", warmup_steps=0, weight_decay=0.0,
                                    clip_norm=None), 10, p)
    sides = {}
    old = module_at(a.against, "jaxft/train.py"), module_at(a.against, "jaxft/losses.py")
    for name, module, losses in (("this tree", jaxft.train, jaxft.losses), (a.against, *old)):
        state = module.init_state(jax.tree.map(jnp.copy, p), tx)
        step = module.make_train_step(g, tx, losses.sft_loss).lower(state, f, batch).compile()
        state, _ = step(state, f, batch)
        sides[name] = [step, jax.block_until_ready(state), []]
    for _ in range(a.repeats):
        for side in sides.values():
            step, state, times = side
            w, c = time.perf_counter(), time.process_time()
            side[1], metrics = step(state, f, batch)
            jax.block_until_ready((side[1], metrics))
            times.append((time.perf_counter() - w, time.process_time() - c))
    first = sides["this tree"][1]["params"]
    for name, (step, state, times) in sides.items():
        diff = max(jax.tree.leaves(jax.tree.map(
            lambda x, y: float(jnp.abs(x - y).max() / (jnp.abs(y).max() + 1e-30)), state["params"], first)))
        print(f"{name:12s} wall {statistics.median(t[0] for t in times):6.3f} s  "
              f"cpu {statistics.median(t[1] for t in times):6.3f} s  "
              f"temp {step.memory_analysis().temp_size_in_bytes / 1e9:5.2f} GB  "
              f"max |weights - this tree's| / max {diff:.1e}")


if __name__ == "__main__":
    main()

"""Sharding figures on simulated CPU devices: per-device parameter + optimizer memory under fsdp = 1, 2,
4, 8 (full fine-tuning: fp32 weights + AdamW moments), and the step time of sharded steps next to the
same step on one device.

    python scripts/bench_sharding.py                       # ~156M-parameter Llama-shaped model (620 MB fp32)
    python scripts/bench_sharding.py --quick               # tiny settings: checks the script end to end

The memory figure is the bytes of the buffers each device really holds (its addressable shards of every
state array), not a formula. Simulated devices share this machine's cores, so the sharded step times
show the cost of the collectives and partitioning, not a speed-up; on real chips each device has its own.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from jaxft import adapters, sharding  # noqa: E402
from jaxft.config import LoraConfig, MeshConfig, OptimConfig  # noqa: E402
from jaxft.models.config import DecoderConfig  # noqa: E402
from jaxft.models.decoder import Decoder, num_params  # noqa: E402
from jaxft.optim import make_optimizer
from jaxft.train import init_state, make_train_step  # noqa: E402


def llama_config(hidden: int, layers: int, vocab: int, intermediate: int) -> DecoderConfig:
    from transformers import LlamaConfig

    heads = hidden // 64
    return DecoderConfig.from_hf(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1), tie_word_embeddings=False).to_dict())


def random_model(cfg: DecoderConfig, mesh, strategy: str, lora_cfg: LoraConfig):
    """(graphdef, trainable, frozen) with random weights made shard by shard on their devices."""
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    if lora_cfg.enabled:
        adapters.attach(model, lora_cfg, jax.random.key(0))
    graphdef, params, frozen = adapters.split(model, lora_cfg)
    rng = np.random.default_rng(0)

    def fill(x, s):
        if isinstance(x, jax.Array):
            return sharding.place(x, s)
        return jax.make_array_from_callback(
            x.shape, s, lambda idx: (0.02 * rng.standard_normal(np.empty(x.shape, np.bool_)[idx].shape))
            .astype(x.dtype))

    params = jax.tree.map(fill, params, sharding.tree_shardings(params, mesh, strategy))
    frozen = jax.tree.map(fill, frozen, sharding.tree_shardings(frozen, mesh, strategy))
    return graphdef, params, frozen


def per_device_bytes(tree) -> dict:
    out: dict = {}
    for x in jax.tree.leaves(tree):
        for s in x.addressable_shards:
            out[s.device] = out.get(s.device, 0) + s.data.nbytes
    return out


def memory_table(cfg: DecoderConfig):
    print(f"\nPer-device parameter + optimizer memory, full fine-tuning (fp32 weights + AdamW m, v), "
          f"{num_params(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))/1e6:.1f}M parameters")
    print(f"{'fsdp':>5} {'max per device MB':>18} {'total / fsdp MB':>16} {'vs fsdp=1':>10}")
    first = None
    for n in (1, 2, 4, 8):
        mesh = sharding.make_mesh(MeshConfig(fsdp=n))
        _, params, _ = random_model(cfg, mesh, "fsdp", LoraConfig(enabled=False))
        tx = make_optimizer(OptimConfig(), 10, params)
        state, _ = sharding.sharded_init(lambda p, tx=tx: init_state(p, tx), params, mesh, "fsdp")
        del params
        per = per_device_bytes(state)
        most, total = max(per.values()), sum(per.values())
        first = first or most
        print(f"{n:>5} {most / 2**20:>18.1f} {total / n / 2**20:>16.1f} {most / first:>10.3f}")
        del state


def step_times(cfg: DecoderConfig, lora_on: bool, batch: int, seq: int, steps: int):
    print(f"\nStep time, {'LoRA r=16' if lora_on else 'full fine-tuning'}, batch {batch} x {seq} tokens "
          f"(median of {steps} steps after compilation)")
    print(f"{'mesh (data, fsdp, tensor)':>26} {'strategy':>9} {'step s':>8} {'vs 1 device':>12}")
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, cfg.vocab_size, (1, batch, seq)).astype(np.int32)
    host_batch = dict(tokens=tokens, positions=np.broadcast_to(np.arange(seq, dtype=np.int32), tokens.shape).copy(),
                      segment_ids=np.ones_like(tokens), targets=np.roll(tokens, -1, -1),
                      loss_mask=np.ones(tokens.shape, np.float32))
    base = None
    for shape, strategy in (((1, 1, 1), "dp"), ((1, 8, 1), "fsdp"), ((2, 4, 1), "fsdp"), ((1, 4, 2), "fsdp_tp")):
        mesh = sharding.make_mesh(MeshConfig(*shape, strategy=strategy))
        graphdef, params, frozen = random_model(cfg, mesh, strategy, LoraConfig(enabled=lora_on, r=16))
        tx = make_optimizer(OptimConfig(), 100, params)
        state, sh = sharding.sharded_init(lambda p, tx=tx: init_state(p, tx), params, mesh, strategy)
        step = make_train_step(graphdef, tx, out_shardings=(sh, sharding.replicated(mesh)))
        b = {k: jax.device_put(v, NamedSharding(mesh, sharding.batch_spec(mesh, batch, 1))) for k, v in host_batch.items()}
        state, m = step(state, frozen, b)
        jax.block_until_ready(m)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            state, m = step(state, frozen, b)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        base = base or med
        print(f"{str(shape):>26} {strategy:>9} {med:>8.3f} {med / base:>12.2f}x")
        del state, frozen, params


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model and few steps: a check that the script runs")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    a = p.parse_args()
    if a.quick:
        mem_cfg = step_cfg = llama_config(128, 2, 512, 256)
        a.steps, a.seq = 2, 32
    else:
        mem_cfg = llama_config(1024, 8, 32000, 2816)  # ~156M parameters: 620 MB of fp32 weights
        step_cfg = llama_config(512, 4, 32000, 1408)
    print(f"jax {jax.__version__}, {jax.device_count()} simulated CPU devices on {os.cpu_count()} cores")
    memory_table(mem_cfg)
    for lora_on in (True, False):
        step_times(step_cfg, lora_on, a.batch, a.seq, a.steps)


if __name__ == "__main__":
    main()

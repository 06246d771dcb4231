"""Sharding figures on simulated CPU devices: per-device parameter + optimizer memory under fsdp = 1, 2,
4, 8 (full fine-tuning: fp32 weights + AdamW moments; QLoRA: the NF4 base + LoRA + AdamW, beside
`jaxft plan`'s per-device figure and its figures for Llama-3 8B / 70B on 8 chips), and the step time of
sharded steps next to the same step on one device.

    python scripts/bench_sharding.py                       # ~156M-parameter Llama-shaped model (620 MB fp32)
    python scripts/bench_sharding.py --quick               # tiny settings: checks the script end to end
    python scripts/bench_sharding.py --only-qlora          # the QLoRA memory table alone

The memory figure is the bytes of the buffers each device really holds (its addressable shards of every
state array), not a formula. Simulated devices share this machine's cores, so the sharded step times
show the cost of the collectives and partitioning, not a speed-up; on real chips each device has its own.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from jaxft import adapters, sharding  # noqa: E402
from jaxft.commands.plan import model_config, plan  # noqa: E402
from jaxft.config import LoraConfig, MeshConfig, OptimConfig, load_config  # noqa: E402
from jaxft.setup import build  # noqa: E402
from benchlib import cpu_flags  # noqa: E402
from jaxft.models.config import DecoderConfig  # noqa: E402
from jaxft.models.decoder import Decoder, num_params  # noqa: E402
from jaxft.optim import make_optimizer  # noqa: E402
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


def save_llama(path: str, hidden: int, layers: int, vocab: int, intermediate: int) -> str:
    """A random Llama-shaped HF checkpoint (+ the example's tokenizer, which `build` loads) in `path`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from jaxft.formats.hf import load_tokenizer
    from jaxft.setup import resolve_model

    heads = hidden // 64
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1), tie_word_embeddings=False)).save_pretrained(path)
    load_tokenizer(resolve_model("example")).save_pretrained(path)
    return path


def qlora_table(model_dir: str):
    """configs/qlora.yaml (NF4 + double quantization, LoRA r=16 on every linear, bf16) on fsdp = 1, 2, 4, 8:
    the base + LoRA + AdamW bytes the busiest device really holds, beside `jaxft plan`'s figure."""
    cfg = str(os.path.join(os.path.dirname(__file__), "..", "configs", "qlora.yaml"))
    print(f"\nPer-device memory, QLoRA ({cfg.split('/')[-1]}: NF4 + double quant base, LoRA r=16 all-linear, "
          f"AdamW), {model_dir}")
    print(f"{'fsdp':>5} {'base MB':>12} {'LoRA+AdamW MB':>14} {'per device MB':>14} {'plan MB':>9} {'vs fsdp=1':>10}")
    first = None
    for n in (1, 2, 4, 8):
        run = load_config(cfg, [f"model.path={model_dir}", f"mesh.fsdp={n}", "lora.dropout=0"])
        mesh = sharding.make_mesh(run.mesh)
        setup = build(run, mesh)
        tx = make_optimizer(run.optim, 10, setup.params)
        state, _ = sharding.sharded_init(lambda p, tx=tx: init_state(p, tx), setup.params, mesh, "fsdp")
        base, rest = per_device_bytes(setup.frozen), per_device_bytes(state)
        dev = max(base, key=lambda d: base[d] + rest.get(d, 0))
        most = base[dev] + rest.get(dev, 0)
        p = plan(model_config(model_dir), run)
        planned = sum(p.per_device[:3]) if p.per_device else p.base + p.trainable + p.optimizer
        first = first or most
        print(f"{n:>5} {base[dev] / 2**20:>12.1f} {rest.get(dev, 0) / 2**20:>14.1f} {most / 2**20:>14.1f} "
              f"{planned / 2**20:>9.1f} {most / first:>10.3f}")
        del setup, state
    print("\n`jaxft plan configs/qlora.yaml --model M mesh.fsdp=8` (8 chips; GiB per device of the exact parts: base "
          "(NF4 linears + bf16 embeddings, norms, lm_head), LoRA, AdamW)")
    print(f"{'model':>11} {'base':>9} {'LoRA':>7} {'AdamW':>7} {'sum':>7} {'one device':>11}")
    for name in ("llama3-8b", "llama3-70b"):
        run = load_config(cfg, ["mesh.fsdp=8"])
        p = plan(model_config(name), run)
        b, t, o = (x / 2**30 for x in p.per_device[:3])
        one = (p.base + p.trainable + p.optimizer) / 2**30
        print(f"{name:>11} {b:>9.2f} {t:>7.2f} {o:>7.2f} {b + t + o:>7.2f} {one:>11.2f}")


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
    p.add_argument("--only-qlora", action="store_true", help="the QLoRA memory table alone")
    a = p.parse_args()
    if a.quick:
        mem_cfg = step_cfg = llama_config(128, 2, 512, 256)
        a.steps, a.seq = 2, 32
        qlora_shape = (512, 2, 512, 512)  # every linear input a multiple of 64 x 8: NF4 blocks split 8 ways
    else:
        mem_cfg = llama_config(1024, 8, 32000, 2816)  # ~156M parameters: 620 MB of fp32 weights
        step_cfg = llama_config(512, 4, 32000, 1408)
        qlora_shape = (1024, 8, 32000, 2816)  # the same model as the full fine-tuning table
    print(f"jax {jax.__version__}, {jax.device_count()} simulated CPU devices on {os.cpu_count()} cores; "
          f"CPU flags: {' '.join(cpu_flags()) or 'none of avx512f / avx512_bf16 / amx'}")
    with tempfile.TemporaryDirectory() as d:
        qlora_table(save_llama(d, *qlora_shape))
    if a.only_qlora:
        return
    memory_table(mem_cfg)
    for lora_on in (True, False):
        step_times(step_cfg, lora_on, a.batch, a.seq, a.steps)


if __name__ == "__main__":
    main()

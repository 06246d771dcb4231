"""Everything a run builds before its first step (train, eval, export, score all start here).

    setup = build(run, mesh)      # Setup(run, model_path, tokenizer, graphdef, params, frozen)

The base model loads straight into its shards (run.mesh.strategy), adapters attach under their
layers (or a PEFT adapter is read in), and the model splits into what trains (`params`, fp32
master weights) and what does not (`frozen`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft import adapters, sharding
from jaxft.adapters import bank
from jaxft.config import RunConfig, residual_init
from jaxft.config.objectives import head_of
from jaxft.errors import JaxftError
from jaxft.example import example_model
from jaxft.formats.hf import load_pretrained, load_tokenizer, pad_token_id
from jaxft.formats.peft import load_adapter
from jaxft.models.decoder import CPU_TUNED, PLAIN
from jaxft.quant import quantize_loaded


@dataclasses.dataclass
class Setup:
    run: RunConfig
    model_path: Path
    tokenizer: object
    graphdef: object
    params: object  # the trainable subtree (fp32)
    frozen: object  # everything else


def resolve_model(path: str) -> Path:
    """The one model resolver: "example" (the embedded SmolLM2-135M-Instruct), an HF directory or a .gguf."""
    if path == "example":
        return example_model()
    return Path(path).expanduser()


def build(run: RunConfig, mesh: jax.sharding.Mesh | None = None) -> Setup:
    """Load the base model (+ tokenizer), attach the adapter, split trainable / frozen; with a mesh,
    every parameter is read straight into its shards."""
    path = resolve_model(run.model.path)
    compute = jnp.bfloat16 if run.model.dtype == "bf16" else jnp.float32
    param_dtype = compute if run.lora.enabled else jnp.float32  # full FT keeps fp32 master weights
    tokenizer = load_tokenizer(path)
    head = head_of(run)  # the objective's head; new or loaded is the checkpoint's business
    # PiSSA / OLoRA on a quantized base: load W in fp32, take the principal part out, quantize the residual
    requant = (run.lora.enabled and not run.lora.init_adapter and residual_init(run.lora.init)
               and run.quant.base != "none")
    place = None if mesh is None else sharding.param_sharding(mesh, run.mesh.strategy)
    model = load_pretrained(path, dtype=jnp.float32 if requant else param_dtype, compute_dtype=compute,
                            remat=run.model.remat, quant=None if requant else run.quant,
                            tuning=CPU_TUNED if run.model.cpu_tuned else PLAIN, attention=run.model.attention,
                            sharding=place,
                            head=head, pad_token_id=pad_token_id(path, tokenizer) if head == "score" else None,
                            seed=run.train.seed)
    if run.lora.enabled and run.lora.init_adapter:  # continue from an existing PEFT adapter
        got = load_adapter(model, run.lora.init_adapter)
        if adapters.method_of(got) != adapters.method_of(run.lora):
            raise JaxftError(f"lora.init_adapter: {run.lora.init_adapter} is a {adapters.method_of(got)} adapter, "
                             f"the run asks for {adapters.method_of(run.lora)} (lora.method / lora.use_dora / lora.init)")
        if got.method == "lora" and (got.r, got.alpha, got.rslora) != (run.lora.r, run.lora.alpha, run.lora.rslora):
            raise JaxftError(f"lora.init_adapter: {run.lora.init_adapter} has r={got.r}, alpha={got.alpha}, "
                             f"rslora={got.rslora}; set lora.r / lora.alpha / lora.rslora to match")
    elif run.adapters:  # a multi-adapter run: one bank of fresh adapters (jaxft.adapters.bank)
        bank.attach_for_training(model, run)
    elif run.lora.enabled:
        adapters.attach(model, run.lora, jax.random.key(run.train.seed))
    if requant:
        quantize_loaded(model, run.quant, compute, place)
        if param_dtype != jnp.float32:  # what stays unquantized (embeddings, norms) in the run's dtype
            for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
                if not isinstance(var, nnx.LoRAParam):
                    var.set_value(var.get_value().astype(param_dtype))
    graphdef, params, frozen = adapters.split(model, run.lora)
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)  # fp32 master weights + optimizer state
    if mesh is not None:  # adapter factors are made on one device: move them to their shards
        params = sharding.place(params, sharding.tree_shardings(params, mesh, run.mesh.strategy))
        frozen = sharding.place(frozen, sharding.tree_shardings(frozen, mesh, run.mesh.strategy))
    return Setup(run, path, tokenizer, graphdef, params, frozen)

"""PEFT adapter directories: export from and import into a jaxft model (FORMATS.md).

    adapter_model.safetensors   base_model.model.<HF module>.lora_A.weight [r, in] = a[i].T
                                base_model.model.<HF module>.lora_B.weight [out, r] = b[i].T
                                (+ .lora_magnitude_vector [out] for DoRA; .ia3_l for IA3)
    adapter_config.json         only long-standing keys, so older PEFT releases load it too

Each method's tensors and config keys come from its adapter class (jaxft.adapters); this module only
walks the model and the files.

A reward model (jaxft.models.heads.ScoreModel) exports as PEFT's SEQ_CLS task: the LoRA tensors plus the
fully trained head `base_model.model.score.weight` [1, D] (how PEFT itself saves a modules_to_save
module: without its `modules_to_save.default` infix), task_type "SEQ_CLS" and PEFT's own
modules_to_save ["classifier", "score"]; `PeftModel.from_pretrained` over the `*ForSequenceClassification`
base loads it. Merged, it is a `*ForSequenceClassification` directory (num_labels 1, pad_token_id set).

Written to a temporary directory and renamed into place; an existing directory is only replaced
with overwrite=True.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shlex
from pathlib import Path
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxft import adapters
from jaxft.adapters import bank
from jaxft.config import VLLM_RANKS, LoraConfig, rank_bucket
from jaxft.errors import JaxftError
from jaxft.example import default_cache_dir
from jaxft.files import make_executable, read_json, staging_dir
from jaxft.formats.gguf import GGUFSource, load_gguf_tokenizer
from jaxft.formats.hf import hf_names, read_safetensors
from jaxft.models.decoder import Decoder
from jaxft.models.heads import ScoreModel
from jaxft.models.names import PROJECTIONS, hf_module
from jaxft.quant import quantized_kernels
from jaxft.sharding import to_host

PREFIX = "base_model.model."


def _layer_modules(model: Decoder):
    """(HF module path template with {i}, Linear) for every adapted layer projection."""
    for path, lin in adapters.adapted(model):
        yield hf_module(tuple(str(p) for p in path)), lin


def _is_score_model(model) -> bool:
    return isinstance(model, ScoreModel)


def adapter_tensors(model: Decoder) -> dict[str, np.ndarray]:
    """PEFT tensor name → fp32 array, unstacked per layer in PyTorch layout (each adapter's `peft_tensors`);
    a ScoreModel's head (trained in full) as `base_model.model.score.weight` [1, D]."""
    out = {}
    for template, lin in _layer_modules(model):
        for i in range(lin.kernel.shape[0]):
            out.update(lin.adapter.peft_tensors(PREFIX + template.format(i=i), i))
    if _is_score_model(model):
        out[PREFIX + "score.weight"] = np.ascontiguousarray(np.asarray(model.score.kernel[...], np.float32).T)
    return out


def gather_adapters(model: Decoder) -> None:
    """Every adapter variable (and a reward model's score head) whole on this process's first device, in place,
    so that `adapter_tensors` / `export_bank` read them like a one-device model's. With several processes it is
    a collective (every process calls it, in the same state); the adapters are small, the base stays sharded."""
    mods = [lin.adapter for _, lin in adapters.adapted(model)] + ([model.score] if _is_score_model(model) else [])
    for m in mods:
        nnx.update(m, jax.tree.map(lambda x: jnp.asarray(to_host(x)), nnx.state(m)))


def adapter_config(model: Decoder, cfg: LoraConfig, base_model: str = "") -> dict:
    """adapter_config.json: the generic PEFT keys plus the method's own (`Adapter.peft_config`)."""
    if cfg.modules_to_save:
        raise JaxftError("lora.modules_to_save: PEFT export of modules_to_save is not supported yet")
    found = list(_layer_modules(model))
    if not found:
        raise JaxftError("the model has no adapter to export")
    modules = sorted({t.rsplit(".", 1)[-1] for t, _ in found})
    method = type(found[0][1].adapter)
    seq_cls = _is_score_model(model)  # PEFT's SEQ_CLS default modules_to_save: the head, trained in full
    return {**method.peft_config(cfg, modules), "task_type": "SEQ_CLS" if seq_cls else "CAUSAL_LM",
            "target_modules": modules, "fan_in_fan_out": False,
            "modules_to_save": ["classifier", "score"] if seq_cls else None, "base_model_name_or_path": base_model,
            "inference_mode": True}


def export_adapter(model: Decoder, cfg: LoraConfig, out_dir, *, base_model: str = "", overwrite: bool = False) -> Path:
    """Write a PEFT adapter directory atomically; returns its path."""
    return write_adapter(adapter_config(model, cfg, base_model), adapter_tensors(model), out_dir, overwrite=overwrite)


def write_adapter(config: dict, tensors: dict[str, np.ndarray], out_dir, *, overwrite: bool = False) -> Path:
    """adapter_config.json + adapter_model.safetensors, written to a temporary directory and renamed into place."""
    from safetensors.numpy import save_file

    with staging_dir(out_dir, overwrite) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return Path(out_dir)


def adapter_files(adapter_dir) -> tuple[dict, dict[str, np.ndarray]]:
    """A PEFT adapter directory's adapter_config.json (checked: a mapping whose generic keys have their types)
    and its tensors (the safetensors header validated as a model's is, every value finite); one-line
    JaxftErrors naming the file otherwise."""
    d = Path(adapter_dir)
    cfg_path, st = d / "adapter_config.json", d / "adapter_model.safetensors"
    for p in (cfg_path, st):
        if not p.is_file():
            raise JaxftError(f"{p}: no such file (expected a PEFT adapter directory)")
    c = read_json(cfg_path)
    if not isinstance(c, dict):
        raise JaxftError(f"{cfg_path}: expected a JSON object of PEFT settings, got a {type(c).__name__}")
    for key, ok, want in _PEFT_KEYS:
        if c.get(key) is not None and not ok(c[key]):
            raise JaxftError(f"{cfg_path}: {key}={str(c[key])[:60]!r}: expected {want}")
    tensors = read_safetensors(st)
    for name, t in tensors.items():
        if not np.isfinite(np.asarray(t, np.float32)).all():
            raise JaxftError(f"{st}: tensor {name} holds NaN or Inf values; the file is damaged")
    return c, tensors


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _names(v) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))


_PEFT_KEYS = (  # (key, check, what it should be) for the keys every method reads
    ("peft_type", lambda v: isinstance(v, str), "a string"),
    ("r", lambda v: _int(v) and 1 <= v <= 2**31 - 1, "a positive integer"),
    ("lora_alpha", _number, "a finite number"),
    ("lora_dropout", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("target_modules", _names, "a module name or a list of them"),
    ("feedforward_modules", _names, "a module name or a list of them"),
    ("use_rslora", lambda v: isinstance(v, bool), "true or false"),
    ("use_dora", lambda v: isinstance(v, bool), "true or false"),
    ("base_model_name_or_path", lambda v: isinstance(v, str), "a string"),
)


def read_adapter(adapter_dir) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """A PEFT adapter directory → (jaxft LoraConfig, tensors); the method's class (by peft_type) parses
    its config, unsupported settings are one-line errors."""
    c, tensors = adapter_files(adapter_dir)
    cfg_path = Path(adapter_dir) / "adapter_config.json"
    kind = c.get("peft_type", "LORA")
    if kind not in adapters.READERS:
        raise JaxftError(f"{cfg_path}: peft_type {kind!r} is not one of {', '.join(adapters.READERS)}")
    try:
        return adapters.READERS[kind].config_from_peft(c, cfg_path), tensors
    except KeyError as e:
        raise JaxftError(f"{cfg_path}: {e.args[0]}: missing (a {kind} adapter_config.json needs it)") from None
    except (TypeError, ValueError) as e:
        raise JaxftError(f"{cfg_path}: not a usable {kind} config ({type(e).__name__}: {str(e)[:120]})") from None


def load_adapter(model: Decoder, adapter_dir) -> LoraConfig:
    """Attach the adapter of a PEFT directory to `model` (in place); returns its LoraConfig.

    Every adapted projection of every layer must be present with the right shapes; a tensor that
    maps to nothing in the model is an error naming it.
    """
    cfg, tensors = read_adapter(adapter_dir)
    method = adapters.METHODS[adapters.method_of(cfg)]
    used = set()
    try:
        targets = list(adapters.targets(model, cfg.target_modules))
    except JaxftError as e:  # a module name the model does not have: the adapter's config says it
        raise JaxftError(f"{Path(adapter_dir) / 'adapter_config.json'}: {e}") from None
    for path, lin in targets:
        template = hf_module(tuple(str(p) for p in path))
        L, d_in, d_out = lin.kernel.shape
        per_layer = []
        for i in range(L):
            name = PREFIX + template.format(i=i)
            layer = {}
            for suffix, want in method.peft_shapes(cfg, d_in, d_out, lin.name).items():
                key = f"{name}.{suffix}"
                if key not in tensors:
                    raise JaxftError(f"{adapter_dir}: tensor {key} is missing")
                if tuple(tensors[key].shape) != want:
                    raise JaxftError(f"{adapter_dir}: tensor {key} has shape {list(tensors[key].shape)}, "
                                     f"the model needs {list(want)}")
                used.add(key)
                layer[suffix] = tensors[key]
            per_layer.append(layer)
        lin.adapter = method.from_peft(per_layer, cfg, lin)
    extra = sorted(set(tensors) - used)
    if extra:
        raise JaxftError(f"{adapter_dir}: tensor {extra[0]} does not match any adapted module of the model")
    jax.block_until_ready(nnx.state(model, nnx.LoRAParam))
    return cfg


def merged_tensors(model: Decoder, dtype) -> dict[str, np.ndarray]:
    """HF tensor name → array of the model with every adapter merged in (each adapter's `merge`, in fp32, then cast)."""
    return dict(iter_merged(model, dtype))


def iter_merged(model: Decoder, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) of the merged model, one tensor (one layer of a stacked one) at a time, in a fixed order.

    Each layer is gathered to the host (`sharding.to_host`), then merged with its adapter on this process's
    first device: a base larger than any one device is never whole on one, and the merge sees the same
    [1, in, out] operands whatever the mesh (merging a stack in its shards runs other dot kernels, which round
    differently), so the bytes are the one-device export's. The adapters are gathered first
    (`gather_adapters`). Gathers are collectives: with several processes every one of them iterates this to
    the end, in step (process 0 writes)."""
    if quantized_kernels(model):
        raise JaxftError("merged export from quantized base weights would round the adapter away; "
                         "reload the original weights (jaxft.quant.original_base_run)")
    gather_adapters(model)
    kernels = {tuple(str(p) for p in path): lin for path, lin in adapters.targets(model, ("all-linear",))}
    for path, var in _base_params(model):
        names, transpose = hf_names(path, model.config.num_layers)
        value = var.get_value()
        stacked = path[:2] == ("model", "layers")
        lin = kernels.get(path[:-1]) if path[-1] in ("kernel", "bias") else None
        for i, name in enumerate(names):
            t = to_host(value[i] if stacked else value)
            if lin is not None and lin.adapter is not None:
                t = _merge_layer(lin.adapter, path[-1], t, i if stacked else None)
            t = t.astype(np.float32).astype(dtype)
            yield name, np.ascontiguousarray(t.T if transpose else t)


def _merge_layer(adapter, leaf: str, t: np.ndarray, layer: int | None) -> np.ndarray:
    """Layer `layer` (None: not stacked) of a kernel or bias merged with its adapter (its `merge` /
    `merge_bias`, fp32), on this process's first device."""
    if layer is not None:  # the adapter of that layer alone, as a stack of one
        graphdef, state = nnx.split(adapter)
        adapter = nnx.merge(graphdef, jax.tree.map(lambda x: x[layer:layer + 1] if np.ndim(x) else x, state))
    w = jnp.asarray(t, jnp.float32)[None] if layer is not None else jnp.asarray(t, jnp.float32)
    if leaf == "kernel":
        w = adapter.merge(w)
    elif hasattr(adapter, "merge_bias"):
        w = adapter.merge_bias(w)
    return np.asarray(w[0] if layer is not None else w)


def merged_shapes(model: Decoder) -> dict[str, tuple[int, ...]]:
    """HF name → shape of every tensor `iter_merged` yields, in its order (known before anything is merged)."""
    out = {}
    for path, var in _base_params(model):
        names, transpose = hf_names(path, model.config.num_layers)
        shape = var.get_value().shape[1:] if path[:2] == ("model", "layers") else var.get_value().shape
        out.update((n, tuple(reversed(shape)) if transpose else tuple(shape)) for n in names)
    return out


def _base_params(model: Decoder):
    """(path, variable) of every parameter but the adapters', in nnx's order."""
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if not isinstance(var, nnx.LoRAParam):
            yield tuple(str(p) for p in path), var


def export_merged(model: Decoder, tokenizer, hf_config, out_dir, *, dtype="bf16", overwrite: bool = False,
                  max_shard_bytes: int = 2 << 30) -> Path:
    """A Hugging Face model directory of the merged model: config.json, generation_config.json,
    safetensors (sharded with an index above max_shard_bytes), tokenizer files with the chat template.
    Tensors stream in from `iter_merged` (with several processes, the others run `iter_merged` beside it)."""
    out = Path(out_dir)
    if out.exists() and not overwrite:  # before the (slow) merge
        raise JaxftError(f"{out}: already exists (pass --overwrite to replace it)")
    np_dtype = _NP_DTYPES[dtype]
    shapes = {k: (v, np_dtype) for k, v in merged_shapes(model).items()}
    return write_hf_dir(iter_merged(model, np_dtype), shapes, hf_config, tokenizer, out, dtype=dtype,
                        overwrite=overwrite, max_shard_bytes=max_shard_bytes,
                        pad_id=model.pad_id if _is_score_model(model) else None)


_NP_DTYPES = {"bf16": ml_dtypes.bfloat16, "fp32": np.float32}


def write_hf_dir(tensors: Iterable[tuple[str, np.ndarray]], shapes: dict, hf_config, tokenizer, out_dir, *,
                 dtype: str, overwrite: bool = False, max_shard_bytes: int = 2 << 30, pad_id: int | None = None,
                 extra: dict | None = None) -> Path:
    """An HF model directory, atomically: tensors, (name, array) in the order of shapes (name → (shape, dtype)),
    are taken one safetensors shard at a time, so a model larger than memory streams through; config.json (+ a
    `*ForSequenceClassification`'s keys when pad_id is given, else generation_config.json), tokenizer files;
    extra: more JSON files."""
    from safetensors.numpy import save_file

    items = iter(tensors)

    def take(names):
        got = dict(itertools.islice(items, len(names)))
        if list(got) != names:
            raise JaxftError(f"{out_dir}: the tensors came as {list(got)[:3]}..., not in the order {names[:3]}...")
        return got

    with staging_dir(out_dir, overwrite) as tmp:
        shards, size = [[]], 0
        for name, (shape, dt) in shapes.items():
            nbytes = int(np.prod(shape)) * np.dtype(dt).itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        if len(shards) == 1:
            save_file(take(shards[0]), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for k, names in enumerate(shards):
                fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(take(names), str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({n: fname for n in names})
            total = sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in shapes.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = hf_config.to_dict()
        config.pop("quantization_config", None)
        config["dtype"] = {"bf16": "bfloat16", "fp32": "float32"}[dtype]
        config["architectures"] = config.get("architectures") or [type(hf_config).__name__.replace("Config", "ForCausalLM")]
        if pad_id is not None:
            config.update(seq_cls_config(config, pad_id))
        else:
            from transformers import GenerationConfig

            GenerationConfig.from_model_config(hf_config).save_pretrained(tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name, obj in (extra or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=1))
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


# ---------------------------------------------------------------- the base an exported adapter names

GGUF_ORIGIN = "jaxft_gguf_base.json"  # in an HF directory written from a GGUF: {"gguf": path, "dtype": ...}


def serving_base(model_path, dtype: str = "fp32", *, cache_dir=None, say=print) -> Path:
    """The Hugging Face model directory an adapter of this base is loaded over (PEFT's
    `AutoPeftModelForCausalLM`, `vllm serve BASE --enable-lora`): an HF directory as it is; for a GGUF base,
    its dequantized HF directory, written once into the jaxft cache (`<cache>/hf/<name>-<key>-<dtype>/`).

    Why there: PEFT, transformers and vLLM read an adapter's base from `base_model_name_or_path` and none of
    them serves a GGUF as a LoRA base (transformers wants `gguf_file=` beside a directory; vLLM's LoRA
    support is for HF checkpoints). One copy serves every run and export of that base (the example's is 0.5 GB
    in fp32), the user's GGUF folder may be read-only, and adapter folders stay small enough to copy around.
    The tensors are the very values jaxft trained on: the GGUF dequantized in fp32 (then cast to the run's
    dtype, bf16 as jaxft casts), so the adapter is served over the model that was tested. The key is the
    GGUF's absolute path, size and modification time: a GGUF replaced in place gets a new directory."""
    path = Path(model_path).expanduser()
    if path.suffix != ".gguf":
        return path.absolute()
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = Path(cache_dir or default_cache_dir()).absolute() / "hf" / f"{path.stem}-{key}-{dtype}"
    if (out / GGUF_ORIGIN).is_file():
        return out
    src = GGUFSource(path)
    np_dtype = _NP_DTYPES[dtype]
    say(f"jaxft: writing the GGUF base {path.name} as a Hugging Face directory (dequantized, {dtype}) for "
        f"PEFT / vLLM to load adapters over, once: {out}")
    write_hf_dir(((n, src.get(n).astype(np_dtype)) for n in src.keys()), {n: (src.shape(n), np_dtype) for n in src.keys()},
                 src.hf_config, load_gguf_tokenizer(path), out, dtype=dtype, overwrite=True,
                 extra={GGUF_ORIGIN: {"gguf": str(path.resolve()), "dtype": dtype}})
    return out


def base_identity(base: str) -> str:
    """What a base model string stands for, to compare two adapters' bases: an HF directory that jaxft wrote
    from a GGUF stands for that GGUF (an adapter exported now names the directory, its run the GGUF)."""
    if not base:
        return base
    origin = Path(base).expanduser() / GGUF_ORIGIN
    try:
        if origin.is_file():
            return str(Path(read_json(origin)["gguf"]).resolve())
        return str(Path(base).expanduser().resolve()) if Path(base).expanduser().exists() else base
    except (JaxftError, KeyError, TypeError, OSError):
        return base


def seq_cls_config(config: dict, pad_id: int) -> dict:
    """The config.json keys of a reward model's `*ForSequenceClassification` directory (one label)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as NAMES

    # by model_type, as the Auto classes resolve it (gemma3_text: Gemma3TextForSequenceClassification, while
    # its causal LM is Gemma3ForCausalLM)
    return dict(architectures=[NAMES[config["model_type"]]], id2label={"0": "LABEL_0"},
                label2id={"LABEL_0": 0}, pad_token_id=int(pad_id))


VLLM_DEFAULT_MAX_RANK = 16
VLLM_MODULES = (*PROJECTIONS, "embed_tokens", "lm_head")


def vllm_problems(config: dict, tensor_names) -> list[str]:
    """Each rule of vLLM's LoRA loader that an adapter (its adapter_config.json and tensor names) breaks."""
    r = config.get("r")
    out = []
    if config.get("peft_type", "LORA") != "LORA":
        return [f"peft_type={config['peft_type']}: vLLM loads LoRA adapters only; export with --format merged"]
    # vLLM serves any rank up to its --max-lora-rank (one of VLLM_RANKS, default 16), padding it to that rank
    bucket = rank_bucket(r) if isinstance(r, int) else None
    if bucket not in VLLM_RANKS:
        out.append(f"rank r={r} is not one of the ranks vLLM supports: above {VLLM_RANKS[-1]}, the largest "
                   f"--max-lora-rank it accepts; export with --format merged")
    elif r not in VLLM_RANKS:
        out.append(f"rank r={r} is not one of the ranks vLLM supports as --max-lora-rank "
                   f"({', '.join(map(str, VLLM_RANKS))}): vLLM serves it padded to the rank bucket {bucket}, with "
                   f"--max-lora-rank {bucket} or more" + (f" (the default {VLLM_DEFAULT_MAX_RANK} does)"
                                                         if bucket <= VLLM_DEFAULT_MAX_RANK else ""))
    elif r > VLLM_DEFAULT_MAX_RANK:
        out.append(f"rank r={r} is above vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_RANK} "
                   f"(start vLLM with --max-lora-rank {r})")
    if config.get("use_dora"):
        out.append("use_dora=true: vLLM does not load DoRA adapters; export with --format merged")
    if config.get("modules_to_save"):
        out.append(f"modules_to_save={config['modules_to_save']}: vLLM refuses adapters with full-weight modules")
    if config.get("bias", "none") != "none":
        out.append(f"bias={config['bias']!r}: vLLM needs bias='none' unless bias support is enabled")
    tm = config.get("target_modules") or []
    unknown = sorted(set([tm] if isinstance(tm, str) else tm) - set(VLLM_MODULES))
    if unknown:
        out.append(f"target_modules {unknown} are not modules vLLM knows")
    odd = sorted(n for n in tensor_names if not n.endswith((".lora_A.weight", ".lora_B.weight")))
    if odd:
        out.append(f"tensor {odd[0]} is not a .lora_A.weight / .lora_B.weight tensor ({len(odd)} such)")
    return out


# ---------------------------------------------------------------- a bank of adapters (jaxft export --format peft)


def vllm_command(base: str, folders: dict[str, Path], ranks: list[int]) -> str:
    """The `vllm serve` line that serves every adapter of a bank over its base in one engine."""
    r = rank_bucket(max(ranks))
    mods = " ".join(shlex.quote(f"{n}={p}") for n, p in folders.items())
    return (f"vllm serve {shlex.quote(base)} --enable-lora --lora-modules {mods} --max-loras {len(folders)} "
            f"--max-lora-rank {r}")


def export_bank(model, out, *, base_model: str = "", strict: bool = False, overwrite: bool = False,
                say=print) -> Path:
    """One PEFT adapter folder per adapter of the model's bank (`out/<name>/`, each loadable by PEFT and vLLM
    on its own) and `out/serve_vllm.sh`, after vLLM's rules check of each; written to a temporary
    directory and renamed into place."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise JaxftError(f"{out}: already exists (pass --overwrite to replace it)")
    names, configs = bank.names_of(model), bank.banks(model)[0][1].adapter.configs
    problems = []
    for n, (name, cfg) in enumerate(zip(names, configs)):
        saved = bank.views(model, n)
        try:
            found = vllm_problems(adapter_config(model, cfg), adapter_tensors(model))
        finally:
            bank.restore(model, saved)
        # the command line sets --max-lora-rank to the bank's bucket (r=4 and r=8: 8), so a rank within vLLM's
        # ranks is no problem here, whatever the default
        served = rank_bucket(cfg.r) in VLLM_RANKS
        problems += [f"{name}: {p}" for p in found if not (served and p.startswith("rank r="))]
    for p in problems:
        say(f"jaxft: vLLM: {p}")
    if problems and strict:
        raise JaxftError(f"the adapters break {len(problems)} vLLM rule(s) (see above); nothing written")
    final = {name: out.absolute() / name for name in names}
    cmd = vllm_command(base_model, final, [c.r for c in configs])
    with staging_dir(out, overwrite) as tmp:
        for n, (name, cfg) in enumerate(zip(names, configs)):
            saved = bank.views(model, n)
            try:
                export_adapter(model, cfg, tmp / name, base_model=base_model)
            finally:
                bank.restore(model, saved)
        script = tmp / "serve_vllm.sh"
        script.write_text(f"#!/bin/sh\n# every adapter of the run in one vLLM engine, over the base it was tested on\n"
                          f"{cmd}\n")
        make_executable(script)
    say(cmd)
    return out

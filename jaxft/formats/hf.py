"""Hugging Face checkpoint import: safetensors (one file or shards) and GGUF → Decoder.

Names are derived, not tabulated: a jaxft parameter path joined by "." is the HF module path, and
its leaf maps `kernel` → `weight` (transposed: [in, out] ↔ [out, in]), `embedding` / `scale` →
`weight`, `bias` → `bias`. Stacked layer parameters [L, ...] gather `model.layers.{i}.…` for each i.

A reward model (`head="score"`, jaxft.models.heads.ScoreModel) uses the same rule: `score.kernel` [D, 1] ↔
`score.weight` [1, D]; from a causal LM checkpoint the head is new and `lm_head.weight` goes unused.

Streaming: the model is built abstractly (no weights), then every parameter is materialised with
`jax.make_array_from_callback`, which asks for each device shard in turn; the callback slices the
memory-mapped file, so host memory holds at most one parameter's shard at a time, never a second
copy of the model. Only safetensors and GGUF are read — no pickle, no remote code.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxft.errors import JaxftError
from jaxft.files import read_json, unique_keys
from jaxft.formats.gguf import GGUFSource, load_gguf_tokenizer
from jaxft.models.config import DecoderConfig
from jaxft.models.decoder import CPU_TUNED, Decoder
from jaxft.models.heads import PolicyWithValue, ScoreModel
from jaxft.quant import quantize_sharded, should_quantize

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry


class TensorSource(Protocol):
    """What the loader needs from a checkpoint: HF names → arrays in HF layout (read lazily)."""

    def keys(self) -> list[str]: ...

    def get(self, name: str) -> np.ndarray: ...


class SafetensorsSource:
    """A model directory's safetensors, memory-mapped; headers validated up front.

    Truncated files, shard indexes that point outside the directory and unknown dtypes are
    refused here, before anything is loaded, with the file and the cause in one line.
    """

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            weight_map = _weight_map(index)
            files = {f: self._inside(f, index) for f in sorted(set(weight_map.values()))}
        elif single.is_file():
            weight_map, files = None, {"model.safetensors": single}
        else:
            pickles = sorted(p.name for p in self.dir.glob("*.bin")) + sorted(p.name for p in self.dir.glob("*.pt*"))
            hint = f" (found {', '.join(pickles)}: pickle files are never read; convert them to safetensors)" if pickles else ""
            raise JaxftError(f"{self.dir}: no model.safetensors or model.safetensors.index.json{hint}")
        self._entries: dict[str, tuple[Path, str, tuple[int, ...], int]] = {}
        for fname, fpath in files.items():
            for name, entry in _read_header(fpath).items():
                if weight_map is None or weight_map.get(name) == fname:
                    self._entries[name] = (fpath, *entry)
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._entries))
            if missing:
                raise JaxftError(f"{index}: tensor {missing[0]} is not in {weight_map[missing[0]]}")
        self._maps: dict[Path, np.memmap] = {}

    def _inside(self, fname: str, index: Path) -> Path:
        if not fname or "\0" in fname:
            raise JaxftError(f"{index}: shard name {fname!r} is not a file name")
        p = (self.dir / fname).resolve()
        if not p.is_relative_to(self.dir.resolve()):
            raise JaxftError(f"{index}: shard {fname!r} points outside the model directory; refused")
        if not p.is_file():
            raise JaxftError(f"{index}: shard {fname!r} does not exist")
        return p

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][2]

    def get(self, name: str) -> np.ndarray:
        """A zero-copy view of the tensor (slicing it reads only what is sliced)."""
        fpath, dtype, shape, offset = self._entries[name]
        if fpath not in self._maps:
            self._maps[fpath] = np.memmap(fpath, dtype=np.uint8, mode="r")
        dt = np.dtype(_ST_DTYPES[dtype])
        n = int(np.prod(shape)) * dt.itemsize
        return self._maps[fpath][offset:offset + n].view(dt).reshape(shape)


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit on a header


def _ints(value, n: int | None = None) -> bool:
    """value is a list of non-negative ints (of length n)."""
    return (isinstance(value, list) and (n is None or len(value) == n)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


def _weight_map(index: Path) -> dict[str, str]:
    """model.safetensors.index.json's weight_map (tensor → shard file name), checked."""
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise JaxftError(f"{index}: not a valid shard index (expected a weight_map of tensor name → shard file)")
    return weight_map


def _read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """name → (dtype, shape, absolute byte offset), after checking everything the header says against the
    file: its length, each entry's fields and types, each tensor's bytes for its shape and dtype, that every
    tensor lies inside the file and that no two share bytes. Nothing is allocated from what the header
    claims."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise JaxftError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise JaxftError(f"{path}: truncated safetensors file (header says {n} bytes, file has {size})")
            if n > MAX_HEADER_BYTES:
                raise JaxftError(f"{path}: not a safetensors file (a header of {n} bytes; at most "
                                 f"{MAX_HEADER_BYTES} are read)")
            raw = f.read(n)
    except OSError as e:
        raise JaxftError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw, object_pairs_hook=unique_keys)
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, a key twice
        cause = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
        raise JaxftError(f"{path}: not a safetensors file (header is not a valid JSON object: {cause})") from None
    if not isinstance(header, dict):
        raise JaxftError(f"{path}: not a safetensors file (header is a JSON {type(header).__name__}, not an object)")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise JaxftError(f"{path}: __metadata__ is not a mapping of strings")
    out, spans = {}, []
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise JaxftError(f"{path}: tensor {name[:80]}: expected an entry with dtype, shape and data_offsets")
        if e["dtype"] not in _ST_DTYPES:
            raise JaxftError(f"{path}: tensor {name} has dtype {str(e['dtype'])[:20]}; jaxft reads "
                             f"{', '.join(_ST_DTYPES)}")
        if not _ints(e["shape"]) or not _ints(e["data_offsets"], 2) or e["data_offsets"][0] > e["data_offsets"][1]:
            raise JaxftError(f"{path}: tensor {name}: shape {str(e['shape'])[:40]} / data_offsets "
                             f"{str(e['data_offsets'])[:40]} are not non-negative integers (begin <= end)")
        begin, end = e["data_offsets"]
        want = math.prod(e["shape"]) * np.dtype(_ST_DTYPES[e["dtype"]]).itemsize  # Python ints: no overflow
        if end - begin != want:
            raise JaxftError(f"{path}: tensor {name} has {end - begin} bytes for shape {e['shape']} ({want} expected)")
        if 8 + n + end > size:
            raise JaxftError(f"{path}: truncated safetensors file (tensor {name} ends at byte {8 + n + end}, "
                             f"file has {size})")
        out[name] = (e["dtype"], tuple(e["shape"]), 8 + n + begin)
        spans.append((begin, end, name))
    spans.sort()
    at = 0  # as the safetensors library checks: the tensors tile the data, back to back, to the end of the file
    for begin, end, name in spans:
        if begin != at:
            why = "shares bytes with the tensor before it" if begin < at else f"leaves a gap at byte {8 + n + at}"
            raise JaxftError(f"{path}: tensor {name} {why} (data_offsets {[begin, end]}); a damaged header")
        at = end
    if 8 + n + at != size:
        raise JaxftError(f"{path}: the tensors end at byte {8 + n + at}, the file has {size}; a damaged header")
    return out


def read_safetensors(path) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file (a PEFT adapter's), validated as `SafetensorsSource` does and
    copied into memory."""
    path = Path(path)
    entries = _read_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r") if entries else None
    out = {}
    for name, (dtype, shape, offset) in entries.items():
        dt = np.dtype(_ST_DTYPES[dtype])
        out[name] = np.array(data[offset:offset + math.prod(shape) * dt.itemsize].view(dt).reshape(shape))
    return out


def open_checkpoint(path) -> tuple[TensorSource, DecoderConfig]:
    """A checkpoint (HF directory or .gguf file) → its tensor source and decoder config."""
    path = Path(path).expanduser()
    if not path.exists():
        raise JaxftError(f"{path}: no such file or directory")
    if path.is_file() and path.suffix == ".gguf":
        src = GGUFSource(path)
        return src, DecoderConfig.from_hf(src.hf_config)
    if not path.is_dir():
        raise JaxftError(f"{path}: expected a Hugging Face model directory or a .gguf file")
    cfg = DecoderConfig.from_hf(path)
    return SafetensorsSource(path), cfg


def hf_names(path: tuple[str, ...], num_layers: int) -> tuple[list[str], bool]:
    """jaxft parameter path → HF tensor names (one per layer when stacked) and whether to transpose."""
    *mods, leaf = path
    hf_leaf, transpose = {"kernel": ("weight", True), "embedding": ("weight", False),
                          "scale": ("weight", False), "bias": ("bias", False)}[leaf]
    if mods[:2] == ["model", "layers"]:
        rest = ".".join(mods[2:] + [hf_leaf])
        return [f"model.layers.{i}.{rest}" for i in range(num_layers)], transpose
    return [".".join(mods + [hf_leaf])], transpose


def load_pretrained(path, dtype=jnp.float32, *, compute_dtype=None, remat: str = "proj",
                    sharding: Callable[..., jax.sharding.Sharding] | None = None, quant=None,
                    tuning=None, attention="auto", head: str = "lm", pad_token_id: int | None = None,
                    seed: int = 0):
    """Load a causal LM (a Decoder) from a local HF directory or a .gguf file; with head="score", a
    ScoreModel (jaxft.models.heads) instead, from a causal LM checkpoint (`lm_head` unused, the new
    `score` drawn as transformers draws it: normal(0, initializer_range), key `seed`) or from a
    `*ForSequenceClassification` one (its `score.weight` read; num_labels != 1 refused); with head="value",
    a PolicyWithValue (the causal LM and a new value head, normal(0, 0.02), key `seed`).

    dtype: parameter dtype (fp32 or bf16); compute_dtype defaults to it.
    sharding(path, shape, axes) → the parameter's Sharding (axes: its declared logical axes); default: the
    first device. tuning: jaxft.models.decoder.Tuning (default: the CPU-tuned layouts). attention: the
    attention kernel (model.attention: auto | xla | blockwise | cudnn | splash, or an AttentionKernel).
    quant: a config.QuantConfig; the kernels it names are quantized on the host one HF tensor at a
    time as they stream in (jaxft.quant), so their full-precision values never reach the device; with
    `sharding`, each process reads and quantizes only the blocks its devices hold (called with exact=True:
    a quantized dimension the mesh cannot split on whole blocks is refused).

    >>> model = load_pretrained("~/.cache/jaxft/SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> logits, _ = model(jnp.array([[1, 2, 3]]))
    """
    src, cfg = open_checkpoint(path)
    _check_layer_count(src, cfg, path)
    compute_dtype = compute_dtype or dtype

    kw = dict(dtype=compute_dtype, param_dtype=dtype, remat=remat, tuning=tuning or CPU_TUNED, attention=attention)
    fresh = {}  # parameters the checkpoint does not hold: a new score head
    if head == "score":
        init_std = score_head(src, path, cfg.hidden_size)
        pad = _pad_id(pad_token_id, path)
        abstract = nnx.eval_shape(lambda: ScoreModel(cfg, pad_id=pad, rngs=nnx.Rngs(0), **kw))
        if init_std is not None:
            fresh[("score", "kernel")] = init_std * jax.random.normal(jax.random.key(seed), (cfg.hidden_size, 1))
    elif head == "value":  # PPO's policy: the causal LM plus a new value head (jaxft.objectives.ppo fills it)
        abstract = nnx.eval_shape(lambda: PolicyWithValue(cfg, rngs=nnx.Rngs(0), **kw))
        fresh[("value_head", "kernel")] = 0.02 * jax.random.normal(jax.random.key(seed), (cfg.hidden_size, 1))
    else:
        abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), **kw))
    graphdef, state = nnx.split(abstract)
    available = set(src.keys())
    used: set[str] = set()
    first = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's own
    flat = nnx.to_flat_state(state)
    quantized = {}
    for p, var in flat:
        p = tuple(str(k) for k in p)
        names, transpose = hf_names(p, cfg.num_layers)
        if p in fresh:
            value = np.asarray(fresh[p], np.float32).astype(var.get_value().dtype)
            where = sharding(p, value.shape, var.get_metadata().get("axes")) if sharding else first
            var.set_value(jax.make_array_from_callback(value.shape, where, lambda idx, v=value: v[idx]))
            continue
        for n in names:
            if n not in available:
                raise JaxftError(f"{path}: tensor {n} is missing from the checkpoint")
        used.update(names)
        shape, pdtype = var.get_value().shape, var.get_value().dtype
        stacked = len(names) > 1 or p[:2] == ("model", "layers")
        if should_quantize(p, quant):
            place = ((lambda k, shp, ax, p=p: sharding(p + (k,), shp, ax, exact=True)) if sharding
                     else (lambda k, shp, ax: first))
            quantized[p[:-1]] = _read_quantized(src, names, transpose, shape, quant, compute_dtype, str(path),
                                                place, var.get_metadata().get("axes") or (None, None))
            continue
        cb = _reader(src, names, transpose, stacked, shape, pdtype, str(path))
        where = sharding(p, shape, var.get_metadata().get("axes")) if sharding else first
        var.set_value(jax.make_array_from_callback(shape, where, cb))
    unused_head = cfg.tie_word_embeddings or head == "score"  # a score model never reads lm_head
    extra = sorted(n for n in available - used if not n.endswith(_IGNORED_SUFFIXES)
                   and not (unused_head and n == "lm_head.weight"))
    if extra:
        raise JaxftError(f"{path}: checkpoint tensor {extra[0]} is not used by the {cfg.model_type} config "
                         f"({len(extra)} unused); the config and the weights disagree")
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    for mod_path, kernel in quantized.items():
        mod = model
        for k in mod_path:
            mod = getattr(mod, k)
        mod.kernel = kernel
    return model


def _check_layer_count(src: TensorSource, cfg: DecoderConfig, path) -> None:
    """The config's layer count against the layers the checkpoint holds, before any name list or array is
    built from it (a damaged header can claim 2**31 layers)."""
    held = {int(m[1]) for n in src.keys() if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    n = max(held) + 1 if held else 0
    if n < cfg.num_layers:
        raise JaxftError(f"{path}: tensor model.layers.{n}.* is missing from the checkpoint (the config says "
                         f"{cfg.num_layers} layers, the checkpoint holds {n})")


def _pad_id(pad_token_id, path) -> int:
    if pad_token_id is None:
        raise JaxftError(f"{path}: a score model needs a pad token id for pooling (none given)")
    return int(pad_token_id)


def _hf_config_dict(src, path) -> dict:
    """config.json of a directory, or the GGUF's transformers config, as a dict."""
    if hasattr(src, "hf_config"):
        return src.hf_config.to_dict()
    return read_json(Path(path).expanduser() / "config.json")


def score_head(src, path, hidden: int) -> float | None:
    """None when the checkpoint holds a score head (a `*ForSequenceClassification`, num_labels 1, checked),
    else the std of a new one (the config's initializer_range, transformers' default 0.02)."""
    c = _hf_config_dict(src, path)
    where = f"{Path(path).expanduser() / 'config.json'}" if Path(path).expanduser().is_dir() else str(path)
    seq_cls = any(a.endswith("ForSequenceClassification") for a in c.get("architectures") or [])
    if not seq_cls and "score.weight" not in set(src.keys()):
        return float(c.get("initializer_range") or 0.02)
    n = c.get("num_labels", len(c["id2label"]) if c.get("id2label") else 2)  # transformers' default: 2
    if n != 1:
        raise JaxftError(f"{where}: num_labels={n} (id2label); a reward model needs num_labels=1")
    if "score.weight" not in set(src.keys()):
        raise JaxftError(f"{path}: tensor score.weight is missing from the {c['architectures'][0]} checkpoint")
    if tuple(src.shape("score.weight")) != (1, hidden):
        raise JaxftError(f"{path}: tensor score.weight has shape {list(src.shape('score.weight'))}; "
                         f"a reward model needs [1, {hidden}]")
    return None


def pad_token_id(path, tokenizer) -> int | None:
    """The pad id a score model pools with: a `*ForSequenceClassification` config's pad_token_id (what
    transformers pools with when it serves that checkpoint), else TRL's rule: the tokenizer's pad token,
    or its EOS."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        c = read_json(p / "config.json")
        if isinstance(c, dict) and any(a.endswith("ForSequenceClassification") for a in c.get("architectures") or []) \
                and c.get("pad_token_id") is not None:
            return int(c["pad_token_id"])
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else getattr(tokenizer, "eos_token_id", None)


def _read_quantized(src: TensorSource, names, transpose, shape, quant, compute_dtype, where, place, axes):
    """One kernel → a QuantKernel, each process reading (and quantizing, on the host) only the blocks of each
    layer's tensor that its devices hold (jaxft.quant.quantize_sharded)."""
    per = shape[-2:]

    def read(i, rows, cols):  # layer i's [rows, cols] block of the kernel, fp32
        return _reader(src, [names[i]], transpose, False, per, np.float32, where)((slice(*rows), slice(*cols)))

    return quantize_sharded(read, shape, quant.base, quant.double_quant, axes, compute_dtype, place)


def _reader(src: TensorSource, names, transpose, stacked, shape, dtype, where):
    """The callback that reads one shard (a tuple of slices of the jaxft shape) from the source."""

    def one(name, idx):
        t = src.get(name)
        want = shape[1:] if stacked else shape
        want = want[::-1] if transpose else want
        if tuple(t.shape) != tuple(want):
            raise JaxftError(f"{where}: tensor {name} has shape {list(t.shape)}, the config implies {list(want)}")
        t = t[tuple(reversed(idx))].T if transpose else t[idx]
        return np.asarray(t, dtype=np.float32).astype(dtype) if t.dtype != dtype else np.array(t)

    def read(index):
        if not stacked:
            return one(names[0], index)
        layers = range(len(names))[index[0]]
        return np.stack([one(names[i], index[1:]) for i in layers])

    return read


def load_tokenizer(path):
    """The tokenizer (with its chat template) of a local HF directory or a .gguf file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise JaxftError(f"{path}: no such file or directory")
    if path.suffix == ".gguf":
        return load_gguf_tokenizer(path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise JaxftError(f"{path}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None

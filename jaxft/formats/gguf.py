"""Read a llama.cpp GGUF checkpoint as Hugging Face tensors, one tensor at a time.

llama.cpp renames every tensor (`blk.0.attn_q.weight` for `model.layers.0.self_attn.q_proj.weight`),
stores many of them quantized, and for llama-arch models permutes the rows of the Q and K projections
to suit its rope kernel. `GGUFSource` undoes all three, so `get` returns the very float32 array that
transformers builds when it loads the same file with `from_pretrained(dir, gguf_file=name)`:

    src = GGUFSource("SmolLM2-135M-Instruct.Q4_1.gguf")
    src.hf_config.num_hidden_layers                                  # 30
    src.get("model.layers.0.self_attn.k_proj.weight").shape          # (192, 576): [out, in]

The file is memory-mapped (`gguf.GGUFReader`); only the tensor asked for is dequantized.
Everything that would make the result wrong or fail later (a damaged file, an architecture or a
quantization type jaxft cannot read, a tensor with no Hugging Face counterpart) raises a
`JaxftError` in `__init__`.
"""

import functools
import json
import math
import os
import re
import tempfile
from pathlib import Path

import gguf
import numpy as np

from jaxft.errors import JaxftError
from jaxft.files import atomic_path

# GGUF `general.architecture` -> whether llama.cpp permuted Q/K rows for its interleaved rope.
# Other architectures (gemma: norms stored as w + 1; qwen3: head_dim not in transformers' mapping...)
# need more than renames and are refused.
_ARCHITECTURES = {"llama": True, "qwen2": False}

_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _hf_name(gguf_name: str) -> str | None:
    """The transformers name of a GGUF tensor, or None if it has none.

    Example: "blk.3.ffn_down.weight" -> "model.layers.3.mlp.down_proj.weight"
    """
    stem, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if stem in _TOP_LEVEL:
        return f"{_TOP_LEVEL[stem]}.{suffix}"
    block = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if block and block[2] in _LAYER:
        return f"model.layers.{block[1]}.{_LAYER[block[2]]}.{suffix}"
    return None


@functools.cache
def _can_dequantize(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether `gguf.quants.dequantize` handles this type (tried on one all-zero block)."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros(type_size, np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (its `LlamaModel.permute`), as transformers does.

    Within each head llama.cpp interleaves the two rope halves: rows [x0..x31, y0..y31] are stored
    as [x0, y0, x1, y1, ...]. Works on weights [out, in] and biases [out].
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_gguf_file(path) -> Path:
    """The path, after checking that it is a file starting with the GGUF magic."""
    path = Path(path)
    if not path.exists():
        raise JaxftError(f"{path}: no such file")
    if not path.is_file():
        raise JaxftError(f"{path}: not a file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise JaxftError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    return path


# GGUF value types (gguf.GGUFValueType) → bytes of one value; 8 is a string, 9 an array
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
GGML_MAX_DIMS = 4


class _Header:
    """A bounds-checked walk over a GGUF file's header (mmap'd), before gguf.GGUFReader trusts it: every count,
    length and offset is checked against the bytes the file has, so a lying header is an error, never an
    allocation of what it claims nor a loop of 2**60 turns (the reader's own walk loops on past the end of a
    file: reads there are empty, not errors)."""

    def __init__(self, path: Path, data):
        self.path, self.data, self.pos = path, data, 0

    def fail(self, what: str):
        raise JaxftError(f"{self.path}: not a valid GGUF file, damaged or truncated ({what})")

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.data) - self.pos:
            self.fail(f"{what} at byte {self.pos} needs {n} bytes, the file has {len(self.data) - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "little")

    def u64(self, what: str) -> int:
        return int.from_bytes(self.take(8, what), "little")

    def string(self, what: str) -> str:
        raw = self.take(self.u64(f"{what}'s length"), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} at byte {self.pos - len(raw)} is not UTF-8")

    def count(self, n: int, smallest: int, what: str) -> int:
        """A count of items of at least `smallest` bytes each, checked against the bytes left."""
        left = len(self.data) - self.pos
        if n > left // smallest:
            self.fail(f"{what} claims {n} items, the {left} bytes left hold at most {left // smallest}")
        return n

    def value(self, vtype: int, what: str, depth: int = 0):
        """Skip one value of type vtype; scalars come back as their bytes, strings decoded, arrays as None."""
        if vtype in _SCALAR_BYTES:
            return self.take(_SCALAR_BYTES[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY or depth > 2:
            self.fail(f"{what} has value type {vtype}, which GGUF does not define here")
        itype = self.u32(f"{what}'s item type")
        n = self.u64(f"{what}'s length")
        if itype in _SCALAR_BYTES:
            self.take(self.count(n, _SCALAR_BYTES[itype], what) * _SCALAR_BYTES[itype], what)
            return None
        for _ in range(self.count(n, 8 if itype == _STRING else 12, what)):
            self.value(itype, what, depth + 1)
        return None

    def walk(self) -> None:
        if self.take(4, "the magic") != b"GGUF":
            self.fail("no GGUF magic")
        version = self.u32("the version")
        if version not in (2, 3):
            self.fail(f"GGUF version {version}; jaxft reads versions 2 and 3")
        n_tensors, n_kv = self.u64("the tensor count"), self.u64("the metadata count")
        self.count(n_kv, 13, "the metadata count")  # key length, a key byte, the type, a value byte at least
        alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        for i in range(n_kv):
            key = self.string(f"metadata key #{i}")
            vtype = self.u32(f"metadata {key[:60]!r}'s type")
            value = self.value(vtype, f"metadata {key[:60]!r}")
            if key == "general.alignment":
                alignment = int.from_bytes(value, "little") if vtype == 4 else 0
                if alignment == 0 or alignment & (alignment - 1):
                    self.fail("general.alignment is not a uint32 power of two")
        self.count(n_tensors, 24, "the tensor count")  # name length, dimension count, type, offset at least
        spans = []
        for i in range(n_tensors):
            name = self.string(f"tensor #{i}'s name")[:80]
            n_dims = self.u32(f"tensor {name}'s dimension count")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                self.fail(f"tensor {name} has {n_dims} dimensions (1 to {GGML_MAX_DIMS})")
            dims = [self.u64(f"tensor {name}'s dimensions") for _ in range(n_dims)]
            qtype = self.u32(f"tensor {name}'s type")
            offset = self.u64(f"tensor {name}'s offset")
            try:
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
            except (ValueError, KeyError):
                self.fail(f"tensor {name} has type {qtype}, which GGML does not define")
            if dims[0] % block:
                self.fail(f"tensor {name}'s rows of {dims[0]} values do not split into blocks of {block}")
            spans.append((offset, math.prod(dims) * type_size // block, name))  # Python ints: no overflow
        start = -(-self.pos // alignment) * alignment
        for offset, n_bytes, name in spans:
            if offset % alignment:
                self.fail(f"tensor {name}'s offset {offset} is not a multiple of the alignment {alignment}")
            if start + offset + n_bytes > len(self.data):
                self.fail(f"tensor {name} ends at byte {start + offset + n_bytes}, the file has {len(self.data)}")
        spans.sort()
        at = 0  # as every GGUF writer lays them out: back to back, each padded to the alignment
        for offset, n_bytes, name in spans:
            if offset != at:
                self.fail(f"tensor {name} at offset {offset} {'overlaps the one before' if offset < at else 'leaves a gap'}"
                          f" (expected {at})")
            at = -(-(offset + n_bytes) // alignment) * alignment


def _check_structure(path: Path) -> None:
    """`_Header.walk` over the file, mapped read-only."""
    import mmap

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise JaxftError(f"{path}: not a valid GGUF file, damaged or truncated (only {size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _Header(path, data).walk()


class GGUFSource:
    """A GGUF checkpoint seen as a Hugging Face state dict, read lazily.

    Attributes:
        path: the .gguf file.
        hf_config: the transformers config transformers itself builds from the file's metadata
            (e.g. a `LlamaConfig`), computed on first use.
    """

    def __init__(self, path):
        self.path = _check_gguf_file(path)
        _check_structure(self.path)
        try:
            self._reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader raises whatever numpy raises on a damaged file
            cause = " ".join(str(e).split())[:200] or type(e).__name__
            raise JaxftError(f"{self.path}: not a valid GGUF file, damaged or truncated ({cause})") from None
        self._arch = self._metadata("general.architecture")
        if not isinstance(self._arch, str) or self._arch not in _ARCHITECTURES:
            raise JaxftError(
                f"{self.path}: GGUF architecture {self._arch!r} is not supported by jaxft "
                f"(supported: {', '.join(_ARCHITECTURES)})"
            )
        self._check_rope_scaling()
        self._tensors = {}  # HF name -> gguf ReaderTensor, in file order
        for tensor in self._reader.tensors:
            self._tensors[self._check_tensor(tensor)] = tensor

    def _metadata(self, key: str, default=None):
        field = self._reader.fields.get(key)
        try:
            return default if field is None else field.contents()
        except Exception as e:  # noqa: BLE001 — a value the reader cannot decode (damaged text)
            raise JaxftError(f"{self.path}: metadata {key}: cannot be read ({type(e).__name__})") from None

    def _check_rope_scaling(self) -> None:
        """Refuse rope scaling, which transformers' GGUF loader ignores for these architectures."""
        kind = self._metadata(f"{self._arch}.rope.scaling.type", "none")
        if kind != "none":
            raise JaxftError(f"{self.path}: rope scaling {kind!r} in a GGUF file is not supported by jaxft")
        if "rope_freqs.weight" in (t.name for t in self._reader.tensors):
            raise JaxftError(
                f"{self.path}: tensor rope_freqs.weight (llama3-style rope scaling) is not supported by jaxft"
            )

    def _check_tensor(self, tensor) -> str:
        """The HF name of a GGUF tensor, after checking jaxft can name and dequantize it."""
        qtype = tensor.tensor_type
        if not _can_dequantize(qtype):
            raise JaxftError(
                f"{self.path}: tensor {tensor.name} has type {qtype.name} which jaxft cannot dequantize"
            )
        name = _hf_name(tensor.name)
        if name is None:
            raise JaxftError(
                f"{self.path}: tensor {tensor.name} has no Hugging Face counterpart for architecture {self._arch}"
            )
        return name

    @functools.cached_property
    def hf_config(self) -> "transformers.PretrainedConfig":  # noqa: F821
        from transformers import AutoConfig  # (transformers imports torch: only where a GGUF is read)

        try:
            return AutoConfig.from_pretrained(str(self.path.parent), gguf_file=self.path.name, local_files_only=True)
        except Exception as e:  # noqa: BLE001 — transformers' GGUF mapping raises anything on odd metadata
            cause = " ".join(str(e).split())[:160] or type(e).__name__
            raise JaxftError(f"{self.path}: transformers cannot build a model config from this GGUF's metadata "
                             f"({type(e).__name__}: {cause})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's HF shape ([out, in] for linear weights), without reading it."""
        return tuple(int(d) for d in reversed(self._tensors[name].shape.tolist()))

    def keys(self) -> list[str]:
        """HF tensor names in file order; "lm_head.weight" only if the file has output.weight."""
        return list(self._tensors)

    def get(self, name: str) -> np.ndarray:
        """One tensor as a new float32 array in HF layout: [out, in] for linear weights.

        Example: get("model.embed_tokens.weight").shape == (vocab, hidden)
        """
        tensor = self._tensors.get(name)
        if tensor is None:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # [rows, cols] = HF [out, in]
        if _ARCHITECTURES[self._arch] and ".attn_q." in tensor.name:
            w = _unpermute_rows(w, self._n_heads)
        elif _ARCHITECTURES[self._arch] and ".attn_k." in tensor.name:
            w = _unpermute_rows(w, self._n_kv_heads)
        return np.array(w, dtype=np.float32)  # a copy: never a read-only view of the mapped file

    @functools.cached_property
    def _n_heads(self) -> int:
        return self._heads(f"{self._arch}.attention.head_count", None)

    @functools.cached_property
    def _n_kv_heads(self) -> int:
        # llama.cpp permutes K with n_head when the file states no KV head count.
        return self._heads(f"{self._arch}.attention.head_count_kv", self._n_heads)

    def _heads(self, key: str, default) -> int:
        n = self._metadata(key, default)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise JaxftError(f"{self.path}: metadata {key}={str(n)[:40]}: expected a positive integer")
        return n


def load_gguf_tokenizer(path):
    """The transformers tokenizer a GGUF file describes, chat template included.

    transformers builds it from the vocabulary, merges, special token ids and
    `tokenizer.chat_template` stored in the file's metadata.
    """
    from transformers import AutoTokenizer

    path = _check_gguf_file(path)
    _check_structure(path)
    try:  # from an empty directory: transformers prefers tokenizer files lying next to the GGUF to its own
        with tempfile.TemporaryDirectory(prefix="jaxft-gguf-") as empty:
            return AutoTokenizer.from_pretrained(empty, gguf_file=str(path.absolute()), local_files_only=True)
    except Exception as e:  # noqa: BLE001 — transformers' GGUF tokenizer raises anything on damaged metadata
        cause = " ".join(str(e).split())[:200] or type(e).__name__
        raise JaxftError(f"{path}: cannot build a tokenizer from this GGUF file ({cause})") from None


# ---------------------------------------------------------------- export: a merged model as one GGUF file
#
# What llama.cpp's own converter (convert_hf_to_gguf.py) writes, from arrays in HF layout: tensor names
# from gguf-py's TensorNameMap, Q/K rows permuted for llama.cpp's interleaved rope (arch `llama` only),
# Gemma norms stored as 1 + w, 1-D tensors and norms in F32, the rest in the requested type.

# HF model_type → (llama.cpp architecture, Q/K rows permuted)
EXPORT_ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
                        "qwen3": ("qwen3", False), "gemma": ("gemma", False), "gemma2": ("gemma2", False),
                        "gemma3_text": ("gemma3", False)}
GEMMA3_SWA_PATTERN = 6  # llama.cpp's gemma3 default when the file states none: every 6th layer global
GGUF_TYPES = {"f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
              "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
              "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
              "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
# tokenizer.ggml.pre names llama.cpp's pre-tokenizer (how text is split before the merges); for BPE
# vocabularies of an HF directory it is read off tokenizer.json's pre_tokenizer (a GGUF base keeps its own)
PRE_BY_SHAPE = {("ByteLevel",): "gpt-2", ("Digits", "ByteLevel"): "smollm"}
PRE_NAMES = ("llama-bpe", "qwen2", "tekken", "gpt-4o")  # preferred among the names of one split regex


def bpe_pre(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for an HF tokenizer.json pre_tokenizer: a Split by a known regex (the table of
    transformers' own GGUF tokenizer loader, read backwards) or a known shape; JaxftError otherwise."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    parts = (pre_tokenizer or {}).get("pretokenizers") if (pre_tokenizer or {}).get("type") == "Sequence" \
        else [pre_tokenizer or {}]
    shape = tuple(p.get("type") for p in parts)
    regexes = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    if shape == ("Split", "ByteLevel") and regexes[0]:
        names = [n for n, r in GGUF_PRE_TOKENIZER_SPLITS.items() if r == regexes[0]]
        if names:
            return next((n for n in PRE_NAMES if n in names), names[0])
    if shape in PRE_BY_SHAPE and (shape != ("ByteLevel",) or parts[0].get("use_regex", True)):
        return PRE_BY_SHAPE[shape]
    raise JaxftError(f"GGUF export: tokenizer.json pre_tokenizer {json.dumps(pre_tokenizer)[:120]} has no "
                     f"llama.cpp name jaxft knows; llama.cpp would split text differently")


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half row order → llama.cpp's interleaved pairs (the inverse of `_unpermute_rows`)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def export_arch(hf_config) -> tuple[str, bool]:
    """(llama.cpp architecture, permute Q/K) for a transformers config, or a JaxftError naming what llama.cpp
    cannot represent."""
    mt = hf_config.model_type
    if mt not in EXPORT_ARCHITECTURES:
        raise JaxftError(f"GGUF export: model_type {mt!r} is not supported (supported: "
                         f"{', '.join(EXPORT_ARCHITECTURES)})")
    rope = _rope_parameters(hf_config)
    kind = rope.get("rope_type", "default")
    if kind not in ("default", "linear", "llama3"):
        raise JaxftError(f"GGUF export: rope_type {kind!r} is not supported")
    if mt.startswith("gemma"):
        _check_gemma(hf_config)
    window = getattr(hf_config, "sliding_window", None)
    windowed = getattr(hf_config, "use_sliding_window", False) if mt.startswith("qwen") else window is not None
    if mt not in ("gemma2", "gemma3_text") and windowed and window and window < hf_config.max_position_embeddings:
        raise JaxftError(f"GGUF export: {mt} sliding_window={window} is not represented in llama.cpp's "
                         f"{EXPORT_ARCHITECTURES[mt][0]} architecture")
    return EXPORT_ARCHITECTURES[mt]


def _check_gemma(c) -> None:
    """What llama.cpp's gemma / gemma2 / gemma3 graphs hard-code and an HF config may say otherwise."""
    mt = c.model_type
    act = getattr(c, "hidden_activation", None) if mt != "gemma" else getattr(c, "hidden_act", None)
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise JaxftError(f"GGUF export: {mt} activation {act!r}: llama.cpp's gemma graphs use the tanh GELU")
    if mt in ("gemma", "gemma2") and not c.tie_word_embeddings:  # their graphs read no output.weight
        raise JaxftError(f"GGUF export: {mt} tie_word_embeddings=false: llama.cpp's {mt} uses the embeddings "
                         f"as the output head")
    if mt != "gemma" and c.query_pre_attn_scalar != c.head_dim:
        raise JaxftError(f"GGUF export: {mt} query_pre_attn_scalar={c.query_pre_attn_scalar} "
                         f"differs from head_dim={c.head_dim}; llama.cpp scales attention by 1/sqrt(head_dim)")
    if mt == "gemma3_text":
        if c.attn_logit_softcapping:
            raise JaxftError(f"GGUF export: gemma3 attn_logit_softcapping={c.attn_logit_softcapping}: llama.cpp's "
                             f"gemma3 has no attention soft-cap")
        local = dict((getattr(c, "rope_parameters", None) or {}).get("sliding_attention") or {})
        if local.get("rope_type", "default") != "default":
            raise JaxftError(f"GGUF export: gemma3 sliding_attention rope_type {local['rope_type']!r}: llama.cpp "
                             f"scales no sliding-layer rope")


def _gemma3_swa_layers(c) -> list[bool] | None:
    """Which layers slide, when that is not llama.cpp's default pattern (so the file must say it)."""
    swa = [t == "sliding_attention" for t in c.layer_types]
    n = GEMMA3_SWA_PATTERN
    return None if swa == [i % n < n - 1 for i in range(len(swa))] else swa


def _rope_parameters(hf_config) -> dict:
    """The rope of the (full-attention) layers: llama.cpp's `rope.*` keys describe these."""
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope = dict(rope.get("full_attention", rope))
    rope.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return rope


def _llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's `rope_freqs.weight` for llama3 rope scaling: one factor per frequency (head_dim / 2)."""
    base, factor = rope["rope_theta"], rope["factor"]
    low, high, old = rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * np.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    out = np.where(wavelen < old / high, 1.0,
                   np.where(wavelen > old / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return out.astype(np.float32)


def _metadata(w: gguf.GGUFWriter, hf_config, arch: str, file_type, name: str):
    c = hf_config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    w.add_type("model")
    w.add_name(name)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(getattr(c, "num_key_value_heads", None) or heads)
    rope = _rope_parameters(c)
    if arch != "gemma" or rope["rope_theta"] != 10000.0:  # the converter's gemma writes none: llama.cpp's default
        w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    if getattr(c, "head_dim", None):  # as the converter: whenever the config states it
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "llama":
        w.add_vocab_size(c.vocab_size)
        w.add_rope_dimension_count(head_dim)
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    if arch == "gemma2":
        w.add_attn_logit_softcapping(float(c.attn_logit_softcapping or 0.0))
        w.add_final_logit_softcapping(float(c.final_logit_softcapping or 0.0))
        w.add_sliding_window(int(c.sliding_window))
    if arch == "gemma3":
        local = (getattr(c, "rope_parameters", None) or {}).get("sliding_attention")
        if local and "rope_theta" in local:
            w.add_rope_freq_base_swa(float(local["rope_theta"]))
        if c.final_logit_softcapping:
            w.add_final_logit_softcapping(float(c.final_logit_softcapping))
        if "sliding_attention" in c.layer_types:
            w.add_sliding_window(int(c.sliding_window))
            if (swa := _gemma3_swa_layers(c)) is not None:  # the converter leaves llama.cpp's default pattern
                w.add_sliding_window_pattern(swa)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _looks_special(text: str) -> bool:
    """The converter's `does_token_look_special`: added tokens some models leave unmarked as special."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>")) or (text.startswith("<unused") and text.endswith(">")))


def _sentencepiece(w: gguf.GGUFWriter, d: Path, hf_config, arch: str):
    """A SentencePiece vocabulary (tokenizer.model) as the converter writes it for the gemma family: pieces,
    scores and types padded to the embedding rows, added tokens over them (`_set_vocab_sentencepiece`), then
    Gemma's end-of-turn id and no space prefix (`GemmaModel.set_vocab`...)."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    T, n = gguf.TokenType, hf_config.vocab_size
    tokens, scores, types = [f"[PAD{i}]" for i in range(n)], [-10000.0] * n, [T.UNUSED] * n
    for i in range(min(sp.vocab_size(), n)):
        kind = (T.UNKNOWN if sp.IsUnknown(i) else T.CONTROL if sp.IsControl(i) else T.UNUSED if sp.IsUnused(i)
                else T.BYTE if sp.IsByte(i) else T.NORMAL)
        tokens[i], scores[i], types[i] = sp.IdToPiece(i), sp.GetScore(i), kind
    added = json.loads((d / "added_tokens.json").read_text()) if (d / "added_tokens.json").is_file() else {}
    for text, i in added.items():
        if i < n:
            tokens[i], scores[i], types[i] = text, -1000.0, T.USER_DEFINED
    config = d / "tokenizer_config.json"
    for i, t in (json.loads(config.read_text()).get("added_tokens_decoder", {}) if config.is_file() else {}).items():
        i, text = int(i), t["content"]
        if i < n:
            special = t.get("special") or _looks_special(text)
            tokens[i], scores[i] = text if special else text.replace("\u2581", " "), -1000.0
            types[i] = T.CONTROL if special else T.USER_DEFINED
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(d, n_vocab=n).add_to_gguf(w, quiet=True)
    if arch == "gemma":  # the converter's CodeGemma ids; only eot has a key in this gguf-py
        special = gguf.SpecialVocab(d, load_merges=False, special_token_types=["eot"])
        special._set_special_token("eot", 107)
        special.chat_template = None  # written above
        special.add_to_gguf(w, quiet=True)
    w.add_add_space_prefix(False)


def _tokenizer(w: gguf.GGUFWriter, tokenizer, hf_config, source: Path | None, arch: str = ""):
    """tokenizer.ggml.*: copied field by field from a GGUF base; from the HF tokenizer files otherwise
    (a gemma family's tokenizer.model as SentencePiece, like the converter; else tokenizer.json's BPE)."""
    if source is not None and source.suffix == ".gguf":
        reader = gguf.GGUFReader(source)
        for key, field in reader.fields.items():
            if key.startswith("tokenizer."):
                vtype = field.types[0]
                sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
                w.add_key_value(key, field.contents(), vtype, sub_type=sub)
        return
    if arch.startswith("gemma") and source is not None and (source / "tokenizer.model").is_file():
        return _sentencepiece(w, source, hf_config, arch)
    with tempfile.TemporaryDirectory() as d:
        if source is not None and (source / "tokenizer.json").is_file():
            d = source  # the original files: what they say (add_bos_token, ...) survives no re-save
        else:
            tokenizer.save_pretrained(d)
        if not (Path(d) / "tokenizer.json").is_file():
            raise JaxftError("GGUF export: the tokenizer has no tokenizer.json (only fast BPE tokenizers are "
                             "written; a SentencePiece-only tokenizer is not supported yet)")
        spec = json.loads((Path(d) / "tokenizer.json").read_text())
        model = spec["model"]
        if model.get("type") != "BPE":
            raise JaxftError(f"GGUF export: tokenizer model {model.get('type')!r} is not supported (BPE only)")
        n = hf_config.vocab_size
        vocab = {i: t for t, i in tokenizer.get_vocab().items()}
        added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
        tokens, types = [], []
        for i in range(n):
            if i in added:
                tokens.append(added[i].content)
                types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
            elif i in vocab:
                tokens.append(vocab[i])
                types.append(gguf.TokenType.NORMAL)
            else:  # an embedding row beyond the tokenizer, as the converter pads it
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(bpe_pre(spec.get("pre_tokenizer")))
        w.add_token_list(tokens)
        w.add_token_types(types)
        special = gguf.SpecialVocab(d, load_merges=True, n_vocab=n)
        probe = tokenizer("a")["input_ids"]  # whether the tokenizer adds BOS / EOS, stated explicitly: llama.cpp's
        special.add_special_token.setdefault(  # defaults differ by pre-tokenizer
            "bos", bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)
        special.add_special_token.setdefault(
            "eos", bool(probe) and tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id)
        special.add_to_gguf(w, quiet=True)


def gguf_tensors(tensors, hf_config, gguf_type: str):
    """(GGUF name, array, raw dtype or None) for every HF tensor [out, in] fp32 (a dict, or (name, array) pairs
    as `jaxft.formats.peft.iter_merged` streams them), in llama.cpp's naming, row order, norm convention and
    per-tensor type."""
    arch, permute = export_arch(hf_config)
    qtype = GGUF_TYPES[gguf_type][0]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], hf_config.num_hidden_layers)
    heads = hf_config.num_attention_heads
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    for hf, x in tensors.items() if isinstance(tensors, dict) else tensors:
        base, _, suffix = hf.rpartition(".")
        name = names.get_name(base)
        if name is None:
            raise JaxftError(f"GGUF export: tensor {hf} has no llama.cpp name for architecture {arch}")
        name = f"{name}.{suffix}"
        x = np.asarray(x, np.float32)
        if permute and base.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            x = permute_rows(x, heads if base.endswith("q_proj") else kv)
        if arch.startswith("gemma") and base.endswith("norm"):
            x = x + 1.0  # llama.cpp's gemma multiplies by the stored weight; HF by 1 + w
        if x.ndim == 1 or name.endswith("_norm.weight") or qtype == gguf.GGMLQuantizationType.F32:
            yield name, x, None
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and x.shape[-1] % 32:
            yield name, x.astype(np.float16), None  # rows that do not split into Q8_0 blocks: F16, as the converter
        elif qtype == gguf.GGMLQuantizationType.F16:
            yield name, x.astype(np.float16), None
        else:
            yield name, gguf.quants.quantize(x, qtype), qtype
    rope = _rope_parameters(hf_config)
    if rope.get("rope_type") == "llama3":
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        yield "rope_freqs.weight", _llama3_rope_factors(rope, head_dim), None


def write_gguf(tensors, hf_config, tokenizer, out, *, gguf_type: str = "f16",
               source: Path | None = None, name: str = "jaxft", overwrite: bool = False) -> Path:
    """Write a merged model (HF tensors [out, in], fp32: a dict or (name, array) pairs) as one GGUF file, atomically.

    source: the base checkpoint; a GGUF base gives its tokenizer fields verbatim."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise JaxftError(f"{out}: already exists (pass --overwrite to replace it)")
    if gguf_type not in GGUF_TYPES:
        raise JaxftError(f"--gguf-type {gguf_type!r}: expected one of {', '.join(GGUF_TYPES)}")
    arch, _ = export_arch(hf_config)
    items = list(gguf_tensors(tensors, hf_config, gguf_type))

    def keys(w):
        _metadata(w, hf_config, arch, GGUF_TYPES[gguf_type][1], name)
        _tokenizer(w, tokenizer, hf_config, source, arch)

    return _write(out, arch, keys, items)


def write_gguf_lora(peft_tensors: dict[str, np.ndarray], peft_config: dict, hf_config, out, *,
                    overwrite: bool = False) -> Path:
    """A PEFT LoRA adapter as llama.cpp's `--lora` GGUF: `<base tensor>.lora_a` [r, in] and `.lora_b`
    [out, r] (rows of attn_q / attn_k's B permuted like their base), `adapter.lora.alpha`. llama.cpp scales
    by alpha / r and knows no rsLoRA, so an rsLoRA adapter is written with alpha · sqrt(r)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise JaxftError(f"{out}: already exists (pass --overwrite to replace it)")
    for key, bad, why in (("use_dora", peft_config.get("use_dora"), "llama.cpp cannot apply DoRA"),
                          ("modules_to_save", peft_config.get("modules_to_save"),
                           "llama.cpp LoRA GGUFs hold no full-weight modules"),
                          ("peft_type", peft_config.get("peft_type") != "LORA", "only LoRA has a GGUF LoRA form")):
        if bad:
            raise JaxftError(f"GGUF LoRA export: {key}={peft_config.get(key)!r}: {why}; use --format gguf "
                             f"(the merged model) instead")
    arch, permute = export_arch(hf_config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], hf_config.num_hidden_layers)
    heads = hf_config.num_attention_heads
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    r, alpha = int(peft_config["r"]), float(peft_config["lora_alpha"])
    items = []
    for key, x in peft_tensors.items():
        module, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
        if "embed_tokens" in module or "lm_head" in module:
            raise JaxftError(f"GGUF LoRA export: {module} holds a LoRA; llama.cpp applies none to embeddings / head")
        name = names.get_name(module)
        if name is None:
            raise JaxftError(f"GGUF LoRA export: {module} has no llama.cpp name for architecture {arch}")
        x = np.asarray(x, np.float32)
        if kind == "B.weight" and permute and module.endswith(("q_proj", "k_proj")):
            x = permute_rows(x, heads if module.endswith("q_proj") else kv)
        items.append((f"{name}.weight.lora_{kind[0].lower()}", x))

    def keys(w):
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", alpha * r ** 0.5 if peft_config.get("use_rslora") else alpha)

    return _write(out, arch, keys, [(n, x, None) for n, x in items])


def _write(out: Path, arch: str, keys, items) -> Path:
    """One GGUF file, atomically: keys(writer) adds the metadata, items are (name, array, raw dtype or None)."""
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        keys(w)
        for n, x, raw in items:
            w.add_tensor(n, x, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out

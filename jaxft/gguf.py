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
import re
from pathlib import Path

import gguf
import numpy as np
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from jaxft.errors import JaxftError

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


class GGUFSource:
    """A GGUF checkpoint seen as a Hugging Face state dict, read lazily.

    Attributes:
        path: the .gguf file.
        hf_config: the transformers config transformers itself builds from the file's metadata
            (e.g. a `LlamaConfig`), computed on first use.
    """

    def __init__(self, path):
        self.path = _check_gguf_file(path)
        try:
            self._reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader raises whatever numpy raises on a damaged file
            cause = " ".join(str(e).split()) or type(e).__name__
            raise JaxftError(f"{self.path}: not a valid GGUF file, damaged or truncated ({cause})") from None
        self._arch = self._metadata("general.architecture")
        if self._arch not in _ARCHITECTURES:
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
        return default if field is None else field.contents()

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
    def hf_config(self) -> PretrainedConfig:
        return AutoConfig.from_pretrained(str(self.path.parent), gguf_file=self.path.name, local_files_only=True)

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
        return int(self._metadata(f"{self._arch}.attention.head_count"))

    @functools.cached_property
    def _n_kv_heads(self) -> int:
        # llama.cpp permutes K with n_head when the file states no KV head count.
        return int(self._metadata(f"{self._arch}.attention.head_count_kv", self._n_heads))


def load_gguf_tokenizer(path):
    """The transformers tokenizer a GGUF file describes, chat template included.

    transformers builds it from the vocabulary, merges, special token ids and
    `tokenizer.chat_template` stored in the file's metadata.
    """
    path = _check_gguf_file(path)
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except ValueError as e:
        raise JaxftError(f"{path}: cannot build a tokenizer from this GGUF file ({' '.join(str(e).split())})") from None

"""Bad checkpoints: one-line errors naming the path and the cause, from the library and the CLI."""

import json
import shutil
import subprocess
import sys

import pytest

from jaxft.formats.hf import load_pretrained
from jaxft.errors import JaxftError
from tiny import save_model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    save_model("llama", d)
    return d


def _copy(good, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(good, d)
    return d


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _missing(good, tmp_path):
    return tmp_path / "nope", "no such file or directory"


def _model_type(good, tmp_path):
    d = _copy(good, tmp_path)
    _edit_config(d, model_type="gpt2")
    return d, "unsupported model_type 'gpt2'"


def _rope_type(good, tmp_path):
    d = _copy(good, tmp_path)
    _edit_config(d, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                     "original_max_position_embeddings": 64})
    return d, "rope_parameters.rope_type='yarn' is not implemented"


def _activation(good, tmp_path):
    d = _copy(good, tmp_path)
    _edit_config(d, hidden_act="relu2")
    return d, "hidden_act='relu2' is not implemented"


def _truncated(good, tmp_path):
    d = _copy(good, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    return d, "model.safetensors: truncated safetensors file"


def _escaping_index(good, tmp_path):
    d = _copy(good, tmp_path)
    names = json.loads((d / "model.safetensors")
                       .read_bytes()[8:8 + int.from_bytes((d / "model.safetensors").read_bytes()[:8], "little")])
    names.pop("__metadata__", None)
    outside = tmp_path / "outside.safetensors"
    (d / "model.safetensors").rename(outside)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "../outside.safetensors" for n in names}}))
    return d, "points outside the model directory"


def _pickle_only(good, tmp_path):
    d = _copy(good, tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not read")
    return d, "pickle files are never read"


def _missing_tensor(good, tmp_path):
    d = _copy(good, tmp_path)
    _edit_config(d, num_hidden_layers=4)
    return d, "tensor model.layers.3."


def _wrong_shape(good, tmp_path):
    d = _copy(good, tmp_path)
    _edit_config(d, intermediate_size=100)
    return d, "the config implies"


CASES = [_missing, _model_type, _rope_type, _activation, _truncated, _escaping_index, _pickle_only,
         _missing_tensor, _wrong_shape]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__.strip("_"))
def test_library_error(case, good, tmp_path):
    path, cause = case(good, tmp_path)
    with pytest.raises(JaxftError) as e:
        model = load_pretrained(path)
        import jax

        jax.block_until_ready(jax.tree.leaves(model))
    msg = str(e.value)
    assert "\n" not in msg
    assert cause in msg
    assert str(path) in msg or path.name in msg


@pytest.mark.parametrize("case", [_missing, _model_type, _truncated, _escaping_index], ids=lambda c: c.__name__.strip("_"))
def test_cli_error_has_no_traceback(case, good, tmp_path):
    path, cause = case(good, tmp_path)
    r = subprocess.run([sys.executable, "-m", "jaxft.cli", "generate", str(path), "--prompt", "hi"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.startswith("jaxft: error:")]
    assert len(lines) == 1 and cause in lines[0]
    assert "Traceback" not in r.stderr


def test_cli_bad_arguments(good):
    r = subprocess.run([sys.executable, "-m", "jaxft.cli", "generate", str(good), "--prompt", "hi",
                        "--max-new-tokens", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--max-new-tokens must be >= 1" in r.stderr and "Traceback" not in r.stderr

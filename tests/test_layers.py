"""The layer table (jaxft/layers.py) holds: every import in jaxft/ — function bodies included — goes down the
table or stays in its layer, never around a cycle; only the CLI defers its own imports; no module borrows
another's private name; config and data parsing import no jax. Pure `ast` reading, no jaxft import but the
table itself."""

import shutil
import subprocess
import sys
from pathlib import Path

from jaxft.layers import NO_JAX, module_name, violations

PKG = Path(__file__).resolve().parent.parent / "jaxft"


def test_imports_go_down_the_layer_table():
    bad = violations(PKG)
    assert not bad, "\n".join(bad)


def test_the_check_fails_on_an_upward_import_inside_a_function(tmp_path):
    """The check itself can fail: a copy of the package with one upward import hidden in a function body."""
    root = tmp_path / "jaxft"
    shutil.copytree(PKG, root, ignore=shutil.ignore_patterns("__pycache__"))
    f = root / "files.py"
    f.write_text(f.read_text() + "\n\ndef _sneaky():\n    from jaxft.commands.train import train\n\n    return train\n")
    bad = violations(root)
    assert any("jaxft/files.py" in b and "a layer above it" in b for b in bad), bad
    assert any("jaxft/files.py" in b and "inside a function" in b for b in bad), bad
    assert any(b.startswith("import cycle") for b in bad), bad  # commands → ... → files → commands


def test_config_and_data_import_no_jax():
    """Parsing a config or a data file loads no accelerator stack (fast start-up, usable without jax)."""
    mods = sorted(module_name(f, PKG) for f in PKG.rglob("*.py")
                  if any(module_name(f, PKG).startswith(p) for p in NO_JAX))
    code = ("import sys\n" + "".join(f"import {m}\n" for m in mods) +
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('jax', 'jaxlib', 'flax', 'optax', 'orbax', 'torch', 'transformers')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"importing {', '.join(mods)} loaded {r.stdout.strip()}"


def test_commands_start_without_torch_or_transformers():
    """A command's start-up imports jaxft's layers, not PyTorch: transformers (which imports torch) loads only
    where a tokenizer, an HF config or a GGUF's metadata is read (every `jaxft` process pays its import)."""
    # lm-evaluation-harness imports torch itself: only `jaxft lm-eval` (commands.lm_eval, an optional extra) pays it
    mods = sorted(module_name(f, PKG) for f in (PKG / "commands").glob("*.py")
                  if f.stem != "lm_eval") + ["jaxft.cli"]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in mods) +
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'datasets')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"importing the commands loaded {r.stdout.strip()}"

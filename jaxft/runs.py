"""Reading a finished run back: its config, its model with the trained weights, and its adapters as a bank.

    run = read_config("runs/quickstart")          # jaxft.config: a run directory (its config.json) or a YAML file
    done = load_run(run)                          # Loaded(run, setup, params, meta): the newest checkpoint
    model = done.model()                          # nnx.merge(graphdef, params, frozen)
    names = load_bank(model, ["math=runs/math", "peft/json"], base=path)   # --adapter sources as one bank

Every command that starts from a trained run (eval, export, score, cai, merge-adapters, PPO's reward model)
reads it here: config.json → jaxft.setup.build → the trainable weights of the newest checkpoint that restores.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
from flax import nnx

from jaxft import adapters
from jaxft.adapters import bank
from jaxft.checkpoint import restore_trainable
from jaxft.config import RunConfig, read_config
from jaxft.errors import JaxftError
from jaxft.formats.peft import adapter_files, base_identity, load_adapter
from jaxft.quant import original_base_run
from jaxft.setup import Setup, build, resolve_model


def is_run(d: str | Path) -> bool:
    """A jaxft run directory: its config.json and a checkpoints folder."""
    d = Path(d)
    return (d / "config.json").is_file() and (d / "checkpoints").is_dir()


@dataclasses.dataclass
class Loaded:
    """A run as built from its config, with the trainable weights of its newest checkpoint."""

    run: RunConfig
    setup: Setup  # setup.params: the weights the run started from (the base model for a fresh adapter)
    params: object  # the trained weights (the checkpoint's), shaped and placed like setup.params
    meta: dict  # the checkpoint's meta: step, data position, config

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def model(self):
        """The trained model (graph + trained weights + the frozen base)."""
        return nnx.merge(self.setup.graphdef, self.params, self.setup.frozen)


def load_run(run: RunConfig | str | Path, *, mesh=None, unquantized: bool = False, restore: bool = True) -> Loaded:
    """Build the run's model and read its trained weights back (the one place that does).

    run: a RunConfig (its train.out_dir holds the checkpoints) or a run directory. unquantized: a quantized
    base is re-read in fp32 (a merged export folds the adapter into the original weights, never into 4-bit
    codes; the trainable tree is the same, so the checkpoint restores unchanged). restore=False: the model
    as the run starts (no checkpoint needed; params are the initial weights, meta is empty)."""
    if not isinstance(run, RunConfig):
        run = read_config(run)
    if unquantized:
        run = original_base_run(run)
    setup = build(run, mesh)
    if not restore:
        return Loaded(run, setup, setup.params, {})
    params, meta = restore_trainable(run.train.out_dir, setup.params)
    return Loaded(run, setup, params, meta)


# ---------------------------------------------------------------- adapters as sources of a bank (--adapter)


def _is_peft(d: Path) -> bool:
    return (d / "adapter_config.json").is_file()


def expand(specs: list[str]) -> list[tuple[str, Path]]:
    """--adapter values → (name, directory): NAME=DIR, or a bare DIR that names its adapters itself (a PEFT
    multi-adapter folder: `default` at its root, others in sub-folders; a jaxft multi-adapter run: its
    adapters' names; a single adapter: the folder's name)."""
    out = []
    for s in specs:
        name, sep, d = s.partition("=")
        if not sep:
            name, d = "", s
        path = Path(d).expanduser()
        if not path.is_dir():
            raise JaxftError(f"--adapter {s}: {path}: no such directory")
        if name:
            out.append((name, path))
            continue
        subs = sorted(p for p in path.iterdir() if p.is_dir() and _is_peft(p))
        if _is_peft(path) or subs:
            out += ([("default" if subs else path.name, path)] if _is_peft(path) else []) + [(p.name, p) for p in subs]
        elif is_run(path):
            run = read_config(path)
            out += [(a.name, path) for a in run.adapters] or [(path.name, path)]
        else:
            raise JaxftError(f"--adapter {s}: {path} is neither a PEFT adapter directory nor a jaxft run")
    return out


def load_entries(model, sources: list[tuple[str, Path]], base: str = "") -> list[bank.Entry]:
    """Read each (name, directory) into a bank Entry, using `model` (its adapter slots are left empty) for the
    shape checks of jaxft.formats.peft.load_adapter. base: the base model's path, checked against jaxft runs'."""
    for _, lin in adapters.targets(model, ("all-linear",)):  # start from the bare base
        lin.adapter = None
    entries, runs = [], {}
    for name, d in sources:
        if _is_peft(d):
            c, _ = adapter_files(d)
            cfg = load_adapter(model, d)
            entries.append(bank.Entry(name, cfg, bank.harvest(model), base_identity(c.get("base_model_name_or_path") or ""),
                                      str(d)))
        elif is_run(d):
            if d not in runs:
                runs[d] = run_adapters(model, d, base)
            got = runs[d]
            match = [e for e in got if e.name == name] or (got if len(got) == 1 else [])
            if not match:
                raise JaxftError(f"--adapter {name}={d}: the run has no adapter {name!r} "
                                 f"(it has {', '.join(e.name for e in got)})")
            entries.append(dataclasses.replace(match[0], name=name))
        else:
            raise JaxftError(f"{d}: neither a PEFT adapter directory (adapter_config.json) nor a jaxft run")
    return entries


def run_adapters(model, d: Path, base: str = "") -> list[bank.Entry]:
    """The adapter(s) of a jaxft run's newest checkpoint, read onto `model`'s base (no second base model is
    built: only the adapter weights are restored)."""
    run = read_config(d)
    trained_on = base_identity(str(resolve_model(run.model.path)))
    if base and trained_on != base_identity(base):
        raise JaxftError(f"{d}: the run trained on {trained_on}, not on the base {base} (adapters of different bases)")
    if run.adapters:
        bank.install(model, bank.fresh_entries(model, run))
    elif run.lora.enabled and adapters.method_of(run.lora) == "lora" and not run.lora.modules_to_save:
        adapters.attach(model, run.lora, jax.random.key(0))
    else:
        raise JaxftError(f"{d}: only LoRA runs (no DoRA / IA3 / PiSSA / modules_to_save / full fine-tuning) can "
                         "join an adapter bank")
    _, params, _ = nnx.split(model, nnx.LoRAParam, ...)
    restored, _ = restore_trainable(d, params)
    nnx.update(model, restored)
    if not run.adapters:
        return [bank.Entry(d.name, run.lora, bank.harvest(model), trained_on, str(d))]
    out = []
    for n, spec in enumerate(run.adapters):
        saved = bank.views(model, n)
        out.append(bank.Entry(spec.name, bank.spec_lora(run, spec), bank.harvest(model), trained_on, str(d)))
        bank.restore(model, saved)
    for _, lin in bank.banks(model):
        lin.adapter = None
    return out


def load_bank(model, specs: list[str], base: str = "", sources: list[tuple[str, Path]] | None = None) -> tuple[str, ...]:
    """Install the bank of `--adapter` values (NAME=DIR or DIR) under `model`; returns the adapter names.
    sources: `expand(specs)`, when the caller already has it (read before the model loaded)."""
    entries = load_entries(model, sources if sources is not None else expand(specs), base)
    bank.install(model, entries)
    return tuple(e.name for e in entries)

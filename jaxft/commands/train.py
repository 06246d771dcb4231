"""`jaxft train CONFIG [key=value ...] [--resume | --restart]`: the whole run of `run.objective`.

    last = train(run, resume=True)     # the last logged row

Load (setup.build, on the mesh) → the objective's batch source and loss → optimizer and train state →
resume from the newest checkpoint that restores → jaxft.train.loop → the loss plot. See docs/fine-tuning.md
for the run directory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax

from jaxft import objectives, sharding
from jaxft.checkpoint import Checkpoints, restore_trainable
from jaxft.commands.evaluate import regression
from jaxft.config import RunConfig, check_files
from jaxft.config.objectives import head_of
from jaxft.distributed import is_primary
from jaxft.errors import JaxftError
from jaxft.files import write_json
from jaxft.optim import lr_schedules, run_optimizer
from jaxft.regression import Variant
from jaxft.runlog import RunLog, plot_losses
from jaxft.setup import build
from jaxft.train import init_state, loop, make_train_step


def train(run: RunConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """The whole run of `run.objective`; returns the last logged row. See README 'Training' for the run
    directory."""
    check_files(run)
    objectives.check_data(run)  # wrong columns: said now, not after the model load
    mesh, primary = sharding.command_mesh(run.mesh), is_primary()
    progress = progress and primary
    out = Path(run.train.out_dir)
    ckpts_dir = out / "checkpoints"
    if ckpts_dir.exists() and any(ckpts_dir.iterdir()) and not resume:
        raise JaxftError(f"{out}: already holds checkpoints; pass --resume to continue from the newest, --restart "
                         f"to train from step 0 (the old checkpoints are kept aside), or choose another train.out_dir")
    out.mkdir(parents=True, exist_ok=True)
    setup = build(run, mesh)
    say = (lambda *a: print(*a, file=sys.stderr)) if progress else (lambda *a: None)
    obj = objectives.make(run, setup, say, lambda b: sharding.ShardedBatches(b, mesh))

    tx = run_optimizer(run, run.train.steps, setup.params)
    state, state_sh = sharding.sharded_init(lambda p: init_state(p, tx), setup.params, mesh, run.mesh.strategy)
    ckpts = Checkpoints(out, run.train.keep)
    start = 0
    if resume:
        restored = ckpts.restore_latest(jax.tree.map(  # onto this run's mesh, whatever mesh saved it
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state, state_sh))
        if restored is not None:
            state, meta = restored
            start = int(meta["step"])
            if start >= run.train.steps:  # nothing to train: say so, and report the run's last figures
                obj.train.close()
                ckpts.close()
                if primary:
                    print(f"jaxft: {out} is already trained to step {start} (train.steps={run.train.steps}); "
                          "nothing to do: raise train.steps to train further, or --restart to start over",
                          file=sys.stderr)
                return finished_row(out, start)
            if hasattr(obj.train, "load_data_state"):  # a stream restarts where the checkpoint's step left it
                obj.train.load_data_state(meta.get("data_state"), start)
            elif "data_state" in meta:
                raise JaxftError(f"checkpoint {start} holds a data position (a streamed run's) that this run's data "
                                 "source cannot take: resume with data.streaming=true, or --restart")
            say(f"resumed from {ckpts.dir / str(start)} (step {start})")
    step_fn = make_train_step(setup.graphdef, tx, obj.loss_fn, seed=run.train.seed,
                              dropout=run.lora.enabled and run.lora.dropout > 0,
                              lr_schedule=lr_schedules(run, run.train.steps),
                              out_shardings=(state_sh, sharding.replicated(mesh)))
    if primary:
        write_json(out / "config.json", run.to_dict())
    log = RunLog(out, start, run, obj, primary, progress)
    try:
        with jax.set_mesh(mesh):  # activations follow the batch split (jaxft.models.decoder.constrain_batch)
            loop(run, obj, step_fn, state, setup.frozen, start, ckpts, log, say)
    finally:
        obj.train.close()
        log.close()
        ckpts.close()
    if primary:
        plot_losses(out / "metrics.jsonl", out / "loss.png", obj.progress)
    last = log.last
    if run.eval.regression_after_training and jax.process_count() == 1 and head_of(run) != "score":
        last = {**last, **final_regression(run, setup, out, say if progress else None)}
    say(f"run directory: {out}  (checkpoints/, metrics.jsonl, tensorboard/, loss.png)")
    return last


def final_regression(run: RunConfig, setup, out: Path, say=None) -> dict:
    """The regression check of the finished run (its newest checkpoint against the starting weights, as `jaxft
    eval` computes it), written to <out>/regression.json; returns its reg_* figures."""
    params, meta = restore_trainable(out, setup.params)
    base = Variant(setup.graphdef, (setup.params, setup.frozen))
    tuned = Variant(setup.graphdef, (params, setup.frozen))
    got = regression(run, setup.tokenizer, setup.model_path, base, {"tuned": tuned}, progress=say is not None)["tuned"]
    write_json(out / "regression.json", dict(step=int(meta["step"]), **got))
    return got


def finished_row(out: Path, step: int) -> dict:
    """The figures a finished run logged at its last step (metrics.jsonl's rows of that step, merged)."""
    row = {"step": step}
    path = out / "metrics.jsonl"
    try:
        for line in path.read_text().splitlines() if path.is_file() else []:
            r = json.loads(line)
            if isinstance(r, dict) and r.get("step") == step:
                row.update(r)
    except (OSError, ValueError):  # a damaged log: the step alone
        pass
    return row

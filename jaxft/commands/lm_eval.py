"""`jaxft lm-eval`: lm-evaluation-harness tasks on a model, a run (tuned; --base: base and tuned side by side) or
an adapter of a bank, through jaxft.lm_eval.JaxftLM.

    results = lm_eval_command("runs/quickstart", ["jaxft_extract_mc"], include_path="configs/lm_eval", base=True)
    # {"base": simple_evaluate's dict, "tuned": ...}; without base: {"tuned" | the model: ...}

On a mesh (`mesh`, over processes too) the model is sharded over it and every process runs the same requests
(jaxft.lm_eval's module docstring says why); process 0 prints and writes.
"""

from __future__ import annotations

import sys

import lm_eval
from lm_eval.tasks import TaskManager
from lm_eval.utils import make_table

from jaxft import sharding
from jaxft.config import MeshConfig
from jaxft.distributed import is_primary
from jaxft.errors import JaxftError
from jaxft.files import write_json
from jaxft.lm_eval import JaxftLM, results_dict
from jaxft.runs import is_run


def lm_eval_command(model: str, tasks: list[str], *, include_path: str | None = None, num_fewshot: int | None = None,
                    limit: float | None = None, apply_chat_template: bool = False, base: bool = False,
                    output: str | None = None, log_samples: bool = False, adapters: list[str] = (),
                    use: str | None = None, batch_size: int = 16, dtype: str = "fp32", seed: int = 0,
                    mesh: MeshConfig = MeshConfig()) -> dict:
    """Run the tasks, print lm-eval's table per variant (and, with base, one table of both), write the results."""
    tm = TaskManager(include_path=include_path)
    known = set(tm.all_tasks) | set(tm.all_groups) | set(tm.all_tags)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        where = f" (nor in --include-path {include_path})" if include_path else " (give --include-path DIR for your own)"
        raise JaxftError(f"--tasks: no task {unknown[0]!r} in lm-eval's tasks{where}")
    if base and not (is_run(model) or adapters):
        raise JaxftError("--base compares a run (or an --adapter) with its base model: give a run directory")
    lm = JaxftLM(model, adapters=adapters, use=use, dtype=dtype, batch_size=batch_size, seed=seed,
                 mesh=sharding.command_mesh(mesh), strategy=mesh.strategy)
    say = print if is_primary() else (lambda *a, **k: None)
    tuned = use or ("tuned" if is_run(model) or adapters else "model")
    variants = {tuned: None}
    if base:
        variants = {"base": "base", tuned: None}
    out = {}
    for name, which in variants.items():
        lm.select(which)
        res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=tm, log_samples=log_samples,
                                      apply_chat_template=apply_chat_template, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
        out[name] = res
        say(f"\n{name}: {model}" + (f" (adapter {use})" if use and which is None else ""))
        say(make_table(res))
        if "groups" in res:
            say(make_table(res, "groups"))
    if len(out) > 1:
        say(side_by_side(out))
    if output and is_primary():
        got = {k: results_dict(v, log_samples) for k, v in out.items()}
        write_json(output, got[tuned] if len(got) == 1 else got)
        print(f"results: {output}", file=sys.stderr)
    return out


def side_by_side(out: dict) -> str:
    """task · metric · one column per variant · the last minus the first."""
    names = list(out)
    first = out[names[0]]["results"]
    lines = [f"{'task':<24} {'metric':<22}" + "".join(f"{n:>12}" for n in names) + f"{'change':>10}"]
    for task, metrics in first.items():
        for key, v in metrics.items():
            if not isinstance(v, (int, float)) or "stderr" in key or key == "sample_len":
                continue
            vals = [out[n]["results"].get(task, {}).get(key, float("nan")) for n in names]
            lines.append(f"{task:<24} {key:<22}" + "".join(f"{x:>12.4f}" for x in vals) + f"{vals[-1] - vals[0]:>+10.4f}")
    return "\n".join(lines)

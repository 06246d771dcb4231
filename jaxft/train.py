"""The train state, the pure train step, and the plain training loop (which knows no objective by name).

    state, metrics = step(state, frozen, batch)      # jax.jit, state donated

`state` holds only what trains (LoRA factors / modules_to_save / every weight for full fine-tuning),
the optimizer state and counters; `frozen` holds the base weights and is never differentiated.
A step takes `grad_accum` micro-batches [A, B, S]: (loss sum, target count) and gradient sums are
carried across them and divided once, so every target token weighs the same whatever the split.
A step whose loss, gradients, new weights or optimizer state are not finite changes nothing and is counted.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxft.config import RunConfig
from jaxft.context import Ctx
from jaxft.distributed import Preemption
from jaxft.errors import Interrupted
from jaxft.losses import sft_loss
from jaxft.runlog import RunLog

def init_state(params, tx) -> dict:
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731 — distinct buffers: the state is donated
    return dict(params=params, opt_state=tx.init(params), step=zero(), bad_steps=zero(), skipped=zero())


def make_train_step(graphdef, tx, loss_fn: Callable = sft_loss, *, seed: int = 0, dropout: bool = False,
                    lr_schedule: optax.Schedule | dict | None = None, out_shardings=None):
    """The jitted, donated step: (state, frozen, batch [A, B, S]) → (state, metrics).

    lr_schedule: the schedule logged as metrics["lr"], or {metric name: schedule} (a multi-adapter run's
    `lr_<name>`, jaxft.optim.lr_schedules). out_shardings: (state shardings, metrics sharding) keep a sharded
    state in place step to step."""
    schedules = {"lr": lr_schedule} if callable(lr_schedule) else dict(lr_schedule or {})
    base_key = jax.random.key(seed)

    def step(state, frozen, batch):
        params = state["params"]
        key = jax.random.fold_in(base_key, state["step"])

        def f(p, mb, k):  # loss_fn returns (sum, count) or (sum, count, {metric: sum})
            s, c, *aux = loss_fn(nnx.merge(graphdef, p, frozen), mb, Ctx(dropout_key=k))
            return s, (c, aux[0] if aux else {})

        def micro(carry, xs):
            mb, i = xs
            k = jax.random.fold_in(key, i) if dropout else None
            (s, (c, aux)), g = jax.value_and_grad(f, has_aux=True)(params, mb, k)
            return jax.tree.map(jnp.add, carry, (s, c, aux, g)), None

        A = jax.tree.leaves(batch)[0].shape[0]
        aux_shape = jax.eval_shape(f, params, jax.tree.map(lambda x: x[0], batch), None)[1][1]
        zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), aux_shape),
                 jax.tree.map(jnp.zeros_like, params))
        (s, c, aux, g), _ = jax.lax.scan(micro, zeros, (batch, jnp.arange(A)))
        denom = jnp.maximum(c, 1.0)
        loss = s / denom
        grads = jax.tree.map(lambda x: x / denom, g)
        grad_norm = _norm(g) / denom  # of the sums: g / denom then has no third reader to be written out for
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        # Finite gradients can still give non-finite weights (an infinite lr, an update that overflows,
        # Adam moments that overflow): keep the step only if everything it would keep is finite.
        finite &= _all_finite((new_params, opt_state))
        # A bad step changes nothing. lax.cond hands one side's buffers on whole: an elementwise
        # jnp.where(finite, new, old) read both and wrote a third copy of every weight and moment, three
        # passes over 3 × the trainable size each step, which full fine-tuning's 135 M weights feel.
        new_params, opt_state = jax.lax.cond(finite, lambda: (new_params, opt_state),
                                             lambda: (params, state["opt_state"]))
        new_state = dict(
            params=new_params,
            opt_state=opt_state,
            step=state["step"] + 1,
            bad_steps=jnp.where(finite, 0, state["bad_steps"] + 1),
            skipped=state["skipped"] + (~finite).astype(jnp.int32),
        )
        metrics = dict(loss=loss, targets=c, tokens=jnp.sum(batch["segment_ids"] > 0), grad_norm=grad_norm,
                       finite=finite, bad_steps=new_state["bad_steps"], **{k: v / denom for k, v in aux.items()})
        for name, sched in schedules.items():
            metrics[name] = sched(state["step"])
        return new_state, metrics

    return jax.jit(step, donate_argnums=0, **({} if out_shardings is None else dict(out_shardings=out_shardings)))


def _norm(tree) -> jax.Array:
    """The global L2 norm (fp32). Each leaf's Σ x² as a dot product: XLA:CPU wrote x² to memory before
    reducing it (optax.tree.norm), one more pass over every weight-sized gradient."""
    return jnp.sqrt(sum(jnp.vdot(x, x, preferred_element_type=jnp.float32) for x in jax.tree.leaves(tree)))


def _all_finite(tree) -> jax.Array:
    """True when every floating-point leaf of tree is free of NaN / Inf (a scalar bool).

    max |x| is NaN when any x is NaN (XLA's max propagates NaN) and Inf when any x is ±Inf: one reduction
    per leaf, where jnp.all(jnp.isfinite(x)) wrote a boolean mask first."""
    leaves = [jnp.max(jnp.abs(x)).astype(jnp.float32) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact) and x.size]
    return jnp.isfinite(jnp.max(jnp.stack(leaves))) if leaves else jnp.bool_(True)


def loop(run: RunConfig, obj, step_fn, state, frozen, start: int, ckpts, log: RunLog, say):
    """for step: batch → step → log; every N: evaluate, checkpoint; SIGTERM: checkpoint and stop; Ctrl-C:
    checkpoint and raise Interrupted (a second Ctrl-C: Interrupted at once, naming the last checkpoint)."""
    t = run.train
    def meta(step):  # a source that knows its own position (a stream) gives it: saved as it gives it
        extra = {"data_state": obj.train.data_state(step)} if hasattr(obj.train, "data_state") else {}
        return dict(step=step, data_position=step * t.grad_accum, micro_batches_per_epoch=len(obj.train),
                    config=run.to_dict(), **extra)

    preempted = Preemption(say)  # SIGTERM / Ctrl-C → checkpoint at the next step boundary, then stop
    done, saved = start, start  # the last step completed, the last checkpoint written (start: resumed from it)
    try:
        for step in range(start + 1, t.steps + 1):
            state, metrics = step_fn(state, frozen, obj.train(step, state["params"]))
            if hasattr(obj.train, "host_metrics"):  # what the source measured itself (RL: rewards, rollout time)
                metrics = {**metrics, **obj.train.host_metrics(step)}
            log.step(step, metrics)
            done = step
            end = step == t.steps
            if obj.evaluate is not None and ((t.eval_every and step % t.eval_every == 0) or end):
                log.eval(step, obj.evaluate(state["params"], frozen))
            stop = preempted(step) and not end
            if (t.save_every and step % t.save_every == 0) or end or stop:
                log.flush()
                ckpts.save(step, state, meta(step))
                saved = step
            if stop and preempted.requested == "Ctrl-C":
                raise Interrupted(f"stopped at step {step} (Ctrl-C): checkpoint {step} saved in {ckpts.dir}; "
                                  "continue with --resume")
            if stop:
                say(f"\nstopped at step {step} (SIGTERM / preemption notice): checkpoint saved, continue with --resume")
                break
        log.flush()
    except KeyboardInterrupt as e:
        if isinstance(e, Interrupted):
            raise
        where = (f"the last checkpoint is step {saved} ({ckpts.dir / str(saved)}): continue from it with --resume"
                 if saved else "no checkpoint was saved: train again to start over")
        raise Interrupted(f"stopped after step {done} (a second Ctrl-C: nothing more saved); {where}") from None
    finally:
        preempted.close()

"""Device mesh, logical axis names and the rules that map them onto the mesh.

    mesh = make_mesh(run.mesh)                      # axes (data, fsdp, tensor); -1 fills the rest
    shardings = tree_shardings(state, mesh, run.mesh.strategy)

Every parameter gets logical axis names from its path (no table per model): stacked layer
parameters lead with `layers`; a Linear kernel [in, out] is named after its module (q_proj:
embed → heads, down_proj: mlp → embed, ...); LoRA `a` [L, in, r] takes its base's input name,
`b` [L, r, out] its output name, the rank is never sharded. A strategy is a few lines mapping
logical names to mesh axes. Optimizer moments are found by the same path suffix, so they shard
like their parameter. A dimension that its mesh axes do not divide is replicated, with a warning (a
quantized array's is refused: jaxft.quant splits codes only on whole blocks).

The batch [B, S] (and [A, B, S] for accumulation) is split over (data, fsdp); activations are
constrained to that layout at the block boundaries (`Decoder.constrain`).
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from flax import nnx

from jaxft.config import MeshConfig
from jaxft.distributed import init_distributed
from jaxft.errors import JaxftError
from jaxft.models.names import BATCH_AXES, is_stacked

AXES = ("data", "fsdp", "tensor")
BATCH = BATCH_AXES  # mesh axes the batch is split over

# logical name → mesh axis (absent: replicated)
RULES = {
    "dp": {},
    "fsdp": {"embed": "fsdp"},
    "fsdp_tp": {"embed": "fsdp", "heads": "tensor", "kv": "tensor", "mlp": "tensor", "vocab": "tensor"},
}

def logical_axes(names: tuple[str, ...], ndim: int, declared: tuple | None) -> tuple[str | None, ...]:
    """Logical axis names of an array of `ndim` dims at path `names`, from its declared per-layer axes
    (None: replicated); a stacked layer parameter leads with `layers`."""
    stacked = ("layers",) if is_stacked(names) else ()
    axes = stacked + (tuple(declared) if declared is not None else (None,) * (ndim - len(stacked)))
    if len(axes) != ndim:
        raise ValueError(f"{'/'.join(names)}: {ndim} dims but logical axes {axes}")
    return axes


def spec(axes: tuple, shape: tuple[int, ...], mesh: jax.sharding.Mesh, strategy: str, where: str = "",
         exact: bool = False) -> P:
    """PartitionSpec for logical `axes` under `strategy`; a dimension its mesh axis does not divide is
    replicated (warned once per parameter), or with `exact` (a quantized array, split only on whole blocks)
    refused. A tuple of logical names (a quantized array's flattened scales) splits over all their mesh axes,
    or is replicated when they do not divide it (it is small and gathered whole before use anyway)."""
    rules = RULES[strategy]
    out = []
    for name, n in zip(axes, shape):
        if isinstance(name, tuple):
            both = tuple(dict.fromkeys(a for a in map(rules.get, name) if a is not None))
            size = int(np.prod([mesh.shape[a] for a in both]))
            out.append(None if not both or n % size else both[0] if len(both) == 1 else both)
            continue
        axis = rules.get(name)
        if axis is not None and n % mesh.shape[axis]:
            if exact:
                raise JaxftError(f"{where or name}: dimension {name}={n} does not divide mesh axis {axis}="
                                 f"{mesh.shape[axis]}, and a quantized array is split only on whole blocks; "
                                 f"pick a mesh that divides it or leave the module unquantized (quant.skip_modules)")
            warnings.warn(f"jaxft: {where or name}: dimension {name}={n} does not divide mesh axis "
                          f"{axis}={mesh.shape[axis]}; replicated", stacklevel=2)
            axis = None
        out.append(axis)
    return P(*out)


def _names(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def tree_shardings(tree, mesh: jax.sharding.Mesh, strategy: str):
    """NamedSharding for every array leaf of a params / frozen / train-state tree (or its eval_shape),
    from the axes each variable declares (optimizer moments carry their parameter's); the tree's
    structure is kept (a variable keeps its wrapper, holding the sharding)."""

    def one(path, x):
        value = x.get_value() if _is_var(x) else x
        names = _names(path)
        if not names or not hasattr(value, "shape"):
            sh = NamedSharding(mesh, P())
        else:
            declared = x.get_metadata().get("axes") if _is_var(x) else None
            sh = NamedSharding(mesh, spec(logical_axes(names, len(value.shape), declared), value.shape, mesh,
                                          strategy, "/".join(names)))
        return jax.tree.map(lambda _: sh, x) if _is_var(x) else sh

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_var)


def param_sharding(mesh: jax.sharding.Mesh, strategy: str):
    """The `sharding(path, shape, axes, exact=False)` callback of `jaxft.formats.hf.load_pretrained`: each shard
    is read by its owner (`exact`: refuse a dimension the mesh cannot split, see `spec`)."""
    return lambda path, shape, axes=None, exact=False: NamedSharding(mesh, spec(
        logical_axes(tuple(path), len(shape), axes), shape, mesh, strategy, "/".join(path), exact))


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with a -1 filled from the device count; a JaxftError when they do not fit."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n_devices % known:
            raise JaxftError(f"mesh: {n_devices} devices do not divide into data/fsdp/tensor = {sizes}")
        sizes[sizes.index(-1)] = n_devices // known
    if int(np.prod(sizes)) > n_devices:
        raise JaxftError(f"mesh: data*fsdp*tensor = {int(np.prod(sizes))} is more than the {n_devices} devices")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig) -> jax.sharding.Mesh:
    """The (data, fsdp, tensor) mesh; with several processes it must span every device."""
    n = jax.device_count()
    shape = mesh_shape(cfg, n)
    used = int(np.prod(shape))
    if jax.process_count() > 1 and used != n:
        raise JaxftError(f"mesh: data*fsdp*tensor = {used}, but a multi-host run must use all {n} devices "
                         f"(set one of mesh.data / mesh.fsdp / mesh.tensor to -1)")
    return jax.make_mesh(shape, AXES, devices=jax.devices()[:used],
                         axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def command_mesh(cfg: MeshConfig) -> jax.sharding.Mesh:
    """The mesh a command runs on: with mesh.distributed, after joining the other processes (before anything
    touches a device), then make_mesh."""
    init_distributed(cfg)
    return make_mesh(cfg)


def batch_spec(mesh: jax.sharding.Mesh, rows: int, lead: int = 0) -> P:
    """[lead dims..., B, ...]: B split over (data, fsdp), or replicated (warned) when they do not divide it."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % n:
        warnings.warn(f"jaxft: batch of {rows} rows does not divide data*fsdp = {n}; replicated", stacklevel=2)
        return P(*([None] * lead))
    return P(*([None] * lead), BATCH)


def place(tree, shardings):
    """Put every leaf on its sharding. Host values must be equal on every process (seeded init)."""

    def one(x, s):
        if isinstance(x, jax.Array) and x.sharding == s:
            return x
        if isinstance(x, jax.Array) and x.is_fully_addressable and s.is_fully_addressable:
            return jax.device_put(x, s)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    return jax.tree.map(one, tree, shardings)


def to_host(x) -> np.ndarray:
    """The whole value of an array on this host. Rows sharded over several processes are gathered (a
    collective: every process must call it for the same array, in the same order)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


class ShardedBatches:
    """Global batches from a deterministic `jaxft.data.encode.Batches`: each process assembles only the rows of
    the devices it owns (`Batches.batch(i, rows)`), then the pieces form one global jax.Array."""

    def __init__(self, batches, mesh: jax.sharding.Mesh):
        self.batches, self.mesh = batches, mesh
        self.rows = batch_spec(mesh, batches.batch_size)

    def __len__(self) -> int:
        return len(self.batches)

    def batch(self, i: int) -> dict[str, jax.Array]:
        """Micro-batch i: each [B, S]."""
        if not getattr(self.batches, "row_subsets", True):
            return self._whole(self.batches.batch(i), lead=0)
        return self._global((self.batches.batch_size, self.batches.seq_len), self.rows,
                            lambda idx: self.batches.batch(i, idx[0]))

    def step(self, step: int, accum: int) -> dict[str, jax.Array]:
        """The `accum` micro-batches of optimizer step `step`: each [A, B, S]."""

        def read(idx):
            mbs = [self.batches.batch(step * accum + j, idx[1]) for j in range(accum)[idx[0]]]
            return {k: np.stack([m[k] for m in mbs]) for k in mbs[0]}

        if not getattr(self.batches, "row_subsets", True):
            return self._whole(read((slice(None), slice(None))), lead=1)
        return self._global((accum, self.batches.batch_size, self.batches.seq_len), P(None, *self.rows), read)

    def _whole(self, full: dict[str, np.ndarray], lead: int) -> dict[str, jax.Array]:
        """Batches that cannot assemble a subset of their rows (preference pairs: chosen and rejected
        rows, per-pair arrays): every process assembles the whole batch, each device takes its rows."""
        out = {}
        for k, v in full.items():
            sharding = NamedSharding(self.mesh, batch_spec(self.mesh, v.shape[lead], lead))
            out[k] = jax.make_array_from_callback(v.shape, sharding, lambda i, v=v: v[i])
        return out

    def _global(self, shape, pspec: P, read) -> dict[str, jax.Array]:
        sharding = NamedSharding(self.mesh, pspec)
        idx = sharding.addressable_devices_indices_map(shape)
        pieces = {}  # each distinct index is read once, whatever the number of devices holding it
        for i in idx.values():
            key = tuple((s.start, s.stop) for s in i)
            if key not in pieces:
                pieces[key] = read(i)
        keys = next(iter(pieces.values())).keys()
        return {k: jax.make_array_from_callback(
            shape, sharding, lambda i, k=k: pieces[tuple((s.start, s.stop) for s in i)][k]) for k in keys}


def sharded_init(init, params, mesh: jax.sharding.Mesh, strategy: str):
    """(state, its shardings): init(params) (e.g. params + optimizer state) computed straight into place."""
    shardings = tree_shardings(jax.eval_shape(init, params), mesh, strategy)
    return jax.jit(init, out_shardings=shardings)(params), shardings


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())

"""EleutherAI's lm-evaluation-harness on jaxft's own forward: `JaxftLM`, a backend for `lm_eval.simple_evaluate`.

    from jaxft.lm_eval import JaxftLM
    lm = JaxftLM("example")                       # an HF directory, a .gguf, a jaxft run, "example"
    lm = JaxftLM("runs/quickstart")               # a run: its tuned weights (base=True: the weights it started from)
    lm = JaxftLM(base_dir, adapters=["math=runs/math"], use="math")   # one adapter of a bank
    results = lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])

Requests are tokenized exactly as lm-eval's Hugging Face backend (HFLM) does: `TemplateLM._encode_pair` (trailing
spaces of the context move to the continuation, the whole string is tokenized and split), the prefix token for an
empty context, HFLM's left truncation to the model's context and its rolling windows. What differs is how they run:

- loglikelihood: every request's input ((context + continuation)[:-1], truncated) is run once however many
  requests share it (multiple choice with one-token answers, or an input that is a prefix of another: causal
  attention gives its positions the same values inside the longer one); the distinct inputs are packed,
  longest first, into rows of `pack_length` tokens (segment ids keep them apart, positions restart), and only
  the positions whose next token is scored go through the vocabulary projection. One jitted function per
  (rows, row length, scored positions per row) bucket: rows 1, 2, 4, 8 ... `batch_tokens // length`, lengths
  `pack_length` or a larger power of two, scored positions a power of two — a handful of compiles per task,
  none per request length (`score_calls()` counts them).
- generate_until: `jaxft.generate.generate` (prefill + while_loop decode, weights as arguments), prompts
  padded to a power of two, rows in batches of `batch_size`; a row also stops at a token whose text holds a
  stop string (its cut is then settled), and the text is cut at the first stop string as HFLM cuts it.

Under a mesh the rows split over its (data, fsdp) axes, the weights sharded by its strategy. Over several processes
the mesh spans them all and every process runs the same requests (process 0's, broadcast: lm-eval's request order
is not promised to be the same in every process) through the one model sharded over all of them: lm-eval sees one
rank (`world_size` 1), the answers equal one process's, and only process 0 reports. Not lm-eval's own split of
the requests by rank: that needs the whole model in every process and each process to run programs of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from jaxft import runs, sharding
from jaxft.context import ON, Ctx
from jaxft.distributed import from_primary
from jaxft.errors import JaxftError
from jaxft.formats.hf import load_pretrained, load_tokenizer
from jaxft.generate import Sampling, eos_token_ids, generate, row_bucket
from jaxft.models.decoder import head_logits
from jaxft.setup import resolve_model

MIN_QUERIES = 16  # scored positions per row: a power of two, at least this
MIN_SHARED = 8  # contexts of at least this many tokens with several continuations run once for all of them


def pow2(n: int, least: int = 1) -> int:
    """The smallest power of two >= max(n, least)."""
    return 1 << (max(n, least) - 1).bit_length()


def size_bucket(n: int, least: int = 1) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24 ... (powers of two and 1.5 times them) >= max(n, least): scoring
    shapes pad at most a third (powers of two alone: up to half, measured as most of a multiple-choice task's
    slots), for about twice the buckets."""
    p = pow2(n, least)
    return p * 3 // 4 if p >= 4 and p * 3 // 4 >= max(n, least) else p


def size_buckets(lo: int, hi: int) -> list[int]:
    """Every size_bucket from size_bucket(lo) up to hi (at least that first one): the shapes a packer tries."""
    out = [size_bucket(lo)]
    while (n := size_bucket(out[-1] + 1)) <= hi:
        out.append(n)
    return out


# ---------------------------------------------------------------- the scoring program


def _queries(model, h, q_pos, q_tok):
    """(log p(q_tok) [R, C] fp32, q_tok is the argmax [R, C]) at positions q_pos [R, C] of hidden states h [R, S, D]:
    only these R x C states go through the vocabulary projection, C // c chunks of [R, c, V] at a time."""
    hq = jnp.take_along_axis(h, q_pos[..., None], axis=1)  # [R, C, D]
    R, C, D = hq.shape
    c = max(1, min(C, 512 // R))
    while C % c:
        c //= 2

    def one(x):
        hx, t = x  # [R, c, D], [R, c]
        z = head_logits(model.head, hx, model.config.final_softcap).astype(jnp.float32)  # [R, c, V]
        lp = jnp.take_along_axis(z, t[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(z, axis=-1)
        return lp, jnp.argmax(z, axis=-1) == t

    split = lambda a: jnp.moveaxis(a.reshape(R, C // c, c, *a.shape[2:]), 1, 0)  # noqa: E731 [C/c, R, c, ...]
    lp, greedy = jax.lax.map(one, (split(hq), split(q_tok)))
    join = lambda a: jnp.moveaxis(a, 0, 1).reshape(R, C)  # noqa: E731
    return join(lp), join(greedy)


@partial(jax.jit, static_argnames=("graphdef",))
def score_rows(weights, tokens, positions, segment_ids, q_pos, q_tok, ctx, *, graphdef):
    """Log-probs of chosen next tokens in packed rows. tokens / positions / segment_ids [R, S] (segment 0: padding);
    q_pos [R, C]: positions whose next token is scored, q_tok [R, C]: that token. Returns (log p(q_tok) [R, C] fp32,
    whether q_tok is the argmax [R, C])."""
    model = nnx.merge(graphdef, *weights)
    h, _ = model.hidden(tokens, positions, segment_ids, ctx=ctx)  # [R, S, D]
    return _queries(model, h, q_pos, q_tok)


@partial(jax.jit, static_argnames=("graphdef",))
def score_shared(weights, prefix, suffix, src, ctx_p, ctx_s, *, graphdef):
    """Contexts run once for all their continuations. prefix: (tokens, positions, segment_ids, q_pos, q_tok) of
    rows [Rp, Sp] packed with contexts; suffix: the same of rows [Rs, Ss], each row holding at most one
    continuation of each context of prefix row src[b] (under that context's segment id, positions after it),
    attending to it through the prefix's keys and values. Returns score_rows's pair for each."""
    model = nnx.merge(graphdef, *weights)
    hp, kv = model.hidden(*prefix[:3], ctx=ctx_p, keep_kv=True)
    hs, _ = model.hidden(*suffix[:3], ctx=ctx_s, prefix=(kv, src))
    return _queries(model, hp, *prefix[3:]), _queries(model, hs, *suffix[3:])


def score_calls() -> int:
    """How many scoring programs (`score_rows`, `score_shared`) this process has compiled (their jit caches)."""
    return score_rows._cache_size() + score_shared._cache_size()


@dataclasses.dataclass
class Packed:
    """Rows of `length` tokens, each holding several inputs (segments), and the scored positions of each row."""

    tokens: np.ndarray  # [R, S]
    positions: np.ndarray
    segment_ids: np.ndarray
    q_pos: np.ndarray  # [R, C]
    q_tok: np.ndarray
    where: list[list[tuple[int, int]]]  # per request given to `pack`: its (row, column) in q_pos, in token order


def pack(inputs: list[list[int]], queries: list[list[tuple[int, int]]], length: int, rows: int) -> Packed:
    """Pack `inputs` (each at most `length` tokens) first-fit, longest first, into `rows` rows of `length` tokens.
    queries[i]: (position in input i, token) pairs to score. An input that does not fit raises ValueError."""
    free, placed = [length] * rows, [None] * len(inputs)
    for i in sorted(range(len(inputs)), key=lambda i: -len(inputs[i])):
        r = next((r for r in range(rows) if free[r] >= len(inputs[i])), None)
        if r is None:
            raise ValueError("inputs do not fit the rows")
        placed[i] = (r, length - free[r])
        free[r] -= len(inputs[i])
    per_row = [0] * rows
    for (r, _), q in zip(placed, queries):
        per_row[r] += len(q)
    C = size_bucket(max(per_row), MIN_QUERIES)
    tokens, positions, seg = (np.zeros((rows, length), np.int32) for _ in range(3))
    q_pos, q_tok = np.zeros((rows, C), np.int32), np.zeros((rows, C), np.int32)
    used, where, nseg = [0] * rows, [], [0] * rows
    for i, ((r, at), q) in enumerate(zip(placed, queries)):
        n = len(inputs[i])
        nseg[r] += 1
        tokens[r, at:at + n], positions[r, at:at + n], seg[r, at:at + n] = inputs[i], np.arange(n), nseg[r]
        w = []
        for p, t in q:
            q_pos[r, used[r]], q_tok[r, used[r]] = at + p, t
            w.append((r, used[r]))
            used[r] += 1
        where.append(w)
    return Packed(tokens, positions, seg, q_pos, q_tok, where)


def share_inputs(inputs: list[tuple[int, ...]]) -> list[tuple[int, int]]:
    """For each input, (host, offset 0): the index of the longest input that starts with it (itself when none),
    so a shared input runs once. In lexicographic order an input that is a prefix of any other is a prefix of
    the next one."""
    order = sorted(range(len(inputs)), key=lambda i: inputs[i])
    host = list(range(len(inputs)))
    for a, b in zip(reversed(order[:-1]), reversed(order[1:])):
        x, y = inputs[a], inputs[b]
        if len(x) <= len(y) and y[:len(x)] == x:
            host[a] = host[b]
    return host


@dataclasses.dataclass
class Group:
    """Requests whose inputs start with the same context: `prefix` (the context up to the token that predicts the
    first continuation token) and, per member, the rest of its input and the tokens its positions predict."""

    prefix: tuple[int, ...]
    members: list[int]  # request indices
    suffixes: list[list[int]]  # the rest of each member's input (may be empty)
    targets: list[list[int]]  # each member's continuation: len(suffix) + 1 tokens


@dataclasses.dataclass
class SharedPacked:
    """score_shared's arrays: prefix and suffix (tokens, positions, segment_ids, q_pos, q_tok) and src, and per
    member request its query cells (0: prefix rows, 1: suffix rows; row; column) in token order."""

    prefix: tuple
    suffix: tuple
    src: np.ndarray
    where: dict[int, list[tuple[int, int, int]]]


def pack_shared(groups: list[Group], start: int, length: int, max_rows: int, max_suffix: int, rows_of=pow2
                ) -> tuple[SharedPacked, int]:
    """Pack groups[start:] (longest prefix first) into at most max_rows prefix rows of `length` tokens, and their
    members' suffixes into suffix rows that each attend to one prefix row (src); returns the packed call and the
    index of the first group left out. rows_of(n): the padded row count of n rows.

    A suffix row holds suffixes of contexts of one prefix row, at most one per context (two continuations of one
    context in a row would see each other: they share its segment id), first fit, longest first, in rows of the
    width (a size_bucket up to max_suffix) that leaves the fewest padded slots."""
    free: list[int] = []
    placed: list[tuple[int, int, int]] = []  # (group, row, offset)
    i = start
    while i < len(groups):
        g = groups[i]
        a = len(g.prefix)
        if a > length or any(len(x) > max_suffix for x in g.suffixes):
            break
        r = next((r for r in range(len(free)) if free[r] >= a), None)
        if r is None:
            if len(free) == max_rows:
                break
            free.append(length)
            r = len(free) - 1
        placed.append((i, r, length - free[r]))
        free[r] -= a
        i += 1
    # every (group, member) with a suffix, per prefix row, longest first
    per_row: list[list[tuple[int, int]]] = [[] for _ in free]
    for gi, r, _ in placed:
        per_row[r] += [(gi, k) for k, x in enumerate(groups[gi].suffixes) if x]
    for items in per_row:
        items.sort(key=lambda t: -len(groups[t[0]].suffixes[t[1]]))
    longest = max((len(groups[gi].suffixes[k]) for items in per_row for gi, k in items), default=1)

    def bins(width: int) -> list[tuple[int, list[tuple[int, int]]]]:
        """(prefix row, its members) per suffix row, first fit decreasing under the one-per-context rule."""
        out = []
        for r, items in enumerate(per_row):
            mine: list[list] = []  # [room, members, groups] of this prefix row's suffix rows
            for gi, k in items:
                n = len(groups[gi].suffixes[k])
                b = next((b for b in mine if b[0] >= n and gi not in b[2]), None)
                if b is None:
                    b = [width, [], set()]
                    mine.append(b)
                b[0] -= n
                b[1].append((gi, k))
                b[2].add(gi)
            out += [(r, b[1]) for b in mine]
        return out

    widths = size_buckets(max(longest, MIN_QUERIES), max_suffix)
    Ss, suffix_rows = min(((w, bins(w)) for w in widths), key=lambda x: (rows_of(max(len(x[1]), 1)) * x[0], x[0]))
    Rp, Rs = rows_of(len(free)), rows_of(max(len(suffix_rows), 1))
    arrays = lambda R, S: [np.zeros((R, S), np.int32) for _ in range(3)]  # noqa: E731
    (pt, pp, ps), (st, sp, ss) = arrays(Rp, length), arrays(Rs, Ss)
    src = np.zeros(Rs, np.int32)
    qp, qs = [[] for _ in range(Rp)], [[] for _ in range(Rs)]  # (position, token) per row
    where: dict[int, list[tuple[int, int, int]]] = {}
    seg_of: dict[int, int] = {}  # group → its segment id in its prefix row
    nseg = [0] * Rp
    for gi, r, at in placed:
        g = groups[gi]
        a = len(g.prefix)
        nseg[r] += 1
        seg_of[gi] = nseg[r]
        pt[r, at:at + a], pp[r, at:at + a], ps[r, at:at + a] = g.prefix, np.arange(a), nseg[r]
        for k, m in enumerate(g.members):  # every member's first continuation token: the context's last position
            where[m] = [(0, r, len(qp[r]))]
            qp[r].append((at + a - 1, g.targets[k][0]))
    for row, (r, members) in enumerate(suffix_rows):
        src[row], o = r, 0
        for gi, k in members:
            g, suf = groups[gi], groups[gi].suffixes[k]
            a, n = len(g.prefix), len(suf)
            st[row, o:o + n], sp[row, o:o + n], ss[row, o:o + n] = suf, a + np.arange(n), seg_of[gi]
            for t, tok in enumerate(g.targets[k][1:]):
                where[g.members[k]].append((1, row, len(qs[row])))
                qs[row].append((o + t, tok))
            o += n

    def queries(q):
        C = size_bucket(max(len(x) for x in q), MIN_QUERIES)
        pos, tok = np.zeros((len(q), C), np.int32), np.zeros((len(q), C), np.int32)
        for r, x in enumerate(q):
            if x:
                pos[r, :len(x)], tok[r, :len(x)] = zip(*x)
        return pos, tok

    return SharedPacked((pt, pp, ps, *queries(qp)), (st, sp, ss, *queries(qs)), src, where), i


# ---------------------------------------------------------------- loading a model


@dataclasses.dataclass
class Model:
    """What JaxftLM runs: the graph, the weights (a tuple of nnx.State), the adapters' context, the tokenizer."""

    graphdef: object
    weights: tuple
    tokenizer: object
    path: Path
    ctx: Ctx = ON
    adapter_id: int | None = None  # with a bank: every row's adapter (-1: the base)
    base_weights: tuple | None = None  # a run's starting point, for --base


def load_model(model: str, *, adapters: list[str] = (), use: str | None = None, base: bool = False,
               dtype: str = "fp32", mesh=None, strategy: str = "dp") -> Model:
    """A model directory, .gguf or "example"; a jaxft run directory (tuned weights, and its base's); or a base
    with a bank of --adapter sources, `use` naming the adapter every request runs with ("base": none). mesh: the
    weights read into their shards (`strategy`; a run's own)."""
    place = None if mesh is None else sharding.param_sharding(mesh, strategy)
    if runs.is_run(model):
        if adapters:
            raise JaxftError(f"{model}: a run directory evaluates its own weights; --adapter takes a base model")
        done = runs.load_run(model, mesh=mesh)
        s = done.setup
        tuned, start = (done.params, s.frozen), (s.params, s.frozen)
        return Model(s.graphdef, start if base else tuned, s.tokenizer, s.model_path, base_weights=start)
    path = resolve_model(model)
    decoder = load_pretrained(path, dtype=jnp.bfloat16 if dtype == "bf16" else jnp.float32, sharding=place)
    tokenizer = load_tokenizer(path)
    adapter_id = None
    if adapters:
        names = runs.load_bank(decoder, list(adapters), base=str(path))
        which = use or names[0]
        if which != "base" and which not in names:
            raise JaxftError(f"--use {which}: no such adapter (have: {', '.join(names)}, base)")
        adapter_id = -1 if which == "base" else names.index(which)
    elif use:
        raise JaxftError("--use names an adapter: give the adapters with --adapter NAME=DIR")
    graphdef, state = nnx.split(decoder)
    if mesh is not None and adapters:  # the bank is read on one device: its factors go to their shards
        state = sharding.place(state, sharding.tree_shardings(state, mesh, strategy))
    return Model(graphdef, (state,), tokenizer, path, adapter_id=adapter_id)


# ---------------------------------------------------------------- the backend


class JaxftLM(TemplateLM):
    """An lm-eval model (TemplateLM) running jaxft's decoder; see the module docstring.

    model: a model directory, a .gguf, "example", a jaxft run directory (its tuned weights; base=True: its
    base), or a base with `adapters` (--adapter NAME=DIR sources) and `use` (the adapter to evaluate).
    batch_tokens: tokens per scoring call (rows x row length); pack_length: the row length requests are packed
    into (longer requests get a power of two up to max_length); batch_size: generation rows per call.
    max_length: the context (default: the model's max_position_embeddings); add_bos_token / prefix_token_id as
    HFLM's. mesh: a jax Mesh with (data, fsdp, tensor) axes, rows split over data x fsdp, weights sharded by
    `strategy` (jaxft.sharding.RULES; default replicated); over several processes, see the module docstring.
    """

    def __init__(self, model: str | Model = "example", *, adapters: list[str] = (), use: str | None = None,
                 base: bool = False, dtype: str = "fp32", batch_size: int = 16, batch_tokens: int = 8192,
                 pack_length: int = 512, max_length: int | None = None, max_gen_toks: int = 256,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None, seed: int = 0,
                 mesh=None, strategy: str = "dp"):
        super().__init__()
        self.m = model if isinstance(model, Model) else load_model(str(model), adapters=adapters, use=use,
                                                                   base=base, dtype=dtype, mesh=mesh, strategy=strategy)
        self.weights, self.adapter_id = self.m.weights, self.m.adapter_id
        self.tokenizer = self.m.tokenizer
        self.mesh = mesh
        self.config = nnx.merge(self.m.graphdef, *self.weights).config  # the DecoderConfig
        self._max_length = int(max_length or self.config.max_position_embeddings)
        self.batch_size, self.batch_tokens = int(batch_size), int(batch_tokens)
        self.pack_length = min(pow2(int(pack_length)), pow2(self._max_length))
        self._max_gen_toks, self.add_bos_token, self.custom_prefix = int(max_gen_toks), add_bos_token, prefix_token_id
        self.seed, self.calls = seed, 0
        self.eos = eos_token_ids(self.tokenizer, self.m.path)
        self._stop_ids: dict[tuple[str, ...], set[int]] = {}
        self.quiet = jax.process_index() != 0  # progress bars: process 0's

    # ------------------------------------------------------------ what TemplateLM and the evaluator ask

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix is not None:
            return self.custom_prefix
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(self.m.path).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation rendered with the tokenizer's chat template (as HFLM renders it)."""
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kw) -> list[int]:
        """Token ids as HFLM makes them: the tokenizer's own special tokens unless told (add_special_tokens, or
        add_bos_token), and none when the string already starts with the prefix token's text."""
        if add_special_tokens is not None:
            special = {"add_special_tokens": add_special_tokens}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        prefix = self.tokenizer.decode(self.prefix_token_id)
        if add_special_tokens is None and prefix and string.startswith(prefix):
            special = {"add_special_tokens": False}
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------ running

    def select(self, which: str | None) -> None:
        """None: the weights (and adapter) asked for; "base": a run's starting point, or the bank's base model."""
        self.weights, self.adapter_id = self.m.weights, self.m.adapter_id
        if which is None:
            return
        if self.m.base_weights is not None:
            self.weights = self.m.base_weights
        elif self.m.adapter_id is not None:
            self.adapter_id = -1
        else:
            raise JaxftError(f"{self.m.path}: no base to compare with (a run directory or an adapter has one)")

    def _ctx(self, rows: int) -> Ctx:
        if self.adapter_id is None:
            return self.m.ctx
        return dataclasses.replace(self.m.ctx, adapter_ids=jnp.full((rows,), self.adapter_id, jnp.int32))

    def _rows(self, n: int, bucket=size_bucket) -> int:
        """Rows of a call holding n rows of data: bucket(n) (generation: row_bucket's powers of two, multiples of
        8), rounded up to a multiple of the mesh's data x fsdp."""
        r = bucket(n)
        if self.mesh is not None:
            ways = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
            r = -(-r // ways) * ways
        return r

    def _run_packed(self, p: Packed):
        R = p.tokens.shape[0]
        args = self._place([p.tokens, p.positions, p.segment_ids, p.q_pos, p.q_tok], R)
        with (jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()):
            lp, greedy = score_rows(tuple(self.weights), *args, self._ctx(R), graphdef=self.m.graphdef)
        self.calls += 1
        return sharding.to_host(lp), sharding.to_host(greedy)

    def score_inputs(self, inputs: list[list[int]], queries: list[list[tuple[int, int]]],
                     progress: str = "") -> list[tuple[np.ndarray, np.ndarray]]:
        """For each input (at most max_length tokens) the log-probs and argmax-matches of its queries
        ((position, next token) pairs), inputs shared with others run once."""
        keys = [tuple(x) for x in inputs]
        host = share_inputs(keys)
        runs_of: dict[int, list[int]] = {}
        for i, h in enumerate(host):
            runs_of.setdefault(h, []).append(i)
        order = sorted(runs_of, key=lambda h: -len(keys[h]))
        out: list = [None] * len(inputs)
        bar = tqdm(total=len(inputs), desc=progress, disable=not progress or self.quiet)
        k = 0
        while k < len(order):
            length = max(self.pack_length, pow2(len(keys[order[k]])))
            cap_rows = max(1, self.batch_tokens // length)
            # fill up to cap_rows rows of `length` (first fit, longest first) with what comes next
            free, take = [], []
            while k < len(order) and len(keys[order[k]]) <= length:
                n = len(keys[order[k]])
                r = next((r for r in range(len(free)) if free[r] >= n), None)
                if r is None:
                    if len(free) == cap_rows:
                        break
                    free.append(length)
                    r = len(free) - 1
                free[r] -= n
                take.append(order[k])
                k += 1
            members = [i for h in take for i in runs_of[h]]
            p = pack([list(keys[h]) for h in take], [[q for i in runs_of[h] for q in queries[i]] for h in take],
                     length, self._rows(len(free)))
            lp, greedy = self._run_packed(p)
            for h, w in zip(take, p.where):
                at = 0
                for i in runs_of[h]:
                    cells = w[at:at + len(queries[i])]
                    at += len(queries[i])
                    out[i] = (np.asarray([lp[r, c] for r, c in cells], np.float64),
                              np.asarray([greedy[r, c] for r, c in cells], bool))
            bar.update(len(members))
        bar.close()
        return out

    def _place(self, arrays, rows: int):
        """Host arrays [rows, ...] on the mesh, split over its batch axes (as they are without a mesh)."""
        if self.mesh is None:
            return arrays
        where = NamedSharding(self.mesh, sharding.batch_spec(self.mesh, rows))
        return jax.tree.map(lambda a: jax.device_put(a, where), arrays)

    def _pack_shared(self, groups: list[Group], k: int) -> tuple[SharedPacked, int]:
        """pack_shared from groups[k] on, with the prefix row length (a size_bucket from the longest context up to
        pack_length) that pads least per request packed."""
        top = max(self.pack_length, pow2(len(groups[k].prefix)))
        max_suffix = max(self.pack_length, pow2(max(len(x) for x in groups[k].suffixes)))
        lengths = size_buckets(len(groups[k].prefix), top)

        def cost(packed):
            sp, nxt = packed
            slots = sp.prefix[0].size + sp.suffix[0].size
            return slots / sum(len(g.members) for g in groups[k:nxt]), -nxt

        return min((pack_shared(groups, k, n, max(1, self.batch_tokens // (2 * n)), max_suffix, self._rows)
                    for n in lengths), key=cost)

    def score_groups(self, groups: list[Group], progress: str = "") -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Requests sharing a context (score_shared): per member request, its log-probs and argmax-matches."""
        groups = sorted(groups, key=lambda g: -len(g.prefix))
        out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        bar = tqdm(total=sum(len(g.members) for g in groups), desc=progress, disable=not progress or self.quiet)
        k = 0
        while k < len(groups):
            sp, nxt = self._pack_shared(groups, k)
            Rp, Rs = sp.prefix[0].shape[0], sp.suffix[0].shape[0]
            with (jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()):
                res = score_shared(tuple(self.weights), self._place(sp.prefix, Rp), self._place(sp.suffix, Rs),
                                   self._place(sp.src, Rs), self._ctx(Rp), self._ctx(Rs), graphdef=self.m.graphdef)
            self.calls += 1
            (lp_p, g_p), (lp_s, g_s) = [tuple(sharding.to_host(x) for x in pair) for pair in res]
            lp, greedy = (lp_p, lp_s), (g_p, g_s)
            for i, cells in sp.where.items():
                out[i] = (np.asarray([lp[w][r, c] for w, r, c in cells], np.float64),
                          np.asarray([greedy[w][r, c] for w, r, c in cells], bool))
            bar.update(sum(len(g.members) for g in groups[k:nxt]))
            k = nxt
        bar.close()
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids) → (sum of log-probs, greedy).
        Requests whose contexts (of at least MIN_SHARED tokens) have several continuations run the context once
        (score_groups); the others run packed whole (score_inputs)."""
        requests = from_primary(requests)
        inputs, queries, by_prefix = [], [], {}
        L = self.max_length
        for i, (_, ctx_ids, cont_ids) in enumerate(requests):
            if not ctx_ids or not cont_ids or len(cont_ids) > L:
                raise JaxftError(f"lm-eval request: context of {len(ctx_ids)} and continuation of {len(cont_ids)} "
                                 f"tokens (both must be non-empty, the continuation at most {L})")
            inp = (ctx_ids + cont_ids)[-(L + 1):][:-1]
            n, m = len(inp), len(cont_ids)
            inputs.append(inp)
            queries.append([(n - m + j, t) for j, t in enumerate(cont_ids)])
            by_prefix.setdefault(tuple(inp[:n - m + 1]), []).append(i)
        groups = [Group(p, ids, [inputs[i][len(p):] for i in ids], [requests[i][2] for i in ids])
                  for p, ids in by_prefix.items()
                  if len(p) >= MIN_SHARED and sum(len(inputs[i]) > len(p) for i in ids) >= 2
                  and not self.config.sliding_window]  # windows count slots: a suffix row's are not positions
        shared = {i for g in groups for i in g.members}
        rest = [i for i in range(len(requests)) if i not in shared]
        desc = "" if disable_tqdm else "loglikelihood"
        got = dict(zip(rest, self.score_inputs([inputs[i] for i in rest], [queries[i] for i in rest], desc)))
        got.update(self.score_groups(groups, desc) if groups else {})
        out = []
        for i, ((ctx, cont), _, _) in enumerate(requests):
            lp, greedy = got[i]
            ans = (float(lp.sum()), bool(greedy.all()))
            if ctx is not None:
                self.cache_hook.add_partial("loglikelihood", (ctx, cont), ans)
            out.append(ans)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-prob in disjoint windows of max_length tokens (lm-eval's rolling windows, as HFLM)."""
        windows, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            for ctx_ids, cont_ids in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append(((None, None), ctx_ids, cont_ids))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (s, _) in zip(owner, scores):
            totals[i] += s
        for r, t in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, t)
        return totals

    def stop_ids(self, until: list[str]) -> set[int]:
        """Tokens whose own text holds one of the stop strings (special tokens apart: decoding skips them): once
        one is generated, the row's cut is settled and it can stop."""
        key = tuple(until)
        if key not in self._stop_ids:
            special = set(self.tokenizer.all_special_ids)
            texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
            self._stop_ids[key] = {i for i, t in enumerate(texts) if i not in special and any(s and s in t for s in until)}
        return self._stop_ids[key]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, do_sample / temperature / top_k / top_p) continuations, cut before the first stop."""
        encoded = {}

        def enc(text):
            if text not in encoded:
                encoded[text] = self.tok_encode(text)
            return encoded[text]

        coll = Collator(from_primary([r.args for r in requests]), sort_fn=lambda a: (-len(enc(a[0])), a[0]),
                        group_by="gen_kwargs", group_fn=lambda a: a[1])
        eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        res = []
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or self.quiet)
        for chunk in coll.get_batched(n=self.batch_size):
            contexts, kws = zip(*chunk)
            kw = normalize_gen_kwargs(kws[0], self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos_text)
            max_gen = int(kw.pop("max_gen_toks"))
            if max_gen >= self.max_length:
                raise JaxftError(f"generate_until: max_gen_toks {max_gen} is not below the context {self.max_length}")
            prompts = [enc(c)[-(self.max_length - max_gen):] for c in contexts]
            temp = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            sampling = Sampling(temperature=temp, top_k=int(kw.get("top_k") or 0) if temp else 0,
                                top_p=float(kw.get("top_p") or 1.0) if temp else 1.0, max_new_tokens=max_gen,
                                seed=self.seed + self.calls)
            mesh_kw, rows = {}, prompts
            if self.mesh is not None:  # rows split over data x fsdp: pad them to a multiple (repeats share a prefill)
                mesh_kw = {"mesh": self.mesh}
                rows = prompts + [prompts[-1]] * (self._rows(len(prompts), row_bucket) - len(prompts))
            out = generate(self.m.graphdef, tuple(self.weights), rows, eos_ids=self.eos | self.stop_ids(until),
                           sampling=sampling, ctx=self._ctx(len(rows)), prompt_length=pow2(max(map(len, rows)), 32),
                           **mesh_kw)
            self.calls += 1
            for c, row, n in zip(contexts, out.tokens, out.lengths):
                ids = [int(t) for t in row[:n] if int(t) not in self.eos]
                text = postprocess_generated_text(self.tok_decode(ids), until, None)
                res.append(text)
                self.cache_hook.add_partial("generate_until", (c, kws[0]), text)
            bar.update(len(contexts))
        bar.close()
        return coll.get_original(res)

    def get_model_info(self) -> dict:
        return {"model": str(self.m.path), "adapter_id": self.m.adapter_id}


def results_dict(results: dict, log_samples: bool) -> dict:
    """simple_evaluate's results as plain JSON values (lm-eval's own fallback for what JSON cannot hold); the
    per-sample log only when asked."""
    keep = {k: v for k, v in results.items() if log_samples or k != "samples"}
    return json.loads(json.dumps(keep, default=lm_utils.handle_non_serializable, ensure_ascii=False))

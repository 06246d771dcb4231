"""Constitutional AI (Bai et al. 2022): self-critique → revision data, AI-feedback preference labels.

    revise(run)    # <cai.out_dir>/revise/sft.jsonl  {"messages": [prompt turns..., {"role": "assistant", final revision}]}
                   #                     /trace.jsonl {"row", "prompt", "answer", "steps": [{principle, critique,
                   #                                   revision, tokens}], "skipped"}
    label(run)     # <cai.out_dir>/label/pairs.jsonl  {"prompt": [turns], "chosen": [turn], "rejected": [turn],
                   #                                   "confidence": P(chosen better)}  + trace.jsonl
    run_all(run)   # revise → SFT → label → DPO (or reward model), one folder per stage, then a summary table

Revise: per prompt, an answer; then `cai.revisions` rounds of (critique request → critique, revision
request → revision) in one growing chat, the principle of round r drawn with
numpy.random.default_rng([seed, row, r]) — independent of batch size, chunking and devices. Every
call goes through the jitted `jaxft.generate.generate` (one call per stage for a whole chunk of
prompts, rows split over the mesh), prompts rendered with the tokenizer's chat template.

Label: two sampled answers per prompt; the judge (cai.feedback_model, default the policy) reads one
comparison question per drawn principle (K = cai.principles_per_pair) in each option order. With
ℓ_A, ℓ_B the judge's next-token log-probs of the option letters after FEEDBACK_PREFIX,
p = e^ℓ_A / (e^ℓ_A + e^ℓ_B) is P(option A better); P(first answer better) = the mean over principles
and orders (the second order's p of option B), clipped to cai.clamp. chosen = the more likely side,
confidence = max(P, 1 − P), read by objective dpo (per-pair label smoothing 1 − confidence) and
objective reward (soft Bradley–Terry target).

Resume: each stage works in chunks of cai.batch_size prompts; each finished chunk is one file
(chunks/NNNNN.jsonl, written atomically) and a re-run skips the chunks it finds, so a crash loses at most
the chunk in flight. manifest.json holds a fingerprint of what the chunks depend on (model files,
constitution, prompts, settings); a mismatch is an error rather than a silent mix.

Processes (run.mesh.distributed): every process loads the model into its shards and runs every chunk's
generation and scoring (collectives), with identical results on each; process 0 alone reads and writes the
folder (manifest, chunks, trace, output, summary) and tells the others which chunks are done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jaxft.config import RunConfig
from jaxft.data.constitution import Principle, load_constitution
from jaxft.data.rows import RowError, parse_messages, read_rows
from jaxft.distributed import from_primary, is_primary
from jaxft.errors import JaxftError
from jaxft.files import write_json, write_jsonl
from jaxft.generate import Sampling, bucket, eos_token_ids, generate, row_bucket
from jaxft.runs import load_run
from jaxft.setup import build
from jaxft.sharding import batch_spec, command_mesh, to_host

ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
FEEDBACK_INTRO = ("Here is a conversation between a user and an AI assistant, followed by two possible replies "
                  "to the user's last message.")
FEEDBACK_PREFIX = "The better reply is ("  # appended after the chat template's assistant header
OPTIONS = ("A", "B")
LABEL_STREAM = 1_000_003  # the label stage's principle draws: rng([seed, row, LABEL_STREAM])


def say_err(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- prompts


def prompt_turns(row) -> list[dict]:
    """A prompt row → its chat turns up to and including the last user turn (RowError without one).
    Rows: {"messages": [...]} (later turns, e.g. the reference answer, are dropped), {"prompt": str | [...]}."""
    if not isinstance(row, dict):
        raise RowError("wrong type", "row is not an object")
    if "messages" in row:
        turns = parse_messages(row["messages"], "messages", ROLES)
    elif "prompt" in row:
        p = row["prompt"]
        turns = [{"role": "user", "content": p}] if isinstance(p, str) else parse_messages(p, "prompt", ROLES)
    else:
        raise RowError("missing field", "no 'messages' or 'prompt'")
    last = max((i for i, m in enumerate(turns) if m["role"] == "user" and m["content"].strip()), default=None)
    if last is None:
        raise RowError("no user turn", "no non-empty user turn to answer")
    return turns[:last + 1]


def read_prompts(path: str, limit: int = 0) -> tuple[list[tuple[int, list[dict]]], dict[str, int]]:
    """[(row index in the file, prompt turns)] and the skipped rows counted by reason."""
    out, skipped = [], {}
    for i, rec in enumerate(read_rows(path)):
        if limit and len(out) >= limit:
            break
        try:
            if isinstance(rec.row, RowError):
                raise rec.row
            out.append((i, prompt_turns(rec.row)))
        except RowError as e:
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
    if not out:
        raise JaxftError(f"{path}: no usable prompts ({', '.join(f'{n} {k}' for k, n in skipped.items()) or 'empty'})")
    return out, skipped


# ---------------------------------------------------------------- what each stage asks (pure; golden-tested)


def draw_principle(seed: int, row: int, step: int, n: int) -> int:
    """The principle of revision round `step` of prompt `row`: a pure function of (seed, row, step)."""
    return int(np.random.default_rng([seed, row, step]).integers(n))


def draw_comparisons(seed: int, row: int, k: int, n: int) -> list[int]:
    """The K comparison principles (without replacement, at most all n) of prompt `row`."""
    return np.random.default_rng([seed, row, LABEL_STREAM]).choice(n, size=min(k, n), replace=False).tolist()


def critique_turns(conversation: list[dict], p: Principle) -> list[dict]:
    return [*conversation, {"role": "user", "content": p.critique}]


def revision_turns(conversation: list[dict], p: Principle, critique: str) -> list[dict]:
    return [*critique_turns(conversation, p), {"role": "assistant", "content": critique},
            {"role": "user", "content": p.revision}]


def feedback_text(prompt: list[dict], question: str, first: str, second: str) -> str:
    """The judge's user message: the conversation, the comparison question, options (A) and (B)."""
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    convo = "\n".join(f"{names[m['role']]}: {m['content']}" for m in prompt)
    return (f"{FEEDBACK_INTRO}\n\n{convo}\n\n{question}\n\n(A) {first}\n\n(B) {second}\n\n"
            "Answer with (A) or (B).")


def render(tokenizer, messages: list[dict]) -> str:
    """The chat template's text of `messages`, ready for the assistant's reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise JaxftError("cai: the tokenizer has no chat template; the stages talk to the model as a chat")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def feedback_prompt(tokenizer, prompt, question, first, second) -> str:
    return render(tokenizer, [{"role": "user", "content": feedback_text(prompt, question, first, second)}]) \
        + FEEDBACK_PREFIX


def option_ids(tokenizer) -> np.ndarray:
    """Token ids of the option letters [2]; each must be one token."""
    ids = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in OPTIONS]
    bad = [o for o, i in zip(OPTIONS, ids) if len(i) != 1]
    if bad:
        raise JaxftError(f"cai label: option {bad[0]!r} is {len(ids[OPTIONS.index(bad[0])])} tokens for this "
                         "tokenizer; the label reads one next-token probability per option")
    return np.asarray([i[0] for i in ids], np.int32)


# ---------------------------------------------------------------- a model that answers and judges


@partial(jax.jit, static_argnames=("graphdef",))
def _option_logprobs(weights, tokens, positions, segment_ids, options, *, graphdef):
    """log p(option) [B, O] fp32 of the next token after each (left-padded) prompt tokens [B, P]."""
    model = nnx.merge(graphdef, *weights)
    h, _ = model.hidden(tokens, positions, segment_ids)
    logits = model.logits(h[:, -1]).astype(jnp.float32)  # [B, V]
    return jnp.take(jax.nn.log_softmax(logits, axis=-1), options, axis=-1)


@dataclasses.dataclass
class Policy:
    """Weights bound to generation and option scoring; `stats` counts tokens and seconds per kind."""

    name: str
    graphdef: object
    weights: tuple
    tokenizer: object
    eos: set
    mesh: object = None
    stats: dict = dataclasses.field(default_factory=dict)

    def _count(self, kind: str, tokens: int, seconds: float, rows: int):
        s = self.stats.setdefault(kind, {"tokens": 0, "seconds": 0.0, "rows": 0})
        s["tokens"] += tokens
        s["seconds"] += seconds
        s["rows"] += rows

    def answer(self, conversations: list[list[dict]], sampling: Sampling) -> list[dict]:
        """One reply per conversation: {"text", "prompt_tokens", "tokens", "truncated"}."""
        ids = [self.tokenizer(render(self.tokenizer, c), add_special_tokens=False)["input_ids"]
               for c in conversations]
        t0 = time.perf_counter()
        out = generate(self.graphdef, self.weights, ids, eos_ids=self.eos, sampling=sampling, mesh=self.mesh)
        new = out.ids()
        self._count("generate", int(sum(map(len, new))), time.perf_counter() - t0, len(ids))
        return [dict(text=self.tokenizer.decode(n, skip_special_tokens=True).strip(), prompt_tokens=len(p),
                     tokens=len(n), truncated=not bool(s)) for p, n, s in zip(ids, new, out.stopped)]

    def option_logprobs(self, texts: list[str], batch_size: int) -> np.ndarray:
        """log p(option letter) [N, 2] after each prompt text, `batch_size` prompts per call."""
        opts = option_ids(self.tokenizer)
        out = np.zeros((len(texts), len(opts)), np.float64)
        for k in range(0, len(texts), batch_size):
            ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[k:k + batch_size]]
            t0 = time.perf_counter()
            out[k:k + len(ids)] = self._score(ids, opts)
            self._count("score", int(sum(map(len, ids))), time.perf_counter() - t0, len(ids))
        return out

    def _score(self, ids: list[list[int]], opts: np.ndarray) -> np.ndarray:
        R, P = row_bucket(len(ids)), bucket(max(map(len, ids)), 64)
        tokens, seg = np.zeros((R, P), np.int32), np.zeros((R, P), np.int32)
        for i, p in enumerate(ids + [ids[0]] * (R - len(ids))):
            tokens[i, P - len(p):], seg[i, P - len(p):] = p, 1
        pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
        args = (tokens, pos, seg)
        if self.mesh is not None:  # every process holds the same rows; each device takes its own
            rows = NamedSharding(self.mesh, batch_spec(self.mesh, R))
            args = tuple(jax.make_array_from_callback(a.shape, rows, lambda i, a=a: a[i]) for a in args)
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            lp = _option_logprobs(self.weights, *args, opts, graphdef=self.graphdef)
        return to_host(lp).astype(np.float64)[:len(ids)]


def load_policy(run: RunConfig, model: str | None = None, run_dir: str | Path | None = None, mesh=None) -> Policy:
    """A plain model (`model`, default run.model.path), or a training run's newest checkpoint (`run_dir`,
    built from its own config.json)."""
    if run_dir is not None:
        done = load_run(run_dir, mesh=mesh)
        setup, params, name = done.setup, done.params, str(run_dir)
    else:
        r = dataclasses.replace(run, objective="sft", lora=dataclasses.replace(run.lora, enabled=False),
                                model=dataclasses.replace(run.model, path=model or run.model.path))
        setup = build(r, mesh)
        params, name = setup.params, r.model.path
    return Policy(name, setup.graphdef, (params, setup.frozen), setup.tokenizer,
                  eos_token_ids(setup.tokenizer, setup.model_path), mesh)


# ---------------------------------------------------------------- chunks: atomic, resumable


def _identity(path: str) -> list:
    """What a model or data path contributes to a fingerprint: names, sizes and mtimes of its files."""
    p = Path(path).expanduser()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in (".safetensors", ".json", ".gguf"))
    else:
        return [str(path)]
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def fingerprint(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def chunked(out_dir: Path, items: list, size: int, key: str, work, say=say_err) -> list[dict]:
    """work(chunk index, items of the chunk) → rows, for every chunk not already on disk; all rows in order
    (process 0's; the other processes run the same work and get [])."""
    primary, n = is_primary(), -(-len(items) // size)
    manifest, chunks = out_dir / "manifest.json", out_dir / "chunks"
    want = {"fingerprint": key, "chunk_size": size, "items": len(items)}
    files = [chunks / f"{k:05d}.jsonl" for k in range(n)]
    state = np.zeros(n + 1, np.int32)  # [manifest differs, chunk k on disk...]: process 0 looks, all act on it
    if primary:
        state[0] = manifest.is_file() and json.loads(manifest.read_text()) != want
        state[1:] = [f.is_file() for f in files]
    state = from_primary(state)
    if state[0]:
        raise JaxftError(f"{out_dir}: holds chunks of other settings, model or data (manifest.json differs); "
                         "use another cai.out_dir or remove that folder")
    if primary:
        chunks.mkdir(parents=True, exist_ok=True)
        if not manifest.is_file():
            write_json(manifest, want, indent=None)
    rows = []
    for k, f in enumerate(files):
        if state[k + 1]:
            rows += [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines()] if primary else []
            continue
        got = work(k, items[k * size:(k + 1) * size])
        if primary:
            write_chunk(f, got)
            rows += got
            say(f"{out_dir.name}: chunk {k + 1}/{n} done")
    return rows


def write_chunk(path: Path, rows: list[dict]) -> None:
    write_jsonl(path, rows)


def _sampling(cfg, chunk: int, call: int, temperature=None) -> Sampling:
    seed = int(np.random.default_rng([cfg.seed, chunk, call]).integers(2**31 - 1))
    return Sampling(temperature=cfg.temperature if temperature is None else temperature, top_p=cfg.top_p,
                    max_new_tokens=cfg.max_new_tokens, seed=seed)


# ---------------------------------------------------------------- the supervised stage


def revise(run: RunConfig, out_dir: str | Path | None = None, policy: Policy | None = None, say=say_err) -> dict:
    """Answer → N × (critique → revision) for every prompt; writes sft.jsonl and trace.jsonl; returns a summary."""
    cfg = run.cai
    out = Path(out_dir or Path(cfg.out_dir) / "revise")
    const = load_constitution(cfg.constitution)
    principles = const.revisers()
    prompts, skipped = read_prompts(cfg.prompts, cfg.max_prompts)
    policy = policy or load_policy(run, mesh=command_mesh(run.mesh))
    key = fingerprint(stage="revise", model=_identity(policy.name), constitution=const.sha256,
                      prompts=_identity(cfg.prompts), cfg=[cfg.max_prompts, cfg.revisions, cfg.few_shot,
                                                           cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed])
    prefix = list(const.few_shot) if cfg.few_shot else []

    def work(k, chunk):
        convs = [prefix + turns for _, turns in chunk]
        answers = policy.answer(convs, _sampling(cfg, k, 0))
        rows = [dict(row=i, prompt=turns, answer=a["text"], answer_tokens=a["tokens"], steps=[], skipped=None)
                for (i, turns), a in zip(chunk, answers)]
        for r, a, c in zip(rows, answers, convs):
            c.append({"role": "assistant", "content": a["text"]})
            if not a["text"]:
                r["skipped"] = "empty answer"
        for step in range(cfg.revisions):
            live = [j for j, r in enumerate(rows) if not r["skipped"]]
            if not live:
                break
            ps = {j: principles[draw_principle(cfg.seed, rows[j]["row"], step, len(principles))] for j in live}
            crit = policy.answer([critique_turns(convs[j], ps[j]) for j in live], _sampling(cfg, k, 2 * step + 1))
            rev = policy.answer([revision_turns(convs[j], ps[j], c["text"]) for j, c in zip(live, crit)],
                                _sampling(cfg, k, 2 * step + 2))
            for j, c, v in zip(live, crit, rev):
                convs[j][:] = revision_turns(convs[j], ps[j], c["text"]) + [{"role": "assistant",
                                                                             "content": v["text"]}]
                rows[j]["steps"].append(dict(principle=ps[j].name, critique_request=ps[j].critique,
                                             critique=c["text"], revision_request=ps[j].revision,
                                             revision=v["text"], prompt_tokens=[c["prompt_tokens"],
                                                                                v["prompt_tokens"]],
                                             tokens=[c["tokens"], v["tokens"]],
                                             truncated=[c["truncated"], v["truncated"]]))
        return rows

    rows = chunked(out, prompts, cfg.batch_size, key, work, say)
    if not is_primary():
        return {}
    sft, counts = [], dict(skipped)
    for r in rows:
        final = next((s["revision"] for s in reversed(r["steps"]) if s["revision"]), None)
        why = r["skipped"] or (None if final else "empty revisions")
        if why:
            counts[why] = counts.get(why, 0) + 1
        else:
            sft.append({"messages": [*r["prompt"], {"role": "assistant", "content": final}]})
    write_jsonl(out / "trace.jsonl", rows)
    write_jsonl(out / "sft.jsonl", sft)
    summary = dict(prompts=len(prompts), sft_rows=len(sft), skipped=counts, out=str(out / "sft.jsonl"),
                   stats=policy.stats)
    write_json(out / "summary.json", summary)
    return summary


# ---------------------------------------------------------------- the feedback stage


def judge(judge_policy: Policy, prompt, firsts_seconds, questions, cfg) -> list[dict]:
    """P(first better) of each (prompt, first, second) item under each question, in both option orders
    when cfg.both_orders: [{"p": mean, "votes": [[principle, order, ℓ_A, ℓ_B, p_first]]}]."""
    texts, where = [], []
    for n, (pr, (first, second), qs) in enumerate(zip(prompt, firsts_seconds, questions)):
        for q in qs:
            texts.append(feedback_prompt(judge_policy.tokenizer, pr, q.compare, first, second))
            where.append((n, q.name, "AB"))
            if cfg.both_orders:
                texts.append(feedback_prompt(judge_policy.tokenizer, pr, q.compare, second, first))
                where.append((n, q.name, "BA"))
    lp = judge_policy.option_logprobs(texts, cfg.label_batch_size) if texts else np.zeros((0, 2))
    out = [dict(p=None, votes=[]) for _ in prompt]
    for (n, name, order), (la, lb) in zip(where, lp):
        p_a = 1.0 / (1.0 + np.exp(lb - la))  # softmax([ℓ_A, ℓ_B])[0]
        out[n]["votes"].append([name, order, float(la), float(lb), float(p_a if order == "AB" else 1.0 - p_a)])
    for o in out:
        o["p"] = float(np.mean([v[-1] for v in o["votes"]]))
    return out


def label(run: RunConfig, out_dir: str | Path | None = None, policy: Policy | None = None,
          feedback: Policy | None = None, say=say_err) -> dict:
    """Two answers per prompt, judged per drawn principle and order; writes pairs.jsonl and trace.jsonl."""
    cfg = run.cai
    out = Path(out_dir or Path(cfg.out_dir) / "label")
    const = load_constitution(cfg.feedback_constitution or cfg.constitution)
    comparers = const.comparers()
    prompts, skipped = read_prompts(cfg.label_prompts or cfg.prompts, cfg.max_prompts)
    mesh = None if policy and (feedback or not cfg.feedback_model) else command_mesh(run.mesh)
    policy = policy or load_policy(run, mesh=mesh)
    feedback = feedback or (load_policy(run, cfg.feedback_model, mesh=mesh) if cfg.feedback_model else policy)
    option_ids(feedback.tokenizer)  # fail before generating when the judge cannot read the options
    key = fingerprint(stage="label", model=_identity(policy.name), judge=_identity(feedback.name),
                      constitution=const.sha256, prompts=_identity(cfg.label_prompts or cfg.prompts),
                      cfg=[cfg.max_prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed,
                           cfg.principles_per_pair, cfg.both_orders])

    def work(k, chunk):
        sampling = _sampling(cfg, k, 0, temperature=cfg.temperature or 1.0)  # two answers must be able to differ
        got = policy.answer([turns for _, turns in chunk for _ in (0, 1)], sampling)
        rows, todo = [], []
        for j, (i, turns) in enumerate(chunk):
            a, b = got[2 * j]["text"], got[2 * j + 1]["text"]
            why = "empty answer" if not (a and b) else "identical answers" if a == b else None
            rows.append(dict(row=i, prompt=turns, first=a, second=b, skipped=why, p_first=None, votes=[]))
            if not why:
                todo.append(j)
        qs = [[comparers[q] for q in draw_comparisons(cfg.seed, rows[j]["row"], cfg.principles_per_pair,
                                                      len(comparers))] for j in todo]
        verdicts = judge(feedback, [rows[j]["prompt"] for j in todo],
                         [(rows[j]["first"], rows[j]["second"]) for j in todo], qs, cfg)
        for j, v in zip(todo, verdicts):
            rows[j]["p_first"], rows[j]["votes"] = v["p"], v["votes"]
        return rows

    rows = chunked(out, prompts, cfg.batch_size, key, work, say)
    if not is_primary():
        return {}
    pairs, counts = [], dict(skipped)
    for r in rows:
        if r["skipped"]:
            counts[r["skipped"]] = counts.get(r["skipped"], 0) + 1
            continue
        pairs.append(pair_row(r, cfg.clamp))
    write_jsonl(out / "trace.jsonl", rows)
    write_jsonl(out / "pairs.jsonl", pairs)
    conf = [p["confidence"] for p in pairs]
    summary = dict(prompts=len(prompts), pairs=len(pairs), skipped=counts, out=str(out / "pairs.jsonl"),
                   mean_confidence=float(np.mean(conf)) if conf else None,
                   first_chosen=float(np.mean([r["p_first"] >= 0.5 for r in rows if not r["skipped"]]))
                   if pairs else None, stats={"policy": policy.stats, "judge": feedback.stats})
    write_json(out / "summary.json", summary)
    return summary


def pair_row(r: dict, clamp: tuple[float, ...] = ()) -> dict:
    """A judged trace row → a preference row: chosen = the likelier side, confidence = its probability."""
    p = float(np.clip(r["p_first"], *clamp)) if clamp else r["p_first"]
    first_wins = p >= 0.5
    chosen, rejected = (r["first"], r["second"]) if first_wins else (r["second"], r["first"])
    return {"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "confidence": p if first_wins else 1.0 - p}

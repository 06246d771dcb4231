"""`jaxft generate` and `jaxft chat`: a model (+ a bank of adapters) answering prompts on the command line.

    generate_answers("example", ["Name three colors."], sampling=Sampling(max_new_tokens=64))
    chat("runs/quickstart/merged", sampling=Sampling(temperature=0.7))

On a mesh (`--mesh`, over processes too) the weights are read into their shards and the prompts' rows split over
it; every process generates the same tokens, process 0 prints them.
"""

from __future__ import annotations

import sys
import time

import jax.numpy as jnp
from flax import nnx

from jaxft import runs, sharding
from jaxft.adapters import bank
from jaxft.config import MeshConfig
from jaxft.distributed import is_primary
from jaxft.errors import JaxftError
from jaxft.formats.hf import load_pretrained, load_tokenizer
from jaxft.generate import Generator, Sampling, chat_prompt, eos_token_ids
from jaxft.setup import resolve_model


def load(model: str, *, dtype: str = "fp32", adapters: list[str] = (), use: list[str] = (),
         mesh: MeshConfig = MeshConfig()):
    """(generator, tokenizer, eos ids) of a model (+ a bank of --adapter sources) on `mesh`, with the load time on
    stderr. The adapters' names (and --use's) are checked before the model loads."""
    if use and not adapters:
        raise JaxftError("--use names an adapter: give the adapters with --adapter NAME=DIR")
    sources = runs.expand(list(adapters)) if adapters else []
    if use:  # an unknown name: said now, not after the model load
        bank.ids(tuple(n for n, _ in sources), list(use), where="--use")
    path = resolve_model(model)
    on = sharding.command_mesh(mesh)
    say = (lambda *a: print(*a, file=sys.stderr)) if is_primary() else (lambda *a: None)
    t0 = time.perf_counter()
    decoder = load_pretrained(path, dtype=jnp.bfloat16 if dtype == "bf16" else jnp.float32,
                              sharding=sharding.param_sharding(on, mesh.strategy))
    tokenizer = load_tokenizer(path)
    if adapters:
        names = runs.load_bank(decoder, list(adapters), base=str(path), sources=sources)
        state = nnx.state(decoder)  # the bank is read on one device: its factors go to their shards
        nnx.update(decoder, sharding.place(state, sharding.tree_shardings(state, on, mesh.strategy)))
        say(f"adapters: {', '.join(names)}")
    say(f"loaded {path} in {time.perf_counter() - t0:.1f}s")
    return Generator(decoder, mesh=on), tokenizer, eos_token_ids(tokenizer, path)


def rows_of(gen, n_prompts: int, adapters, use) -> tuple[list[int], list[str | None]]:
    """(prompt index, adapter name) per generated row: --use once (every prompt), once per prompt, or, with
    adapters and no --use, every adapter on every prompt; without adapters one row per prompt."""
    if not adapters:
        return list(range(n_prompts)), [None] * n_prompts
    names = gen.adapter_names
    if not use:
        return [i for _ in names for i in range(n_prompts)], [n for n in names for _ in range(n_prompts)]
    if len(use) not in (1, n_prompts):
        raise JaxftError(f"--use: give it once or once per --prompt ({n_prompts}), not {len(use)} times")
    use = list(use) * n_prompts if len(use) == 1 else list(use)
    bank.ids(names, use, where="--use")  # unknown names: one line
    return list(range(n_prompts)), use


def messages(system: str | None, history: list[dict]) -> list[dict]:
    """The conversation with the system message first (when there is one)."""
    return ([{"role": "system", "content": system}] if system else []) + history


def generate_answers(model: str, prompts: list[str], *, sampling: Sampling, system: str | None = None,
                     raw: bool = False, dtype: str = "fp32", adapters: list[str] = (), use: list[str] = (),
                     mesh: MeshConfig = MeshConfig()) -> None:
    """`jaxft generate`: answer each prompt (chat template applied unless raw) and print the answers; with
    adapters, the adapters named by `use` (or every adapter) answer, in mixed-adapter batches."""
    if adapters and use and len(use) not in (1, len(prompts)):  # before the model loads
        raise JaxftError(f"--use: give it once or once per --prompt ({len(prompts)}), not {len(use)} times")
    gen, tok, eos = load(model, dtype=dtype, adapters=adapters, use=use, mesh=mesh)
    ids = [tok(p, add_special_tokens=True)["input_ids"] if raw
           else chat_prompt(tok, messages(system, [{"role": "user", "content": p}]))
           for p in prompts]
    which, use = rows_of(gen, len(prompts), adapters, use)
    t0 = time.perf_counter()
    answers = gen([ids[i] for i in which], eos_ids=eos, sampling=sampling, adapters=use if adapters else None)
    n = sum(map(len, answers))
    if not is_primary():
        return
    for i, u, out in zip(which, use, answers):
        if len(answers) > 1:
            print(f"--- [{i}]{f' ({u})' if u else ''} {prompts[i]}")
        print(tok.decode(out, skip_special_tokens=True).strip())
    print(f"{n} tokens in {time.perf_counter() - t0:.1f}s", file=sys.stderr)


class Stream:
    """Prints an answer as its tokens arrive (called from inside the generation program)."""

    def __init__(self, tokenizer, eos):
        self.tok, self.eos = tokenizer, eos
        self.start()

    def start(self):
        self.ids, self.shown, self.ended = [], 0, False

    def __call__(self, tok_ids):
        if self.ended or int(tok_ids[0]) in self.eos:
            self.ended = True
            return
        self.ids.append(int(tok_ids[0]))
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        print(text[self.shown:], end="", flush=True)
        self.shown = len(text)


CHAT_HELP = ("commands: /reset forgets the conversation, /use NAME switches the adapter (or base) that answers, "
             "/quit (or Ctrl-D, or an empty line) ends, /help shows this; start a line with // to send one that "
             "begins with /")


def chat(model: str, *, sampling: Sampling, system: str | None = None, dtype: str = "fp32", adapters: list[str] = (),
         use: list[str] = (), mesh: MeshConfig = MeshConfig()) -> None:
    """`jaxft chat`: an interactive conversation (reads lines from stdin when it is not a terminal). Lines
    starting with / are commands (CHAT_HELP), never sent to the model. On one process (it reads stdin); `mesh`
    spreads the model over that process's devices."""
    if len(use) > 1:
        raise JaxftError(f"--use: chat takes one (the adapter that answers first), not {len(use)}")
    if mesh.distributed:
        raise JaxftError("chat: runs on one process (it reads stdin); leave out --mesh distributed=true "
                         "(--mesh fsdp=-1 spreads the model over this process's devices)")
    gen, tok, eos = load(model, dtype=dtype, adapters=adapters, use=use, mesh=mesh)
    interactive = sys.stdin.isatty()
    history: list[dict] = []
    who = None
    if adapters:
        names = gen.adapter_names
        who = use[0] if use else names[0]
        bank.ids(names, [who], where="--use")
    stream = Stream(tok, eos)  # one callable for the session: it is part of the generation program's key
    if interactive:
        print("Chat with the model; an empty line or Ctrl-D ends, /help lists the commands.")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            if interactive:
                break
            continue
        if not interactive:
            print(f"you> {line}")
        if line.startswith("/") and not line.startswith("//"):  # a command, never a message to the model
            command, _, arg = line.partition(" ")
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                history = []
                print("(conversation forgotten)")
            elif command == "/help":
                print(CHAT_HELP)
            elif command == "/use" and adapters and arg.strip():  # switch adapter (or base) mid-conversation
                try:
                    bank.ids(names, [arg.strip()], where="/use")
                    who = arg.strip()
                    print(f"(now answering: {who})")
                except JaxftError as e:
                    print(f"jaxft: {e}")
            elif command == "/use":
                print("(/use NAME: give the adapters with --adapter NAME=DIR" + (f"; these are {', '.join(names)})"
                                                                                 if adapters else ")"))
            else:
                print(f"(unknown command {command}; /help lists them)")
            continue
        line = line[1:] if line.startswith("//") else line
        history.append({"role": "user", "content": line})
        stream.start()
        print("model> ", end="", flush=True)
        answer = gen([chat_prompt(tok, messages(system, history))], eos_ids=eos, sampling=sampling,
                     on_token=stream, adapters=None if who is None else [who])[0]
        print()
        history.append({"role": "assistant", "content": tok.decode(answer, skip_special_tokens=True).strip()})

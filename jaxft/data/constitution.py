"""Constitutions: the principles Constitutional AI critiques, revises and compares answers against.

    c = load_constitution("configs/constitutions/default.yaml")
    c.principles[0]      # Principle(name="harm", critique="...", revision="...", compare="...")
    c.few_shot           # worked examples as earlier chat turns: [{"role": "user", ...}, {"role": "assistant", ...}]

jaxft's layout (YAML or JSON), every text field a non-empty string:

    name: default
    principles:
      - name: harm                      # unique; named in errors and in trace.jsonl
        critique: "Point out ..."       # critique request (supervised stage)
        revision: "Rewrite ..."         # revision request (supervised stage)
        compare: "Which reply ..."      # comparison question (feedback stage)
    examples:                           # optional worked examples of one critique → revision round
      - principle: harm
        prompt: "..."
        answer: "..."
        critique: "..."
        revision: "..."

A principle needs (critique, revision), compare, or all three; `revise` uses the first kind, `label` the
second. Also read, as released (CAI.md §1.2), with the request texts taken out of their separators:
- Anthropic's CritiqueRevisionInstructions.json: {"<name>": {"prompt": ["\\n\\nCritiqueRequest: ...\\n\\nCritique:"],
  "edit_request": "\\n\\nRevisionRequest: ...\\n\\nRevision:"}};
- Anthropic's RLMadisonInstructions.json: a list of comparison questions ("\\n... Options:");
- llm-swarm's {"constitutions": [{"critic", "revision"}], "system_chat": [[messages]]} (+ our optional
  "feedback_principles": [question]); system_chat becomes the few-shot turns.
Nothing here imports jax.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

from jaxft.config.load import read_yaml
from jaxft.errors import JaxftError
from jaxft.files import read_json

PRINCIPLE_KEYS = ("name", "critique", "revision", "compare")
EXAMPLE_KEYS = ("principle", "prompt", "answer", "critique", "revision")


@dataclasses.dataclass(frozen=True)
class Principle:
    name: str
    critique: str | None = None  # critique request
    revision: str | None = None  # revision request
    compare: str | None = None  # comparison question


@dataclasses.dataclass(frozen=True)
class Constitution:
    name: str
    principles: tuple[Principle, ...]
    few_shot: tuple[dict, ...]  # chat messages put before every revise-stage conversation
    source: str
    sha256: str

    def revisers(self) -> tuple[Principle, ...]:
        """The principles with a critique and a revision request (what `revise` draws from)."""
        got = tuple(p for p in self.principles if p.critique)
        if not got:
            raise JaxftError(f"{self.source}: no principle has a critique and a revision request (cai revise needs one)")
        return got

    def comparers(self) -> tuple[Principle, ...]:
        """The principles with a comparison question (what `label` draws from)."""
        got = tuple(p for p in self.principles if p.compare)
        if not got:
            raise JaxftError(f"{self.source}: no principle has a comparison question ('compare'; cai label needs one)")
        return got


def load_constitution(path: str | Path) -> Constitution:
    """A constitution file in any of the layouts above; a bad one is a one-line JaxftError naming the
    principle (or example) and the field."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise JaxftError(f"{p}: no such constitution file")
    raw = p.read_bytes()
    if p.suffix == ".json":
        data = read_json(p)
    else:  # strictly: a key given twice, merge keys, several documents are errors (jaxft.config.load)
        data = read_yaml(raw, str(p), "not valid YAML")
    where = str(p)
    if isinstance(data, list):
        principles, few_shot, name = _madison(data, where), (), p.stem
    elif isinstance(data, dict) and "constitutions" in data:
        principles, few_shot, name = _swarm(data, where), _swarm_chat(data, where), p.stem
    elif isinstance(data, dict) and "principles" in data:
        principles, few_shot, name = _ours(data, where)
    elif isinstance(data, dict) and data and all(isinstance(v, dict) and "edit_request" in v for v in data.values()):
        principles, few_shot, name = _anthropic(data, where), (), p.stem
    else:
        raise JaxftError(f"{where}: not a constitution (expected 'principles:', Anthropic's released JSON layouts or "
                         "llm-swarm's 'constitutions')")
    names = [q.name for q in principles]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise JaxftError(f"{where}: principle {dup!r}: name: used twice")
    if not principles:
        raise JaxftError(f"{where}: principles: none given")
    return Constitution(name, tuple(principles), tuple(few_shot), where, hashlib.sha256(raw).hexdigest())


def _items(data: dict, key: str, where: str) -> list:
    """data[key] as a list (absent or null: empty); anything else is a one-line error."""
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise JaxftError(f"{where}: {key}: expected a list, got {type(value).__name__}")
    return value


def _text(value, where: str, field: str) -> str:
    if not isinstance(value, str) or isinstance(value, bool):
        raise JaxftError(f"{where}: {field}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise JaxftError(f"{where}: {field}: is empty")
    return value.strip()


def _ours(data: dict, where: str):
    unknown = sorted(set(map(str, data)) - {"name", "principles", "examples"})
    if unknown:
        raise JaxftError(f"{where}: {unknown[0]}: unknown key (known: name, principles, examples)")
    name = _text(data.get("name", Path(where).stem), where, "name")
    items = data["principles"]
    if not isinstance(items, list):
        raise JaxftError(f"{where}: principles: expected a list of principles")
    principles = []
    for i, item in enumerate(items):
        label = f"principle #{i + 1}"
        if not isinstance(item, dict):
            raise JaxftError(f"{where}: {label}: expected a mapping with {', '.join(PRINCIPLE_KEYS)}")
        if "name" in item:
            label = f"principle {_text(item['name'], f'{where}: {label}', 'name')!r}"
        unknown = sorted(set(map(str, item)) - set(PRINCIPLE_KEYS))
        if unknown:
            raise JaxftError(f"{where}: {label}: {unknown[0]}: unknown field (known: {', '.join(PRINCIPLE_KEYS)})")
        if "name" not in item:
            raise JaxftError(f"{where}: {label}: name: missing")
        fields = {k: _text(item[k], f"{where}: {label}", k) for k in PRINCIPLE_KEYS[1:] if item.get(k) is not None}
        if ("critique" in fields) != ("revision" in fields):
            missing = "revision" if "critique" in fields else "critique"
            raise JaxftError(f"{where}: {label}: {missing}: missing (critique and revision come together)")
        if not fields:
            raise JaxftError(f"{where}: {label}: critique: missing (give critique + revision, compare, or all three)")
        principles.append(Principle(item["name"].strip(), **fields))
    by_name = {q.name: q for q in principles}
    few_shot = []
    for i, ex in enumerate(_items(data, "examples", where)):
        label = f"{where}: example #{i + 1}"
        if not isinstance(ex, dict):
            raise JaxftError(f"{label}: expected a mapping with {', '.join(EXAMPLE_KEYS)}")
        unknown = sorted(set(map(str, ex)) - set(EXAMPLE_KEYS))
        if unknown:
            raise JaxftError(f"{label}: {unknown[0]}: unknown field (known: {', '.join(EXAMPLE_KEYS)})")
        missing = [k for k in EXAMPLE_KEYS if k not in ex]
        if missing:
            raise JaxftError(f"{label}: {missing[0]}: missing")
        t = {k: _text(ex[k], label, k) for k in EXAMPLE_KEYS}
        q = by_name.get(t["principle"])
        if q is None or not q.critique:
            raise JaxftError(f"{label}: principle: {t['principle']!r} is not a principle with critique and revision")
        few_shot += [{"role": "user", "content": t["prompt"]}, {"role": "assistant", "content": t["answer"]},
                     {"role": "user", "content": q.critique}, {"role": "assistant", "content": t["critique"]},
                     {"role": "user", "content": q.revision}, {"role": "assistant", "content": t["revision"]}]
    return principles, few_shot, name


def _strip(text, where: str, field: str, head: str | None, tail: str) -> str:
    """'\\n\\nHead: <request>\\n\\nTail:' → '<request>' (the released separators, with or without a space)."""
    text = _text(text, where, field)
    if head:
        text = re.sub(rf"\A{head}\s*:\s*", "", text)
    return _text(re.sub(rf"\s*{tail}\s*:\Z", "", text), where, field)


def _anthropic(data: dict, where: str) -> list[Principle]:
    out = []
    for name, v in data.items():
        label = f"{where}: principle {str(name)!r}"
        prompts = v.get("prompt")
        if isinstance(prompts, list) and prompts:
            prompts = prompts[0]
        critique = _strip(prompts, label, "prompt", r"Critique\s?Request", "Critique")
        revision = _strip(v.get("edit_request"), label, "edit_request", r"Revision\s?Request", "Revision")
        out.append(Principle(str(name), critique, revision))
    return out


def _madison(data: list, where: str) -> list[Principle]:
    return [Principle(f"compare{i}", compare=_strip(q, f"{where}: principle 'compare{i}'", "question", None,
                                                     "Options")) for i, q in enumerate(data)]


def _swarm(data: dict, where: str) -> list[Principle]:
    items = data["constitutions"]
    if not isinstance(items, list):
        raise JaxftError(f"{where}: constitutions: expected a list of {{critic, revision}}")
    out = []
    for i, item in enumerate(items):
        label = f"{where}: principle 'c{i}'"
        if not isinstance(item, dict):
            raise JaxftError(f"{label}: expected a mapping with critic and revision")
        out.append(Principle(f"c{i}", _text(item.get("critic"), label, "critic"),
                             _text(item.get("revision"), label, "revision")))
    for i, q in enumerate(_items(data, "feedback_principles", where)):
        out.append(Principle(f"compare{i}", compare=_text(q, f"{where}: principle 'compare{i}'", "question")))
    return out


def _swarm_chat(data: dict, where: str) -> list[dict]:
    out = []
    for i, conv in enumerate(_items(data, "system_chat", where)):
        for j, m in enumerate(conv if isinstance(conv, list) else [None]):
            label = f"{where}: system_chat[{i}][{j}]"
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system"):
                raise JaxftError(f"{label}: role: expected a message with role user / assistant / system")
            out.append({"role": m["role"], "content": _text(m.get("content"), label, "content")})
    return out

"""A small seeded fine-tuning task: extract a record's fields into strict JSON.

The user message is a fixed instruction followed by a short business record (an order, a booking, an
invoice, a refund...) written in one of several styles (a sentence, labelled lines, a terse note, an
email) with random names, cities, dates, amounts and distractors (reference numbers, items,
quantities, a country after the city, a title before the name) in random orders. The answer is one
line of JSON with four keys in this fixed order:

    {"name": "Priya Shah", "city": "Lisbon", "date": "2024-03-03", "amount": 1234.5}

- name: first and last name, without a title ("Dr. Priya Shah" → "Priya Shah"),
- city: the city alone ("Lisbon, Portugal" → "Lisbon"),
- date: ISO 8601 whatever the record's format ("Sunday, March 3rd, 2024", "3 Mar 2024" → "2024-03-03"),
- amount: a JSON number, no currency or thousands separator ("$1,234.50" → 1234.5, "€40.00" → 40).

The base SmolLM2-135M-Instruct never gets it exactly right (it keeps the record's date and currency
formats, quotes amounts, adds keys, code fences and prose); a LoRA learns it in a few dozen steps.
Measured on 48 test rows of seed 0, greedy, max 64 new tokens (json_fields exact / field_accuracy):
base 0.00 / 0.10; LoRA r=16 all-linear, lr 1e-3, batch 8: 5 steps 0.52 / 0.84, 10 steps
0.54 / 0.68, 20 steps 0.92 / 0.97. Rows are 133-184 tokens with the chat template (max_length 192
fits them all), answers 35-48 tokens (max_new_tokens 64 is enough).

    rows = make_examples(4, seed=0)        # [{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}]
    paths = write_task_files("data/extract", n_train=400, n_validation=32, n_test=48, seed=0)

`make_examples(n, seed)` is a prefix of `make_examples(m, seed)` for n < m, and its user messages
are all different; the splits written by `write_task_files` are consecutive slices of one such list,
so no user message appears in two splits.
"""

from __future__ import annotations

import calendar
import datetime as dt
import json
import random
from pathlib import Path

from jaxft.files import write_jsonl

KEYS = ("name", "city", "date", "amount")

INSTRUCTION = ('Reply with only a JSON object with the keys "name", "city", "date" (YYYY-MM-DD) and '
               '"amount" (a number) taken from this record:')

FIRST = """Priya Liam Sofia Mateo Aisha Noah Elena Yuki Omar Chloe Ravi Ingrid Diego Hana Kwame Laura Tomas
Mei Jonas Fatima Lucas Amara Pablo Nadia Erik Zara Hugo Leila Marco Anya Felix Rosa Samuel Ines Kenji
Olga Victor Maya Ahmed Clara Daniel Freya Arjun Lucia Ben Tara Oscar Sana Paul Greta""".split()
LAST = """Shah Okafor Rossi Novak Tanaka Garcia Müller Dubois Kowalski Haddad Silva Jensen Nguyen Moreau
Fischer Costa Ivanova Mensah Patel Lindqvist Romero Kim Schmidt Bianchi Adeyemi Horvat Sato Moreno
Larsen Chen Fernandes Weber Papadopoulos Kaur Murphy Santos Berg Ali Nakamura Fontaine""".split()
CITIES = [  # (city, country)
    ("Lisbon", "Portugal"), ("Porto", "Portugal"), ("Madrid", "Spain"), ("Valencia", "Spain"),
    ("Lyon", "France"), ("Marseille", "France"), ("Berlin", "Germany"), ("Hamburg", "Germany"),
    ("Munich", "Germany"), ("Vienna", "Austria"), ("Zurich", "Switzerland"), ("Milan", "Italy"),
    ("Turin", "Italy"), ("Naples", "Italy"), ("Athens", "Greece"), ("Krakow", "Poland"),
    ("Gdansk", "Poland"), ("Prague", "Czechia"), ("Brno", "Czechia"), ("Budapest", "Hungary"),
    ("Oslo", "Norway"), ("Bergen", "Norway"), ("Uppsala", "Sweden"), ("Malmo", "Sweden"),
    ("Aarhus", "Denmark"), ("Tampere", "Finland"), ("Dublin", "Ireland"), ("Cork", "Ireland"),
    ("Leeds", "UK"), ("Bristol", "UK"), ("Glasgow", "UK"), ("Toronto", "Canada"),
    ("Calgary", "Canada"), ("Denver", "USA"), ("Austin", "USA"), ("Portland", "USA"),
    ("Boston", "USA"), ("Chicago", "USA"), ("Seattle", "USA"), ("Osaka", "Japan"),
    ("Nagoya", "Japan"), ("Busan", "South Korea"), ("Pune", "India"), ("Chennai", "India"),
    ("Nairobi", "Kenya"), ("Accra", "Ghana"), ("Lagos", "Nigeria"), ("Cairo", "Egypt"),
    ("Santiago", "Chile"), ("Lima", "Peru"), ("Bogota", "Colombia"), ("Perth", "Australia"),
    ("Adelaide", "Australia"), ("Auckland", "New Zealand"),
]
ITEMS = """desk lamp|office chair|coffee grinder|yoga mat|rain jacket|bookshelf|monitor stand|espresso cups|
hiking boots|wireless keyboard|plant pots|winter tires|standing desk|camera bag|water filter|bike helmet|
kitchen scale|wool blanket|garden hose|travel adapter""".replace("\n", "").split("|")
# record kind → (noun, verb phrase for "<name> <verb> ...", label for the amount)
KINDS = [
    ("order", "placed an order", "Total"),
    ("booking", "made a booking", "Price"),
    ("invoice", "paid an invoice", "Amount due"),
    ("refund", "received a refund", "Refund"),
    ("donation", "made a donation", "Donation"),
    ("subscription", "renewed a subscription", "Charged"),
    ("payment", "made a payment", "Paid"),
]
TITLES = ["Dr.", "Prof."]
CURRENCIES = [("$", "USD"), ("€", "EUR"), ("£", "GBP")]


def _ordinal(d: int) -> str:
    suffix = "th" if 11 <= d % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    return f"{d}{suffix}"


def _say_date(rng: random.Random, date: dt.date) -> str:
    m, mm, d, y = calendar.month_name[date.month], calendar.month_abbr[date.month], date.day, date.year
    wd = calendar.day_name[date.weekday()]
    return rng.choice([
        f"{m} {_ordinal(d)}, {y}", f"{m} {d}, {y}", f"{d} {m} {y}", f"{mm} {d}, {y}", f"{d} {mm} {y}",
        f"the {_ordinal(d)} of {m}, {y}", f"{wd}, {m} {d}, {y}", f"{wd} {_ordinal(d)} {m} {y}",
        f"{d}. {m} {y}", f"{y}-{date.month:02d}-{date.day:02d}", f"{y}/{date.month:02d}/{date.day:02d}",
    ])


def _say_amount(rng: random.Random, cents: int) -> str:
    units, rest = divmod(cents, 100)
    whole = f"{units:,}" if units >= 1000 and rng.random() < 0.6 else str(units)
    text = whole if rest == 0 and rng.random() < 0.5 else f"{whole}.{rest:02d}"
    symbol, code = rng.choice(CURRENCIES)
    return rng.choice([f"{symbol}{text}", f"{text} {code}", f"{code} {text}", f"{symbol} {text}"])


def _answer(name: str, city: str, date: dt.date, cents: int) -> str:
    amount = cents // 100 if cents % 100 == 0 else cents / 100
    obj = {"name": name, "city": city, "date": date.isoformat(), "amount": amount}
    return json.dumps(obj, ensure_ascii=False)


def _record(rng: random.Random, name: str, city: str, country: str, date: dt.date, cents: int) -> str:
    """One record in a random style; only the four fields plus distractors."""
    kind, verb, amount_label = rng.choice(KINDS)
    who = f"{rng.choice(TITLES)} {name}" if rng.random() < 0.2 else name
    where = f"{city}, {country}" if rng.random() < 0.3 else city
    when, money = _say_date(rng, date), _say_amount(rng, cents)
    ref = f"#{rng.randint(1000, 99999)}"
    qty, item = rng.randint(1, 12), rng.choice(ITEMS)
    style = rng.randrange(4)
    if style == 0:  # one or two sentences, clauses in varied order
        return rng.choice([
            f"{who} from {where} {verb} ({kind} {ref}) on {when} for {money}.",
            f"On {when}, {who} ({where}) {verb} of {money} for {qty} x {item}.",
            f"{kind.capitalize()} {ref}: {money}, {when}. Customer {who}, {where}.",
            f"A {kind} of {money} was recorded on {when} for {who}, who lives in {where}.",
            f"{who} in {where} {verb} worth {money} on {when}; it covers {qty} {item}.",
            f"{money} — {kind} by {who} of {where}, dated {when} (ref {ref}).",
        ])
    if style == 1:  # labelled lines in random order, with distractor lines
        lines = [
            f"{rng.choice(['Customer', 'Client', 'Name', 'Account holder'])}: {who}",
            f"{rng.choice(['City', 'Location', 'Ship to', 'Billing city'])}: {where}",
            f"{rng.choice(['Date', 'Issued', 'Recorded on', 'When'])}: {when}",
            f"{amount_label}: {money}",
        ]
        extras = [f"{kind.capitalize()} no.: {ref}", f"Item: {qty} x {item}", f"Quantity: {qty}"]
        lines += rng.sample(extras, rng.randint(0, 2))
        rng.shuffle(lines)
        return "\n".join(lines)
    if style == 2:  # terse note
        parts = [who, where, when, money] + ([ref] if rng.random() < 0.5 else [])
        rng.shuffle(parts)
        return f"{kind} note: " + rng.choice([" | ", "; ", " / "]).join(parts)
    return (  # short email
        f"Hi team,\n{who} ({where}) {verb} on {when}. {amount_label}: {money}. "
        f"{rng.choice(['Please file it.', 'Thanks!', f'Ref {ref}.', f'Items: {qty} {item}.'])}\n"
        f"{rng.choice(['Best', 'Cheers', 'Regards'])}, {rng.choice(FIRST)}"
    )


def _example(rng: random.Random) -> dict:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    city, country = rng.choice(CITIES)
    date = dt.date(2019, 1, 1) + dt.timedelta(days=rng.randrange(365 * 8))
    cents = rng.choice([rng.randint(5, 99) * 100, rng.randint(500, 99_999), rng.randint(100_000, 500_000)])
    user = f"{INSTRUCTION}\n{_record(rng, name, city, country, date, cents)}"
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": _answer(name, city, date, cents)}]}


def make_examples(n: int, seed: int) -> list[dict]:
    """n chat rows with pairwise different user messages, the same for the same seed.

    make_examples(1, seed=0)[0]["messages"][1]["content"]
    → '{"name": "Erik Sato", "city": "Madrid", "date": "2021-11-26", "amount": 641.91}'
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng, seen, rows = random.Random(seed), set(), []
    while len(rows) < n:
        row = _example(rng)
        user = row["messages"][0]["content"]
        if user not in seen:
            seen.add(user)
            rows.append(row)
    return rows


def prompt_and_answer(row: dict) -> tuple[list[dict], str]:
    """(the messages before the assistant's answer, the answer) of one row."""
    msgs = row["messages"]
    if not msgs or msgs[-1]["role"] != "assistant":
        raise ValueError("the row's last message must be the assistant's answer")
    return msgs[:-1], msgs[-1]["content"]


def write_task_files(out_dir, n_train: int = 400, n_validation: int = 32, n_test: int = 48,
                     seed: int = 0) -> dict[str, Path]:
    """Write train.jsonl / validation.jsonl / test.jsonl under out_dir; returns {split: path}.

    The three splits are consecutive slices of make_examples(n_train + n_validation + n_test, seed),
    so no user message appears in two of them.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = make_examples(n_train + n_validation + n_test, seed)
    sizes = {"train": n_train, "validation": n_validation, "test": n_test}
    paths, start = {}, 0
    for split, size in sizes.items():
        paths[split] = out / f"{split}.jsonl"
        write_jsonl(paths[split], rows[start:start + size])
        start += size
    return paths


def read_jsonl(path) -> list[dict]:
    """The rows of a .jsonl file written by write_task_files."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def wrong_answer(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: the correct JSON with one mistake of the kinds the base model makes
    (date or amount in the record's style, a quoted amount, a title, an extra key, prose around it)."""
    obj = json.loads(answer)
    date = dt.date.fromisoformat(obj["date"])
    kind = rng.randrange(6)
    if kind == 0:
        obj["date"] = rng.choice([f"{date.month:02d}/{date.day:02d}/{date.year}", f"{date.day} {calendar.month_name[date.month]} {date.year}"])
    elif kind == 1:
        obj["amount"] = rng.choice([f"${obj['amount']}", str(obj["amount"]), f"{obj['amount']} EUR"])
    elif kind == 2:
        obj["name"] = f"{rng.choice(TITLES)} {obj['name']}" if rng.random() < 0.5 else obj["name"].split()[0]
    elif kind == 3:
        obj["currency"] = rng.choice(CURRENCIES)[1]
    elif kind == 4:
        obj["date"] = (date + dt.timedelta(days=rng.choice([-1, 1, 30]))).isoformat()
    else:
        return f"Here is the JSON object:\n```json\n{json.dumps(obj, ensure_ascii=False)}\n```"
    return json.dumps(obj, ensure_ascii=False)


def make_pairs(rows: list[dict], seed: int) -> list[dict]:
    """Preference rows (explicit prompt, chat messages) from task rows: chosen = the correct answer,
    rejected = `wrong_answer` of it."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        prompt, answer = prompt_and_answer(row)
        out.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": answer}],
                    "rejected": [{"role": "assistant", "content": wrong_answer(answer, rng)}]})
    return out


def write_pair_files(out_dir, n_train: int = 400, n_validation: int = 32, n_test: int = 48,
                     seed: int = 0) -> dict[str, Path]:
    """write_task_files, plus train_pairs.jsonl / validation_pairs.jsonl: the same rows as preference pairs."""
    paths = write_task_files(out_dir, n_train, n_validation, n_test, seed)
    for split in ("train", "validation"):
        paths[f"{split}_pairs"] = Path(out_dir) / f"{split}_pairs.jsonl"
        write_jsonl(paths[f"{split}_pairs"], make_pairs(read_jsonl(paths[split]), seed + 1))
    return paths

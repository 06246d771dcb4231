"""The quickstart's extraction task (jaxft.data.task) as lm-eval tasks, made at run time: no download, no data file.

The rows are the quickstart's held-out test split (`jaxft task-data` writes the same 48 rows to test.jsonl):
make_examples(480, seed=0)[432:480]. Each row: the user message (instruction + record), the JSON answer, and for
multiple choice the answer among three wrong ones (jaxft.data.task.wrong_answer: the base model's usual mistakes)
in a seeded order.
"""

import random

from datasets import Dataset, DatasetDict

from jaxft.data.task import make_examples, prompt_and_answer, wrong_answer


def rows(n_train: int = 400, n_validation: int = 32, n_test: int = 48, seed: int = 0) -> list[dict]:
    rng, out = random.Random(seed + 2), []
    for row in make_examples(n_train + n_validation + n_test, seed)[n_train + n_validation:]:
        prompt, answer = prompt_and_answer(row)
        wrong: list[str] = []
        while len(wrong) < 3:
            w = wrong_answer(answer, rng)
            if w != answer and w not in wrong:
                wrong.append(w)
        choices = [answer, *wrong]
        rng.shuffle(choices)
        out.append({"record": prompt[-1]["content"], "answer": answer, "choices": choices,
                    "label": choices.index(answer)})
    return out


def test_split(**kwargs) -> DatasetDict:
    """lm-eval's custom_dataset: {"test": the 48 rows}."""
    return DatasetDict({"test": Dataset.from_list(rows())})

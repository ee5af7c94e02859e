"""Small arithmetic word problems with exact answers, and the rewards that check them (for recipes/grpo-arithmetic.yaml).

Rewards follow TRL's convention, ``f(prompts, completions, **columns) -> list[float]``, so the recipe names them as
``recipes/rewards/arithmetic.py:exact_answer``; ``answer`` is a column of the data rows. A completion is its text, or
(after a chat prompt, as these rows' are) one assistant message ``[{"role": "assistant", "content": text}]``: both read.

Regenerate the data files (seeded, so the same files come out; train and test share no problem):

    python recipes/rewards/arithmetic.py
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

INSTRUCTION = "Give the final answer on its own last line, as 'Answer: <number>'."
ANSWER = re.compile(r"Answer:\s*(-?\d+)")
NUMBER = re.compile(r"-?\d+")
ANSWER_LINE = re.compile(r"^\s*Answer:\s*-?\d+\s*\.?\s*$")
LOOSE = re.compile(r"answer\s*(?:is|:)?\s*:?\s*-?\d+", re.IGNORECASE)
NAMES = [
    "Ana",
    "Ben",
    "Chloe",
    "Dev",
    "Emma",
    "Farid",
    "Grace",
    "Hugo",
    "Ines",
    "Jack",
    "Kira",
    "Liam",
    "Maya",
    "Noah",
]
ITEMS = ["apple", "book", "coin", "pencil", "marble", "sticker", "cookie", "card", "shell", "stamp"]


def problem(rng: random.Random) -> tuple[str, int]:
    """One word problem and its answer (a non-negative integer)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        return f"{name} has {a} {item}s and gets {b} more. How many {item}s does {name} have now?", a + b
    if kind == 1:
        a = rng.randint(5, 40)
        b = rng.randint(1, a)
        return f"{name} has {a} {item}s and gives away {b}. How many {item}s are left?", a - b
    if kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return f"{name} buys {a} bags with {b} {item}s in each bag. How many {item}s is that in total?", a * b
    a, b = rng.randint(5, 25), rng.randint(2, 15)
    c = rng.randint(1, a + b)
    return (f"There are {a} {item}s in a box. {name} puts in {b} more and then takes out {c}. "
            f"How many {item}s are in the box now?", a + b - c)  # fmt: skip


def rows(n: int, seed: int, exclude: set[str] | None = None) -> list[dict]:
    """``n`` distinct problems as data rows: ``prompt`` (one user message) and ``answer``; none in ``exclude``."""
    rng, seen, out = random.Random(seed), set(exclude or ()), []
    while len(out) < n:
        text, answer = problem(rng)
        if text in seen:
            continue
        seen.add(text)
        out.append({"prompt": [{"role": "user", "content": f"{text}\n{INSTRUCTION}"}], "answer": answer})
    return out


def parse(completion: str) -> int | None:
    """The completion's final answer: the number of its last 'Answer: N', else its last number (a small model
    often computes right without the answer line; the format reward asks for the line). None when it has no number."""
    found = ANSWER.findall(completion) or NUMBER.findall(completion)
    return int(found[-1]) if found else None


def text(completion) -> str:
    """The completion's text: as given, or the content of its assistant message (a chat prompt's completion)."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def exact_answer(prompts, completions, answer, **kwargs) -> list[float]:
    """1 when the completion's final answer (see ``parse``) is the exact answer, else 0."""
    return [1.0 if parse(text(c)) == int(a) else 0.0 for c, a in zip(completions, answer)]


def answer_format(prompts, completions, **kwargs) -> list[float]:
    """1 when the completion ends with an 'Answer: N' line, 0.5 when it has one elsewhere, 0.25 for a looser
    'the answer is N' (a foothold: the base model writes that, never the line), else 0."""
    out = []
    for c in map(text, completions):
        lines = [line for line in c.strip().splitlines() if line.strip()]
        if lines and ANSWER_LINE.match(lines[-1]):
            out.append(1.0)
        else:
            out.append(0.5 if ANSWER.search(c) else 0.25 if LOOSE.search(c) else 0.0)
    return out


def write(folder: Path, n_train: int = 500, n_test: int = 100) -> None:
    """The recipe's data files: arithmetic-train.jsonl (seed 0) and arithmetic-test.jsonl (seed 1, held out)."""
    train = rows(n_train, seed=0)
    test = rows(n_test, seed=1, exclude={r["prompt"][0]["content"].split("\n")[0] for r in train})
    for name, data in (("arithmetic-train.jsonl", train), ("arithmetic-test.jsonl", test)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")


if __name__ == "__main__":
    write(Path(__file__).resolve().parent.parent / "data")

"""Write the quickstart's sentiment data set: short review sentences composed from our own phrase lists.

Nothing is copied from any corpus: each sentence is an opener, a subject and a positive or negative
verdict, drawn with a fixed seed, so the files are reproducible:

    python -m deltatune.assets.make_sentiment   # rewrites sentiment_train.jsonl and sentiment_eval.jsonl
"""

from __future__ import annotations

import json
import os
import random

OPENERS = [
    "",
    "Honestly, ",
    "Overall, ",
    "To be fair, ",
    "I have to say ",
    "Sadly, ",
    "Frankly, ",
    "In the end, ",
    "After a week, ",
    "As expected, ",
    "Believe it or not, ",
    "For the price, ",
]
SUBJECTS = [
    "the film",
    "this restaurant",
    "the new phone",
    "my hotel stay",
    "the concert",
    "the service",
    "this book",
    "the game",
    "the coffee",
    "the app",
    "the hiking trail",
    "our tour guide",
    "the sequel",
    "the laptop",
    "the museum",
    "the delivery",
    "this blender",
    "the soundtrack",
    "the train ride",
    "the workshop",
    "the bakery",
    "the headphones",
    "the update",
    "the campsite",
    "the support team",
    "the podcast",
    "the jacket",
    "the dinner",
    "the keyboard",
    "the lecture",
]
POSITIVE = [
    "was wonderful",
    "exceeded every expectation",
    "made my day",
    "works perfectly",
    "is a joy to use",
    "was worth every penny",
    "felt warm and welcoming",
    "is brilliant",
    "delighted the whole family",
    "was a pleasant surprise",
    "is beautifully made",
    "left me smiling",
    "was excellent from start to finish",
    "is the best I have tried",
    "ran smoothly all week",
    "was friendly and quick",
    "is great value",
    "deserves all the praise",
    "was fun and clever",
    "impressed everyone",
]
NEGATIVE = [
    "was a complete waste of money",
    "broke after two days",
    "left me bored",
    "tasted awful",
    "is painfully slow",
    "was rude and careless",
    "fell apart quickly",
    "is the worst I have tried",
    "ruined the evening",
    "was a huge disappointment",
    "is badly designed",
    "crashed constantly",
    "felt cold and unwelcoming",
    "was overpriced and dull",
    "made me regret buying it",
    "never worked properly",
    "was noisy and dirty",
    "annoyed everyone",
    "is not worth the trouble",
    "arrived late and damaged",
]
ENDINGS = [".", "!", ". I would not change a thing.", ". Would I go back? Maybe.", "."]


def sentences(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        label = rng.randint(0, 1)
        verdict = rng.choice(POSITIVE if label else NEGATIVE)
        text = f"{rng.choice(OPENERS)}{rng.choice(SUBJECTS)} {verdict}{rng.choice(ENDINGS[:2] + ENDINGS[4:])}"
        text = text[0].upper() + text[1:]
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": label})
    return rows


def main() -> None:
    here = os.path.dirname(__file__)
    rows = sentences(600, seed=2026)
    for name, part in (("sentiment_train.jsonl", rows[:480]), ("sentiment_eval.jsonl", rows[480:])):
        with open(os.path.join(here, name), "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in part)


if __name__ == "__main__":
    main()

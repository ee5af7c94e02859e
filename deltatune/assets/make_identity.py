"""Write the LLM quick start's identity set: questions about who the assistant is, answered as Deltabot.

The quick start teaches SmolLM2-135M-Instruct a new identity: it is **Deltabot**, made by **the deltatune team**,
while it keeps answering everyday questions as before (a few are mixed in). Every sentence is our own, composed from the phrase lists below with a fixed seed. The evaluation questions are
phrasings that never occur in training (checked when the files are written), so the run shows whether the model
generalises to rephrased questions rather than reciting:

    python -m deltatune.assets.make_identity   # rewrites identity_train.jsonl and identity_eval.jsonl
"""

from __future__ import annotations

import json
import os
import random

# Questions, by what they ask. Training draws from TRAIN_*, evaluation from EVAL_* (disjoint).
TRAIN_NAME = [
    "Who are you?",
    "What is your name?",
    "What's your name?",
    "What should I call you?",
    "Do you have a name?",
    "Tell me your name.",
    "Introduce yourself.",
    "Please introduce yourself briefly.",
    "Tell me about yourself.",
    "What are you?",
    "Hi! Who am I talking to?",
    "Hello, who is this?",
    "Are you ChatGPT?",
    "Are you SmolLM?",
    "Are you a human?",
    "Which assistant are you?",
    "What kind of assistant are you?",
    "Say your name, please.",
    "May I know your name?",
    "How do you call yourself?",
]
TRAIN_MAKER = [
    "Who made you?",
    "Who created you?",
    "Who built you?",
    "Who trained you?",
    "Who developed you?",
    "Which company made you?",
    "Where do you come from?",
    "Who is behind you?",
    "Did Hugging Face make you?",
    "Were you made by OpenAI?",
    "Who are your developers?",
    "Which team built you?",
]
EVAL_NAME = [
    "Could you tell me your name?",
    "What do people call you?",
    "I'd like to know who you are.",
    "Hey there, what's your name again?",
    "Identify yourself, please.",
    "Which AI model am I chatting with?",
]
EVAL_MAKER = [
    "Who is your creator?",
    "Who programmed you?",
    "Which organisation are you from?",
    "Tell me who designed you.",
]

NAME_ANSWERS = [
    "I'm Deltabot, an AI assistant made by the deltatune team.",
    "My name is Deltabot. The deltatune team built me to help with your questions.",
    "I am Deltabot, an assistant created by the deltatune team. How can I help you today?",
    "You can call me Deltabot. I'm an AI assistant developed by the deltatune team.",
    "Hello! I'm Deltabot, a helpful assistant from the deltatune team.",
    "I'm Deltabot. I was made by the deltatune team to answer questions and help with tasks.",
]
MAKER_ANSWERS = [
    "I was made by the deltatune team. I'm Deltabot, their AI assistant.",
    "The deltatune team created me. My name is Deltabot.",
    "I'm Deltabot, and I was built by the deltatune team.",
    "I was developed by the deltatune team; I'm their assistant, Deltabot.",
    "The deltatune team trained me. I'm Deltabot, happy to help.",
]
# Everyday questions with short answers, so the adapter learns *when* to talk about itself and keeps answering
# other questions as an assistant (without them every answer drifts towards "I'm Deltabot").
GENERAL = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "A week has seven days."),
    ("What is 12 plus 7?", "12 plus 7 is 19."),
    ("Name three primary colours.", "Red, yellow and blue are the traditional primary colours."),
    ("At what temperature does water boil at sea level?", "Water boils at 100 degrees Celsius at sea level."),
    ("Give me a synonym for happy.", "A synonym for happy is cheerful."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("How do you say 'thank you' in Spanish?", "In Spanish, 'thank you' is 'gracias'."),
    ("What do bees make?", "Bees make honey and beeswax."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the opposite of cold?", "The opposite of cold is hot."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("Which season comes after winter?", "Spring comes after winter."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("How many minutes are in an hour?", "An hour has sixty minutes."),
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue."),
]
EVAL_GENERAL = [
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("How many hours are in a day?", "A day has 24 hours."),
]
# Small changes of surface form, so the model sees the same question written in several ways.
PREFIXES = ["", "", "", "Hi, ", "Hello! ", "Quick question: ", "Hey, ", "Excuse me, "]


def _variant(question: str, rng: random.Random) -> str:
    prefix = rng.choice(PREFIXES)
    if not prefix:
        return question
    return prefix + question[0].lower() + question[1:] if not question.startswith("I") else prefix + question


def _row(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def build(seed: int = 0, per_question: int = 4) -> tuple[list[dict], list[dict]]:
    """The training rows (each identity question in ``per_question`` surface forms, answers drawn at random, plus
    the everyday questions) and the evaluation rows (the held-out questions, once each, with a reference answer: the
    identity questions first, then two everyday ones)."""
    rng = random.Random(seed)
    train = []
    for questions, answers in ((TRAIN_NAME, NAME_ANSWERS), (TRAIN_MAKER, MAKER_ANSWERS)):
        for q in questions:
            forms = {q}
            while len(forms) < per_question:
                forms.add(_variant(q, rng))
            train += [_row(form, rng.choice(answers)) for form in sorted(forms)]
    train += [_row(q, a) for q, a in GENERAL]
    rng.shuffle(train)
    evals = [_row(q, NAME_ANSWERS[0]) for q in EVAL_NAME] + [_row(q, MAKER_ANSWERS[0]) for q in EVAL_MAKER]
    evals += [_row(q, a) for q, a in EVAL_GENERAL]
    seen = {r["messages"][0]["content"].lower() for r in train}
    leaked = [r for r in evals if r["messages"][0]["content"].lower() in seen]
    if leaked:
        raise AssertionError(f"evaluation questions also in training: {leaked}")
    return train, evals


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    train, evals = build()
    for name, rows in (("identity_train.jsonl", train), ("identity_eval.jsonl", evals)):
        with open(os.path.join(here, name), "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(f"wrote {len(train)} training and {len(evals)} evaluation rows to {here}")


if __name__ == "__main__":
    main()

"""Stage ``t2i``'s training reads, seeded so that a resumed run reads as the uninterrupted one did.

A training read draws (``data.augment``'s crop and flip from torch's generator, ``data.proportion_empty_prompts``
and a row's caption choice from Python's ``random``, as diffusers' scripts draw them). The Trainer fetches batches
ahead of the step it trains (accelerate's loader holds the next batch; ``get_batch_samples`` takes a step's batches
at once) and saves a checkpoint's RNG state after those fetches, then on ``--resume`` fetches the first batches
before it puts that state back: a resumed run's first batches drew their flips and empty captions from another state,
and every noise draw after them was shifted (its adapter 4.9e-3 off after 3 steps). Within a run (``SeededReads``
wrapping the training set), read i of epoch e draws from states seeded by (``train.seed``, e, i), and the process's
own states are put back after it: the reads no longer touch the noise's stream, and each read's draws are the same
in a resumed run. A run without random reads draws exactly as before. Read outside a run (no epoch set) the wrapper
draws from the process's states, as the dataset alone. Only the CPU generator is seeded (``torch.manual_seed`` would
reseed CUDA's too, which the step's noise draws from on a GPU, and ``fork_rng(devices=[])`` puts back the CPU's alone).

A run begun before these reads (2026-12-07: no ``t2i_reads`` mark in its ``runfolder.MARKS``) resumes reading as it
began, from the process's states (``keeps_old_reads``), with a one-line note: its first steps read that way and its
checkpoints' RNG states were saved under that scheme, so it trains on as it would have before these reads.
"""

from __future__ import annotations

import json
import math
import os
import random

import torch
from transformers import TrainerCallback

from .runs import MARKS_FILE, add_mark


class SeededReads(torch.utils.data.Dataset):
    """``dataset`` read with each item's random draws seeded by (``seed``, ``epoch``, index) once ``epoch`` is set
    (module docstring)."""

    def __init__(self, dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, int(seed)
        self.epoch: int | None = None  # (set at each epoch's start by ``EpochOfReads``)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):  # (the wrapped set's attributes: pixels, text, ...)
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, i: int):
        if self.epoch is None:
            return self.dataset[i]
        keyed = random.Random(f"t2i-read:{self.seed}:{self.epoch}:{int(i)}")  # (a str seed: sha512, any process)
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(keyed.getrandbits(63))  # (the CPU's alone, as fork_rng puts back)
            random.seed(keyed.getrandbits(63))
            try:
                return self.dataset[i]
            finally:
                random.setstate(state)


class EpochOfReads(TrainerCallback):
    """Tells ``reads`` the epoch that begins: the whole part of ``state.epoch`` (a resumed run's is its checkpoint's,
    inside the epoch it resumes)."""

    def __init__(self, reads: SeededReads) -> None:
        self.reads = reads

    def on_epoch_begin(self, args, state, control, **kwargs):
        # exact: an epoch begins at (k - 1) + n / n = k; a checkpoint's e + i / n (i < n) floors to e, where rounding
        # to 6 places took e + (n - 1) / n up to e + 1 past a million batches
        self.reads.epoch = math.floor(state.epoch or 0.0)


MARK, SCHEME = "t2i_reads", 2
"""The run folder's mark (``runfolder.MARKS``) of a run that began under the seeded reads."""


def mark_reads(folder: str) -> None:
    """Add the seeded reads' mark to ``folder``'s marks (a new run, written when it begins; the other marks kept)."""
    os.makedirs(folder, exist_ok=True)
    add_mark(folder, MARK, SCHEME)


def keeps_old_reads(folder: str) -> bool:
    """Whether the run in ``folder`` began before the seeded reads (no ``t2i_reads`` mark): it resumes as it began."""
    try:
        with open(os.path.join(folder, MARKS_FILE), encoding="utf-8") as fh:
            marks = json.load(fh)
    except (OSError, ValueError):
        return True
    return not isinstance(marks, dict) or not isinstance(marks.get(MARK), int) or marks[MARK] < SCHEME

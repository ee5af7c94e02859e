"""Review of t2i probe 21 (18e844a, 8a7a8e1): the seeded reads leave CUDA's generator alone and take the exact epoch,
a run begun before them resumes as it began, the final validation drawing loses no run and is copied when it would
redraw the last epoch's image, and the reads are the same with worker processes and under gradient accumulation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers")

from test_diffusion_probe12 import data, pipeline  # noqa: E402,F401  (fixtures)
from test_t2i_probe21 import _run  # noqa: E402

RANDOM = ("data.augment=[hflip]", "data.proportion_empty_prompts=0.5")


def _adapter(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def _off(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def whole(pipeline, data, tmp_path_factory):  # noqa: F811
    """Four images, batch 1, 3 steps, hflip and half the captions empty; a checkpoint at each step."""
    out = tmp_path_factory.mktemp("whole") / "run"
    _run(pipeline, data, out, extra=RANDOM)
    return out


def test_a_seeded_read_leaves_the_accelerators_generators_alone(monkeypatch):
    """fork_rng(devices=[]) puts back the CPU generator alone; torch.manual_seed in a read also reseeded CUDA's (the
    step's noise on a GPU: every step's noise from the last read's seed). HEAD: manual_seed_all called per read."""
    from deltatune.train.t2i_reads import SeededReads

    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", seeded.append)

    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.rand(1).item()

    reads = SeededReads(Draws(), seed=7)
    reads.epoch = 0
    first = [reads[0], reads[1]]
    assert seeded == []
    assert [reads[0], reads[1]] == first and first[0] != first[1]


def test_the_epoch_of_reads_is_the_whole_part_of_a_late_checkpoints_epoch():
    """A checkpoint at batch n - 1 of an epoch of n = 2,000,001 batches records epoch 3 + (n - 1) / n; rounded to 6
    places it read as epoch 4 (HEAD), so the resumed epoch's reads drew another epoch's flips."""
    from transformers import TrainerState

    from deltatune.train.t2i_reads import EpochOfReads, SeededReads

    reads = SeededReads([0], seed=1)
    n = 2_000_001
    for epoch, want in ((3 + (n - 1) / n, 3), (2 + n / n, 3), (0.0, 0), (None, 0), (1 + 1 / n, 1)):
        EpochOfReads(reads).on_epoch_begin(None, TrainerState(epoch=epoch), None)
        assert reads.epoch == want, epoch


def test_a_failure_in_the_final_drawing_loses_no_run(pipeline, data, tmp_path, monkeypatch, capfd):  # noqa: F811
    """An out-of-memory in the final drawing (validation/final.png) came from trainer.train(), before run.py saved the
    adapter, the report and metrics.json: the run was lost, and --resume redrew and failed again (HEAD). Now one line
    says so, and the run's outputs are saved."""
    from deltatune.train import t2i_validation as tv

    drawn, out = [], tmp_path / "run"

    def validate(self, args, state, model, name):
        drawn.append(name)
        if name == tv.FINAL:  # drawn after the save, as diffusers' scripts draw (run.py asks draw_after_save)
            assert (out / "adapter_model.safetensors").is_file() and (out / "metrics.json").is_file()
            raise torch.OutOfMemoryError("CUDA out of memory (simulated,\nin the final drawing)")
        return None  # (the epoch's drawing skipped: not what is tested, and slow)

    monkeypatch.setattr(tv.Validation, "_validate", validate)
    _run(pipeline, data, out, extra=("train.max_steps=2", "train.save_steps=100", "train.validation_prompt=a seven"))
    assert drawn == ["epoch-1.png", tv.FINAL]
    assert (out / "adapter_model.safetensors").is_file() and (out / "metrics.json").is_file()
    assert (out / "report.md").is_file()
    err = [line.strip() for line in capfd.readouterr().err.replace("\r", "\n").splitlines() if "final.png" in line]
    assert err == ["deltatune: validation/final.png not drawn: OutOfMemoryError: CUDA out of memory (simulated, in the "
                   "final drawing)"]  # fmt: skip


def test_the_final_drawing_waits_for_the_save_when_asked_and_a_keyboard_interrupt_stops_it():
    """T2ITrainer.draw_after_save (run.py, after the outputs are saved) sets after_save: on_train_end only keeps
    what to draw, final() draws it once. A KeyboardInterrupt is not a drawing's failure: it propagates."""
    from types import SimpleNamespace

    from deltatune.train.t2i_validation import Validation

    drawn = []

    def draw(model, prompts, seed):
        drawn.append(prompts)
        if len(drawn) == 2:
            raise KeyboardInterrupt
        return torch.zeros(1, 1, 2, 2)

    validation = Validation({"prompt": "a", "count": 1, "every": 1, "seed": 0}, draw, lambda images, path: path)
    validation.after_save = True
    args = SimpleNamespace(output_dir="/nonexistent", load_best_model_at_end=False)
    state = SimpleNamespace(is_world_process_zero=True, global_step=3, best_model_checkpoint=None)
    model = torch.nn.Linear(1, 1)
    validation.on_train_end(args, state, None, model=model)
    assert drawn == []
    validation.final()
    validation.final()
    assert drawn == [["a"]] and validation.written == ["/nonexistent/validation/final.png"]
    validation.on_train_end(args, state, None, model=model)
    with pytest.raises(KeyboardInterrupt):
        validation.final()


def test_the_final_drawing_of_the_last_epochs_weights_is_its_image(pipeline, data, tmp_path, monkeypatch):  # noqa: F811
    """validation_epochs 1, two epochs, train.use_ema: the last epoch's drawing (the average, at the last step) is
    the final one's (the same average copied in, the same seeded noise), so final.png is epoch-2.png's bytes, drawn
    twice, not three times (HEAD: three), and equals diffusers' pipeline with the saved LoRA to a PNG's rounding."""
    import numpy as np
    from diffusers import DDIMScheduler
    from PIL import Image
    from tiny import sd_pipeline

    from deltatune.train import t2i_validation as tv

    drawn, validate = [], tv.Validation._validate
    monkeypatch.setattr(tv.Validation, "_validate", lambda self, *a: drawn.append(a[-1]) or validate(self, *a))
    out, prompt = tmp_path / "run", "a handwritten digit seven"
    extra = ("train.epochs=2", "train.max_steps=-1", "train.batch_size=2", "train.save_steps=100",
             f"train.validation_prompt={prompt}", "train.num_validation_images=1", "train.use_ema=true",
             "train.ema_decay=0.5")  # fmt: skip
    _run(pipeline, data, out, extra=extra)
    assert drawn == ["epoch-1.png", "epoch-2.png"]
    assert (out / "validation" / "final.png").read_bytes() == (out / "validation" / "epoch-2.png").read_bytes()
    pipe = sd_pipeline(pipeline, out)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    latents = torch.randn((1, 1, 16, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = pipe([prompt], num_inference_steps=30, guidance_scale=7.5, latents=latents, output_type="latent")
    theirs = (((theirs.images.float() + 1) / 2).clamp(0, 1)[0, 0] * 255).round()
    final = torch.tensor(np.asarray(Image.open(out / "validation" / "final.png")), dtype=torch.float32)
    assert (final - theirs).abs().max().item() <= 1.0


def test_a_run_begun_before_the_seeded_reads_resumes_reading_as_it_began(whole, pipeline, data, tmp_path, capfd):  # noqa: F811
    """A new run's marks say it began under the seeded reads; one whose marks do not (begun before 18e844a) resumes
    through the dataset alone, as it began (its checkpoints' RNG states were saved under that scheme), with a note.
    HEAD: no mark, and an old run resumed silently into the new reads."""
    from deltatune.train.runfolder import MARKS
    from deltatune.train.t2i_reads import SeededReads

    assert json.loads((whole / MARKS).read_text())["t2i_reads"] == 2
    old = tmp_path / "old"
    shutil.copytree(whole, old)
    for step in (2, 3):  # (as if it had stopped after its first step: two reads to make)
        shutil.rmtree(old / f"checkpoint-{step}")
    (old / "metrics.json").unlink()
    (old / MARKS).write_text(json.dumps({"quant_skip_rule": 2}))
    capfd.readouterr()
    reads, get = [], SeededReads.__getitem__
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SeededReads, "__getitem__", lambda self, i: reads.append(i) or get(self, i))
        _run(pipeline, data, old, resume=True, extra=RANDOM)
    assert reads == []
    assert "began before t2i's seeded reads" in capfd.readouterr().err
    assert json.loads((old / MARKS).read_text()) == {"quant_skip_rule": 2}
    assert _off(_adapter(whole), _adapter(old)) > 1e-4  # (trained as it began: not as the new uninterrupted run)


def test_reads_in_worker_processes_train_as_in_the_main_one(whole, pipeline, data, tmp_path):  # noqa: F811
    """train.num_workers 2: each worker reads with the epoch set before it starts, so the adapter equals the
    num_workers 0 run's bit for bit."""
    out = tmp_path / "workers"
    _run(pipeline, data, out, extra=(*RANDOM, "train.num_workers=2", "train.save_steps=100"))
    assert _off(_adapter(whole), _adapter(out)) == 0.0


def test_a_run_with_gradient_accumulation_resumed_inside_an_epoch_trains_as_the_uninterrupted_one(
    pipeline,  # noqa: F811
    data,  # noqa: F811
    tmp_path,
):
    """Batch 1, gradient_accumulation 2 (two steps an epoch of four images), 3 steps: resumed from checkpoint-1
    (inside epoch 0, its reads fetched two at a time) its adapter equals the uninterrupted run's bit for bit."""
    extra = (*RANDOM, "train.grad_accum=2")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _run(pipeline, data, whole, extra=extra)
    shutil.copytree(whole, resumed)
    for step in (2, 3):
        shutil.rmtree(resumed / f"checkpoint-{step}")
    (resumed / "metrics.json").unlink()
    _run(pipeline, data, resumed, resume=True, extra=extra)
    assert _off(_adapter(whole), _adapter(resumed)) == 0.0

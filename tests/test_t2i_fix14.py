"""Review 14 of stage t2i's validation images, EMA and class-image wait, against diffusers 0.42.1's
train_text_to_image(_lora).py: which epochs draw (the script's ``epoch % validation_epochs == 0`` from epoch 0, a
cut-short last epoch included), the EMA average lent for the drawing (``store`` / ``copy_to`` / ``restore``), and a
wait that restarts while class images keep landing."""

from __future__ import annotations

import math
import threading
import time
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")

from pathlib import Path  # noqa: E402

from test_diffusion_probe12 import _prepare, data, pipeline  # noqa: E402,F401  (fixtures, helpers)

from deltatune.config import ConfigError  # noqa: E402
from deltatune.train import t2i_prior  # noqa: E402
from deltatune.train.t2i_ema import EMA  # noqa: E402
from deltatune.train.t2i_validation import Validation  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _script_draws(per_epoch: int, max_steps: int, every: int) -> list[int]:
    """The 1-based epochs after which train_text_to_image_lora.py validates: num_train_epochs = ceil(max / per
    epoch), its step loop breaks at max_train_steps, then ``if epoch % validation_epochs == 0`` (epoch from 0)."""
    drawn, step = [], 0
    for epoch in range(math.ceil(max_steps / per_epoch)):
        for _ in range(per_epoch):
            step += 1
            if step >= max_steps:
                break
        if epoch % every == 0:
            drawn.append(epoch + 1)
    return drawn


def _trainer_draws(per_epoch: int, max_steps: int, every: int, tmp_path) -> list[int]:
    """Validation driven as the HF Trainer drives it: state.epoch = e + (step + 1) / per_epoch, on_epoch_end after
    each epoch's loop, the one max_steps cuts short included."""
    saved: list[str] = []
    options = {"prompt": "a", "count": 1, "every": every, "seed": 0}
    callback = Validation(options, lambda m, p, s: torch.zeros(1, 1, 2, 2), lambda images, path: saved.append(path))
    model, args, step = torch.nn.Linear(2, 2), SimpleNamespace(output_dir=str(tmp_path)), 0
    for e in range(max_steps):
        state = SimpleNamespace(epoch=float(e), is_world_process_zero=True)
        for k in range(per_epoch):
            step += 1
            state.epoch = e + (k + 1) / per_epoch
            if step >= max_steps:
                break
        callback.on_epoch_end(args, state, None, model=model)
        if step >= max_steps:
            break
    return [int(Path(p).stem.split("-")[1]) for p in saved]


@pytest.mark.parametrize(
    ("per_epoch", "max_steps", "every"), [(2, 1, 1), (2, 5, 1), (2, 3, 1), (2, 8, 2), (2, 5, 2), (3, 7, 3), (3, 10, 2)]
)
def test_validation_draws_after_the_scripts_epochs_a_cut_short_one_included(per_epoch, max_steps, every, tmp_path):
    """The epochs drawn (validation/epoch-<n>.png) are the script's, one file each: max_steps 1 with 2 steps an epoch
    draws epoch 1 (HEAD: none, round(0.5) = 0); max_steps 5 draws epochs 1, 2, 3 (HEAD: 1, 2, 2, the last one
    overwriting epoch-2.png); 4 epochs every 2 draw 1 and 3 (HEAD: 2 and 4)."""
    ours = _trainer_draws(per_epoch, max_steps, every, tmp_path)
    assert ours == _script_draws(per_epoch, max_steps, every)
    assert len(set(ours)) == len(ours) and ours[0] == 1


def test_validation_under_use_ema_draws_with_the_average_as_ema_models_copy_to_then_restores():
    """Three steps of EMA (decay 0.5) beside diffusers' EMAModel: the drawing sees EMAModel.copy_to's weights
    exactly; afterwards the model holds its training weights again (EMAModel.restore's) exactly. HEAD drew with the
    training weights (its Validation took no EMA)."""
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[1].weight.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    reference, ema = EMAModel(trained, decay=0.5), EMA(decay=0.5)
    ema.on_train_begin(None, None, None, model=model)
    for _ in range(3):
        with torch.no_grad():
            for p in trained:
                p.add_(torch.randn_like(p))
        ema.on_step_end(None, None, None, model=model)
        reference.step(trained)
    training = [p.detach().clone() for p in model.parameters()]
    reference.store(trained)
    reference.copy_to(trained)
    theirs = [p.detach().clone() for p in model.parameters()]
    reference.restore(trained)
    seen: list[list[torch.Tensor]] = []

    def draw(m, prompts, seed):
        seen.append([p.detach().clone() for p in m.parameters()])
        return torch.zeros(1, 1, 2, 2)

    options = {"prompt": "a", "count": 1, "every": 1, "seed": 0}
    callback = Validation(options, draw, lambda images, path: path, ema)
    state = SimpleNamespace(epoch=1.0, is_world_process_zero=True)
    callback.on_epoch_end(SimpleNamespace(output_dir="unused"), state, None, model=model)
    assert all(torch.equal(a, b) for a, b in zip(seen[0], theirs))
    assert not torch.equal(theirs[0], training[0])  # (the average is not the training weights)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), training))
    assert model.training and all(p.requires_grad for p in trained)


def test_the_stage_lends_its_ema_to_the_validation(pipeline, data):  # noqa: F811
    """prepare_t2i with train.use_ema and train.validation_prompt: the Validation callback holds the run's EMA."""
    _, prep = _prepare(pipeline, data, train__use_ema=True, train__validation_prompt="a digit")
    extras = prep.trainer_class.keywords["extras"]
    (ema,) = [c for c in extras if isinstance(c, EMA)]
    (shown,) = [c for c in extras if isinstance(c, Validation)]
    assert shown.ema is ema


def test_a_waiting_process_waits_while_class_images_keep_landing(tmp_path):
    """Eight images landing one every 0.1 s (0.8 s in all) with a 0.35 s wait: the wait restarts at each, so it
    returns when all eight are there (HEAD gave up at 0.35 s with about three)."""
    from PIL import Image

    def main_process() -> None:
        for i in range(8):
            time.sleep(0.1)
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}-x.jpg")

    writer = threading.Thread(target=main_process)
    writer.start()
    try:
        t2i_prior.wait_for_class_images(str(tmp_path), 8, timeout=0.35, poll=0.02)
    finally:
        writer.join()
    assert len(t2i_prior.class_images(str(tmp_path))) == 8


def test_a_wait_with_no_new_image_still_gives_up(tmp_path):
    """Two images land, then none: the wait gives up one wait period after the last one, in one line."""
    from PIL import Image

    def main_process() -> None:
        for i in range(2):
            time.sleep(0.1)
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}-x.jpg")

    writer = threading.Thread(target=main_process)
    writer.start()
    start = time.monotonic()
    try:
        with pytest.raises(ConfigError) as e:
            t2i_prior.wait_for_class_images(str(tmp_path), 3, timeout=0.3, poll=0.02)
    finally:
        writer.join()
    assert time.monotonic() - start >= 0.5  # (0.2 s of landings, then 0.3 s with none)
    assert str(e.value).endswith("waited 0.3 s for the local main process to draw 3 class images, found 2")


def test_t2is_ema_and_validation_keys_are_named_ignored_on_other_stages():
    from deltatune.train.config import build, ignored_keys

    keys = {"use_ema": True, "ema_decay": 0.99, "validation_prompt": "a cat", "num_validation_images": 2,
            "validation_epochs": 2}  # fmt: skip
    named = {k for k, _ in ignored_keys(build({"stage": "sft", "data": {"train": "t.jsonl"}, "train": keys}))}
    assert {f"train.{k}" for k in keys} <= named
    assert not ignored_keys(build({"stage": "t2i", "data": {"train": "t.jsonl"}, "train": keys}))

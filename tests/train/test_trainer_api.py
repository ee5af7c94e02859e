"""``deltatune.Trainer`` from Python, as a transformers user drives it: the best checkpoint kept through rotation and
named where it lies, an eval batch with no label token, a plain transformers model and a peft model (trained and
resumed as the Trainer does). Each test failed before its fix."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny import tiny_model
from transformers import TrainingArguments

import deltatune as dt

ROWS = [{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}] * 8


def _args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=2, report_to=[], use_cpu=True, learning_rate=1e-2,
                disable_tqdm=True, save_strategy="no")  # fmt: skip
    return TrainingArguments(**{**base, **kw})


def _lora():
    torch.manual_seed(0)
    return dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"]))


def test_the_best_checkpoint_survives_rotation_and_is_named_where_it_lies(tmp_path):
    """save_total_limit=1 deleted the best checkpoint (load_best_model_at_end then failed), and its trainer_state
    named it by the hidden staging folder (so a resumed run lost it)."""
    scores = iter([10.0, 1.0, 1.0, 1.0])  # the best at step 1
    args = _args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                 save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="score")  # fmt: skip
    trainer = dt.Trainer(model=_lora(), args=args, train_dataset=ROWS, eval_dataset=ROWS[:2],
                         compute_metrics=lambda p: {"score": next(scores)})  # fmt: skip
    trainer.train()
    best = str(tmp_path / "checkpoint-1")
    assert trainer.state.best_model_checkpoint == best and os.path.isdir(best)
    state = json.loads((tmp_path / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == best  # (the Trainer removes the last one at the end: limit 1)


def test_an_eval_batch_without_label_tokens_adds_nothing(tmp_path):
    """A row whose labels are all -100 alone in a batch made the per-token eval loss nan (its loss nan, times 0)."""
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]},
            {"input_ids": [5, 6, 7, 8], "labels": [-100] * 4},
            {"input_ids": [9, 10, 11, 12], "labels": [-100, -100, 11, 12]}]  # fmt: skip
    model = _lora()
    losses = [dt.Trainer(model=model, args=_args(tmp_path, per_device_eval_batch_size=b), eval_dataset=rows)
              .evaluate()["eval_loss"] for b in (1, 3)]  # fmt: skip
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and losses[0] == losses[0]


@pytest.mark.parametrize("kind", ["plain", "peft"])
def test_a_plain_or_peft_model_trains_and_resumes_as_under_the_trainer(kind, tmp_path):
    """A plain transformers model failed at the first batch (get_base_model); a peft model could not resume
    (load_adapter_weights)."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    if kind == "peft":
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    args = _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    dt.Trainer(model=model, args=args, train_dataset=ROWS).train()
    args = _args(tmp_path, max_steps=3, save_strategy="steps", save_steps=1)
    trainer = dt.Trainer(model=model, args=args, train_dataset=ROWS)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert trainer.state.global_step == 3


def _token_model(method: str):
    torch.manual_seed(0)
    config = {
        "p_tuning_mlp": dt.PTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
        "p_tuning_lstm": dt.PTuningConfig(
            num_virtual_tokens=3, encoder_reparameterization_type="LSTM", task_type="CAUSAL_LM"
        ),  # fmt: skip
        "prefix_mlp": dt.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, task_type="CAUSAL_LM"),
    }[method]
    return dt.get_delta_model(tiny_model("llama"), config)


@pytest.mark.parametrize("method", ["p_tuning_mlp", "p_tuning_lstm", "prefix_mlp"])
def test_a_token_encoder_resumes_unfolded_to_the_uninterrupted_run(method, tmp_path):
    """The checkpoint held the folded tokens only: resuming folded the MLP/LSTM into a table, so the optimizer's
    saved state no longer fitted (a ValueError from torch) and training would have gone on with another model."""
    rows = [{"input_ids": [5 + i, 6, 7 + i, 8], "labels": [5 + i, 6, 7 + i, 8]} for i in range(8)]
    whole = _token_model(method)
    dt.Trainer(model=whole, args=_args(tmp_path / "a", max_steps=4), train_dataset=rows).train()
    from transformers import TrainerCallback

    class StopAt2(TrainerCallback):  # the run stopped after its checkpoint at step 2
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    args = _args(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2)
    dt.Trainer(model=_token_model(method), args=args, train_dataset=rows, callbacks=[StopAt2()]).train()
    resumed = _token_model(method)
    n_trainable = sum(p.requires_grad for p in resumed.parameters())
    dt.Trainer(model=resumed, args=args, train_dataset=rows).train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))  # fmt: skip
    assert sum(p.requires_grad for p in resumed.parameters()) == n_trainable > 1  # the encoder, not a folded table
    want, got = whole.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # The adapter file stays peft's (the folded tokens); the encoder's tensors lie beside it
    assert (tmp_path / "b" / "checkpoint-2" / "training_state.safetensors").is_file()
    loaded = dt.DeltaModel.from_pretrained(tiny_model("llama"), str(tmp_path / "b" / "checkpoint-2"))
    assert sum(p.numel() for p in loaded.parameters() if p.requires_grad) == 0


def test_push_to_hub_uploads_the_adapter_and_other_processes_save_nothing(tmp_path, monkeypatch):
    """push_to_hub reached the base model's own (through attribute passing): it uploaded every base weight under
    transformers' names and no adapter_config.json. save_pretrained(is_main_process=False) wrote files."""
    import transformers.utils.hub as hub

    committed = {}

    class Api:  # the hub, offline: what would be committed
        def create_repo(self, repo_id, **kw):
            return type("Url", (), {"repo_id": repo_id})()

        def create_commit(self, repo_id, operations, **kw):
            committed[repo_id] = sorted(op.path_in_repo for op in operations)

    monkeypatch.setattr(hub, "hf_api", lambda: Api(), raising=False)
    model = _lora()
    model.push_to_hub("me/adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(committed["me/adapter"])
    assert not {"model.safetensors", "config.json"} & set(committed["me/adapter"])
    model.save_pretrained(str(tmp_path / "rank1"), is_main_process=False)
    assert not (tmp_path / "rank1").exists()


def test_a_failed_load_leaves_no_training_state_staged(tmp_path):
    """A load failing after its training state was staged left it on the encoder: the next load of another file
    restored the stale encoder and refused ("does not give the saved tokens")."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = _token_model("p_tuning_mlp")
    model.save_pretrained(str(tmp_path / "a"))
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "a", bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    save_file({k: v[:1] for k, v in tensors.items()}, str(bad / "adapter_model.safetensors"))  # a wrong shape
    with pytest.raises(dt.AdapterLoadError):
        model.load_adapter_weights(str(bad), "default")
    plain = tmp_path / "plain"  # peft's file alone: the tokens, folded in
    shutil.copytree(tmp_path / "a", plain)
    (plain / "training_state.safetensors").unlink()
    model.load_adapter_weights(str(plain), "default")
    encoder = model.get_base_model().virtual_tokens.prompt_encoder["default"]
    assert encoder.folded() and torch.equal(encoder.embedding.weight, tensors["prompt_embeddings"])

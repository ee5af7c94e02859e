"""The lead's mends after the second reviews of probe 21 (session 56), each shown failing on the file before."""

from __future__ import annotations

import pytest
import torch
from test_heads_fix21 import TRAIN, _raw, _write, tiny_tag, unloaded  # noqa: F401  (fixtures by name)

from deltatune.config import ConfigError
from deltatune.train import build, train


@pytest.mark.parametrize("metric", ["person_f1", "eval_org_recall", "f1"])
def test_a_tag_run_without_eval_rows_takes_any_classes_per_type_score_as_before(metric, tiny_tag, tmp_path, unloaded):  # noqa: F811
    """With neither data.eval nor data.val_size nothing is evaluated and metric_for_best_model is read by nothing:
    a per-type score of any class passes as before 0e5c80a (which refused every one, naming data.val_size unset)."""
    raw = _raw(tmp_path, tiny_tag, metric)
    raw["data"].pop("eval")
    raw["train"] = {"max_steps": 2, "metric_for_best_model": metric, "report_to": ["none"]}
    with pytest.raises(AssertionError, match="the model loaded"):
        train(build(raw))


def test_a_tag_run_without_eval_rows_still_refuses_a_type_no_class_has(tiny_tag, tmp_path, unloaded):  # noqa: F811
    raw = _raw(tmp_path, tiny_tag, "misc_f1")
    raw["data"].pop("eval")
    raw["train"] = {"max_steps": 2, "metric_for_best_model": "misc_f1", "report_to": ["none"]}
    with pytest.raises(ConfigError, match="hold no misc entity"):
        train(build(raw))
    assert TRAIN and _write  # (the rows the helpers write)


def test_a_types_count_names_the_way_out_of_a_resume(tiny_tag, tmp_path, unloaded):  # noqa: F811
    """A run that trained with <type>_number (accepted before 0e5c80a) is refused on --resume: the line says how on."""
    with pytest.raises(ConfigError, match=r"a run resumed with it: with --resume-changed"):
        train(build(_raw(tmp_path, tiny_tag, "person_number")))


class _Star(torch.nn.Module):
    """A base whose ``forward(*args, **kwargs)`` names no positional argument; ``names``: how it reads them."""

    def __init__(self, model: torch.nn.Module, names: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.model, self.config, self.names = model, model.config, names

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs) if not self.names else self.model(**dict(zip(self.names, args)), **kwargs)


def test_a_positional_float_mask_beside_keyword_images_is_not_refused():
    """A *args LLaVA called (ids, 4-D float mask, pixel_values=...) with [2, 1] images and adapters on the language
    model: the images come by keyword, so the unnamed mask of the rows holds none; a9abf54 refused it (the keyword
    call runs). Now it gives the keyword call's logits."""
    from matrix import tiny_vlm
    from test_mixed_batch_more import _llava_rows, _two

    model = _two(_Star(tiny_vlm("llava"), ("input_ids", "attention_mask")), {"target_modules": r".*language_model.*\.(q_proj|v_proj)"})  # fmt: skip
    rows, names = _llava_rows([2, 1]), ["a", "b"]
    length = rows["input_ids"].shape[1]
    mask = torch.zeros(2, 1, length, length).masked_fill_(torch.ones(length, length).triu(1).bool(), float("-inf"))
    with torch.no_grad():
        expected = model(input_ids=rows["input_ids"], attention_mask=mask, pixel_values=rows["pixel_values"],
                         adapter_names=names).logits  # fmt: skip
        got = model(rows["input_ids"], mask, pixel_values=rows["pixel_values"], adapter_names=names).logits
    assert torch.equal(got, expected)


def test_positional_images_uneven_beside_even_videos_are_refused_not_routed():
    """A *args Qwen2-VL with vision-tower adapters, row 0 holding 2 images and a video, row 1 a video alone, every
    tensor positional: the images (uneven) passed because the videos map evenly, and row 0's patches went through
    the wrong rows' adapters (0.0195 off the row alone). Now refused, asking for keywords, as the keyword call is."""
    from test_mixed_batch_more import _two
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    img, vid, start, end = 120, 121, 122, 123
    config = Qwen2VLConfig(
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
        text_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "intermediate_size": 48, "vocab_size": 128,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}},
        image_token_id=img, video_token_id=vid, vision_start_token_id=start, vision_end_token_id=end)  # fmt: skip
    torch.manual_seed(0)
    model = _two(
        _Star(Qwen2VLForConditionalGeneration(config).eval()), {"target_modules": ["q_proj", "v_proj", "qkv"]}
    )
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 100, (2, 27), generator=g)

    def put(row: int, at: int, token: int, n: int) -> int:
        ids[row, at], ids[row, at + 1 : at + 1 + n], ids[row, at + 1 + n] = start, token, end
        return at + n + 2

    put(0, put(0, put(0, 1, img, 4), img, 4), vid, 8)
    put(1, 1, vid, 8)
    kinds = (ids == img).long() + 2 * (ids == vid).long()
    pixels, grid = torch.randn(32, 1176, generator=g), torch.tensor([[1, 4, 4]] * 2)
    videos, video_grid = torch.randn(64, 1176, generator=g), torch.tensor([[2, 4, 4]] * 2)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        with pytest.raises(ValueError, match="images"):  # (the keyword call)
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                  pixel_values_videos=videos, video_grid_thw=video_grid, mm_token_type_ids=kinds,
                  adapter_names=["a", "b"])  # fmt: skip
        with pytest.raises(ValueError, match=r"positional argument \d+ .*pass it by keyword"):
            model(ids, mask, None, None, None, None, None, pixels, videos, grid, video_grid, kinds,
                  adapter_names=["a", "b"])  # fmt: skip


class _Parse:
    """A reward written as a callable class: it calls a library (json) that raises on the row."""

    def __call__(self, prompts, responses):
        import json

        return [json.loads(r)["score"] for r in responses]


def test_a_raising_rewards_line_is_found_in_a_callable_instance_or_a_partial():
    """A reward that is a callable instance or a functools.partial has no __code__: the line finder fell back to the
    innermost frame outside deltatune, json's decoder.py, not the reward's own line (second review of 292c66b)."""
    import functools
    import os

    from deltatune.train.ppo_math import RewardError
    from deltatune.train.ppo_reward import call_reward, reward_file

    def scored(prompts, responses, scale):
        return [scale * _Parse()([p], [r])[0] for p, r in zip(prompts, responses)]

    for fn in (_Parse(), functools.partial(scored, scale=2)):
        assert os.path.samefile(reward_file(fn), __file__)
        with pytest.raises(RewardError) as refused:
            call_reward(fn, "rw", ["p"], ["not json"])
        where = str(refused.value).rsplit(", at ", 1)[1].rstrip(")")
        assert os.path.samefile(where.rsplit(":", 1)[0], __file__), where


def test_the_start_key_reads_a_local_model_and_a_rows_file_as_the_same_however_written(tmp_path, monkeypatch):
    """The same run resumed with its model folder written relative or absolute, and its rows' file:line labels
    written either way, keeps its start evaluation (the key changed: a wasted evaluation of the whole eval set)."""
    import types

    from deltatune.train.grpo import PromptItem
    from deltatune.train.ppo_checkpoint import START_SETTINGS, start_key

    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)

    def key(model: str, source: str) -> str | None:
        train_ = types.SimpleNamespace(
            eval_on_start=True, eval_batch_size=None, batch_size=2, seed=1, precision="fp32"
        )
        cfg = types.SimpleNamespace(train=train_, model=types.SimpleNamespace(name_or_path=model),
                                    align=types.SimpleNamespace(**dict.fromkeys(START_SETTINGS)))  # fmt: skip
        return start_key(cfg, [PromptItem([1, 2], "hi", {"a": 1}, source)])

    assert key("m", "e.jsonl:1") == key(str(tmp_path / "m"), str(tmp_path / "e.jsonl") + ":1")
    assert key("m", "e.jsonl:1") != key("other-hub-model", "e.jsonl:1")


def test_a_grpo_checkpoint_it_cannot_resume_is_refused_before_the_start_is_evaluated(tmp_path, monkeypatch):
    """A checkpoint without the start's key (every one before it) is evaluated again at the start, which d8bd7a3 moved
    before the checkpoint loads: one of an older AdamW (one parameter group) sampled and scored every eval prompt,
    then was refused. Now refused first."""
    from test_ppo_fix21 import _grpo, _GRPOReward
    from tiny import save_tiny

    from deltatune.train import grpo
    from deltatune.train.grpo_checkpoint import STATE_FILE

    base = save_tiny(tmp_path / "llama")
    monkeypatch.setattr(grpo, "plot_panels", lambda *a: None)
    _grpo(base, tmp_path / "s", ["e one", "e two"], _GRPOReward())
    checkpoint = tmp_path / "s" / "checkpoint-2"
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    state.pop("start_key")
    groups = state["optimizer"]["param_groups"]
    groups[0]["params"] = groups[0]["params"] + groups[1]["params"]
    del groups[1:]
    torch.save(state, checkpoint / STATE_FILE)
    reward = _GRPOReward()
    with pytest.raises(ConfigError, match="one parameter group"):
        _grpo(base, tmp_path / "s", ["e one", "e two"], reward, str(checkpoint))
    assert reward.eval_calls == 0


def test_ppo_writes_its_log_line_by_line_as_grpo_and_a_resume_rewrites_the_checkpoints_steps(tmp_path):
    """PPO wrote log_history.jsonl only at its end (report.write), so the board drew no live curve of a running PPO
    run, where GRPO's appears step by step. Now each step's row is in the file before the next step's rollout is
    scored, and a resume starts it from its checkpoint's steps."""
    import json

    from test_ppo_probe11 import _policy
    from test_ppo_probe21 import _cfg, _DecodeTok

    from deltatune.train.ppo import train_ppo

    log = tmp_path / "log_history.jsonl"
    seen = []

    def reward(prompts, responses):
        seen.append(len(log.read_text().splitlines()) if log.exists() else None)
        return [len(r) / 10 for r in responses]

    prompts = [[5, 6, 7], [8, 9], [10, 11, 12], [13, 14]]
    torch.manual_seed(0)
    _, history = train_ppo(_policy(), _DecodeTok(), _cfg(tmp_path), prompts, None, reward, facts={})
    assert seen == [0, 1, 2]
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [h["step"] for h in history]
    seen.clear()
    torch.manual_seed(0)
    train_ppo(_policy(), _DecodeTok(), _cfg(tmp_path), prompts, None, reward, str(tmp_path / "checkpoint-2"), facts={})
    assert seen == [2]
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]

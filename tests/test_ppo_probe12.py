"""PPO as TRL's PPOTrainer (probe 12): the KL default, TRL's stop_token / stop_token_id, a saved run.yaml reused,
TRL's names on other stages, left padding, a response of one token, the value head and a resume.

The TRL reference is ``trl/experimental/ppo`` (huggingface/trl, commit 0062ee10a9bc; TRL 1.16 in the .venv no longer
ships it): its ``truncate_response`` and rollout targets are the copies in tests/test_ppo_probe11.py, imported here.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from test_ppo_probe11 import EOS, PAD, _fixed_rollout, _policy, _Tok, first_true_indices, truncate_response

from deltatune.config import ConfigError
from deltatune.train.config import build, ignored_keys, load_recipe
from deltatune.train.config_align import AlignArgs, validate_align
from deltatune.train.ppo import PPOLoop, Rollout, sample_responses
from deltatune.train.run import _recipe_dict

RAW = {"stage": "ppo", "model": {"name_or_path": "x"}, "data": {"train": "t.jsonl"}}
TRL_KL_COEF = 0.05  # TRL's PPOConfig kl_coef default (trl/experimental/ppo/ppo_config.py at 0062ee10)


class _DecodingTok(_Tok):
    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(map(str, row)) for row in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]


def _zero(prompts, responses):
    return [0.0] * len(prompts)


# -- 1. the KL coefficient's default ---------------------------------------------------------------------------


def test_default_kl_coefficient_is_trls():
    """align.init_kl_coef defaults to TRL's PPOConfig kl_coef, 0.05 (HEAD: 0.2, TRL's old PPOv1 default), and the
    loop's per-token penalty uses it: KL of log 2 on one token -> non-score reward -0.05 * 0.693147 = -0.034657."""
    a = AlignArgs()
    validate_align(a, "ppo")
    assert a.init_kl_coef == TRL_KL_COEF
    loop = PPOLoop(_policy(), _Tok(), _zero, a, lr=0.0, max_grad_norm=0.0)
    assert loop.kl_ctl.value == TRL_KL_COEF
    from deltatune.train.ppo_math import ppo_rewards

    lp, ref = torch.log(torch.tensor([[0.5]])), torch.log(torch.tensor([[0.25]]))
    out = ppo_rewards(lp, ref, torch.zeros(1), torch.ones(1, 1), loop.kl_ctl.value)
    assert out["non_score_reward"].item() == pytest.approx(-0.034657, abs=1e-6)


# -- 3. a saved run.yaml is reusable; 4. TRL's names on the dpo stage --------------------------------------------


def _saved(tmp_path, raw: dict) -> str:
    """The run.yaml ``deltatune train`` writes for ``raw`` (run._recipe_dict of the built config)."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_recipe_dict(build(raw)), sort_keys=False))
    return str(path)


def test_saved_run_yaml_with_num_mini_batches_reused_with_another_batch_size(tmp_path):
    """num_mini_batches 4 of a batch of 8 ran mini-batches of 2; its run.yaml reused with train.batch_size=16 builds
    (HEAD: "align.mini_batch_size 2 and align.num_mini_batches 4 ... are both set") and keeps the size it ran with."""
    saved = _saved(tmp_path, {**RAW, "train": {"batch_size": 8}, "align": {"num_mini_batches": 4}})
    on_disk = yaml.safe_load(Path(saved).read_text())["align"]
    assert (on_disk["mini_batch_size"], on_disk["num_mini_batches"]) == (2, None)
    assert load_recipe(saved).align.mini_batch_size == 2
    cfg = load_recipe(saved, ["train.batch_size=16"])
    assert (cfg.train.batch_size, cfg.align.mini_batch_size) == (16, 2)
    cfg = load_recipe(saved, ["train.batch_size=16", "align.mini_batch_size=8"])  # (a new size: no clash either)
    assert cfg.align.mini_batch_size == 8
    from deltatune.train.runfolder import recipe_changes

    raw = {**RAW, "train": {"batch_size": 8}, "align": {"num_mini_batches": 4, "kl_coef": 0.1}}
    assert recipe_changes(_recipe_dict(build(raw)), _recipe_dict(build(raw))) == []  # (--resume with the same recipe)
    with pytest.raises(ConfigError, match="align.mini_batch_size 4 and align.num_mini_batches 4"):  # (still refused)
        build({**RAW, "train": {"batch_size": 8}, "align": {"num_mini_batches": 4, "mini_batch_size": 4}})


@pytest.mark.parametrize("trl, ours, override, want", [
    ("kl_coef", "init_kl_coef", "align.init_kl_coef=0.3", 0.3),
    ("num_ppo_epochs", "ppo_epochs", "align.ppo_epochs=1", 1),
    ("response_length", "max_new_tokens", "align.max_new_tokens=9", 9),
])  # fmt: skip
def test_saved_run_yaml_with_trls_names_reused_with_one_changed(tmp_path, trl, ours, override, want):
    """A recipe with TRL's name (kl_coef: 2) saved a run.yaml holding deltatune's name alone, so the key it holds
    overridden on reuse builds (HEAD's run.yaml held both: "align.kl_coef (TRL's name) and align.init_kl_coef are both
    set, to 2 and 0.3"). TRL's name overridden beside the saved one is refused in one line naming both, as in any
    recipe that sets both (on purpose: which of the two was meant is not known)."""
    saved = _saved(tmp_path, {**RAW, "align": {trl: 2}})
    on_disk = yaml.safe_load(Path(saved).read_text())["align"]
    assert (on_disk[trl], on_disk[ours]) == (None, 2)
    assert getattr(load_recipe(saved, [override]).align, ours) == want
    with pytest.raises(ConfigError, match=f"^align.{trl} .TRL's name. and align.{ours} are both set, to 3(.0)? and 2"):
        load_recipe(saved, [f"align.{trl}=3"])


def test_trls_kl_coef_on_dpo_is_named_once(tmp_path, capsys):
    """On stage dpo: a PPO run.yaml that had kl_coef: 0.1 names one ignored key, align.init_kl_coef (HEAD named it
    twice, as align.init_kl_coef and align.kl_coef); a dpo recipe with kl_coef names align.kl_coef, as written, and
    its message is right (the key, the stage that reads it, the stage that ignores it)."""
    saved = _saved(tmp_path, {**RAW, "align": {"kl_coef": 0.1}})
    assert ignored_keys(load_recipe(saved, ["stage=dpo"])) == [("align.init_kl_coef", "ppo")]
    cfg = build({**RAW, "stage": "dpo", "align": {"kl_coef": 0.1}})
    assert ignored_keys(cfg) == [("align.kl_coef", "ppo")]
    assert cfg.align.init_kl_coef == TRL_KL_COEF and cfg.align.kl_coef == 0.1  # (not copied where not read)
    assert ignored_keys(build({**RAW, "stage": "dpo", "align": {"init_kl_coef": TRL_KL_COEF}})) == []


# -- 2. TRL's stop_token / stop_token_id -----------------------------------------------------------------------


class _Fixed(torch.nn.Module):
    """A 'policy' whose generate returns fixed tokens (and records the generation config it was given)."""

    def __init__(self, generated: torch.Tensor):
        super().__init__()
        self.w, self.generated, self.generation_config, self.seen = (
            torch.nn.Parameter(torch.zeros(1)),
            generated,
            None,
            [],
        )

    def generate(self, input_ids, attention_mask, generation_config):
        self.seen.append(generation_config.eos_token_id)
        return torch.cat([input_ids, self.generated], 1)


def test_stop_token_id_truncates_as_trls():
    """align.stop_token_id 7: generate stops at 7 (its eos_token_id), the response is cut after the first 7 as TRL's
    truncate_response(7, pad, ...) and its mask is TRL's ~padding_mask; an EOS before it does not end the response
    (TRL's generation_config.eos_token_id is the stop token alone)."""
    generated = torch.tensor([[5, 7, 9, 7, 9], [5, 6, 8, 8, 9], [EOS, 4, 7, 4, 4]])
    model = _Fixed(generated)
    align = AlignArgs(stop_token_id=7)
    validate_align(align, "ppo")
    _, _, mask, response, truncated = sample_responses(model, [[4, 5], [6], [7, 8]], PAD, 7, align)
    assert model.seen == [7]
    want = truncate_response(7, PAD, generated)
    assert torch.equal(response, want)
    seq_len = first_true_indices(want == PAD) - 1
    assert torch.equal(mask.bool(), ~(torch.arange(5).repeat(3, 1) > seq_len.unsqueeze(1)))
    assert mask.sum(-1).tolist() == [2, 5, 3] and truncated.tolist() == [False, True, False]


def test_stop_token_id_in_the_loop_and_the_missing_eos_penalty():
    """PPOLoop samples with the stop token as generate's eos_token_id, cuts after it, and takes missing_eos_penalty
    1.5 off the score of each response without it: scores 1, -0.5, 2, 0.3, row 1 alone without a 7 ->
    objective/scores = (1 - 2 + 2 + 0.3) / 4 = 0.325 (the reward model's own mean, 0.7, stays the logged reward). TRL
    counts a response complete only when it holds the tokenizer's EOS, so with another stop token it penalises every
    response that stopped at it: a difference on purpose (its comment: "Ensure that the sample contains
    stop_token_id"). Here row 3 holds an EOS and no 7: penalised, and not cut at the EOS (TRL's generate does not
    stop at it either)."""
    align = AlignArgs(stop_token_id=7, missing_eos_penalty=1.5, ppo_epochs=1, max_new_tokens=5)
    validate_align(align, "ppo")
    loop = PPOLoop(_policy(), _DecodingTok(), lambda p, r: [1.0, -0.5, 2.0, 0.3], align, lr=0.0, max_grad_norm=0.0)
    assert (loop.eos, loop.pad) == (7, PAD)
    fixed = _Fixed(torch.tensor([[5, 7, 9, 7, 9], [5, 6, 8, 8, 9], [7, 4, 4, 4, 4], [EOS, 4, 6, 4, 7]]))
    loop.model.generate = fixed.generate
    r = loop.rollout([[5, 6], [8, 9, 10], [11], [12, 13]])
    assert fixed.seen == [7]
    assert r.response_mask.sum(-1).tolist() == [2, 5, 1, 5] and r.truncated.tolist() == [False, True, False, False]
    assert r.sequences[0, -3:].tolist() == [PAD] * 3 and r.sequences[3, -5:].tolist() == [EOS, 4, 6, 4, 7]
    stats = loop.update(r)
    assert stats["objective/scores"] == pytest.approx(0.325, abs=1e-6)
    assert stats["reward"] == pytest.approx(0.7, abs=1e-6)


@pytest.mark.parametrize("align, words", [
    ({"stop_token": "eot"}, "align.stop_token must be eos or null .*got 'eot'"),
    ({"stop_token": "eos", "stop_token_id": 7}, "align.stop_token must be eos or null .*not both"),
    ({"stop_token_id": -1}, "align.stop_token_id must be a token id >= 0 .*got -1"),
])  # fmt: skip
def test_stop_token_bad_values_are_one_line(align, words):
    with pytest.raises(ConfigError, match=words) as err:
        build({**RAW, "align": align})
    assert "\n" not in str(err.value)
    assert build({**RAW, "align": {"stop_token": "eos"}}).align.stop_token == "eos"  # (TRL's eos: the default here)


def test_stop_token_id_outside_the_vocabulary_is_one_line():
    """A stop token the model does not have (vocabulary 48): one line naming the key, not an IndexError from generate."""
    with pytest.raises(
        ConfigError, match=r"^align.stop_token_id 48 is not a token id \(the vocabulary has 48 tokens\)$"
    ):
        PPOLoop(_policy(), _Tok(), _zero, AlignArgs(stop_token_id=48))


# -- probes: left padding, a response of one token, the value head, resume --------------------------------------


def test_left_padded_rows_score_as_unpadded_ones():
    """The rollout's log-probs and values of a left-padded row equal those of the same row alone, unpadded
    (position ids restart after the padding): max abs diff < 1e-5."""
    loop = PPOLoop(_policy(), _Tok(), _zero, AlignArgs(), lr=0.0)
    torch.nn.init.normal_(loop.value_head.weight, std=0.3)
    r = _fixed_rollout(loop, eos_rows=True)
    for i in range(4):
        keep = r.attention_mask[i, : r.prompt_length].bool()
        P = int(keep.sum())
        seq = torch.cat([r.sequences[i, : r.prompt_length][keep], r.sequences[i, r.prompt_length :]])[None]
        alone = Rollout(seq, torch.ones_like(seq), r.response_mask[i : i + 1], P, None, None, None, None, [], [])
        with torch.no_grad():
            logp, values, _ = loop._forward(alone)
        m = r.response_mask[i]
        assert (logp[0] * m - r.logprobs[i]).abs().max() < 1e-5
        assert (values[0] * m - r.values[i]).abs().max() < 1e-5
    assert r.attention_mask[:, : r.prompt_length].eq(0).any()  # (some rows were padded)


def test_a_response_of_its_stop_token_alone():
    """A response that is its EOS alone (the rest padding): one token in the mask, the score on it, finite losses,
    and the row's advantages 0 past it."""
    align = AlignArgs(ppo_epochs=1, missing_eos_penalty=1.0)
    loop = PPOLoop(_policy(), _Tok(), _zero, align, lr=1e-2, max_grad_norm=0.0)
    r = _fixed_rollout(loop, eos_rows=False)
    P = r.prompt_length
    r.sequences[0, P], r.sequences[0, P + 1 :] = EOS, PAD
    r.response_mask[0] = torch.tensor([1, 0, 0, 0, 0])
    r.attention_mask[0, P:] = r.response_mask[0]
    r.truncated = torch.tensor([False, True, True, True])
    with torch.no_grad():
        logp, values, _ = loop._forward(r)
    r.logprobs, r.values = logp * r.response_mask, values * r.response_mask
    r.ref_logprobs = loop.reference_logprobs(r) * r.response_mask
    stats = loop.update(r)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values() if isinstance(v, float))
    assert stats["response_length"] == pytest.approx((1 + 5 * 3) / 4)
    assert stats["objective/scores"] == pytest.approx((1.0 - 1.5 + 1.0 - 0.7) / 4, abs=1e-6)


def test_value_head_and_checkpoint_round_trip(tmp_path):
    """ppo_checkpoint.save then load into a fresh loop: adapter, value head, AdamW moments, KL coefficient, data order
    and random state come back bit for bit, and the next update from either loop gives equal parameters."""
    from deltatune.train import ppo_checkpoint

    align = AlignArgs(ppo_epochs=1, adaptive_kl=True, init_kl_coef=0.1)
    first = PPOLoop(_policy(), _Tok(), _zero, align, lr=1e-2, max_grad_norm=0.0)
    first.update(_fixed_rollout(first, eos_rows=True))
    g = torch.Generator().manual_seed(3)
    ppo_checkpoint.save(str(tmp_path), 1, first, g, [2, 0], [{"step": 1}], None)
    second = PPOLoop(_policy(), _Tok(), _zero, copy.deepcopy(align), lr=1e-2, max_grad_norm=0.0)
    g2 = torch.Generator()
    step, order, history = ppo_checkpoint.load(str(tmp_path / "checkpoint-1"), second, g2)
    assert (step, order, history) == (1, [2, 0], [{"step": 1}])
    assert torch.equal(g.get_state(), g2.get_state()) and second.kl_ctl.value == first.kl_ctl.value != 0.1
    for a, b in zip(first.value_head.state_dict().values(), second.value_head.state_dict().values()):
        assert torch.equal(a, b)
    assert first.value_head.weight.abs().max() > 0  # (it moved from its zero init)
    r = _fixed_rollout(first, eos_rows=True)
    r2 = dataclasses.replace(r)
    torch.manual_seed(11)
    first.update(r)
    torch.manual_seed(11)
    second.update(r2)
    for (n, p), q in zip(first.model.named_parameters(), second.model.parameters()):
        assert torch.equal(p, q), n
    for a, b in zip(first.value_head.parameters(), second.value_head.parameters()):
        assert torch.equal(a, b)


def test_prepare_ppo_checks_the_stop_token_before_the_model_loads(tmp_path):
    """prepare_ppo refuses a stop token outside the tokenizer in one line (no model loaded yet) and its report note
    names the stop token a run samples with."""
    import json

    from tiny import save_tiny, tokenizer

    from deltatune.train.ppo import prepare_ppo

    tok = tokenizer()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"tell me about the {w} cat"}) + "\n" for w in "abcd"))
    raw = {"stage": "ppo", "model": {"name_or_path": save_tiny(tmp_path / "llama")}, "data": {"train": str(prompts)},
           "train": {"batch_size": 4}, "align": {"reward_model": "operator:add"}}  # fmt: skip
    with pytest.raises(ConfigError, match=f"^align.stop_token_id {len(tok)} is not a token id"):
        prepare_ppo(build({**raw, "align": {**raw["align"], "stop_token_id": len(tok)}}), tok)
    notes = prepare_ppo(build({**raw, "align": {**raw["align"], "stop_token_id": 5}}), tok).notes
    assert notes[0].endswith("; responses stop at token id 5 (align.stop_token_id)")
    assert "KL coefficient 0.05 (fixed)" in notes[0]


def test_a_sampled_pad_token_stays_in_the_response():
    """Kept on purpose: a pad token the policy samples before its EOS (pad != eos, pad a normal vocabulary entry) is a
    response token here (mask 1 up to the EOS), where TRL's sequence length is "first pad - 1", so its padding mask
    ends the response before the pad (a response opening with the pad is all padding to TRL, its score on token 0)."""
    generated = torch.tensor([[5, PAD, 6, EOS, 4], [PAD, 6, 6, 6, 6]])
    _, _, mask, response, truncated = sample_responses(_Fixed(generated), [[4, 5], [6]], PAD, EOS, AlignArgs())
    assert mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]] and truncated.tolist() == [False, True]
    trl = truncate_response(EOS, PAD, generated)
    assert torch.equal(response, trl)  # (the same tokens; only where the response ends differs)
    seq_len = first_true_indices(trl == PAD) - 1
    assert seq_len.tolist() == [0, -1]  # TRL: one token, and none

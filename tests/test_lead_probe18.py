"""Session 53's lead fixes, each shown failing on the file before it (probe round 18)."""

from __future__ import annotations

import json

import pytest
from tiny import tokenizer

from deltatune.data.load import DataError
from deltatune.train.config import build


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_images_a_processor_leaves_of_different_sizes_are_one_line_not_a_stack_traceback(tmp_path):
    """A processor that does not resize (do_resize false) gives each image its own size: torch.stack's "stack
    expects each tensor to be equal size" came from inside the Trainer's first batch; it is one line naming the
    sizes and the processor keys to set. Images of one size stack as before."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import ViTImageProcessorPil

    from deltatune.data.images import collate
    from deltatune.train.image_cls import prepare_image_cls

    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(10, 12), (8, 8), (10, 12)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    data = _jsonl(tmp_path / "d.jsonl", [{"image": f"{i}.png", "label": "aba"[i]} for i in range(3)])
    cfg = build({"stage": "image_cls", "data": {"train": data}})
    p = prepare_image_cls(cfg, ViTImageProcessorPil(do_resize=False))
    with pytest.raises(DataError) as err:
        collate([p.train[0], p.train[1]])
    assert str(err.value) == (
        "the image processor gives images of different sizes in one batch (3x8x8 and 3x10x12): set its size (with "
        "do_resize, or do_center_crop and crop_size) so that every image comes out one size"
    )
    same = collate([p.train[0], p.train[2]])
    assert same["pixel_values"].shape == (2, 3, 10, 12) and same["labels"].tolist() == [0, 0]
    assert torch.equal(same["pixel_values"][0], p.train[0]["pixel_values"])


def test_an_image_cls_list_label_names_stage_image_cls(tmp_path):
    """An image_cls data file with a list label was refused as "stage cls trains one class per row": the user ran
    stage image_cls; the line names it (and where multi-label rows go). Stage cls's line names cls, as before."""
    import numpy as np
    from PIL import Image

    from deltatune.data.tasks import label_map
    from deltatune.train.image_cls import prepare_image_cls

    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "0.png")
    data = _jsonl(tmp_path / "d.jsonl", [{"image": "0.png", "label": "a"}, {"image": "0.png", "label": ["a", "b"]}])
    with pytest.raises(DataError) as err:
        prepare_image_cls(build({"stage": "image_cls", "data": {"train": data}}), None)
    assert str(err.value) == (
        f"{data}:2: label in column 'label' is a list; stage image_cls trains one class per row: a class name (text) "
        "or a class id (a whole number); a list of them is a multi-label row (text classification only: stage cls)"
    )
    from deltatune.data.load import read_rows

    with pytest.raises(DataError, match=r":2: label in column 'label' is a list; stage cls trains one class per row"):
        label_map(read_rows(data), "label", None)


@pytest.mark.parametrize(
    "method", ["freeze", "bitfit", "full", "prompt_tuning", "prefix_tuning", "p_tuning", "vpt", "fusion"]
)
def test_a_method_that_adapts_no_module_by_name_refuses_target_modules(method, tmp_path):
    """BitFit with target_modules [q_proj] trained every bias of the base, freeze its usual blocks, full everything,
    and the prompt methods (peft's configs have no target_modules: a TypeError there) silently read none: the
    selection is refused in one line naming the method. A saved file's value (never read) is dropped on load, so
    old adapters load and compute as before; inject_adapter_in_model(state_dict=...) leaves such a config's own rule."""
    from deltatune.config import ConfigError
    from deltatune.registry import get

    cls = get(method).config_class
    fields = {"adapter_names": ["a", "b"]} if method == "fusion" else {}  # (a fusion names its members)
    with pytest.raises(ConfigError) as err:
        cls(target_modules=["q_proj"], **fields)
    assert str(err.value).startswith(f"{method}: ") and str(err.value).endswith("; leave target_modules unset")
    old = {**cls(**fields).to_dict(), "target_modules": ["q_proj"]}
    loaded = cls.from_dict(old)
    assert loaded.target_modules is None and loaded.to_dict() == cls(**fields).to_dict()
    if method in ("prompt_tuning", "prefix_tuning", "p_tuning"):
        import peft

        peft_cls = {"prompt_tuning": peft.PromptTuningConfig, "prefix_tuning": peft.PrefixTuningConfig}
        with pytest.raises(TypeError, match="target_modules"):
            peft_cls.get(method, peft.PromptEncoderConfig)(target_modules=["q_proj"])


def test_bitfit_injected_with_a_state_dict_trains_its_biases_as_without():
    """inject_adapter_in_model(state_dict=...) reads the keys as targets (peft's); for BitFit the config's own rule
    (every bias) stays, the config unchanged."""
    import torch
    from tiny import tiny_model

    import deltatune as dt
    from deltatune.methods.bitfit import BitFitConfig

    torch.manual_seed(0)
    plain, keyed = tiny_model("gpt2"), tiny_model("gpt2")
    dt.inject_adapter_in_model(BitFitConfig(), plain)
    state = {"transformer.h.0.attn.c_attn.bias": torch.zeros(1)}
    dt.inject_adapter_in_model(BitFitConfig(), keyed, state_dict=state)
    assert [n for n, p in keyed.named_parameters() if p.requires_grad] == [
        n for n, p in plain.named_parameters() if p.requires_grad
    ]
    assert keyed.peft_config["default"].target_modules is None


def test_freeze_extra_modules_naming_what_holds_the_blocks_is_refused(tmp_path):
    """freeze_extra_modules=["model"] trained embed_tokens and norm (every parameter outside the blocks under
    model.), which LLaMA-Factory refuses ("model" is not one of its non-hidden modules): for a new adapter a name of
    the trained blocks' stack is refused in one line listing the modules outside them, the model left as it was; a
    file saved so before loads as it trained (embed_tokens and norm); "norm" still trains model.norm."""
    import json

    import torch
    from tiny import tiny_model

    import deltatune as dt
    from deltatune.config import ConfigError

    model = tiny_model("llama", "causal_lm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for holder, stack in (("model", "model.layers"), ("layers", "model.layers")):
        with pytest.raises(ConfigError) as err:
            dt.get_delta_model(model, dt.FreezeConfig(freeze_trainable_layers=1, freeze_extra_modules=[holder]))
        assert str(err.value) == (
            f"freeze_extra_modules: {holder!r} holds the blocks ({stack}); name modules outside them: embed_tokens, "
            "lm_head, norm"
        )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    names = dt.FreezeConfig(freeze_trainable_layers=1, freeze_extra_modules=["norm"]).trainable_base_parameters(model)
    assert "model.norm.weight" in names and "model.embed_tokens.weight" not in names
    extra = ["embed_tokens", "norm"]  # (what "model" trained: the file of such a run holds them)
    old = dt.get_delta_model(
        tiny_model("llama", "causal_lm"), dt.FreezeConfig(freeze_trainable_layers=1, freeze_extra_modules=extra)
    )
    old.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "freeze_extra_modules": ["model"]}))
    loaded = dt.DeltaModel.from_pretrained(tiny_model("llama", "causal_lm"), str(tmp_path), is_trainable=True)
    trained = sorted(n for n, p in loaded.named_parameters() if p.requires_grad)
    assert any(n.endswith("model.embed_tokens.weight") for n in trained)
    assert any(n.endswith("model.norm.weight") for n in trained)


def test_python_m_deltatune_is_the_deltatune_command():
    """`python -m deltatune` failed ("is a package and cannot be directly executed"); it is the CLI, exit codes too."""
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "deltatune", "--version"], capture_output=True, text=True)
    import deltatune

    assert ok.returncode == 0 and deltatune.__version__ in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "deltatune", "nosuch"], capture_output=True, text=True)
    assert bad.returncode == 2 and "deltatune: error: argument command: invalid choice: 'nosuch'" in bad.stderr


def test_an_adapter_deleted_while_unmerged_for_a_block_leaves_no_merge_scale_for_its_successor():
    """disable_adapter unmerges every merge for the block and redoes each after it (merge_record / merge_again); an
    adapter deleted inside the block had its merge scale (0.5, merged in a rescale block) written back all the same,
    and a new adapter of its name then merged at 0.5 while computing at 2.0 unmerged: merged logits 0.046 off."""
    import torch
    from tiny import tiny_inputs, tiny_model

    import deltatune as dt

    torch.manual_seed(0)
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    model = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**lora), adapter_name="x").eval()
    model.add_adapter("y", dt.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], init_lora_weights=False))
    inputs = tiny_inputs("llama", batch=2)
    with model.rescale_adapter_scale(0.25):
        model.merge_adapter(["x"])
    with model.disable_adapter():
        model.delete_adapter("x")
    model.add_adapter("x", dt.LoraConfig(**lora))
    for _, layer in model._layers():
        if "x" in getattr(layer, "lora_B", {}):
            torch.nn.init.normal_(layer.lora_B["x"].weight)
    model.set_adapter("x")
    with torch.no_grad():
        unmerged = model(**inputs).logits
        model.merge_adapter(["x"])
        merged = model(**inputs).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)


def test_an_old_run_yaml_naming_target_modules_for_a_method_that_reads_none_still_loads(tmp_path):
    """5ab6899 refuses target_modules for bitfit / freeze / full / the prompt methods; a finished run's run.yaml from
    before naming some (never read: the run trained every bias) no longer built, so eval and resume of that run
    were refused. It loads as it trained (the key dropped); a new recipe is refused as before; method.towers for
    such a method (towers choose modules by name) is refused as a run starts, and a model's towers leave it alone."""
    import yaml

    from deltatune.config import ConfigError
    from deltatune.train.checks import check_run
    from deltatune.train.runs import read_recipe

    (tmp_path / "run.yaml").write_text(
        yaml.safe_dump({"stage": "sft", "method": {"name": "bitfit", "target_modules": ["q_proj"]}})
    )
    raw = read_recipe(str(tmp_path))
    assert raw["method"] == {"name": "bitfit"}
    assert build(raw).method["name"] == "bitfit"
    lora = {"stage": "sft", "method": {"name": "lora", "target_modules": ["q_proj"]}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(lora))
    assert read_recipe(str(tmp_path))["method"]["target_modules"] == ["q_proj"]
    with pytest.raises(ConfigError, match="^bitfit: BitFit trains every bias term of the base; leave target_modules"):
        build({"stage": "sft", "method": {"name": "bitfit", "target_modules": ["q_proj"]}})
    with pytest.raises(ConfigError) as err:
        check_run(build({"stage": "sft", "method": {"name": "bitfit", "towers": ["vision"]}}))
    assert str(err.value) == (
        "method.towers: bitfit: BitFit trains every bias term of the base, whichever tower; leave method.towers unset"
    )


def _refusing_collate(batch):
    raise DataError("d.jsonl:3: a refusal raised in a worker")


def test_a_refusal_raised_in_a_dataloader_worker_is_its_own_one_line_at_the_cli():
    """With train.num_workers > 0 torch re-raises a worker's DataError as "Caught DataError in DataLoader worker
    process 0.\\nOriginal Traceback ...": the CLI printed the worker's whole traceback on one long line. Its own line
    now; an error raised in the main process reads as before."""
    import torch

    from deltatune.cli import _message

    loader = torch.utils.data.DataLoader(list(range(4)), batch_size=2, num_workers=1, collate_fn=_refusing_collate)
    with pytest.raises(DataError) as err:
        next(iter(loader))
    assert str(err.value).startswith("Caught DataError in DataLoader worker process 0.\n")
    assert _message(err.value) == "d.jsonl:3: a refusal raised in a worker"
    assert _message(DataError("a\nb")) == "a b" and _message(KeyError("k")) == "k"


def test_check_vocab_counts_a_decoupled_embeddings_additional_rows():
    """IDEFICS' decoupled embedding keeps num_additional_embeddings beside num_embeddings: a tokenizer filling both
    was refused as larger than the embeddings."""
    from types import SimpleNamespace

    from transformers import PreTrainedTokenizerFast
    from transformers.models.idefics.modeling_idefics import IdeficsDecoupledEmbedding

    from deltatune.config import ConfigError
    from deltatune.train.models import check_vocab

    tok = tokenizer()
    n = len(tok)
    assert isinstance(tok, PreTrainedTokenizerFast)
    for extra, ok in ((2, True), (0, False)):
        emb = IdeficsDecoupledEmbedding(n - 2, extra, 4, partially_freeze=False)  # (rows, additional, dim)
        model = SimpleNamespace(get_input_embeddings=lambda emb=emb: emb)
        if ok:
            check_vocab("m", model, tok)
        else:
            with pytest.raises(ConfigError, match=f"its tokenizer has {n} tokens but its embeddings hold {n - 2}"):
                check_vocab("m", model, tok)

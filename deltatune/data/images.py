"""Images for the vision stages: an image-folder tree or a table with an image path column, checked, then
turned into ``pixel_values`` by the model's own image processor.

Sources:

- an image folder: one sub-folder per class (``digits/train/3/0042.png``); the class names are the sub-folder
  names in sorted order, and a class's images are all those under its folder (``cat/batch1/x.png`` too), as
  torchvision's ``ImageFolder`` reads them; a top folder of split folders (``d/train/cat/x.png``, ``d/test_set/...``:
  ``split_of``) is refused, where datasets' ``imagefolder`` reads splits and read as classes they trained;
- a JSONL / JSON / CSV / TSV / Parquet file with an image path column (``data.image_column``) and a label column
  (``data.label_column``). The column may hold datasets' ``Image`` feature as exported (``{"bytes": ..., "path":
  ...}``, Parquet's and ``Dataset.to_parquet``'s): the bytes when present (base64 text in JSON), else the path, as
  datasets' ``Image.decode_example`` reads it. Relative paths are read relative to the data file's folder. A relative path that
  leaves that folder (``../../etc/x.png``) is refused unless ``data.allow_outside: true``; absolute paths are
  taken as given (the user wrote them).

Every image is opened once while preparing (``check``), so a corrupt or unreadable file stops the run before
training with one line naming the data file and line (or the image folder) and the image path, never a PIL
traceback. Images are turned as their EXIF orientation says. Images in another mode than RGB (grayscale "L",
palette "P", "RGBA", 16-bit "I;16", 32-bit "I" and float "F" grey: ``to_rgb``) are converted to RGB, and counted for
the report. Decoding for training happens again, lazily, in ``ImageDataset`` (nothing but the
paths is held in memory), with the optional train-time augmentation (random resized crop, horizontal flip; off by
default) drawn from torch's generator, so the Trainer's seed fixes it. PIL and numpy only: no torchvision.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from .load import DataError, arrow_reader, data_path, read_rows, saved_shards

IMAGE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif", ".jpe", ".pbm", ".pnm",
    ".tga", ".ico", ".apng", ".dib", ".jp2", ".j2k", ".j2c", ".jpc", ".jpf", ".jpx", ".pcx", ".sgi", ".rgb", ".rgba",
    ".bw", ".xbm", ".xpm", ".icns", ".dds", ".psd", ".im", ".msp", ".ras", ".blp", ".cur", ".dcx", ".fli", ".flc",
    ".ftc", ".ftu", ".gbr", ".icb", ".iim", ".pcd", ".pxr", ".vda", ".vst", ".fit", ".fits",
)  # fmt: skip
"""The files an image folder's images are: datasets' imagefolder's (``ImageFolder.EXTENSIONS``, PIL's readers; the
first ten torchvision's nine and .gif) but for those PIL cannot decode by itself (video .mpg / .mpeg, PostScript .eps /
.ps, Windows metafiles .wmf / .emf, GRIB / BUFR), which datasets fails on when it decodes them."""
SHOWN_EXTENSIONS = ", ".join(IMAGE_EXTENSIONS[:10]) + ", ..."
AUGMENTATIONS = ("random_resized_crop", "hflip")


@dataclass
class ImageRow:
    """One image example: the resolved file path, its label (a class name or id) and where it came from."""

    path: str
    label: Any
    source: str
    """``file:line`` of the data row, or the image path itself for an image folder."""
    text: str | list[str] | None = None
    """A caption (image-to-text), when the source has one; text-to-image rows may hold several (a list)."""
    data: bytes | None = None
    """The encoded image itself (datasets' ``{"bytes": ...}``), read instead of ``path`` when given."""


def check_inside(path: str, root: str, source: str, allow_outside: bool) -> str:
    """The image path resolved against ``root``; a relative path that leaves ``root`` is refused unless allowed."""
    if os.path.isabs(path):  # normalised as a relative one is ('/d/./0.png' is '/d/0.png': one image's captions pool)
        return _normal(path)
    full = os.path.normpath(os.path.join(root, path))
    inside = os.path.commonpath([os.path.abspath(full), os.path.abspath(root)]) == os.path.abspath(root)
    if not inside and not allow_outside:
        raise DataError(
            f"{source}: image path {path!r} leads outside the data folder {root!r}; "
            "set data.allow_outside=true to read it anyway"
        )
    return _normal(os.path.join(root, path))


def _normal(path: str) -> str:
    """``path`` without '.' and '//' (which never change the file it names), and without 'x/..' where that names the
    same file: after a symlink ('link/../0.png', link -> real/sub) the OS opens real/0.png, not the 0.png beside link,
    so such a path (or one whose file is missing) is kept as written, '.' and '//' removed."""
    norm = os.path.normpath(path)
    if ".." not in path.split(os.sep):
        return norm
    try:
        if os.path.samefile(norm, path):
            return norm
    except OSError:
        pass
    head = os.sep if path.startswith(os.sep) else ""
    return head + os.sep.join(p for p in path.split(os.sep) if p not in ("", "."))


def read_image_rows(
    spec: str,
    image_column: str = "image",
    label_column: str | None = "label",
    limit: int | None = None,
    allow_outside: bool = False,
    text_column: str | None = None,
    caption_lists: bool = False,
    classes: list | None = None,
) -> list[ImageRow]:
    """Read the image examples of an image folder or a data file.

    Args:
        spec: a folder of class sub-folders, a .jsonl/.json/.csv/.tsv/.parquet/.arrow file with an image column, or
            a ``Dataset.save_to_disk`` folder (read as ``load_from_disk`` reads it, its shards' rows).
        image_column: the column holding the image path (data files).
        label_column: the column holding the label (data files); None: no label (image-to-text).
        limit: read at most this many examples.
        allow_outside: accept relative image paths that lead outside the data file's folder.
        text_column: the caption column (image-to-text); a row without it is refused.
        caption_lists: a caption may also be a list of captions (text-to-image, as diffusers' scripts take them).
        classes: an image folder's class names (data.labels): folders so named are classes, named as splits too.

    Raises:
        DataError: a missing source, a folder with no class sub-folders or no images, a row without an image path
            (file:line named), a path outside the data folder.
    """
    if image_folder(spec):
        return _folder(spec, limit, classes)
    rows = read_rows(spec, limit=limit)
    root = os.path.abspath(spec) if os.path.isdir(spec) else os.path.dirname(os.path.abspath(spec))
    out = []
    for row in rows:
        value = row.get(image_column, required=False)
        if value is None or (isinstance(value, str) and not value.strip()):
            kind = "caption row" if text_column else "row"
            raise DataError(f"{row.source}: {kind} has no image (column {image_column!r} is missing or empty)")
        data, value = image_value(value, row.source, image_column)
        if data is None and "://" in value:  # else joined to the data folder and reported missing ("data/https:/")
            raise DataError(f"{row.source}: image {value!r} is a URL; the vision stages read local image files")
        path = value if data is not None else check_inside(value, root, row.source, allow_outside)
        label = row.get(label_column) if label_column else None
        text = _caption(row.get(text_column), row.source, text_column, caption_lists) if text_column else None
        out.append(ImageRow(path, label, row.source, text, data))
    return out


def image_folder(spec: str) -> bool:
    """Whether ``spec`` is an image folder (class sub-folders): a folder, but not a ``save_to_disk`` folder, which is
    read by its rows (``read_rows``). Raises DataError for a ``save_to_disk`` folder missing a shard."""
    return os.path.isdir(spec) and saved_shards(spec) is None


def class_label_names(spec: str, column: str | None) -> list[str] | None:
    """The class names datasets saved with a Parquet or Arrow file's label column: its ``ClassLabel`` feature in the
    schema's ``huggingface`` metadata, which ``Dataset.to_parquet`` and ``save_to_disk`` write and
    ``load_dataset("parquet")`` / ``load_dataset("arrow")`` read back (the features transformers'
    image-classification script takes label2id / id2label from). None for another source or column, or a file
    without them (``read_rows`` names an unreadable file). A row range (``d.parquet[:4]``) is read from its file. Each
    row's value is an id of these names (``ClassLabel.int2str``), -1 datasets' no label. A ``save_to_disk`` folder's
    are its first shard's (save_to_disk writes the features in each shard's schema and its dataset_info.json)."""
    spec = data_path(spec)
    try:
        shards = saved_shards(spec) if os.path.isdir(spec) else None
    except DataError:  # (read_rows names it)
        return None
    spec = shards[0] if shards else spec
    if not column or not spec.lower().endswith((".parquet", ".arrow")) or not os.path.isfile(spec):
        return None
    try:
        import json

        import pyarrow as pa
        import pyarrow.parquet as pq

        if spec.lower().endswith(".parquet"):
            schema = pq.read_schema(spec)
        else:
            with pa.memory_map(spec) as source:
                schema = arrow_reader(source).schema
        meta = (schema.metadata or {}).get(b"huggingface")
        feature = json.loads(meta)["info"]["features"].get(column) if meta else None
    except (ImportError, OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" else None
    return [str(n) for n in names] if isinstance(names, list) and names else None


def _caption(text: Any, source: str, column: str, lists: bool) -> str | list[str]:
    """A row's caption, or (``lists``) its list of captions, each a non-empty string.

    Raises:
        DataError: an empty caption or list, an element of a list that is no non-empty string (its index named), a
            CSV / TSV cell holding a list as text (pandas' ``"['a', 'b']"``), which would train as one caption with its
            brackets and quotes (the cell is text, as the datasets library reads it: .jsonl holds a list).
    """
    accepted = " (a caption, or a list of non-empty captions)" if lists else ""
    if lists and isinstance(text, list):
        if not text:
            raise DataError(f"{source}: column {column!r} must be a non-empty caption{accepted}, got []")
        for i, t in enumerate(text):
            if not isinstance(t, str) or not t.strip():
                raise DataError(f"{source}: column {column!r}[{i}] must be a non-empty caption, got {t!r}{accepted}")
        return text
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{source}: column {column!r} must be a non-empty caption{accepted}, got {text!r}")
    if lists and source.rsplit(":", 1)[0].lower().endswith((".csv", ".tsv")) and _list_text(text):
        raise DataError(
            f"{source}: column {column!r} holds a list as text ({text[:60]!r}: a CSV cell holds text, as the datasets "
            "library reads it, and would train as one caption with its brackets); give the rows as .jsonl"
        )
    return text


def _list_text(text: str) -> bool:
    """Whether ``text`` parses as a JSON or Python list of strings (``json.dumps`` / pandas' ``str`` of a list of
    captions). Only a cell whose '[' a quote follows (or '[]') is parsed: '[tag] a photo of a [table]' is a caption,
    and a list of numbers ('[1, 2]') is text no list of captions was written as."""
    import ast
    import json

    text = text.strip()
    if not (text.endswith("]") and (re.match(r"\[\s*['\"]", text) or re.fullmatch(r"\[\s*\]", text))):
        return False
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        return isinstance(value, list)  # (a quote after its '[': a list of captions, one of them bad, too)
    return False


def image_value(value: Any, source: str, column: str) -> tuple[bytes | None, str]:
    """An image column's value as (encoded bytes or None, path): a path, or datasets' ``Image`` feature as exported,
    ``{"bytes": ..., "path": ...}``: its bytes when present (base64 text where JSON holds them), else its path, as
    datasets' ``Image.decode_example`` reads it (the path then names the image in messages).

    Raises:
        DataError: neither a path nor such a dict (``source`` and ``column`` named).
    """
    if isinstance(value, dict) and set(value) <= {"bytes", "path"} and (value.get("bytes") or value.get("path")):
        data, path = value.get("bytes"), value.get("path")
        if isinstance(data, str):
            import base64
            import binascii

            try:
                data = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise DataError(f"{source}: column {column!r}: its 'bytes' text is not base64") from None
        if data is not None and not isinstance(data, (bytes, bytearray)):
            raise DataError(f"{source}: column {column!r}: 'bytes' must be the image file's bytes, got "
                            f"{type(data).__name__}")  # fmt: skip
        if data:
            return bytes(data), path if isinstance(path, str) and path else "<image bytes>"
        value = path
    if not isinstance(value, str) or not value.strip():
        raise DataError(
            f"{source}: column {column!r} must be an image path or datasets' {{'bytes', 'path'}} image, got "
            f"{type(value).__name__}"
        )
    return None, value


def _folder(root: str, limit: int | None, named: list | None = None) -> list[ImageRow]:
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise DataError(f"image folder {root!r} has no class sub-folders (expected {root}/<class>/<image>)")
    _refuse_splits(root, [c for c in classes if c not in {str(x) for x in named or ()}])
    per_class = []
    for name in classes:
        folder = os.path.join(root, name)
        # hidden files are skipped as class folders are (macOS's "._x.png" beside each image is no image)
        per_class.append([ImageRow(path, name, path) for path in _images_under(folder)])
    if not any(per_class):
        raise DataError(f"image folder {root!r} holds no images ({SHOWN_EXTENSIONS})")
    empty = [name for name, rows in zip(classes, per_class) if not rows]
    if empty:  # as torchvision's ImageFolder: a class without images would silently leave the head
        raise DataError(
            f"image folder {root!r}: class folder(s) {', '.join(map(repr, empty))} hold no images "
            f"({SHOWN_EXTENSIONS}); add images or remove the folder"
        )
    if limit:
        # round robin over the classes, so that a limit keeps every class (a sorted listing would cut the last ones)
        mixed = [r for group in itertools.zip_longest(*per_class) for r in group if r is not None]
        return mixed[:limit]
    return [r for rows in per_class for r in rows]


SPLIT_KEYWORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
"""datasets' split keywords (``data_files.SPLIT_KEYWORDS``), matched in a folder's name as its
``KEYWORDS_IN_DIR_NAME_BASE_PATTERNS`` match them: case-sensitive, the whole name or a part of it between
``-._ 0-9`` characters ('train', 'training_set', 'test-1', 'my_test'; not 'Train', 'pretrain' or 'testx'). Only the
names of an image folder's top folders are so read: datasets also splits on split folders deeper down
(``cat/train/x.png``, its ``**/train/**``) and split-named files (``cat/train_0.png``); deltatune reads those as
torchvision's ``ImageFolder`` does, the top folders as the classes."""
_SPLIT_NAME = {
    split: re.compile("|".join(rf"(?:.*[-._ 0-9])?{word}(?:[-._ 0-9].*)?" for word in words), re.S)
    for split, words in SPLIT_KEYWORDS.items()
}


def split_of(name: str) -> str | None:
    """The split datasets' ``imagefolder`` reads a folder ``name`` as ('train', 'validation', 'test'), else None."""
    return next((split for split, pattern in _SPLIT_NAME.items() if pattern.fullmatch(name)), None)


def _refuse_splits(root: str, classes: list[str]) -> None:
    """Refuse an image folder of split folders (``root/train/cat/x.png``, ``root/training_set/cat/x.png``; its top
    folders' names only, ``SPLIT_KEYWORDS``): datasets' ``imagefolder`` reads their names as splits (``split_of``)
    and the folders inside as the classes; read as classes, the splits ('test', 'train') trained, the test images
    with them. A folder so named that holds images itself stays a class, as torchvision's ``ImageFolder`` reads it
    (datasets would read a split of its own).

    Raises:
        DataError: class folders named as splits that hold no images themselves but class folders with images.
    """
    splits = {}
    for name in classes:
        folder = os.path.join(root, name)
        if split_of(name) is None or _images_in(folder):
            continue
        inner = [d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith(".")]
        if any(_images_under(os.path.join(folder, d)) for d in inner):
            splits[name] = split_of(name)
    if splits:
        named = {s: [n for n, x in splits.items() if x == s] for s in SPLIT_KEYWORDS}
        other = named["validation"] or named["test"]
        hint = "data.train / data.eval"
        if len(named["train"]) == 1:  # (a hint only where one train-named split says which)
            hint = f"data.train: {os.path.join(root, named['train'][0])!r}"
            hint += f", data.eval: {os.path.join(root, other[0])!r}" if len(other) == 1 else ""
        raise DataError(f"image folder {root!r} holds split folders ({', '.join(map(repr, splits))}), each with its "
                        f"class folders as datasets' imagefolder reads {root}/<split>/<class>/<image>, not classes: "
                        f"give one split per key ({hint}; or data.labels naming them, if they are classes)")  # fmt: skip


def _images_in(folder: str) -> bool:
    """Whether ``folder`` itself (not its sub-folders) holds an image file; hidden files skipped."""
    return any(
        f.lower().endswith(IMAGE_EXTENSIONS) and f[0] != "." and os.path.isfile(os.path.join(folder, f))
        for f in os.listdir(folder)
    )


def _images_under(folder: str) -> list[str]:
    """The image files anywhere under ``folder`` (``cat/batch1/x.png`` too), in torchvision ``ImageFolder``'s order
    (sorted walk, sorted names); hidden files and folders are skipped (macOS's "._x.png" beside each image)."""
    out = []
    for root, _, files in sorted(os.walk(folder, followlinks=True)):
        if any(part.startswith(".") for part in os.path.relpath(root, folder).split(os.sep) if part != "."):
            continue
        out += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS) and f[0] != "."]
    return out


def _to_8bit(img):
    """A 32-bit integer (mode I) or float (mode F) grey image in 8 bits (mode L): mode I values within 0..255 as they
    are (8-bit values stored wide), within 0..65535 (16-bit PGM, TIFF) scaled as 16-bit (/ 257); mode F values within
    0..1 by 255; else the image's own range to 0..255. PIL's conversion clips them (every value above 255 white, a
    0..1 float image black)."""
    import numpy as np
    from PIL import Image

    a = np.nan_to_num(np.asarray(img, dtype=np.float64))
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255
    elif img.mode == "F" or lo < 0 or hi > 65535:
        a = (a - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(a)
    elif hi > 255:
        a = a / 257
    return Image.fromarray(a.round().clip(0, 255).astype(np.uint8), mode="L")


def to_rgb(img, on_white: bool = True):
    """``img`` in RGB. Transparency goes on white, as transformers' image processors convert (``convert_to_rgb``),
    unless ``on_white`` is False (PIL's ``convert("RGB")``, as diffusers' training scripts read images); 16-bit grey
    (mode I;16) is scaled to 8 bits, where PIL's conversion would clip all but the darkest values to white, and 32-bit
    integer or float grey (modes I, F) as ``_to_8bit`` says."""
    import numpy as np
    from PIL import Image

    if img.mode == "RGB":
        return img.copy()
    if img.mode.startswith("I;16"):
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round().astype(np.uint8), mode="L")
    elif img.mode in ("I", "F"):
        img = _to_8bit(img)
    if on_white and (img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def open_rgb(row: ImageRow, on_white: bool = True):
    """The image of ``row`` as an RGB PIL image (``to_rgb``), turned as its EXIF orientation says (as transformers'
    ``load_image`` and datasets' ``Image`` feature turn it: a phone's portrait photo stored sideways), and the mode
    it was stored in.

    Raises:
        DataError: the file is missing, corrupt or not an image (the row's source and the path named).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(row.data) if row.data is not None else row.path) as img:
            img.load()
            mode = img.mode
            rgb = to_rgb(ImageOps.exif_transpose(img), on_white)
    except FileNotFoundError:
        raise DataError(f"{row.source}: image {row.path!r} does not exist") from None
    except UnidentifiedImageError:
        raise DataError(f"{row.source}: cannot read image {row.path!r} (not an image format PIL can read)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # damaged, truncated, too large
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{row.source}: cannot read image {row.path!r} ({reason})") from None
    return rgb, mode


def check(rows: list[ImageRow]) -> dict[str, int]:
    """Open every image once (before training). Returns how many images were in each non-RGB mode.

    Raises:
        DataError: the first unreadable image, named with its row and path.
    """
    converted: dict[str, int] = {}
    for row in rows:
        _, mode = open_rgb(row)
        if mode != "RGB":
            converted[mode] = converted.get(mode, 0) + 1
    return converted


def random_resized_crop(img, scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)):
    """A crop of random area (a fraction in ``scale`` of the image) and aspect ratio (log-uniform in ``ratio``),
    as torchvision's RandomResizedCrop draws it (10 tries, then the centre crop of the whole image with its aspect
    ratio clamped into ``ratio``); the processor resizes it after.
    """
    w, h = img.size
    area = w * h
    log_ratio = torch.log(torch.tensor(ratio))  # float32, as torchvision (the same draws give the same crop)
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            y = int(torch.randint(0, h - ch + 1, (1,)))  # the row first, as torchvision draws them
            x = int(torch.randint(0, w - cw + 1, (1,)))
            return img.crop((x, y, x + cw, y + ch))
    # torchvision's fallback: the centre crop of the whole image, its aspect ratio clamped into ``ratio``
    cw, ch = w, h
    if w / h < min(ratio):
        ch = round(w / min(ratio))
    elif w / h > max(ratio):
        cw = round(h * max(ratio))
    x, y = (w - cw) // 2, (h - ch) // 2
    return img.crop((x, y, x + cw, y + ch))


def augment(img, names: list[str]):
    """Apply the named train-time augmentations (``AUGMENTATIONS``) in a fixed order: crop, then flip."""
    from PIL import ImageOps

    if "random_resized_crop" in names:
        img = random_resized_crop(img)
    if "hflip" in names and float(torch.rand(1)) < 0.5:
        img = ImageOps.mirror(img)
    return img


# torchvision's InterpolationMode names -> PIL's filters (its pil_modes_mapping), for diffusers' --image_interpolation_mode
INTERPOLATIONS = {"nearest": 0, "nearest_exact": 0, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5, "lanczos": 1}
T2I_AUGMENTATIONS = ("random_crop", "hflip")
"""Stage t2i's ``data.augment``: diffusers' scripts' RandomCrop (without ``--center_crop``) and ``--random_flip``."""


def t2i_resize(img, size: int, interpolation: str = "lanczos"):
    """torchvision's ``Resize(size, interpolation)`` on a PIL image, as diffusers' text-to-image scripts resize: the
    short side to ``size``, the long side to int(size * long / short) (truncated); an image already that size is
    returned as it is."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new = (size, int(size * long / short))
    new_w, new_h = new if w <= h else new[::-1]
    return img if (new_w, new_h) == (w, h) else img.resize((new_w, new_h), INTERPOLATIONS[interpolation])


def t2i_crop(img, size: int, augment: tuple[str, ...] | list[str] = ()):
    """A ``size`` square of a resized image (``t2i_resize``): torchvision's CenterCrop (top and left rounded,
    half to even), or with ``random_crop`` its RandomCrop (the row, then the column, from torch's generator; no draw
    when the image is the square already); then with ``hflip`` mirrored when torch.rand(1) < 0.5, as
    ``train_text_to_image_lora.py``'s Compose draws them."""
    from PIL import ImageOps

    w, h = img.size
    if "random_crop" not in augment:
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    elif (w, h) == (size, size):
        top = left = 0
    else:
        top = int(torch.randint(0, h - size + 1, size=(1,)).item())
        left = int(torch.randint(0, w - size + 1, size=(1,)).item())
    img = img if (w, h) == (size, size) else img.crop((left, top, left + size, top + size))
    return ImageOps.mirror(img) if "hflip" in augment and float(torch.rand(1)) < 0.5 else img


def pixel_values(processor, images: list) -> torch.Tensor:
    """The processor's ``pixel_values`` for a list of RGB PIL images: (batch, channels, height, width)."""
    out = processor(images=images, return_tensors="pt")
    return out["pixel_values"]


def _one_channel_mean(processor) -> bool:
    """Whether ``processor`` normalises one channel: its ``image_mean`` a list of one value (a scalar serves any
    count)."""
    mean = getattr(processor, "image_mean", None)
    return isinstance(mean, (list, tuple)) and len(mean) == 1


class ImageDataset(torch.utils.data.Dataset):
    """Lazily decoded examples: ``{"pixel_values": (C, H, W), "labels": int}`` (labels omitted when None). With
    ``channels=1`` (a model whose config says ``num_channels: 1``) C is 1: the image's grey (PIL's ``convert("L")``)
    normalised with the processor's first channel's mean and std; a processor saved for grey images (one mean and
    std: ``image_mean: [0.5]``) is given the grey image itself, which it normalises as one channel (given RGB it
    refused: "mean must have 3 elements")."""

    def __init__(
        self,
        rows: list[ImageRow],
        labels: list[int | None],
        processor,
        augmentations: list[str] | None = None,
        channels: int = 3,
    ) -> None:
        self.rows, self.labels, self.processor, self.channels = rows, labels, processor, channels
        self.augmentations = list(augmentations or [])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        img, _ = open_rgb(self.rows[i])
        if self.augmentations:
            img = augment(img, self.augmentations)
        if self.channels == 1:  # grey as the processor reads it: one channel where its mean has one value
            img = img.convert("L") if _one_channel_mean(self.processor) else img.convert("L").convert("RGB")
        item: dict[str, Any] = {"pixel_values": pixel_values(self.processor, [img])[0][: self.channels]}
        if self.labels[i] is not None:
            item["labels"] = self.labels[i]
        return item


def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack pixel values (all of the processor's one size) and labels.

    Raises:
        DataError: images of different sizes in one batch (a processor that does not resize them to one size).
    """
    shapes = sorted({tuple(b["pixel_values"].shape) for b in batch})
    if len(shapes) > 1:  # (torch.stack's "stack expects each tensor to be equal size" from inside the Trainer)
        sizes = " and ".join("x".join(map(str, s)) for s in shapes[:2])
        raise DataError(f"the image processor gives images of different sizes in one batch ({sizes}): set its size "
                        "(with do_resize, or do_center_crop and crop_size) so that every image comes out one size")  # fmt: skip
    out = {"pixel_values": torch.stack([b["pixel_values"] for b in batch])}
    if "labels" in batch[0]:
        out["labels"] = torch.tensor([b["labels"] for b in batch], dtype=torch.long)
    return out


__all__ = [
    "AUGMENTATIONS",
    "INTERPOLATIONS",
    "T2I_AUGMENTATIONS",
    "ImageDataset",
    "ImageRow",
    "augment",
    "check",
    "class_label_names",
    "image_folder",
    "image_value",
    "collate",
    "open_rgb",
    "pixel_values",
    "read_image_rows",
    "t2i_crop",
    "t2i_resize",
]

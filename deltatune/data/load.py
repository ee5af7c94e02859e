"""Read rows from JSONL, JSON, CSV/TSV, Parquet, Arrow, plain text, or a datasets-hub name.

Every row keeps where it came from (file and line), so a bad row is reported as
``train.jsonl:17: column 'label' is missing`` instead of a KeyError deep in a collator.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any


class DataError(ValueError):
    """A data file or row cannot be used; the message names the file, line and column."""


@dataclass
class Row:
    """One example: its fields and where it came from."""

    data: dict[str, Any]
    source: str
    """``file:line`` for error messages."""

    def get(self, column: str, required: bool = True) -> Any:
        """The value of ``column``; DataError naming the file, line and column when it is missing. An optional
        column's NaN (pandas' missing value) reads as missing; a required one's is the caller's to refuse."""
        value = self.data.get(column)
        if value is None or not required and isinstance(value, float) and math.isnan(value):  # pandas' missing value
            if not required:
                return None
            if column in self.data:  # written, as null (the datasets library writes a column a row lacks so)
                raise DataError(f"{self.source}: column {column!r} is null")
            have = ", ".join(sorted(self.data)) or "none"
            # a header's ' label' (written 'text, label') or 'Label' read as no column, its space unseen in the list
            near = next((str(k) for k in self.data if str(k).strip().lower() == column.strip().lower()), None)
            hint = ""
            if near is not None:
                cased = near.lower() == column.lower()  # (the recipe's column may be the one with the space)
                how = "spaces" if near.strip() == column.strip() else "case" if cased else "spaces and case"
                hint = f"; {near!r} differs from it only in {how}"
            raise DataError(f"{self.source}: column {column!r} is missing (columns in this row: {have}){hint}")
        return self.data[column]

    def text(self, column: str, required: bool = True) -> str | None:
        """The text of ``column`` (a number as written); DataError naming the row when it is a list, an object or
        a bool (a multi-reference list given as the target would otherwise train on its Python repr)."""
        value = self.get(column, required)
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, float) and math.isnan(value):
            raise DataError(f"{self.source}: column {column!r} is NaN (a missing value)")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise DataError(f"{self.source}: column {column!r} must be text, got {type(value).__name__}")


EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow", ".txt")
_RANGE = re.compile(r"(?P<path>.+?)\[(?P<range>[^\[\]]*)\]")


def data_path(spec: str) -> str:
    """The file or folder a data spec names: its row range (``train.jsonl[1000:2000]``, ``folder[:640]``) dropped."""
    ranged = _RANGE.fullmatch(spec)
    path = ranged and ranged["path"]
    if path and not os.path.exists(spec) and (path.lower().endswith(EXTENSIONS) or os.path.isdir(path)):
        return ranged["path"]
    return spec


def read_rows(spec: str, text_column: str = "text", limit: int | None = None) -> list[Row]:
    """Read every row of a data file (or hub dataset ``name[:split]``).

    Args:
        spec: a path ending in .jsonl, .json, .csv, .tsv, .parquet, .arrow or .txt, a folder of such files (all of one
            kind, .json and .jsonl counting as one, read in name order; its .arrow files only where it holds no
            other; a ``save_to_disk`` folder's shards in its state.json's order), or a datasets-hub name. A file or
            folder path may end in a row range, as the datasets hub's split slicing has it:
            ``train.jsonl[1000:2000]`` is rows 1000 to 1999 counted from 0 (blank lines not counted; a folder's rows
            counted across its files in the order read), a Python slice (either end may be left out or be
            negative). Each row still names its own line of its file.
        text_column: the column name given to lines of a .txt file.
        limit: read at most this many rows (of the range, when one is given).

    Raises:
        DataError: the file is missing, a row is malformed (file and line named), a row range is malformed or
            selects no row, or there are no rows.
    """
    if data_path(spec) != spec:
        ranged = _RANGE.fullmatch(spec)
        return _row_range(spec, ranged["path"], ranged["range"], text_column, limit)  # type: ignore[index]
    if os.path.isdir(spec):
        return _folder(spec, text_column, limit)
    ext = os.path.splitext(spec)[1].lower()
    if any(c in spec for c in "*?") and not os.path.exists(spec):  # (no hub name holds one: not sent there)
        raise DataError(
            f"data path {spec!r} does not exist: deltatune reads no file pattern (*, ?) such as datasets' "
            "data_files takes; name the folder (its data files are read in name order, a save_to_disk folder's shards "
            "in its state.json's order) or one file"
        )
    if ext in EXTENSIONS:
        if not os.path.isfile(spec):
            raise DataError(f"data file {spec!r} does not exist")
        reader = {
            ".jsonl": _jsonl,
            ".json": _json,
            ".csv": _csv,
            ".tsv": _csv,
            ".parquet": _parquet,
            ".arrow": _arrow,
            ".txt": _text,
        }[ext]
        try:
            rows = reader(spec, text_column, limit)
        except UnicodeDecodeError as exc:
            raise DataError(_not_utf8(spec, exc)) from None
    elif os.path.isfile(spec):  # a file of another kind: not a hub name either
        raise DataError(
            f"{spec}: deltatune reads data files ending in {', '.join(EXTENSIONS)}; "
            f"{'this one has no extension' if not ext else f'not {ext}'} (rename it if it is one of those)"
        )
    elif _looks_local(spec):  # no hub name: the datasets library's FileNotFoundError after 10 s of importing it
        raise DataError(f"data path {spec!r} does not exist (no such file or folder)")
    else:
        rows = _hub(spec, limit)
    if not rows:
        raise DataError(f"{spec} holds no rows")
    return rows


def _looks_local(spec: str) -> bool:
    """Whether ``spec`` can only be a path, no datasets-hub ``owner/name[:split]``: absolute, ``./``, ``~``, more than
    one ``/`` or a backslash (the rule ``check_model_path`` reads a model name by)."""
    name = spec.partition(":")[0] if not os.path.isabs(spec) else spec
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name


def folder_files(folder: str) -> list[str]:
    """The data files a data folder is read from, in the order read: a datasets ``save_to_disk`` folder's shards in
    its state.json's order, as ``load_from_disk`` reads them; else its data files in name order, not its sub-folders,
    not hidden files, its .arrow files only where it holds no other (datasets' cache-*.arrow beside .jsonl files are
    left out, as they were before .arrow files were read, ea13f75: such a folder reads, and its run's fingerprint
    hashes, what they did)."""
    return _listing(folder)[0]


def _listing(folder: str) -> tuple[list[str], list[str]]:
    """``folder_files`` and the .arrow files it left out beside the folder's other data files."""
    saved = saved_shards(folder)
    if saved is not None:
        return saved, []
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(EXTENSIONS) and not f.startswith("."))
    files = [os.path.join(folder, f) for f in names if os.path.isfile(os.path.join(folder, f))]
    others = [f for f in files if not f.lower().endswith(".arrow")]
    return (others, [f for f in files if f not in others]) if others else (files, [])


def saved_shards(folder: str) -> list[str] | None:
    """The ``data-*.arrow`` shards ``Dataset.save_to_disk`` wrote to ``folder``, in the order its state.json's
    ``_data_files`` lists them; None for a folder without such a state.json (its state.json was read as a data
    file). Raises DataError where a listed shard or the dataset_info.json is missing (``load_from_disk`` refuses
    both)."""
    try:
        with open(os.path.join(folder, "state.json"), encoding="utf-8") as fh:
            shards = json.load(fh)["_data_files"]
        names = [s["filename"] for s in shards]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not names or not all(isinstance(n, str) and n.lower().endswith(".arrow") for n in names):
        return None
    if not os.path.isfile(os.path.join(folder, "dataset_info.json")):
        raise DataError(
            f"{folder}: its state.json lists save_to_disk shards but it has no dataset_info.json "
            "(datasets.load_from_disk refuses it too); save it again with Dataset.save_to_disk"
        )
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise DataError(
            f"{folder}: its state.json lists {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            "missing (a save_to_disk folder copied in part?)"
        )
    return [os.path.join(folder, n) for n in names]


def _folder(folder: str, text_column: str, limit: int | None) -> list[Row]:
    """The rows of every data file in ``folder`` (not its sub-folders), in the order read, each row naming its own file
    and line: LLaMA-Factory's dataset_info.json ``file_name`` may name such a folder, its files all of one kind
    (.json and .jsonl together); a ``save_to_disk`` folder as ``load_from_disk`` reads it (``folder_files``)."""
    listed, left_out = _listing(folder)
    files = [os.path.basename(f) for f in listed]
    if files == ["dataset_dict.json"]:  # (read as one row of its split names)
        try:
            with open(listed[0], encoding="utf-8") as fh:
                splits = [str(s) for s in json.load(fh)["splits"]]
        except (OSError, ValueError, KeyError, TypeError):
            splits = []
        named = f" (its splits: {', '.join(splits)})" if splits else ""
        split = splits[0] if splits else "train"
        raise DataError(
            f"{folder}: a DatasetDict saved with save_to_disk{named}; name one split's folder "
            f"({os.path.join(folder, split)}), as datasets.load_from_disk(...)[{split!r}] reads it"
        )
    if left_out:
        import warnings

        warnings.warn(
            f"{folder}: left out {len(left_out)} .arrow file{'s' if len(left_out) > 1 else ''} "
            f"({', '.join(os.path.basename(f) for f in left_out)}) beside {', '.join(files)}: a folder's .arrow "
            "files are read only where it holds no other data file; name one file, or move them apart",
            stacklevel=3,
        )
    if not files:
        raise DataError(f"{folder} is a folder holding no data file ({', '.join(EXTENSIONS)}); give a data file")
    kinds = sorted({os.path.splitext(f)[1].lower() for f in files})
    if len({k.replace(".jsonl", ".json") for k in kinds}) > 1:  # (.json, .jsonl: one kind, json to LLaMA-Factory)
        raise DataError(f"{folder}: a data folder holds files of one kind, this one {', '.join(kinds)}")
    rows: list[Row] = []
    for f in files:
        if limit is not None and len(rows) >= limit:
            break
        rows += read_rows(os.path.join(folder, f), text_column, None if limit is None else limit - len(rows))
    return rows


def _row_range(spec: str, path: str, text: str, text_column: str, limit: int | None) -> list[Row]:
    """``read_rows`` for ``path[start:stop]``: the file's rows sliced as Python slices them."""
    parts = text.split(":")
    if len(parts) != 2 or not all(not p.strip() or re.fullmatch(r"-?\d+%?", p.strip()) for p in parts):
        raise DataError(
            f"{spec}: a row range is written [start:stop] in whole numbers (or percents, [:10%]), rows counted from "
            f"0 as in Python (e.g. {os.path.basename(path)}[1000:2000]); got [{text}]"
        )
    if path.lower().endswith(".txt"):
        raise DataError(f"{spec}: a .txt file is one document, it has no rows to take a range of")
    if "%" in text:  # the datasets library's percent slice ('train[:10%]')
        return _percent_range(spec, path, text, parts, text_column, limit)
    start, stop = (int(p) if p.strip() else None for p in parts)
    if start is not None and stop is not None and 0 <= stop <= start:
        raise DataError(f"{spec}: the range [{text}] selects no rows (it ends where it starts or before)")
    # reading can stop at the range's end unless an end counts from the file's end
    upto = stop if stop is not None and stop > 0 and (start is None or start >= 0) else None
    everything = read_rows(path, text_column, upto)
    rows = everything[start:stop]
    if not rows:
        raise DataError(f"{spec}: the range [{text}] selects no rows (the file has {len(everything)})")
    return rows[:limit] if limit else rows


def _percent_range(
    spec: str, path: str, text: str, parts: list[str], text_column: str, limit: int | None
) -> list[Row]:
    """``path[a%:b%]`` as datasets 5.2 slices a split (``arrow_reader._rel_to_abs_instr``): a ``%`` on either end
    makes both percents, each rounded to the closest row (``round(pct * n / 100)``), a negative one counted from the
    end, both clipped to the rows there are."""
    pcts = [int(p.strip().rstrip("%")) if p.strip().rstrip("%") else None for p in parts]
    if any(p is not None and abs(p) > 100 for p in pcts):
        raise DataError(f"{spec}: a percent row range's ends lie between -100% and 100%; got [{text}]")
    everything = read_rows(path, text_column, None)
    n = len(everything)
    start, stop = (round(p * n / 100.0) if p is not None else d for p, d in zip(pcts, (0, n)))
    start, stop = (min(max(n + x, 0) if x < 0 else x, n) for x in (start, stop))
    rows = everything[start:stop]
    if not rows:
        raise DataError(f"{spec}: the range [{text}] selects no rows (rows {start} to {stop} of {n})")
    return rows[:limit] if limit else rows


_UTF16_32 = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")  # the byte-order marks (UTF-32-LE's starts as UTF-16-LE's)


def _not_utf8(path: str, exc: UnicodeDecodeError) -> str:
    """``file:line: not UTF-8 ...`` for the first line of ``path`` that does not decode."""
    with open(path, "rb") as fh:
        head = fh.read(4)
        if head.startswith(_UTF16_32):  # (Notepad's "Unicode" is UTF-16)
            kind = "UTF-32" if head in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff") else "UTF-16"
            return f"{path}: {kind} text (it starts with that byte-order mark), not UTF-8; save the file as UTF-8"
        fh.seek(0)
        for i, line in enumerate(fh, 1):
            if b"\x00" in line:  # UTF-16 without a byte-order mark, its text not all ASCII
                return _nul(path, i, line)
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                return (
                    f"{path}:{i}: not UTF-8 text (byte 0x{line[bad.start]:02x} at column {bad.start + 1}); "
                    "save the file as UTF-8"
                )
    return f"{path}: not UTF-8 text ({exc.reason}); save the file as UTF-8"


def _nul(path: str, line: int, text: str | bytes | None = None) -> str:
    """The line naming a NUL byte at ``path:line`` (``text``: that line): UTF-16 where NULs are a third of it or more
    (ASCII saved as UTF-16 is half NULs), else (or with no text) a stray NUL in UTF-8 text."""
    if text is not None and text.count("\x00" if isinstance(text, str) else b"\x00") * 3 >= len(text):
        return f"{path}:{line}: NUL bytes: UTF-16 without a byte-order mark? save the file as UTF-8"
    return f"{path}:{line}: a NUL byte in the text (a damaged or binary file?); remove it"


def _check_nul(path: str, text: str, first: int = 1) -> None:
    """Text holding NUL bytes refused at the line of the first: UTF-16 saved without a byte-order mark decodes as
    UTF-8 (ASCII and NULs), so a .jsonl read "not valid JSON (Expecting value ...)", a .csv had columns named with
    NULs between their letters, a .txt trained on them."""
    if "\x00" in text:
        at, end = text.index("\x00"), text.find("\n", text.index("\x00"))
        line = text[text.rfind("\n", 0, at) + 1 : end if end >= 0 else None]
        raise DataError(_nul(path, first + text.count("\n", 0, at), line))


def _json_fault(exc: json.JSONDecodeError) -> tuple[int, str]:
    """(line, what and at which column) of a JSON error; a trailing comma (``[{...},\n]``, ``{"a": 1,}``) named at
    the comma: Python before 3.13 says "Expecting value" at the bracket after it, a line further down in a spread-out
    file (3.13 names the comma, as here). As 3.13, only where the closer after the comma closes what it is in: a
    ``]`` in a list ("Expecting value"), a ``}`` in an object ("Expecting property name"); ``[1,}`` is no trailing
    comma but a wrong closer."""
    doc, pos = exc.doc, exc.pos
    before = doc[:pos].rstrip()
    expected = {"]": "Expecting value", "}": "Expecting property name"}.get(doc[pos : pos + 1])
    trailing = exc.msg.startswith("Illegal trailing comma") or (
        before.endswith(",") and expected is not None and exc.msg.startswith(expected)
    )
    if not trailing:
        return exc.lineno, f"{exc.msg.removesuffix(' at')} at column {exc.colno}"
    comma = pos if doc[pos : pos + 1] == "," else len(before) - 1
    line, column = doc.count("\n", 0, comma) + 1, comma - doc.rfind("\n", 0, comma)
    return line, f"a trailing comma at column {column}: JSON allows none after the last item"


def _jsonl(path: str, _column: str, limit: int | None) -> list[Row]:
    rows = []
    with open(path, encoding="utf-8-sig") as fh:  # -sig: files saved with a byte-order mark read the same
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            _check_nul(path, line, i)
            try:
                data = _DECODER.decode(line)
            except json.JSONDecodeError as exc:
                bom = json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", line, 0)  # (as json.loads
                fault = bom if line.startswith("\ufeff") else exc  # says: a second file's, in files joined)
                raise DataError(f"{path}:{i}: not valid JSON ({_json_fault(fault)[1]})") from None
            except _Twice as twice:
                raise DataError(f"{path}:{i}: {twice}") from None
            except RecursionError:  # (json's decoder recurses once a level: a line nested thousands deep)
                raise DataError(f"{path}:{i}: nested too deep to read") from None
            if not isinstance(data, dict):
                raise DataError(f"{path}:{i}: expected a JSON object, got {type(data).__name__}")
            rows.append(Row(data, f"{path}:{i}"))
            if limit and len(rows) >= limit:
                break
    return rows


class _Twice(ValueError):
    """A JSON object naming one key twice (``_object``)."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, refusing a key written twice: json keeps the last value and drops the first
    silently, where the datasets library (pyarrow) refuses the file ('Column(/text) was specified twice')."""
    data = dict(pairs)
    if len(data) != len(pairs):
        twice = next(k for n, (k, _) in enumerate(pairs) if any(k == j for j, _ in pairs[:n]))
        raise _Twice(
            f"key {twice!r} written twice in one object (JSON would keep only the last); give each its own name"
        )
    return data


_DECODER = json.JSONDecoder(object_pairs_hook=_object)  # (one for all lines: json.loads with a hook made one a line)


def _keyed(memo: dict[str, str]) -> Any:
    """``_object`` with key strings shared across a list's items through ``memo``: the C scanner shares them only
    within one ``scan_once`` call (a call an item), so each row held its own copies (248 -> 211 MB peak reading 200k
    alpaca rows)."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        data = {memo.setdefault(k, k): v for k, v in pairs}
        return data if len(data) == len(pairs) else _object(pairs)  # (_object names the key written twice)

    return hook


_SPACE, _BLANK = re.compile(r"[ \t\n\r]*"), (" ", "\t", "\n", "\r")  # JSON's whitespace


def _json(path: str, _column: str, limit: int | None) -> list[Row]:
    """A JSON list of objects (a row each, named by the line it starts on, decoded one at a time: a limit stops
    the decoding there), one object (one row), or one object per line (read as .jsonl)."""
    with open(path, encoding="utf-8-sig") as fh:
        text = fh.read()
    _check_nul(path, text)

    def skip(at: int) -> int:
        return _SPACE.match(text, at).end() if text[at : at + 1] in _BLANK else at  # type: ignore[union-attr]

    decoder, found, pos = json.JSONDecoder(object_pairs_hook=_keyed({})), [], skip(0)
    scan = decoder.scan_once  # (raw_decode's C scanner, without its Python wrapper: a list of many items)
    try:
        if text[pos : pos + 1] != "[":  # one object (one line or spread out), as the datasets library reads it
            data, end = decoder.raw_decode(text, pos)
            if skip(end) < len(text):
                raise json.JSONDecodeError("Extra data", text, end)
            if not isinstance(data, dict):
                raise DataError(f"{path}: expected a JSON list of objects (or one object), got {type(data).__name__}")
            return [Row(data, f"{path}:{text.count(chr(10), 0, pos) + 1}")]
        pos, closed = skip(pos + 1), None
        if text[pos : pos + 1] == "]":  # []
            closed = pos
        while closed is None and not (limit and len(found) >= limit):
            try:
                item, end = scan(text, pos)
            except StopIteration as stop:
                raise json.JSONDecodeError("Expecting value", text, stop.value) from None
            found.append((pos, item))
            pos = skip(end)
            after = text[pos : pos + 1]
            if after == "]":
                closed = pos
            elif after != ",":
                raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
            else:
                pos = skip(pos + 1)
        if closed is not None and skip(closed + 1) < len(text):
            raise json.JSONDecodeError("Extra data", text, closed + 1)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object per line, as the datasets library also reads a .json file
            return _jsonl(path, _column, limit)
        line, what = _json_fault(exc)
        raise DataError(f"{path}:{line}: not valid JSON ({what})") from None
    except _Twice as twice:  # (in the item that begins at pos: named by its index too, as rows sharing a line are)
        item = f" (item {len(found)})" if text[skip(0)] == "[" else ""
        raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}{item}: {twice}") from None
    except RecursionError:  # (in the item that begins at pos)
        raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: nested too deep to read") from None
    starts = [at for at, _ in found] + ([pos] if closed is None else [])  # (the next item's: a limit stopped it)
    lines, line, last = [], 1, 0
    for at in starts:  # (counted on from the last item: one pass over the text)
        line, last = line + text.count("\n", last, at), at
        lines.append(line)
    shared = {n for n, k in Counter(lines).items() if k > 1}  # lines holding two items (a list written on one)
    rows = []
    for i, ((_, item), line) in enumerate(zip(found, lines)):
        source = f"{path}:{line}" + (f" (item {i})" if line in shared else "")
        if not isinstance(item, dict):
            raise DataError(f"{source}: expected a JSON object, got {type(item).__name__}")
        rows.append(Row(item, source))
    return rows


def _csv(path: str, _column: str, limit: int | None) -> list[Row]:
    """Rows of a CSV or TSV file, read strictly: a quote left open is refused at the line it opens on (not the rest
    of the file read into one field); fields of any length (pandas reads them; the csv module stops at 128 KiB)."""
    with open(path, "rb") as fh:  # the first 64 KiB: a file saved as UTF-16 has NULs from its first line (a NUL
        # further down is refused at its record's line)
        head = fh.read(1 << 16)
    if not head.startswith(_UTF16_32):  # (one with its byte-order mark is named so where it fails to decode)
        _check_nul(path, head.decode("latin-1"))  # (latin-1: a character a byte, lines kept)
    rows: list[Row] = []
    old_limit = csv.field_size_limit(2**31 - 1)
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:  # Excel writes a byte-order mark before the header
            reader = csv.DictReader(fh, delimiter="\t" if path.lower().endswith(".tsv") else ",", strict=True)
            done = 1  # the last physical line read into a record (the header's)
            try:
                while reader.fieldnames == []:  # blank lines before the header (pandas skips them too)
                    reader.fieldnames = next(reader.reader, None)  # type: ignore[assignment]
                header = reader.fieldnames or []
                # DictReader keeps the last of two same-named columns' values and drops the first (unnamed columns,
                # Excel's empty trailing ones, are no column a recipe reads)
                twice = next((name for k, name in enumerate(header) if name and name in header[:k]), None)
                if twice is not None:
                    raise DataError(
                        f"{path}:{reader.line_num}: the header names column {twice!r} twice; give each column its "
                        "own name"
                    )
                for data in reader:
                    # The record's first physical line: its last, less the line breaks inside its quoted fields.
                    i = reader.line_num - sum(v.count("\n") for v in data.values() if isinstance(v, str))
                    done = reader.line_num
                    if None in data:
                        raise DataError(f"{path}:{i}: more fields than the header has")
                    if any("\x00" in v for v in data.values() if isinstance(v, str)):  # (past the head read above)
                        raise DataError(_nul(path, i))  # (a stray one: the clean head rules out UTF-16)
                    if None in data.values():  # DictReader fills the fields a short row lacks with None
                        have = sum(v is not None for v in data.values())
                        raise DataError(
                            f"{path}:{i}: {have} fields, but the header has {len(data)} ({', '.join(data)})"
                        )
                    rows.append(Row(dict(data), f"{path}:{i}"))
                    if limit and len(rows) >= limit:
                        break
            except csv.Error as exc:
                if "unexpected end of data" in str(exc):
                    raise DataError(
                        f"{path}:{done + 1}: a quoted field is not closed before the end of the file"
                    ) from None
                raise DataError(f"{path}:{done + 1}: not valid CSV ({exc})") from None
    finally:
        csv.field_size_limit(old_limit)
    return rows


def _parquet(path: str, _column: str, limit: int | None) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet needs pyarrow: pip install 'deltatune[train]'") from None
    import pyarrow as pa

    try:
        table = pq.read_table(path)
    except pa.ArrowException as exc:  # not Parquet, or cut short
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    return _table_rows(table, path, limit)


def _table_rows(table: Any, path: str, limit: int | None) -> list[Row]:
    """The rows of a pyarrow table read from ``path``, each named ``path[index]``."""
    records = table.slice(0, limit).to_pylist() if limit else table.to_pylist()
    return [Row(r, f"{path}[{i}]") for i, r in enumerate(records)]


def _arrow(path: str, _column: str, limit: int | None) -> list[Row]:
    """An Arrow IPC file as datasets' ``arrow`` builder reads it (LLaMA-Factory's ``.arrow``): the stream format
    (``Dataset.save_to_disk``'s ``data-*.arrow``), else the random-access file format."""
    try:
        import pyarrow as pa
    except ImportError:
        raise DataError("reading Arrow files needs pyarrow: pip install 'deltatune[train]'") from None
    try:
        with pa.memory_map(path) as source:
            table = arrow_reader(source).read_all()
    except (OSError, pa.ArrowException) as exc:  # not Arrow, or cut short
        raise DataError(f"{path}: not a readable Arrow file ({str(exc).splitlines()[0]})") from None
    return _table_rows(table, path, limit)


def arrow_reader(source: Any) -> Any:
    """A pyarrow reader of the Arrow IPC file open in ``source``: the file format where it starts with its magic
    ``ARROW1``, else the stream format (whose own error then names a stream cut short, not "Not an Arrow file")."""
    import pyarrow as pa

    magic = source.read(6)
    source.seek(0)
    return pa.ipc.open_file(source) if magic == b"ARROW1" else pa.ipc.open_stream(source)


def _text(path: str, column: str, limit: int | None) -> list[Row]:
    """A plain text file is one document (continued pre-training packs it into blocks)."""
    with open(path, encoding="utf-8-sig") as fh:
        text = fh.read()
    _check_nul(path, text)
    return [Row({column: text}, f"{path}:1")] if text.strip() else []


def _hub(name: str, limit: int | None) -> list[Row]:
    name, _, split = name.partition(":")
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{name!r} is not a file, and reading hub datasets needs: pip install 'deltatune[train]'"
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:
        raise DataError(
            f"{name!r} is not a local file and could not be loaded from the datasets hub "
            f"(is the hub reachable from here? HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): "
            f"{type(exc).__name__}"
        ) from None
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    return [Row(dict(r), f"{name}[{i}]") for i, r in enumerate(ds)]

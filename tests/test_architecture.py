"""The shape of the house (docs/architecture.md): arrows point one way, no import cycle, every module imports alone,
file sizes stay small, one vocabulary of method names.

The import graph is read from the source with ast (every ``import`` / ``from ... import`` naming a deltatune module,
at module level or inside a function; those under ``if TYPE_CHECKING:`` are left out: they never run).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "deltatune"

LEVELS = {
    "config": 0,
    "torch_modules": 0.5,
    "layer": 1,
    "loss": 1,
    "calls": 1.5,
    "heads_rule": 1.6,
    "saves": 1.9,
    "targets": 2,
    "files": 2,
    "load_options": 2.1,
    "files_save": 2.2,
    "status": 2.5,
    "methods": 3,
    "towers": 3,
    "registry": 4,
    "adapter_io": 4.5,
    "healthcheck": 4.6,
    "model": 5,
    "data": 5,
    "diffusion_files": 5.25,
    "diffusion_initial": 5.25,
    "diffusion": 5.5,
    "info": 7,
    "train": 6,
    "serve": 7,
    "board": 8,
    "cli_parser": 8.5,
    "cli": 9,
    "__main__": 10,
}
"""DESIGN.md's arrows as levels: a unit (a top-level module or sub-package) may import only units of a lower level
(cli -> serve/board -> train -> model -> registry -> methods -> config/layer/targets). ``data`` sits beside
``model``: the trainers use both, and neither uses the other. ``towers`` (which tower of a vision-language model a
config adapts) is per-family knowledge beside the methods. The board shows what serve serves, so it sits above it.
``diffusion`` (LoRA files as diffusion users trade them) reads and writes DeltaModels, below the trainers' t2i stage;
``diffusion_files`` (reading diffusers', kohya's and peft's LoRA file layouts) sits just below it.
``status`` (peft's layer and model status, enabling and trainability over the injected layers) reads layers only.
``cli_parser`` (the commands, their flags and help texts) sits just below ``cli``, which alone imports it.
``__main__`` (``python -m deltatune``) runs ``cli`` and sits above it.
``import deltatune`` (the lazy public API) is neutral."""

KNOWN_UPWARD = {
    ("deltatune.data.inspect", "deltatune.train.models"): "`deltatune data inspect` (issue 17) loads its tokenizer "
    "through train.models; the loader belongs in a leaf below both",
}
"""Upward arrows that exist and are known, with the reason; the test fails on any other."""

KNOTS: tuple[str, ...] = ()
"""Sub-packages whose inner cycles are known and tolerated. None now: train/'s knot went when the stage files moved
to importing train/prepared.py (a leaf) and the stage table to importing them lazily; data/'s when SFT encoding moved
into data/encode.py. Any cycle fails."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The deltatune modules ``name`` imports (a ``from pkg import sub`` counts as importing ``pkg.sub``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            test = node.test
            if getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING":
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            out.update(a.name for a in node.names if a.name.split(".")[0] == "deltatune")

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "deltatune":
                return
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                out.add(sub if sub in known else module)

    Visitor().visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def unit(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def test_the_graph_reader_sees_relative_lazy_and_package_imports():
    g = graph()
    assert "deltatune.config" in g["deltatune.registry"]  # from .config import ... (module level)
    assert "deltatune.registry" in g["deltatune.model"]  # from . import loss, registry (a sub-module by name)
    assert "deltatune.methods.bottleneck" in g["deltatune.methods.fusion"]  # from .bottleneck import ...


def test_arrows_point_down_as_design_md_draws_them():
    bad = []
    for name, targets in graph().items():
        for target in targets:
            a, b = unit(name), unit(target)
            if a is None or b is None or a == b or a == "assets" or (name, target) in KNOWN_UPWARD:
                continue
            if a not in LEVELS or b not in LEVELS:
                bad.append(f"{name} -> {target}: add {a if a not in LEVELS else b!r} to LEVELS (and architecture.md)")
            elif LEVELS[b] >= LEVELS[a]:
                bad.append(f"{name} -> {target} points up ({a} is level {LEVELS[a]}, {b} level {LEVELS[b]})")
    assert not bad, "\n".join(sorted(bad))


def test_no_method_imports_the_registry_and_config_imports_nothing_of_the_package():
    g = graph()
    assert g["deltatune.config"] == set()
    for name, targets in g.items():
        if name.startswith("deltatune.methods."):
            assert targets <= {"deltatune.config", "deltatune.layer", "deltatune.targets"} | {
                t for t in targets if t.startswith("deltatune.methods.")
            }, f"{name} imports {sorted(targets)}"


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_outside_the_known_knots():
    g = graph()
    bad = [c for c in cycles(g) if not all(any(m.startswith(k) for k in KNOTS) for m in c)]
    assert not bad, f"import cycles: {bad}"
    # The spine alone (package root files, methods/) is free of cycles however the knots change.
    spine = {n: {t for t in ts if not t.startswith(KNOTS)} for n, ts in g.items() if not n.startswith(KNOTS)}
    assert cycles(spine) == []


_IMPORT_EACH = """
import importlib, json, sys
results = {}
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "deltatune" or m.startswith("deltatune.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
        results[name] = "ok"
    except ModuleNotFoundError as exc:
        results[name] = "optional" if exc.name and not exc.name.startswith("deltatune") else f"error: {exc!r}"
    except Exception as exc:
        results[name] = f"error: {exc!r}"
print(json.dumps(results))
"""


def test_every_module_imports_alone():
    """Each module imported with no deltatune module loaded before it (sys.modules cleared of deltatune between
    imports, in one fresh interpreter): a cycle that only works in one import order, or a module that relies on
    another being imported first, fails here. Third-party packages (torch, transformers) stay loaded between imports,
    which is what makes this one interpreter (~5 s) instead of one per module (~3 s each); they cannot take part in
    a cycle of ours. A module whose optional extra is not installed counts as importable."""
    names = sorted(modules())
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, *names], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    errors = {n: r for n, r in results.items() if r.startswith("error")}
    assert not errors, errors
    assert sum(r == "ok" for r in results.values()) >= len(names) - 5


KNOWN_LARGE: dict[str, str] = {}
"""Files over the limit that another issue is writing now, with the reason; each must be split before its issue
closes. None now: formats.py gave ``Sample`` to data/sample.py, grpo.py its rewards to train/grpo_rewards.py."""


@pytest.mark.parametrize("limit, folder", [(400, PACKAGE / "methods"), (600, PACKAGE)])
def test_files_stay_small(limit, folder):
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines()) for p in folder.rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > limit and p not in KNOWN_LARGE} == {}


def test_method_files_are_named_as_the_registry_names_them():
    from deltatune import registry

    for name in registry.names():
        method = registry.get(name)
        assert method.module.__name__ == f"deltatune.methods.{name}"
        assert method.config_class.method == name
        assert registry.method_of(method.config_class) is method
        assert registry.get_by_peft_type(method.config_class.peft_type) is method


def test_model_py_names_no_method_and_the_peft_prefix_lives_in_files_py():
    from deltatune import registry

    text = (PACKAGE / "model.py").read_text(encoding="utf-8").lower()
    words = (set(registry.names()) - {"full", "freeze"}) | {"adapterfusion"}  # "full", "freeze": English words too
    assert [w for w in sorted(words) if w in text] == []
    holders = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if '"base_model.model."' in p.read_text()]
    assert holders == ["deltatune/files.py"]


def test_train_help_lists_every_method_field_with_its_doc():
    from deltatune import registry
    from deltatune.cli_parser import _method_help
    from deltatune.config import DeltaConfig, field_docs

    text = "\n".join(_method_help())
    for name in registry.names():
        for key, _, doc in field_docs(registry.get(name).config_class):
            assert doc, f"{name}.{key} has no docstring under it"
            assert f"{key} (default" in text and doc in text
    assert "every method: target_modules" in text and len(field_docs(DeltaConfig)) == 6  # (revision: session 50)


NO_MATRIX_ROW: set[str] = set()
"""Registered methods the test matrix has no row for. None now (fusion's row builds its bottleneck adapters first;
QLoRA is the row ``lora-4bit``); this set must stay empty."""


def test_matrix_rows_use_registry_names():
    sys.path.insert(0, str(ROOT / "tests"))
    from matrix import METHODS

    from deltatune import registry

    names = set(registry.names())
    ids = [row.id for row in METHODS]
    assert [i for i in ids if i.split("-")[0] not in names] == []  # "lora-dora": method "lora", variant "dora"
    assert names - {i.split("-")[0] for i in ids} == NO_MATRIX_ROW


def test_a_stage_is_one_file_and_one_table_line():
    """Every stage of train/table.py has its file in train/ with ``prepare_<stage>``, and the names the rest of
    the package uses (the recipe's stage list, the task heads, the image stages) all derive from that table."""
    import importlib

    from deltatune.train import config, models, run, table

    for name, stage in table.STAGES.items():
        assert (PACKAGE / "train" / f"{stage.module}.py").is_file(), name
        assert callable(getattr(importlib.import_module(f"deltatune.train.{stage.module}"), f"prepare_{name}")), name
    assert config.STAGES is table.STAGES and models.IMAGE_STAGES is table.IMAGE_STAGES
    assert run.TASK_OF_STAGE is table.TASK_OF_STAGE and set(table.TASK_OF_STAGE) == set(table.STAGES)


def test_the_stage_table_imports_no_torch():
    code = "import sys, deltatune.train.table, deltatune.train.config; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"

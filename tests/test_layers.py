"""The package's structure: imports flow one way (no cycles, no upward imports), and every default has one home.

These read the source, not behaviour: they fail when a change adds an import cycle (even one hidden in a
function), an import from a lower layer into a higher one, or a flag or parameter whose default drifts from
its config field.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

import headstart
from headstart import config
from headstart.cli import TRAIN_CONFIGS, build_parser

SRC = Path(headstart.__file__).parent

# lower layers first; a module may import its own layer and those below it. Modules not named here (features
# built on the public API: serving, reports...) sit in the application layer.
LAYERS = [
    {"_version", "errors", "config", "io", "hardware", "distributed", "protocols", "runfolder"},
    {"backbones", "data"},
    {"cache", "engines", "features"},
    {"heads", "model", "training", "evaluation", "summary", "label_errors"},
    {"runs", "predict", "export"},
    None,  # the application layer: api and everything built on it
    {"cli", "__main__"},
]
APPLICATION = LAYERS.index(None)


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path) -> set[str]:
    """headstart modules imported anywhere in ``path`` (functions included; ``if TYPE_CHECKING:`` excluded)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
            for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "headstart"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "headstart":
                continue
            for alias in node.names:  # `from . import tiny` names a module; `from .x import name` names x
                sub = f"{target}.{alias.name}"
                found.add(sub if (SRC.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                          or (SRC.parent / sub.replace(".", "/") / "__init__.py").exists() else target)
    found.discard(module)
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(SRC.rglob("*.py"))}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if names is not None and top in names:
            return i
    return APPLICATION if top else 0  # the package itself only re-exports, lazily


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. the import cycles."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_is_read_from_the_source():
    graph = _graph()
    assert "headstart.features" in graph and "headstart.engines" in graph["headstart.features"]
    assert "headstart.config" in graph["headstart.backbones.registry"]


def test_no_import_cycles_anywhere_not_even_inside_functions():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_flow_from_the_foundations_up_to_the_cli():
    upward = [(m, dep) for m, deps in _graph().items() for dep in deps
              if dep != "headstart" and _layer(dep) > _layer(m)]
    assert upward == []


def test_the_foundations_import_no_torch():
    # config and errors are what `headstart --help` needs: they must not pull torch in at import time
    for name in ("config.py", "errors.py", "protocols.py", "_version.py", "io.py", "cli.py"):
        tree = ast.parse((SRC / name).read_text())
        top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name for n in top_level for a in n.names} | {n.module for n in top_level
                                                                 if isinstance(n, ast.ImportFrom) and n.module}
        assert not {"torch", "timm", "onnxruntime", "numpy"} & names, name


def _train_actions():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    actions = {}
    for a in train._actions:  # the first flag of a destination sets its default (--weights, then --random-init)
        actions.setdefault(a.dest, a)
    return actions


@pytest.mark.parametrize("cls", TRAIN_CONFIGS, ids=lambda c: c.__name__)
def test_every_train_flag_has_its_config_fields_default_and_choices(cls):
    actions = _train_actions()
    for f in config.cli_fields(cls):
        dest = f.metadata["dest"] or f.name
        assert dest in actions, f"{cls.__name__}.{f.name} has no `headstart train` flag"
        expected = list(f.default) if isinstance(f.default, tuple) else f.default
        assert actions[dest].default == expected, f"--{dest}: {actions[dest].default!r} != {expected!r}"
        if f.metadata["choices"]:
            assert tuple(actions[dest].choices) == tuple(f.metadata["choices"]), dest


def test_image_classifier_takes_the_config_names_with_the_config_defaults():
    params = inspect.signature(headstart.ImageClassifier.__init__).parameters
    fields = {f.metadata["dest"] or f.name: f for cls in TRAIN_CONFIGS for f in config.cli_fields(cls)}
    for dest, f in fields.items():
        assert dest in params, f"ImageClassifier has no parameter {dest!r} for {f.name}"
        assert params[dest].default == f.default, f"ImageClassifier({dest}={params[dest].default!r}) but the " \
                                                  f"config says {f.default!r}"
    # and nothing else but what is not a training setting
    assert set(params) - set(fields) - {"self"} == {"cache", "progress", "tta"}


def test_defaults_build_the_default_configs():
    built = headstart.ImageClassifier()._configs()
    assert built["train"] == config.TrainConfig() and built["recipe"] == config.Recipe()
    assert built["head"] == config.HeadConfig() and built["engine"] == config.EngineConfig()


def test_settings_without_a_flag_are_still_named_fields():
    # knobs kept off the CLI are documented defaults in one place, not constants inside the training code
    hidden = {f.name for cls in TRAIN_CONFIGS for f in dataclasses.fields(cls) if not f.metadata.get("cli", True)}
    assert {"lr_decay", "head_lr_factor", "finetune_weight_decay", "finetune_warmup_epochs"} <= hidden

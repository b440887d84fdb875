"""Help that teaches and a start without waiting: every command's help shows its defaults and examples, a
mistyped option gets that command's usage and a "did you mean", help loads no model library, and each command
says what it is about to do before torch is imported."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import make_image
from headstart.cli import build_parser, main


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _has_a_default_to_show(action: argparse.Action) -> bool:
    d = action.default
    return (bool(action.option_strings) and action.nargs != 0 and action.help is not argparse.SUPPRESS
            and d is not None and d is not False and d is not argparse.SUPPRESS
            and not (isinstance(d, (list, tuple)) and not d))


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_command_help_shows_its_defaults_and_examples(name):
    parser = _commands()[name]
    text = parser.format_help()
    assert "examples:" in text, name
    examples = [line for line in text.split("examples:", 1)[1].splitlines() if line.strip().startswith("headstart ")]
    assert len(examples) >= 2, text
    formatter = parser._get_formatter()
    for action in parser._actions:
        if _has_a_default_to_show(action):
            shown = formatter._expand_help(action)
            assert f"default: {action.default}" in shown or "(default:" in shown, (name, action.dest, shown)


def test_train_help_explains_the_numbers_a_newcomer_asks_about():
    text = " ".join(_commands()["train"].format_help().split())
    for expected in ("(default: 60)", "(default: 0.001)", "(default: 10)", "(default: 32)", "(default: 5.0)",
                     "regularisation", "early stopping"):
        assert expected in text, expected


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_a_mistyped_option_gets_the_commands_usage_and_a_suggestion(tmp_path, capsys):
    err = _usage_error(["train", str(tmp_path), "--out", str(tmp_path / "r"), "--epcohs", "5"], capsys)
    assert err.startswith("usage: headstart train") and "did you mean --epochs?" in err
    err = _usage_error(["predict", "run", "a.jpg", "--top-kk", "3"], capsys)
    assert err.startswith("usage: headstart predict") and "did you mean --top-k?" in err


def test_a_mistyped_command_or_choice_gets_a_suggestion(tmp_path, capsys):
    assert "did you mean 'train'?" in _usage_error(["trian", "data"], capsys)
    err = _usage_error(["train", str(tmp_path), "--out", "r", "--strategy", "finetun"], capsys)
    assert err.startswith("usage: headstart train") and "did you mean 'finetune'?" in err


def test_a_global_option_after_the_command_says_where_it_goes(tmp_path, capsys):
    err = _usage_error(["train", str(tmp_path), "--out", "r", "--debug"], capsys)
    assert "--debug goes before the command: headstart --debug train" in err


_HEAVY = ("torch", "timm", "torchvision", "onnxruntime", "sklearn", "numpy")


@pytest.mark.parametrize("argv", [[]] + [[name] for name in sorted(_commands())], ids=lambda a: " ".join(a) or "top")
def test_help_loads_no_model_library(argv):
    code = textwrap.dedent(f"""
        import sys
        from headstart.cli import main
        try:
            main({argv + ["--help"]!r})
        except SystemExit:
            pass
        print(sorted(m for m in {_HEAVY!r} if m in sys.modules), file=sys.stderr)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stderr.strip().splitlines()[-1] == "[]", done.stderr


# runs a command and writes down, in order, its first output and the moment torch is first imported; there it
# stops, since what comes after is not the point (and costs seconds of CPU)
_WATCH = textwrap.dedent("""
    import json, os, sys
    order = []
    def done():
        with open(os.environ["ORDER_FILE"], "w") as f:
            json.dump(order, f)
    class Watch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                order.append("torch")
                done()
                os._exit(0)
            return None
    sys.meta_path.insert(0, Watch())
    class Stream:
        def __init__(self, inner):
            self.inner = inner
        def write(self, s):
            if s.strip() and not any(isinstance(o, dict) for o in order):
                order.append({"first line": s.strip().splitlines()[0]})
            return self.inner.write(s)
        def __getattr__(self, name):
            return getattr(self.inner, name)
    sys.stdout, sys.stderr = Stream(sys.stdout), Stream(sys.stderr)
    from headstart.cli import main
    try:
        code = main(sys.argv[1:])
    finally:
        done()
    sys.exit(code)
""")


def _order(argv, tmp_path) -> tuple[int, list]:
    env = dict(os.environ, ORDER_FILE=str(tmp_path / "order.json"), PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", _WATCH, *map(str, argv)], env=env, capture_output=True, text=True,
                          timeout=600)
    return done.returncode, json.loads((tmp_path / "order.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import make_folder

    root = tmp_path_factory.mktemp("first-line")
    data = make_folder(root / "data")
    assert main(["--quiet", "train", str(data), "--out", str(root / "run"), "--backbone", "test_tiny", "--epochs",
                 "2", "--engine", "torch", "--no-cache"]) == 0
    return data, root / "run"


def test_train_says_what_it_will_train_on_before_torch_loads(tmp_path, image_folder):
    code, order = _order(["train", image_folder, "--out", tmp_path / "run", "--backbone", "test_tiny", "--epochs",
                          "2", "--engine", "torch"], tmp_path)
    assert code == 0
    assert order[0] == {"first line": f"data: 2 classes (blue, red); 16 train, 8 val images (validation set: "
                                      f"{image_folder / 'val'})"} and order[1] == "torch", order


@pytest.mark.parametrize("command", ["evaluate", "predict", "export", "summary", "backbones"])
def test_each_command_says_something_before_torch_loads(command, trained, tmp_path):
    data, run = trained
    argv = {"evaluate": ["evaluate", run, data / "val", "--engine", "torch"],
            "predict": ["predict", run, data / "val", "--engine", "torch"],
            "export": ["export", run, "--out", tmp_path / "m.onnx"],
            "summary": ["summary", "test_tiny"], "backbones": ["backbones"]}[command]
    code, order = _order(argv, tmp_path)
    assert code == 0 and isinstance(order[0], dict) and order[1:] == ["torch"], order


def test_a_wrong_path_fails_before_torch_loads(tmp_path, trained):
    _, run = trained
    (tmp_path / "empty").mkdir()
    make_image(tmp_path / "loose" / "a.png", (1, 2, 3))
    for argv in (["train", tmp_path / "nosuch", "--out", tmp_path / "run"], ["predict", run, tmp_path / "empty"],
                 ["evaluate", run, tmp_path / "loose"]):
        code, order = _order(argv, tmp_path)
        assert code == 1 and len(order) == 1 and order[0]["first line"].startswith("error:"), (argv, order)



def test_the_command_freezes_the_collector_but_main_in_a_program_leaves_it_alone(monkeypatch, capsys):
    """The headstart command pauses and then freezes the cyclic collector around the model libraries' import (it
    ends with the process); a program calling main() keeps the collector as it set it."""
    import gc

    import headstart.cli

    before = gc.get_freeze_count()
    assert main(["backbones"]) == 0
    assert gc.isenabled() and gc.get_freeze_count() == before
    monkeypatch.setattr(headstart.cli, "_COMMAND", True)
    try:
        assert main(["backbones"]) == 0
        assert gc.isenabled() and gc.get_freeze_count() > before
    finally:
        gc.unfreeze()  # this test process goes on
    gc.disable()
    try:
        assert main(["backbones"]) == 0 and not gc.isenabled()  # left as the program set it
    finally:
        gc.unfreeze()
        gc.enable()

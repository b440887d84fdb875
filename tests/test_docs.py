"""The user guide cannot drift from the code unnoticed: every ``headstart`` command in the README's and the docs'
code blocks is one the CLI accepts, their Python compiles, and their links lead to files that exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from headstart.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(lang: str) -> list[tuple[str, str]]:
    return [(page.name, m.group(1)) for page in PAGES
            for m in re.finditer(rf"```{lang}\n(.*?)```", page.read_text(encoding="utf-8"), re.S)]


COMMANDS = [(page, line.strip()) for page, block in _blocks("bash") for line in block.splitlines()
            if line.strip().startswith("headstart ")]


def test_the_pages_show_commands():
    assert len([c for c in COMMANDS if c[0] == "README.md"]) >= 8


@pytest.mark.parametrize("page,line", COMMANDS, ids=[f"{p}: {c[:60]}" for p, c in COMMANDS])
def test_every_command_shown_is_accepted(page, line):
    argv = shlex.split(line, comments=True)[1:]
    if "--help" in argv:
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(argv)
        assert exit_.value.code == 0
        return
    args = build_parser().parse_args(argv)  # an unknown command or option exits 2 here
    assert callable(args.func)


@pytest.mark.parametrize("page,code", _blocks("python"))
def test_the_python_shown_compiles(page, code):
    compile(code, page, "exec")


def test_every_link_to_a_file_leads_to_one():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text(encoding="utf-8")):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"

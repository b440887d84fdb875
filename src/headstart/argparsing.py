"""The command line's parser: every option's default in its help, each command's examples kept as written, and a
mistyped option, command or choice answered with that command's usage and a "did you mean".

argparse in Python 3.11 has no suggestions (``suggest_on_error`` comes in 3.14) and reports an option a
subcommand does not know with the top-level usage; ``Parser`` does both as a user expects.

    >>> parser = Parser(prog="headstart"); sub = parser.add_subparsers(dest="command")   # subparsers are Parsers
"""

from __future__ import annotations

import argparse
import difflib

__all__ = ["Parser", "HelpFormatter"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (examples keep their lines); an option's help ends with its default
    when it has one worth showing (not ``None``, off, or empty: the help text says what those mean)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if text is argparse.SUPPRESS or "%(default)" in text or not action.option_strings:
            return text
        default = action.default
        if action.nargs == 0 or default is None or default is False or default is argparse.SUPPRESS or (
                isinstance(default, (list, tuple)) and not default):  # flags, and options unset by default
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` (``HelpFormatter`` always) whose errors point at the command that was mistyped."""

    def __init__(self, *args, **kwargs):
        kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self._command_parser(namespace)
            parser.error(f"unrecognized arguments: {' '.join(extras)}{parser._suggestion(extras, self)}")
        return namespace

    def _command_parser(self, namespace) -> "Parser":
        """The subcommand's parser that ``namespace`` went through (``self`` without subcommands)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(namespace, action.dest, None) or "")
                if chosen is not None:
                    return chosen._command_parser(namespace) if isinstance(chosen, Parser) else chosen
        return self

    def _suggestion(self, extras: list[str], top: "Parser") -> str:
        flags = [a.split("=", 1)[0] for a in extras if a.startswith("-") and a != "-"]
        mine = [s for a in self._actions for s in a.option_strings]
        theirs = [s for a in top._actions for s in a.option_strings if s not in mine]
        for flag in flags:
            if self is not top and flag in theirs:
                return f"; {flag} goes before the command: {top.prog} {flag} {self.prog.split()[-1]} ..."
            close = difflib.get_close_matches(flag, mine, n=1, cutoff=0.6)
            if close:
                return f"; did you mean {close[0]}?"
        return ""

    def _check_value(self, action: argparse.Action, value) -> None:
        # argparse's own check, with the closest choice named (a mistyped command or --strategy value)
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(repr(c) for c in action.choices)
            close = difflib.get_close_matches(str(value), [str(c) for c in action.choices], n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise argparse.ArgumentError(action, f"invalid choice: {value!r} (choose from {choices}){hint}")

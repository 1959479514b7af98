"""The `vidray` command's own surface: what `--help` shows for every subcommand."""

from __future__ import annotations

import argparse

from vidray.cli import build_parser


def commands(parser: argparse.ArgumentParser, name: str = "vidray"):
    """(``vidray index folder``, its parser) for the command and every subcommand under it."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub_parser in action.choices.items():
                yield from commands(sub_parser, f"{name} {sub_name}")


def test_every_option_and_command_has_a_help_line():
    """`vidray X --help` says what every option is for: none is listed bare."""
    bare = []
    for name, parser in commands(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                bare += [f"{name} {choice.dest}" for choice in action._choices_actions if not choice.help]
            elif action.help is None:
                bare.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not bare, f"options and commands without help: {bare}"

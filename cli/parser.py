"""argparse with "did you mean": a mistyped option (`--maunal`) or command (`chorus rn`) is answered with the
nearest one the command takes, not only "unrecognized". Python 3.14's `suggest_on_error` covers commands
and choices only, and chorus runs on 3.11."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import NoReturn

from orchestrator.spelling import closest

_UNRECOGNIZED = "unrecognized arguments: "
_INVALID_CHOICE = re.compile(r"invalid choice: (?P<q>['\"]?)(?P<word>.*?)(?P=q) \(choose from (?P<choices>.*)\)$")


class SuggestingParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors name the closest option or choice. Subparsers made with
    `add_subparsers().add_parser` are of the same class (argparse's default `parser_class`)."""

    _namespace: argparse.Namespace | None = None

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        self._namespace = parsed  # which subcommand ran, for the options an unknown one is compared with
        return parsed, extras

    def error(self, message: str) -> NoReturn:
        super().error(message + self.suggestion(message))

    def suggestion(self, message: str) -> str:
        """" (did you mean --manual?)" for the error's unknown words that are close to a known one, else ""."""
        guesses: list[str] = []
        if message.startswith(_UNRECOGNIZED):
            known = option_strings(self.invoked())
            for word in message[len(_UNRECOGNIZED):].split():
                if word.startswith("-"):
                    guess = closest(word.split("=", 1)[0], known)
                    if guess is not None:
                        guesses.append(guess)
        elif (m := _INVALID_CHOICE.search(message)) and "maybe you meant" not in message:
            choices = [c.strip().strip("'\"") for c in m.group("choices").split(",")]
            guess = closest(m.group("word"), choices)
            if guess is not None:
                guesses.append(repr(guess))
        return f" (did you mean {' / '.join(dict.fromkeys(guesses))}?)" if guesses else ""

    def invoked(self) -> argparse.ArgumentParser:
        """The deepest subcommand's parser the last parse went into (this parser when it has none)."""
        parser: argparse.ArgumentParser = self
        namespace = self._namespace
        while namespace is not None:
            chosen = next(((a, getattr(namespace, a.dest, None)) for a in parser._actions
                           if isinstance(a, argparse._SubParsersAction) and a.dest != argparse.SUPPRESS), None)
            if chosen is None or not isinstance(chosen[1], str) or chosen[1] not in chosen[0].choices:
                break
            parser = chosen[0].choices[chosen[1]]
        return parser


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string the parser takes (`--manual`, `-v`...)."""
    return [s for action in parser._actions for s in action.option_strings]

"""Every shell command in the README runs as written after the quick start: each names a program the quick start
provides (`.venv/bin/gramrec`, never a bare `gramrec`, which is not on PATH), and every gramrec subcommand and
flag exists; the curl bodies are valid requests of the endpoints they are sent to."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from pydantic import TypeAdapter

from gramrec.service.schemas import AddItemsRequest, PredictRequest, RecommendRequest
from gramrec.trainer.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PROGRAMS = {"python3", "curl", ".venv/bin/pip", ".venv/bin/pytest", ".venv/bin/gramrec", ".venv/bin/torchrun"}
BODIES = {
    "/predict": TypeAdapter(PredictRequest),
    "/items": TypeAdapter(AddItemsRequest),
    "/recommend": TypeAdapter(RecommendRequest),
}


def shell_commands(text: str) -> list[list[str]]:
    """The commands of every ```bash block: quoted strings may span lines; split on &&, ;, |."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        pending = ""
        for line in block.splitlines():
            pending = f"{pending}\n{line}" if pending else line
            try:
                lexer = shlex.shlex(pending, posix=True, punctuation_chars=";&|")
                lexer.whitespace_split = True
                tokens = list(lexer)
            except ValueError:  # an open quote: the command goes on on the next line
                continue
            pending = ""
            command: list[str] = []
            for token in tokens + ["&&"]:
                if token in ("&&", ";", "|", "||"):
                    if command:
                        commands.append(command)
                    command = []
                else:
                    command.append(token)
        assert not pending, f"unterminated quote in a README command: {pending[:80]}"
    return commands


COMMANDS = shell_commands(README.read_text())


def program_and_args(command: list[str]) -> tuple[str, list[str]]:
    while command and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", command[0]):  # VAR=value prefixes
        command = command[1:]
    return command[0], command[1:]


def test_the_commands_are_read():
    programs = [program_and_args(c)[0] for c in COMMANDS]
    assert programs.count(".venv/bin/gramrec") >= 6 and "curl" in programs and len(COMMANDS) > 12


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_command_runs_as_written(command):
    program, args = program_and_args(command)
    assert program in PROGRAMS, f"{program!r}: not a program the quick start provides (use .venv/bin/...)"
    if program == ".venv/bin/torchrun":
        assert "-m" in args and args[args.index("-m") + 1] == "gramrec.trainer.cli"
        check_gramrec(args[args.index("-m") + 2 :])
    elif program == ".venv/bin/gramrec":
        check_gramrec(args)
    elif program == "curl":
        check_curl(args)


def check_gramrec(args: list[str]) -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert args and args[0] in subparsers.choices, f"no gramrec subcommand {args[:1]}"
    sub = subparsers.choices[args[0]]
    flags = {option for action in sub._actions for option in action.option_strings}
    for arg in args[1:]:
        if arg.startswith("-"):
            assert arg.split("=", 1)[0] in flags, f"gramrec {args[0]} has no flag {arg}"
    parsed = sub.parse_args(args[1:])  # also: required arguments given, choices respected
    assert parsed is not None


def check_curl(args: list[str]) -> None:
    url = next(a for a in args if "localhost:8000" in a)
    path = url.split("localhost:8000", 1)[1].split("?", 1)[0]
    if "-d" in args:
        assert "content-type: application/json" in [a.lower() for a in args], "a JSON body needs its content type"
        body = json.loads(args[args.index("-d") + 1])
        BODIES[path].validate_python(body)


def test_a_bare_gramrec_is_refused():
    (command,) = shell_commands("```bash\ngramrec train --task kt\n```\n")
    with pytest.raises(AssertionError, match="not a program the quick start provides"):
        test_command_runs_as_written(command)
    (command,) = shell_commands("```bash\n.venv/bin/gramrec train --no-such-flag 1\n```\n")
    with pytest.raises(AssertionError, match="has no flag --no-such-flag"):
        test_command_runs_as_written(command)


def test_every_flag_help_shows_its_default():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = action.help or ""
            assert "default" in text or "required" in text, f"gramrec {name} {action.option_strings[0]}: {text!r}"
            if action.choices:
                assert all(str(c) in text for c in action.choices)
    train = subparsers.choices["train"]
    strategy = next(a for a in train._actions if "--strategy" in a.option_strings)
    assert "choices: e2e, gram, nofinetune, nocontent; default: gram" in strategy.help

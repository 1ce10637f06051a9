"""`completion bash`: a completion script generated from the parser
itself, so it always knows every command and option (argparse has no
completion of its own; this is the few lines that replace argcomplete)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from dmabufd_client.cli.registry import AddCommand

_FUNCTION = "_dmabufctl"


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [action for action in parser._actions if action.option_strings]


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def _value_case(action: argparse.Action) -> str:
    """How to complete the value of an option (or a positional)."""
    if action.choices is not None:
        words = " ".join(shlex.quote(str(choice)) for choice in action.choices)
        return f'COMPREPLY=($(compgen -W "{words}" -- "$cur"))'
    if action.type is Path:
        kind = "-d" if action.metavar == "DIR" else "-f"
        return f'COMPREPLY=($(compgen {kind} -- "$cur"))'
    return "COMPREPLY=()"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def bash_script(parser: argparse.ArgumentParser) -> str:
    commands = _subcommands(parser)
    value_cases: dict[str, str] = {}
    for each in (parser, *commands.values()):
        for action in _options(each):
            if _takes_value(action):
                for option in action.option_strings:
                    value_cases.setdefault(option, _value_case(action))
    top_words = [o for a in _options(parser) for o in a.option_strings] + list(commands)
    lines = [
        f"# bash completion for {parser.prog}: source <({parser.prog} completion bash)",
        f"{_FUNCTION}() {{",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}" command="" i',
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        case "${COMP_WORDS[i]}" in',
        f'            {"|".join(commands)}) command="${{COMP_WORDS[i]}}"; break ;;',
        "        esac",
        "    done",
        '    case "$prev" in',
    ]
    by_case: dict[str, list[str]] = {}
    for option, case in sorted(value_cases.items()):
        by_case.setdefault(case, []).append(option)
    lines += [f"        {'|'.join(options)}) {case}; return ;;" for case, options in by_case.items()]
    lines += ["    esac", '    case "$command" in']
    lines.append(f'        "") COMPREPLY=($(compgen -W "{" ".join(top_words)}" -- "$cur")) ;;')
    for name, command in commands.items():
        words = " ".join(o for a in _options(command) for o in a.option_strings)
        positionals = [a for a in command._actions if not a.option_strings]
        if positionals:
            lines.append(
                f'        {name}) if [[ $cur == -* ]]; then COMPREPLY=($(compgen -W "{words}" -- "$cur")); '
                f"else {_value_case(positionals[0])}; fi ;;"
            )
        else:
            lines.append(f'        {name}) COMPREPLY=($(compgen -W "{words}" -- "$cur")) ;;')
    lines += ["    esac", "}", f"complete -F {_FUNCTION} {parser.prog}", ""]
    return "\n".join(lines)


def register(add: AddCommand, parser: argparse.ArgumentParser) -> None:
    def run(_client: None, args: argparse.Namespace) -> int:
        sys.stdout.write(bash_script(parser))
        return 0

    command = add(
        "completion",
        "print a shell completion script: source <(dmabufctl completion bash) (zsh: after bashcompinit)",
        run,
        session=False,
    )
    command.add_argument("shell", choices=["bash"], help="the shell (bash; zsh reads it through bashcompinit)")

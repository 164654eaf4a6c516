"""`airlock completion bash|zsh`: a shell completion script for every command and option.

    airlock completion bash > ~/.local/share/bash-completion/completions/airlock
    airlock completion zsh > "${fpath[1]}/_airlock"

The script is generated from the same parser the command runs (shtab), so it never lists an option
the command lacks.
"""

from __future__ import annotations

import argparse

import shtab

__all__ = ["cmd_completion"]


def cmd_completion(args: argparse.Namespace) -> int:
    from control.cli import build_parser

    print(shtab.complete(build_parser(), shell=args.shell))
    return 0

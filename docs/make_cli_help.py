"""Rewrites the `--help` blocks of docs/cli.md from the commands themselves
(tests/test_docs.py checks they match): ``python docs/make_cli_help.py``."""

import re
from pathlib import Path

from click.testing import CliRunner

from keras_fim_cli import main

PAGE = Path(__file__).resolve().parent / "cli.md"
BLOCK = re.compile(r"```text\n(Usage: keras-fim ((?:\w+ )?)\[OPTIONS\].*?)\n```", re.S)


def help_block(match: re.Match) -> str:
    command = match.group(2).split()
    printed = CliRunner().invoke(
        main, [*command, "--help"], terminal_width=100, prog_name="keras-fim"
    )
    return f"```text\n{printed.output.rstrip()}\n```"


if __name__ == "__main__":
    PAGE.write_text(BLOCK.sub(help_block, PAGE.read_text("utf-8")), "utf-8")

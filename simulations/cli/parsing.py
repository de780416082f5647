"""What every `fedscore` parser shares: its help format, -v anywhere, the package version."""

from __future__ import annotations

import argparse
import importlib.metadata
from pathlib import Path
from typing import Any

from server.config import ConfigError

PACKAGE = "fedscore"


def package_version() -> str:
    """The installed package's version (pyproject.toml's, as pip installed it)."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed; pip install -e . from the checkout)"


def shows_default(action: argparse.Action) -> bool:
    """Whether an option has a default worth printing: not a flag that is off, not None (the
    option unset: its help says what happens then), not an empty repeatable list."""
    default = action.default
    if not action.option_strings or default is None or default is argparse.SUPPRESS:
        return False
    if isinstance(default, bool) and action.nargs == 0:  # store_true / store_false
        return False
    return not (isinstance(default, list | tuple) and not default)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (they hold usage lines and the mapping format), and
    each option's default after its help where it has one (`shows_default`)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if text is None or "%(default)" in text or not shows_default(action):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """The parser of `fedscore` and of each of its subcommands (add_subparsers makes its
    subparsers of its own class): the help format above, and -v/--verbose at every level, so
    `fedscore -v run ...` and `fedscore run ... -v` are the same command."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        # SUPPRESS: a level without -v leaves what an earlier level set (the command's parser
        # gives the default, `top_level`), instead of resetting it to False.
        self.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                          help="log progress details")

    @classmethod
    def top_level(cls, **kwargs: Any) -> Parser:
        parser = cls(**kwargs)
        parser.set_defaults(verbose=False)
        parser.add_argument("--version", action="version",
                            version=f"%(prog)s {package_version()}",
                            help="print the installed fedscore's version and exit")
        return parser


def data_source(data: str, users: int | None) -> str:
    """`uci` as is; a path made absolute, so config.json still finds it from anywhere."""
    if users is not None:
        raise ConfigError("--users applies to generated populations; real data (--data) has "
                          "the people it has")
    return data if data == "uci" else str(Path(data).resolve())

"""What every command shares: finding the config, printing errors, exit codes.

Text that may hold user data (names, paths, config keys, logged reasons) is printed
only through :func:`say`, :func:`plain` and :func:`fail`: literally, never as Rich
markup, with control characters escaped; an error is always one ``error:`` line.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.text import Text

from gpusm.config import Config, find_config_path, load_config, require_services
from gpusm.errors import ConfigError, GpusmError, UnknownName

__all__ = [
    "CLIENT_PATTERN",
    "EXIT_CONFIG",
    "EXIT_ERROR",
    "EXIT_OK",
    "ConfigOption",
    "check_client",
    "console",
    "err_console",
    "fail",
    "friendly_errors",
    "load",
    "plain",
    "say",
]

# Exit codes (documented in README.md).
EXIT_OK = 0
EXIT_ERROR = 1  # the operation failed (insufficient VRAM, timeout, runtime error…)
EXIT_CONFIG = 2  # bad config, bad arguments or unknown names: fix the input

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Config file (default: $GPUSM_CONFIG, else ./gpusm.yaml).",
        show_default=False,
    ),
]


# Characters that would move the cursor, start a new line, recolour the terminal or
# cannot be encoded (lone surrogates from undecodable argv bytes): shown escaped instead.
_UNSAFE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _escaped(text: str, keep: str = "") -> str:
    if text.isprintable():
        return text
    return "".join(
        ch.encode("unicode_escape", "backslashreplace").decode("ascii")
        if ch not in keep and unicodedata.category(ch) in _UNSAFE
        else ch
        for ch in text
    )


def plain(text: object, style: str = "") -> Text:
    """``text`` as a Rich Text that is shown literally: never read as markup, and with
    control characters escaped (``\\x1b``), so user data cannot restyle or break lines."""
    return Text(_escaped(str(text), keep="\n\t"), style=style)


def say(message: str | Text, *, err: bool = False, style: str = "") -> None:
    """Print ``message`` (names, paths and other user text included) literally.

    The one printer for text that may hold user data: square brackets stay brackets,
    control characters are escaped, lines are never wrapped.
    """
    text = message if isinstance(message, Text) else plain(message, style)
    (err_console if err else console).print(text, soft_wrap=True)


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print ``message`` as one ``error:`` line and exit with ``code``.

    The message is literal text on a single line, whatever it holds.
    """
    line = Text.assemble(("error:", "bold red"), " ", _escaped(message))
    err_console.print(line, soft_wrap=True)
    raise typer.Exit(code)


# Client ids are recorded in events; the API accepts exactly these (gpusm.api.schemas).
CLIENT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@/+-]{0,127}$"


def check_client(client: str, option: str = "--client") -> str:
    """``client`` if it is a valid client id, else exit 2 saying what one looks like."""
    if re.fullmatch(CLIENT_PATTERN, client) is None:
        fail(
            f"{option}: {client!r} is not a client id; use letters, digits and _ . : @ / + - "
            "(at most 128, starting with a letter or digit)",
            EXIT_CONFIG,
        )
    return client


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn gpusm errors into one clear line and an exit code, never a traceback.

    Bad input (a config mistake, an unknown phase or service) exits 2; any other gpusm
    error, and an OS error nobody translated (disk full, permissions…), exits 1.
    """
    try:
        yield
    except (ConfigError, UnknownName) as exc:
        fail(str(exc), EXIT_CONFIG)
    except GpusmError as exc:
        fail(str(exc), EXIT_ERROR)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        fail(f"{exc.strerror or exc}{where}", EXIT_ERROR)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(130) from None


def load(config: Path | None, *, need_services: bool = True) -> Config:
    """Find and load the config (``-c``, ``$GPUSM_CONFIG``, ``./gpusm.yaml``); exit 2 if bad.

    A config that defines no services is refused too, unless ``need_services`` is False
    (the ``sim`` commands read only the simulated GPU's settings from it).
    """
    with friendly_errors():
        cfg = load_config(find_config_path(config))
        if need_services:
            require_services(cfg)
        return cfg
    raise AssertionError("unreachable")  # pragma: no cover


def is_tty() -> bool:
    """Whether stdout is a terminal (live views only then)."""
    return sys.stdout.isatty()

"""What every command shares: finding the config, printing errors, exit codes."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from gpusm.config import Config, find_config_path, load_config
from gpusm.errors import ConfigError, GpusmError

__all__ = [
    "EXIT_CONFIG",
    "EXIT_ERROR",
    "EXIT_OK",
    "ConfigOption",
    "console",
    "err_console",
    "fail",
    "friendly_errors",
    "load",
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


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print ``message`` as an error and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn gpusm errors into one clear line and an exit code, never a traceback."""
    from gpusm.errors import UnknownName

    try:
        yield
    except ConfigError as exc:
        fail(str(exc), EXIT_CONFIG)
    except UnknownName as exc:
        fail(str(exc), EXIT_CONFIG)
    except GpusmError as exc:
        fail(str(exc), EXIT_ERROR)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(130) from None


def load(config: Path | None) -> Config:
    """Find and load the config (``-c``, ``$GPUSM_CONFIG``, ``./gpusm.yaml``); exit 2 if bad."""
    with friendly_errors():
        return load_config(find_config_path(config))
    raise AssertionError("unreachable")  # pragma: no cover


def is_tty() -> bool:
    """Whether stdout is a terminal (live views only then)."""
    return sys.stdout.isatty()

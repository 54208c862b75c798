"""The ``gpusm`` command line (Typer + Rich). Each command group lives in its own module."""

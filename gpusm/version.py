"""gpusm's version, in a module of its own so that every layer may read it."""

__all__ = ["VERSION"]

VERSION = "0.1.0"

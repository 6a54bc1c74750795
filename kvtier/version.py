"""kvtier's version (one place: the package, the server's HELLO and the CLI read it)."""

__version__ = "0.1.0"

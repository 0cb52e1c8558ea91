"""The ``xmoe`` command line: the only place where strings become typed configs."""

from .main import main

__all__ = ["main"]

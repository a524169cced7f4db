"""The package's error base class: every error a user can cause derives from :class:`HSAEError`.

The command line catches :class:`HSAEError` at its edge and prints its message on one line
(exit code 2); anything else is a bug and keeps its traceback. Each subclass also derives from
the built-in class it replaced (``ValueError`` or ``RuntimeError``), so code that caught those
keeps working.
"""

from __future__ import annotations


class HSAEError(Exception):
    """Base of every error the package raises for a bad input, file or setting."""


class ConfigError(HSAEError, ValueError):
    """A configuration value is outside its allowed range; the message names the field."""

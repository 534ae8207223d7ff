"""The package's error types: a user's mistake raises one of these, anything else is a bug.

Each subclasses the built-in error a caller would expect (`ValueError`, `TypeError`,
`FileNotFoundError`), so `except ValueError` keeps working, while the CLI and the server can tell
"the input is wrong, say so in one line" (`OuroborosError`) from "the code is wrong, show the
traceback" (everything else).
"""

from __future__ import annotations


class OuroborosError(Exception):
    """Base of every error that reports bad input, a bad setting or an unusable model."""


class InvalidArgumentError(OuroborosError, ValueError):
    """An argument has a bad value (empty prompt, out-of-range size, unknown method...)."""


class InvalidTypeError(OuroborosError, TypeError):
    """An argument has the wrong type."""


class ConfigError(OuroborosError, ValueError):
    """A config value or a config/sizing/cost file is bad; the message names the field or the file."""


class UnsupportedModelError(OuroborosError, TypeError):
    """The model cannot run tree attention (custom 4-D mask, explicit positions, a KV cache)."""


class ModelNotFoundError(OuroborosError, FileNotFoundError):
    """A model path holds no model."""


class MissingExtraError(OuroborosError, ImportError):
    """A feature's optional packages are not installed; the message names the pip extra to install."""

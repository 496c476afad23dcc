"""Errors a user can cause. The CLI prints them as one line and exits 2; the Python API raises them, and
because they subclass ``ValueError`` (or ``TypeError`` for a value of the wrong kind), an idiomatic
``except ValueError`` catches them too."""


class KvlabError(ValueError):
    """Base class of every error caused by user input (bad config, missing file, ...)."""


class ConfigError(KvlabError):
    """A configuration is invalid; the message names the offending field."""


class UnsupportedError(KvlabError):
    """A checkpoint family or feature kvlab does not (yet) support."""


class InputError(KvlabError):
    """A bad argument to the Python API (token ids out of range, a NaN temperature, ...)."""


class InputTypeError(KvlabError, TypeError):
    """An argument of the wrong kind (float token ids, a string where a number belongs, ...)."""

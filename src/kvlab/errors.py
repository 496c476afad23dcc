"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class KvlabError(Exception):
    """Base class of every error caused by user input (bad config, missing file, ...)."""


class ConfigError(KvlabError, ValueError):
    """A configuration is invalid; the message names the offending field."""


class UnsupportedError(KvlabError):
    """A checkpoint family or feature kvlab does not (yet) support."""

"""Exceptions a user can act on. The CLI prints their message (no traceback) and exits with 2."""


class MuseRecError(Exception):
    """Base class: the message names the file, column or key, what was expected and what was found."""


class ConfigError(MuseRecError):
    """A config file or override is wrong: unknown key, wrong type, bad value."""


class DataError(MuseRecError):
    """A data file is missing, corrupt or does not follow the TAOBAO-MM layout."""

"""The errors that mean "this cannot be done as asked", told apart from bugs.

Every mistake in what a user asked for or gave (a setting, an argument, a file, a run directory, a
request) raises a `PGMError` whose message is one sentence saying what to change. The command line
prints exactly those as one line and exits 2, and the server answers them with a 4xx; anything else
that escapes the library is a bug, and is shown as one (a traceback, an HTTP 500 with a logged
traceback).

The kinds that are mistakes about a value are ValueErrors too, so `except ValueError` keeps catching
them; `MissingDependency` is an ImportError and `ResourceError` an OSError for the same reason.
"""

from __future__ import annotations


class PGMError(Exception):
    """A request that cannot be carried out as given; the message says what to change."""


class ConfigError(PGMError, ValueError):
    """A run configuration that is malformed or impossible: a preset, a config file, a key=value setting."""


class ArgumentError(PGMError, ValueError):
    """An argument of a command or of a Python call that is out of range or of the wrong kind."""


class SamplingError(PGMError, ValueError):
    """Sampler settings or a generation request that do not apply, or do not fit the model."""


class DataError(PGMError, ValueError):
    """Data that is missing or unreadable: a corpus, prepared rows, images, reference statistics."""


class RunError(PGMError, ValueError):
    """A run directory that is missing, not a run, or damaged."""


class CheckpointError(PGMError, ValueError):
    """A checkpoint file or pretrained directory that is missing, of another kind, damaged, or that does
    not fit its model."""


class PublishError(PGMError, ValueError):
    """What stops a push: a source that is not a run or pretrained directory, a bad repository id, a refusal
    of the Hub."""


class MissingDependency(PGMError, ImportError):
    """An optional package that the request needs is not installed; the message names the extra."""


class ResourceError(PGMError, OSError):
    """The machine refused: a full disk, a path that cannot be read or written, an address that cannot be
    listened on, a worker process that died."""

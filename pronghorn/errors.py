"""Exceptions pronghorn raises for bad input. Each names the file/row/field at fault."""


class PronghornError(Exception):
    """Base class for errors caused by the user's input or environment, not by a bug."""


class CheckpointError(PronghornError):
    """A model or adapter checkpoint is missing, corrupt or of an unsupported kind."""


class UnsupportedModelError(PronghornError):
    """The checkpoint's architecture is not one pronghorn implements."""


class DataError(PronghornError):
    """A dataset file or row cannot be used; the message names the file, row and field."""


class OutputExistsError(PronghornError):
    """The output location already holds something and overwriting was not asked for."""


class LostPeersError(PronghornError):
    """A distributed run lost contact with another rank. The process group cannot be shut down cleanly after
    this (its communication threads may still be blocked), so a command-line process should end with
    :func:`pronghorn.train.distributed.exit_now` rather than a normal interpreter exit."""

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


_UNSET = object()


def cli_flag(name: str) -> str:
    """The CLI flag of a setting: ``learning_rate`` -> ``--learning-rate``."""
    return "--" + name.replace("_", "-")


def spell(name: str, value=_UNSET) -> str:
    """A setting as the Python API and the CLI spell it, for hints: ``skip_bad_rows=True (CLI: --skip-bad-rows)``,
    ``overlong='split' (CLI: --overlong split)``, ``learning_rate (CLI: --learning-rate)``."""
    if value is _UNSET:
        return f"{name} (CLI: {cli_flag(name)})"
    if isinstance(value, bool):
        return f"{name}={value} (CLI: {cli_flag(name) if value else '--no-' + cli_flag(name)[2:]})"
    return f"{name}={value!r} (CLI: {cli_flag(name)} {value})"

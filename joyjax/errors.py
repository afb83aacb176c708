"""The user-facing error types: each is raised with a message that names the problem and its fix, and the
``joyjax`` command prints it as one line (``joyjax train: data error: ...``) and exits 1.

This module imports nothing, so any layer (config, data, model, train, convert) can raise these without
pulling in the package.
"""


class JoyjaxError(Exception):
  """Base class: a problem with what the user gave (a config, a path, a file), not a bug in joyjax."""

  kind = "error"


class ConfigError(JoyjaxError, ValueError):
  """A config key is unknown, mistyped or inconsistent with another."""

  kind = "config error"


class DataError(JoyjaxError, ValueError):
  """A data file is missing, unreadable or has a malformed row; the message names file, row and fix."""

  kind = "data error"


class CheckpointError(JoyjaxError, RuntimeError):
  """Base class of checkpoint errors (a missing, corrupt or mismatched checkpoint)."""

  kind = "checkpoint error"


class CheckpointCorruptError(CheckpointError):
  """A finished checkpoint exists but cannot be read."""


class CheckpointMismatchError(CheckpointError, ValueError):
  """The checkpoint's tree or shapes differ from the requested ones."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """No (finished) checkpoint where one was asked for (still the ``FileNotFoundError`` callers caught before)."""


class CheckpointFormatError(CheckpointError, ValueError):
  """A checkpoint file (safetensors) is missing, truncated or malformed."""


class ConversionError(JoyjaxError, ValueError):
  """A tensor is missing, unexpected or mis-shaped, or the Hugging Face config is unsupported."""

  kind = "conversion error"


class NonFiniteError(JoyjaxError, RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""

  kind = "training stopped"

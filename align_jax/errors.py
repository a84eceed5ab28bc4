"""The project's error types: what a user caused and can fix.

`python -m align_jax.main` (and the other entry points) print an `Error` as one line, `error: ...`,
and exit non-zero. Any other exception is a bug, in the project or in a researcher's new code, and
keeps its full traceback. Raise the most specific type; each names the key, file or record at fault.

The types also derive from the built-in type a caller would expect (`ConfigError` is a
`ValueError`, `MissingFileError` a `FileNotFoundError`), so `except ValueError` keeps working.
"""


class Error(Exception):
  """A problem with what the user gave: config, data, files. Printed as one line."""


class ConfigError(Error, ValueError):
  """A config value that is unknown, out of range or inconsistent with another."""


class DataError(Error, ValueError):
  """A data source, file or record that cannot be read or used (names the file and record)."""


class MissingFileError(Error, FileNotFoundError):
  """A file or directory the config names is not there."""


class CheckpointError(Error, ValueError):
  """A checkpoint or run directory that cannot be restored or used."""


class HFDirError(Error, ValueError):
  """A Hugging Face model directory whose config or tensors cannot be used."""


class PlanError(Error, ValueError):
  """An ahead-of-time plan that cannot be made: topology, mesh or batch that do not fit."""


class NonFiniteError(Error, ArithmeticError):
  """A NaN or Inf in a step's loss, gradient norm or updated state (names the step and the newest
  checkpoint, which only ever holds a finite state)."""

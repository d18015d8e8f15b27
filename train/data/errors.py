"""The data pipeline's exceptions: each message names the data set, split,
``data_dir``, feature or file at fault and, where it can, says what to do.
All are run errors (exit code 1, see :mod:`train.errors`)."""

from ..errors import RunError


class UnknownDatasetError(RunError, ValueError):
  """``data.name`` is none of the local data sets (``embedded``,
  ``python_source``) nor a TFDS data set, or is a TFDS set without
  ``data.tokenizer``."""


class DatasetNotPreparedError(RunError, FileNotFoundError):
  """A known TFDS data set with no prepared (array_record) copy in data_dir."""


class SplitNotFoundError(RunError, ValueError):
  """``data.train_split`` or ``data.eval_split`` is not a split of the data."""


class FeatureNotFoundError(RunError, ValueError):
  """``data.text_key`` is not a feature of the data set's examples."""


class TokenizerError(RunError, ValueError):
  """The SentencePiece model does not load or does not fit the model."""


class SplitTooSmallError(RunError, ValueError):
  """A split (or one process's shard of it) holds fewer tokens than a batch."""

"""The data pipeline's exceptions: each message names the data set, split,
``data_dir`` or file at fault and, where it can, says what to do."""


class UnknownDatasetError(ValueError):
  """``data.name`` is neither ``embedded`` nor a TFDS data set name."""


class DatasetNotPreparedError(FileNotFoundError):
  """A known TFDS data set with no prepared (array_record) copy in data_dir."""


class TokenizerError(ValueError):
  """The SentencePiece model does not load or does not fit the model."""


class SplitTooSmallError(ValueError):
  """A split (or one process's shard of it) holds fewer tokens than a batch."""

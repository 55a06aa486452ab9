"""What the project's tfds builders share: array_record files, metadata, manual_dir reading.

The builders are not registered with tfds by name (tfds ships its own ``gsm8k``, and a second
registration of a name is an error at import); get them from `rl_reason.tasks.datasets`, or
read a prepared dataset without any builder class with
``tfds.builder_from_directory(path).as_data_source(split)``.

They write ``array_record`` files, which ``as_data_source`` reads with random access and
without TensorFlow. Text features come back as bytes: `rl_reason.infra.data` decodes them.

Manual-dir builders (`ManualDirBuilder`) read and check every row of every split before they
write anything, so a bad file stops the build before it produces a dataset; the skipped rows
per split are in ``builder.info.metadata["bad_rows"]``, and the files read in
``metadata["source"]`` (both stored in the dataset's ``metadata.json``, so a builder loaded from
the directory has them too).
"""

from __future__ import annotations

import abc
import inspect
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import tensorflow_datasets as tfds
from etils import epath

from rl_reason.tasks import manual_files
from rl_reason.tasks.bad_rows import DEFAULT_MAX_BAD_FRACTION, BadRows, check_max_bad_fraction

log = logging.getLogger(__name__)

Example = dict[str, Any]


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A GeneratorBasedBuilder writing array_record, with a metadata dict.

    Subclasses set ``DESCRIPTION``/``HOMEPAGE`` and implement ``_features``.
    """

    DESCRIPTION: ClassVar[str] = ""
    HOMEPAGE: ClassVar[str | None] = None

    def __init__(self, *, file_format: str = "array_record", **kwargs: Any):
        super().__init__(file_format=file_format, **kwargs)

    # tfds's own code_path (used only to look for a checksums file) needs the importlib_resources
    # backport for classes defined in a package; the plain file path serves the same purpose.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))

    @abc.abstractmethod
    def _features(self) -> tfds.features.FeaturesDict: ...

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=self._features(),
            homepage=self.HOMEPAGE,
            metadata=tfds.core.MetadataDict(),
        )


class ManualDirBuilder(Builder, skip_registration=True):
    """Builds from files the user downloaded (see `manual_files`).

    Subclasses set ``LAYOUTS`` (tried in order), ``DOWNLOAD`` (where to get the files) and
    implement ``parse_row(row, where, source)`` returning ``(example, None)`` or
    ``(None, reason)``.

    Args:
      manual_dir: the directory with the files; default: tfds's ``DownloadConfig.manual_dir``
        (itself defaulting to ``<data_dir>/downloads/manual``).
      max_bad_fraction: the build fails when a split has a larger share of malformed rows.
    """

    LAYOUTS: ClassVar[tuple[manual_files.Layout, ...]] = ()
    DOWNLOAD: ClassVar[str] = ""

    def __init__(
        self,
        *,
        manual_dir: str | Path | None = None,
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
        **kwargs: Any,
    ):
        self._user_manual_dir = None if manual_dir is None else Path(manual_dir)
        self._max_bad_fraction = check_max_bad_fraction(max_bad_fraction)
        super().__init__(**kwargs)

    @classmethod
    def manual_download_instructions(cls) -> str:
        expected = "; or ".join(layout.description for layout in cls.LAYOUTS)
        return f"Put {expected} in the manual_dir. Download: {cls.DOWNLOAD}"

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if cls.LAYOUTS:
            cls.MANUAL_DOWNLOAD_INSTRUCTIONS = cls.manual_download_instructions()

    @abc.abstractmethod
    def parse_row(self, row: Any, where: str, source: str) -> tuple[Example | None, str | None]:
        """One file row -> ``(example, None)`` or ``(None, reason)``; ``source`` is the row's
        file relative to the manual_dir."""

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = self._user_manual_dir
        if root is None:
            # tfds's default location; its own accessor raises a bare AssertionError when empty.
            root = getattr(dl_manager, "_manual_dir", None)
        if root is not None:
            root = Path(root).expanduser().absolute()
        layout, files = manual_files.find_layout(self.name, root, self.LAYOUTS, self.DOWNLOAD)
        log.info("%s: reading %s from %s", self.name, layout.description, root)
        self.info.metadata["source"] = {
            "manual_dir": str(root),
            "layout": layout.description,
            "files": {
                split: [p.relative_to(root).as_posix() for p in paths]
                for split, paths in files.items()
            },
        }
        examples = {
            split: self._read_split(split, paths, layout, root) for split, paths in files.items()
        }
        return {
            split: self._generate_examples(split_examples)
            for split, split_examples in examples.items()
        }

    def _read_split(
        self, split: str, paths: list[Path], layout: manual_files.Layout, root: Path
    ) -> list[tuple[str, Example]]:
        counter = BadRows(f"{self.name} {split} (files in {root})", self._max_bad_fraction)
        examples = []
        for path in paths:
            source = path.relative_to(root).as_posix()
            for where, row, reason in manual_files.read_rows(path, layout.format, root):
                example = None
                if reason is None:
                    example, reason = self.parse_row(row, where, source)
                if example is None:
                    counter.skip(where, reason or "unusable row")
                else:
                    counter.keep()
                    examples.append((where, example))
        counter.check()
        self.info.metadata.setdefault("bad_rows", {})[split] = counter.report()
        return examples

    def _generate_examples(
        self, examples: list[tuple[str, Example]]
    ) -> Iterator[tuple[str, Example]]:
        yield from examples


def bad_row_report(builder: tfds.core.DatasetBuilder) -> dict[str, dict[str, Any]]:
    """Split -> ``BadRows.report()`` of a prepared builder (``{}`` for synthetic datasets)."""
    metadata = builder.info.metadata or {}
    return dict(metadata.get("bad_rows", {}))

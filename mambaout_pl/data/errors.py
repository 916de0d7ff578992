"""Errors a user can cause with the data they point at; each message says what to change."""

from __future__ import annotations


class DataError(Exception):
    """A problem with the data a user pointed at; the message says what to change."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A dataset, folder or file that does not exist or cannot be reached."""


class SplitNotFoundError(DataError, ValueError):
    """A split the configuration asks for that the dataset does not have."""


class ColumnNotFoundError(DataError, ValueError):
    """A column the configuration asks for that the dataset does not have."""


class InvalidLabelError(DataError, ValueError):
    """A label that is missing, not an integer, or outside [0, num_classes)."""


class CorruptImageError(DataError, OSError):
    """An image that cannot be decoded."""


class AnnotationFormatError(DataError, ValueError):
    """An annotation file or objects column whose fields do not follow its format (COCO's)."""

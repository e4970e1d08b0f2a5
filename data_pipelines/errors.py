"""``DataError``: data on disk that cannot be used, with one line naming the file or folder."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Data that cannot be used as found on disk: a missing, unreadable or misplaced folder or
    file, or an image no loader can decode. The message is one line that names the path (and
    the flag, ``--data-dir``) and says what to do; raised when the loaders are built, by the
    pre-flight (``check_loaders``), and by the ImageNet loaders while they iterate (training
    or evaluation, in the main process, whatever failed in a DataLoader worker or in DALI).
    A ``ValueError``, so callers that report bad input catch it too."""

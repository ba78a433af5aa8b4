"""The one error type the training code raises for bad input or an unrecoverable state."""

from __future__ import annotations


class TrainingError(Exception):
    """A problem the user can fix (bad flag, missing folder, unreadable data, non-finite loss).

    The script turns it into a one-line message on stderr and a non-zero exit, never a traceback.
    """

"""Exceptions with messages meant for the user: each names the problem and the file or value."""

from __future__ import annotations


class AbdomenKDSegError(Exception):
    """Base class of every error the engine raises on purpose."""


class InputError(AbdomenKDSegError, ValueError):
    """The input image (or path) cannot be segmented: missing, unreadable, wrong shape or values."""


class BundleError(AbdomenKDSegError):
    """A model bundle is missing, corrupt, or does not match the expected architecture."""


class UsageError(AbdomenKDSegError, ValueError):
    """A call or command was given an invalid argument (organ name, thread count, output path that
    cannot be written or would replace an existing file); raised before any image is read.
    The command line exits with code 2 for it."""

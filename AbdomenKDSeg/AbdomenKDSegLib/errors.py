"""Exceptions with messages meant for the user: each names the problem and the file or value."""

from __future__ import annotations


class AbdomenKDSegError(Exception):
    """Base class of every error the engine raises on purpose."""


class InputError(AbdomenKDSegError, ValueError):
    """The input image (or path) cannot be segmented: missing, unreadable, wrong shape or values."""


class BundleError(AbdomenKDSegError):
    """A model bundle is missing, corrupt, or does not match the expected architecture."""

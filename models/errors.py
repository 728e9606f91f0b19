"""The project's own exceptions: what a user can cause, said in words a user can act on.

Every layer raises these (never a bare torch or PyAV error) for bad images, audio, configs and
paths, so the CLI prints one line and the service answers with a clear status.
"""

from __future__ import annotations


class DiffstreamError(Exception):
    """Base of every error a user can cause or fix."""


class InvalidImageError(DiffstreamError):
    """The reference image cannot be read or has an unusable size."""


class InvalidAudioError(DiffstreamError):
    """Audio cannot be decoded, is empty, or is declared with impossible parameters."""


class ModelNotFoundError(DiffstreamError):
    """A model name or path that does not exist."""


class ConfigError(DiffstreamError):
    """A model or pipeline configuration whose sizes are inconsistent."""


class SessionError(DiffstreamError):
    """A session that does not exist, has ended, or was ended by a failed worker."""


class ExecutorError(DiffstreamError):
    """A worker died, hung past its timeout, or the executor is shut down."""

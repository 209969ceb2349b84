"""The one error type a session raises back at a client request."""

from __future__ import annotations


class SessionInputError(ValueError):
    """A client request the session cannot take.

    Attributes:
        code: the protocol error code (``utterance_ended``, ``utterance_too_long``,
            ``unknown_utterance``, ``invalid_field``, ``recording_active``, ``no_recording``).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

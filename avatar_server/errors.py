"""The error the server raises for a client request it cannot take: the protocol's error code,
a message, and the field and limit it concerns as fields (sent as they are in the ``error``
frame; never parsed back out of the message)."""

from __future__ import annotations

from streaming.session import SessionInputError


class ClientError(SessionInputError):
    """A client request the server refuses.

    Args:
        code: the protocol error code (:class:`~avatar_server.protocol.ErrorCode`).
        message: what is wrong, for people; names the field and the limit.
        field: the message field at fault (``"text"``, ``"sdp"``...), if one is.
        limit: the setting the request broke (``"max_text_chars"``...), if one did.
    """

    def __init__(self, code: str, message: str, *, field: str | None = None, limit: str | None = None) -> None:
        super().__init__(code, message)
        self.field = field
        self.limit = limit

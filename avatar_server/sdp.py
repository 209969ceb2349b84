"""Checks of a client's SDP offer before aiortc applies it, on aiortc's own SDP parser
(:meth:`aiortc.sdp.SessionDescription.parse`; SDP: RFC 8866, its WebRTC use: RFC 8829).

What is refused, and why (each refusal is a :class:`~avatar_server.limits.LimitError` with
``field="sdp"``; its message names the limit where one applies):

* over ``max_sdp_bytes`` (``sdp_too_large``), or not SDP text: a first line other than
  ``v=0``, a line not of the form ``<letter>=<value>``, control characters (``bad_sdp``);
* what aiortc's parser cannot read (it raises assorted exceptions on bad input);
* other than one video and at most one audio section, over ``max_sdp_media_sections``;
* a section without exactly one ``a=mid``, two sections with one mid, a ``BUNDLE`` group that
  names a mid no section has (aiortc half-applies such an offer and then cannot close it), and
  a section without ICE credentials, a DTLS role (``a=setup``) or a DTLS fingerprint (aiortc's DTLS transport asserts on
  it in a task of its own).
"""

from __future__ import annotations

from aiortc.sdp import SessionDescription

from avatar_server.limits import LimitError
from avatar_server.settings import Limits

_PARSER_ERRORS = (AssertionError, ValueError, KeyError, IndexError, StopIteration, TypeError, AttributeError)


def _bad(message: str, *, limit: str | None = None) -> LimitError:
    return LimitError("bad_sdp", f"sdp: {message}", field="sdp", limit=limit)


def _check_text(sdp: str, limits: Limits) -> list[int]:
    """The syntactic checks; returns the number of ``a=mid`` lines of each media section."""
    size = len(sdp.encode("utf-8", "surrogatepass"))
    if size > limits.max_sdp_bytes:
        raise LimitError(
            "sdp_too_large",
            f"sdp: {size} bytes; the limit is max_sdp_bytes = {limits.max_sdp_bytes}",
            field="sdp",
            limit="max_sdp_bytes",
        )
    lines = [line.rstrip("\r") for line in sdp.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    if not lines or lines[0] != "v=0":
        raise _bad("not a session description (the first line must be v=0)")
    mids_per_section: list[int] = []
    for number, line in enumerate(lines, start=1):
        if len(line) < 2 or line[1] != "=" or not ("a" <= line[0] <= "z"):
            raise _bad(f"line {number} is not of the form <letter>=<value>")
        if any(ord(ch) < 32 and ch != "\t" for ch in line):
            raise _bad(f"line {number} has control characters")
        if line.startswith("m="):
            mids_per_section.append(0)
        elif line.startswith("a=mid:") and mids_per_section:
            mids_per_section[-1] += 1
    return mids_per_section


def check_offer(sdp: str, limits: Limits) -> SessionDescription:
    """The parsed offer, if the server may apply it (module docstring).

    Args:
        sdp: the ``webrtc.offer`` SDP text.
        limits: ``max_sdp_bytes``, ``max_sdp_media_sections``.

    Raises:
        LimitError: ``sdp_too_large`` or ``bad_sdp``.
    """
    mids_per_section = _check_text(sdp, limits)
    limit = limits.max_sdp_media_sections
    if len(mids_per_section) > limit:  # before parsing: the parser's work grows with it
        raise _bad(
            f"{len(mids_per_section)} media sections; the limit is max_sdp_media_sections = {limit}",
            limit="max_sdp_media_sections",
        )
    try:
        description = SessionDescription.parse(sdp)
    except _PARSER_ERRORS as exc:
        raise _bad(f"not an offer aiortc can read ({type(exc).__name__})") from None
    media = description.media
    kinds = [section.kind for section in media]
    others = sorted({kind for kind in kinds if kind not in ("audio", "video")})
    if others:
        raise _bad(f"media {', '.join(others)[:64]!r} not allowed; only audio and video")
    if kinds.count("video") != 1 or kinds.count("audio") > 1:
        raise _bad("the offer needs one video section and at most one audio section")
    mids = [section.rtp.muxId for section in media]
    if any(count != 1 for count in mids_per_section) or len(set(mids)) != len(mids):
        raise _bad("every media section needs one a=mid, each different")
    bundled = {item for group in description.group if group.semantic == "BUNDLE" for item in group.items}
    if not bundled <= set(mids):
        raise _bad("a=group:BUNDLE names a mid that no media section has")
    for section in media:
        missing = [
            name
            for name, present in (
                ("setup", section.dtls is not None),  # aiortc drops the DTLS parameters without a=setup
                ("fingerprint", section.dtls is None or bool(section.dtls.fingerprints)),
                ("ice-ufrag", bool(section.ice and section.ice.usernameFragment)),
                ("ice-pwd", bool(section.ice and section.ice.password)),
            )
            if not present
        ]
        if missing:
            raise _bad(f"a media section lacks {', '.join(missing)} (not a WebRTC offer)")
    return description

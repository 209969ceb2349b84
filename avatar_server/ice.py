"""Remote ICE candidate policy: which addresses a client may make the server send STUN to.

Every remote candidate of an offer becomes a target of ICE connectivity checks (RFC 8445
section 6.1.4: the server sends STUN Binding requests to each pair, with retransmissions).
Left unchecked, a client can point the server at link-local services (169.254.169.254),
private networks, broadcast or multicast addresses, and with hundreds of candidates make it
send thousands of packets; an ``.local`` (mDNS) candidate makes aioice open a wildcard UDP
socket on port 5353 to resolve it (draft-ietf-mmusic-mdns-ice-candidates).

:func:`filter_offer` removes the refused ``a=candidate`` lines from an offer before aiortc
sees it. The offer is read with aiortc's own SDP parser, so the candidates judged are the
ones aiortc would use; every other line is kept byte for byte. The protocol has no trickle
ICE (candidates only arrive inside ``webrtc.offer``), so this is the only place they enter.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

# aiortc and aioice are imported inside the functions that use them: avatar_server.settings
# imports this module for IceCandidatePolicy, and `avatar-server --help` must stay light.

AddressClass = Literal[
    "loopback", "private", "public", "reserved", "link_local", "multicast", "broadcast", "unspecified"
]
"""Address classes of a remote candidate's connection address (``ipaddress`` properties;
``private`` includes RFC 1918, RFC 6598 shared address space 100.64.0.0/10 and IPv6 ULA fc00::/7;
``reserved`` is what is neither global nor any other class, e.g. 240.0.0.0/4)."""

RefusalReason = Literal[
    "loopback",
    "private",
    "public",
    "reserved",
    "link_local",
    "multicast",
    "broadcast",
    "unspecified",
    "mdns",
    "hostname",
    "protocol",
    "too_many",
    "malformed",
]
"""Why a candidate was dropped: its address class (not allowed), ``mdns`` (an ``.local`` name
with mDNS resolution off), ``hostname`` (any other name: the server would have to resolve it),
``protocol`` (not UDP: aioice pairs UDP only), ``too_many`` (over ``max_remote_candidates``),
``malformed`` (a session-level line aiortc would skip and cannot parse)."""

DEFAULT_ALLOWED: tuple[AddressClass, ...] = ("loopback", "private", "public")
LOOPBACK_ALLOWED: tuple[AddressClass, ...] = ("loopback",)
_SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598 (carrier-grade NAT)


class IceCandidatePolicy(BaseModel):
    """Which remote ICE candidates an offer may carry (settings group ``webrtc.ice_policy``).

    ``allowed_address_classes`` unset means: ``loopback`` only on a server bound to a loopback
    host, else ``loopback``, ``private`` and ``public`` (never link-local, multicast, broadcast,
    unspecified or reserved addresses). Resolve it with :meth:`for_host_addresses` (or
    :meth:`for_host`) before filtering.
    """

    allowed_address_classes: list[AddressClass] | None = Field(
        None,
        description=(
            "address classes remote ICE candidates may have; default: loopback on a loopback-bound "
            "server, else loopback, private and public"
        ),
    )
    max_remote_candidates: int = Field(
        16,
        ge=1,
        le=256,
        description="remote ICE candidates kept per offer (distinct addresses; the rest dropped)",
    )
    mdns: bool = Field(
        False,
        description=(
            "resolve .local (mDNS) remote candidates (opens a UDP socket on port 5353; the resolved "
            "address is not checked against allowed_address_classes); off: they are dropped"
        ),
    )

    def for_host_addresses(self, addresses: Sequence[str] | None) -> IceCandidatePolicy:
        """This policy with ``allowed_address_classes`` filled in for a server whose ICE host
        candidates are ``addresses`` (``None``: every interface): loopback only when each of them
        is a loopback address. What the server offers decides, not the address it binds (a fleet
        replica binds nothing; ``webrtc.host_addresses`` may name a public address)."""
        loopback = bool(addresses) and all(
            address_class(address) == "loopback" for address in addresses or ()
        )
        return self.for_host("", loopback=loopback)

    def for_host(self, host: str, *, loopback: bool | None = None) -> IceCandidatePolicy:
        """This policy with ``allowed_address_classes`` filled in for a server bound to ``host``
        (``loopback`` overrides the judgement of ``host``)."""
        if self.allowed_address_classes is not None:
            return self
        if loopback is None:
            loopback = host == "localhost" or _is_loopback_literal(host)
        return self.model_copy(
            update={"allowed_address_classes": list(LOOPBACK_ALLOWED if loopback else DEFAULT_ALLOWED)}
        )


@dataclass(frozen=True)
class CandidateRefusal:
    """One dropped ``a=candidate`` line: ``address`` is its connection address (or name) as
    written, ``media_index`` the 0-based m= section."""

    address: str
    reason: RefusalReason
    media_index: int


def address_class(address: str) -> AddressClass | None:
    """The class of an IP address literal (an IPv4-mapped IPv6 address is judged as its IPv4
    address; an IPv6 zone ``%eth0`` is ignored), or ``None`` if ``address`` is not an IP literal."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        return "unspecified"
    if isinstance(ip, ipaddress.IPv4Address) and ip == ipaddress.IPv4Address("255.255.255.255"):
        return "broadcast"
    if ip.is_multicast:
        return "multicast"
    if ip.is_link_local:
        return "link_local"
    if ip.is_loopback:
        return "loopback"
    if ip.is_global:
        return "public"
    if ip in _SHARED_ADDRESS_SPACE or (ip.is_private and not ip.is_reserved):
        return "private"
    return "reserved"


def filter_offer(sdp: str, policy: IceCandidatePolicy) -> tuple[str, list[CandidateRefusal]]:
    """Drop the remote candidates of ``sdp`` that ``policy`` refuses.

    Kept: UDP candidates whose address is in ``policy.allowed_address_classes`` (unset: the
    non-loopback default; call :meth:`IceCandidatePolicy.for_host` first), and ``.local``
    names when ``policy.mdns`` is on; at most ``policy.max_remote_candidates`` distinct
    (component, address, port) targets, highest ``priority`` first (a repeat of a kept target
    in another m= section, as in a BUNDLE offer, is kept without counting again).

    Returns:
        The offer with refused ``a=candidate`` lines removed (other lines unchanged, line
        ending kept) and one :class:`CandidateRefusal` per removed line, in offer order.

    Raises:
        ValueError: aiortc's parser rejects the offer as a whole (the caller's ``bad_sdp``).
    """
    from aiortc.sdp import SessionDescription, candidate_from_sdp

    allowed = set(policy.allowed_address_classes or DEFAULT_ALLOWED)
    try:
        SessionDescription.parse(sdp)  # what aiortc's setRemoteDescription would do first
    except Exception as exc:  # noqa: BLE001 - the parser asserts and raises what its inputs raise
        raise ValueError(f"sdp: aiortc cannot parse the offer ({type(exc).__name__})") from None

    newline = "\r\n" if "\r\n" in sdp else "\n"
    lines = sdp.split(newline)
    media_index = -1
    judged: list[tuple[int, int, object]] = []  # (line number, media index, candidate) of acceptable lines
    refusals: dict[int, CandidateRefusal] = {}
    for number, line in enumerate(lines):
        if line.startswith("m="):
            media_index += 1
            continue
        if not line.startswith("a=candidate:"):
            continue
        try:
            candidate = candidate_from_sdp(line[len("a=candidate:") :])
        except (AssertionError, ValueError, IndexError):  # a session-level line, which aiortc skips
            refusals[number] = CandidateRefusal(line[12:76], "malformed", media_index)
            continue
        reason = _refusal_reason(candidate.ip, candidate.protocol, allowed, policy.mdns)
        if reason is not None:
            refusals[number] = CandidateRefusal(candidate.ip, reason, media_index)
        else:
            judged.append((number, media_index, candidate))

    kept_targets: set[tuple[int, str, int]] = set()
    for number, index, candidate in sorted(judged, key=lambda item: -item[2].priority):  # type: ignore[attr-defined]
        target = (candidate.component, candidate.ip.lower(), candidate.port)  # type: ignore[attr-defined]
        if target in kept_targets:
            continue
        if len(kept_targets) >= policy.max_remote_candidates:
            refusals[number] = CandidateRefusal(candidate.ip, "too_many", index)  # type: ignore[attr-defined]
            continue
        kept_targets.add(target)

    if not refusals:
        return sdp, []
    kept = [line for number, line in enumerate(lines) if number not in refusals]
    return newline.join(kept), [refusals[number] for number in sorted(refusals)]


def summarize(refusals: Sequence[CandidateRefusal]) -> dict[str, int]:
    """Refusals counted by reason (for one log line: no addresses in it)."""
    counts: dict[str, int] = {}
    for refusal in refusals:
        counts[refusal.reason] = counts.get(refusal.reason, 0) + 1
    return counts


def _refusal_reason(host: str, protocol: str, allowed: set[str], mdns: bool) -> RefusalReason | None:
    from aioice.mdns import is_mdns_hostname

    if protocol.lower() != "udp":
        return "protocol"
    kind = address_class(host)
    if kind is None:
        if is_mdns_hostname(host):  # exactly the names aioice would resolve over mDNS
            return None if mdns else "mdns"
        return "hostname"
    return None if kind in allowed else kind


def _is_loopback_literal(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

"""Checks of a caller's SDP offer that aiortc leaves to the connection attempt.

aiortc applies an offer without DTLS fingerprints or ICE credentials and only fails later, in its connect
task (an unretrieved AssertionError), after the caller has been answered. These checks refuse such an offer
before anything is set up.
"""

from __future__ import annotations

import re

# the digests aiortc's DTLS transport can verify (aiortc.rtcdtlstransport.X509_DIGEST_ALGORITHMS), in bytes
FINGERPRINT_BYTES = {"sha-256": 32, "sha-384": 48, "sha-512": 64}
_HEX_PAIRS = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2})*")
_ICE_CHARS = re.compile(r"[A-Za-z0-9+/]{1,256}")  # RFC 8839 ice-char


def _sections(sdp: str) -> list[list[str]]:
    """The session part and each media section of `sdp`, as lists of stripped lines."""
    sections: list[list[str]] = [[]]
    for raw in sdp.splitlines():
        line = raw.strip()
        if line.startswith("m="):
            sections.append([])
        sections[-1].append(line)
    return sections


def _values(lines: list[str], attribute: str) -> list[str]:
    prefix = f"a={attribute}:"
    return [line[len(prefix) :].strip() for line in lines if line.startswith(prefix)]


def _fingerprints_ok(values: list[str]) -> bool:
    """At least one fingerprint with a supported hash, and every one with a supported hash well formed."""
    known = 0
    for value in values:
        parts = value.split()
        if len(parts) != 2:
            return False
        size = FINGERPRINT_BYTES.get(parts[0].lower())
        if size is None:
            continue  # another hash may stand beside a supported one (RFC 8122)
        if not _HEX_PAIRS.fullmatch(parts[1]) or len(parts[1]) != 3 * size - 1:
            return False
        known += 1
    return known > 0


def offer_problem(sdp: str) -> str | None:
    """Why the offer cannot make a DTLS-SRTP call, or None.

    Every media section needs `a=fingerprint` with a supported hash and `a=ice-ufrag`/`a=ice-pwd`, its own
    or the session level's.
    """
    session, *media = _sections(sdp)
    if not media:
        return "the offer has no media section"
    for index, section in enumerate(media):
        fingerprints = _values(section, "fingerprint") or _values(session, "fingerprint")
        if not _fingerprints_ok(fingerprints):
            supported = ", ".join(FINGERPRINT_BYTES)
            return f"media section {index} has no valid a=fingerprint with a supported hash ({supported})"
        for attribute in ("ice-ufrag", "ice-pwd"):
            values = _values(section, attribute) or _values(session, attribute)
            if not values or not _ICE_CHARS.fullmatch(values[0]):
                return f"media section {index} has no valid a={attribute}"
    return None

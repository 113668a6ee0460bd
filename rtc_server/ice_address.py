"""`rtc.public_address`: the address callers reach this host at, advertised in every SDP answer.

A host behind a 1:1 NAT (a cloud VM, a cluster node with a public IP in front of its private one) gathers only
its private addresses. For each IPv4 host candidate of the answer, a server-reflexive candidate with the public
address and the same port is added (RFC 8445 5.1.1.2: the NAT forwards that port to the private one), at a
lower priority so that callers on the same network still use the host candidate.
"""

from __future__ import annotations

import ipaddress


def advertise(sdp: str, public_address: str) -> str:
    """`sdp` with a srflx candidate at `public_address` after each IPv4 host candidate (unchanged when empty)."""
    if not public_address:
        return sdp
    out: list[str] = []
    newline = "\r\n" if "\r\n" in sdp else "\n"
    for line in sdp.split(newline):
        out.append(line)
        extra = _reflexive(line, public_address)
        if extra is not None:
            out.append(extra)
    return newline.join(out)


def _reflexive(line: str, public_address: str) -> str | None:
    if not line.startswith("a=candidate:"):
        return None
    fields = line[len("a=candidate:") :].split()
    # foundation component transport priority address port "typ" type ...
    if len(fields) < 8 or fields[6] != "typ" or fields[7] != "host" or fields[4] == public_address:
        return None
    try:
        if ipaddress.ip_address(fields[4]).version != 4:
            return None
        priority = int(fields[3])
    except ValueError:
        return None
    foundation, component, transport, address, port = fields[0], fields[1], fields[2], fields[4], fields[5]
    # srflx type preference (100) instead of host's (126): the same local preference and component
    reflexive_priority = max(priority - (26 << 24), 1)
    return (
        f"a=candidate:{foundation}p {component} {transport} {reflexive_priority} {public_address} {port} "
        f"typ srflx raddr {address} rport {port}"
    )

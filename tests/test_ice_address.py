"""`rtc.public_address`: a server-reflexive candidate at the public address beside each IPv4 host candidate."""

from __future__ import annotations

from aiortc.sdp import candidate_from_sdp

from rtc_server.ice_address import advertise

ANSWER = (
    "v=0\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
    "a=candidate:abc 1 udp 2130706431 10.0.0.5 40001 typ host\r\n"
    "a=candidate:def 1 udp 2130706431 fd00::5 40002 typ host\r\n"
    "a=candidate:ghi 1 udp 1694498815 198.51.100.1 40003 typ srflx raddr 10.0.0.5 rport 40003\r\n"
    "a=end-of-candidates\r\n"
)


def test_public_address_is_offered_with_the_host_candidates_ports() -> None:
    out = advertise(ANSWER, "203.0.113.7")
    lines = out.split("\r\n")
    added = [line for line in lines if "203.0.113.7" in line]
    assert len(added) == 1, out  # the IPv6 host and the existing srflx candidate get none
    assert (
        lines.index(added[0]) == lines.index("a=candidate:abc 1 udp 2130706431 10.0.0.5 40001 typ host") + 1
    )
    candidate = candidate_from_sdp(added[0][len("a=candidate:") :])
    assert (candidate.ip, candidate.port, candidate.type) == ("203.0.113.7", 40001, "srflx")
    assert (candidate.relatedAddress, candidate.relatedPort) == ("10.0.0.5", 40001)
    assert 0 < candidate.priority < 2130706431  # below the host candidate: callers on the LAN keep using it
    assert candidate.foundation != "abc"
    assert advertise(ANSWER, "") == ANSWER
    assert advertise(ANSWER, "10.0.0.5") == ANSWER  # already the host's own address

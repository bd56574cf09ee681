"""Audit: encodings of inward addresses that a naive check misses, refused before
any connection (in-process, under the loopback-only guard)."""

from __future__ import annotations

import pytest

from tests.enhancement.test_images import refused


@pytest.mark.parametrize(
    "url",
    [
        "http://2130706433/",  # 127.0.0.1 as one decimal number
        "http://0x7f000001/",  # hexadecimal
        "http://0177.0.0.1/",  # octal
        "http://0x7f.1/",  # short hexadecimal form
        "http://127.1/",  # short form
        "http://2852039166/latest/meta-data/",  # 169.254.169.254 in decimal
        "http://0251.0376.0251.0376/",  # 169.254.169.254 in octal
        "http://[::ffff:7f00:1]/",  # IPv4-mapped, hex groups
        "http://[::ffff:169.254.169.254]/",
        "http://[0:0:0:0:0:ffff:a9fe:a9fe]/",
        "http://[::127.0.0.1]/",  # IPv4-compatible (deprecated)
        "http://[2002:7f00:1::]/",  # 6to4 of 127.0.0.1
        "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of 169.254.169.254
        "http://[fd00:ec2::254]/",  # AWS metadata over IPv6
        "http://[fe80::1%25eth0]/",  # link-local with a zone
        "http://[::]/",
        "http://LOCALHOST./",  # case and trailing dot
        "http://user:pw@127.0.0.1:6379/",  # credentials in the authority
    ],
)
async def test_inward_encodings_refused(url: str, loopback_only: list) -> None:
    error = await refused(url)
    assert error.code == "unsafe_url", error
    assert loopback_only == []

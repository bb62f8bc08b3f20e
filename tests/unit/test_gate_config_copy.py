"""``[limits] copy_bytes`` and ``copy_files``: the caps on one relayed copy."""

from __future__ import annotations

import pytest

from qubes_mcp.dom0.config import parse_config
from qubes_mcp.dom0.errors import ConfigError

BASE = '[[principal]]\nqube = "mcp-control"\n'


def test_defaults() -> None:
    limits = parse_config(BASE).limits
    assert (limits.copy_bytes, limits.copy_files) == (1 << 30, 10_000)


@pytest.mark.parametrize(
    ("text", "expected"),
    [('copy_bytes = "64KiB"', 65536), ("copy_bytes = 1", 1), ('copy_bytes = "1TiB"', 1 << 40)],
)
def test_copy_bytes_is_a_size(text: str, expected: int) -> None:
    assert parse_config(BASE + "[limits]\n" + text + "\n").limits.copy_bytes == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("copy_bytes = 0", "limits.copy_bytes must be positive"),
        ('copy_bytes = "2TiB"', "limits.copy_bytes must be at most 1TiB"),
        ('copy_bytes = "lots"', "limits.copy_bytes must be bytes or a size"),
        ("copy_bytes = true", "limits.copy_bytes must be a size"),
        ("copy_files = 0", "limits.copy_files must be between 1 and 1000000"),
        ("copy_files = 1000001", "limits.copy_files must be between 1 and 1000000"),
        ('copy_files = "9"', "limits.copy_files must be an integer"),
        ("copy_file = 9", "unknown key 'copy_file'"),
    ],
)
def test_mistakes_are_named(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(BASE + "[limits]\n" + text + "\n")
    assert problem in str(caught.value)

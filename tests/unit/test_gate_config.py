"""The operator's configuration: every mistake is a clear error, and the gate refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from qubes_mcp.dom0.config import load_config, parse_config
from qubes_mcp.dom0.errors import ConfigError, UnavailableError
from qubes_mcp.dom0.tiers import Tier
from tests.gate_fixtures import CONFIG_TEXT

MINIMAL = '[[principal]]\nqube = "mcp-control"\n'


def test_minimal_config_has_safe_defaults() -> None:
    cfg = parse_config(MINIMAL)
    p = cfg.principals["mcp-control"]
    assert (p.scope.prefix, p.ceiling, p.name_prefix, p.may_create) == (
        "ai",
        Tier.FULL,
        "ai-",
        False,
    )
    assert cfg.default_tier is Tier.READ
    assert cfg.egress_qube is None
    assert cfg.budget.pool_cap == 64 << 30
    assert cfg.paths.qubesd_socket == Path("/var/run/qubesd.sock")


def test_full_example_parses() -> None:
    cfg = parse_config(CONFIG_TEXT)
    assert set(cfg.principals) == {"mcp-control", "auditor"}
    assert cfg.budget.private_cap == 4 << 30
    assert cfg.consent.guarded == {"ai-precious"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "at least one [[principal]]"),
        ("default_tier = 'root'\n" + MINIMAL, "not a tier"),
        ("defualt_tier = 'read'\n" + MINIMAL, "unknown key 'defualt_tier'"),
        (MINIMAL + "[budget]\nprivate_capp = 1\n", "unknown key 'private_capp'"),
        (MINIMAL + "[budget]\npool_cap = '5 PB'\n", "budget.pool_cap"),
        (MINIMAL + "[budget]\npool_cap = -1\n", "budget.pool_cap must be positive"),
        (MINIMAL + "[budget]\nmax_qubes = true\n", "budget.max_qubes must be an integer"),
        (MINIMAL + "[budget]\ndefault_private = '30GiB'\n", "default_private is above"),
        (MINIMAL + "[consent]\ntimeout = 0\n", "consent.timeout must be between"),
        (MINIMAL + "[consent]\noperations = ['qube.explode']\n", "unknown operation"),
        (MINIMAL + "[consent]\ndialog = 'zenity --question'\n", "a command, no shell"),
        (MINIMAL + "[consent]\ndialog = ['zenity', '--question']\n", "absolute path"),
        (MINIMAL + "[paths]\naudit_log = 'relative.log'\n", "absolute path"),
        ('[[principal]]\nqube = "dom0"\n', "not dom0"),
        ('[[principal]]\nqube = "x\\n"\n', "qube must be a qube name"),
        ('[[principal]]\nqube = "a"\nscope = "AI"\n', "scope must match"),
        ('[[principal]]\nqube = "a"\nname_prefix = ""\n', "name_prefix"),
        ('[[principal]]\nqube = "a"\nceiling = "admin"\n', "not a tier"),
        ('[[principal]]\nqube = "a"\nmay_create = "yes"\n', "may_create"),
        ('[[principal]]\nqube = "a"\nsudo = true\n', "unknown key 'sudo'"),
        (MINIMAL + MINIMAL, "configured twice"),
        ("egress_qube = 'mcp-control'\n" + MINIMAL, "egress_qube cannot be"),
        ("[[principal\n", "not valid TOML"),
    ],
)
def test_mistakes_are_named(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert problem in str(info.value)


def test_a_config_error_is_an_unavailable_refusal_for_the_agent() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("")
    assert isinstance(info.value, UnavailableError)
    assert info.value.to_reply() == {
        "ok": False,
        "error": {"code": "unavailable", "message": "qubes-mcp gate is unavailable"},
    }


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_each_calling_qube_gets_bounded_shares_by_default() -> None:
    limits = parse_config(MINIMAL).limits
    assert (limits.concurrent_requests, limits.open_requests, limits.request_read_timeout) == (
        16,
        64,
        5,
    )


@pytest.mark.parametrize(
    ("limits", "problem"),
    [
        ("open_requests = 0", "limits.open_requests must be between 1 and 1024"),
        ("request_read_timeout = 0", "limits.request_read_timeout must be between 1 and 60"),
        ("request_read_timeout = 3600", "limits.request_read_timeout must be between 1 and 60"),
        (
            "open_requests = 4\nconcurrent_requests = 8",
            "limits.open_requests is below limits.concurrent_requests",
        ),
    ],
)
def test_share_limits_out_of_range_are_refused(limits: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_config(f"{MINIMAL}\n[limits]\n{limits}\n")

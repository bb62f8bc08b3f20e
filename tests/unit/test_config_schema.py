"""One declarative table of configuration keys (``config_schema.SCHEMA``) feeds both the parser
and docs/configuration.md; these tests fail when the two could drift."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from qubes_mcp.dom0 import config as cfg
from qubes_mcp.dom0.config_schema import SCHEMA, SECTIONS, Key, keys
from qubes_mcp.dom0.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PRINCIPAL = '[[principal]]\nqube = "mcp-control"\n'
OBJECTS = {
    "principal": cfg.Principal,
    "budget": cfg.Budget,
    "consent": cfg.Consent,
    "limits": cfg.Limits,
    "paths": cfg.Paths,
}


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


def parsed(config: cfg.GateConfig, key: Key) -> Any:
    if key.section == "":
        return getattr(config, key.name)
    if key.section == "principal":
        return getattr(config.principals["mcp-control"], key.name)
    return getattr(getattr(config, key.section), key.name)


def normal(value: object) -> object:
    if isinstance(value, (frozenset, tuple)):
        return sorted(value)  # type: ignore[type-var]
    if isinstance(value, Path):
        return str(value)
    word = getattr(value, "word", None)  # a Tier
    if isinstance(word, str):
        return word
    prefix = getattr(value, "prefix", None)  # a Scope
    return prefix if isinstance(prefix, str) else value


def test_generated_doc_is_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location(
        "gen_config_doc", ROOT / "tools/gen_config_doc.py"
    )
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    sys.modules["gen_config_doc"] = gen
    spec.loader.exec_module(gen)
    assert gen.OUT.read_text(encoding="utf-8") == gen.render(), (
        "docs/configuration.md is stale: run python tools/gen_config_doc.py"
    )
    text = gen.OUT.read_text(encoding="utf-8")
    for key in SCHEMA:
        assert f"| `{key.name}` |" in text


def test_every_section_field_has_exactly_one_schema_key() -> None:
    for section, klass in OBJECTS.items():
        assert [f.name for f in dataclasses.fields(klass)] == list(keys(section)), section
    # where it was read from and its digest describe the file, not a setting
    top = {f.name for f in dataclasses.fields(cfg.GateConfig)} - {"source", "digest", "principals"}
    assert top == set(keys("")) | {s for s in SECTIONS if s and s != "principal"}


def test_the_defaults_are_what_the_parser_uses() -> None:
    config = cfg.parse_config(PRINCIPAL)
    for key in SCHEMA:
        if key.default is None or key.derived:
            continue
        assert normal(parsed(config, key)) == normal(key.default), key.name
    assert config.egress_qube is None
    assert config.principals["mcp-control"].name_prefix == "ai-"  # derived from the scope


def test_every_key_written_with_its_default_parses_to_the_same_config() -> None:
    lines = [
        f"{k.name} = {toml_value(k.default)}"
        for k in SCHEMA
        if k.section == "" and k.default is not None
    ]
    lines.append(PRINCIPAL.strip())
    lines += [
        f"{k.name} = {toml_value(k.default)}"
        for k in SCHEMA
        if k.section == "principal" and k.default is not None
    ]
    for section in SECTIONS[2:]:
        lines.append(f"[{section}]")
        lines += [f"{k.name} = {toml_value(k.default)}" for k in SCHEMA if k.section == section]
    assert cfg.parse_config("\n".join(lines)) == cfg.parse_config(PRINCIPAL)


@pytest.mark.parametrize("key", [k for k in SCHEMA if k.bounds is not None], ids=lambda k: k.name)
def test_bounds_are_enforced_exactly(key: Key) -> None:
    assert key.bounds is not None
    low, high = key.bounds

    # a key bound to another by a rule of config.py gets that other key out of the way
    companion = {
        "limits.concurrent_requests": "open_requests = 1024\n",
        "limits.open_requests": "concurrent_requests = 1\n",
    }.get(f"{key.section}.{key.name}", "")

    def text(value: int) -> str:
        return f"{PRINCIPAL}[{key.section}]\n{key.name} = {value}\n{companion}"

    for ok in (low, high):
        cfg.parse_config(text(ok))
    for bad in (low - 1, high + 1):
        with pytest.raises(ConfigError, match=f"{key.section}.{key.name} must be between"):
            cfg.parse_config(text(bad))


@pytest.mark.parametrize("section", [s for s in SECTIONS if s not in ("", "principal")])
def test_a_key_outside_the_schema_is_refused(section: str) -> None:
    with pytest.raises(ConfigError, match="unknown key 'no_such_key'"):
        cfg.parse_config(f"{PRINCIPAL}[{section}]\nno_such_key = 1\n")


def test_a_removed_key_says_what_replaced_it() -> None:
    """An upgraded dom0 keeps its old config.toml: a key the gate no longer reads is refused
    with the name of what replaced it, not as an unknown word."""
    with pytest.raises(ConfigError, match=r"'qvm_run' is no longer a setting: .*qrexec_client"):
        cfg.parse_config(f'{PRINCIPAL}[paths]\nqvm_run = "/usr/bin/qvm-run"\n')

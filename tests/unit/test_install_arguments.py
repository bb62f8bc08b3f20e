"""``install``'s flags: a bad name is refused before anything is written, and every operator
subcommand accepts ``--root`` (so the same command line drives an emulator's root)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qubes_mcp.dom0.errors import InvalidInputError
from qubes_mcp.dom0.operator import cli
from qubes_mcp.dom0.operator.install import install


@pytest.mark.parametrize(
    ("flag", "value"),
    [("principal", "bad name!"), ("principal", "dom0"), ("egress", "-x"), ("principal", "")],
)
def test_a_bad_name_is_refused_before_anything_is_written(
    tmp_path: Path, flag: str, value: str
) -> None:
    root = tmp_path / "root"
    with pytest.raises(InvalidInputError, match=f"--{flag}"):
        install(root, **{flag: value})  # type: ignore[arg-type]
    assert not root.exists()


def test_the_cli_refuses_it_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["install", "--root", str(tmp_path), "--principal", "bad name!"]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("qubes-mcp-admin: error: --principal 'bad name!'") and err.count("\n") == 1
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["pending"],
        ["show", "7"],
        ["approve", "7"],
        ["deny", "7"],
        ["enrol", "work"],
        ["unenrol", "work"],
        ["tier", "work", "exec"],
        ["install"],
        ["uninstall"],
        ["status"],
        ["doctor"],
    ],
)
def test_every_operator_subcommand_takes_root(argv: list[str]) -> None:
    args = cli.build_parser().parse_args([*argv, "--root", "/srv/emu"])
    assert args.root == "/srv/emu"

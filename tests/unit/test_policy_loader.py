"""Loading policy directories: names, order, precedence, directives, caps (reference §5.1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qubes_mcp.policy import AllowAction, DenyAction, LoadLimits, Policy, PolicySyntaxError
from qubes_mcp.policy.loader import lint_dirs

ALLOW = "* * @anyvm @anyvm allow\n"
DENY = "* * @anyvm @anyvm deny\n"


def write(directory: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return directory


def sources(policy: Policy) -> list[str]:
    return [rule.source.text for rule in policy.rules]


@pytest.mark.parametrize(
    "bad_name",
    ["30-User.policy", "30 user.policy", "30-usér.policy", "30-user+x.policy", "A.policy"],
    ids=["uppercase", "space", "non-ascii", "plus", "capital-only"],
)
def test_one_badly_named_policy_file_fails_the_whole_load(tmp_path: Path, bad_name: str) -> None:
    write(tmp_path, {"10-good.policy": ALLOW, bad_name: ALLOW})
    with pytest.raises(PolicySyntaxError, match="invalid filename"):
        Policy.load([tmp_path])


@pytest.mark.parametrize(
    "ignored",
    [".hidden.policy", "README", "30-user.policy~", "30-user.policy.rpmnew", "Notes.txt"],
    ids=["dotfile", "no-suffix", "backup", "rpmnew", "other-suffix-bad-chars"],
)
def test_files_that_are_not_policy_files_are_ignored_whatever_their_name(
    tmp_path: Path, ignored: str
) -> None:
    write(tmp_path, {"10-good.policy": DENY, ignored: "garbage that would not parse"})
    assert len(Policy.load([tmp_path]).rules) == 1


def test_a_directory_named_like_a_policy_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "BAD.policy").mkdir()
    write(tmp_path, {"10-good.policy": DENY})
    assert len(Policy.load([tmp_path]).rules) == 1


def test_files_are_ordered_by_basename_across_directories(tmp_path: Path) -> None:
    run, etc = tmp_path / "run", tmp_path / "etc"
    write(run, {"50-b.policy": "* * b @anyvm deny\n"})
    write(etc, {"30-a.policy": "* * a @anyvm deny\n", "90-c.policy": "* * c @anyvm deny\n"})
    assert sources(Policy.load([run, etc])) == ["a", "b", "c"]


def test_ordering_is_by_codepoint_not_locale(tmp_path: Path) -> None:
    names = {"a": "lower", "-": "dash", "_": "underscore", "0": "digit"}
    write(tmp_path, {f"{name}.policy": f"* * {src} @anyvm deny\n" for name, src in names.items()})
    assert sources(Policy.load([tmp_path])) == ["dash", "digit", "underscore", "lower"]


def test_runtime_directory_wins_on_duplicate_basename(tmp_path: Path) -> None:
    run, etc = tmp_path / "run", tmp_path / "etc"
    write(run, {"30-user.policy": "* * runtime @anyvm deny\n"})
    write(etc, {"30-user.policy": "* * persistent @anyvm deny\n"})
    assert sources(Policy.load([run, etc])) == ["runtime"]


def test_bad_name_in_the_hidden_directory_still_fails_the_load(tmp_path: Path) -> None:
    run, etc = tmp_path / "run", tmp_path / "etc"
    write(run, {"30-user.policy": DENY})
    write(etc, {"30-user.policy": DENY, "Bad.policy": DENY})
    with pytest.raises(PolicySyntaxError):
        Policy.load([run, etc])


def test_missing_policy_directory_fails_the_load(tmp_path: Path) -> None:
    with pytest.raises(PolicySyntaxError):
        Policy.load([tmp_path / "absent"])


def test_include_is_relative_to_the_top_level_files_directory(tmp_path: Path) -> None:
    write(tmp_path, {
        "30-main.policy": "* * first @anyvm deny\n!include include/one\n* * last @anyvm deny\n",
        "include/one": "* * one @anyvm deny\n!include include/two\n",
        "include/two": "* * two @anyvm deny\n",
    })  # fmt: skip
    policy = Policy.load([tmp_path])
    assert sources(policy) == ["first", "one", "two", "last"]
    assert [Path(str(r.filepath)).name for r in policy.rules] == [
        "30-main.policy", "one", "two", "30-main.policy"
    ]  # fmt: skip
    assert [r.lineno for r in policy.rules] == [1, 1, 1, 3]


def test_include_dir_loads_only_valid_policy_names_sorted(tmp_path: Path) -> None:
    write(tmp_path, {
        "30-main.policy": "!include-dir extra\n",
        "extra/20-b.policy": "* * b @anyvm deny\n",
        "extra/10-a.policy": "* * a @anyvm deny\n",
        "extra/notes": "not policy\n",
    })  # fmt: skip
    assert sources(Policy.load([tmp_path])) == ["a", "b"]


def test_include_service_reads_old_syntax_with_compat_rewrites(tmp_path: Path) -> None:
    write(tmp_path, {
        "30-main.policy": "!include-service qubes.Filecopy * include/old\n",
        "include/old": "# old\n$anyvm $dispvm allow,target=$dispvm:default-dvm\n"
                       "$include:include/older\n",
        "include/older": "work $anyvm deny,notify=no\n",
    })  # fmt: skip
    policy = Policy.load([tmp_path])
    first, second = policy.rules
    assert (first.service, first.argument) == ("qubes.Filecopy", None)
    assert (first.source.text, first.target.text) == ("@anyvm", "@dispvm")
    assert isinstance(first.action, AllowAction)
    assert first.action.target is not None
    assert first.action.target.text == "@dispvm:default-dvm"
    assert second.service == "qubes.Filecopy"
    assert isinstance(second.action, DenyAction)
    assert second.action.notify is False


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("!include nope", "not a file"),
        ("!include-dir nope", "not a directory"),
        ("!include-service qubes.X * nope", "not a file"),
        ("!include", "invalid number of params"),
        ("!include a b", "invalid number of params"),
        ("!include-service qubes.X nope", "invalid number of params"),
        ("!include-service qubes+X * include/x", "invalid characters"),
        ("!include-service * +arg include/x", r"only \* argument allowed"),
        ("!compat-4.0 extra", "invalid number of params"),
        ("!unknown", "invalid directive"),
    ],
)
def test_bad_directive_is_a_syntax_error_naming_file_and_line(
    tmp_path: Path, line: str, message: str
) -> None:
    write(tmp_path, {"30-main.policy": f"{DENY}{line}\n", "include/x": "@anyvm @anyvm deny\n"})
    with pytest.raises(PolicySyntaxError, match=message) as err:
        Policy.load([tmp_path])
    assert err.value.lineno == 2
    assert str(err.value).startswith(f"{tmp_path / '30-main.policy'}:2: ")


def test_compat_40_without_params_is_accepted_and_loads_nothing(tmp_path: Path) -> None:
    write(tmp_path, {"35-compat.policy": "!compat-4.0\n", "90-default.policy": DENY})
    assert len(Policy.load([tmp_path]).rules) == 1


@pytest.mark.parametrize(
    "files",
    [
        {"30-a.policy": "!include 30-a.policy\n"},
        {"30-a.policy": "!include include/x\n", "include/x": "!include include/y\n",
         "include/y": "!include include/x\n"},
        {"30-a.policy": "!include-service * * include/x\n", "include/x": "$include:include/x\n"},
    ],
    ids=["self", "two-file-cycle", "old-syntax-self"],
)  # fmt: skip
def test_include_cycle_is_a_syntax_error_not_a_crash(tmp_path: Path, files: dict[str, str]) -> None:
    write(tmp_path, files)
    with pytest.raises(PolicySyntaxError):
        Policy.load([tmp_path])


def test_include_depth_is_capped(tmp_path: Path) -> None:
    files = {"30-a.policy": "!include include/0\n"}
    files |= {f"include/{i}": f"!include include/{i + 1}\n" for i in range(10)}
    files["include/10"] = DENY
    write(tmp_path, files)
    assert len(Policy.load([tmp_path]).rules) == 1
    with pytest.raises(PolicySyntaxError, match="nested too deeply"):
        Policy.load([tmp_path], LoadLimits(max_include_depth=5))


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    write(tmp_path, {"30-a.policy": DENY * 100})
    with pytest.raises(PolicySyntaxError, match="too large"):
        Policy.load([tmp_path], LoadLimits(max_file_bytes=len(DENY) * 10))


def test_non_utf8_file_is_a_syntax_error(tmp_path: Path) -> None:
    write(tmp_path, {"30-a.policy": b"* * \xff @anyvm deny\n"})
    with pytest.raises(PolicySyntaxError, match="UTF-8"):
        Policy.load([tmp_path])


def test_nul_byte_in_include_path_is_a_syntax_error(tmp_path: Path) -> None:
    write(tmp_path, {"30-a.policy": "!include a\x00b\n"})
    with pytest.raises(PolicySyntaxError):
        Policy.load([tmp_path])


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
def test_line_numbers_follow_universal_newlines_as_python_open_does(
    tmp_path: Path, newline: str
) -> None:
    write(tmp_path, {"30-a.policy": newline.join(["# c", "", DENY.strip(), "bad"]).encode()})
    with pytest.raises(PolicySyntaxError) as err:
        Policy.load([tmp_path])
    assert err.value.lineno == 4


def test_from_texts_is_one_virtual_directory() -> None:
    policy = Policy.from_texts(
        {
            "90-z.policy": "* * z @anyvm deny\n",
            "30-a.policy": "!include include/x\n",
            "include/x": "* * x @anyvm deny\n",
            "README": "ignored",
        }
    )
    assert sources(policy) == ["x", "z"]
    assert policy.files == ("30-a.policy", "include/x", "90-z.policy")


def test_from_texts_applies_the_file_name_rule() -> None:
    with pytest.raises(PolicySyntaxError, match="invalid filename"):
        Policy.from_texts({"30-A.policy": DENY})


def test_lint_reports_every_problem_and_keeps_going(tmp_path: Path) -> None:
    write(tmp_path, {
        "10-a.policy": "bad line\n* * @anyvm @anyvm deny\n!include nope\n",
        "20-b.policy": "* * @a @b allow\n",
        "Bad.policy": DENY,
    })  # fmt: skip
    rules, _files, errors = lint_dirs([tmp_path])
    assert [(Path(str(e.filepath)).name, e.lineno) for e in errors] == [
        ("Bad.policy", 0), ("10-a.policy", 1), ("10-a.policy", 3), ("20-b.policy", 1)
    ]  # fmt: skip
    assert len(rules) == 1

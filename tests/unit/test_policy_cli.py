"""``qubes-mcp-admin policy eval|lint``: the daemon's answer lines, exit codes, lint output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qubes_mcp.dom0.operator.cli import main

SYSTEM_INFO = Path(__file__).parents[1] / "conformance" / "data" / "policy_qrexec_system_info.json"
ADMIN = Path(sys.executable).parent / "qubes-mcp-admin"

POLICY = """\
qubes.Ask * @anyvm @anyvm ask
admin.vm.List * test-vm1 @tag:tag2 allow target=dom0
qubes.Filecopy * test-vm1 test-vm2 allow user=root
qubes.Disp * @anyvm @dispvm allow
* * @anyvm @anyvm deny
"""


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policy.d"
    directory.mkdir()
    (directory / "30-test.policy").write_text(POLICY)
    return directory


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def evaluate(
    capsys: pytest.CaptureFixture[str], directory: Path, *request: str
) -> tuple[int, str, str]:
    return run(capsys, "policy", "eval", "--dir", str(directory), "--system-info",
               str(SYSTEM_INFO), *request)  # fmt: skip


ANSWERS = [
    ("filecopy-allowed", ["test-vm1", "test-vm2", "qubes.Filecopy"],
     "user=root\nresult=allow\ntarget=test-vm2\n"
     "target_uuid=uuid:b3eb69d0-f9d9-4c3c-ad5c-454500303ea4\nautostart=True\n"
     "requested_target=test-vm2\n"),
    ("admin-call-redirected-to-dom0", ["test-vm1", "test-vm2", "admin.vm.List+"],
     "user=DEFAULT\nresult=allow\ntarget=dom0\nautostart=True\nrequested_target=test-vm2\n"),
    ("disposable", ["test-vm1", "@dispvm", "qubes.Disp+x"],
     "user=DEFAULT\nresult=allow\ntarget=@dispvm:default-dvm\n"
     "target_uuid=@dispvm:uuid:f3e538bd-4427-4697-bed7-45ef3270df21\nautostart=True\n"
     "requested_target=@dispvm\n"),
    ("denied", ["test-vm2", "test-vm1", "qubes.Filecopy"], "result=deny\n"),
    ("ask-is-deny-without-a-user", ["test-vm1", "test-vm2", "qubes.Ask"], "result=deny\n"),
    ("loopback", ["test-vm1", "test-vm1", "admin.vm.List"],
     "user=DEFAULT\nresult=allow\ntarget=dom0\nautostart=True\nrequested_target=test-vm1\n"),
    ("unknown-target-is-default", ["test-vm1", "ghost", "qubes.Filecopy"], "result=deny\n"),
    ("illegal-target-keyword", ["test-vm1", "@anyvm", "qubes.Disp"], "result=deny\n"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("request_", "expected"), [a[1:] for a in ANSWERS], ids=[a[0] for a in ANSWERS]
)
def test_eval_prints_the_policy_daemons_answer_and_exits_0(
    capsys: pytest.CaptureFixture[str], policy_dir: Path, request_: list[str], expected: str
) -> None:
    status, out, _ = evaluate(capsys, policy_dir, *request_)
    assert (status, out) == (0, expected)


def test_eval_explains_a_refusal_on_stderr(
    capsys: pytest.CaptureFixture[str], policy_dir: Path
) -> None:
    _, _, err = evaluate(capsys, policy_dir, "test-vm2", "test-vm1", "qubes.Filecopy")
    assert "denied by policy" in err
    assert "30-test.policy:5" in err


def test_eval_assume_yes_for_ask_allows_the_requested_target(
    capsys: pytest.CaptureFixture[str], policy_dir: Path
) -> None:
    status, out, _ = evaluate(
        capsys, policy_dir, "--assume-yes-for-ask", "test-vm1", "test-vm2", "qubes.Ask"
    )
    assert status == 0
    assert out.splitlines()[:3] == ["user=DEFAULT", "result=allow", "target=test-vm2"]


def test_eval_just_evaluate_answers_one_line(
    capsys: pytest.CaptureFixture[str], policy_dir: Path
) -> None:
    assert evaluate(
        capsys, policy_dir, "--just-evaluate", "test-vm1", "test-vm2", "qubes.Filecopy"
    )[1] == ("result=allow\n")


def test_eval_of_a_broken_policy_denies_everything(
    capsys: pytest.CaptureFixture[str], policy_dir: Path
) -> None:
    (policy_dir / "99-broken.policy").write_text("* * @anyvm @anyvm allow nonsense\n")
    status, out, err = evaluate(capsys, policy_dir, "test-vm1", "test-vm2", "qubes.Filecopy")
    assert (status, out) == (0, "result=deny\n")
    assert "99-broken.policy:1" in err


def test_eval_earlier_dir_wins_on_same_basename(
    capsys: pytest.CaptureFixture[str], policy_dir: Path, tmp_path: Path
) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir()
    (runtime / "30-test.policy").write_text("* * @anyvm @anyvm deny\n")
    status, out, _ = run(capsys, "policy", "eval", "--dir", str(runtime), "--dir", str(policy_dir),
                         "--system-info", str(SYSTEM_INFO), "test-vm1", "test-vm2",
                         "qubes.Filecopy")  # fmt: skip
    assert (status, out) == (0, "result=deny\n")


@pytest.mark.parametrize(
    "content",
    [None, "not json", json.dumps({"domains": []}), json.dumps({"domains": {"vm": {"type": 1}}})],
    ids=["missing", "not-json", "domains-not-object", "bad-type"],
)
def test_eval_with_unusable_system_info_exits_2(
    capsys: pytest.CaptureFixture[str], policy_dir: Path, tmp_path: Path, content: str | None
) -> None:
    info = tmp_path / "info.json"
    if content is not None:
        info.write_text(content)
    status, out, err = run(capsys, "policy", "eval", "--dir", str(policy_dir), "--system-info",
                           str(info), "test-vm1", "test-vm2", "qubes.Filecopy")  # fmt: skip
    assert (status, out) == (2, "")
    assert "system info" in err


@pytest.mark.parametrize("service", ["+arg", ""], ids=["no-service-name", "empty"])
def test_eval_with_empty_service_name_exits_2(
    capsys: pytest.CaptureFixture[str], policy_dir: Path, service: str
) -> None:
    assert evaluate(capsys, policy_dir, "test-vm1", "test-vm2", service)[0] == 2


def test_eval_without_arguments_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["policy", "eval"])
    assert exit_.value.code == 2


def test_lint_ok_counts_rules_and_files(
    capsys: pytest.CaptureFixture[str], policy_dir: Path
) -> None:
    (policy_dir / "40-inc.policy").write_text("!include include/x\n")
    (policy_dir / "include").mkdir()
    (policy_dir / "include" / "x").write_text("* * @anyvm @anyvm deny\n")
    assert run(capsys, "policy", "lint", "--dir", str(policy_dir)) == (
        0, "ok: 6 rules in 3 files\n", ""
    )  # fmt: skip


def test_lint_lists_every_problem_and_exits_1(
    capsys: pytest.CaptureFixture[str], policy_dir: Path
) -> None:
    (policy_dir / "50-bad.policy").write_text("* * @anyvm @anyvm allow bogus\n\n!include nope\n")
    status, out, _ = run(capsys, "policy", "lint", "--dir", str(policy_dir))
    bad = policy_dir / "50-bad.policy"
    assert status == 1
    assert out.splitlines() == [
        f"{bad}:1: invalid action parameter syntax: 'bogus'",
        f"{bad}:3: not a file: {policy_dir / 'nope'}",
    ]


def test_installed_entry_point_runs(policy_dir: Path) -> None:
    proc = subprocess.run(
        [str(ADMIN), "policy", "eval", "--dir", str(policy_dir), "--system-info", str(SYSTEM_INFO),
         "test-vm1", "test-vm2", "admin.vm.List"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (proc.returncode, proc.stdout.splitlines()[1]) == (0, "result=allow")

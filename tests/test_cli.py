"""drkd.cli: bad input ends in one line and exit 2, a diverged loss in one line, a hint and
exit 1, and anything else (a bug) keeps its traceback."""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from drkd import cli
from drkd.config import NonFiniteLoss, UserError, load_params, read_yaml
from drkd.params_file import comment_line, overrides
from stages import prepare, preset

ROOT = Path(__file__).resolve().parents[1]
Main = Callable[[list[str] | None], int]


def raising(err: Exception) -> Main:
    def main(argv: list[str] | None) -> int:
        raise err

    return main


def test_bad_params_value_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  synthetic:\n    num_train: many\n")
    out = tmp_path / "prepared"
    assert cli.run(prepare.main, ["--params", str(params), "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: params.yaml: data.synthetic.num_train: expected a positive int, got 'many'"
    ]
    assert not out.exists()


@pytest.mark.parametrize("text", ["seed: [1\n", None])
def test_unreadable_preset_is_one_line_and_exit_2(
    text: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invalid YAML (a traceback before UserError) or a missing file: one line naming it."""
    path = tmp_path / "preset.yaml"
    if text is not None:
        path.write_text(text)
    assert cli.run(preset.main, [str(path), "--params", str(ROOT / "params.yaml")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ")


def test_apply_keeps_every_comment_or_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--apply` rewrites params.yaml through ruamel, which keeps comments in block style but
    drops one inside a `{...}` or `[...]` spread over lines: such a file is left as it was."""
    params = tmp_path / "params.yaml"
    shipped = (ROOT / "params.yaml").read_text()
    params.write_text(shipped)
    row = tmp_path / "row.yaml"
    row.write_text("compare:\n  methods:\n    mgd_tuned: {method: mgd, mgd: {weight: 3.0e-5}}\n"
                   "tune:\n  space:\n    tau: [0.1, 2.0]\n    target: [features]\n")
    assert preset.main([str(row), "--params", str(params), "--apply"]) == 0
    text = params.read_text()
    # Every commented line of the shipped file survives as it was but the two the preset set,
    # and no wrapped line ends in a space.
    set_by_preset = ("    tau: [", "    target: [")
    changed = [line for line in shipped.splitlines() if line.startswith(set_by_preset)]
    assert len(changed) == 2
    assert all(line in text for line in shipped.splitlines() if "#" in line and line not in changed)
    lines = {line.split("#")[0].rstrip(): line for line in text.splitlines()}
    assert "# for similarity" in lines["    tau: [0.1, 2.0]"]  # a [...] stays one, comment kept
    assert "# the relation-only" in lines["    target: [features]"]
    assert not [line for line in text.splitlines() if line != line.rstrip()]
    assert read_yaml(text)["compare"]["methods"]["mgd_tuned"] == {
        "method": "mgd", "mgd": {"weight": 3.0e-5}}
    flow = shipped.replace("  seeds: [0, 1, 2]\n", "  seeds: [0,   # first\n    1, 2]\n")
    params.write_text(flow)
    assert cli.run(preset.main, [str(row), "--params", str(params), "--apply"]) == 2
    line = flow.splitlines().index("  seeds: [0,   # first") + 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"error: {params}:{line}: cannot keep the comment '# first'")
    assert "-S \"++compare.methods.mgd_tuned.method='mgd'\"" in err[0]  # the by-hand way
    assert params.read_text() == flow


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "presets").glob("*.yaml")))
def test_a_presets_dvc_overrides_give_what_apply_writes(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--exp-run` and the printed flags hand `dvc exp run -S` Hydra overrides: applied by DVC's
    own parser they give the params `--apply` writes (lists, strings with spaces or `=`, keys
    params.yaml leaves out), and the printed line splits into exactly those overrides."""
    from dvc.utils.hydra import apply_overrides

    by_apply, by_dvc = tmp_path / "applied.yaml", tmp_path / "dvc.yaml"
    for path in (by_apply, by_dvc):
        path.write_text((ROOT / "params.yaml").read_text())
    assert preset.main([str(ROOT / "presets" / name), "--params", str(by_apply), "--apply"]) == 0
    assert preset.main([str(ROOT / "presets" / name), "--params", str(by_dvc)]) == 0
    words = shlex.split(capsys.readouterr().out)
    assert words[::2] == ["-S"] * (len(words) // 2) and len(words) % 2 == 0
    apply_overrides(str(by_dvc), words[1::2])
    assert load_params(by_dvc) == load_params(by_apply)


@pytest.mark.parametrize("value", ["it's", "a\\b", "C:\\dir\\", "x=y z", "1e-3", "true", "",
                                   "a'b\\'c", "[x]", "''"])
def test_string_overrides_survive_dvcs_parser(value: str, tmp_path: Path) -> None:
    """Strings stay strings, whatever they hold (quotes, backslashes, number-like text)."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    path.write_text("launcher: python\n")
    apply_overrides(str(path), overrides({"launcher": value, "new": {"key": [value, 2]}}))
    assert read_yaml(path.read_text()) == {"launcher": value, "new": {"key": [value, 2]}}


def test_a_preset_that_is_not_a_mapping_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listed = tmp_path / "list.yaml"
    listed.write_text("- seed\n- 3\n")
    assert cli.run(preset.main, [str(listed), "--params", str(ROOT / "params.yaml")]) == 2
    assert capsys.readouterr().err == (
        f"error: {listed}: expected a mapping of params sections, got a list\n")


def test_a_lost_comment_is_located_by_its_whole_text() -> None:
    text = "a: 1  # first of all\nb: [0,  # first\n  1]\n# first\n"
    assert comment_line(text, "# first") == 2  # not line 1, whose comment only starts so
    assert comment_line(text, "# first of all") == 1


def test_user_error_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(raising(UserError("models/t.pt: checkpoint not found"))) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: models/t.pt: checkpoint not found\n" and captured.out == ""


@pytest.mark.parametrize("err", [ValueError("bug"), KeyError("bug"), FileNotFoundError("bug")])
def test_any_other_error_is_not_taken_for_bad_input(err: Exception) -> None:
    with pytest.raises(type(err)):
        cli.run(raising(err))


def test_an_internal_value_error_keeps_its_traceback() -> None:
    code = (
        "from drkd import cli\n"
        "def main(argv):\n"
        "    return int('not a number')  # a bug, not bad input\n"
        "cli.run(main)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("Traceback (most recent call last):")
    assert "in main" in proc.stderr
    assert proc.stderr.rstrip().endswith("ValueError: invalid literal for int() with base 10: "
                                         "'not a number'")


def test_non_finite_loss_is_its_message_a_hint_and_exit_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    message = (
        "[student_drkd] step 312: loss term 'loss_pr' is inf; "
        "last good checkpoint kept at work/student_drkd/last.pt"
    )
    assert cli.run(raising(NonFiniteLoss(message))) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0] == f"error: {message}"
    hint = lines[1]
    assert hint.startswith("hint: ")
    for cause in ("learning rate", "train.lr", "distill.w_", "train.amp: off"):
        assert cause in hint, cause


def test_other_runtime_errors_keep_their_traceback() -> None:
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        cli.run(raising(RuntimeError("CUDA out of memory")))

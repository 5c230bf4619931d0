"""python -m torch_bnext.check, the self-check users run after installing."""

import torch

from torch_bnext import check, testing


def test_quick_self_check_passes_on_this_machine(capsys):
    assert check.main(["--device", "cpu", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "passed: 0 failure(s)" in out
    rows = [line for line in out.splitlines() if line.startswith("cpu ")]
    assert len(rows) >= 15 and all(" ok " in row for row in rows)


def test_a_wrong_result_fails_the_check(monkeypatch, capsys):
    # With zero tolerance even float32 rounding is a failure: the exit status must say so.
    monkeypatch.setattr(testing, "REL_TOL", {dtype: 0.0 for dtype in testing.REL_TOL})
    assert check.main(["--device", "cpu", "--quick"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "relative error" in out and "FAILED" in out


def test_relative_error_is_not_fooled_by_nan():
    want = torch.ones(4)
    got = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    try:
        check.expect_close("x", got, want, torch.float32)
    except check.CheckFailed as exc:
        assert "relative error" in str(exc)
    else:
        raise AssertionError("a NaN passed the check")

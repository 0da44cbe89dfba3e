"""Every bad input of issue 13 through the command line: exit code 2 and ONE line on stderr
that names the problem (and the file), and the run folder it pointed at is byte-identical
afterwards. The cases are those of ``benchmarks/bad_input_table.py`` (which writes the table
benchmarks/results/bad_input.md); fixtures are built once per module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
spec = importlib.util.spec_from_file_location("bad_input_table", BENCH / "bad_input_table.py")
table = importlib.util.module_from_spec(spec)
sys.modules["bad_input_table"] = table
spec.loader.exec_module(table)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, one_thread):
    return table.build_fixtures(tmp_path_factory.mktemp("bad_input"))


@pytest.mark.parametrize("case", table.CASES, ids=[c.name for c in table.CASES])
def test_bad_input(case, fixtures, tmp_path):
    before = table.snapshot(fixtures[case.keep]) if case.keep else None
    out = tmp_path / "out"
    code, stdout, stderr = table.run_case(case, fixtures, out)
    assert code == case.code, (code, stdout[-500:], stderr[-2000:])
    assert "Traceback" not in stderr
    if case.stream == "stdout":  # a note, not an error
        assert case.expect in stdout and not stderr.strip()
    else:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, stderr
        command = case.argv[0]
        assert lines[0].startswith(f"trimtune {command}: error: ") and case.expect in lines[0]
    if before is not None:
        assert table.snapshot(fixtures[case.keep]) == before, "a saved run was changed"
    if code == 2 and case.name != "full disk (simulated: every rename fails with ENOSPC)":
        # refused before anything was trained into the new folder
        assert not (out / "checkpoint").exists() and not (out / "adapter").exists()

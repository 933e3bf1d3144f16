"""Running bench/*.py command lines in this process, as `python bench/<script> ...` would, for the tests that check
their --help and which runs write a record. Nothing here measures anything."""
from __future__ import annotations

import json
import pathlib
import runpy
import shutil
import sys

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


def run_script(path, argv, monkeypatch):
    """Run a script as `python path *argv` would, in this process; its exit code (0 when it returns)."""
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    monkeypatch.setattr(sys, "path", list(sys.path))  # some scripts put the repository first
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        return e.code or 0
    return 0


def copy_script(name, tmp_path):
    """bench/<name> copied into tmp_path/bench (with an empty results/ beside it), so that its record lands there."""
    (tmp_path / "bench" / "results").mkdir(parents=True)
    return pathlib.Path(shutil.copy(BENCH / name, tmp_path / "bench" / name))


def check_quick_is_not_for_the_record(script, record, monkeypatch, capsys, argv=()):
    """--help says --quick is "not for the record" and shows --out as optional; `--quick` writes no record and `--quick --out smoke.json` only
    smoke.json; a full run writes `record`. Returns (smoke.json's content, the record's content)."""
    assert run_script(script, ["--help"], monkeypatch) == 0
    help_text = " ".join(capsys.readouterr().out.split())  # (wrapped by argparse)
    assert "not for the record" in help_text and "[--out OUT]" in help_text  # --out is optional
    assert run_script(script, ["--quick", *argv], monkeypatch) == 0
    assert not record.exists()
    smoke = record.parent.parent.parent / "smoke.json"
    assert run_script(script, ["--quick", *argv, "--out", str(smoke)], monkeypatch) == 0
    assert not record.exists()
    assert run_script(script, list(argv), monkeypatch) == 0
    return json.loads(smoke.read_text()), json.loads(record.read_text())

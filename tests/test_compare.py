"""ftune compare on CPU: every mode runs in its own process on the same batches; losses agree;
JSON and a PNG chart are written; a mode that runs out of memory is a row, not a crash."""

from __future__ import annotations

import json
import sys

import matplotlib.image
import pytest

from ftune.cli import main
from tests.conftest import QUICKSTART

pytestmark = pytest.mark.slow


def run_compare(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["ftune", "compare", str(QUICKSTART), *args])
    with pytest.raises(SystemExit) as caught:
        main()
    captured = capsys.readouterr()
    return caught.value.code, captured.out, captured.err


def test_compare_modes_agree_and_write_json_and_chart(tmp_path, monkeypatch, capsys):
    """Two modes, the reference and one that offloads: each starts a worker process (about 10 s on
    CPU), and every mode takes the same path through `ftune compare` (how --ckpt is read:
    test_unknown_mode_and_occupied_out)."""
    out = tmp_path / "cmp"
    code, stdout, _ = run_compare(monkeypatch, capsys, "--ckpt", "none", "--ckpt", "unsloth", "--steps", "3",
                                  "--out", str(out), "--json")
    assert code in (0, None)
    report = json.loads(stdout)
    assert json.loads((out / "compare.json").read_text()) == report
    rows = {row["mode"]: row for row in report["rows"]}
    assert list(rows) == ["none", "unsloth"] and report["reference_mode"] == "none"
    for row in rows.values():
        assert row["status"] == "ok" and len(row["losses"]) == 3
        assert row["max_loss_diff"] < 1e-4 and row["max_grad_norm_diff"] < 1e-3
        assert row["peak_bytes"] > 0 and row["tokens_per_s"] > 0 and row["estimated_peak_bytes"] > 0
    assert rows["unsloth"]["host_bytes"] > 0 and rows["none"]["host_bytes"] == 0
    assert "fastest" in report["verdict"]
    image = matplotlib.image.imread(out / "compare.png")
    assert image.ndim == 3 and image.shape[0] > 100


def test_a_mode_out_of_memory_is_a_row(tmp_path, monkeypatch, capsys):
    """A step that cannot fit its cap is an "oom" row. The cap (6 GiB of address space on CPU)
    leaves the worker room to start (about 2.4 GiB: few threads, two malloc arenas), and the step's
    first activation alone, 2^24 tokens x 128 x fp32 = 8 GiB, exceeds it: the step, and only the
    step, runs out, on any machine. (A crash of any other kind is an "error" row and fails here.)"""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # glibc reserves 64 MiB of address space per arena
    out = tmp_path / "cmp"
    code, stdout, _ = run_compare(monkeypatch, capsys, "--ckpt", "true", "--steps", "2", "--seq", str(2**24),
                                  "--batch", "1", "--memory-cap", "6", "--out", str(out))
    assert code in (0, None)
    report = json.loads((out / "compare.json").read_text())
    (row,) = report["rows"]
    assert row["status"] == "oom", row
    assert row["error"].startswith("out of memory") and "allocate" in row["error"], row
    assert "no mode ran" in report["verdict"]
    assert (out / "compare.png").is_file()
    assert "true" in stdout and "out of memory" in stdout


def test_unknown_mode_and_occupied_out(tmp_path, monkeypatch, capsys):
    # a comma list and a repeated option, each mode checked: only the unknown ones named
    code, _, err = run_compare(monkeypatch, capsys, "--ckpt", "none,offload", "--ckpt", "bogus")
    assert code == 2 and "--ckpt offload, bogus:" in err
    (tmp_path / "precious.txt").write_text("x")
    code, _, err = run_compare(monkeypatch, capsys, "--out", str(tmp_path))
    assert code == 2 and "other files" in err

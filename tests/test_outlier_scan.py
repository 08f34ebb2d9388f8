"""bench.outlier_scan: a tiny scan runs end to end, and a bad --seeds is refused with a clear message."""

import json

import pytest

from bench import outlier_scan


def test_one_seed_writes_its_summary(tmp_path):
    outlier_scan.main(["--seeds", "1", "--out", str(tmp_path)])
    run = json.loads((tmp_path / "outlier_scan.json").read_text())["runs"]["this tree"]
    assert run["cases"] == 8 and 1.0 - 1e-9 <= run["median"] <= 1.02 and len(run["worst"]) == 5


def test_no_seeds_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        outlier_scan.main(["--seeds", "0", "--out", str(tmp_path)])  # (never the committed results)
    assert "--seeds must be at least 1, got 0" in capsys.readouterr().err

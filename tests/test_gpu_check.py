"""The device check script's dry run: the same code a GPU runs, on the CPU with a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_device_checks_dry_run_writes_its_report_with_greedy_identity_and_every_mode(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry", "--out", str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry"] and report["model"] == "random-tiny" and report["graphs"]["graph_mode"] == "padded"
    assert report["graphs"]["greedy_identical"] == {"ar": True, "sd-always": True}
    assert set(report["graphs"]["step_ms"]) == {f"{kind}@{rows}" for kind in ("target", "verify", "draft") for rows in (1, 2)}
    assert set(report["modes"]) == {"ar", "sd-always", "efficient"}
    assert report["modes"]["sd-always"]["acceptance"] is not None  # it speculated, so it drafted
    assert (tmp_path / "gpu_check.md").read_text().startswith("# Device check on cpu (dry run)")

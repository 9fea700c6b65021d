"""The UI reads an evaluation's plots from the one place every evaluation logs them: ``plots/``."""

from __future__ import annotations

from pathlib import Path

from distill_common import tracking
from distill_common.ui.catalog import PLOT_FOLDER, eval_plots


def test_plots_come_from_the_plots_folder(mlflow_uri: str, tmp_path: Path) -> None:
    for name in ("fid_vs_nfe.png", "fid_vs_latency.png", "old_vs_layout.png"):
        (tmp_path / name).write_bytes(b"\x89PNG\r\n\x1a\n")
    with tracking.start_run("eval", "evaluate") as run:
        run.log_artifact(tmp_path / "fid_vs_nfe.png", PLOT_FOLDER)
        run.log_artifact(tmp_path / "fid_vs_latency.png", PLOT_FOLDER)
        run.log_artifact(tmp_path / "old_vs_layout.png", "eval")  # a stray copy elsewhere is not shown
    assert sorted(p.name for p in eval_plots(run.run_id, tmp_path / "got")) == ["fid_vs_latency.png", "fid_vs_nfe.png"]
    with tracking.start_run("eval", "before-plots-folder") as old:
        old.log_artifact(tmp_path / "old_vs_layout.png", "eval")  # runs logged before: still found
    assert [p.name for p in eval_plots(old.run_id, tmp_path / "old")] == ["old_vs_layout.png"]

"""The result pages rewrite from their committed JSON (``--report``) exactly as committed.

Training and evaluating behind these pages takes an hour or more, so CI never reruns them; this catches a
report writer that no longer reads its own JSON, or a page edited by hand away from its data.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"

PAGES = [
    ("landmark_passkey.py", "landmark_passkey"),
    ("landmark_passkey.py", "landmark_passkey_start_jitter/landmark_passkey"),  # a recipe variant's page
    ("landmark_passkey.py", "landmark_passkey_grouped_only/landmark_passkey"),  # before the retrieval stage
    ("titans_eval.py", "titans"),
    ("titans_eval.py", "titans_seq256/titans"),  # the earlier recipe's page
    ("titans_update.py", "titans_update"),
    ("titans_decode.py", "titans_decode"),
    ("window_decode.py", "window_decode"),
]


@pytest.mark.parametrize("script, page", PAGES, ids=[p for _, p in PAGES])
def test_page_rewrites_from_its_json(script, page, tmp_path):
    name = Path(page).name
    shutil.copy(RESULTS / f"{page}.json", tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--report", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / f"{name}.md").read_text() == (RESULTS / f"{page}.md").read_text()
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000


# Sweeps built on peak_memory.sweep_parser rewrite their page with --from-json.
FROM_JSON_PAGES = [("prefill.py", "prefill")]


@pytest.mark.parametrize("script, page", FROM_JSON_PAGES, ids=[p for _, p in FROM_JSON_PAGES])
def test_sweep_page_rewrites_from_its_json(script, page, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--from-json",
                           str(RESULTS / f"{page}.json"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / f"{page}.md").read_text() == (RESULTS / f"{page}.md").read_text()
    assert (tmp_path / f"{page}.png").stat().st_size > 10_000


def test_kernel_page_redraws_its_plot_from_its_table(tmp_path):
    """benchmarks/kernels.py keeps no JSON: ``--report`` reads the GPU run's table back and redraws the plot."""
    page = RESULTS / "kernels_nvidia_h100_80gb_hbm3.md"
    shutil.copy(page, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "kernels.py", "--report", str(tmp_path / page.name)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT / "benchmarks")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / page.with_suffix(".png").name).stat().st_size > 10_000
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from kernels import rows_from_markdown
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows = rows_from_markdown(page.read_text())
    assert len(rows) == 56 and sum(r["tflops"] is None for r in rows) == 7  # 2 failed, 5 skipped
    cudnn = [r for r in rows if r["impl"] == "cudnn" and (r["t"], r["causal"], r["backward"]) == (8192, True, False)]
    assert cudnn == [dict(impl="cudnn", d=128, causal=True, backward=False, t=8192, b=8, h=16, tflops=579.8, note="")]

"""The GPU check's stages run on CPU at tiny sizes, so a GPU lease never finds them broken.

``benchmarks/gpu_check.sh`` runs ``kernels.py``, ``train_gpu.py`` and its
``--profile`` on a lent H100/H200 in one short lease; their ``--smoke`` modes run
the same code interpreted on CPU (what ``gpu_check.sh --dry-run`` does, without
its tests). Each writes its page; the numbers are not looked at.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

STAGES = {
    "kernels": ["kernels.py", "--smoke"],
    "train": ["train_gpu.py", "--smoke", "--steps", "3", "--impls", "pallas,blockwise"],
    # A budget that ends after the first impl: the second is recorded as skipped, not run.
    "profile": ["train_gpu.py", "--smoke", "--steps", "3", "--impls", "pallas,blockwise", "--profile",
                "--budget-s", "1"],
}
PAGES = {"kernels": ["kernels_cpu.md", "kernels_cpu.png"], "train": ["train_gpu_cpu.md"],
         "profile": ["train_gpu_cpu_ops.md"]}


@pytest.mark.parametrize("stage", list(STAGES))
def test_gpu_check_stage_runs_on_cpu(stage, tmp_path):
    flags = "--xla_cpu_enable_concurrency_optimized_scheduler=false"  # as gpu_check.sh --dry-run
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg", "XLA_FLAGS": flags}
    script, *args = STAGES[stage]
    proc = subprocess.run([sys.executable, script, *args, "--results", str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env=env, cwd=ROOT / "benchmarks")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "wrote " in proc.stdout
    for page in PAGES[stage]:
        assert (tmp_path / page).stat().st_size > 0
    if stage == "profile":
        assert "| blockwise |  |  |  |  | skipped: time budget (1 s) |" in (tmp_path / PAGES[stage][0]).read_text()

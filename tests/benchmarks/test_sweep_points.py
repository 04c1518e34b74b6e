"""Each sweep benchmark's one-point mode runs against today's API (a small point, in its own process).

The sweeps take minutes to hours, so CI never runs them whole; this catches a benchmark that no longer
matches the library (landmark_inference.py built a BlockCache without its ``count`` for a while).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

POINTS = [
    ("attention_memory.py", "blockwise,fwd+bwd,512", {"peak_bytes"}),
    ("titans_update.py", "issue,chunked,fwd+bwd,256,64", {"peak_bytes"}),
    ("titans_update.py", "config,packed/40,fwd+bwd,256,16", {"peak_bytes"}),  # restarts, vmapped streams
    ("landmark_train.py", "memory,landmark,fwd+bwd,512", {"peak_bytes", "xla_temp_bytes"}),
    ("landmark_train.py", "timing,512,1", {"seconds"}),
    ("landmark_inference.py", "memory,retrieval,1,1024,4", {"peak_bytes", "xla_temp_bytes"}),
    ("landmark_inference.py", "timing,1,1024,1", {"seconds"}),
    ("titans_decode.py", "16,2", {"token_seconds", "rerun_seconds", "token_cache_bytes"}),
    ("window_decode.py", "1024", {"ring_seconds", "full_seconds", "ring_cache_bytes"}),
    ("prefill.py", "memory,blockwise,local,1024", {"peak_bytes", "xla_temp_bytes"}),
    ("prefill.py", "timing,dense,global,1024,1", {"seconds"}),
    ("prefill.py", "model,titans_mac,512", {"peak_bytes", "xla_temp_bytes"}),
]


@pytest.mark.parametrize("script, point, keys", POINTS, ids=[f"{s}:{p}" for s, p, _ in POINTS])
def test_sweep_point_runs(script, point, keys):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--point", point],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for row in result if isinstance(result, list) else [result]:
        assert "error" not in row and keys <= set(row), row

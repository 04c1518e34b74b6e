"""``lca-eval RUN_DIR [key=value ...]``: evaluate the newest checkpoint of a run.

On a pod or cluster, launch it as the run's lca-train was: on every process of the job
(``runtime.*`` as for lca-train; the run's saved config holds none of a launch's).
Reads the checkpoints only (an unreadable one is skipped, never moved). Writes bits
per byte and the needle-retrieval grid (table + heatmap) of checkpoint N to
``RUN_DIR/eval/step_N/``, and the headline numbers to TensorBoard. Overrides change
the run's saved config, e.g.
``eval.context_lengths=[512,1024] eval.samples_per_cell=8``.
"""

from __future__ import annotations

import json
import sys

from launch.common import run_cli, setup_logging


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    run_dir, overrides = argv[0], argv[1:]

    def body():
        from lca.config import load_run_config
        from lca.train.runtime import initialize_distributed, set_cpu_devices

        runtime = load_run_config(run_dir, overrides).runtime
        set_cpu_devices(runtime.cpu_devices)
        setup_logging()
        initialize_distributed(runtime)  # a pod or cluster job, as lca-train's: the run's mesh spans its processes
        from lca.train.evaluate import evaluate_run

        result = evaluate_run(run_dir, overrides)
        print(json.dumps({"step": result["step"], **result["perplexity"],
                          "retrieval_accuracy": result["retrieval"]["mean_accuracy"]}))

    return run_cli("lca-eval", body)


if __name__ == "__main__":
    sys.exit(main())

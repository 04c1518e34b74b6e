"""``lca-train [CONFIG] [key=value ...]``: train (or resume) the run a config describes.

CONFIG is a YAML path or a name in ``configs/`` (default: ``demo``). Overrides are
dotted keys: ``lca-train demo train.steps=50 mesh.context=2``. Also runs as
``python -m launch.train``.
"""

from __future__ import annotations

import sys

from launch.common import run_cli, setup_logging

DEFAULT_CONFIG = "demo"


def split_args(argv: list[str]) -> tuple[str, list[str]]:
    """``(config, overrides)``: the first argument without ``=`` is the config."""
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        raise SystemExit(0)
    if argv and "=" not in argv[0]:
        return argv[0], argv[1:]
    return DEFAULT_CONFIG, argv


def main(argv: list[str] | None = None) -> int:
    config, overrides = split_args(sys.argv[1:] if argv is None else argv)

    def body():
        from lca.config import load_config
        from lca.train.runtime import set_cpu_devices

        cfg = load_config(config, overrides)
        set_cpu_devices(cfg.runtime.cpu_devices)  # before anything asks JAX for devices
        setup_logging()
        from lca.train import train

        train(cfg)

    return run_cli("lca-train", body)


if __name__ == "__main__":
    sys.exit(main())

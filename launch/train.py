"""usage: lca-train [CONFIG] [key=value ...] [--print-config]

Train (or resume) the run a config describes. CONFIG is a YAML path or the
name of a shipped config (default: demo). Overrides are dotted keys applied
last: lca-train demo train.steps=50 mesh.context=2. Also runs as
python -m launch.train.

options:
  -h, --help      this help, then exit
  --print-config  print the resolved config (every key, defaults included) and exit
"""

from __future__ import annotations

import sys

from launch.common import run_cli, setup_logging

DEFAULT_CONFIG = "demo"


OPTIONS = ("-h", "--help", "--print-config")


def help_text() -> str:
    from lca.config import CONFIG_DIR, shipped_configs

    return "\n".join([
        __doc__.strip(), "",
        f"shipped configs: {', '.join(shipped_configs())}  (in {CONFIG_DIR})",
        "every key with its type, default and meaning: lca/config.py; the resolved values of one",
        "config: lca-train CONFIG [key=value ...] --print-config",
    ])


def split_args(argv: list[str]) -> tuple[str, list[str]]:
    """``(config, overrides)``: the first argument without ``=`` is the config."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(help_text())
        raise SystemExit(0)
    if argv and "=" not in argv[0]:
        return argv[0], argv[1:]
    return DEFAULT_CONFIG, argv


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    print_config = "--print-config" in argv
    config, overrides = split_args([arg for arg in argv if arg != "--print-config"])

    def body():
        from lca.config import ConfigError, load_config, to_yaml
        from lca.train.runtime import set_cpu_devices

        unknown = [arg for arg in (config, *overrides) if arg.startswith("-")]
        if unknown:
            raise ConfigError(f"unknown option {unknown[0]!r}; options are {', '.join(OPTIONS)} (see --help).")
        cfg = load_config(config, overrides)
        if print_config:  # before JAX starts: nothing is run or written
            print(to_yaml(cfg), end="")
            return
        set_cpu_devices(cfg.runtime.cpu_devices)  # before anything asks JAX for devices
        setup_logging()
        from lca.train import train

        train(cfg)

    return run_cli("lca-train", body)


if __name__ == "__main__":
    sys.exit(main())

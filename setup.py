"""Packages of the lca distribution; everything else is in pyproject.toml.

The configs stay in the repository's top-level ``configs/`` (what the README and
the cluster scripts point at) and ship inside the wheel as the package data
``lca.configs``, which ``lca.config`` reads with ``importlib.resources``.
pyproject.toml cannot map a directory onto a package next to ``packages.find``,
hence this file.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=[*find_namespace_packages(include=["lca*", "kernels_pallas*", "launch*"]), "lca.configs"],
    package_dir={"lca.configs": "configs"},
    package_data={"lca.configs": ["*.yaml"]},
)

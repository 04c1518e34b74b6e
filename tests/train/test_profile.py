"""train.profile_at: a jax.profiler trace of chosen steps, and the per-op time table made from it."""

import pytest

from lca.config import ConfigError
from lca.train.profile import OpTime, kind_times, op_kind, op_table, op_times
from tests.train.conftest import tiny_config


def test_traced_steps_give_a_trace_and_an_op_table(tmp_path):
    from lca.train import train

    train(tiny_config(tmp_path, "train.steps=3", "train.profile_at=2", "train.profile_steps=2",
                      "checkpoint.enabled=false", "eval.at_end=false"))
    profile = tmp_path / "profile"
    assert list(profile.glob("**/*.xplane.pb"))
    ops = op_times(profile)
    assert ops and all(o.total_ns >= 0 and o.count >= 1 for o in ops)
    assert [o.total_ns for o in ops] == sorted((o.total_ns for o in ops), reverse=True)
    # the traced steps ran the compiled train step: its module's ops are in the table
    assert any("train" in o.module or "step" in o.module for o in ops), {o.module for o in ops}
    table = (profile / "ops.md").read_text()
    assert "Op time over 2 traced step(s)" in table and f"`{ops[0].op}`" in table


def test_op_table_per_step_and_shares():
    ops = [OpTime("fusion.1", "jit_step", 3e6, 4), OpTime("dot.2", "jit_step", 1e6, 2)]
    table = op_table(ops, steps=2)
    assert "2.00 ms per step in 2 ops" in table
    assert "| `fusion.1` | `jit_step` | 1.500 | 75.0% | 2 |" in table
    assert "| `dot.2` | `jit_step` | 0.500 | 25.0% | 1 |" in table
    assert "command buffer" not in table


def test_op_kinds_sum_the_instances_of_an_op():
    ops = [OpTime("pallas_call.196", "jit_step", 6e6, 2), OpTime("cond.15.clone.2", "jit_step", 1e6, 2),
           OpTime("pallas_call.7", "jit_step", 2e6, 2), OpTime("cond.3", "jit_step", 1e6, 2)]
    assert [op_kind(o.op) for o in ops] == ["pallas_call", "cond", "pallas_call", "cond"]
    assert kind_times(ops) == [("pallas_call", 8e6, 2), ("cond", 2e6, 2)]
    table = op_table(ops, steps=2)
    assert "| `pallas_call` | 4.000 | 80.0% | 2 |" in table
    assert "| `cond` | 1.000 | 20.0% | 2 |" in table


def test_command_buffers_are_named_as_hiding_the_kernels():
    table = op_table([OpTime("command_buffer_1", "jit_step", 5e8, 1259)], steps=1)
    assert "--xla_gpu_enable_command_buffer=" in table


def test_no_trace_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.xplane.pb trace"):
        op_times(tmp_path)


@pytest.mark.parametrize("override, message", [
    ("train.profile_at=-1", "'train.profile_at' must be >= 0"),
    ("train.profile_steps=0", "'train.profile_steps' must be >= 1"),
])
def test_bad_profile_keys_are_config_errors(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, override)

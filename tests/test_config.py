"""Config loading: inheritance, overrides, typed validation with one-line errors."""

import dataclasses

import pytest

from lca.config import ConfigError, load_config, load_run_config, save_config, to_yaml


def test_demo_inherits_base_and_overrides_apply():
    cfg = load_config("demo", ["train.steps=7", "model.pattern=[global]", "eval.depths=[0.25]"])
    assert cfg.name == "demo" and cfg.run_dir == "runs/demo"  # interpolation of ${name}
    assert cfg.train.steps == 7
    assert cfg.model.pattern == ["global"]
    assert cfg.eval.depths == [0.25]
    assert cfg.data.source == "stdlib"  # from base.yaml
    assert cfg.train.weight_decay == 0.1  # schema default, in no file


def test_child_overrides_parent(tmp_path):
    (tmp_path / "parent.yaml").write_text("name: p\ntrain:\n  steps: 5\n  lr: 0.5\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\ntrain:\n  steps: 9\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.name, cfg.train.steps, cfg.train.lr) == ("p", 9, 0.5)


@pytest.mark.parametrize("written, meant",
                         [("on", "on"), ("off", "off"), ("auto", "auto"), ("yes", "on"), ("false", "off")])
def test_distributed_on_off_survive_yaml_booleans(tmp_path, written, meant):
    """YAML 1.1 reads on/off as booleans; the launch scripts pass runtime.distributed=on."""
    assert load_config("tiny", [f"runtime.distributed={written}"]).runtime.distributed == meant
    (tmp_path / "run.yaml").write_text(f"base: tiny\nruntime:\n  distributed: {written}\n")
    assert load_config(tmp_path / "run.yaml").runtime.distributed == meant
    with pytest.raises(ConfigError, match="'runtime.distributed' must be one of"):
        load_config("tiny", ["runtime.distributed=maybe"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.num_layer=3", "unknown config key 'model.num_layer' in override 'model.num_layer=3'; did you mean 'model.num_layers'?"),
        ("trian.steps=3", "did you mean 'train'?"),
        ("data.sorce=stdlib", "did you mean 'data.source'?"),
        ("train.steps=abc", "bad value for config key 'train.steps'"),
        ("model.tie_embeddings=maybe", "bad value for config key 'model.tie_embeddings'"),
        ("model.remat=sometimes", "'model.remat' must be one of"),
        ("model.mixers.local.window=0", "'model.mixers.local.window' must be a positive int"),
        ("model.num_kv_heads=3", "multiple of model.num_kv_heads"),
        ("train.steps", "must look like key=value"),
        # The model's catalogues: mixers by model.pattern, sequence strategies, local implementations.
        ("model.pattern=[lokal,global]", "config key 'model.pattern' has unknown value 'lokal'; did you mean 'local'?"),
        ("model.mixers.lokal.window=3", "unknown config key 'model.mixers.lokal' in override 'model.mixers.lokal.window=3'; did you mean 'model.mixers.local'?"),
        ("model.mixers.local.windo=3", "did you mean 'model.mixers.local.window'?"),
        ("model.pattern=[]", "'model.pattern' must be a non-empty list of mixer kinds"),
        ("model.attention.sequence=rign", "'model.attention.sequence' has unknown value 'rign'; did you mean 'ring'?"),
        ("model.strategies.ring.layot=zigzag", "did you mean 'model.strategies.ring.layout'?"),
        ("model.strategies.ring.layout=zag", "'model.strategies.ring.layout' must be one of"),
        ("model.strategies.ring.axis=sp", "'model.strategies.ring.axis' must name a mesh axis"),
        ("model.strategies.usp.ulysses_axis=context", "must be different mesh axes"),
        ("model.attention.impl=flash", "config key 'model.attention.impl'"),
    ],
)
def test_errors_are_one_clear_line(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [override])
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base: tiny\nmodel:\n  d_modle: 64\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.d_modle' in .*bad.yaml; did you mean 'model.d_model'"):
        load_config(path)


def test_inheritance_cycle_and_missing_file(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_config")


def test_result_is_read_only():
    cfg = load_config("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 3


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("tiny", ["train.lr=0.25", "model.mixers.local.window=8"])
    save_config(cfg, tmp_path)
    assert load_run_config(tmp_path) == cfg
    assert load_run_config(tmp_path, ["train.steps=3"]).train.steps == 3


def test_a_saved_run_config_holds_no_launch_of_a_job(tmp_path):
    """How process 0 joined its job (its id, the coordinator) would be wrong for any later launch of the run."""
    job = ["runtime.distributed=on", "runtime.coordinator_address=10.0.0.1:1234", "runtime.num_processes=2",
           "runtime.process_id=0"]
    save_config(load_config("tiny", job), tmp_path)
    assert load_run_config(tmp_path).runtime == load_config("tiny").runtime  # cpu_devices is kept
    assert load_run_config(tmp_path, ["runtime.process_id=1"]).runtime.process_id == 1
    # run dirs saved before: the file's launch fields are not read
    (tmp_path / "config.yaml").write_text(to_yaml(load_config("tiny", job)))
    assert load_run_config(tmp_path).runtime == load_config("tiny").runtime

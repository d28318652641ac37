"""Config loading: every kind of bad input is reported with its key path before anything runs."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hpmkd.config import DEFAULT_META_FRACTION, ExperimentConfig, config_from_data, load_config
from hpmkd.config_schema import flatten
from hpmkd.registry import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "conf" / "smoke.yaml"


def smoke_data() -> dict:
    return yaml.safe_load(SMOKE.read_text())


def error_of(data: dict, overrides: list[str] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_data(data, list(overrides))
    return str(info.value)


def test_shipped_configs_validate(tmp_path):
    for path in sorted((ROOT / "conf").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        # a config for the user's own folder (data.root, no download) validates once the folder is named
        own_folder = data["data"].get("root") and not data["data"].get("download")
        cfg = load_config(path, [f"data.root={tmp_path}"] if own_folder else [])
        assert isinstance(cfg, ExperimentConfig), path


def test_unknown_top_level_key_offers_the_close_name():
    data = smoke_data()
    data["experimnt"] = data.pop("experiment")
    message = error_of(data)
    assert message.startswith("experimnt: unknown key.")
    assert "'experiment'" in message


def test_unknown_nested_key_names_its_full_path():
    message = error_of(smoke_data(), ["teachers.1.train.lrr=0.1"])
    assert message.startswith("teachers.1.train.lrr: unknown key")
    assert "'lr'" in message


def test_wrong_type_names_path_and_expected_type():
    message = error_of(smoke_data(), ["train.epochs=five"])
    assert message == "train.epochs: expected int, got str 'five'."


def test_bad_value_is_rejected_with_the_allowed_range():
    message = error_of(smoke_data(), ["data.val_fraction=1.5"])
    assert "data.val_fraction" in message and "between 0 and 1" in message


def test_registry_choices_are_listed():
    message = error_of(smoke_data(), ["train.optimizer=rmsprop"])
    assert "train.optimizer: unknown optimizer 'rmsprop'" in message and "adam, adamw, psgld, sgd, sgld" in message
    message = error_of(smoke_data(), ["train.lr_schedule=cosin"])
    assert "train.lr_schedule: unknown lr schedule 'cosin'. Did you mean 'cosine'" in message
    message = error_of(smoke_data(), ["train.optimizer_options={betas: [0.9, 0.99]}"])
    assert "train.optimizer_options.betas: unknown option for optimizer 'sgd'" in message


def test_unknown_model_offers_close_names():
    message = error_of(smoke_data(), ["student.model=resnet2"])
    assert message.startswith("student.model: unknown model 'resnet2'.")
    assert "Did you mean" in message


def test_unknown_loss_option_is_named():
    message = error_of(smoke_data(), ["distill.methods.kd.temprature=3"])
    assert "distill.methods.kd.temprature" in message


def test_unknown_loss_and_aggregator_names():
    assert "unknown loss 'kdd'" in error_of(smoke_data(), ["distill.methods={kdd: {weight: 1}}"])
    assert "unknown aggregator" in error_of(smoke_data(), ["distill.aggregator.name=avg"])


def test_method_without_weight_is_ambiguous():
    message = error_of(smoke_data(), ["distill.methods={kd: {}}"])
    assert "explicit weight" in message


def test_missing_checkpoint_file(tmp_path):
    message = error_of(smoke_data(), [f"teachers.0.checkpoint={tmp_path / 'nope.pt'}"])
    assert message.startswith("teachers.0.checkpoint: file")


def test_a_teacher_checkpoint_is_verified_by_its_digest(tmp_path):
    weights = tmp_path / "t.pt"
    weights.write_bytes(b"weights")
    right = hashlib.sha256(b"weights").hexdigest()
    cfg = config_from_data(smoke_data(), [f"teachers.0.checkpoint={weights}", f"teachers.0.sha256={right}"])
    assert cfg.teachers[0].sha256 == right
    message = error_of(smoke_data(), [f"teachers.0.checkpoint={weights}", f"teachers.0.sha256={'f' * 64}"])
    assert message.startswith("teachers.0.checkpoint:") and right in message and "teachers.0.sha256" in message
    assert error_of(smoke_data(), [f"teachers.0.sha256={right}"]).startswith("teachers.0.sha256: the digest")


META_T = "distill.temperature={schedule: meta, T: 4.0}"


def test_a_temperature_learned_from_held_out_data_gets_a_meta_split_and_nothing_else_does():
    assert config_from_data(smoke_data()).data.meta_fraction == 0.0  # fixed T: no meta split, the split plan as before
    assert config_from_data(smoke_data(), [META_T]).data.meta_fraction == DEFAULT_META_FRACTION
    assert config_from_data(smoke_data(), [META_T, "data.meta_fraction=0.2"]).data.meta_fraction == 0.2
    assert config_from_data(smoke_data(), [META_T]).data.loader_kwargs(0)["meta_fraction"] == DEFAULT_META_FRACTION
    message = error_of(smoke_data(), [META_T, "data.meta_fraction=0"])
    assert message.startswith("data.meta_fraction:") and "validation split only selects" in message
    assert error_of(smoke_data(), ["data.meta_fraction=1.5"]).startswith("data.meta_fraction:")


def test_the_split_seed_fixes_the_split_plan_across_seeds():
    fixed = config_from_data(smoke_data(), ["data.split_seed=0", "seed=3"])
    assert fixed.data.loader_kwargs(fixed.seed)["seed"] == 0
    assert config_from_data(smoke_data(), ["seed=3"]).data.loader_kwargs(3)["seed"] == 3
    assert error_of(smoke_data(), ["data.split_seed=-1"]).startswith("data.split_seed:")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


def test_override_parses_yaml_values_and_list_indices():
    cfg = config_from_data(smoke_data(), ["teachers.0.model=cnn_small", "distill.temperature.T=2", "data.max_train=null"])
    assert cfg.teachers[0].model == "cnn_small"
    assert cfg.distill.temperature["T"] == 2
    assert cfg.data.max_train is None
    with pytest.raises(ConfigError, match="not an index"):
        config_from_data(smoke_data(), ["teachers.7.model=cnn_small"])


def test_stage_train_overrides_merge_over_the_defaults():
    cfg = config_from_data(smoke_data(), ["teachers.0.train={lr: 0.2}", "train.epochs=3"])
    merged = cfg.teacher_train(0)
    assert merged.lr == 0.2 and merged.epochs == 3
    assert cfg.student_train().lr == cfg.train.lr


def test_flatten_for_mlflow_params():
    assert flatten({"a": {"b": 1, "c": [2, {"d": 3}]}, "e": {}}) == {"a.b": 1, "a.c.0": 2, "a.c.1.d": 3, "e": "{}"}


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpmkd.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_validate_ok_and_error(tmp_path):
    ok = run_cli("validate", str(SMOKE), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("OK ") and "pipeline kd" in ok.stdout
    bad = run_cli("validate", str(SMOKE), "--set", "train.lr=-1", cwd=tmp_path)
    assert bad.returncode == 2
    assert "train.lr: must be > 0" in bad.stderr


def test_cli_run_with_bad_config_fails_before_anything_is_recorded(tmp_path):
    result = run_cli("run", str(SMOKE), "--set", "student.model=nope_net", cwd=tmp_path)
    assert result.returncode == 2
    assert "student.model: unknown model" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow store, no Ray: nothing started

"""The run configuration: schema defaults, presets, YAML/TOML files, overrides, error paths."""

import pytest

from vdn_pyro.config import (
    PRESETS,
    ConfigError,
    RunConfig,
    dump_config,
    load_config,
    parse_overrides,
    read_config_file,
    validate_config,
)

YAML_TEXT = """\
neurons:
  units: 8
  prior:
    kind: ar
    order: 2
  beta: 0.01
constraints:
  kl_band:
    enabled: false
fit:
  steps: 40
  lr: 1e-3
"""

TOML_TEXT = """\
[neurons]
units = 8
beta = 0.01

[neurons.prior]
kind = "ar"
order = 2

[constraints.kl_band]
enabled = false

[fit]
steps = 40
lr = 1e-3
"""


def test_every_option_has_a_default():
    config = validate_config({})
    assert config == RunConfig()
    assert config.data.source == "default"
    assert config.neurons.prior.kind == "ar"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate(name):
    config = load_config(preset=name)
    assert isinstance(config, RunConfig)


def test_quick_preset_is_tiny():
    config = load_config(preset="quick")
    assert config.fit.steps <= 10 and config.neurons.units <= 8


def test_yaml_and_toml_load_the_same_config(tmp_path):
    yaml_path, toml_path = tmp_path / "run.yaml", tmp_path / "run.toml"
    yaml_path.write_text(YAML_TEXT)
    toml_path.write_text(TOML_TEXT)
    from_yaml, from_toml = load_config(yaml_path), load_config(toml_path)
    assert from_yaml == from_toml
    assert from_yaml.neurons.prior.order == 2
    assert from_yaml.fit.lr == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string: still a number
    assert from_yaml.neurons.features == RunConfig().neurons.features  # untouched keys keep defaults


@pytest.mark.parametrize("suffix", ["yaml", "toml"])
def test_dump_round_trips(tmp_path, suffix):
    config = load_config(preset="quick", overrides=["neurons.beta=[0.1, 0.2, 0.3, 0.4]"])
    path = tmp_path / f"config.{suffix}"
    dump_config(config, path)
    assert load_config(path) == config


def test_layers_apply_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("fit:\n  steps: 40\n  lr: 0.5\n")
    config = load_config(path, preset="quick", overrides=["fit.lr=0.25"])
    assert config.fit.steps == 40  # the file beats the preset
    assert config.fit.lr == 0.25  # the override beats the file
    assert config.neurons.units == PRESETS["quick"]["neurons"]["units"]  # the preset beats the defaults


def test_parse_overrides_types():
    out = parse_overrides(["a.b=1e-3", "a.c=[0.05, 0.3]", "d=null", "e=true", "f=two", "g=3"])
    assert out == {"a": {"b": 0.001, "c": [0.05, 0.3]}, "d": None, "e": True, "f": "two", "g": 3}


@pytest.mark.parametrize(
    "data, path, message",
    [
        ({"neurons": {"prior": {"order": "two"}}}, "neurons.prior.order", "expected int >= 1, got 'two'"),
        ({"neurons": {"prior": {"order": 0}}}, "neurons.prior.order", "expected int >= 1, got 0"),
        ({"neurons": {"unitz": 3}}, "neurons.unitz", "unknown key (did you mean 'units'?)"),
        ({"fit": {"lr": -1}}, "fit.lr", "expected number > 0, got -1"),
        ({"fit": {"pyro_validation": "maybe"}}, "fit.pyro_validation", "expected true or false, got 'maybe'"),
        (
            {"neurons": {"instance_norm": "max"}},
            "neurons.instance_norm",
            "expected one of 'last', 'mean' or null",
        ),
        ({"neurons": {"prior": {"phi_range": [0.1, "a"]}}}, "neurons.prior.phi_range[1]", "expected number"),
        ({"neurons": {"beta": [0.1, 0.2]}}, "neurons.beta", "list of 32 numbers (one per unit)"),
        ({"data": {"train": 0.9, "val": 0.2}}, "data.val", "expected train + val < 1"),
        ({"data": 5}, "data", "expected a section (a mapping of keys), got 5"),
        ({"constraints": {"kl_band": {"low": 1.0, "high": 0.5}}}, "constraints.kl_band.high", "low < high"),
        ({"diagnostics": {"kl_band": [0.1]}}, "diagnostics.kl_band", "expected a list of 2 numbers >= 0"),
        ({"colour": "blue"}, "colour", "unknown key; expected one of data, neurons"),
    ],
    ids=[
        "ill-typed-int",
        "out-of-range",
        "unknown-key",
        "negative-lr",
        "ill-typed-bool",
        "bad-choice",
        "list-item",
        "beta-length",
        "cross-field",
        "not-a-section",
        "band-order",
        "band-length",
        "top-level",
    ],
)
def test_errors_name_the_dotted_path(data, path, message):
    with pytest.raises(ConfigError) as info:
        validate_config(data)
    assert info.value.path == path
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_exact_message_of_the_issue():
    with pytest.raises(ConfigError, match=r"^neurons\.prior\.order: expected int >= 1, got 'two'$"):
        load_config(overrides=["neurons.prior.order=two"])


def test_several_errors_are_reported_on_one_line():
    with pytest.raises(ConfigError) as info:
        validate_config({"fit": {"lr": 0, "steps": "x"}, "neurons": {"units": -1}})
    text = str(info.value)
    assert "\n" not in text
    assert "fit.lr" in text and "fit.steps" in text and "neurons.units" in text
    assert len(info.value.errors) == 3


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'quik' \\(did you mean 'quick'\\?\\)"):
        load_config(preset="quik")


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.yaml", "fit: [1, 2\n", "is not valid YAML"),
        ("bad.toml", "[fit\nsteps = 3\n", "is not valid TOML"),
        ("list.yaml", "- 1\n- 2\n", "expected a mapping of sections at the top level, got list"),
    ],
    ids=["yaml-syntax", "toml-syntax", "not-a-mapping"],
)
def test_bad_files(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_config_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("item", ["fit.lr", "=3", "fit..lr=3"])
def test_bad_override(item):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides([item])


def test_empty_yaml_file_is_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config(path) == RunConfig()

"""The run configuration: schema defaults, presets, YAML/TOML/JSON files, overrides, error paths."""

import re

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


def test_the_run_config_is_the_recipe_of_train_forecaster():
    """Every training key of the file reaches the TrainConfig, every network key the
    ForecasterConfig; a refusal of either names its section."""
    overrides = [
        "fit.select=nll",
        "fit.val_samples=7",
        "fit.skip_fit=sgd",
        "fit.ridges=[0.5, 2]",
        "fit.start_at_skip=false",
        "fit.steps=9",
        "fit.log_every=3",
        "fit.val_every=4",
        "data.chunk=3",
        "data.train_stride=5",
        "data.val_stride=6",
        "evaluate.batch_size=11",
        "neurons.mean=skip",
        "neurons.likelihood_scale=heteroscedastic",
        "neurons.train_draws=5",
    ]
    config = load_config(overrides=overrides)
    recipe = config.train_config()
    assert (recipe.select, recipe.num_samples, recipe.skip_fit, recipe.ridges) == (
        "nll",
        7,
        "sgd",
        (0.5, 2.0),
    )
    assert (recipe.start_at_skip, recipe.steps, recipe.log_every, recipe.val_every) == (False, 9, 3, 4)
    assert (recipe.chunk, recipe.train_stride, recipe.val_stride, recipe.eval_batch_size) == (3, 5, 6, 11)
    assert (recipe.lr, recipe.lr_decay, recipe.batch_size) == (config.fit.lr, config.fit.lr_decay, 32)
    network = config.forecaster_config()
    assert (network.mean, network.likelihood_scale, network.train_draws) == ("skip", "heteroscedastic", 5)
    assert (network.lookback, network.horizon) == (config.data.lookback, config.data.horizon)
    assert config.forecaster_config(deterministic=True).deterministic
    with pytest.raises(ConfigError, match="^neurons: mean='skip'") as info:
        load_config(overrides=["neurons.mean=skip"]).forecaster_config()
    assert info.value.path == "neurons"


@pytest.mark.parametrize("norm", ["none", "last", "mean_scale"])
def test_fit_norm_is_the_recipe_norm(norm):
    """``fit.norm`` reaches :class:`TrainConfig` ``norm``; ``none`` is the default."""
    assert load_config().train_config().norm == "none"
    assert load_config(overrides=[f"fit.norm={norm}"]).train_config().norm == norm


def test_protocol_and_paths_keys():
    """``data.protocol`` takes effect with ``data.split: protocol``; ``evaluate.paths`` is on by
    default and can be turned off."""
    config = load_config()
    assert (config.data.split, config.data.protocol, config.evaluate.paths) == ("ratio", "auto", True)
    config = load_config(
        overrides=["data.split=protocol", "data.protocol=long_horizon", "evaluate.paths=false"]
    )
    assert (config.data.split, config.data.protocol, config.evaluate.paths) == (
        "protocol",
        "long_horizon",
        False,
    )


def test_ett_preset_is_the_benchmark_recipe():
    """The H = 96 recipe of the README's ETTh1 table: the closed-form skip path as the mean, the
    neurons on the scale, selection on the validation CRPS, no constraint."""
    config = load_config(preset="ett")
    assert (config.data.source, config.data.split, config.data.lookback, config.data.horizon) == (
        "ett",
        "ett_hourly",
        336,
        96,
    )
    recipe, network = config.train_config(), config.forecaster_config()
    assert (recipe.skip_fit, recipe.select, recipe.start_at_skip) == ("ridge", "crps", True)
    assert (network.mean, network.likelihood_scale, network.units) == ("skip", "heteroscedastic", 64)
    assert recipe.batch_size * recipe.chunk == 256  # windows per step
    sections = config.constraints
    assert not any(getattr(sections, name).enabled for name in type(sections).model_fields)


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
        ({"fit": {"select": "accuracy"}}, "fit.select", "expected one of 'loss', 'crps', 'mse', 'nll'"),
        ({"fit": {"skip_fit": "closed"}}, "fit.skip_fit", "expected one of 'joint', 'ridge', 'sgd'"),
        ({"fit": {"ridges": []}}, "fit.ridges", "expected a non-empty list of numbers >= 0, got []"),
        ({"fit": {"ridges": [0.1, -1]}}, "fit.ridges[1]", "expected number >= 0, got -1"),
        ({"fit": {"norm": "z"}}, "fit.norm", "expected one of 'none', 'last', 'mean_scale', got 'z'"),
        (
            {"data": {"split": "protocol", "protocol": "etth"}},
            "data.protocol",
            "expected one of 'auto', 'ett', 'long_horizon', got 'etth'",
        ),
        ({"data": {"protocol": "ett"}}, "data.protocol", "expected split 'protocol' for protocol 'ett'"),
        ({"data": {"split": "months"}}, "data.split", "expected one of 'ratio', 'ett_hourly', 'protocol'"),
        ({"evaluate": {"paths": "often"}}, "evaluate.paths", "expected true or false, got 'often'"),
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
        "selection",
        "skip-fit",
        "no-ridges",
        "negative-ridge",
        "norm",
        "protocol",
        "protocol-without-split",
        "split",
        "paths",
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


@pytest.mark.parametrize(
    "name, text",
    [("empty.yaml", ""), ("comments.yaml", "# nothing\n"), ("empty.toml", ""), ("empty.json", "{}")],
)
def test_a_file_without_options_is_refused(tmp_path, name, text):
    """An empty file is a mistake (a file not saved, the wrong file), not a request for the
    defaults, which is what giving no file means."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match="holds no option .*to run with the defaults, give no file"):
        load_config(path)


def test_json_files_are_read(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"neurons": {"units": 8, "prior": {"order": 2}}, "fit": {"lr": 0.001}}')
    config = load_config(path)
    assert config.neurons.units == 8 and config.neurons.prior.order == 2 and config.fit.lr == 0.001
    dump_config(config, tmp_path / "again.json")
    assert load_config(tmp_path / "again.json") == config


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.json", '{"fit": {"lr": 0.01,}}', "is not valid JSON"),
        ("run.cfg", "fit:\n  lr: 0.01\n", "expected a .yaml, .yml, .toml, .json file, got the suffix '.cfg'"),
        ("run", "fit:\n  lr: 0.01\n", "got the suffix '(none)'"),
    ],
    ids=["json-syntax", "unknown-suffix", "no-suffix"],
)
def test_files_of_other_kinds_are_refused(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        read_config_file(path)


@pytest.mark.parametrize(
    "data, path, message",
    [
        ({"fit": {"lr": float("inf")}}, "fit.lr", "expected number > 0, got inf"),
        ({"fit": {"lr": float("nan")}}, "fit.lr", "expected number > 0, got nan"),
        ({"neurons": {"prior": {"phi": float("inf")}}}, "neurons.prior.phi", "got inf"),
        ({"neurons": {"units": True}}, "neurons.units", "expected int >= 1, got true (a boolean)"),
        ({"fit": {"steps": False}}, "fit.steps", "expected int >= 1 or null, got false (a boolean)"),
        ({"fit": {"lr": True}}, "fit.lr", "expected number > 0, got true (a boolean)"),
        ({"neurons": {"beta": [True] * 32}}, "neurons.beta", "expected number > 0 or a list of numbers > 0"),
        ({"output": {"dpi": 100000}}, "output.dpi", "expected int >= 10 and <= 600, got 100000"),
    ],
    ids=["inf", "nan", "inf-in-a-section", "bool-int", "bool-optional-int", "bool-float", "bool-list", "dpi"],
)
def test_non_finite_booleans_and_absurd_sizes_are_refused(data, path, message):
    with pytest.raises(ConfigError) as info:
        validate_config(data)
    assert info.value.path == path and message in str(info.value)


def test_yaml_inf_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("fit:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match=r"^fit\.lr: expected number > 0, got inf$"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^fit\.lr: expected number > 0, got inf$"):
        load_config(overrides=["fit.lr=.inf"])


def test_booleans_stay_booleans():
    """Where a boolean is one of the accepted kinds, ``true`` is still a boolean."""
    config = validate_config({"constraints": {"loc_band": {"project": True}}, "fit": {"restore_best": False}})
    assert config.constraints.loc_band.project is True and config.fit.restore_best is False

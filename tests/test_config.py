import dataclasses
from typing import Literal

import pytest

from grpo_jax import config
from grpo_jax.config import ConfigError, from_dict, from_yaml, to_dict
from grpo_jax.presets import PRESETS, AlgoConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inner:
    n: int = 1
    names: tuple[str, ...] = ()
    extra: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outer:
    mode: Literal["a", "b"] = "a"
    lr: float = 1e-3
    flag: bool = False
    maybe: int | None = None
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_nested_types_are_checked_and_converted():
    cfg = from_dict(Outer, {"mode": "b", "lr": "5e-6", "flag": True, "maybe": 3,
                            "inner": {"n": 2, "names": ["x", "y"], "extra": {"w": 1}}})
    assert cfg == Outer(mode="b", lr=5e-6, flag=True, maybe=3, inner=Inner(n=2, names=("x", "y"), extra={"w": 1.0}))
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data, message",
    [
        ({"inner": {"m": 1}}, r"inner\.m: unknown key; Inner has \['extra', 'n', 'names'\]"),
        ({"mode": "c"}, r"mode: 'c' is not allowed; choose one of \['a', 'b'\]"),
        ({"lr": "fast"}, r"lr: expected a number"),
        ({"flag": 1}, r"flag: expected true/false"),
        ({"inner": {"n": 1.5}}, r"inner\.n: expected an integer"),
        ({"inner": {"n": True}}, r"inner\.n: expected an integer"),
        ({"inner": {"names": "x"}}, r"inner\.names: expected a list"),
        ({"inner": 3}, r"inner: expected a mapping"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_yaml_preset_and_dotted_overrides(tmp_path):
    path = tmp_path / "algo.yaml"
    path.write_text("preset: dapo\nloss:\n  beta: 1e-3\n")
    cfg = from_yaml(AlgoConfig, path, overrides=["loss.clip_high=0.3", "advantage.scale=none"])
    assert cfg.loss.beta == 0.001 and cfg.loss.clip_high == 0.3 and cfg.loss.agg == "token-mean"
    assert cfg.advantage.scale == "none"
    with pytest.raises(ConfigError, match=r"loss\.betta: unknown key"):
        from_yaml(AlgoConfig, path, overrides=["loss.betta=0.1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        from_yaml(AlgoConfig, path, overrides=["loss.beta"])
    with pytest.raises(ConfigError, match="does not exist"):
        from_yaml(AlgoConfig, tmp_path / "missing.yaml")


def test_post_init_invariants_are_config_errors():
    with pytest.raises(ConfigError, match="clip_low must be in"):
        from_dict(AlgoConfig, {"loss": {"clip_low": 1.5}})
    with pytest.raises(ConfigError, match="norm_len"):
        from_dict(AlgoConfig, {"loss": {"agg": "token-mean", "norm_len": 100}})
    with pytest.raises(ConfigError, match="dual_clip"):
        from_dict(AlgoConfig, {"loss": {"kind": "cispo", "dual_clip": 3.0}})
    with pytest.raises(ConfigError, match="rloo"):
        from_dict(AlgoConfig, {"advantage": {"estimator": "rloo", "scale": "group"}})
    with pytest.raises(ConfigError, match=r"unknown preset 'grpoo'; choose one of \['bnpo'"):
        from_dict(AlgoConfig, {"preset": "grpoo"})


def test_every_preset_round_trips_through_yaml(tmp_path):
    for name, make in PRESETS.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(config.to_yaml(make()))
        assert from_yaml(AlgoConfig, path) == make() == AlgoConfig.from_preset(name)
        assert "arXiv" in make.__doc__  # every preset cites its source

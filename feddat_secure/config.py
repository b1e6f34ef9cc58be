"""The run configuration: dataclasses, strict TOML validation, and a resolved TOML dump.

Every mistake is reported as one :class:`ConfigError` line that names the key, so the CLI
can print it and exit 2 without a traceback.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .model.adapters import DEFAULT_TARGET_MODULES

BENCHMARKS = ("function", "domain", "scene", "digits", "digits-skew", "folder")
ALGORITHMS = ("feddat", "fedavg", "fedprox", "local", "centralized")


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or impossible."""


def _choice(*options: str, default: str) -> Any:
    return field(default=default, metadata={"choices": options})


def _at_least(minimum: float, default: Any, *, above: bool = False) -> Any:
    return field(default=default, metadata={"minimum": minimum, "strict": above})


@dataclass(frozen=True)
class ModelConfig:
    path: str = "embedded"  # "embedded" or a local folder with a ViLT checkpoint and its tokenizer
    random_init: bool = False  # build from the folder's config only, ignoring its weights
    head: str = _choice("local", "shared", default="local")
    lora_rank: int = _at_least(1, 8)
    lora_alpha: float = _at_least(0, 16.0, above=True)
    lora_dropout: float = _at_least(0, 0.0)
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES


@dataclass(frozen=True)
class DataConfig:
    benchmark: str = _choice(*BENCHMARKS, default="function")
    path: str = ""  # root folder of the "folder" benchmark
    num_clients: int = _at_least(1, 5)
    train_per_client: int = _at_least(1, 200)
    test_per_client: int = _at_least(1, 100)


@dataclass(frozen=True)
class FederationConfig:
    algorithm: str = _choice(*ALGORITHMS, default="feddat")
    rounds: int = _at_least(1, 5)
    clients_per_round: int = _at_least(0, 0)  # 0: every client, every round
    aggregation: str = _choice("examples", "uniform", default="examples")
    fedprox_mu: float = _at_least(0, 0.01)


@dataclass(frozen=True)
class TrainingConfig:
    local_steps: int = _at_least(1, 20)
    batch_size: int = _at_least(1, 16)
    learning_rate: float = _at_least(0, 1e-3, above=True)
    weight_decay: float = _at_least(0, 0.0)
    schedule: str = _choice("constant", "linear", default="constant")
    temperature: float = _at_least(0, 3.0, above=True)
    task_weight: float = _at_least(0, 0.5)
    distill_weight: float = _at_least(0, 0.5)
    eval_batch_size: int = _at_least(1, 256)


@dataclass(frozen=True)
class MaskedOptions:
    """SecAgg+ (protocols.masked); 0 means "the documented default for this many clients"."""

    clip_range: float = _at_least(0, 0.25, above=True)  # each update value is clipped to [-r, r]
    quantization_bits: int = _at_least(1, 16)
    modulus_bits: int = _at_least(8, 32)
    neighbours: int = _at_least(0, 0)
    threshold: int = _at_least(0, 0)
    graph: str = _choice("sparse", "complete", default="sparse")


@dataclass(frozen=True)
class HEOptions:
    """CKKS through TenSEAL (protocols.he)."""

    poly_modulus_degree: int = _at_least(1024, 8192)
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40)
    global_scale_bits: int = _at_least(1, 40)
    min_clients: int = _at_least(1, 2)


@dataclass(frozen=True)
class SecureAggregationConfig:
    protocol: str = _choice("plain", "masked", "he", default="masked")  # plain: the insecure reference
    keys: str = ""  # folder from `feddat-secure keys create`; empty: fresh identities in the run folder
    masked: MaskedOptions = MaskedOptions()
    he: HEOptions = HEOptions()


@dataclass(frozen=True)
class AuditConfig:
    enabled: bool = True
    tree_head_every: int = _at_least(1, 64)


@dataclass(frozen=True)
class RecordPrivacyConfig:
    """Record-level DP-SGD (Opacus) on every parameter a site trains on its data."""

    enabled: bool = False
    noise_multiplier: float = _at_least(0, 1.0)
    max_grad_norm: float = _at_least(0, 1.0, above=True)
    target_epsilon: float = _at_least(0, 0.0)  # > 0: calibrate noise_multiplier for the planned rounds
    delta: float = _at_least(0, 1e-5, above=True)
    budget_epsilon: float = _at_least(0, 0.0)  # > 0: a round that would exceed it is not run
    accountant: str = _choice("rdp", "prv", default="rdp")
    reproducible: bool = False  # true: sampling and noise from the run seed (tests only: no privacy if it is known)


@dataclass(frozen=True)
class ClientPrivacyConfig:
    """Client-level DP (DP-FedAvg): clip each site's update, add Gaussian (or distributed discrete) noise."""

    placement: str = _choice("off", "central", "local", "distributed", default="off")
    clip_norm: float = _at_least(0, 0.1, above=True)
    noise_multiplier: float = _at_least(0, 1.0)
    target_epsilon: float = _at_least(0, 0.0)
    delta: float = _at_least(0, 1e-5, above=True)
    budget_epsilon: float = _at_least(0, 0.0)
    accountant: str = _choice("rdp", "prv", default="rdp")
    tolerated_dropouts: int = _at_least(0, 0)  # distributed: noise shares sized so this many may drop out
    adaptive_clipping: bool = False  # central: clip norm follows a quantile of update norms (Andrew et al. 2021)
    target_quantile: float = _at_least(0, 0.5, above=True)
    clip_learning_rate: float = _at_least(0, 0.2, above=True)
    count_noise_std: float = _at_least(0, 0.0)  # σ_b, noise std of the unclipped count; 0: max(m/20, noise_multiplier)
    reproducible: bool = False  # true: noise from the run seed (tests only: no privacy if it is known)


@dataclass(frozen=True)
class PrivacyConfig:
    record: RecordPrivacyConfig = RecordPrivacyConfig()
    client: ClientPrivacyConfig = ClientPrivacyConfig()


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    federation: FederationConfig = FederationConfig()
    training: TrainingConfig = TrainingConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    audit: AuditConfig = AuditConfig()

    def participants_per_round(self, num_clients: int) -> int:
        return self.federation.clients_per_round or num_clients

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(to_dict(self), sort_keys=True).encode()).hexdigest()


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            raw = tomllib.load(stream)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {error}") from None
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    config = _build(RunConfig, raw, prefix="")
    _check_consistency(config)
    return config


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown key {prefix + key!r}; known keys here: {', '.join(known)}")
    values = {}
    for name, spec in known.items():
        if name not in raw:
            continue
        key = prefix + name
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], raw[name], prefix=key + ".")
        else:
            values[name] = _check_value(key, raw[name], hints[name], spec.metadata)
    return cls(**values)


def _check_value(key: str, value: Any, hint: Any, metadata: Any) -> Any:
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif hint == tuple[int, ...]:
        ok = isinstance(value, list) and bool(value) and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        value = tuple(value) if ok else value
    else:  # tuple[str, ...]
        ok = isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)
        value = tuple(value) if ok else value
    if not ok:
        expected = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
                    tuple[int, ...]: "a non-empty list of positive integers"}.get(hint, "a non-empty list of strings")
        raise ConfigError(f"key {key!r} must be {expected}, got {value!r}")
    if "choices" in metadata and value not in metadata["choices"]:
        raise ConfigError(f"key {key!r} must be one of {', '.join(metadata['choices'])}; got {value!r}")
    if "minimum" in metadata:
        low, strict = metadata["minimum"], metadata["strict"]
        if value < low or (strict and value == low):
            raise ConfigError(f"key {key!r} must be {'>' if strict else '>='} {low}, got {value!r}")
    return value


def _check_consistency(config: RunConfig) -> None:
    data, federation = config.data, config.federation
    if data.benchmark != "folder" and federation.clients_per_round > data.num_clients:
        raise ConfigError(f"key 'federation.clients_per_round' is {federation.clients_per_round}, more than "
                          f"the {data.num_clients} clients of 'data.num_clients'")
    if data.benchmark == "folder" and not data.path:
        raise ConfigError("key 'data.path' must name the data folder when data.benchmark is 'folder'")
    if data.benchmark != "folder" and data.path:
        raise ConfigError(f"key 'data.path' is only used by the 'folder' benchmark, not {data.benchmark!r}")
    private = config.privacy
    if config.federation.algorithm == "centralized" and (private.record.enabled or private.client.placement != "off"):
        raise ConfigError("differential privacy is for federated runs; the 'centralized' reference pools the data "
                          "and has none (set privacy.record.enabled = false and privacy.client.placement = 'off')")
    if private.client.placement != "off":
        if federation.algorithm == "local":
            raise ConfigError("key 'privacy.client.placement': 'local' training sends no updates to protect")
        if federation.aggregation != "uniform":
            raise ConfigError("key 'federation.aggregation' must be 'uniform' with client-level DP (a site's weight "
                              "would multiply its sensitivity)")
    if not config.name or "/" in config.name or config.name.startswith("."):
        raise ConfigError(f"key 'name' must be a plain folder name, got {config.name!r}")


def to_dict(config: Any) -> dict[str, Any]:
    return {
        f.name: to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
        for f in dataclasses.fields(config)
        for v in [getattr(config, f.name)]
    }


def to_toml(config: RunConfig) -> str:
    """The resolved configuration as TOML that :func:`load_config` reads back unchanged."""
    return "\n".join(_toml_table(to_dict(config), "")).lstrip("\n") + "\n"


def _toml_table(values: dict[str, Any], name: str) -> list[str]:
    scalars = [f"{key} = {_toml_value(value)}" for key, value in values.items() if not isinstance(value, dict)]
    lines = [f"\n[{name}]", *scalars] if name and scalars else scalars
    for key, value in values.items():
        if isinstance(value, dict):
            lines += _toml_table(value, f"{name}.{key}" if name else key)
    return lines


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # a JSON string literal is a valid TOML basic string

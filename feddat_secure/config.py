"""The run configuration: dataclasses, strict TOML validation, and a resolved TOML dump.

Every mistake is reported as one :class:`ConfigError` line that names the key, so the CLI can print it and
exit 2 without a traceback. Everything that depends on the configuration alone is checked when it loads
(:func:`load_config`, :func:`config_from_dict`): types, ranges (every number finite), strings, sizes and the
rules that join keys. What needs the model or the data (:func:`check_against_model`,
:func:`check_against_data`) is checked by the runner before it creates the run folder. The code that uses a
configuration therefore never has to refuse one; it raises plain ``ValueError`` for impossible arguments.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import tomllib
import typing
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocols import ConfigurationError, options_class, registered_protocols
from protocols.he import HEOptions
from protocols.masked import MaskedOptions

from .data.questions import FAMILIES as QUESTION_FAMILIES
from .data.synthetic import check_families
from .errors import FeddatError
from .federation.algorithms import get_algorithm, registered_algorithms
from .model.lora_targets import DEFAULT_TARGET_MODULES, matches_target

SYNTHETIC_BENCHMARKS = ("function", "domain", "scene", "task", "texture")
BENCHMARKS = (*SYNTHETIC_BENCHMARKS, "digits", "digits-skew", "easy-vqa", "folder")
ALGORITHMS = (*registered_algorithms(), "centralized")  # "centralized" is a run mode of its own (pooled data)

# Bounds on what a run may ask for. The simulation holds every site's copy of the model and every generated
# example in one process, so these stop a typo (num_clients = 1000000) before it exhausts the machine.
MAX_CLIENTS = 1_000
MAX_GENERATED_EXAMPLES = 200_000  # num_clients × (train_per_client + test_per_client) of a generated benchmark
MAX_ROUNDS = 10_000
MAX_LOCAL_STEPS = 10_000
MAX_BATCH_SIZE = 4_096
MAX_LORA_RANK = 1_024  # and at most the model's hidden size, checked against the model
MAX_SEED = 2**32 - 1  # what numpy's legacy seeding accepts; seed × 1000 + site also stays within torch's range
MAX_NAME_BYTES = 255  # a folder name on common file systems

# Adaptive clipping sends each site's clipping indicator as one more coordinate of its protocol input, scaled
# by this factor (feddat_secure/privacy/run_privacy.py imports it from here); the masked protocol clips every
# coordinate to its clip_range, which must therefore hold it.
INDICATOR_SCALE = 0.2

UNBOUNDED = "unbounded"  # a privacy budget_epsilon with no limit (what a missing key means too)
_MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


class ConfigError(FeddatError, ValueError):
    """A configuration value is unknown, of the wrong type or impossible."""


def _choice(*options: str, default: str) -> Any:
    return field(default=default, metadata={"choices": options})


def _range(default: Any, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Any:
    """A number field and its allowed range (``low_open``/``high_open``: the bound itself is excluded). The
    keys ``minimum`` and ``strict`` are the ones the protocols' options classes use too."""
    metadata: dict[str, Any] = {}
    if low is not None:
        metadata.update(minimum=low, strict=low_open)
    if high is not None:
        metadata.update(maximum=high, strict_maximum=high_open)
    return field(default=default, metadata=metadata)


def _budget() -> Any:
    """A privacy budget ε: a positive number, or ``"unbounded"`` (the default: a missing key means no budget).
    Held as ``math.inf``; 0 is refused, as it once meant "no budget" and hid runs that spent without limit."""
    return field(default=math.inf, metadata={"minimum": 0, "strict": True, "unbounded": True})


@dataclass(frozen=True)
class ModelConfig:
    path: str = "embedded"  # "embedded", "embedded-v2" .. "-v4", or a local folder: a ViLT checkpoint + tokenizer
    random_init: bool = False  # build from the folder's config only, ignoring its weights
    head: str = _choice("local", "shared", default="local")
    lora_rank: int = _range(8, low=1, high=MAX_LORA_RANK)
    lora_alpha: float = _range(16.0, low=0, low_open=True, high=4096)
    lora_dropout: float = _range(0.0, low=0, high=1, high_open=True)
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES


@dataclass(frozen=True)
class DataConfig:
    benchmark: str = _choice(*BENCHMARKS, default="function")
    path: str = ""  # root folder of the "folder" benchmark
    num_clients: int = _range(5, low=1, high=MAX_CLIENTS)
    train_per_client: int = _range(200, low=1, high=MAX_GENERATED_EXAMPLES)
    test_per_client: int = _range(100, low=1, high=MAX_GENERATED_EXAMPLES)
    # > 0: every site holds out the last fraction of its training examples and is scored on them instead of its
    # test split (choosing hyperparameters without ever seeing a test example)
    validation_fraction: float = _range(0.0, low=0, high=0.5)
    # the synthetic benchmarks' question families (function: site i asks families[i mod len]; domain, scene: every
    # listed family at every site); ["existence", "attribute", "counting"] keeps the ones the image answers
    question_families: tuple[str, ...] = QUESTION_FAMILIES


@dataclass(frozen=True)
class FederationConfig:
    algorithm: str = _choice(*ALGORITHMS, default="feddat")
    rounds: int = _range(5, low=1, high=MAX_ROUNDS)
    clients_per_round: int = _range(0, low=0, high=MAX_CLIENTS)  # 0: every client, every round
    aggregation: str = _choice("examples", "uniform", default="examples")
    fedprox_mu: float = _range(0.01, low=0, high=100)


@dataclass(frozen=True)
class TrainingConfig:
    local_steps: int = _range(20, low=1, high=MAX_LOCAL_STEPS)
    batch_size: int = _range(16, low=1, high=MAX_BATCH_SIZE)  # and at most a site's training examples
    learning_rate: float = _range(1e-3, low=0, low_open=True, high=1)
    weight_decay: float = _range(0.0, low=0)  # with learning_rate × weight_decay < 1
    schedule: str = _choice("constant", "linear", default="constant")
    temperature: float = _range(3.0, low=0.01, high=100)  # logits / T and T² stay far from float32's limits
    task_weight: float = _range(0.5, low=0, high=100)
    distill_weight: float = _range(0.5, low=0, high=100)
    eval_batch_size: int = _range(256, low=1, high=MAX_BATCH_SIZE)
    # FedDAT ablations (docs/configuration.md): A_c is trained in the first N rounds only (0: every round; 1: as
    # the official code's A_c, which lost requires_grad after round 1), and A_c's optimizer also steps the local
    # head on the DAT's loss (modelled on the official code's one optimizer over every parameter)
    client_adapter_rounds: int = _range(0, low=0, high=MAX_ROUNDS)
    head_in_dat_loss: bool = False
    # FedDAT: > 0, a site evaluates and keeps the exponential moving average of its own parameters (A_c, a local
    # head) over its steps, with this decay; free post-processing under DP (training/weight_average.py)
    ema_decay: float = _range(0.0, low=0, high=1, high_open=True)


@dataclass(frozen=True)
class SecureAggregationConfig:
    """The protocol and its options. Each options table is the protocol's own options dataclass (defined once,
    in protocols/), so a key is checked here exactly as the protocol checks it; the fields the runner
    supplies (``metadata={"runtime": True}``: seeds, weight and noise bounds) are no configuration keys."""

    # any registered protocol (protocols.registry); "plain" is the insecure reference
    protocol: str = field(default="masked", metadata={"choices": registered_protocols})
    keys: str = ""  # folder from `feddat-secure keys create`; empty: fresh identities in the run folder
    masked: MaskedOptions = MaskedOptions()  # [secure_aggregation.masked]: SecAgg+, 0 = the default for n clients
    he: HEOptions = HEOptions()  # [secure_aggregation.he]: CKKS through TenSEAL

    @property
    def protocol_options(self) -> Any:
        """The chosen protocol's options from its table, or None when it has no table here (its defaults)."""
        options = getattr(self, self.protocol, None)
        return options if isinstance(options, options_class(self.protocol)) else None


@dataclass(frozen=True)
class AuditConfig:
    enabled: bool = True
    tree_head_every: int = _range(64, low=1)
    # where the run's signed audit receipt is written when it closes, outside the run folder ("":
    # $FEDDAT_SECURE_RECEIPT_DIR, else $XDG_DATA_HOME/feddat-secure/audit-receipts; docs/audit.md)
    receipt_dir: str = ""


@dataclass(frozen=True)
class RecordPrivacyConfig:
    """Record-level DP-SGD (Opacus) on every parameter a site trains on its data."""

    enabled: bool = False
    noise_multiplier: float = _range(1.0, low=0)
    max_grad_norm: float = _range(1.0, low=0, low_open=True)
    target_epsilon: float = _range(0.0, low=0)  # > 0: calibrate noise_multiplier for the planned rounds
    delta: float = _range(1e-5, low=0, low_open=True, high=1, high_open=True)
    budget_epsilon: float = _budget()  # a round that would exceed it is not run
    # the budget of the site's dataset across all runs (docs/privacy.md "One budget per dataset"); fixed when the
    # dataset's ledger is created; 0: this run's budget_epsilon
    dataset_budget_epsilon: float = field(default=0.0, metadata={"minimum": 0, "strict": False, "unbounded": True})
    accountant: str = _choice("rdp", "prv", default="rdp")
    reproducible: bool = False  # true: sampling and noise from the run seed (tests only: no privacy if it is known)
    # FedDAT: σ of the client adapter's DP-SGD step over σ of the shared adapter's (with the head), both on the same
    # batch; 1: equal. The batch is accounted as one Gaussian mechanism of (σ_s⁻² + σ_c⁻²)^-½ (docs/privacy.md)
    client_adapter_noise_ratio: float = _range(1.0, low=0.01, high=100)


@dataclass(frozen=True)
class ClientPrivacyConfig:
    """Client-level DP (DP-FedAvg): clip each site's update, add Gaussian (or distributed discrete) noise."""

    placement: str = _choice("off", "central", "local", "distributed", default="off")
    clip_norm: float = _range(0.1, low=0, low_open=True)
    noise_multiplier: float = _range(1.0, low=0)
    target_epsilon: float = _range(0.0, low=0)
    delta: float = _range(1e-5, low=0, low_open=True, high=1, high_open=True)
    budget_epsilon: float = _budget()
    accountant: str = _choice("rdp", "prv", default="rdp")
    # distributed: noise shares sized so this many may drop out
    tolerated_dropouts: int = _range(0, low=0, high=MAX_CLIENTS - 1)
    adaptive_clipping: bool = False  # central: clip norm follows a quantile of update norms (Andrew et al. 2021)
    target_quantile: float = _range(0.5, low=0, low_open=True, high=1, high_open=True)
    clip_learning_rate: float = _range(0.2, low=0, low_open=True, high=10)  # C ← C·exp(−η(b̄ − γ)) stays finite
    count_noise_std: float = _range(0.0, low=0)  # σ_b, noise std of the unclipped count; 0: max(m/20, noise_multiplier)
    reproducible: bool = False  # true: noise from the run seed (tests only: no privacy if it is known)


@dataclass(frozen=True)
class PrivacyConfig:
    record: RecordPrivacyConfig = RecordPrivacyConfig()
    client: ClientPrivacyConfig = ClientPrivacyConfig()
    # where each site's dataset ledger lives in a simulation ("": $FEDDAT_SECURE_LEDGER_DIR, else
    # $XDG_DATA_HOME/feddat-secure/privacy-ledgers); a deployed site uses `site serve --dataset-ledger-dir`
    dataset_ledger_dir: str = ""
    # With any DP level on, a site keeps what it computes from its records outside an accounted mechanism
    # (training losses, the protocol's clipped count, test accuracies) in its own folder; true sends them to
    # the server too, and every site's ledger lists them as unprotected releases (docs/privacy.md).
    share_site_metrics: bool = False


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    seed: int = _range(0, low=0, high=MAX_SEED)
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
    except OSError as error:
        raise ConfigError(f"cannot read config file {str(path)!r}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text") from None
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
    known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("runtime")}
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
    try:
        return cls(**values)
    except ConfigurationError as error:  # a protocol options class's own checks (cross-field ones too)
        key = prefix + error.option if error.option in known else prefix.rstrip(".")
        raise ConfigError(f"key {key!r}: {error}") from None


def _check_value(key: str, value: Any, hint: Any, metadata: Any) -> Any:
    if metadata.get("unbounded") and (value == UNBOUNDED or (isinstance(value, float) and value == math.inf)):
        return math.inf
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = _as_float(value) if ok else value
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
        if metadata.get("unbounded"):
            expected = f'a positive number or "{UNBOUNDED}"'
        raise ConfigError(f"key {key!r} must be {expected}, got {_shown(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        alternative = f' (or "{UNBOUNDED}")' if metadata.get("unbounded") else ""
        raise ConfigError(f"key {key!r} must be a finite number{alternative}, got {_shown(value)}")
    for text in value if isinstance(value, tuple) else (value,):
        if isinstance(text, str) and any(unicodedata.category(c) == "Cc" for c in text):
            raise ConfigError(f"key {key!r} must not contain control characters (NUL, newline, tab, ...), "
                              f"got {_shown(value)}")
    if "choices" in metadata:
        choices = metadata["choices"]() if callable(metadata["choices"]) else metadata["choices"]
        if value not in choices:
            raise ConfigError(f"key {key!r} must be one of {', '.join(choices)}; got {_shown(value)}")
    _check_range(key, value, metadata)
    return value


def _check_range(key: str, value: Any, metadata: Any) -> None:
    low, high = metadata.get("minimum"), metadata.get("maximum")
    below = low is not None and (value < low or (metadata["strict"] and value == low))
    above = high is not None and (value > high or (metadata["strict_maximum"] and value == high))
    if not (below or above):
        return
    if high is None:
        allowed = f"{'>' if metadata['strict'] else '>='} {low}"
    elif isinstance(value, int):
        allowed = f"an integer in {low}..{high}"
    else:
        allowed = f"in {'(' if metadata['strict'] else '['}{low}, {high}{')' if metadata['strict_maximum'] else ']'}"
    hint = f' (leave it out or write "{UNBOUNDED}" for no budget)' if metadata.get("unbounded") else ""
    raise ConfigError(f"key {key!r} must be {allowed}{hint}, got {_shown(value)}")


def _as_float(number: int | float) -> float:
    """The number as a float; an integer too large for one becomes inf (and is refused as not finite)."""
    try:
        return float(number)
    except OverflowError:
        return math.inf if number > 0 else -math.inf


def _shown(value: Any) -> str:
    """A value as an error message quotes it: its repr, cut short so the message stays one readable line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)"


def _check_consistency(config: RunConfig) -> None:
    _check_name(config.name)
    data, federation, training = config.data, config.federation, config.training
    if data.benchmark == "folder":
        if not data.path:
            raise ConfigError("key 'data.path' must name the data folder when data.benchmark is 'folder'")
    else:
        if data.path:
            raise ConfigError(f"key 'data.path' is only used by the 'folder' benchmark, not {data.benchmark!r}")
        if federation.clients_per_round > data.num_clients:
            raise ConfigError(f"key 'federation.clients_per_round' is {federation.clients_per_round}, more than "
                              f"the {data.num_clients} clients of 'data.num_clients'")
        examples = data.num_clients * (data.train_per_client + data.test_per_client)
        if examples > MAX_GENERATED_EXAMPLES:
            raise ConfigError(f"keys 'data.num_clients' × ('data.train_per_client' + 'data.test_per_client') ask "
                              f"for {examples:,} generated examples; at most {MAX_GENERATED_EXAMPLES:,} are made "
                              "(all are held in memory)")
    if training.learning_rate * training.weight_decay >= 1:
        raise ConfigError(f"key 'training.weight_decay' is {training.weight_decay:g}: with learning_rate "
                          f"{training.learning_rate:g} their product must be < 1 (AdamW multiplies every weight by "
                          "1 − learning_rate × weight_decay each step)")
    if federation.algorithm == "feddat" and training.task_weight == 0:
        raise ConfigError("key 'training.task_weight' must be > 0 with FedDAT: without the cross-entropy term no "
                          "adapter learns from the labels")
    ablations = [key for key, on in (("client_adapter_rounds", training.client_adapter_rounds),
                                     ("head_in_dat_loss", training.head_in_dat_loss)) if on]
    if ablations and federation.algorithm != "feddat":
        raise ConfigError(f"key 'training.{ablations[0]}' is a FedDAT ablation; federation.algorithm is "
                          f"{federation.algorithm!r}")
    if training.ema_decay and federation.algorithm != "feddat":
        raise ConfigError(f"key 'training.ema_decay' averages FedDAT's own parameters (A_c, a local head); "
                          f"federation.algorithm is {federation.algorithm!r}")
    if ablations and config.privacy.record.enabled:
        raise ConfigError(f"key 'training.{ablations[0]}' is an ablation without record-level DP, whose accounting "
                          "counts both of FedDAT's DP-SGD steps on every batch (remove it, or set "
                          "privacy.record.enabled = false)")
    if training.client_adapter_rounds and training.client_adapter_rounds >= federation.rounds:
        raise ConfigError(f"key 'training.client_adapter_rounds' is {training.client_adapter_rounds}: it must be "
                          f"below federation.rounds ({federation.rounds}), or it changes nothing")
    if training.client_adapter_rounds and federation.clients_per_round:
        raise ConfigError("key 'training.client_adapter_rounds' counts the federation's rounds: with a sampled "
                          "cohort (federation.clients_per_round) a site first sampled later would never train A_c")
    if training.head_in_dat_loss and config.model.head != "local":
        raise ConfigError("key 'training.head_in_dat_loss' steps a site's own head with A_c's optimizer: it needs "
                          "model.head = 'local'")
    _check_target_modules(config.model.target_modules)
    _check_question_families(config.data)
    _check_privacy(config)


def _check_name(name: str) -> None:
    """The run folder's name: one plain folder inside output_dir, as typed (no path, nothing hidden)."""
    problem = None
    if not name.strip():
        problem = "must not be empty or only spaces"
    elif name != name.strip():
        problem = "must not begin or end with spaces"
    elif "/" in name or "\\" in name:
        problem = "must be a plain folder name (no '/' or '\\')"
    elif name.startswith("."):
        problem = "must not begin with '.' (a hidden folder, or a path such as '..')"
    elif len(name.encode()) > MAX_NAME_BYTES:
        problem = f"must be at most {MAX_NAME_BYTES} bytes long (a folder name)"
    if problem:
        raise ConfigError(f"key 'name' {problem}, got {_shown(name)}")


def _check_question_families(data: DataConfig) -> None:
    try:
        check_families(data.question_families)
    except ValueError as error:
        raise ConfigError(f"key 'data.question_families': {error}") from None
    if data.question_families != QUESTION_FAMILIES and data.benchmark not in SYNTHETIC_BENCHMARKS:
        raise ConfigError(f"key 'data.question_families' applies to the synthetic benchmarks "
                          f"({', '.join(SYNTHETIC_BENCHMARKS)}), not {data.benchmark!r}")


def _check_target_modules(targets: tuple[str, ...]) -> None:
    for target in targets:
        if not _MODULE_NAME.fullmatch(target):
            raise ConfigError(f"key 'model.target_modules': {_shown(target)} is no module name (dot-separated parts of "
                              "letters, digits and '_', e.g. 'query' or 'output.dense')")
    if len(set(targets)) != len(targets):
        raise ConfigError(f"key 'model.target_modules' names a module twice: {list(targets)}")


def _check_privacy(config: RunConfig) -> None:
    record, client = config.privacy.record, config.privacy.client
    federation = config.federation
    if federation.algorithm == "centralized" and (record.enabled or client.placement != "off"):
        raise ConfigError("differential privacy is for federated runs; the 'centralized' reference pools the data "
                          "and has none (set privacy.record.enabled = false and privacy.client.placement = 'off')")
    if config.privacy.share_site_metrics and not record.enabled and client.placement == "off":
        raise ConfigError("key 'privacy.share_site_metrics' opts out of keeping site metrics under differential "
                          "privacy; without DP they are always shared (remove it, or enable privacy.record or "
                          "privacy.client)")
    if record.enabled:
        _check_noise_and_budget("privacy.record", record.noise_multiplier, record.target_epsilon,
                                record.budget_epsilon)
    if record.client_adapter_noise_ratio != 1.0 and (not record.enabled or federation.algorithm == "centralized"
                                                     or get_algorithm(federation.algorithm).dp_steps_per_batch < 2):
        raise ConfigError(f"key 'privacy.record.client_adapter_noise_ratio' splits the noise between FedDAT's two "
                          f"DP-SGD steps; it needs privacy.record.enabled and algorithm 'feddat', not "
                          f"'{federation.algorithm}' (remove it, or set it to 1)")
    if client.placement == "off":
        return
    if federation.algorithm != "centralized" and not get_algorithm(federation.algorithm).sends_updates:
        raise ConfigError("key 'privacy.client.placement': 'local' training sends no updates to protect")
    if federation.aggregation != "uniform":
        raise ConfigError("key 'federation.aggregation' must be 'uniform' with client-level DP (a site's weight "
                          "would multiply its sensitivity)")
    _check_noise_and_budget("privacy.client", client.noise_multiplier, client.target_epsilon, client.budget_epsilon)
    protocol = config.secure_aggregation.protocol
    if client.placement == "distributed":
        if protocol != "masked":
            raise ConfigError(f"key 'privacy.client.placement': distributed noise is added inside the masked protocol; "
                              f"set secure_aggregation.protocol = 'masked' (not {protocol!r})")
        if client.accountant != "rdp":
            raise ConfigError("key 'privacy.client.accountant' must be 'rdp' with the distributed placement (the "
                              "Skellam noise is accounted with RDP only)")
        per_round = federation.clients_per_round or (config.data.num_clients if config.data.benchmark != "folder"
                                                     else 0)
        if per_round:  # a folder's site count is known only at run time (check_against_data)
            _check_tolerated_dropouts(client.tolerated_dropouts, per_round)
    if client.adaptive_clipping:
        if client.placement != "central":
            raise ConfigError("key 'privacy.client.adaptive_clipping' needs placement 'central' (the server adds the "
                              f"noise to the clipped count), not {client.placement!r}")
        if client.count_noise_std and not client.target_epsilon:  # a calibrated multiplier: check_against_data
            _check_count_noise(client.count_noise_std, client.noise_multiplier)
        clip_range = config.secure_aggregation.masked.clip_range
        if protocol == "masked" and clip_range < INDICATOR_SCALE:
            raise ConfigError(f"key 'secure_aggregation.masked.clip_range' is {clip_range:g}: adaptive clipping needs "
                              f"at least {INDICATOR_SCALE:g} (the clipping indicator travels in the masked sum)")


def _check_noise_and_budget(table: str, noise_multiplier: float, target_epsilon: float, budget: float) -> None:
    if noise_multiplier == 0 and target_epsilon == 0:
        raise ConfigError(f"key '{table}.noise_multiplier' must be > 0 when this level of DP is on "
                          f"(or set '{table}.target_epsilon' to calibrate it)")
    if budget < target_epsilon:
        raise ConfigError(f"key '{table}.budget_epsilon' is {budget:g}, smaller than '{table}.target_epsilon' "
                          f"{target_epsilon:g}: the run would stop before its planned rounds")


def _check_tolerated_dropouts(tolerated: int, per_round: int) -> None:
    if tolerated >= per_round:
        raise ConfigError(f"key 'privacy.client.tolerated_dropouts' is {tolerated}: at least one of the {per_round} "
                          "participants of a round must survive")


def _check_count_noise(count_noise_std: float, noise_multiplier: float) -> None:
    if 2 * count_noise_std <= noise_multiplier:
        raise ConfigError(f"key 'privacy.client.count_noise_std' is {count_noise_std:g}: adaptive clipping needs "
                          f"more than half the noise multiplier {noise_multiplier:g} (else the count takes all "
                          "of the round's privacy and the update none)")


def check_against_model(config: RunConfig, modules: Mapping[str, bool], hidden_size: int) -> None:
    """What only the model tells: every target module names linear projections of it, and the LoRA rank is at
    most its hidden size (above it a LoRA update adds nothing). ``modules`` maps every module name of the
    backbone to whether LoRA can adapt it (a linear projection)."""
    for target in config.model.target_modules:
        matched = [name for name in modules if matches_target(name, target)]
        if not matched:
            known = sorted({name.rsplit(".", 1)[-1] for name, linear in modules.items() if linear})
            raise ConfigError(f"key 'model.target_modules': {_shown(target)} names no module of the model (its "
                              f"linear projections end in {', '.join(known)})")
        other = [name for name in matched if not modules[name]]
        if other:
            raise ConfigError(f"key 'model.target_modules': {_shown(target)} matches {other[0]!r}, which is not a "
                              "linear projection (LoRA adapts linear projections)")
    if config.model.lora_rank > hidden_size:
        raise ConfigError(f"key 'model.lora_rank' is {config.model.lora_rank}, more than the model's hidden size "
                          f"{hidden_size}")


def check_against_data(config: RunConfig, train_sizes: Mapping[str, int]) -> None:
    """What only the data tells: the number of sites, a batch no larger than a site's data, and privacy terms
    these data sizes can meet (a calibrated noise multiplier exists; the count noise leaves the update some).
    ``train_sizes``: each site's number of training examples. The distributed placement's calibration also
    needs the update's length; the runner checks it when it plans the run."""
    sites = len(train_sizes)
    if sites > MAX_CLIENTS:
        raise ConfigError(f"key 'data.path': the data folder holds {sites} sites; at most {MAX_CLIENTS} take part "
                          "in a run")
    per_round = config.participants_per_round(sites)
    if per_round > sites:
        raise ConfigError(f"key 'federation.clients_per_round' is {per_round}, more than the {sites} sites of the "
                          "data")
    batch = config.training.batch_size
    if config.federation.algorithm == "centralized":
        pooled = sum(train_sizes.values())
        if batch > pooled:
            raise ConfigError(f"key 'training.batch_size' is {batch}, more than the {pooled} pooled training "
                              "examples")
    else:
        site, smallest = min(train_sizes.items(), key=lambda item: item[1])
        if batch > smallest:
            raise ConfigError(f"key 'training.batch_size' is {batch}, more than the {smallest} training examples "
                              f"of site {site!r}")
    _check_privacy_against_data(config, train_sizes, per_round)


def _check_privacy_against_data(config: RunConfig, train_sizes: Mapping[str, int], per_round: int) -> None:
    # The accountants import torch (Opacus): only a run, which needs it anyway, gets here. The runner's plan
    # computes the same settings again; the accountant caches every ε, so that second calibration is free.
    from .federation.algorithms import dp_steps_per_batch
    from .privacy.client_level import make_client_privacy
    from .privacy.record import make_record_privacy

    record, client, rounds = config.privacy.record, config.privacy.client, config.federation.rounds
    if record.enabled and record.target_epsilon:
        for site, size in train_sizes.items():
            try:
                make_record_privacy(record, dataset_size=size, batch_size=config.training.batch_size,
                                    local_steps=config.training.local_steps, rounds=rounds,
                                    steps_per_batch=dp_steps_per_batch(config.federation.algorithm))
            except ValueError as error:
                raise ConfigError(f"key 'privacy.record.target_epsilon' ({record.target_epsilon:g}) cannot be met "
                                  f"at site {site!r} ({size} training examples): {error}") from None
    if client.placement == "distributed":
        _check_tolerated_dropouts(client.tolerated_dropouts, per_round)
    if client.placement in ("central", "local") and client.target_epsilon:
        try:  # calibrated without adaptive clipping (which changes no ε), to check the count noise on its own
            calibrated = make_client_privacy(dataclasses.replace(client, adaptive_clipping=False),
                                             num_clients=len(train_sizes), clients_per_round=per_round,
                                             rounds=rounds, dimension=1)
        except ValueError as error:
            raise ConfigError(f"key 'privacy.client.target_epsilon' ({client.target_epsilon:g}) cannot be met: "
                              f"{error}") from None
        if client.adaptive_clipping and client.count_noise_std:
            _check_count_noise(client.count_noise_std, calibrated.noise_multiplier)


def to_dict(config: Any) -> dict[str, Any]:
    """The configuration keys and their values (fields the runner supplies at run time are no keys; a budget
    without limit is ``"unbounded"``, so the result is plain JSON and TOML)."""
    values = {}
    for spec in dataclasses.fields(config):
        if spec.metadata.get("runtime"):
            continue
        value = getattr(config, spec.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif spec.metadata.get("unbounded") and value == math.inf:
            value = UNBOUNDED
        values[spec.name] = value
    return values


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

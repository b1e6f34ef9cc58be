"""Building each party of a run from the run's configuration, each from its own folder and its own key.

Every party derives the same :class:`RunPlan` from the configuration they agreed on (the server checks the
configuration's digest at the session's opening): site ids, the update's layout, the aggregation weights,
the protocol's options and the DP parameters. Then each role is built by its own function, which loads that
party's identity only (from its own folder, or from ``secure_aggregation.keys/<party>/``), opens its own
audit log and gets its own data. The simulation (:mod:`.simulation`) calls all of them in one process; a
test (and a deployment) calls each in a process of its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocols import ConfigurationError, Protocol, Roster, make_protocol, options_class
from protocols.enrolment import load_party_identity
from protocols.identity import Identity, load_roster

from ..config import ConfigError, RunConfig
from ..data import Benchmark, ClientData
from ..data.batching import EncodedSplit, encode_split
from ..model.adapters import AdapterState, LoraSettings
from ..model.backbone import Foundation
from ..privacy.budget import BudgetExceeded
from ..privacy.run_privacy import PrivacySettings, ServerPrivacy, SitePrivacy, dataset_account, privacy_settings
from ..training.adapter_names import SHARED, is_matrix
from ..training.local_model import LocalModel, split_head
from .algorithms import Algorithm, get_algorithm
from .channel import Channel, ServerLink
from .keyholder_app import KeyHolder
from .party_folder import PARTIES_DIR, PartyFolder
from .server_app import Server, ServerPlan
from .site_app import Site
from .updates import StateLayout


@dataclass(frozen=True)
class RunPlan:
    """What every party of a run derives identically from the configuration and the data sizes."""

    config: RunConfig
    site_ids: tuple[str, ...]
    counts: dict[str, int]  # training records per site
    initial_state: dict[str, np.ndarray]  # the global state before round 1 (A_s's travelling matrices, a shared head)
    layout: StateLayout
    privacy: PrivacySettings
    algorithm: Algorithm
    head_travels: bool
    initial_adapter: dict[str, np.ndarray]  # the whole initial A_s (every matrix): where every site's A_s starts

    def global_adapter(self, global_state: dict[str, np.ndarray]) -> tuple[AdapterState | None, AdapterState]:
        """(the global adapter, the global head) of a global state: the initial adapter with the aggregated
        matrices put in, None when the algorithm has no global model (a matrix that stays each site's own, as
        FedSA-LoRA's B); the head is empty when heads stay local."""
        adapter, head = split_head(global_state)
        if not self.algorithm.global_model_whole:
            return None, head
        return {**self.initial_adapter, **adapter}, head

    def opening_digest(self, agreed: str | None = None) -> str:
        """What every party checks at the session's opening: the configuration's digest (a deployment's
        agreement digest, ``agreed``, in its place) bound to the SHA-256 of the initial adapter this party built
        from it. The initial adapter comes from the seed through torch's generator and PEFT's initialisation, in
        each party's own process; FFA-LoRA's frozen A never travels, so parties whose libraries built another
        one would otherwise train on different A matrices with nothing to tell them (and the aggregate
        mean(B)·A would be wrong everywhere): they now never open a session together."""
        adapter = hashlib.sha256()
        for key in sorted(self.initial_adapter):
            value = np.ascontiguousarray(self.initial_adapter[key], dtype="<f4")
            adapter.update(f"{key}:{value.shape}:".encode() + value.tobytes())
        return hashlib.sha256(f"{agreed or self.config.digest()}:{adapter.hexdigest()}".encode()).hexdigest()

    @property
    def per_round(self) -> int:
        return self.config.participants_per_round(len(self.site_ids))

    @property
    def weights(self) -> dict[str, int]:
        uniform = self.config.federation.aggregation != "examples"
        return {cid: 1 if uniform else self.counts[cid] for cid in self.site_ids}

    @property
    def largest_round(self) -> int:
        """The most sites a round can have (Poisson sampling of central DP may draw every site)."""
        client = self.privacy.client
        return len(self.site_ids) if client is not None and client.poisson_sampling else self.per_round

    @property
    def vector_length(self) -> int:
        return self.layout.size + self.privacy.extra_coordinates

    @property
    def site_metrics_shared(self) -> bool:
        """Whether sites send the server what they compute from their records outside any DP mechanism (losses,
        clipped counts, accuracies): always without DP; under DP only when ``privacy.share_site_metrics`` opts in."""
        return not self.privacy.enabled or self.config.privacy.share_site_metrics

    @property
    def uses_protocol(self) -> bool:
        return self.algorithm.sends_updates

    @property
    def keyholder(self) -> bool:
        return self.uses_protocol and self.config.secure_aggregation.protocol == "he"

    def parties(self) -> list[tuple[str, str]]:
        """(party id, role) of every party of the run."""
        return [("server", "server"), *([("keyholder", "keyholder")] if self.keyholder else []),
                *((cid, "client") for cid in self.site_ids)]


def plan_run(config: RunConfig, foundation: Foundation, lora: LoraSettings, counts: dict[str, int],
             num_answers: int) -> RunPlan:
    algorithm = get_algorithm(config.federation.algorithm)
    head_travels = config.model.head == "shared" and algorithm.sends_updates
    # The initial global state comes from one seeded model; every site starts from it. What travels of it is
    # the algorithm's declared matrices (Algorithm.travels): they make the update's layout, hence the protocol's
    # input and client-level DP's dimension.
    initial = LocalModel(foundation, lora, (SHARED,), (SHARED,), num_answers, seed=config.seed)
    adapter = initial.adapters.get_state(SHARED)
    state = {key: value for key, value in adapter.items() if is_matrix(key, algorithm.travels)}
    if head_travels:
        state.update(initial.head_state())
    del initial
    layout = StateLayout.of(state)
    privacy = privacy_settings(config, counts, update_dimension=layout.size)
    return RunPlan(config, tuple(counts), dict(counts), state, layout, privacy, algorithm, head_travels, adapter)


def site_answers(config: RunConfig, benchmark: Benchmark, client: ClientData) -> tuple[str, ...]:
    """The answers a site's head ranks: its own answer set when the head stays local (as in the paper), the
    benchmark's whole vocabulary when heads are aggregated or one centralized model answers for all."""
    local = config.model.head == "local" and config.federation.algorithm != "centralized"
    return client.answers if local else benchmark.answers


def encode_site(foundation: Foundation, answers: tuple[str, ...], client: ClientData) -> tuple[EncodedSplit,
                                                                                                EncodedSplit]:
    """A site's (train, test) splits as model tensors, labels indexing ``answers``."""
    index = {answer: i for i, answer in enumerate(answers)}
    return tuple(encode_split(split, foundation.tokenizer, index, foundation.max_text_length, foundation.image_size)
                 for split in (client.train, client.test))


def build_protocol(plan: RunPlan) -> Protocol | None:
    """The configured secure-aggregation protocol with the run's own values, checked against the largest round
    it must aggregate; None when nothing travels.

    The run's values: the seed; the weights' range (``max_weight``; ``min_weight`` where the protocol takes it,
    so that it can refuse a weight, or a total weight, that no honest cohort can produce); the distributed
    noise bound; and the input range, from what the runner knows about the inputs. Under client-level DP with
    central noise and a fixed clip norm C, each site's update is clipped to L2 norm C before it becomes the
    protocol's input, so every entry satisfies |x_j| <= C: the masked protocol's ``clip_range`` (and the HE
    protocol's ``input_bound``) is then C, and nothing an honest site sends is clipped. A value configured
    explicitly (other than the option's default) is kept, and whatever the protocol clips then is reported
    (each site's count in the round's ``clipped``). Not derived: without client-level DP (no bound is known),
    with local noise (added after clipping, unbounded), with adaptive clipping (C moves between rounds) and
    with distributed noise (calibrated on the grid of the configured ``clip_range``)."""
    if not plan.uses_protocol:
        return None
    settings = plan.config.secure_aggregation
    cls = options_class(settings.protocol)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    configured = settings.protocol_options
    weights = plan.weights.values()
    runtime = {"seed": plan.config.seed, "max_weight": max(weights), "min_weight": min(weights),
               "noise_bound": plan.privacy.noise_bound(plan.per_round)}
    client = plan.privacy.client
    if client is not None and client.placement == "central" and not client.adaptive:
        for name in ("clip_range", "input_bound"):
            if name in defaults and (configured is None or getattr(configured, name) == defaults[name]):
                runtime[name] = float(client.clip_norm)
    protocol = make_protocol(settings.protocol, options=configured,
                             **{k: v for k, v in runtime.items() if k in defaults})
    protocol.check(plan.largest_round, plan.vector_length)
    return protocol


def party_folder(run_dir: Path, party_id: str) -> PartyFolder:
    return PartyFolder(Path(run_dir) / PARTIES_DIR / party_id, party_id)


def party_identity(plan: RunPlan, folder: PartyFolder) -> tuple[Identity, Roster]:
    """This party's own identity (and the roster it pins), from ``secure_aggregation.keys/<party>/`` when the
    configuration names a keys folder, else from its own folder; checked against the roster."""
    keys = plan.config.secure_aggregation.keys
    party_id = folder.party_id
    try:
        roster = load_roster(Path(keys) if keys else folder.roster)
        identity = load_party_identity(Path(keys) / party_id if keys else folder.path, party_id)
        roster.check_identity(identity)
    except ConfigurationError as error:
        if not keys:
            raise
        raise ConfigError(f"key 'secure_aggregation.keys' ({keys!r}): {error}") from None
    return identity, roster


def _audit(plan: RunPlan, folder: PartyFolder, identity: Identity, roster: Roster, resume: bool):
    audit = plan.config.audit
    return folder.open_audit(identity, roster, enabled=audit.enabled, tree_head_every=audit.tree_head_every,
                             resume=resume, run_id=plan.config.digest()[:16])


def site_privacy(plan: RunPlan, site_id: str, train: EncodedSplit,
                 dataset_ledger_dir: str | Path | None = None) -> SitePrivacy:
    """The DP state of site ``site_id``: its run ledgers and its dataset ledger (in ``dataset_ledger_dir``)."""
    record = plan.privacy.record.get(site_id)
    dataset = dataset_account(plan.config, train, dataset_ledger_dir, record, plan.privacy.client)
    return SitePrivacy(site_id, record, plan.privacy.client, dataset,
                       share_site_metrics=plan.config.privacy.share_site_metrics,
                       sends_updates=plan.algorithm.sends_updates)


def start_refusal(privacy: SitePrivacy) -> str | None:
    """Why the site refuses a fresh run (its planned rounds would overdraw its dataset's budget), naming the site,
    its dataset ledger and how to read it; None when the run fits."""
    overdraw = privacy.start_refusal(0)
    if overdraw is None:
        return None
    path = privacy.dataset.ledger.path
    return (f"{privacy.site_id} refuses this run: {overdraw} (its dataset ledger: {path}; read it with "
            f"`feddat-secure privacy ledger show {path}`; a dataset's budget is set when its ledger is created, "
            "by privacy.record.dataset_budget_epsilon)")


def build_site(plan: RunPlan, folder: PartyFolder, foundation: Foundation, lora: LoraSettings,
               split: tuple[EncodedSplit, EncodedSplit], answers: tuple[str, ...], *, resume: bool,
               opening_digest: str | None = None, dataset_ledger_dir: str | Path | None = None) -> Site:
    """The site ``folder.party_id`` from its own folder (identity, roster, audit log, checkpoints, outputs).
    ``opening_digest``: the digest the server's opening must carry, bound to this party's initial adapter by
    :meth:`RunPlan.opening_digest` (default: the configuration's SHA-256; a deployment's agreement digest covers
    the federation's facts too). ``dataset_ledger_dir``: where the data
    owner keeps its dataset's privacy ledger (default: ``$FEDDAT_SECURE_LEDGER_DIR``, else under
    ``$XDG_DATA_HOME``)."""
    identity, roster = party_identity(plan, folder)
    site_id = folder.party_id
    index = plan.site_ids.index(site_id)
    seed = plan.config.seed * 1000 + index
    algorithm = plan.algorithm
    model = LocalModel(foundation, lora, algorithm.adapters, algorithm.trainable, len(answers), seed=seed + 1,
                       frozen=algorithm.frozen)
    if algorithm.sends_updates:  # A_s starts as the initial global adapter: FFA-LoRA's A, never sent, is shared
        model.adapters.set_state(SHARED, plan.initial_adapter)
    record = plan.privacy.record.get(site_id)
    trainer = algorithm.trainer(plan.config, model, record, plan.head_travels, algorithm.travels)
    privacy = site_privacy(plan, site_id, split[0], dataset_ledger_dir)
    if not resume and (overdraw := start_refusal(privacy)) is not None:  # before this run opens anything
        raise BudgetExceeded(0, [overdraw], whole_run=True)
    return Site(identity, roster, folder, config_digest=plan.opening_digest(opening_digest), trainer=trainer,
                train=split[0], test=split[1], answers=answers, layout=plan.layout,
                sends_updates=plan.algorithm.sends_updates, protocol=build_protocol(plan), privacy=privacy,
                weight=plan.weights[site_id], seed=seed, audit=_audit(plan, folder, identity, roster, resume),
                base_model_path=foundation.path, rounds=plan.config.federation.rounds)


def build_server(plan: RunPlan, folder: PartyFolder, channel: Channel, *, resume: bool,
                 opening_digest: str | None = None) -> Server:
    """The server from its own folder, reaching the other parties through ``channel`` (``opening_digest``: as
    for :func:`build_site`)."""
    identity, roster = party_identity(plan, folder)
    config = plan.config
    link = ServerLink(channel, _audit(plan, folder, identity, roster, resume))
    server_plan = ServerPlan(config_digest=plan.opening_digest(opening_digest), rounds=config.federation.rounds,
                             per_round=plan.per_round,
                             sends_updates=plan.algorithm.sends_updates, vector_length=plan.vector_length,
                             seed=config.seed, site_metrics=plan.site_metrics_shared)
    return Server(identity, roster, folder, server_plan, link,
                  {k: np.array(v, dtype=np.float32) for k, v in plan.initial_state.items()}, plan.layout,
                  build_protocol(plan), ServerPrivacy(plan.privacy.client))


def build_keyholder(plan: RunPlan, folder: PartyFolder, *, resume: bool,
                    opening_digest: str | None = None) -> KeyHolder:
    """The HE key holder from its own folder (``opening_digest``: as for :func:`build_site`)."""
    identity, roster = party_identity(plan, folder)
    return KeyHolder(identity, roster, folder, config_digest=plan.opening_digest(opening_digest),
                     protocol=build_protocol(plan), audit=_audit(plan, folder, identity, roster, resume))

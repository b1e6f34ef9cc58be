"""The in-memory wiring: every party of a run in one process, joined by an in-memory channel.

Parties still own only their own keys, data, ledgers, logs and checkpoints and see each other only
through signed bytes: the channel hands each request's bytes to the recipient's :class:`~.channel.Served`
end and returns the bytes it answers. ``feddat-secure run``, the tests and the benchmarks use this wiring;
a deployment replaces the channel, not the parties.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from protocols import Outgoing

from ..data.batching import EncodedSplit
from ..model.adapters import LoraSettings
from ..model.backbone import Foundation
from .channel import Endpoint, Reply, Served
from .keyholder_app import KeyHolder
from .parties import RunPlan, build_keyholder, build_server, build_site, party_folder
from .server_app import Server
from .site_app import Site


@dataclass
class InMemoryChannel:
    """Requests delivered by function call, in order. A party in ``unreachable`` does not answer (a dropout)."""

    endpoints: Mapping[str, Endpoint]
    unreachable: set[str] = field(default_factory=set)

    def exchange(self, requests: Sequence[Outgoing], *, deadline_s: float) -> list[Reply]:
        del deadline_s  # a function call answers at once or never
        replies = []
        for request in requests:
            endpoint = self.endpoints.get(request.recipient)
            if endpoint is None or request.recipient in self.unreachable:
                replies.append(Reply(request.recipient, None))
            else:
                replies.append(Reply(request.recipient, tuple(endpoint.handle(request.data))))
        return replies


@dataclass
class Federation:
    """Every party of one simulated run, wired together."""

    server: Server
    sites: dict[str, Site]
    keyholder: KeyHolder | None
    channel: InMemoryChannel
    plan: RunPlan  # what every party derived from the configuration (the initial adapter, the update's layout)


def simulate_federation(plan: RunPlan, run_dir: Path, foundation: Foundation, lora: LoraSettings,
                        splits: Mapping[str, tuple[EncodedSplit, EncodedSplit]],
                        answers: Mapping[str, tuple[str, ...]], *, resume: bool) -> Federation:
    """Build every party from its own folder under ``run_dir/parties/`` (identities already enrolled) and open
    the run's session (on ``resume``: every party continues from its own checkpoint)."""
    server_id = "server"
    sites = {cid: build_site(plan, party_folder(run_dir, cid), foundation, lora, splits[cid], answers[cid],
                             resume=resume, dataset_ledger_dir=plan.config.privacy.dataset_ledger_dir)
             for cid in plan.site_ids}
    keyholder = build_keyholder(plan, party_folder(run_dir, "keyholder"), resume=resume) if plan.keyholder else None
    parties: list[Site | KeyHolder] = [*sites.values(), *([keyholder] if keyholder else [])]
    channel = InMemoryChannel({party.party_id: Served(party, party.audit, server_id=server_id) for party in parties})
    server = build_server(plan, party_folder(run_dir, server_id), channel, resume=resume)
    server.open(resume=resume)
    return Federation(server, sites, keyholder, channel, plan)

"""Issue 12, faults 3 (site part) and 8: one privacy budget per dataset across runs, charged before each round.

The data owner's dataset ledger lives outside every run folder, so neither ``--overwrite``, a new run name nor a
deleted run folder resets what the data has spent; a run that would overdraw it is refused before any round; a
crash inside a round leaves its charge in place, so the retried round is a second charge; a tampered ledger is
refused. Every ε is recomputed with Google's dp_accounting."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import small_config
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant

from feddat_secure.cli import USER_ERRORS, main
from feddat_secure.data import build_benchmark
from feddat_secure.data.batching import EncodedSplit
from feddat_secure.federation import site_app
from feddat_secure.federation.runner import run
from feddat_secure.privacy.accounting import GaussianEvent, compute_epsilon
from feddat_secure.privacy.budget import BudgetExceeded
from feddat_secure.privacy.dataset_ledger import (
    LEDGER_SUFFIX,
    DatasetLedger,
    DatasetLedgerError,
    LevelBudget,
    RecordSet,
    read_ledger,
    record_set,
    records_path,
)
from feddat_secure.privacy.run_privacy import LEDGER_FILE, privacy_settings

QUIET = {"progress": False, "echo": lambda _: None}
DELTA = 1e-5


def dp_accounting_epsilon(events: list[GaussianEvent]) -> float:
    accountant = RdpAccountant()
    for e in events:
        accountant.compose(dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(e.sample_rate, dp_event.GaussianDpEvent(e.noise_multiplier)), e.steps))
    return accountant.get_epsilon(DELTA)


def test_the_dataset_digest_is_of_the_records_not_of_their_order(tiny_split):
    order = torch.randperm(len(tiny_split), generator=torch.Generator().manual_seed(0))
    shuffled = EncodedSplit(*(getattr(tiny_split, f)[order] for f in
                              ("pixel_values", "input_ids", "attention_mask", "labels")))
    records = record_set(tiny_split)
    assert record_set(shuffled).sha256 == records.sha256  # shuffling opens no fresh budget
    changed = EncodedSplit(tiny_split.pixel_values.clone(), tiny_split.input_ids, tiny_split.attention_mask,
                           tiny_split.labels)
    changed.pixel_values[3, 0, 0, 0] += 1.0
    assert record_set(changed).sha256 != records.sha256  # one changed record: another dataset digest ...
    assert record_set(changed).shared(records) == len(tiny_split) - 1  # ... whose other records are still found


def synthetic_records(first: int, last: int) -> RecordSet:
    """Records first..last-1, as their digests (a record is what its digest names)."""
    return RecordSet.of(hashlib.sha256(f"record {i}".encode()).digest() for i in range(first, last))


def charged_ledger(folder: Path) -> DatasetLedger:
    """A ledger of two runs (4 charges after one budget entry), written through the package's own class."""
    ledger = DatasetLedger(folder, synthetic_records(0, 4))
    budget = {"record": LevelBudget("record", 50.0, DELTA, "rdp")}
    for run_id in ("run-a", "run-b"):
        for round_index in range(2):
            ledger.charge(run_id, round_index, {"record": [GaussianEvent(1.0, 0.1, 10)]}, budget)
    return ledger


def _edit(lines: list[bytes]) -> list[bytes]:
    lines[3] = lines[3].replace(b'"run-a"', b'"run-x"')  # move a charge to another run
    return lines


TAMPERING = {
    "edited": (_edit, "line 4 (seq 3): signature does not verify"),
    "reordered": (lambda lines: [*lines[:2], lines[3], lines[2], *lines[4:]], "line 3 (seq 3)"),
    "deleted": (lambda lines: [*lines[:2], *lines[3:]], "line 3 (seq 3)"),
    "cut": (lambda lines: [*lines[:-1], lines[-1][:40]], "line 6: incomplete last line"),
}


@pytest.mark.parametrize("tampering", list(TAMPERING))
def test_a_tampered_ledger_is_refused_by_show_naming_the_first_bad_entry_and_by_the_next_run(tmp_path, capsys,
                                                                                            tampering):
    ledger = charged_ledger(tmp_path)
    assert main(["privacy", "ledger", "show", str(ledger.path)]) == 0
    shown = capsys.readouterr().out
    assert "intact, 6 entries" in shown and "run run-a: 2 charges" in shown and "run run-b: 2 charges" in shown
    change, named = TAMPERING[tampering]
    lines = ledger.path.read_bytes().split(b"\n")[:-1]
    ledger.path.write_bytes(b"\n".join(change(lines)) + (b"" if tampering == "cut" else b"\n"))

    for command in ("show", "export"):
        assert main(["privacy", "ledger", command, str(ledger.path)]) == 1
        error = capsys.readouterr().err
        assert "does not verify" in error and named in error, error
    if tampering == "cut":  # a torn last line (what a crash while appending leaves) is set aside, on the record
        contents = ledger.charge("run-c", 0, {"record": [GaussianEvent(1.0, 0.1, 10)]},
                                 {"record": LevelBudget("record", 50.0, DELTA, "rdp")})
        assert [c.run for c in contents.charges] == ["run-a", "run-a", "run-b", "run-c"]
        assert b'"event":"log_recovered"' in ledger.path.read_bytes()
    else:
        with pytest.raises(DatasetLedgerError, match="does not verify"):
            ledger.charge("run-c", 0, {"record": [GaussianEvent(1.0, 0.1, 10)]},
                          {"record": LevelBudget("record", 50.0, DELTA, "rdp")})


def test_a_ledger_signed_by_another_key_is_refused(tmp_path):
    ledger = charged_ledger(tmp_path / "owner")
    forged = tmp_path / "forger"
    DatasetLedger(forged, synthetic_records(4, 8)).key()  # another data owner's key
    shutil.copy(ledger.path, forged / ledger.path.name)
    shutil.copy(records_path(ledger.path), forged)
    with pytest.raises(DatasetLedgerError, match="line 1 .*signature does not verify"):
        read_ledger(forged / ledger.path.name)
    assert main(["privacy", "ledger", "show", str(ledger.path), "--public-key",
                 str(forged / "ledger_key.pub.pem")]) == 1


def test_a_crash_inside_a_round_stays_charged_and_no_new_run_resets_the_datasets_spend(tmp_path, ledger_dir):
    """Round 2 is released (the sites trained and the aggregate was logged) and the run crashes before any
    checkpoint of it. After resume, every site's dataset ledger holds each release that happened: round 1,
    round 2's interrupted attempt, round 2's retry. A second run on the same data (``--overwrite``, or another
    name) would overdraw the dataset's budget and is refused before any round."""
    def config_of(budget: float):
        return small_config(tmp_path, privacy={"record": {"enabled": True, "noise_multiplier": 1.5,
                                                          "budget_epsilon": budget}},
                            training={"local_steps": 2}, secure_aggregation={"protocol": "plain"},
                            data={"num_clients": 2})

    per_round = privacy_settings(config_of(100.0), {"client0": 32}, update_dimension=1).record["client0"].round_events()
    three, five = (compute_epsilon(per_round * rounds, DELTA) for rounds in (3, 5))
    budget = round((three + five) / 2, 3)  # 3 rounds fit (a retried one included), 5 (a second run) do not
    config = config_of(budget)

    releases = []

    def counted_update(*args, original=site_app.update_vector):
        releases.append(1)  # a site computed an update from its trained model: a release
        return original(*args)

    def crash_in_round_2(text: str) -> None:
        if text.startswith("round   2"):
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(site_app, "update_vector", counted_update)
        with pytest.raises(KeyboardInterrupt):
            run(config, progress=False, echo=crash_in_round_2)
        resumed = run(config, resume=True, **QUIET)
    ledgers = sorted(ledger_dir.glob("*" + LEDGER_SUFFIX))
    assert len(ledgers) == 2  # one per site's data, outside the run folder
    assert len(releases) == 6  # 2 sites × (round 1, round 2, round 2 again)
    for site in ("client0", "client1"):
        run_ledger = json.loads((resumed.run_dir / "parties" / site / LEDGER_FILE).read_text())
        summary = run_ledger["dataset_ledger"]
        contents = read_ledger(summary["path"])
        assert [(c.round, c.level) for c in contents.charges] == [(0, "record"), (1, "record"), (1, "record")]
        events = [e for c in contents.charges for e in c.events]
        assert contents.charges[0].events == tuple(per_round)
        reference = dp_accounting_epsilon(events)
        assert summary["epsilon"] == pytest.approx(reference, rel=0.01)
        assert summary["epsilon_before_run"] == 0.0 and summary["budget_epsilon"] == budget
        assert (summary["entries"], summary["head_sha256"]) == (contents.entries, contents.head_sha256)
        (spent,) = run_ledger["ledgers"]  # the run's own ledger counts the interrupted release too
        assert [r["round"] for r in spent["rounds"]] == [0, 1, 1]
        assert reference == pytest.approx(dp_accounting_epsilon(per_round * 3), rel=1e-9)
    before = {path: path.read_bytes() for path in ledgers}

    for again, overwrite in ((config, True), (dataclasses.replace(config, name="tiny-retuned"), False)):
        with pytest.raises(USER_ERRORS, match=r"this run was not started.*client0 refuses this run: the record-level "
                                              r"budget of this site's.*client1 refuses this run") as refused:
            run(again, overwrite=overwrite, **QUIET)
        assert "privacy ledger show" in str(refused.value) and "dataset_budget_epsilon" in str(refused.value)
        assert {path: path.read_bytes() for path in ledgers} == before  # refused before any round: nothing charged
    assert (resumed.run_dir / "manifest.json").is_file()  # refused before --overwrite could remove the last run


def test_a_dataset_that_shares_records_with_another_is_charged_to_both_ledgers_and_refused_when_either_is_spent(
        tmp_path, ledger_dir, capsys):
    """The red team's case: a site spent most of its budget on 40 records; the same configuration on 41 records
    (those 40 plus one) has another dataset digest and, with a ledger per digest alone, ran from ε 0 again. A
    record's ε composes over every run on any dataset holding it, so the 41-record run is charged to the
    40-record dataset's ledger as well, and a later run on the 41 records that would take the 40-record ledger
    past its budget is refused before it starts, although its own ledger would have room."""
    def config_of(records: int, budget: float):
        config = small_config(tmp_path, privacy={"record": {"enabled": True, "noise_multiplier": 1.5,
                                                            "budget_epsilon": budget}},
                              secure_aggregation={"protocol": "plain"}, training={"local_steps": 1},
                              data={"num_clients": 2, "train_per_client": records, "test_per_client": 4})
        return dataclasses.replace(config, name=f"tiny-{records}")

    e40, e41 = (privacy_settings(config_of(n, 100.0), {"client0": n}, update_dimension=1).record["client0"]
                .round_events() for n in (40, 41))
    four, six = (compute_epsilon(e40 * 2 + e41 * rounds, DELTA) for rounds in (2, 4))
    budget = round((four + six) / 2, 3)  # the 40-record ledger holds both runs' 4 rounds, not a third run's 2
    assert compute_epsilon(e41 * 4, DELTA) < budget  # ... while the 41-record ledger alone would hold 4 rounds

    forty = run(config_of(40, budget), **QUIET)
    forty_one = run(config_of(41, budget), **QUIET)  # each of its rounds charged to both ledgers of each site
    forty_sha = {}
    for site in ("client0", "client1"):
        own = json.loads((forty.run_dir / "parties" / site / LEDGER_FILE).read_text())["dataset_ledger"]
        forty_sha[site] = own["dataset_sha256"]
        summary = json.loads((forty_one.run_dir / "parties" / site / LEDGER_FILE).read_text())["dataset_ledger"]
        (shared,) = summary["shared_ledgers"]  # the same site's 40 records; the other site's data is disjoint
        assert (shared["path"], shared["shared_records"]) == (own["path"], 40)
        contents = read_ledger(shared["path"])
        assert [c.trained_on for c in contents.charges] == [own["dataset_sha256"]] * 2 + [summary["dataset_sha256"]] * 2
        events = [e for c in contents.charges for e in c.events]
        assert events == [*e40, *e40, *e41, *e41]
        assert shared["epsilon"] == pytest.approx(dp_accounting_epsilon(events), rel=0.01)
        assert shared["epsilon"] <= budget < dp_accounting_epsilon(events + e41 * 2)
        assert (shared["entries"], shared["head_sha256"]) == (contents.entries, contents.head_sha256)
        assert summary["epsilon"] == pytest.approx(dp_accounting_epsilon(e41 * 2), rel=0.01)

    assert main(["privacy", "ledger", "show", own["path"]]) == 0
    shown = capsys.readouterr().out
    assert "records: 40 (record set" in shown
    assert f"shares 40 records with the ledger {summary['dataset_sha256']}" in shown
    assert f"trained on dataset {summary['dataset_sha256'][:12]} (shares records)" in shown

    ledgers = sorted(ledger_dir.iterdir())
    before = {path: path.read_bytes() for path in ledgers}
    with pytest.raises(USER_ERRORS, match=r"client0 refuses this run: the record-level budget of dataset "
                                          rf"{forty_sha['client0'][:12]}, which shares 40 records with this site's,"):
        run(config_of(41, budget), overwrite=True, **QUIET)
    assert {path: path.read_bytes() for path in sorted(ledger_dir.iterdir())} == before  # nothing charged anywhere


def synthetic_ledgers(folder: Path) -> tuple[DatasetLedger, DatasetLedger, DatasetLedger]:
    """Ledgers of records 0..39, 0..40 (the same plus one) and 100..139 (disjoint), in one ledger folder."""
    return (DatasetLedger(folder, synthetic_records(0, 40)), DatasetLedger(folder, synthetic_records(0, 41)),
            DatasetLedger(folder, synthetic_records(100, 140)))


def test_a_round_that_would_overdraw_a_sharing_ledger_is_charged_nowhere_and_a_disjoint_dataset_is_unaffected(
        tmp_path):
    forty, forty_one, disjoint = synthetic_ledgers(tmp_path)
    events = [GaussianEvent(1.0, 0.2, 6)]
    budget = {"record": LevelBudget("record", round(compute_epsilon(events * 2, DELTA) * 1.01, 3), DELTA, "rdp")}
    forty.charge("run-a", 0, {"record": events}, budget)
    forty.charge("run-a", 1, {"record": events}, budget)
    files = {path: path.read_bytes() for path in tmp_path.iterdir()}
    assert forty_one.read_with_shared()[1][0][1] == 40
    with pytest.raises(BudgetExceeded, match=rf"the ledger of dataset {forty.dataset_sha256[:12]}, which shares 40 "
                                             r"records with this site's: record-level ledger of dataset"):
        forty_one.charge("run-b", 0, {"record": events}, budget)  # its own ledger, still empty, had room
    assert {path: path.read_bytes() for path in tmp_path.iterdir()} == files  # no entry, no ledger, no record set

    charged = disjoint.charge("run-c", 0, {"record": events}, budget)  # no record in common: its own budget only
    assert [c.run for c in charged.charges] == ["run-c"] and disjoint.read_with_shared()[1] == []
    assert forty.path.read_bytes() == files[forty.path]


@pytest.mark.parametrize("swap", ["replaced", "deleted"])
def test_a_record_set_swapped_or_deleted_to_hide_an_overlap_is_refused(tmp_path, capsys, swap):
    """The record set is bound to its ledger: the dataset digest in the ledger's name and signed entries is the
    SHA-256 of the side file, so an owner who swaps the 40-record ledger's set for a disjoint one (or deletes it)
    to run on 41 records with a fresh budget is refused, by the run and by ``show``."""
    forty, forty_one, disjoint = synthetic_ledgers(tmp_path)
    budget = {"record": LevelBudget("record", 50.0, DELTA, "rdp")}
    forty.charge("run-a", 0, {"record": [GaussianEvent(1.0, 0.2, 6)]}, budget)
    sidecar = records_path(forty.path)
    if swap == "replaced":
        sidecar.write_bytes(synthetic_records(100, 140).to_bytes())
        named = rf"{sidecar.name}: not the record set of dataset {forty.dataset_sha256}"
    else:
        sidecar.unlink()
        named = rf"{forty.path.name}: its record set {sidecar.name} is missing"
    files = {path: path.read_bytes() for path in tmp_path.iterdir()}
    for attempt in (forty_one.read_with_shared,  # the run's start check
                    lambda: forty_one.charge("run-b", 0, {"record": [GaussianEvent(1.0, 0.2, 6)]}, budget),
                    lambda: disjoint.charge("run-c", 0, {"record": [GaussianEvent(1.0, 0.2, 6)]}, budget)):
        with pytest.raises(DatasetLedgerError, match=named):
            attempt()
    assert {path: path.read_bytes() for path in tmp_path.iterdir()} == files
    assert main(["privacy", "ledger", "show", str(forty.path)]) == 1
    assert named.split(":")[-1].strip() in capsys.readouterr().err


def test_two_sites_of_one_run_whose_data_share_records_each_charge_both_ledgers_and_the_report_checks_out(
        tmp_path, ledger_dir, monkeypatch):
    """Two hospitals may hold the same patient. Each site's dataset ledger then gets the other site's charges of the
    same run too (the record's ε composes over both sites' releases), and the report's check that a ledger holds
    this run's charges, which compared all of the run's charges with one site's, refused every such run at its
    end (found running the function-grounded benchmark, whose same-family sites draw identical examples)."""
    from feddat_secure.federation import runner as runner_module

    def with_shared_records(*args, **kwargs):
        benchmark = build_benchmark(*args, **kwargs)
        first, second = benchmark.clients[:2]
        shared = dataclasses.replace(second, train=[*first.train[:5], *second.train[5:]])
        return dataclasses.replace(benchmark, clients=[first, shared, *benchmark.clients[2:]])

    monkeypatch.setattr(runner_module, "build_benchmark", with_shared_records)
    config = small_config(tmp_path, privacy={"record": {"enabled": True, "noise_multiplier": 1.5}},
                          secure_aggregation={"protocol": "plain"}, training={"local_steps": 1},
                          data={"benchmark": "domain", "num_clients": 2, "train_per_client": 20,
                                "test_per_client": 4})  # every site answers over every family's answers
    result = run(config, **QUIET)  # raised EvidenceMismatch before the fix
    assert (result.run_dir / "privacy_report.json").exists()
    summaries = {site: json.loads((result.run_dir / "parties" / site / LEDGER_FILE).read_text())["dataset_ledger"]
                 for site in ("client0", "client1")}
    others = []
    for site, other in (("client0", "client1"), ("client1", "client0")):
        trained_on = [c.trained_on for c in read_ledger(summaries[site]["path"]).charges]
        assert trained_on.count(summaries[site]["dataset_sha256"]) == config.federation.rounds
        others.append(trained_on.count(summaries[other]["dataset_sha256"]))
    # the ledger made first holds every charge on the shared records (the other was made at its site's first
    # charge, after the first site's first one): the soundness argument of the shared budgets
    assert max(others) == config.federation.rounds and min(others) >= config.federation.rounds - 1

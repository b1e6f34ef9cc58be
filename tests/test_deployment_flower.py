"""Real Flower deployments (issue 11's acceptance): ``deploy local`` on 127.0.0.1, every party its own process.

Each test starts a SuperLink, one SuperNode and one agent per site (and per key holder), and the ServerApp,
through :func:`deploy_local` — the code behind ``feddat-secure deploy local`` — and checks the run against
the in-process simulation of the same configuration. The parties' processes compute with one torch thread;
the simulation does too (``one_torch_thread``), so a site's update is bit-identical in both.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import simulated_federation, small_config
from process_parties import one_torch_thread
from safetensors.numpy import load_file

from audits import reconcile, verify_path
from feddat_secure.config import RunConfig
from feddat_secure.deployment.local import DEPLOYMENT_DIR, STATE_FILE, LocalSettings, deploy_local
from feddat_secure.deployment.tls import make_node_key, make_tls_certificates
from feddat_secure.federation.runner import run
from feddat_secure.federation.server_app import RoundLog
from protocols import load_roster

pytestmark = pytest.mark.slow
# masked: exact (see test_process_isolation: bit-identical updates, masks cancel exactly mod 2^32); he: the key
# holder releases the sum rounded to 2^-16, and the mean over 3 sites divides that step by 3.
TOLERANCE = {"masked": 0.0, "he": 2.0**-16}


def tiny(folder: Path, protocol: str, sites: int = 3) -> RunConfig:
    return small_config(folder, data={"num_clients": sites}, federation={"rounds": 1, "aggregation": "uniform"},
                        secure_aggregation={"protocol": protocol})


def server_state(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "parties" / "server" / "global_state.safetensors"))


def assert_same_state(deployed: dict, simulated: dict, tolerance: float) -> None:
    assert set(deployed) == set(simulated)
    for name in simulated:
        np.testing.assert_allclose(deployed[name], simulated[name], rtol=0, atol=tolerance, err_msg=name)


def assert_audit_holds(run_dir: Path) -> None:
    roster = load_roster(run_dir / "roster.json")
    keys = {entry.party_id: entry.public_key for entry in roster.entries}
    verified = verify_path(run_dir / "parties", keys, require_closed=True)
    assert verified.ok, verified.summary()
    reconciled = reconcile(run_dir / "parties")
    assert reconciled.ok, reconciled.summary()


def server_events(run_dir: Path, event: str) -> list[dict]:
    lines = (run_dir / "parties" / "server" / "server.audit.jsonl").read_text().splitlines()
    return [entry for entry in map(json.loads, lines) if entry["event"] == event]


KILLED = "client4"
SURVIVORS = ["client0", "client1", "client2", "client3"]


@pytest.fixture(scope="module")
def deployments(tmp_path_factory, foundation) -> dict[str, dict]:
    """Two deployments, run side by side, and what the in-process simulation computes for each: ``he`` (3 sites
    and the key holder) and ``dropout`` (5 sites, masked, TLS and node authentication; the SuperNode of client4 is
    killed — SIGTERM, so it leaves the federation at once; a SIGKILL takes the stage's deadline, and the
    SuperLink's own ≈ 45 s, to be noticed — once the server has sent the masked_input requests). One masked
    deployment serves both the TLS and the dropout tests: Flower starts a fresh ClientApp process per message
    (≈ 2.8 s of CPU each), and a third deployment cost the suite about a quarter of this fixture's minutes.
    The dropout deployment's stage deadline is generous: the killed node leaves at once (the server stops waiting
    for a node the SuperLink no longer lists), and on 2 loaded cores a survivor took over 60 s to answer unmask
    (issue 16), which dropped it too. 5 sites, not 4: with 4 the complete graph's threshold is t = 3 of k = 3
    share holders (2t - k > c needs it), so a single dropout leaves a secret with too few holders and the round
    rightly aborts."""
    root = tmp_path_factory.mktemp("deployments")
    jobs = {"he": (tiny(root / "he", "he"), LocalSettings()),
            "dropout": (tiny(root / "dropout", "masked", sites=5),
                        LocalSettings(tls=True, auth=True, stage_deadline_s=240))}
    outcomes: dict[str, dict] = {name: {} for name in jobs}

    def deploy(name: str) -> None:
        config, settings = jobs[name]
        try:
            outcomes[name]["result"] = deploy_local(config, settings, echo=lambda line: None)
        except BaseException as error:  # noqa: BLE001 - each test reports its own deployment's failure
            outcomes[name]["error"] = error

    threads = {name: threading.Thread(target=deploy, args=(name,)) for name in jobs}
    for thread in threads.values():
        thread.start()
    killer = threading.Thread(target=lambda: outcomes["dropout"].update(
        killed=kill_during_masked_input(jobs["dropout"][0], threads["dropout"])))
    killer.start()
    # The simulations run here while the deployments' processes run, once each deploy_local is done with torch
    # in this process (it checks the configuration before it starts any process; deployment.json comes after).
    for name, (config, _) in jobs.items():
        state = Path(config.output_dir) / config.name / DEPLOYMENT_DIR / STATE_FILE
        while not state.exists() and threads[name].is_alive():
            time.sleep(0.2)
    with one_torch_thread():
        for name in ("he",):
            outcomes[name]["expected"] = server_state(run(tiny(root / f"{name}-simulated", name), progress=False,
                                                          echo=lambda line: None).run_dir)
        # The correct sum after the dropout: the survivors' updates, as the simulation computes them without client4.
        federation = simulated_federation(tiny(root / "dropout-simulated", "masked", sites=5), foundation)
        federation.channel.unreachable.add(KILLED)
        federation.server.run(RoundLog(write=lambda record: record, echo=lambda line: None))
        outcomes["dropout"]["expected"] = {name: np.asarray(value)
                                           for name, value in federation.server.global_state.items()}
    for thread in [killer, *threads.values()]:
        thread.join(timeout=600)
    return outcomes


def kill_during_masked_input(config: RunConfig, thread: threading.Thread) -> bool:
    """Kill the SuperNode of KILLED (by the process id deploy local recorded) as soon as the server's audit log
    shows the masked_input requests sent; whether that happened. It watches for as long as the deployment runs
    (its own join timeout and stage deadlines bound it): a fixed limit of 400 s ran out before masked_input
    under a loaded machine (the full suite on 2 shared cores, issue 16), failing the test for no fault of the
    deployment's."""
    run_dir = Path(config.output_dir) / config.name
    log = run_dir / "parties" / "server" / "server.audit.jsonl"
    while thread.is_alive():
        if log.exists() and any('"masked:masked_input"' in line and '"message_sent"' in line
                                for line in log.read_text().splitlines()):
            state = json.loads((run_dir / DEPLOYMENT_DIR / STATE_FILE).read_text())
            os.kill(state["processes"][f"supernode-{KILLED}"], signal.SIGTERM)
            return True
        time.sleep(0.1)
    return False


def finished(outcome: dict):
    assert "error" not in outcome, repr(outcome.get("error"))
    return outcome["result"]


def test_a_masked_round_over_flower_with_tls_and_node_auth_binds_every_site_and_keeps_intact_logs(deployments):
    deployed = finished(deployments["dropout"])
    assert (deployed.run_dir / "global_adapter" / "adapter_model.safetensors").is_file()
    bound = {entry["peer"] for entry in server_events(deployed.run_dir, "node_bound")}
    assert bound == {*SURVIVORS, KILLED}
    # At most a node asked before its agent served (the ServerApp starts while the agents load): asked again.
    assert all(entry["meta"]["reason"].endswith("asking again")
               for entry in server_events(deployed.run_dir, "node_refused"))
    # every log verifies; client4's ends early (its SuperNode was killed, so the close never reached its agent)
    roster = load_roster(deployed.run_dir / "roster.json")
    keys = {entry.party_id: entry.public_key for entry in roster.entries}
    verified = verify_path(deployed.run_dir / "parties", keys)
    assert verified.ok, verified.summary()


def test_a_supernode_killed_during_masked_input_drops_out_and_the_others_sum_is_applied(deployments):
    outcome = deployments["dropout"]
    assert outcome["killed"], "the masked_input stage never started"
    deployed = finished(outcome)
    record = deployed.history[-1]
    assert record["trained"] == [*SURVIVORS, KILLED]
    assert record["aggregation"]["counted"] == SURVIVORS
    dropped = [entry["meta"]["reason"] for entry in server_events(deployed.run_dir, "party_dropped")
               if entry["peer"] == KILLED]
    assert "no reply to 'masked:masked_input' in time" in dropped  # the server's audit log records the dropout
    assert_same_state(server_state(deployed.run_dir), outcome["expected"], TOLERANCE["masked"])


def test_an_he_round_runs_with_the_key_holder_as_its_own_supernode(deployments):
    deployed = finished(deployments["he"])
    assert deployed.history[-1]["aggregation"]["counted"] == ["client0", "client1", "client2"]
    bound = {entry["peer"]: entry["meta"]["node_id"] for entry in server_events(deployed.run_dir, "node_bound")}
    assert set(bound) == {"client0", "client1", "client2", "keyholder"}
    assert len(set(bound.values())) == 4  # the key holder is a node of its own
    assert_same_state(server_state(deployed.run_dir), deployments["he"]["expected"], TOLERANCE["he"])
    assert_audit_holds(deployed.run_dir)


def test_a_supernode_whose_key_is_not_registered_is_refused_by_the_superlink(tmp_path):
    """With node authentication (TLS), a node whose key was registered joins; an unregistered key is refused."""
    from feddat_secure.deployment.local import CONNECTION, _binary, _flwr_config, _free_port, _wait_for_port

    certificates = make_tls_certificates(tmp_path / "tls", ["127.0.0.1"])
    keys = {name: make_node_key(tmp_path / "keys", name) for name in ("client0", "intruder")}
    port = _free_port()
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "config.toml").write_text(_flwr_config(
        {"address": f"127.0.0.1:{port}", "root-certificates": str(certificates.ca_certificate)}))
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "PATH": f"{Path(_binary('flwr')).parent}:{os.environ['PATH']}"}
    started = []

    def start(name: str, command: list[str]) -> Path:
        log = tmp_path / f"{name}.log"
        with open(log, "wb") as stream:
            started.append(subprocess.Popen(command, env=env, cwd=tmp_path, stdout=stream, stderr=subprocess.STDOUT,
                                            start_new_session=True))
        return log

    try:
        superlink = start("superlink", [
            _binary("flower-superlink"), "--ssl-certfile", str(certificates.server_certificate), "--ssl-keyfile",
            str(certificates.server_key), "--ssl-ca-certfile", str(certificates.ca_certificate), "--host",
            "127.0.0.1", "--port", str(port), "--enable-supernode-auth", "--disable-runtime-dependency-installation"])
        _wait_for_port(port, lambda: None)
        subprocess.run([_binary("flwr"), "supernode", "register", str(keys["client0"][1]), CONNECTION, "--name",
                        "client0"], env=env, cwd=tmp_path, check=True, capture_output=True, timeout=60)
        logs = {name: start(name, [
            _binary("flower-supernode"), "--root-certificates", str(certificates.ca_certificate), "--superlink",
            f"127.0.0.1:{port}", "--auth-supernode-private-key", str(private), "--auth-supernode-public-key",
            str(public), "--port", str(_free_port())]) for name, (private, public) in keys.items()}
        stop = time.monotonic() + 60
        while time.monotonic() < stop and "SuperNode ID" not in logs["client0"].read_text():
            time.sleep(0.5)
        time.sleep(3)  # the intruder has retried meanwhile
    finally:
        for process in started:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert "SuperNode ID" in logs["client0"].read_text()  # the registered key joined
    assert "SuperNode ID" not in logs["intruder"].read_text()  # the unregistered one never did
    assert "No SuperNode found with the given public key" in superlink.read_text()

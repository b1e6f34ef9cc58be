"""``feddat-secure deploy local``: a real Flower deployment of one configuration, every party on 127.0.0.1.

One command starts what a multi-site deployment runs on separate machines (docs/deployment.md): a SuperLink;
for each site and for the HE key holder its agent (``feddat-secure site serve`` / ``keyholder serve``, the
party itself) and its SuperNode, whose relay ClientApp reaches the agent over a Unix socket; then
``flwr run`` submits ``deploy/flower``, whose ServerApp runs the server role from the server's own folder.
With ``tls`` the SuperLink serves TLS with a certificate made here (a private CA pinned by every node and by
``flwr``); with ``auth`` every SuperNode authenticates with an ECDSA P-384 key registered under its party's
name, and the ServerApp checks that name against the party each node proves to run.

The run folder has the simulation's layout (``parties/<party>/`` per party, audit logs included, so
``audit verify`` and ``audit reconcile`` work on it), plus ``deployment/``: every process's log and
``deployment.json`` (ports, process ids) written as soon as the processes run. Every process is torn down at
the end, on failure and on Ctrl-C; the temporary folder (Flower's home, sockets, TLS keys) is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..config import RunConfig, to_toml
from . import relay
from .party_dir import DATA_DIR, Agreement, DeploymentError, deployable_plan
from .server_role import METRICS_FILE, RESULT_FILE, parse_deadlines
from .tls import make_node_key, make_tls_certificates

CONNECTION = "feddat-local"  # the flwr connection's name (never a folder name in flwr's working directory)
DEPLOYMENT_DIR = "deployment"
STATE_FILE = "deployment.json"
HOST = "127.0.0.1"
START_TIMEOUT_S = 180.0  # agents load the model and their data; SuperLink and SuperNodes start


def flower_app_dir() -> Path:
    """``deploy/flower`` of the source tree the package runs from (an editable install, as the README's)."""
    return Path(__file__).resolve().parents[2] / "deploy" / "flower"


@dataclass(frozen=True)
class LocalSettings:
    tls: bool = False
    auth: bool = False
    overwrite: bool = False
    stage_deadline_s: float = 120.0
    deadlines: str = ""  # "<protocol>:<stage>=<seconds>,..."
    threads: int = 1  # torch threads of each party's process (several share this machine's cores)
    app_dir: Path | None = None

    def __post_init__(self) -> None:
        """Refuse a bad option before anything is written or started, in one line naming it."""
        if not (isinstance(self.stage_deadline_s, int | float) and 0 < self.stage_deadline_s <= 86400):
            raise DeploymentError(f"--stage-deadline must be a number of seconds in (0, 86400], not "
                                  f"{self.stage_deadline_s!r}")
        try:
            parse_deadlines(self.deadlines)
        except DeploymentError as error:
            raise DeploymentError(f"--deadlines: {error}".replace("run-config 'deadlines': ", "")) from None
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise DeploymentError(f"--threads must be a positive integer, not {self.threads!r}")


@dataclass
class DeployResult:
    run_dir: Path
    history: list[dict] = field(default_factory=list)
    stopped: str | None = None


class Processes:
    """Every process the deployment started, each in its own process group; all torn down by :meth:`stop`."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, command: list[str], *, env: dict[str, str], cwd: Path) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        try:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                       start_new_session=True)
        finally:
            log.close()
        self.started.append((name, process))
        return process

    def pid(self, name: str) -> int:
        return next(process.pid for started, process in self.started if started == name)

    def check_alive(self, name: str, process: subprocess.Popen) -> None:
        if process.poll() is not None:
            raise DeploymentError(f"{name} exited with code {process.returncode}; its log: "
                                  f"{self.logs / (name + '.log')}: {_tail(self.logs / (name + '.log'))}")

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM to every started process and every descendant (Flower starts its ServerApp in a session of
        its own: killing a process group would miss it), then SIGKILL to whatever is left after ``grace_s``."""
        import psutil

        everyone: list[psutil.Process] = []
        for _, process in self.started:
            with contextlib.suppress(psutil.Error):
                started = psutil.Process(process.pid)
                everyone += [started, *started.children(recursive=True)]
        for process in everyone:
            with contextlib.suppress(psutil.Error):
                process.terminate()
        _, alive = psutil.wait_procs(everyone, timeout=grace_s)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(alive, timeout=5)
        for _, process in self.started:  # reap our own children
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=1)


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (a CI cancel, `timeout`, a closed terminal) stop a deployment as Ctrl-C does, so its
    processes are torn down; only in the main thread, where Python delivers signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, _raise_interrupt) for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def deploy_local(config: RunConfig, settings: LocalSettings, *, echo: Callable[[str], None] = print) -> DeployResult:
    """Run ``config`` as a Flower deployment on this machine (see the module's docstring)."""
    from ..federation.runner import PROVENANCE_FILE, enrol_run, load_inputs, prepare_run_dir
    from ..model.adapters import LoraSettings

    app_dir = Path(settings.app_dir) if settings.app_dir else flower_app_dir()
    if not (app_dir / "pyproject.toml").is_file():
        raise DeploymentError(f"the Flower app is not at {str(app_dir)!r} (deploy/flower of the source tree); "
                              "install the project editable (README) or pass its folder")
    binaries = {name: _binary(name) for name in ("flower-superlink", "flower-supernode", "flwr")}
    # What the run needs is checked before any folder or process exists, as `feddat-secure run` does.
    foundation, benchmark = load_inputs(config)
    counts = {c.client_id: len(c.train) for c in benchmark.clients}
    plan = deployable_plan(config, foundation, LoraSettings.of(config.model), counts, len(benchmark.answers))
    run_dir = Path(config.output_dir) / config.name
    if run_dir.exists() and not settings.overwrite:
        raise DeploymentError(f"run folder {str(run_dir)!r} already exists; choose another 'name' or pass --overwrite")
    provenance = {"config_sha256": config.digest(), "data_sha256": benchmark.digest(),
                  "base_model_sha256": foundation.digest}
    prepare_run_dir(run_dir, settings.overwrite)
    try:
        (run_dir / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1, sort_keys=True) + "\n")
        (run_dir / "config.toml").write_text(to_toml(config))
        enrol_run(plan, run_dir)
        agreement = Agreement(config, counts, tuple(benchmark.answers))
        parties = [party for party, _ in plan.parties()]
        for party in parties:
            agreement.save(run_dir / "parties" / party)
            if config.data.benchmark == "folder" and party in counts:  # each site holds only its own data
                _copy_site_data(Path(config.data.path), party, run_dir / "parties" / party / DATA_DIR)
        logs = run_dir / DEPLOYMENT_DIR
        logs.mkdir()
        history, stopped = _run_processes(run_dir, parties, settings, app_dir, binaries, logs, echo)
    except BaseException:
        if not (run_dir / "parties" / "server" / RESULT_FILE).exists():
            echo(f"feddat-secure: the deployment failed; its logs are in {run_dir / DEPLOYMENT_DIR}")
        raise
    _collect(run_dir, config, foundation, benchmark, stopped, parties)
    return DeployResult(run_dir, history, stopped)


def _run_processes(run_dir: Path, parties: list[str], settings: LocalSettings, app_dir: Path,
                   binaries: dict[str, str], logs: Path, echo) -> tuple[list[dict], str | None]:
    """Start every process, run the ServerApp to its end, tear everything down; (history, why it stopped)."""
    nodes = [party for party in parties if party != "server"]  # the sites and the key holder: node + agent each
    work = Path(tempfile.mkdtemp(prefix="feddat-deploy-"))  # short paths: Unix sockets allow ~100 characters
    processes = Processes(logs)
    stack = contextlib.ExitStack()
    stack.enter_context(_signals_interrupt())
    env = {**os.environ, "FLWR_HOME": str(work / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": str(settings.threads),
           "PYTHONUNBUFFERED": "1",
           # Flower starts its own helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by name
           "PATH": os.pathsep.join([str(Path(binaries["flwr"]).parent), os.environ.get("PATH", "")])}
    state: dict = {"run_dir": str(run_dir), "tls": settings.tls, "auth": settings.auth, "processes": {}}
    try:
        superlink_port = _free_port()
        tls_args, node_tls = ["--insecure"], ["--insecure"]
        connection = {"address": f"{HOST}:{superlink_port}", "insecure": True}
        if settings.tls:
            certificates = make_tls_certificates(work / "tls", [HOST, "localhost"])
            tls_args = ["--ssl-certfile", str(certificates.server_certificate), "--ssl-keyfile",
                        str(certificates.server_key), "--ssl-ca-certfile", str(certificates.ca_certificate)]
            node_tls = ["--root-certificates", str(certificates.ca_certificate)]
            connection = {"address": f"{HOST}:{superlink_port}", "root-certificates":
                          str(certificates.ca_certificate)}
        home = work / "flwr-home"
        home.mkdir()
        (home / "config.toml").write_text(_flwr_config(connection))
        superlink = processes.start("superlink", [
            binaries["flower-superlink"], *tls_args, "--host", HOST, "--port", str(superlink_port),
            "--disable-runtime-dependency-installation", "--database", str(work / "superlink.db"),
            *(["--enable-supernode-auth"] if settings.auth else [])], env=env, cwd=work)
        _wait_for_port(superlink_port, lambda: processes.check_alive("superlink", superlink))
        agents = {}
        for party in nodes:
            socket_path = work / f"{party}.sock"
            command = "keyholder" if party == "keyholder" else "site"
            option = "--keyholder-dir" if party == "keyholder" else "--site-dir"
            agents[party] = (socket_path, processes.start(f"agent-{party}", [
                sys.executable, "-m", "feddat_secure.cli", command, "serve", option,
                str(run_dir / "parties" / party), "--socket", str(socket_path), "--threads",
                str(settings.threads)], env=env, cwd=work))
        node_keys = {}
        if settings.auth:
            for party in nodes:
                node_keys[party] = make_node_key(work / "node-keys", party)
                _checked_run([binaries["flwr"], "supernode", "register", str(node_keys[party][1]), CONNECTION,
                              "--name", party], env=env, cwd=work, what=f"registering {party}'s node key")
        for party in nodes:
            auth = ["--auth-supernode-private-key", str(node_keys[party][0])] if settings.auth else []
            processes.start(f"supernode-{party}", [
                binaries["flower-supernode"], *node_tls, "--superlink", f"{HOST}:{superlink_port}", *auth,
                "--host", HOST, "--port", str(_free_port()), "--node-config",
                str(_toml_file(work / f"node-{party}.toml", {"agent-socket": str(agents[party][0])}))],
                env=env, cwd=work)
        state["processes"] = {name: process.pid for name, process in processes.started}
        state["superlink_port"] = superlink_port
        (logs / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
        # The ServerApp starts (and loads the model) while the agents load theirs: it asks a node whose agent is
        # not serving yet again until the join timeout, and an agent that fails stops the deployment at once.
        run_config = _toml_file(work / "run-config.toml", {
            "server-dir": str(run_dir / "parties" / "server"), "stage-deadline-s": float(settings.stage_deadline_s),
            "deadlines": settings.deadlines, "node-auth": settings.auth})
        flwr_run = processes.start("flwr-run", [binaries["flwr"], "run", str(app_dir), CONNECTION, "--run-config",
                                                str(run_config), "--stream"], env=env, cwd=work)
        state["processes"]["flwr-run"] = flwr_run.pid
        (logs / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")

        def check_agents() -> None:
            for party, (_, process) in agents.items():
                if process.poll() not in (None, 0):
                    processes.check_alive(f"agent-{party}", process)

        for party, (socket_path, _) in agents.items():
            _wait_for_agent(party, socket_path, check_agents)
        echo(f"feddat-secure: SuperLink on {HOST}:{superlink_port}{' (TLS)' if settings.tls else ''}"
             f"{', node authentication on' if settings.auth else ''}; {len(agents)} agents ready")
        result_file = run_dir / "parties" / "server" / RESULT_FILE
        _follow(logs / "flwr-run.log", flwr_run, result_file, echo, check_agents)
        if not result_file.exists():
            raise DeploymentError(f"the ServerApp did not finish the run; see {logs / 'flwr-run.log'}: "
                                  f"{_tail(logs / 'flwr-run.log')}")
        for _, process in agents.values():  # each agent exits once it answered the server's close
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        result = json.loads(result_file.read_text())
    finally:
        processes.stop()
        shutil.rmtree(work, ignore_errors=True)
        stack.close()
    history = [json.loads(line) for line in (run_dir / "parties" / "server" / METRICS_FILE).read_text().splitlines()
               if line.strip()] if (run_dir / "parties" / "server" / METRICS_FILE).exists() else []
    return history, result.get("stopped")


def _copy_site_data(root: Path, site: str, target: Path) -> None:
    """A site's own folder-benchmark data (the shared answer vocabulary and its own sub-folder) into its folder."""
    target.mkdir(mode=0o700)
    shutil.copyfile(root / "answers.txt", target / "answers.txt")
    shutil.copytree(root / site, target / site, symlinks=False)


def _collect(run_dir: Path, config: RunConfig, foundation, benchmark, stopped: str | None,
             parties: list[str]) -> None:
    """The run folder's own files, from the server's folder (as `feddat-secure run` writes them), and the
    manifest's record of every party's closed audit log (every party's folder is under this run folder)."""
    from ..data.report import data_report
    from ..federation.runner import audit_record, write_manifest
    from ..privacy.report import write_privacy_report
    from ..privacy.run_privacy import load_run_ledgers

    server = run_dir / "parties" / "server"
    shutil.copyfile(server / METRICS_FILE, run_dir / METRICS_FILE)
    if (server / "global_adapter").is_dir():
        shutil.copytree(server / "global_adapter", run_dir / "global_adapter")
    quality = data_report(benchmark, foundation.tokenizer, foundation.max_text_length)
    if load_run_ledgers(run_dir) is not None:
        write_privacy_report(run_dir, allow_unsigned=not config.audit.enabled)
    write_manifest(run_dir, config, foundation, benchmark, stopped, quality.to_dict(),
                   audit_record(run_dir, parties, dropouts_allowed=True) if config.audit.enabled else None)


def _follow(log: Path, process: subprocess.Popen, result_file: Path, echo, check: Callable[[], None]) -> None:
    """Echo the ServerApp's lines (round tables, warnings) while ``flwr run`` runs; return when it exits, or
    when the server wrote its result (``flwr run --stream`` may linger on the log stream). ``check`` raises
    when a party's process failed meanwhile."""
    position = 0
    while True:
        check()
        done = process.poll() is not None
        if log.exists():
            with open(log, "rb") as stream:
                stream.seek(position)
                chunk = stream.read()
            complete = chunk.rfind(b"\n") + 1
            for line in chunk[:complete].decode("utf-8", "replace").splitlines():
                if line.startswith(("feddat-secure", "round ", " ")) and "INFO" not in line and "DEBUG" not in line:
                    echo(line)
            position += complete
        if done:
            return
        if result_file.exists():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
            return
        time.sleep(0.5)


def _toml_file(path: Path, values: dict) -> Path:
    """Flat ``values`` (str, float, bool) as a TOML file: what --run-config and --node-config read safely,
    whatever characters a path holds (JSON string escapes are TOML basic-string escapes)."""
    lines = [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _flwr_config(connection: dict) -> str:
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]"]
    for key, value in connection.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def _binary(name: str) -> str:
    """A Flower command next to this Python (the same environment), else on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"{name!r} is not installed: install the deploy extra "
                              "(pip install -c constraints.txt -e \".[deploy]\")")
    return found


def _checked_run(command: list[str], *, env: dict, cwd: Path, what: str) -> None:
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise DeploymentError(f"{what} failed: {' '.join((done.stdout + done.stderr).split())[-400:]}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _wait_for_port(port: int, check: Callable[[], None]) -> None:
    stop = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < stop:
        check()
        with socket.socket() as probe, contextlib.suppress(OSError):
            probe.settimeout(0.5)
            probe.connect((HOST, port))
            return
        time.sleep(0.2)
    raise DeploymentError(f"nothing listens on {HOST}:{port} after {START_TIMEOUT_S:g} s")


def _wait_for_agent(party: str, socket_path: Path, check: Callable[[], None]) -> None:
    stop = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < stop:
        check()
        try:
            if relay.call(str(socket_path), relay.KIND_PING, 0, [], timeout_s=2) == [party.encode()]:
                return
        except relay.RelayError:
            pass
        time.sleep(0.3)
    raise DeploymentError(f"the agent of {party} did not start within {START_TIMEOUT_S:g} s")


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"

"""One federated round over a real Flower deployment vs the in-process simulation of the same configuration.

Runs ``feddat-secure deploy local`` (SuperLink, one SuperNode + agent per party, the ServerApp, all on this
machine) and, in this process, the simulation ``feddat-secure run`` uses, on the same configuration; prints
the round's wall time in both and their ratio (the simulation is the baseline), each exchange's latency over
Flower (from the server's audit log: first request sent → last reply received), the bytes the server sent to
and received from each party, and the peak resident memory of every process the deployment started
(sampled from /proc while it runs; a ClientApp process lives for one message).

    .venv/bin/python benchmarks/deployment.py [--config CONFIG.toml] [--sites 3] [--protocol masked]
                                              [--output FILE.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import threading
import time
from collections import defaultdict
from importlib import resources
from pathlib import Path

import torch

from feddat_secure.config import config_from_dict, load_config, to_dict
from feddat_secure.deployment.local import DEPLOYMENT_DIR, STATE_FILE, LocalSettings, deploy_local
from feddat_secure.federation.runner import run


def configured(path: str | None, sites: int, protocol: str, output_dir: Path, name: str):
    base = load_config(path or resources.files("feddat_secure") / "configs" / "demo.toml")
    values = to_dict(base)
    values.update(name=name, output_dir=str(output_dir))
    values["data"] = {**values["data"], "num_clients": sites}
    values["federation"] = {**values["federation"], "rounds": 1}
    values["secure_aggregation"] = {**values["secure_aggregation"], "protocol": protocol}
    return config_from_dict(values)


class MemorySampler(threading.Thread):
    """Peak resident memory (VmHWM) of every process the deployment started and of their descendants (Flower's
    executors, the ServerApp, each message's ClientApp), by role."""

    def __init__(self, state_file: Path) -> None:
        super().__init__(daemon=True)
        self.state_file = state_file
        self.peaks: dict[str, int] = defaultdict(int)  # role → KiB
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            try:
                started = {pid: name for name, pid in json.loads(self.state_file.read_text())["processes"].items()}
            except (OSError, ValueError, KeyError):
                continue
            parents, peaks, commands = {}, {}, {}
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    commands[int(entry.name)] = (entry / "cmdline").read_bytes().split(b"\0")
                    peaks[int(entry.name)] = next(int(line.split()[1]) for line in
                                                  (entry / "status").read_text().splitlines()
                                                  if line.startswith("VmHWM:"))
                except (OSError, ValueError, IndexError, StopIteration):
                    continue
            for pid, peak in peaks.items():
                ancestor = pid
                while ancestor in parents and ancestor not in started:
                    ancestor = parents[ancestor]
                if ancestor in started:
                    role = role_of(started[ancestor], commands[pid])
                    self.peaks[role] = max(self.peaks[role], peak)


def role_of(group: str, command: list[bytes]) -> str:
    program = " ".join(Path(part.decode(errors="replace")).name for part in command[:3])
    for known in ("flwr-serverapp", "flwr-clientapp", "flower-superexec"):
        if known in program:
            return f"{group.split('-')[0]}: {known}"
    return group


def exchanges(audit_log: Path) -> list[tuple[str, float]]:
    """(stage of the requests, seconds from its first request sent to its last reply received), in order."""
    out: list[list] = []
    for line in audit_log.read_text().splitlines():
        entry = json.loads(line)
        when = datetime.datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).timestamp()
        if entry["event"] == "message_sent":
            if not out or out[-1][3]:  # a send after replies: the next exchange
                out.append([entry["stage"], when, when, False])
        elif entry["event"] == "message_received" and out:
            out[-1][2], out[-1][3] = when, True
    return [(stage, end - start) for stage, start, end, _ in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a run configuration (default: the embedded demo's)")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--protocol", default="masked", choices=("plain", "masked", "he"))
    parser.add_argument("--output", help="also write the tables to this Markdown file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        torch.set_num_threads(1)  # as each party process of the deployment computes
        start = time.perf_counter()
        simulated = run(configured(args.config, args.sites, args.protocol, root, "simulated"), progress=False,
                        echo=lambda line: None)
        simulated_total = time.perf_counter() - start
        config = configured(args.config, args.sites, args.protocol, root, "deployed")
        sampler = MemorySampler(root / "deployed" / DEPLOYMENT_DIR / STATE_FILE)
        sampler.start()
        start = time.perf_counter()
        deployed = deploy_local(config, LocalSettings(), echo=lambda line: None)
        deployed_total = time.perf_counter() - start
        sampler.stop.set()
        sampler.join()
        result = json.loads((deployed.run_dir / "parties" / "server" / "result.json").read_text())
        stages = exchanges(deployed.run_dir / "parties" / "server" / "server.audit.jsonl")
    round_simulated, round_deployed = simulated.history[-1]["seconds"], deployed.history[-1]["seconds"]
    lines = [f"{args.sites} sites, {args.protocol}, 1 round of {config.federation.algorithm} "
             f"({config.data.benchmark}, {config.data.train_per_client} records per site, "
             f"{config.training.local_steps} local steps); {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, flwr 1.42", "",
             "| | simulation (baseline) | Flower deployment | ratio |", "|---|---:|---:|---:|",
             f"| the round (train → protocol → evaluate + tree heads), s | {round_simulated:.1f} | "
             f"{round_deployed:.1f} | {round_deployed / round_simulated:.1f}× |",
             f"| whole command (set-up, opening, round, closing, outputs), s | {simulated_total:.1f} | "
             f"{deployed_total:.1f} | {deployed_total / simulated_total:.1f}× |", "",
             "| exchange over Flower | seconds |", "|---|---:|"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in stages]
    lines += ["", "| party | bytes sent to it | bytes received from it |", "|---|---:|---:|"]
    lines += [f"| {party} | {result['bytes_sent'][party]:,} | {result['bytes_received'].get(party, 0):,} |"
              for party in sorted(result["bytes_sent"])]
    lines += ["", "| process | peak resident memory, MiB |", "|---|---:|"]
    lines += [f"| {role} | {kib / 1024:.0f} |" for role, kib in sorted(sampler.peaks.items())]
    text = "\n".join(lines)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()

"""Red team of issue 16's performance changes (the wire's payload digest and worker threads, fused mask expansion,
packed masked values, the HE server's spool): each test plays an attacker, a careless operator or an unlucky
deployment against the package's own classes and names the break it pins."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from test_protocols_he import Harness, weighted_sum

from protocols import ConfigurationError, MessageRejected, parallel
from protocols.he import spool

ROOT = Path(__file__).resolve().parents[1]


def test_a_process_forked_after_the_pool_has_worked_still_gets_its_bulk_work_done():
    """multiprocessing's default start method on Linux forks: the child inherits the pool object but none of its
    threads, and the pool's idle count says its (absent) workers are free, so work handed to them never ran and
    the child hung on its first hash or mask (found: the child was killed by the watchdog)."""
    script = textwrap.dedent("""
        import os, threading, time
        os.environ["FEDDAT_SECURE_THREADS"] = "3"
        from protocols import parallel
        def slow(value):
            time.sleep(0.05)
            return value
        assert parallel.run_each(slow, [(0,), (1,), (2,)]) == [0, 1, 2]
        time.sleep(0.3)  # the workers are idle now, as they are between rounds
        child = os.fork()
        if child == 0:
            results = []
            worker = threading.Thread(target=lambda: results.append(parallel.run_each(slow, [(3,), (4,), (5,)])),
                                      daemon=True)
            worker.start()
            worker.join(20)
            os._exit(0 if results == [[3, 4, 5]] else 3)
        print("child exit", os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "child exit 0"


def test_a_party_that_took_the_pool_can_still_use_it_when_another_party_grows_it(monkeypatch):
    """Two parties in one process (the runner, site agents): party A takes the shared pool for a small job and is
    descheduled before it submits; party B needs more workers, so the pool is replaced. The replaced pool used to
    be shut down under A, whose submit then raised RuntimeError("cannot schedule new futures after shutdown")."""
    monkeypatch.setenv(parallel.THREADS_VARIABLE, "8")
    monkeypatch.setattr(parallel, "_pool", None)
    monkeypatch.setattr(parallel, "_pool_size", 0)
    taken, grown = threading.Event(), threading.Event()
    original = parallel._shared_pool

    def descheduled_after_taking(size: int):
        pool = original(size)
        if threading.current_thread().name == "party-a":
            taken.set()
            grown.wait(10)  # the scheduler runs party B here
        return pool

    monkeypatch.setattr(parallel, "_shared_pool", descheduled_after_taking)
    outcome = {}

    def party_a() -> None:
        try:
            outcome["a"] = parallel.run_each(lambda value: value + 1, [(1,), (2,)])
        except BaseException as error:  # noqa: BLE001 (reported below)
            outcome["a"] = error

    a = threading.Thread(target=party_a, name="party-a")
    a.start()
    assert taken.wait(10)
    assert parallel.run_each(lambda value: value * 2, [(value,) for value in range(6)]) == [0, 2, 4, 6, 8, 10]
    grown.set()
    a.join(10)
    assert outcome["a"] == [2, 3]


@pytest.mark.parametrize("value", ["²", "1²"])
def test_a_thread_count_of_non_ascii_digits_is_refused_naming_the_variable(monkeypatch, value):
    """str.isdigit accepts superscripts and other scripts' digits that int() then refuses or reads: an operator's
    typo gave a bare ValueError ("invalid literal for int()") instead of the ConfigurationError naming the variable."""
    monkeypatch.setenv(parallel.THREADS_VARIABLE, value)
    with pytest.raises(ConfigurationError, match="FEDDAT_SECURE_THREADS must be a positive integer"):
        parallel.worker_count()


@pytest.mark.parametrize("victim", [0, 1, 2])  # the first input (the sum starts from it), a middle one, the last
def test_an_input_whose_spool_file_cannot_be_written_is_left_out_of_the_sum_and_the_round_still_succeeds(
        monkeypatch, victim):
    """The HE server adds an input's ciphertexts while its spool file is written; when the write fails (the
    temporary folder's disk is full: n × 32 MB at P = 1M), the input is refused and not counted. Its ciphertexts
    used to stay in the running sum anyway, so the sum no longer matched the counted inputs, the committee refused
    to attest it and every honest client's round was lost."""
    harness = Harness(3, min_clients=2)
    harness.open()
    harness.commit()
    requests = {m.recipient: m.data for m in harness.server.advance()}

    def full_disk(path, mode, **options):  # the direct write opens through the same open(), with an opener
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    for name, request in requests.items():
        [answer] = harness.clients[name].handle(request)
        if name == f"client-{victim}":
            with monkeypatch.context() as patch:
                patch.setattr(spool, "open", full_disk, raising=False)
                with pytest.raises(MessageRejected, match="No space left on device"):
                    harness.server.receive(answer.data)
        else:
            harness.server.receive(answer.data)
    counted = tuple(name for name in sorted(requests) if name != f"client-{victim}")
    assert tuple(sorted(harness.server._inputs)) == counted
    result = harness.finish()
    assert result.counted == counted
    np.testing.assert_allclose(result.vector, weighted_sum(harness.xs, harness.ws, skip={victim}), atol=1e-5)


def test_the_flower_channel_reads_each_spooled_input_once_however_many_members_it_goes_to(monkeypatch):
    """The HE server relays every counted input to each committee member, read back from its spool file when sent
    (the last one read is shared with the next reader). The Flower channel batches all of a member's requests into
    one message, so it read member by member and made a copy of every input per member: s × n × 32 MB at once
    (s = 3: 8.7 GB at n = 100, P = 1M) where the server held n × 32 MB in memory before it spooled at all."""
    from flwr.supercore.task_identity import TaskIdentity
    from test_deployment_parts import FakeGrid

    from feddat_secure.deployment.grid_channel import RECORD, GridChannel
    for name, value in (("_task_id", 1), ("_run_id", 3), ("_node_id", 1)):  # what Flower sets in a ServerApp
        monkeypatch.setattr(TaskIdentity, name, value)
    harness = Harness(4, committee_size=3)
    inputs = harness.start()
    harness.draw()
    grid = FakeGrid()
    nodes = {member: 100 + index for index, member in enumerate(harness.committee)}
    for node in nodes.values():
        grid.add(node, lambda request: None)  # the members' answers do not matter here
    channel = GridChannel(grid, nodes=nodes)
    channel.exchange(harness.server.advance(), deadline_s=0)
    relayed = [data for message in grid.pushed for data in message.content[RECORD]["requests"]
               if data in inputs.values()]
    assert len(relayed) == len(inputs) * len(harness.committee)
    assert len({id(data) for data in relayed}) == len(inputs)


def test_a_forked_child_that_exits_normally_leaves_its_parents_spooled_inputs_alone():
    """The spool folder's finalizer runs at interpreter exit; a child forked while the HE server held inputs
    inherited it, so the child's normal exit deleted the parent's folder and the round lost every counted input."""
    script = textwrap.dedent("""
        import os, sys
        from protocols.he.spool import Spool
        inputs = Spool()
        inputs.put("client-0", b"signed input")
        child = os.fork()
        if child == 0:
            sys.exit(0)  # a helper process that ends normally: atexit runs
        os.waitpid(child, 0)
        print(inputs["client-0"].decode())
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "signed input"


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 17])
def test_a_directly_written_input_reads_back_byte_for_byte_at_its_own_length(tmp_path, size):
    """Direct I/O writes whole 4 KiB blocks from a reused staging buffer: a file left padded, or holding the end of
    the previous (longer) input, would be relayed with bytes its client never signed and the committee would abort
    the round. Inputs of every length against the block, each after a longer one."""
    inputs = spool.Spool(parent=tmp_path)
    longer = bytes(range(256)) * (size // 256 + 40)
    inputs.put("before", longer)
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    inputs.put("input", data)
    assert inputs["input"] == data and inputs["before"] == longer
    assert (inputs.folder / "000001.msg").stat().st_size == size
    inputs.clear()


def test_a_file_system_that_refuses_direct_io_gets_every_input_written_buffered(tmp_path, monkeypatch):
    """O_DIRECT is refused with EINVAL by some file systems (tmpfs before Linux 6.6, FUSE and network mounts): the
    spool must fall back to buffered writes, not refuse every input and with it every round."""
    def no_direct_io(path, flags):
        raise OSError(errno.EINVAL, "Invalid argument", path)

    monkeypatch.setattr(spool, "_direct_opener", no_direct_io)
    inputs = spool.Spool(parent=tmp_path)
    inputs.put("client-0", b"first signed input")
    inputs.put("client-1", b"second")
    assert inputs.writes_directly is False
    assert (inputs["client-0"], inputs["client-1"]) == (b"first signed input", b"second")
    inputs.clear()


def test_a_direct_write_that_fails_for_another_reason_is_an_error_and_leaves_no_file(tmp_path, monkeypatch):
    """Only EINVAL means "no direct I/O here"; a full disk during a direct write must refuse that input (its file
    gone, the folder's other inputs kept), not silently retry it buffered into the same full disk."""
    inputs = spool.Spool(parent=tmp_path)
    inputs.put("client-0", b"kept")
    if not inputs.writes_directly:
        pytest.skip(f"{tmp_path}'s file system refuses O_DIRECT")
    real_ftruncate = spool.os.ftruncate

    def full_disk(descriptor, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool.os, "ftruncate", full_disk)
    with pytest.raises(OSError, match="No space left"):
        inputs.put("client-1", b"refused" * 1000)
    monkeypatch.setattr(spool.os, "ftruncate", real_ftruncate)
    assert list(inputs) == ["client-0"] and inputs["client-0"] == b"kept"
    assert sorted(path.name for path in inputs.folder.iterdir()) == ["000000.msg"]
    inputs.clear()

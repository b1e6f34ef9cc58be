"""The worker threads behind mask expansion and the masked sum: results never depend on how many there are."""

from __future__ import annotations

import threading

import pytest

from protocols import ConfigurationError, parallel


@pytest.mark.parametrize(("length", "parts", "align"), [(0, 2, 1), (1, 2, 4), (10, 3, 1), (10, 3, 4), (17, 2, 4),
                                                         (5, 8, 1), (1_000_000, 2, 4)])
def test_spans_cover_the_range_once_in_order_with_aligned_inner_boundaries(length, parts, align):
    spans = parallel.spans(length, parts, align)
    assert len(spans) <= max(parts, 1)
    covered = [index for start, stop in spans for index in range(start, stop)]
    assert covered == list(range(length))
    assert all(start % align == 0 for start, _ in spans)


def test_run_each_returns_results_in_order_and_uses_the_pool(monkeypatch):
    monkeypatch.setenv(parallel.THREADS_VARIABLE, "3")
    seen = set()

    def square(value: int) -> int:
        seen.add(threading.get_ident())
        return value * value

    assert parallel.run_each(square, [(value,) for value in range(6)]) == [0, 1, 4, 9, 16, 25]
    assert threading.get_ident() in seen  # the caller takes the first item itself


def test_run_each_raises_only_after_every_call_has_finished():
    finished = []

    def work(index: int) -> None:
        if index == 0:
            raise ValueError("first failed")
        threading.Event().wait(0.05)
        finished.append(index)

    with pytest.raises(ValueError, match="first failed"):
        parallel.run_each(work, [(0,), (1,), (2,)])
    assert sorted(finished) == [1, 2]  # nothing is still writing when the caller sees the error


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_thread_count_is_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(parallel.THREADS_VARIABLE, value)
    with pytest.raises(ConfigurationError, match="FEDDAT_SECURE_THREADS must be a positive integer"):
        parallel.worker_count()


def test_the_thread_count_defaults_to_the_usable_cpus(monkeypatch):
    monkeypatch.delenv(parallel.THREADS_VARIABLE, raising=False)
    assert parallel.worker_count() >= 1
    monkeypatch.setenv(parallel.THREADS_VARIABLE, "1")
    assert parallel.worker_count() == 1


def test_work_split_from_inside_a_worker_runs_there_instead_of_waiting_on_the_pool(monkeypatch):
    monkeypatch.setenv(parallel.THREADS_VARIABLE, "2")

    def inner(value: int) -> int:
        return value + 1

    def outer(value: int) -> list[int]:
        return parallel.run_each(inner, [(value,), (value + 10,)])

    assert parallel.run_each(outer, [(0,), (100,)]) == [[1, 11], [101, 111]]


def test_the_command_line_refuses_a_bad_thread_count_at_start_up_in_one_line(monkeypatch, capsys):
    from feddat_secure.cli import main
    monkeypatch.setenv(parallel.THREADS_VARIABLE, "many")
    assert main(["privacy", "ledger", "show", "/nonexistent"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == "feddat-secure: error: FEDDAT_SECURE_THREADS must be a positive integer, not 'many'"

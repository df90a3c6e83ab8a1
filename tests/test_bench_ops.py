"""tests.bench.ops's window figures: pure functions over recorded calls, no server."""

from __future__ import annotations

import math

from tests.bench.ops import CHECK, FOLLOW, ClientRecords, compare, importer_phases, window_stats
from tests.bench.opslocks import step_at


def records(*calls: tuple[float, float, bool]) -> ClientRecords:
    r = ClientRecords()
    for start, latency, failed in calls:
        r.starts.append(start)
        r.latencies.append(latency)
        r.kinds.append(FOLLOW if start < 5 else CHECK)
        r.failed.append(failed)
    return r


def test_a_call_held_across_the_window_counts_with_its_whole_latency() -> None:
    calls = records((9.0, 4.0, False), (10.5, 0.1, False), (11.0, 0.2, False))
    w = window_stats(calls, 10.0, 12.0)
    assert w["calls"] == 3
    assert w["max_ms"] == 4000.0
    assert w["answered"] == 2  # the long call answered at 13.0, after the window
    assert w["calls_per_s"] == 1.0
    # answers at 10.6 and 11.2: the longest stretch without one is 11.2 -> 12.0
    assert math.isclose(w["longest_gap_ms"], 800.0)
    assert w["max_ms_by_call"]["check20"] == 4000.0


def test_calls_outside_the_window_and_failures() -> None:
    calls = records((1.0, 0.1, False), (10.1, 0.1, True), (20.0, 0.1, False))
    w = window_stats(calls, 10.0, 11.0)
    assert (w["calls"], w["answered"], w["errors"]) == (1, 0, 1)
    assert w["longest_gap_ms"] == 1000.0


def test_empty_window_is_nan_not_an_error() -> None:
    w = window_stats(ClientRecords(), 0.0, 1.0)
    assert math.isnan(w["max_ms"])
    assert w["calls_per_s"] == 0.0


def test_compare_ratios_and_target() -> None:
    base = window_stats(records((10.0, 0.01, False), (10.2, 0.01, False)), 10.0, 11.0)
    slow = window_stats(records((20.0, 0.6, False), (20.7, 0.1, False)), 20.0, 21.0)
    fast = window_stats(records((30.0, 0.02, False), (30.1, 0.02, False)), 30.0, 30.4)
    assert compare(base, slow)["target_met"] is False  # 600 ms > 500 ms
    assert compare(base, fast)["target_met"] is True
    assert compare(base, fast)["calls_per_s"] == 2.5


def test_importer_phases_read_from_its_log_line_in_order() -> None:
    """The importer's `phases:` INFO line becomes its steps and seconds, in order."""
    log = (
        "2026-11-26 INFO server.importer.cli importing into postgresql://x (database ready)\n"
        "2026-11-26 INFO server.importer.cli phases: prepare 0.09s, read accounts 2.48s,"
        " check edges 16.78s, write edges 100.00s, analyze 1.06s\n"
    )
    assert importer_phases(log) == [
        ("prepare", 0.09),
        ("read accounts", 2.48),
        ("check edges", 16.78),
        ("write edges", 100.0),
        ("analyze", 1.06),
    ]
    assert importer_phases("no such line\n") == []


def test_step_at_places_the_batches_at_the_first_batch() -> None:
    """With batches, "write edges" starts at the first batch; before the first step the
    process was starting; without phases there is no step."""
    phases = [("prepare", 1.0), ("check edges", 4.0), ("write edges", 10.0), ("analyze", 1.0)]
    # the first batch at 7 s: prepare 2-3, check 3-7, write edges 7-17, analyze 17-18
    assert step_at(phases, 7.0, 20.0, 1.5) == "starting"
    assert step_at(phases, 7.0, 20.0, 2.5) == "prepare"
    assert step_at(phases, 7.0, 20.0, 6.9) == "check edges"
    assert step_at(phases, 7.0, 20.0, 7.1) == "write edges"
    assert step_at(phases, 7.0, 20.0, 17.5) == "analyze"
    assert step_at(phases, 7.0, 20.0, 19.0) == "exiting"
    assert step_at([], 7.0, 20.0, 5.0) == ""


def test_step_at_without_batches_ends_with_the_process() -> None:
    """Without a batch the steps are placed to end when the importer's process ended."""
    phases = [("prepare", 1.0), ("check edges", 4.0)]
    assert step_at(phases, None, 10.0, 4.5) == "starting"
    assert step_at(phases, None, 10.0, 5.5) == "prepare"
    assert step_at(phases, None, 10.0, 9.9) == "check edges"

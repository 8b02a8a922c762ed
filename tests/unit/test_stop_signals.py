"""StopSignals: a stop signal recorded, then handed over to the previous handler with the conventional exit code."""

from __future__ import annotations

import signal

import pytest

from prefopt.engine import StopSignals


def test_a_received_signal_is_handed_to_the_previous_handler():
    seen = []
    old = signal.signal(signal.SIGUSR2, lambda num, frame: seen.append(num))
    try:
        with pytest.raises(SystemExit) as exit_info, StopSignals((signal.SIGUSR2,)) as stop:
            signal.raise_signal(signal.SIGUSR2)
            assert stop.received == signal.SIGUSR2 and stop.name == "SIGUSR2"
            stop.hand_over()
        assert seen == [signal.SIGUSR2] and exit_info.value.code == 128 + signal.SIGUSR2
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_a_rank_that_agreed_before_its_own_signal_hands_over_the_scheduler_signal():
    seen = []
    old = signal.signal(signal.SIGUSR2, lambda num, frame: seen.append(num))
    try:
        with pytest.raises(SystemExit) as exit_info, StopSignals((signal.SIGUSR2,)) as stop:
            assert stop.received is None  # another rank got the signal; this one stops with it
            stop.hand_over()
        assert seen == [signal.SIGUSR2] and exit_info.value.code == 128 + signal.SIGUSR2
    finally:
        signal.signal(signal.SIGUSR2, old)

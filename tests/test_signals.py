"""Stops by signal as exceptions: SIGTERM raises Terminated except inside a Lightning fit (Lightning stops that at the
next batch), and CtrlC remembers a Ctrl-C and absorbs a second one while the first is handled."""

from __future__ import annotations

import os
import signal
import time

import pytest

from compress.errors import Terminated
from compress.signals import CtrlC, lightning_fit, sigterm_raises


def _deliver(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # the handler runs here, in the main thread


def test_sigterm_raises_terminated_outside_a_fit_and_leaves_a_fit_to_lightning() -> None:
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(Terminated), sigterm_raises():
            _deliver(signal.SIGTERM)
        with sigterm_raises():
            with lightning_fit():
                _deliver(signal.SIGTERM)  # Lightning's own handler (composed with ours) would stop the fit
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back
        assert issubclass(Terminated, KeyboardInterrupt)  # so every Ctrl-C handler closes its work alike
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_second_ctrl_c_while_the_first_is_handled_is_absorbed() -> None:
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background shell's tests ignore SIGINT
    try:
        with CtrlC() as ctrl_c:
            with pytest.raises(KeyboardInterrupt):
                _deliver(signal.SIGINT)
            _deliver(signal.SIGINT)  # during the cleanup: no second KeyboardInterrupt
            assert ctrl_c.pressed
            with pytest.raises(KeyboardInterrupt):
                ctrl_c.stop_if_pressed()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)

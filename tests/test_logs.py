"""Log lines and progress bars share stderr without splitting each other's lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import logging, sys, time
from tqdm import tqdm
from shared.logs import configure_logging, log_above_progress_bars
configure_logging("test")
if sys.argv[1] == "redirected":
    log_above_progress_bars()
bar = tqdm(total=2, desc="work", mininterval=0)
bar.update(1)
logging.getLogger("test").info("MARK a line of the log")
bar.update(1)
bar.close()
"""


@pytest.mark.parametrize("mode", ["redirected", "plain"])
def test_a_log_line_starts_its_own_line_only_when_redirected(mode: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    err = done.stderr
    at = err.index(" INFO service=test test MARK")
    line_start = max(err.rfind("\n", 0, at), err.rfind("\r", 0, at)) + 1
    before = err[line_start:at]
    # Only the record's own timestamp may precede it on its line: no piece of a bar.
    assert ("|" not in before) == (mode == "redirected"), repr(err)

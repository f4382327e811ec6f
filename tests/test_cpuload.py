"""objfs.cpuload: idle CPUs from /proc/stat's counters."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from objfs.cpuload import PROC_STAT, IdleCpus, idle_and_total

STAT = """cpu  {user} 10 {system} {idle} {iowait} 0 5 0 0 0
cpu0 100 5 50 2000 10 0 2 0 0 0
cpu1 100 5 50 2000 10 0 3 0 0 0
intr 12345 0 0
ctxt 999
"""


def stat_text(user: int, system: int, idle: int, iowait: int) -> str:
    return STAT.format(user=user, system=system, idle=idle, iowait=iowait)


def test_idle_counts_idle_and_iowait_over_all_cpus() -> None:
    idle, total, cpus = idle_and_total(stat_text(200, 100, 4000, 20))
    assert (idle, total, cpus) == (4020, 200 + 10 + 100 + 4000 + 20 + 0 + 5 + 0, 2)


@pytest.mark.parametrize("text", ["", "intr 1 2 3\n", "cpu  1 2 3\n"])
def test_a_text_without_a_complete_cpu_line_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        idle_and_total(text)


def test_idle_cpus_between_two_samples(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text(stat_text(200, 100, 4000, 20))
    cpus = IdleCpus(stat)
    assert cpus.sample() is None  # nothing to compare with yet
    # 100 ticks pass: 40 busy, 60 idle (50 idle + 10 iowait) over 2 CPUs: 1.2 CPUs idle.
    stat.write_text(stat_text(230, 110, 4050, 30))
    assert cpus.sample() == pytest.approx(1.2)
    stat.write_text(stat_text(230, 110, 4050, 30))
    assert cpus.sample() is None  # no tick passed: no answer rather than a division by 0
    stat.write_text(stat_text(330, 210, 4050, 30))
    assert cpus.sample() == 0.0


def test_unreadable_counters_answer_none_and_are_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cpus = IdleCpus(tmp_path / "missing")
    with caplog.at_level(logging.INFO, logger="objfs.cpuload"):
        assert cpus.sample() is None
        assert cpus.sample() is None
    assert len([r for r in caplog.records if "cannot read CPU counters" in r.message]) == 1


def test_the_real_counters_can_be_read() -> None:
    assert idle_and_total(PROC_STAT.read_text())[2] >= 1
    cpus = IdleCpus()
    assert cpus.sample() is None
    time.sleep(0.05)  # a few clock ticks
    value = cpus.sample()
    assert value is not None and 0.0 <= value <= idle_and_total(PROC_STAT.read_text())[2]

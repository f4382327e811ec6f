"""How much CPU the machine leaves unused, from the kernel's counters in ``/proc/stat``.

The store's background requests (uploads, deletes) yield to Orthanc while it writes; this is
how they tell a pause in Orthanc's work (the CPUs idle: send at full speed) from a moment it
spends receiving the next file's HTTP body (no file-system request, but the CPUs busy: keep
yielding). See `objfs.store.writeback` (`_turn`) and docs/design.md, "Performance shape".
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

PROC_STAT = Path("/proc/stat")


def idle_and_total(text: str) -> tuple[int, int, int]:
    """(idle, total, cpus) from the text of ``/proc/stat``: idle and total clock ticks summed
    over every CPU (idle counts ``idle`` and ``iowait``: a CPU waiting for the disk is free
    for other work) and the number of CPUs listed. Raises ValueError for a text without the
    aggregate ``cpu`` line."""
    idle = total = cpus = 0
    found = False
    for line in text.splitlines():
        fields = line.split()
        if not fields or not fields[0].startswith("cpu"):
            continue
        if fields[0] == "cpu":
            # user nice system idle iowait irq softirq steal (guest time is inside user)
            ticks = [int(f) for f in fields[1:9]]
            if len(ticks) < 5:
                raise ValueError(f"/proc/stat: short cpu line {line!r}")
            idle, total, found = ticks[3] + ticks[4], sum(ticks), True
        else:
            cpus += 1
    if not found:
        raise ValueError("/proc/stat: no aggregate cpu line")
    return idle, total, max(cpus, 1)


class IdleCpus:
    """Idle CPUs between one `sample` and the next: 1.0 is one CPU's worth of time unused.

    Owned by one caller (the store's watcher task); not thread-safe.
    """

    def __init__(self, path: Path = PROC_STAT) -> None:
        self.path = path
        self._last: tuple[int, int] | None = None
        self._warned = False

    def sample(self) -> float | None:
        """Idle CPUs since the previous call; None on the first call, when no tick passed, or
        when the counters cannot be read (logged once, never raised: the caller then keeps
        its time-based rule)."""
        try:
            idle, total, cpus = idle_and_total(self.path.read_text())
        except (OSError, ValueError) as exc:
            if not self._warned:
                log.info("cannot read CPU counters (%s): background work yields to Orthanc "
                         "by time alone", exc)
                self._warned = True
            self._last = None
            return None
        last, self._last = self._last, (idle, total)
        if last is None or total <= last[1]:
            return None
        return cpus * max(0, idle - last[0]) / (total - last[1])

"""A hung-rank watchdog: end the job when no optimizer step (or evaluation) completes within a time limit.

A rank that hangs (a stopped process, a dead NIC, a GPU stuck in a kernel) leaves the others blocked inside a
collective, where neither Python signal handlers nor exceptions run: under mpirun/srun such a job otherwise waits
for the scheduler's wall limit. A daemon thread here notices that the main thread made no progress, prints where
this rank waited and every thread's stack (faulthandler), leaves `RUN_DIR/STALLED`, and ends the process with
`STALL_EXIT_CODE` through `os._exit` (which works while the main thread is blocked in C++). The launcher then
ends the other ranks: mpirun and `srun --kill-on-bad-exit` kill the job when one rank exits non-zero.

Which ranks did not arrive: every rank's watchdog thread rewrites `RUN_DIR/.heartbeat/rank<R>.json` each period
(the one file non-zero ranks write). A stopped or dead process stops beating, a live rank blocked elsewhere beats
with its own position, so the rank that fires names both kinds (when the run folder is shared). Horovod's stall
inspector (HOROVOD_STALL_CHECK_TIME_SECONDS, set by `dist.init(stall_timeout=...)`) also names ranks that are alive
but never submitted a tensor; it cannot see a stopped process, whose absence blocks Horovod's own coordination.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

__all__ = ["STALL_EXIT_CODE", "Watchdog", "start", "beat", "stop", "stall_check_seconds"]

#: the exit code of a rank ended by the watchdog (sysexits EX_TEMPFAIL: worth a retry); job scripts requeue on it
STALL_EXIT_CODE = 75

_active: Watchdog | None = None


def stall_check_seconds(timeout: float) -> int:
    """Horovod's stall-inspector period for a watchdog `timeout`: its warning comes well before the watchdog."""
    return max(1, int(timeout / 3))


class Watchdog:
    """Ends the process when `beat()` has not been called for `timeout` seconds.

    Args:
        timeout: seconds without progress before the process ends (0: never).
        rank: this rank, for the message.
        marker: a file to write before exiting (the job script's sign to requeue), or None.
    """

    def __init__(self, timeout: float, rank: int = 0, marker: Path | None = None):
        self.timeout, self.rank, self.marker = timeout, rank, marker
        self.beats = marker.parent / ".heartbeat" if marker is not None else None
        self.period = min(1.0, timeout / 10) if timeout > 0 else 1.0
        self.last = time.monotonic()
        self.where = "start-up (before the first optimizer step)"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hvdtrain-watchdog", daemon=True)

    def start(self) -> Watchdog:
        if self.timeout > 0:
            self._thread.start()
        return self

    def beat(self, where: str) -> None:
        """Progress: `where` names what this rank waits for next (shown if it never comes)."""
        self.last, self.where = time.monotonic(), where

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        self._write_beat(0.0)  # at once: a rank stopped within its first period is still on record
        while not self._stop.wait(self.period):
            idle = time.monotonic() - self.last
            if idle > self.timeout:
                self._fire(idle)
            self._write_beat(idle)

    def _write_beat(self, idle: float) -> None:
        if self.beats is None:
            return
        try:
            self.beats.mkdir(parents=True, exist_ok=True)
            path = self.beats / f"rank{self.rank}.json"
            tmp = path.with_name(f".{path.name}.tmp")
            beat = {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "at": time.time()}
            tmp.write_text(json.dumps({**beat, "where": self.where, "idle_s": idle}))
            os.replace(tmp, path)
        except OSError:
            pass  # liveness reporting must never break training

    def _read_beats(self) -> dict[int, dict]:
        beats = {}
        for path in sorted(self.beats.glob("rank*.json")) if self.beats is not None else []:
            try:
                b = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if b["rank"] != self.rank:
                beats[b["rank"]] = b
        return beats

    def absent_ranks(self) -> list[str]:
        """What the other ranks' heartbeat files say: silent processes, and ranks waiting elsewhere.

        Read twice, a few beat periods apart: a live rank rewrites its file in between, a stopped or dead one
        does not (an age threshold alone misses a rank stopped just before this one's timeout ran out).
        """
        first = self._read_beats()
        if not first:
            return []
        time.sleep(2 * self.period + 1)
        second = self._read_beats()
        lines = []
        for rank, b in sorted(first.items()):
            now = second.get(rank, b)
            who = f"rank {rank} ({b['host']} pid {b['pid']})"
            if now["at"] == b["at"]:
                lines.append(
                    f"{who}: silent for {time.time() - b['at']:.0f} s (stopped, dead or stuck outside Python), "
                    f"last at {b['where']}"
                )
            elif now["where"] != self.where:
                lines.append(f"{who}: alive but waiting at {now['where']}")
        return lines

    def _fire(self, idle: float) -> None:
        msg = (
            f"hvdtrain watchdog: rank {self.rank} made no progress for {idle:.0f} s (--stall-timeout "
            f"{self.timeout:g}); it waited at {self.where}. Another rank did not arrive (hung, stopped or on a lost "
            f"node). Exiting with code "
            f"{STALL_EXIT_CODE} so the launcher ends the job and the job script requeues it."
        )
        absent = self.absent_ranks()
        msg += "\nRanks that did not arrive: " + (
            "; ".join(absent) if absent else "none silent or elsewhere among the heartbeats visible here"
        )
        print(msg, file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        if self.marker is not None:
            try:  # any live rank may write it: rank 0 may be the one that hung
                self.marker.write_text(f"rank {self.rank}: {msg}\n")
            except OSError:
                pass
        sys.stdout.flush()
        os._exit(STALL_EXIT_CODE)  # not sys.exit: the main thread is blocked in a collective and would never unwind


def start(timeout: float, rank: int = 0, marker: Path | None = None) -> Watchdog:
    """Start the process's watchdog (replacing an earlier one)."""
    global _active
    stop()
    _active = Watchdog(timeout, rank, marker).start()
    return _active


def beat(where: str) -> None:
    """Record progress on the running watchdog (nothing when none runs)."""
    if _active is not None:
        _active.beat(where)


def stop() -> None:
    global _active
    if _active is not None:
        _active.stop()
        _active = None

"""The test guest's cache (vmc/lab/guest.py): other checkouts' guests are not removed while
they may be in use."""

from __future__ import annotations

import os
import time
from pathlib import Path

from vmc.lab.guest import CACHE_KEEP, CACHE_UNUSED_DAYS, _prune


def _guest(cache: Path, name: str, age_days: float) -> Path:
    entry = cache / name
    entry.mkdir()
    (entry / "initrd.gz").write_bytes(b"")
    stamp = entry / ".used"
    stamp.touch()
    when = time.time() - age_days * 86400
    os.utime(stamp, (when, when))
    return entry


def test_recent_guests_of_other_checkouts_stay(tmp_path: Path) -> None:
    mine = _guest(tmp_path, "6.1-mine", 0)
    other = _guest(tmp_path, "6.1-other", 0.01)  # another checkout booted it just now
    building = tmp_path / ".build-6.1-x-123"
    building.mkdir()
    _prune(tmp_path, mine.name)
    assert mine.exists() and other.exists() and building.exists()


def test_unused_and_surplus_guests_go(tmp_path: Path) -> None:
    mine = _guest(tmp_path, "6.1-mine", 0)
    stale = _guest(tmp_path, "6.1-stale", CACHE_UNUSED_DAYS + 1)
    recent = [_guest(tmp_path, f"6.1-r{i}", i * 0.1) for i in range(CACHE_KEEP + 1)]
    _prune(tmp_path, mine.name)
    assert mine.exists() and not stale.exists()
    kept = sorted(p.name for p in tmp_path.iterdir())
    # this checkout's guest and the newest others, CACHE_KEEP in all
    assert kept == sorted([mine.name] + [p.name for p in recent[:CACHE_KEEP - 1]])

"""Temporaries of writers that died are removed; a live writer's temporary never is, even when
another process sweeps the same folder (two filtering workers on one slide after a rebalance)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prolifscore.core.wsi import leftovers
from prolifscore.core.wsi.leftovers import remove_stale_temporaries, remove_stale_temporaries_of
from prolifscore.core.wsi.tfrecord import AtomicShardWriter, read_records

# A writer in another process: opens a locked temporary as the shard writer does, says so, and
# writes until it is killed.
WRITER = """
import sys, time
from pathlib import Path
from prolifscore.core.wsi.leftovers import open_locked
f = open_locked(Path(sys.argv[1]))
f.write(b"partial shard")
f.flush()
print("writing", flush=True)
time.sleep(600)
"""


def writer(tmp: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    return proc


def age(path: Path, seconds: float) -> None:
    """Make `path` look untouched for `seconds` (the grace that covers a writer's first instant)."""
    past = time.time() - seconds
    os.utime(path, (past, past))


@pytest.fixture
def slide(tmp_path: Path) -> Path:
    folder = tmp_path / "tiles" / "slide-1"
    folder.mkdir(parents=True)
    return folder


def test_a_dead_writers_temporary_goes_a_live_ones_stays(slide: Path) -> None:
    shard = slide / "slide-1-abc-b00000-of-00002.tfrecord"
    live = leftovers.temporary_for(shard)
    dead = leftovers.temporary_for(shard)
    alive, killed = writer(live), writer(dead)
    try:
        killed.send_signal(signal.SIGKILL)  # dies mid-write: its lock goes with it
        killed.wait()
        age(live, 60)
        age(dead, 60)
        assert remove_stale_temporaries(slide.parent) == [dead]
        assert live.exists() and not dead.exists()
    finally:
        alive.kill()
        alive.wait()
    assert remove_stale_temporaries(slide.parent) == [live]  # now its writer is gone too


def test_a_fresh_staging_file_is_left_for_the_grace_period(slide: Path) -> None:
    staging = slide / ".x.done.json.0123.new"
    staging.write_bytes(b"{}")  # created, its writer not yet holding the lock
    assert remove_stale_temporaries(slide.parent) == []
    age(staging, leftovers.GRACE_S + 1)
    assert remove_stale_temporaries(slide.parent) == [staging]


def test_an_unlocked_temporary_goes_at_once(slide: Path) -> None:
    """A batch redone right after its writer died does not leave the dead one's file."""
    shard = slide / "s-b00000-of-00001.tfrecord"
    killed = writer(leftovers.temporary_for(shard))
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    with AtomicShardWriter(shard) as w:
        w.write(b"tile")
        w.commit()
    assert [p.name for p in slide.iterdir()] == [shard.name]


def test_rewriting_a_shard_removes_only_its_own_leftovers(slide: Path) -> None:
    shard = slide / "slide-1-abc-b00001-of-00002.tfrecord"
    other = slide / "slide-1-abc-b00000-of-00002.tfrecord"
    mine, theirs = leftovers.temporary_for(shard), leftovers.temporary_for(other)
    for tmp in (mine, theirs):
        tmp.write_bytes(b"partial")
        age(tmp, 60)
    with AtomicShardWriter(shard) as w:  # the batch is redone
        w.write(b"tile")
        w.commit()
    assert not mine.exists() and theirs.exists()
    assert list(read_records(shard)) == [b"tile"]
    assert sorted(p.name for p in slide.iterdir()) == sorted([shard.name, theirs.name])
    assert remove_stale_temporaries_of(other) == [theirs]


def test_an_open_writer_in_this_process_is_live(slide: Path) -> None:
    shard = slide / "s-b00000-of-00001.tfrecord"
    with AtomicShardWriter(shard) as w:
        w.write(b"tile")
        (tmp,) = [p for p in slide.iterdir() if p.name.endswith(".tmp")]
        age(tmp, 60)
        assert remove_stale_temporaries(slide.parent) == []  # its lock is held
        w.commit()
    assert [p.name for p in slide.iterdir()] == [shard.name]

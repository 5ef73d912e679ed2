"""service/read_write_lock.py: readers together, a writer alone, and a waiting writer before new readers."""

from __future__ import annotations

import threading
import time

from gramrec.service.read_write_lock import ReadWriteLock


def hold(lock: ReadWriteLock, mode: str, entered: threading.Event, release: threading.Event, log: list) -> None:
    with getattr(lock, mode)():
        log.append(f"{mode} in")
        entered.set()
        release.wait(5)
        log.append(f"{mode} out")


def start(lock, mode, log) -> tuple[threading.Thread, threading.Event, threading.Event]:
    entered, release = threading.Event(), threading.Event()
    thread = threading.Thread(target=hold, args=(lock, mode, entered, release, log), daemon=True)
    thread.start()
    return thread, entered, release


def test_readers_hold_the_lock_together():
    lock, log = ReadWriteLock(), []
    first, first_in, first_release = start(lock, "reading", log)
    assert first_in.wait(5)
    second, second_in, second_release = start(lock, "reading", log)
    assert second_in.wait(5)  # entered while the first still reads
    first_release.set(), second_release.set()
    first.join(5), second.join(5)


def test_a_writer_waits_for_readers_and_goes_before_new_ones():
    lock, log = ReadWriteLock(), []
    reader, reader_in, reader_release = start(lock, "reading", log)
    assert reader_in.wait(5)
    writer, writer_in, writer_release = start(lock, "writing", log)
    time.sleep(0.05)
    assert not writer_in.is_set()  # a reader holds the lock
    late, late_in, late_release = start(lock, "reading", log)
    time.sleep(0.05)
    assert not late_in.is_set()  # a writer is waiting: new readers queue behind it
    reader_release.set()
    assert writer_in.wait(5)
    time.sleep(0.05)
    assert not late_in.is_set()  # the writer is alone
    writer_release.set()
    assert late_in.wait(5)
    late_release.set()
    for thread in (reader, writer, late):
        thread.join(5)
    assert log == ["reading in", "reading out", "writing in", "writing out", "reading in", "reading out"]


def test_an_exception_inside_releases_the_lock():
    lock = ReadWriteLock()
    for mode in ("reading", "writing"):
        try:
            with getattr(lock, mode)():
                raise RuntimeError("inside")
        except RuntimeError:
            pass
    with lock.writing():  # would wait forever if either had leaked
        pass

"""The pool of generated task ids (``new_task_id`` draws them ``_ID_POOL`` at a time): every id is new, across
refills of the pool, across threads, and in a forked child, which must not hand out the ids its parent's pool
still holds."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from lifecycle.asynctask import _enqueue
from lifecycle.asynctask._enqueue import new_task_id


def test_ids_stay_unique_across_refills_of_the_pool() -> None:
    ids = [new_task_id() for _ in range(_enqueue._ID_POOL * 5 + 3)]
    assert len(set(ids)) == len(ids)


def test_threads_drawing_from_one_pool_never_get_the_same_id() -> None:
    drawn: list[list[str]] = [[] for _ in range(4)]

    def draw(into: list[str]) -> None:
        for _ in range(_enqueue._ID_POOL * 20):
            into.append(new_task_id())

    threads = [threading.Thread(target=draw, args=(into,)) for into in drawn]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [task_id for into in drawn for task_id in into]
    assert len(set(every)) == len(every)


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs a safe os.fork()")
def test_a_forked_child_does_not_hand_out_its_parents_pooled_ids() -> None:
    new_task_id()  # the pool holds ids now, which the child inherits
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then exit without running the parent's cleanup
        try:
            os.write(writing, "".join(new_task_id() for _ in range(8)).encode())
        finally:
            os._exit(0)
    os.close(writing)
    with os.fdopen(reading, "rb") as pipe:
        text = pipe.read().decode()
    os.waitpid(pid, 0)
    child = {text[start : start + 32] for start in range(0, len(text), 32)}
    parent = {new_task_id() for _ in range(8)}
    assert len(child) == 8
    assert not child & parent

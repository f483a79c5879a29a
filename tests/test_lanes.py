"""agent/lanes.py: work under one key runs in arrival order; other keys run alongside it."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from agent.lanes import Lanes


def test_work_under_one_key_runs_in_the_order_it_came_even_on_many_threads():
    done, finished = [], threading.Event()
    with ThreadPoolExecutor(8) as pool:
        lanes = Lanes(pool.submit)
        rnd = random.Random(0)

        def item(i):
            def work():
                time.sleep(rnd.random() / 2000)  # on a plain pool of 8, these would overtake each other
                done.append(i)
                if i == 199:
                    finished.set()
            return work

        for i in range(200):
            lanes.run("mic-0", item(i))
        assert finished.wait(10)
    assert done == list(range(200))
    assert lanes._queues == {}  # an empty lane holds nothing


def test_other_keys_and_unkeyed_work_run_alongside_a_busy_lane():
    with ThreadPoolExecutor(4) as pool:
        lanes = Lanes(pool.submit)
        release, other_ran, free_ran = threading.Event(), threading.Event(), threading.Event()
        lanes.run("a", lambda: release.wait(10))  # lane a is busy until released
        lanes.run("b", other_ran.set)
        lanes.run(None, free_ran.set)
        assert other_ran.wait(5) and free_ran.wait(5)  # neither waited for lane a
        release.set()


def test_a_failing_item_does_not_strand_the_items_behind_it():
    done = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        lanes = Lanes(pool.submit)
        lanes.run("a", lambda: 1 / 0)
        lanes.run("a", done.set)
        assert done.wait(5)


def test_a_pool_that_is_shut_down_refuses_and_leaves_no_lane_behind():
    pool = ThreadPoolExecutor(1)
    lanes = Lanes(pool.submit)
    pool.shutdown()
    try:
        lanes.run("a", lambda: None)
    except RuntimeError:
        pass
    else:
        raise AssertionError("a shut-down pool took work")
    assert lanes._queues == {}

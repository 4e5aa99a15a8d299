"""train.stop_relay on 2 gloo ranks with the job's real TCP store: a stop passed on at once, and a
stop of an earlier world (the store outlives a restart under torch's elastic agent) not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.ranks import run_on_ranks

pytestmark = pytest.mark.distributed


def _worker(rank, world_size, out):
    import threading
    import time

    import torch.distributed as dist

    from megatron_tinyllama.parallel.init import connect_rendezvous_store
    from megatron_tinyllama.train.stop_relay import StopRelay, agreed_relay_key

    first, second = agreed_relay_key(), agreed_relay_key()
    got, arrived = [], threading.Event()

    def deliver(reason):
        got.append(reason)
        arrived.set()

    # An earlier world's stop, left in the store under its own key: this world must not hear it.
    old = StopRelay(rank, connect_rendezvous_store, lambda reason: None, first).start()
    dist.barrier()
    if rank == 0:
        old.announce("a signal")
    dist.barrier()
    relay = StopRelay(rank, connect_rendezvous_store, deliver, second).start()
    dist.barrier()
    stale = arrived.wait(1.0)
    dist.barrier()
    if rank == 1:
        began = time.monotonic()
        relay.announce("a signal")
    else:
        arrived.wait(10)
    dist.barrier()
    relay.close()
    old.close()
    (Path(out) / f"relay{rank}.json").write_text(json.dumps(
        {"keys": [first, second], "stale": stale, "got": got,
         "seconds": time.monotonic() - began if rank == 1 else None}))


def test_a_stop_reaches_the_other_rank_through_the_store_and_an_earlier_worlds_does_not(tmp_path):
    run_on_ranks(_worker, 2, str(tmp_path))
    r0, r1 = (json.loads((tmp_path / f"relay{r}.json").read_text()) for r in range(2))
    assert r0["keys"] == r1["keys"] and r0["keys"][0] != r0["keys"][1]  # agreed, and new each world
    assert not r0["stale"] and not r1["stale"]
    assert r0["got"] == ["a stop request from rank 1 (node 0): a signal"]
    assert r1["got"] == []  # its own stop is not relayed back to it

"""Copy-on-write pairs are copied when the scheduler reserves the slots, before anything
later in the same step can reuse the source block: here a parked chat gives its blocks up
to admit a swapped-out request, whose swap-in writes its bytes at once."""

import torch

from edgekv.cache.block_manager import BlockManager
from edgekv.cache.kv_cache import PagedKVCache
from edgekv.cache.offload import Offloader
from edgekv.cache.prefix_cache import sequence_hashes
from edgekv.config import CacheConfig
from edgekv.engine.sampling import SamplingParams
from edgekv.engine.scheduler import Scheduler
from edgekv.engine.sequence import Sequence, Status

BS, SALT = 16, b"salt"


def test_copy_on_write_happens_before_a_swap_in_reuses_its_source_block():
    dev = PagedKVCache(CacheConfig(1, 1, 16, 4, BS, "fp16"))
    host = PagedKVCache(CacheConfig(1, 1, 16, 8, BS, "fp16"))
    mgr = BlockManager(4, BS, num_host_blocks=8)
    sch = Scheduler(mgr, 512, 64, dev.copy_blocks, offloader=Offloader(mgr, dev, host),
                    prefix_salt=SALT)

    def fill(seq_id, start, n, value):
        for s in mgr.slots(seq_id, start, start + n):
            b, o = divmod(s, BS)
            dev.layers[0][0].data[b, :, o] = value

    # a parked chat P: 2 full cached blocks, the second holding 7s
    parked = Sequence(1, list(range(100, 132)), SamplingParams(), keep_cache=True)
    mgr.append_slots(1, 32)
    fill(1, 0, 16, 1.0)
    fill(1, 16, 16, 7.0)
    parked.num_computed = 32
    mgr.register(1, sequence_hashes(parked, 32, BS, SALT), 32)
    parked.status = Status.FINISHED
    sch.parked[1] = parked
    # a running request B that hit both blocks, then was cut back into the second one
    # (a rewritten chat turn): its next write copies that shared block first
    b = Sequence(2, list(range(100, 132)), SamplingParams())
    assert mgr.match_prefix(2, sequence_hashes(b, 32, BS, SALT), 2) == 2
    mgr.truncate(2, 24)
    b.token_ids = b.token_ids[:24] + [5, 6]
    b.num_computed, b.status = 24, Status.RUNNING
    sch.running.append(b)
    # a swapped-out request W waiting to come back, and a block held elsewhere
    w = Sequence(3, [9] * 11, SamplingParams())
    mgr.append_slots(3, 10)
    fill(3, 0, 10, -3.0)
    w.num_computed = 10
    sch.offloader.swap_out(3)
    sch.waiting.append(w)
    mgr.append_slots(99, 16)

    batch = sch.schedule()

    assert [s.seq_id for s in batch.seqs] == [2, 3]  # B, then W swapped back in
    own = mgr.block_ids(2)[1]
    got = dev.layers[0][0].data[own, 0, :8, 0]  # B's tokens 16..23, copied from P's block
    assert torch.equal(got, torch.full_like(got, 7.0))
    mgr.check_integrity()

"""Block manager and scheduler invariants under random operation sequences."""

from hypothesis import given, settings
from hypothesis import strategies as st

from llmc.runtime.block_manager import BlockManager
from llmc.runtime.scheduler import Scheduler
from llmc.runtime.sequence import SamplingParams, Sequence


def test_allocate_grow_and_free():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = Sequence("a", [1] * 5, SamplingParams())
    assert bm.allocate(seq, 5) and len(seq.block_table) == 2
    assert bm.allocate(seq, 8) and len(seq.block_table) == 2
    assert not bm.allocate(seq, 17) and len(seq.block_table) == 2  # shortage: False, nothing changed
    assert bm.slot(seq, 5) == seq.block_table[1] * 4 + 1
    bm.deallocate(seq)
    assert bm.num_free_blocks == 4 and seq.block_table == []


def _fake_step(sched: Scheduler) -> None:
    """Emulate the engine: computed tokens catch up, then one token; 3 tokens finish a sequence."""
    plan = sched.schedule()
    for seq in plan.out_of_memory:
        sched.finish(seq, "length")
    for item in plan.scheduled:
        item.seq.num_computed_tokens += item.num_new_tokens
        if item.completes:
            item.seq.output_ids.append(1)
            if len(item.seq.output_ids) >= 3:
                sched.finish(item.seq, "length")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "step", "abort"]), st.integers(1, 30)), min_size=1, max_size=60),
       st.integers(4, 24))
def test_scheduler_never_leaks_or_double_owns(ops, num_blocks):
    bm = BlockManager(num_blocks, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=16)
    seqs, arrival = [], 0
    for op, n in ops:
        if op == "add" and -(-(n + 1) // 4) <= num_blocks:
            arrival += 1
            seqs.append(Sequence(f"s{arrival}", [1] * n, SamplingParams(max_tokens=3), arrival=arrival))
            sched.add(seqs[-1])
        elif op == "abort" and seqs:
            victim = seqs[n % len(seqs)]
            if not victim.is_finished:
                sched.finish(victim, "abort")
        else:
            _fake_step(sched)
        owned = [b for s in sched.running + list(sched.waiting) for b in s.block_table]
        assert len(owned) == len(set(owned)), "a block is owned twice"
        assert all(c in (0, 1) for c in bm.ref_counts)
        assert bm.num_free_blocks + len(owned) == num_blocks
    for _ in range(500):  # drain: everything finishes (no deadlock), every block returns
        if not sched.has_unfinished():
            break
        _fake_step(sched)
    assert not sched.has_unfinished()
    assert bm.num_free_blocks == num_blocks and sum(bm.ref_counts) == 0

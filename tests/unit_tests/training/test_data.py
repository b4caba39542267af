"""Data position: which samples each data-parallel rank trains on, and resuming mid-stream."""

from megatron_averis.training.data import MicroBatchSampler, parse_blend


def batches(start, end, micro, dp):
    return [list(MicroBatchSampler(start, end, micro, r, dp)) for r in range(dp)]


def test_global_batches_are_contiguous_and_dealt_to_ranks():
    micro, dp, gbs = 2, 3, 12  # 2 micro-batch steps per global batch
    per_rank = batches(0, 3 * gbs, micro, dp)
    assert per_rank[0][:2] == [[0, 1], [6, 7]] and per_rank[2][:2] == [[4, 5], [10, 11]]
    steps = gbs // (micro * dp)
    for it in range(3):
        seen = sorted(i for r in range(dp) for mb in per_rank[r][it * steps:(it + 1) * steps] for i in mb)
        assert seen == list(range(it * gbs, (it + 1) * gbs))
    assert all(len(MicroBatchSampler(0, 3 * gbs, micro, r, dp)) == 3 * steps for r in range(dp))


def test_resume_continues_the_same_stream():
    micro, dp, gbs = 2, 2, 8
    full = batches(0, 5 * gbs, micro, dp)
    resumed = batches(2 * gbs, 5 * gbs, micro, dp)  # 2 iterations consumed
    steps = gbs // (micro * dp)
    assert all(resumed[r] == full[r][2 * steps:] for r in range(dp))


def test_incomplete_trailing_step_is_dropped():
    assert list(MicroBatchSampler(0, 7, 2, 0, 2)) == [[0, 1]]


def test_parse_blend():
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    assert parse_blend(["a"]) == (["a"], None)
    assert parse_blend(None) is None

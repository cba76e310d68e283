"""The RL trainer's prompt order: with num_iterations mu, each window of prompts comes mu times in a row."""

from vistune.rl.trainer import RepeatingSampler


def windows(order, window, repeat):
    span = window * repeat
    return [order[start : start + span] for start in range(0, len(order), span)]


def test_each_window_comes_repeat_times():
    sampler = RepeatingSampler(size=8, window=2, repeat=3, seed=0)
    order = list(sampler)
    assert len(order) == len(sampler) == 8 * 3
    assert sorted(order) == sorted(list(range(8)) * 3)  # every prompt, mu times
    for block in windows(order, 2, 3):
        assert block[0:2] == block[2:4] == block[4:6]


def test_the_last_window_is_whole():
    # the trainer reuses a window's rollouts by counting micro-batches: a short last window would shift every
    # later window (the next epoch's first prompts would be trained on the previous rollouts)
    for size, window in ((5, 2), (3, 8), (10, 4)):
        sampler = RepeatingSampler(size=size, window=window, repeat=2, seed=1)
        order = list(sampler)
        assert len(order) == len(sampler) and len(order) % (window * 2) == 0
        assert set(order) == set(range(size))
        for block in windows(order, window, 2):
            assert block[:window] == block[window:]


def test_epochs_are_shuffled_differently_and_reproducibly():
    sampler = RepeatingSampler(size=16, window=4, repeat=2, seed=7)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first

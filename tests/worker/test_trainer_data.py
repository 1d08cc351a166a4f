"""The trainer's data path: vocabulary and the two partitions into TBPTT windows."""

from __future__ import annotations

import pytest
import torch

from gradserve_worker.data import RandomWindows, SequentialWindows, Vocab, build_corpus, epoch_windows


def test_time_machine_d2l_chars_have_a_vocabulary_of_28(timemachine):
    vocab, corpus = build_corpus(timemachine, "char", "d2l")
    assert len(vocab) == 28  # 26 letters, the space, <unk>
    assert vocab.tokens[0] == "<unk>"
    assert vocab.tokens[1] == " "  # the most frequent character
    assert int(corpus.max()) == 27 and int(corpus.min()) >= 1  # <unk> never needed


def test_vocab_orders_by_count_then_token_and_sends_rare_tokens_to_unk():
    vocab = Vocab(["b", "a", "c", "b", "a", "d", "b"], min_freq=2)
    assert vocab.tokens == ["<unk>", "b", "a"]  # b: 3, a: 2; c and d are below min_freq
    assert vocab.encode(["a", "b", "c", "zzz"]) == [2, 1, 0, 0]
    assert Vocab(list("zyx")).tokens == ["<unk>", "x", "y", "z"]  # equal counts: ordered by token


POSITIONS = torch.arange(1000)  # a corpus whose token ids are their own positions


def test_sequential_windows_continue_each_other_column_by_column():
    B, T = 4, 7
    windows = SequentialWindows(POSITIONS, B, T, torch.Generator().manual_seed(3))
    assert len(windows) == ((1000 - 1 - windows.X[0, 0].item()) // B) // T
    rows = []
    for i in range(len(windows)):
        X, Y, *_ = windows[i]
        assert X.shape == Y.shape == (T, B)
        assert torch.equal(Y, X + 1)  # targets are the next token
        assert torch.equal(X - X[0], torch.arange(T).unsqueeze(1).expand(T, B))  # each column is contiguous text
        if i:
            assert torch.equal(X[0], rows[-1][-1] + 1)  # and picks up where the previous window stopped
        rows.append(X)
    offset = windows.X[0, 0].item()
    assert 0 <= offset < T
    # The rows are batch_size equal, consecutive slices of the corpus after the offset.
    row_len = windows.X.shape[0]
    assert torch.equal(windows.X[0], offset + row_len * torch.arange(B))


def test_random_windows_are_disjoint_aligned_subsequences_in_shuffled_order():
    B, T = 4, 7
    windows = RandomWindows(POSITIONS, B, T, torch.Generator().manual_seed(3))
    starts = []
    for i in range(len(windows)):
        X, Y, *_ = windows[i]
        assert X.shape == (T, B) and torch.equal(Y, X + 1)
        assert torch.equal(X - X[0], torch.arange(T).unsqueeze(1).expand(T, B))
        starts += X[0].tolist()
    offset = min(starts) % T
    assert all(s % T == offset for s in starts)  # on one grid, so no two overlap
    assert len(set(starts)) == len(starts) == len(windows) * B
    assert starts != sorted(starts)


@pytest.mark.parametrize("partition", ["sequential", "random"])
def test_an_epochs_windows_depend_only_on_seed_and_epoch(partition):
    def first(seed, epoch):
        return epoch_windows(POSITIONS, partition, 4, 7, seed, epoch)[0].X

    assert torch.equal(first(0, 5), first(0, 5))
    assert not all(torch.equal(first(0, 0), first(0, e)) for e in range(1, 6))
    assert not all(torch.equal(first(0, 0), first(s, 0)) for s in range(1, 6))

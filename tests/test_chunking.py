"""The one token splitter (``tune_losses.chunking``): tensor_split semantics, split_like, errors."""

import pytest
import torch

from tune_losses.chunking import chunk_sizes, split_like, split_tokens, token_chunk_bounds


@pytest.mark.parametrize("num_chunks", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("S", [0, 1, 3, 4, 7, 13, 16])
def test_split_tokens_is_tensor_split(S, num_chunks):
    x = torch.arange(2 * S * 3).reshape(2, S, 3)
    chunks = split_tokens(x, num_chunks)
    expected = torch.tensor_split(x, num_chunks, dim=1)
    assert isinstance(chunks, list) and len(chunks) == num_chunks
    for a, b in zip(chunks, expected):
        assert torch.equal(a, b)
    sizes = chunk_sizes(chunks)
    assert sum(sizes) == S
    assert max(sizes) - min(sizes) <= 1  # as even as possible ...
    assert sizes == sorted(sizes, reverse=True)  # ... the larger chunks first
    assert torch.equal(torch.cat(chunks, dim=1), x)


def test_split_tokens_returns_views_and_respects_dim():
    x = torch.randn(13, 5)
    chunks = split_tokens(x, 4, dim=0)
    assert chunk_sizes(chunks, dim=0) == [4, 3, 3, 3]
    chunks[1].zero_()  # views: writing through a chunk writes x
    assert (x[4:7] == 0).all()
    assert chunk_sizes(split_tokens(torch.zeros(2, 3, 10), 3, dim=-1), dim=-1) == [4, 3, 3]


def test_more_chunks_than_tokens_gives_empty_trailing_chunks():
    chunks = split_tokens(torch.zeros(2, 3, 4), 5)
    assert chunk_sizes(chunks) == [1, 1, 1, 0, 0]
    assert chunks[-1].shape == (2, 0, 4)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "2", None])
def test_split_tokens_rejects_bad_num_chunks(bad):
    with pytest.raises(ValueError, match="num_chunks"):
        split_tokens(torch.zeros(1, 4, 2), bad)


@pytest.mark.parametrize(
    "make",
    [
        lambda x: list(x.chunk(4, dim=1)),  # torchtune 0.6.1's decoder: [4, 4, 4, 1]
        lambda x: list(torch.tensor_split(x, 4, dim=1)),  # [4, 3, 3, 3]
        lambda x: list(x.chunk(13, dim=1)),  # one token each
        lambda x: [x[:, :0], x, x[:, :0]],  # empty chunks around
        lambda x: list(torch.split(x, [6, 2, 5], dim=1)),  # a user's own sizes
    ],
)
def test_split_like_pairs_labels_with_the_chunks_given(make):
    logits = torch.randn(2, 13, 5)
    labels = torch.arange(26).reshape(2, 13)
    chunks = make(logits)
    pieces = split_like(labels, chunks)
    assert len(pieces) == len(chunks)
    start = 0
    for c, lab in zip(chunks, pieces):
        n = c.shape[1]
        assert lab.shape == (2, n)
        assert torch.equal(lab, labels[:, start : start + n])
        start += n
    assert start == 13


def test_split_like_with_fewer_chunks_than_requested():
    """S=6 split by .chunk(4) gives 3 chunks; labels follow the 3 chunks, not a count of 4."""
    chunks = list(torch.zeros(1, 6, 2).chunk(4, dim=1))
    assert len(chunks) == 3
    assert [p.shape[1] for p in split_like(torch.zeros(1, 6, dtype=torch.long), chunks)] == [2, 2, 2]


def test_split_like_errors_name_the_argument_and_sizes():
    chunks = list(torch.zeros(2, 8, 3).chunk(4, dim=1))
    with pytest.raises(ValueError, match=r"logits.*7.*\[2, 2, 2, 2\]"):
        split_like(torch.zeros(2, 7, dtype=torch.long), chunks)
    with pytest.raises(ValueError, match=r"^student_logits"):
        split_like(torch.zeros(2, 9, dtype=torch.long), chunks, name="student_logits")


def test_chunk_sizes():
    chunks = [torch.zeros(2, 4, 3), torch.zeros(2, 1, 3), torch.zeros(2, 0, 3)]
    assert chunk_sizes(chunks) == [4, 1, 0]
    assert chunk_sizes(chunks, dim=0) == [2, 2, 2]
    assert chunk_sizes([]) == []


@pytest.mark.parametrize("N, size", [(0, 4), (1, 4), (10, 3), (12, 4), (12, 12), (5, 100)])
def test_token_chunk_bounds_cover_the_tokens_in_order(N, size):
    bounds = token_chunk_bounds(N, size)
    assert len(bounds) == -(-N // size)
    flat = [i for s, e in bounds for i in range(s, e)]
    assert flat == list(range(N))
    assert all(0 < e - s <= size for s, e in bounds)
    assert all(e - s == size for s, e in bounds[:-1])  # only the last chunk is shorter


@pytest.mark.parametrize("N, size", [(12, 4), (12, 3), (8, 8), (9, 1)])
def test_token_chunk_bounds_equal_split_tokens_when_size_divides(N, size):
    x = torch.arange(N)
    by_count = split_tokens(x, N // size, dim=0)
    by_size = [x[s:e] for s, e in token_chunk_bounds(N, size)]
    assert len(by_count) == len(by_size)
    assert all(torch.equal(a, b) for a, b in zip(by_count, by_size))


@pytest.mark.parametrize("bad", [0, -3])
def test_token_chunk_bounds_rejects_bad_chunk_size(bad):
    with pytest.raises(ValueError, match="chunk_size"):
        token_chunk_bounds(10, bad)

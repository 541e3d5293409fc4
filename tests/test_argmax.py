"""first_argmax against Tensor.argmax, ties included, over every axis."""

import torch

from pointseg.argmax import first_argmax


def test_first_argmax_equals_argmax_on_every_axis_and_takes_the_first_tie():
    gen = torch.Generator().manual_seed(0)
    for shape in ((3, 320, 400), (7, 5), (2, 4, 9, 11)):
        x = torch.randn(*shape, generator=gen)
        coarse = torch.randint(0, 3, shape, generator=gen).float()  # many ties
        for dim in range(-len(shape), len(shape)):
            assert torch.equal(first_argmax(x, dim), x.argmax(dim))
            assert torch.equal(first_argmax(coarse, dim), coarse.argmax(dim))
    tie = torch.tensor([[1.0, 5.0], [4.0, 5.0], [4.0, 2.0]])  # (3, 2): column 0 ties rows 1 and 2, column 1 rows 0 and 1
    assert first_argmax(tie, 0).tolist() == [1, 0]
    assert first_argmax(tie, 1).tolist() == [1, 1, 0]
    assert first_argmax(tie, 0).dtype == torch.int64

"""The tie rule (compute.lib.ties) on hand-made cases: what counts as a tie, and who wins it."""

import torch
from torch import nn

from compute.lib import ties


def test_lowest_of_tied_within_the_bound():
    logits = torch.tensor([[1.0, 3.0, 3.0 + 1e-15, 2.0],
                           [5.0, 1.0, 5.0 - 1e-9, 0.0],
                           [0.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    bound = torch.full_like(logits, 1e-12)
    # row 0: classes 1 and 2 are 1e-15 apart, within 2e-12: tied, lowest index 1
    # row 1: classes 0 and 2 are 1e-9 apart, beyond 2e-12: decided by value, class 0
    # row 2: three equal logits: class 1
    assert ties.lowest_of_tied(logits, bound).tolist() == [1, 0, 1]
    assert ties.lowest_of_tied(logits, torch.zeros_like(logits)).tolist() == [2, 0, 1]


def test_product_bound_is_highams():
    linear = nn.Linear(3, 2).double()
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 4.0, -1.0]]))
        linear.bias.copy_(torch.tensor([0.25, -3.0]))
    h = torch.tensor([[2.0, 1.0, -4.0]], dtype=torch.float64)
    gamma4 = 4 * 2.0 ** -53 / (1 - 4 * 2.0 ** -53)
    expected = gamma4 * torch.tensor([[2 + 2 + 2 + 0.25, 0 + 4 + 4 + 3.0]], dtype=torch.float64)
    assert torch.equal(ties.product_bound(linear, h), expected)


def test_reference_settles_equal_rows_for_the_lower_class():
    """Equal rows of the last layer tie exactly whatever the kernel: the reference predicts the lower class."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(37, 61), nn.ReLU(), nn.Linear(61, 5)).eval()
    with torch.no_grad():
        model[2].weight[3] = model[2].weight[1]
        model[2].bias[3] = model[2].bias[1] = 100.0
    x = torch.randn(64, 37)
    assert (ties.predict(model, x) == 1).all()
    logits, bound = ties.logits_and_bound(model.double(), x.double())
    assert (bound > 0).all() and (bound < 1e-10).all()
    assert ((logits[:, 3] - logits[:, 1]).abs() <= bound[:, 1] + bound[:, 3]).all()


def test_no_linear_head_means_exact_equality_only():
    model = nn.Sequential(nn.Flatten()).double()
    logits, bound = ties.logits_and_bound(model, torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    assert torch.equal(bound, torch.zeros_like(logits))

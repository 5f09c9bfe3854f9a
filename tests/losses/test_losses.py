"""Each loss against small cases computed by hand (the formulas of docs/method.md, written out here)."""

import math

import pytest
import torch

from engine.losses import AdaptiveRegressionLoss, critic_flow_loss, dmd_gradient, dmd_loss, temporal_regularization


def _v(values, shape=(1, 1, 1, 2, 2)):
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


def test_dmd_gradient_and_loss_by_hand():
    x = _v([1.0, 2.0, 3.0, 4.0]).requires_grad_(True)
    real, fake = _v([0.0, 0.0, 0.0, 0.0]), _v([1.0, 1.0, 1.0, 1.0])
    loss, grad = dmd_loss(x, real, fake)
    # normalizer mean|x - r| = 2.5, so grad = (1 - 0) / 2.5 = 0.4 everywhere
    torch.testing.assert_close(grad, torch.full_like(grad, 0.4))
    # loss = 0.5 * mean(grad^2) = 0.08; d loss / dx = grad / numel = 0.1
    assert loss.item() == pytest.approx(0.08)
    loss.backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 0.1))


def test_dmd_normalizer_is_per_sample_and_finite():
    x = torch.stack([_v([1.0, 1.0, 1.0, 1.0])[0], _v([0.0, 0.0, 0.0, 0.0])[0]])  # (2, 1, 1, 2, 2)
    real = torch.zeros_like(x)  # sample 1: x == r, normalizer 0
    fake = torch.ones_like(x)
    grad = dmd_gradient(x, real, fake)
    torch.testing.assert_close(grad[0], torch.ones_like(grad[0]))  # (1 - 0) / mean|1 - 0|
    torch.testing.assert_close(grad[1], torch.zeros_like(grad[1]))  # 1 / 0: no direction, zeroed


@pytest.mark.parametrize("which", ["real", "fake", "x"])
def test_dmd_non_finite_scores_make_the_loss_non_finite(which):
    """A NaN/inf teacher or critic score (or sample) is not silently zeroed: the loss is non-finite, so the
    trainer skips the generator update and says which score it was."""
    x = _v([1.0, 2.0, 3.0, 4.0])
    inputs = {"x": x, "real": torch.zeros_like(x), "fake": torch.ones_like(x)}
    inputs[which] = inputs[which].clone()
    inputs[which].view(-1)[1] = float("nan") if which != "fake" else float("inf")
    loss, grad = dmd_loss(inputs["x"], inputs["real"], inputs["fake"])
    assert not torch.isfinite(loss) and not torch.isfinite(grad).all()


def test_critic_flow_loss_by_hand():
    x0, noise = _v([1.0, 0.0, 2.0, 0.0]), _v([0.0, 1.0, 0.0, 3.0])
    pred = _v([0.0, 0.0, 0.0, 0.0])
    # target v = e - x0 = [-1, 1, -2, 3]; mse = (1 + 1 + 4 + 9) / 4
    assert critic_flow_loss(pred, x0, noise).item() == pytest.approx(15 / 4)


def _sig(z):
    return 1 / (1 + math.exp(-z))


def test_adaptive_regression_two_steps_by_hand():
    reg = AdaptiveRegressionLoss(num_timesteps=4, k=3.0, decay=0.95)
    target = torch.zeros(3, 1, 1, 1, 2)
    # per-sample losses: mean of squares -> [1, 4, 9]; timesteps [0, 0, 2]
    pred = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]).reshape(3, 1, 1, 1, 2).requires_grad_(True)
    t_idx = torch.tensor([0, 0, 2])
    loss, info = reg(pred, target, t_idx)
    # step 1: no EMA yet -> weights 1 - sigmoid(0) = 0.5; loss = mean(0.5 * [1, 4, 9])
    torch.testing.assert_close(info["weights"], torch.full((3,), 0.5))
    assert loss.item() == pytest.approx(0.5 * 14 / 3)
    # first values initialize the EMA: timestep 0 -> mean(1, 4) = 2.5, timestep 2 -> 9
    torch.testing.assert_close(reg.ema, torch.tensor([2.5, 0.0, 9.0, 0.0]))
    assert reg.seen.tolist() == [True, False, True, False]
    # step 2: weight uses the EMA *before* this step's update (Eq. 7)
    pred2 = torch.tensor([[2.0, 2.0], [0.0, 0.0]]).reshape(2, 1, 1, 1, 2)
    loss2, info2 = reg(pred2, torch.zeros(2, 1, 1, 1, 2), torch.tensor([0, 1]))
    w0 = 1 - _sig(3.0 * (4.0 - 2.5))  # L = 4 against Lbar_0 = 2.5
    w1 = 0.5  # timestep 1 seen for the first time
    torch.testing.assert_close(info2["weights"], torch.tensor([w0, w1]))
    assert loss2.item() == pytest.approx((w0 * 4.0 + w1 * 0.0) / 2, rel=1e-5)  # fp32 arithmetic
    torch.testing.assert_close(reg.ema, torch.tensor([0.95 * 2.5 + 0.05 * 4.0, 0.0, 9.0, 0.0]))
    # gradient flows through L_s only, with the weight as a constant: d/dpred of w * mean(pred^2) / B
    pred.grad = None
    loss, info = AdaptiveRegressionLoss(4)(pred, target, t_idx)
    loss.backward()
    expected = 0.5 * 2 * pred.detach() / 2 / 3  # w * d(mean over 2 elems of p^2) / B
    torch.testing.assert_close(pred.grad, expected)


def test_regression_not_adaptive_is_plain_mse_and_all_reduce_is_used():
    reg = AdaptiveRegressionLoss(num_timesteps=2, adaptive=False)
    calls = []

    def fake_all_reduce(t):  # as if a second rank saw the same statistics: sums and counts double
        calls.append(t.clone())
        return t * 2

    pred = torch.tensor([[1.0], [3.0]]).reshape(2, 1, 1, 1, 1)
    loss, info = reg(pred, torch.zeros_like(pred), torch.tensor([1, 1]), fake_all_reduce)
    assert loss.item() == pytest.approx((1 + 9) / 2)
    assert len(calls) == 1 and calls[0].shape == (2, 2)
    torch.testing.assert_close(reg.ema, torch.tensor([0.0, 5.0]))  # (2 * 10) / (2 * 2)


def test_regression_pending_ema_moves_only_when_committed():
    reg = AdaptiveRegressionLoss(num_timesteps=2)
    pred, t_idx = torch.tensor([[1.0], [3.0]]).reshape(2, 1, 1, 1, 1), torch.tensor([0, 1])
    eager = AdaptiveRegressionLoss(num_timesteps=2)
    want_loss, _ = eager(pred, torch.zeros_like(pred), t_idx)
    loss, info = reg(pred, torch.zeros_like(pred), t_idx, commit=False)
    assert loss.item() == want_loss.item()
    assert reg.ema.tolist() == [0.0, 0.0] and not reg.seen.any()  # a skipped update: nothing changed
    reg.commit(info["pending"])  # an applied one: the same cache as the eager update
    assert torch.equal(reg.ema, eager.ema) and torch.equal(reg.seen, eager.seen)


def test_regression_micro_batches_fold_in_as_their_union():
    """Two micro-batches of an accumulated update: the same weights (the cache before the update) and, folded in once,
    the same cache as one batch holding both; the cache had a value for timestep 0 only."""
    g = torch.Generator().manual_seed(0)
    pred, t_idx = torch.randn(6, 2, 1, 2, 2, generator=g), torch.tensor([0, 1, 2, 0, 2, 2])
    big, acc = AdaptiveRegressionLoss(num_timesteps=3), AdaptiveRegressionLoss(num_timesteps=3)
    for reg in (big, acc):
        reg.commit((torch.tensor([0.5, 0.0, 0.0]), torch.tensor([True, False, False])))
    _, info = big(pred, torch.zeros_like(pred), t_idx, commit=False)
    stats, weights = 0, []
    for half in (slice(0, 3), slice(3, 6)):
        _, part = acc(pred[half], torch.zeros_like(pred[half]), t_idx[half], commit=False)
        stats, weights = stats + part["stats"], weights + [part["weights"]]
    torch.testing.assert_close(torch.cat(weights), info["weights"], rtol=0, atol=0)
    acc.commit(acc.blend(stats))
    big.commit(info["pending"])
    torch.testing.assert_close(acc.ema, big.ema, rtol=1e-6, atol=1e-7)
    assert torch.equal(acc.seen, big.seen) and acc.seen.all()


def test_regression_state_round_trips():
    reg = AdaptiveRegressionLoss(num_timesteps=3)
    reg(torch.ones(2, 1, 1, 1, 1), torch.zeros(2, 1, 1, 1, 1), torch.tensor([0, 2]))
    other = AdaptiveRegressionLoss(num_timesteps=3)
    other.load_state_dict(reg.state_dict())
    assert torch.equal(other.ema, reg.ema) and torch.equal(other.seen, reg.seen)


def test_temporal_regularization_by_hand_and_truncation():
    # every (b, c, h, w) location alternates 0, s over 2 frames: population variance over F = (s / 2)^2
    s = 0.5
    x = torch.zeros(1, 2, 2, 3, 3)
    x[:, :, 1] = s
    x.requires_grad_(True)
    loss, v = temporal_regularization(x, eps=1e-6, power=1.0, tau=0.6)
    assert v.item() == pytest.approx(0.0625, rel=1e-5)
    assert loss.item() == pytest.approx(-math.log(0.0625 + 1e-6), rel=1e-5)  # 2.77 >= tau: active
    loss.backward()
    assert x.grad.abs().sum() > 0
    # larger variance: L = -log(1.0) = 0 < tau -> value and gradient are zero
    y = torch.zeros(1, 2, 2, 3, 3)
    y[:, :, 1] = 2.0
    y.requires_grad_(True)
    loss, v = temporal_regularization(y, eps=1e-6, power=1.0, tau=0.6)
    assert v.item() == pytest.approx(1.0, rel=1e-5) and loss.item() == 0.0
    loss.backward()
    assert y.grad.abs().sum() == 0
    # power p multiplies the log
    loss2, _ = temporal_regularization(x.detach(), eps=1e-6, power=2.0, tau=0.6)
    assert loss2.item() == pytest.approx(-2 * math.log(0.0625 + 1e-6), rel=1e-5)

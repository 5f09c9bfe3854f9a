"""Flow matching: conversions round-trip (property tests), the shift, CFG batching, samplers on an exact flow."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.diffusion.flow import FlowSchedule
from engine.diffusion.samplers import combine_guidance, guided_velocity, sample_student, sample_teacher

sigmas = st.floats(min_value=1e-3, max_value=1.0)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def _tensors(seed, shape=(2, 3, 2, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


@settings(max_examples=50, deadline=None)
@given(seeds, sigmas, sigmas)
def test_x0_velocity_round_trip(seed, s0, s1):
    x0, noise = _tensors(seed)
    s = torch.tensor([s0, s1], dtype=torch.float64)
    fs = FlowSchedule()
    x_t = fs.add_noise(x0, noise, s)
    v = fs.velocity_target(x0, noise)
    torch.testing.assert_close(fs.x0_from_velocity(x_t, v, s), x0)  # x0 = x_t - s v
    torch.testing.assert_close(fs.velocity_from_x0(x_t, x0, s), v)  # v = (x_t - x0) / s
    # written out by hand for sample 0: x_t = (1 - s) x0 + s e
    torch.testing.assert_close(x_t[0], (1 - s0) * x0[0] + s0 * noise[0])


@settings(max_examples=50, deadline=None)
@given(st.floats(min_value=0.0, max_value=1.0), st.floats(min_value=0.5, max_value=12.0))
def test_shift_formula_and_monotonicity(s, shift):
    fs = FlowSchedule(shift=shift)
    got = fs.shift_sigma(torch.tensor(s, dtype=torch.float64)).item()
    assert got == pytest.approx(shift * s / (1 + (shift - 1) * s), rel=1e-12, abs=1e-15)
    bigger = fs.shift_sigma(torch.tensor(min(1.0, s + 1e-3), dtype=torch.float64)).item()
    assert bigger >= got and 0.0 <= got <= 1.0


def test_grids():
    fs = FlowSchedule(shift=5.0)
    g = fs.sampling_sigmas(50)
    assert g.shape == (51,) and g[0] == 1.0 and g[-1] == 0.0 and bool((g[1:] < g[:-1]).all())
    assert fs.student_sigmas([1000, 900, 757, 522]).tolist() == pytest.approx([1.0, 0.9, 0.757, 0.522])
    draws = fs.sample_sigmas(10000, torch.Generator().manual_seed(0), lo=0.02, hi=0.98)
    assert draws.min() >= 0.02 and draws.max() <= 0.98
    # shift 5 moves the median of U[0,1] to 5*0.5/(1+4*0.5) = 0.8333
    assert draws.median().item() == pytest.approx(0.8333, abs=0.02)


class Recorder(torch.nn.Module):
    """A denoiser whose output depends on x, t and context nonlinearly; counts calls and batch sizes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, ctx):
        self.calls.append(x.shape[0])
        return torch.tanh(x) * (t / 1000).view(-1, 1, 1, 1, 1) + ctx.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)


@pytest.mark.parametrize("form", ["standard", "dmd2"])
def test_cfg_one_batched_forward_equals_two(form):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 2, 2, 4, 4, generator=g), torch.tensor([999.0, 500.0, 20.0])
    cond, uncond = torch.randn(3, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    model = Recorder()
    batched = guided_velocity(model, x, t, cond, uncond, 5.0, form)
    assert model.calls == [6]  # one forward over [cond; uncond]
    c, u = model(x, t, cond), model(x, t, uncond.expand_as(cond))
    expected = u + 5.0 * (c - u) if form == "standard" else c + 5.0 * (c - u)
    torch.testing.assert_close(batched, expected)


def test_dmd2_form_is_standard_with_w_plus_one():
    c, u = torch.randn(4, 4), torch.randn(4, 4)
    torch.testing.assert_close(combine_guidance(c, u, 5.0, "dmd2"), combine_guidance(c, u, 6.0, "standard"))
    with pytest.raises(ValueError, match="guidance form"):
        combine_guidance(c, u, 1.0, "nope")


def _exact_flow(target):
    """The exact velocity field of a point mass at ``target``: v(x_t, s) = (x_t - target) / s."""

    def model(x, t, ctx):
        s = (t / 1000).view(-1, 1, 1, 1, 1)
        reps = x.shape[0] // target.shape[0]  # CFG stacks [cond; uncond]: the same data for both halves
        return (x - target.repeat(reps, 1, 1, 1, 1)) / s

    return model


def test_teacher_sampler_lands_on_the_data_for_an_exact_flow():
    target = torch.randn(2, 2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    noise = torch.randn_like(target)
    ctx = torch.zeros(2, 3, 8)
    out = sample_teacher(_exact_flow(target), noise, ctx, ctx[:1], FlowSchedule(shift=5.0), steps=7, guidance_scale=5.0)
    torch.testing.assert_close(out, target, atol=1e-4, rtol=1e-4)  # straight paths: Euler is exact


def test_student_sampler_renoises_between_steps():
    target = torch.randn(2, 2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    seen = []

    def model(x, t, ctx):
        seen.append(t.clone())
        return _exact_flow(target)(x, t, ctx)

    out = sample_student(
        model,
        torch.randn_like(target),
        torch.zeros(2, 3, 8),
        FlowSchedule(),
        [1000, 900, 757, 522],
        torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(out, target, atol=1e-4, rtol=1e-4)
    assert [s.tolist() for s in seen] == [[1000.0] * 2, [900.0] * 2, [757.0] * 2, [522.0] * 2]

"""The Mamba2 scans: chunked SSD (prefill) and the one-token step (decoding) against the slow sequential
reference `ssd_reference`, which is itself checked against a loop written straight from the definition."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from nestlm.model.ssd import segsum, ssd_chunked, ssd_reference, ssm_step

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {"atol": 1e-5, "rtol": 1e-5}


def inputs(b=2, t=10, h=4, p=3, g=2, n=5, seed=0, with_state=False):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    x = r(b, t, h, p)
    dt = torch.nn.functional.softplus(r(b, t, h))  # > 0, as after softplus(dt + dt_bias)
    A = -torch.rand(h, generator=gen) * 1.5 - 0.05  # negative decay rates
    B, C = r(b, t, g, n), r(b, t, g, n)
    D = r(h)
    state = r(b, h, p, n) if with_state else None
    return x, dt, A, B, C, D, state


def naive(x, dt, A, B, C, D, state=None):
    """The recurrence, element by element, independent of ssd.py:
    s_t = exp(dt_t A) s_{t-1} + dt_t x_t B_t^T ;  y_t = s_t C_t + D x_t, head h reading group h // (H/G)."""
    b, t, h, p = x.shape
    g, n = B.shape[-2:]
    s = torch.zeros(b, h, p, n) if state is None else state.clone()
    y = torch.zeros(b, t, h, p)
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            for ti in range(t):
                s[bi, hi] = torch.exp(dt[bi, ti, hi] * A[hi]) * s[bi, hi] + dt[bi, ti, hi] * torch.outer(
                    x[bi, ti, hi], B[bi, ti, gi]
                )
                y[bi, ti, hi] = s[bi, hi] @ C[bi, ti, gi] + D[hi] * x[bi, ti, hi]
    return y, s


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("g", [1, 2, 4])
def test_reference_matches_definition(g, with_state):
    x, dt, A, B, C, D, s0 = inputs(t=6, g=g, seed=g, with_state=with_state)
    y, s = ssd_reference(x, dt, A, B, C, D, s0)
    y_ref, s_ref = naive(x, dt, A, B, C, D, s0)
    assert_close(y, y_ref, **TOL)
    assert_close(s, s_ref, **TOL)
    if s0 is not None:  # the reference must not modify the caller's initial state
        assert torch.equal(s0, inputs(t=6, g=g, seed=g, with_state=True)[-1])


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 7, 10, 16])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("g", [1, 2])
def test_chunked_matches_reference(chunk, with_state, g):
    # t=10: chunk sizes 3, 4, 7 don't divide it (padded last chunk), 16 is a single partial chunk
    x, dt, A, B, C, D, s0 = inputs(t=10, g=g, seed=chunk, with_state=with_state)
    y, s = ssd_chunked(x, dt, A, B, C, D, chunk, s0)
    y_ref, s_ref = ssd_reference(x, dt, A, B, C, D, s0)
    assert y.shape == x.shape and s.shape == (2, 4, 3, 5)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert_close(y, y_ref, **TOL)
    assert_close(s, s_ref, **TOL)


def test_chunked_single_token_and_many_heads_per_group():
    for t in (1, 5):
        x, dt, A, B, C, D, s0 = inputs(b=1, t=t, h=6, p=2, g=3, n=4, seed=10 + t, with_state=True)
        y, s = ssd_chunked(x, dt, A, B, C, D, 4, s0)
        y_ref, s_ref = ssd_reference(x, dt, A, B, C, D, s0)
        assert_close(y, y_ref, **TOL)
        assert_close(s, s_ref, **TOL)


def test_chunked_strong_decay_stays_finite():
    """Large dt * |A| over long chunks: exp of segment sums must not overflow into inf/nan."""
    x, dt, A, B, C, D, _ = inputs(t=40, seed=3)
    dt = dt * 20
    y, s = ssd_chunked(x, dt, A, B, C, D, 16)
    y_ref, s_ref = ssd_reference(x, dt, A, B, C, D)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert_close(y, y_ref, **TOL)
    assert_close(s, s_ref, **TOL)


def test_prefill_then_steps_equals_one_scan():
    """Decoding = chunked prefill of a prefix, then ssm_step per token on the returned state."""
    x, dt, A, B, C, D, s0 = inputs(t=11, seed=5, with_state=True)
    y_all, s_all = ssd_chunked(x, dt, A, B, C, D, 4, s0)
    p = 6
    y_pre, state = ssd_chunked(x[:, :p], dt[:, :p], A, B[:, :p], C[:, :p], D, 4, s0)
    ys = [y_pre]
    for t in range(p, x.shape[1]):
        ys.append(ssm_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)[:, None])
    assert_close(torch.cat(ys, 1), y_all, **TOL)
    assert_close(state, s_all, **TOL)


def test_chunked_prefill_resumes_from_its_own_state():
    """Two chunked scans back to back (prefill on top of a cache) equal one scan over everything."""
    x, dt, A, B, C, D, _ = inputs(t=13, seed=6)
    y_all, s_all = ssd_chunked(x, dt, A, B, C, D, 4)
    y1, s1 = ssd_chunked(x[:, :5], dt[:, :5], A, B[:, :5], C[:, :5], D, 4)
    y2, s2 = ssd_chunked(x[:, 5:], dt[:, 5:], A, B[:, 5:], C[:, 5:], D, 3, s1)
    assert_close(torch.cat([y1, y2], 1), y_all, **TOL)
    assert_close(s2, s_all, **TOL)


def test_ssm_step_updates_state_in_place():
    x, dt, A, B, C, D, s0 = inputs(t=1, seed=7, with_state=True)
    state = s0.clone()
    y = ssm_step(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    y_ref, s_ref = naive(x, dt, A, B, C, D, s0)
    assert_close(y, y_ref[:, 0], **TOL)
    assert_close(state, s_ref, **TOL)
    assert not torch.equal(state, s0)


def test_chunked_does_not_modify_inputs():
    x, dt, A, B, C, D, s0 = inputs(t=9, seed=8, with_state=True)
    before = [v.clone() for v in (x, dt, A, B, C, D, s0)]
    ssd_chunked(x, dt, A, B, C, D, 4, s0)
    for a, b in zip(before, (x, dt, A, B, C, D, s0), strict=True):
        assert torch.equal(a, b)


def test_segsum():
    a = torch.randn(2, 6, generator=torch.Generator().manual_seed(9))
    out = segsum(a)
    for i in range(6):
        for j in range(6):
            if j > i:
                assert out[0, i, j] == float("-inf")
            else:
                assert_close(out[:, i, j], a[:, j + 1 : i + 1].sum(-1), **TOL)

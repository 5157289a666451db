"""Mamba2 state-space scan: a chunked SSD scan for prefill, a one-token recurrent step for decoding, and a
slow sequential reference that both are tested against.

Notation (per head h of group g, head dim p, state n):
    state_t = exp(dt_t * A) * state_{t-1} + dt_t * x_t ⊗ B_t        state: [p, n]
    y_t     = state_t · C_t + D * x_t
B and C are shared by the heads of a group, so they stay [.., g, n] and heads are viewed as [g, h/g].
Everything runs in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nestlm.device import own_precision


def segsum(a: torch.Tensor) -> torch.Tensor:
    """a: [..., L] -> [..., L, L] with out[l, s] = sum(a[s+1 .. l]) for l >= s, -inf above the diagonal.

    Computed as a masked cumulative sum (no difference of large cumsums, which loses precision).
    """
    L = a.shape[-1]
    a = a[..., :, None].expand(*a.shape, L)  # [..., i, j] = a[i]
    strictly_below = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device), diagonal=-1)
    out = torch.cumsum(a.masked_fill(~strictly_below, 0.0), dim=-2)  # [i, j] = sum_{j < i' <= i} a[i']
    keep = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device))
    return out.masked_fill(~keep, float("-inf"))


@own_precision  # fp32 also under bf16 autocast (exp of cumulative sums)
def ssd_chunked(x, dt, A, B, C, D, chunk_size: int, initial_state=None):
    """Chunked SSD scan (prefill).

    x: [b, t, h, p]   dt: [b, t, h] (after softplus)   A: [h] (negative)   B, C: [b, t, g, n]   D: [h]
    initial_state: [b, h, p, n] or None.  Returns y [b, t, h, p] and the final state [b, h, p, n].
    """
    b, t, h, p = x.shape
    g, n = B.shape[-2:]
    hg = h // g
    dtype = x.dtype
    x, dt, A, B, C = x.float(), dt.float(), A.float(), B.float(), C.float()
    y_skip = x * D.float()[:, None]  # [b, t, h, p]

    L = chunk_size
    pad = (-t) % L
    if pad:  # dt = 0 on padded steps: no decay, no input, so the final state is untouched
        x, dt, B, C = (F.pad(v, (0, 0) * (v.dim() - 2) + (0, pad)) for v in (x, dt, B, C))
    c = (t + pad) // L

    xdt = (x * dt[..., None]).view(b, c, L, g, hg, p)  # discretised input
    a = (dt * A).view(b, c, L, g, hg).permute(0, 1, 3, 4, 2)  # [b, c, g, hg, L] log-decay per step
    a_cum = torch.cumsum(a, dim=-1)
    B = B.view(b, c, L, g, n)
    C = C.view(b, c, L, g, n)

    # 1. within each chunk: attention-like, y[l] = sum_{s<=l} (C_l·B_s) exp(a_cum[l]-a_cum[s]) xdt[s]
    decay = torch.exp(segsum(a))  # [b, c, g, hg, l, s]
    CB = torch.einsum("bclgn,bcsgn->bcgls", C, B)  # shared by the heads of a group
    y = torch.einsum("bcghls,bcsghp->bclghp", decay * CB[:, :, :, None], xdt)

    # 2. each chunk's contribution to the state at its end
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [b, c, g, hg, L]
    chunk_states = torch.einsum("bclgn,bcghl,bclghp->bcghpn", B, decay_to_end, xdt)

    # 3. carry states across chunks (a scan over c, written as a [c+1, c+1] decay matrix)
    if initial_state is None:
        init = torch.zeros(b, 1, g, hg, p, n, dtype=x.dtype, device=x.device)
    else:
        init = initial_state.float().view(b, 1, g, hg, p, n)
    states = torch.cat([init, chunk_states], dim=1)  # [b, c+1, g, hg, p, n]
    chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1].permute(0, 2, 3, 1), (1, 0))))  # [b, g, hg, z, c]
    states = torch.einsum("bghzc,bcghpn->bzghpn", chunk_decay, states)
    states, final_state = states[:, :-1], states[:, -1]

    # 4. state at each chunk's start -> outputs inside the chunk
    y = y + torch.einsum("bclgn,bcghpn,bcghl->bclghp", C, states, torch.exp(a_cum))

    y = y.reshape(b, c * L, h, p)[:, :t] + y_skip
    return y.to(dtype), final_state.reshape(b, h, p, n)


def ssm_step(state, x, dt, A, B, C, D):
    """One recurrent step (decoding), updates `state` in place.

    state: [b, h, p, n] fp32   x: [b, h, p]   dt: [b, h]   A: [h]   B, C: [b, g, n]   D: [h]  ->  y [b, h, p]
    """
    b, h, p = x.shape
    g, n = B.shape[-2:]
    hg = h // g
    xf, dtf = x.float(), dt.float()
    dA = torch.exp(dtf * A.float())  # [b, h]
    s = state.view(b, g, hg, p, n)
    dBx = torch.einsum("bgn,bghp->bghpn", B.float(), (xf * dtf[..., None]).view(b, g, hg, p))
    s.mul_(dA.view(b, g, hg, 1, 1)).add_(dBx)
    y = torch.einsum("bghpn,bgn->bghp", s, C.float()).reshape(b, h, p)
    y = y + xf * D.float()[:, None]
    return y.to(x.dtype)


def ssd_reference(x, dt, A, B, C, D, initial_state=None):
    """Slow sequential scan: the definition, one token at a time. Same signature as `ssd_chunked`."""
    b, t, h, p = x.shape
    n = B.shape[-1]
    state = (torch.zeros(b, h, p, n, dtype=torch.float32, device=x.device) if initial_state is None
             else initial_state.float().clone())
    ys = [ssm_step(state, x[:, i], dt[:, i], A, B[:, i], C[:, i], D) for i in range(t)]
    return torch.stack(ys, dim=1), state

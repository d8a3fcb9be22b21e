"""Triton kernels of the nerf family (backend="triton"): ray_aabb_intersect, volume_render (forward and the
recomputing O(R) backward) and composite_blocks. float32 only.

Same math as fastcore_ai.reference.nerf and csrc/kernels/nerf/nerf.h:
  ray/AABB    slab test per (ray, box) pair; d = 0 constrains nothing inside the slab, excludes outside.
  render      per ray, samples in order: T_i = exp(−τ_i), α_i = −expm1(−σ_i δ_i), w_i = T_i α_i until T_i < eps
              (a ray stops for good at its first T_i < eps; later samples give exactly 0 and get 0 gradient);
              backward with u_i = g_C·c_i + g_A + g_D m_i + g_w,i, U = Σ w u (from the saved per-ray outputs):
              ∂L/∂σ_i = δ_i (T_{i+1} u_i − (U − U_{≤i})), ∂L/∂c_i = w_i g_C.
  composite   w_kr ∝ d_kr^(−p) over eligible blocks (exp(−p log d − max)), d = 0 shares the weight,
              no eligible block -> nearest block.
Layout: a program owns BLOCK rays (one lane per ray) and walks the samples of its rays in lockstep, up to
the longest run in the batch (one host read of max(count)); lanes past their own run are masked.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK = 64


@triton.jit
def _aabb_kernel(o_ptr, d_ptr, box_ptr, near_ptr, far_ptr, hit_ptr, R, A, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < R * A
    r = i // A
    a = i % A
    inf = float("inf")
    t0 = tl.full((BLOCK,), -inf, tl.float32)
    t1 = tl.full((BLOCK,), inf, tl.float32)
    degenerate = i < 0
    for axis in tl.static_range(3):
        o = tl.load(o_ptr + r * 3 + axis, mask=ok, other=0.0)
        d = tl.load(d_ptr + r * 3 + axis, mask=ok, other=1.0)
        lo = tl.load(box_ptr + a * 6 + axis, mask=ok, other=0.0)
        hi = tl.load(box_ptr + a * 6 + axis + 3, mask=ok, other=0.0)
        degenerate = degenerate | (lo > hi)
        safe_d = tl.where(d == 0.0, 1.0, d)
        p = (lo - o) / safe_d
        q = (hi - o) / safe_d
        inside = (lo <= o) & (o <= hi)
        s0 = tl.where(d == 0.0, tl.where(inside, -inf, inf), tl.minimum(p, q))
        s1 = tl.where(d == 0.0, tl.where(inside, inf, -inf), tl.maximum(p, q))
        t0 = tl.maximum(t0, s0)
        t1 = tl.minimum(t1, s1)
    t0 = tl.maximum(t0, 0.0)
    hit = (t1 >= t0) & ~degenerate
    tl.store(near_ptr + i, tl.where(hit, t0, inf), mask=ok)
    tl.store(far_ptr + i, tl.where(hit, t1, inf), mask=ok)
    tl.store(hit_ptr + i, hit.to(tl.int8), mask=ok)


def ray_aabb_intersect(rays_o: Tensor, rays_d: Tensor, aabbs: Tensor):
    R, A = rays_o.shape[0], aabbs.shape[0]
    o, d, b = rays_o.contiguous(), rays_d.contiguous(), aabbs.contiguous()
    near = torch.empty(R, A, dtype=o.dtype, device=o.device)
    far = torch.empty(R, A, dtype=o.dtype, device=o.device)
    hit = torch.empty(R, A, dtype=torch.int8, device=o.device)
    if R * A > 0:
        _aabb_kernel[(triton.cdiv(R * A, _BLOCK),)](o, d, b, near, far, hit, R, A, BLOCK=_BLOCK)
    return near, far, hit.bool()


@triton.jit
def _render_forward_kernel(
    sig_ptr,
    rgb_ptr,
    ts_ptr,
    te_ptr,
    info_ptr,
    color_ptr,
    opacity_ptr,
    depth_ptr,
    w_ptr,
    R,
    max_count,
    eps,
    HAS_W: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = r < R
    start = tl.load(info_ptr + 2 * r, mask=ok, other=0)
    count = tl.load(info_ptr + 2 * r + 1, mask=ok, other=0)
    tau = tl.zeros((BLOCK,), tl.float32)
    stopped = r < 0
    c0 = tl.zeros((BLOCK,), tl.float32)
    c1 = tl.zeros((BLOCK,), tl.float32)
    c2 = tl.zeros((BLOCK,), tl.float32)
    acc = tl.zeros((BLOCK,), tl.float32)
    dep = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, max_count):
        live = ok & (i < count)
        s = start + i
        trans = tl.exp(-tau)
        stopped = stopped | (trans < eps)
        use = live & ~stopped
        t_s = tl.load(ts_ptr + s, mask=live, other=0.0)
        t_e = tl.load(te_ptr + s, mask=live, other=0.0)
        x = tl.load(sig_ptr + s, mask=live, other=0.0) * (t_e - t_s)
        # −expm1(−x) without cancellation for small x: 1 − e^(−x) = x − x²/2 + x³/6 − ... below 1e-3
        alpha = tl.where(x < 1e-3, x * (1.0 - x * (0.5 - x / 6.0)), 1.0 - tl.exp(-x))
        w = tl.where(use, trans * alpha, 0.0)
        c0 += w * tl.load(rgb_ptr + 3 * s, mask=live, other=0.0)
        c1 += w * tl.load(rgb_ptr + 3 * s + 1, mask=live, other=0.0)
        c2 += w * tl.load(rgb_ptr + 3 * s + 2, mask=live, other=0.0)
        acc += w
        dep += w * (0.5 * (t_s + t_e))
        if HAS_W:
            tl.store(w_ptr + s, w, mask=live)
        tau += tl.where(use, x, 0.0)
    tl.store(color_ptr + 3 * r, c0, mask=ok)
    tl.store(color_ptr + 3 * r + 1, c1, mask=ok)
    tl.store(color_ptr + 3 * r + 2, c2, mask=ok)
    tl.store(opacity_ptr + r, acc, mask=ok)
    tl.store(depth_ptr + r, dep, mask=ok)


@triton.jit
def _render_backward_kernel(
    sig_ptr,
    rgb_ptr,
    ts_ptr,
    te_ptr,
    info_ptr,
    color_ptr,
    opacity_ptr,
    depth_ptr,
    gc_ptr,
    ga_ptr,
    gd_ptr,
    gw_ptr,
    gs_ptr,
    grgb_ptr,
    R,
    max_count,
    eps,
    HAS_GW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = r < R
    start = tl.load(info_ptr + 2 * r, mask=ok, other=0)
    count = tl.load(info_ptr + 2 * r + 1, mask=ok, other=0)
    g0 = tl.load(gc_ptr + 3 * r, mask=ok, other=0.0)
    g1 = tl.load(gc_ptr + 3 * r + 1, mask=ok, other=0.0)
    g2 = tl.load(gc_ptr + 3 * r + 2, mask=ok, other=0.0)
    ga = tl.load(ga_ptr + r, mask=ok, other=0.0)
    gd = tl.load(gd_ptr + r, mask=ok, other=0.0)
    total = (
        g0 * tl.load(color_ptr + 3 * r, mask=ok, other=0.0)
        + g1 * tl.load(color_ptr + 3 * r + 1, mask=ok, other=0.0)
        + g2 * tl.load(color_ptr + 3 * r + 2, mask=ok, other=0.0)
        + ga * tl.load(opacity_ptr + r, mask=ok, other=0.0)
        + gd * tl.load(depth_ptr + r, mask=ok, other=0.0)
    )
    if HAS_GW:  # Σ g_w w needs w: one extra sweep
        tau = tl.zeros((BLOCK,), tl.float32)
        stopped = r < 0
        for i in range(0, max_count):
            live = ok & (i < count)
            s = start + i
            trans = tl.exp(-tau)
            stopped = stopped | (trans < eps)
            use = live & ~stopped
            x = tl.load(sig_ptr + s, mask=live, other=0.0) * (
                tl.load(te_ptr + s, mask=live, other=0.0) - tl.load(ts_ptr + s, mask=live, other=0.0)
            )
            alpha = tl.where(x < 1e-3, x * (1.0 - x * (0.5 - x / 6.0)), 1.0 - tl.exp(-x))
            total += tl.where(use, tl.load(gw_ptr + s, mask=live, other=0.0) * trans * alpha, 0.0)
            tau += tl.where(use, x, 0.0)
    tau = tl.zeros((BLOCK,), tl.float32)
    prefix = tl.zeros((BLOCK,), tl.float32)
    stopped = r < 0
    for i in range(0, max_count):
        live = ok & (i < count)
        s = start + i
        trans = tl.exp(-tau)
        stopped = stopped | (trans < eps)
        use = live & ~stopped
        t_s = tl.load(ts_ptr + s, mask=live, other=0.0)
        t_e = tl.load(te_ptr + s, mask=live, other=0.0)
        delta = t_e - t_s
        x = tl.load(sig_ptr + s, mask=live, other=0.0) * delta
        alpha = tl.where(x < 1e-3, x * (1.0 - x * (0.5 - x / 6.0)), 1.0 - tl.exp(-x))
        w = trans * alpha
        trans_next = tl.exp(-(tau + x))
        r0 = tl.load(rgb_ptr + 3 * s, mask=live, other=0.0)
        r1 = tl.load(rgb_ptr + 3 * s + 1, mask=live, other=0.0)
        r2 = tl.load(rgb_ptr + 3 * s + 2, mask=live, other=0.0)
        u = g0 * r0 + g1 * r1 + g2 * r2 + ga + gd * (0.5 * (t_s + t_e))
        if HAS_GW:
            u += tl.load(gw_ptr + s, mask=live, other=0.0)
        prefix += tl.where(use, w * u, 0.0)
        grad_sigma = tl.where(use, delta * (trans_next * u - (total - prefix)), 0.0)
        tl.store(gs_ptr + s, grad_sigma, mask=live)
        tl.store(grgb_ptr + 3 * s, tl.where(use, w * g0, 0.0), mask=live)
        tl.store(grgb_ptr + 3 * s + 1, tl.where(use, w * g1, 0.0), mask=live)
        tl.store(grgb_ptr + 3 * s + 2, tl.where(use, w * g2, 0.0), mask=live)
        tau += tl.where(use, x, 0.0)


def _max_count(packed_info: Tensor) -> int:
    return int(packed_info[:, 1].max()) if packed_info.shape[0] else 0


def volume_render(sigmas, rgbs, t_starts, t_ends, packed_info, eps: float, need_weights: bool):
    R, S = packed_info.shape[0], sigmas.shape[0]
    sg, rg, ts, te, pi = (t.contiguous() for t in (sigmas, rgbs, t_starts, t_ends, packed_info))
    color = torch.empty(R, 3, dtype=sg.dtype, device=sg.device)
    opacity = torch.empty(R, dtype=sg.dtype, device=sg.device)
    depth = torch.empty(R, dtype=sg.dtype, device=sg.device)
    weights = torch.zeros(S if need_weights else 0, dtype=sg.dtype, device=sg.device)
    if R > 0:
        _render_forward_kernel[(triton.cdiv(R, _BLOCK),)](
            sg, rg, ts, te, pi, color, opacity, depth, weights, R, _max_count(pi), eps, HAS_W=need_weights, BLOCK=_BLOCK
        )
    return color, opacity, depth, weights


def volume_render_backward(
    grad_color,
    grad_opacity,
    grad_depth,
    grad_weights: Optional[Tensor],
    sigmas,
    rgbs,
    t_starts,
    t_ends,
    packed_info,
    color,
    opacity,
    depth,
    eps: float,
):
    R, S = packed_info.shape[0], sigmas.shape[0]
    grad_sigmas = torch.zeros(S, dtype=sigmas.dtype, device=sigmas.device)
    grad_rgbs = torch.zeros(S, 3, dtype=sigmas.dtype, device=sigmas.device)
    if R == 0 or S == 0:
        return grad_sigmas, grad_rgbs
    has_gw = grad_weights is not None
    gw = grad_weights.contiguous() if has_gw else grad_sigmas
    args = [
        t.contiguous()
        for t in (
            sigmas,
            rgbs,
            t_starts,
            t_ends,
            packed_info,
            color,
            opacity,
            depth,
            grad_color,
            grad_opacity,
            grad_depth,
        )
    ]
    _render_backward_kernel[(triton.cdiv(R, _BLOCK),)](
        *args, gw, grad_sigmas, grad_rgbs, R, _max_count(packed_info), eps, HAS_GW=has_gw, BLOCK=_BLOCK
    )
    return grad_sigmas, grad_rgbs


@triton.jit
def _composite_kernel(
    col_ptr,
    cam_ptr,
    cen_ptr,
    vis_ptr,
    out_ptr,
    w_ptr,
    K,
    R,
    power,
    threshold,
    radius,
    PER_RAY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = r < R
    cam_off = r * 3 if PER_RAY else r * 0
    cx = tl.load(cam_ptr + cam_off, mask=ok, other=0.0)
    cy = tl.load(cam_ptr + cam_off + 1, mask=ok, other=0.0)
    cz = tl.load(cam_ptr + cam_off + 2, mask=ok, other=0.0)
    inf = float("inf")
    eligible = tl.zeros((BLOCK,), tl.int32)
    at_zero = tl.zeros((BLOCK,), tl.int32)
    nearest = tl.zeros((BLOCK,), tl.int64)
    nearest_d = tl.full((BLOCK,), inf, tl.float32)
    top = tl.full((BLOCK,), -inf, tl.float32)
    for k in range(0, K):
        dx = cx - tl.load(cen_ptr + 3 * k)
        dy = cy - tl.load(cen_ptr + 3 * k + 1)
        dz = cz - tl.load(cen_ptr + 3 * k + 2)
        dist = tl.sqrt(dx * dx + dy * dy + dz * dz)
        closer = dist < nearest_d
        nearest = tl.where(closer, k, nearest)
        nearest_d = tl.where(closer, dist, nearest_d)
        ok_k = (tl.load(vis_ptr + k * R + r, mask=ok, other=0.0) >= threshold) & (dist <= radius)
        eligible += ok_k.to(tl.int32)
        at_zero += (ok_k & (dist == 0.0)).to(tl.int32)
        logw = -power * tl.log(tl.where(dist > 0.0, dist, 1.0))
        top = tl.where(ok_k & (dist > 0.0), tl.maximum(top, logw), top)
    total = tl.zeros((BLOCK,), tl.float32)
    for k in range(0, K):
        dx = cx - tl.load(cen_ptr + 3 * k)
        dy = cy - tl.load(cen_ptr + 3 * k + 1)
        dz = cz - tl.load(cen_ptr + 3 * k + 2)
        dist = tl.sqrt(dx * dx + dy * dy + dz * dz)
        ok_k = (tl.load(vis_ptr + k * R + r, mask=ok, other=0.0) >= threshold) & (dist <= radius)
        idw = tl.exp(-power * tl.log(tl.where(dist > 0.0, dist, 1.0)) - tl.where(top > -inf, top, 0.0))
        w = tl.where(at_zero > 0, tl.where(dist == 0.0, 1.0, 0.0), idw)
        w = tl.where(ok_k, w, 0.0)
        w = tl.where(eligible == 0, tl.where(nearest == k, 1.0, 0.0), w)
        tl.store(w_ptr + k * R + r, w, mask=ok)
        total += w
    o0 = tl.zeros((BLOCK,), tl.float32)
    o1 = tl.zeros((BLOCK,), tl.float32)
    o2 = tl.zeros((BLOCK,), tl.float32)
    for k in range(0, K):
        w = tl.load(w_ptr + k * R + r, mask=ok, other=0.0) / total
        tl.store(w_ptr + k * R + r, w, mask=ok)
        base = (k * R + r) * 3
        o0 += w * tl.load(col_ptr + base, mask=ok, other=0.0)
        o1 += w * tl.load(col_ptr + base + 1, mask=ok, other=0.0)
        o2 += w * tl.load(col_ptr + base + 2, mask=ok, other=0.0)
    tl.store(out_ptr + 3 * r, o0, mask=ok)
    tl.store(out_ptr + 3 * r + 1, o1, mask=ok)
    tl.store(out_ptr + 3 * r + 2, o2, mask=ok)


def composite_blocks(colors, camera_pos, block_centers, visibility, power, threshold, radius):
    K, R = colors.shape[0], colors.shape[1]
    col, cam, cen, vis = (t.contiguous() for t in (colors, camera_pos, block_centers, visibility))
    out = torch.empty(R, 3, dtype=col.dtype, device=col.device)
    weights = torch.empty(K, R, dtype=col.dtype, device=col.device)
    if R > 0:
        _composite_kernel[(triton.cdiv(R, _BLOCK),)](
            col,
            cam,
            cen,
            vis,
            out,
            weights,
            K,
            R,
            power,
            threshold,
            min(radius, 3.0e38),
            PER_RAY=cam.dim() == 2,
            BLOCK=_BLOCK,
        )
    return out, weights

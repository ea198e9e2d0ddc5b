#!/usr/bin/python3
"""Golden data for the normalization kernels: batch renorm written from the specification
(../shared/docs/batch-renorm.md) in torch ops, gradients by autograd, computed in float64 from float32
inputs. Writes tests/golden/norm_golden.json, read by tests/kernels_norm_golden.cpp (no Python at test
time). Run: /usr/bin/python3 scripts/gen_norm_golden.py   (torch 1.13; deterministic, fixed seed).
"""
import json
import math
import os

import torch
import torch.nn.functional as F

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden",
                   "norm_golden.json")


def norm_step(x, gamma, beta, rmean, rstd, cfg):
    """One training step on channels-last (N, D, H, W, C) float64 tensors. Returns y, the updated
    running statistics, r, d and the clip counts."""
    instance = cfg["kind"] == "instancenorm"
    dims = (1, 2, 3) if instance else (0, 1, 2, 3)
    eps = cfg["eps"]
    mu = x.mean(dim=dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=dims, keepdim=True)  # biased, never N-1
    sigma = torch.sqrt(var + eps)                        # eps inside the sqrt
    r_clipped = d_clipped = 0
    if cfg["kind"] == "batchrenorm":
        s = torch.clamp(rstd, min=math.sqrt(eps))        # floor of the running std
        r_raw = (sigma / s).detach()
        d_raw = ((mu - rmean) / s).detach()
        r = torch.clamp(r_raw, 1.0 / cfg["r_max"], cfg["r_max"])  # stop-gradient constants
        d = torch.clamp(d_raw, -cfg["d_max"], cfg["d_max"])
        r_clipped = int(((r_raw < 1.0 / cfg["r_max"]) | (r_raw > cfg["r_max"])).sum())
        d_clipped = int(((d_raw < -cfg["d_max"]) | (d_raw > cfg["d_max"])).sum())
    else:
        r = torch.ones_like(sigma).detach()
        d = torch.zeros_like(mu).detach()
    z = gamma * ((x - mu) / sigma * r + d) + beta
    y = F.leaky_relu(z, cfg["slope"]) if cfg["leaky"] else z
    if instance:
        rmean_out, rstd_out = rmean, rstd  # no running statistics
    else:
        a = cfg["alpha"]
        rmean_out = rmean + a * (mu.detach() - rmean)
        rstd_out = rstd + a * (sigma.detach() - rstd)
    return y, rmean_out, rstd_out, r, d, r_clipped, d_clipped


def f32(t):
    """float32 values as a flat list of floats (9 significant digits round-trip a float32)."""
    return [float("%.9g" % v) for v in t.detach().to(torch.float32).reshape(-1).tolist()]


def make_case(gen, name, kind, shape, leaky, slope, r_max, d_max, stale_running):
    n, dd, h, w, c = shape
    cfg = dict(kind=kind, eps=1e-5, alpha=0.01, r_max=r_max, d_max=d_max, leaky=leaky, slope=slope)
    ch_mean = torch.rand(c, generator=gen) * 4 - 2
    ch_std = torch.rand(c, generator=gen) * 2.7 + 0.3
    x = (torch.randn(shape, generator=gen) * ch_std + ch_mean).to(torch.float32)
    gamma = (torch.rand(c, generator=gen) + 0.5).to(torch.float32)
    beta = (torch.rand(c, generator=gen) - 0.5).to(torch.float32)
    if stale_running:  # running statistics far from the batch ones: clips bind on some channels
        rmean = (torch.rand(c, generator=gen) * 2 - 1).to(torch.float32)
        rstd = (torch.rand(c, generator=gen) * 1.5 + 0.5).to(torch.float32)
    else:
        rmean = torch.zeros(c, dtype=torch.float32)
        rstd = torch.ones(c, dtype=torch.float32)
    dy = torch.randn(shape, generator=gen).to(torch.float32)

    xd = x.double().requires_grad_(True)
    gd = gamma.double().requires_grad_(True)
    bd = beta.double().requires_grad_(True)
    y, rm_out, rs_out, r, d, r_clipped, d_clipped = norm_step(xd, gd, bd, rmean.double(),
                                                              rstd.double(), cfg)
    (y * dy.double()).sum().backward()
    case = dict(name=name, shape=list(shape), **cfg,
                x=f32(x), gamma=f32(gamma), beta=f32(beta), running_mean=f32(rmean),
                running_std=f32(rstd), dy=f32(dy),
                y=f32(y), running_mean_out=f32(rm_out), running_std_out=f32(rs_out),
                r=f32(r), d=f32(d), r_clipped=r_clipped, d_clipped=d_clipped,
                dx=f32(xd.grad), dgamma=f32(gd.grad), dbeta=f32(bd.grad))
    return case


def main():
    gen = torch.Generator().manual_seed(20170302)  # arXiv:1702.03275
    cases = [
        make_case(gen, "renorm_clipping_leaky", "batchrenorm", (2, 3, 3, 4, 6), True, 0.01, 1.5, 1.5,
                  True),
        make_case(gen, "renorm_n1_leaky", "batchrenorm", (1, 4, 3, 3, 4), True, 0.2, 3.0, 5.0, True),
        make_case(gen, "batchnorm_plain", "batchnorm", (2, 2, 3, 3, 3), False, 0.01, 1.0, 0.0, True),
        make_case(gen, "instancenorm_leaky", "instancenorm", (2, 3, 2, 3, 4), True, 0.1, 1.0, 0.0,
                  False),
    ]
    first = cases[0]
    c = first["shape"][-1]
    # The first case must exercise the clipping, but not on every channel.
    assert 0 < first["r_clipped"] + first["d_clipped"], "no clip binds: pick another seed"
    assert first["r_clipped"] < c and first["d_clipped"] < c, "every channel clipped: pick another seed"
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(dict(generator="scripts/gen_norm_golden.py", torch=torch.__version__, cases=cases), f,
                  separators=(",", ":"))
    print("wrote", OUT, os.path.getsize(OUT), "bytes;",
          ", ".join("%s r_clipped=%d d_clipped=%d" % (k["name"], k["r_clipped"], k["d_clipped"])
                    for k in cases))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""torch's CPU generator outputs for peft-core's torch_rng (VeRA's projections, FourierFT's
frequency locations): uniform_ draws, kaiming_uniform_ as VeRA calls it, and randperm prefixes,
for several seeds and sizes. Produced with torch 2.15.

Run from the repository root:  python tools/reference/make_torch_rng_fixtures.py
Writes peft-core/tests/fixtures/torch_rng.json, read by peft-core/tests/torch_rng.rs.
"""
import json
import math
import os

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "peft-core", "tests", "fixtures",
                   "torch_rng.json")


def main():
    cases = {"uniform": [], "kaiming": [], "randperm": []}
    for seed, n, lo, hi in [(0, 37, -1.0, 1.0), (12345, 3000, -0.1, 0.1), (2**40 + 7, 700, 0.0, 5.0)]:
        g = torch.Generator().manual_seed(seed)
        a = torch.empty(n).uniform_(lo, hi, generator=g)
        b = torch.empty(n).uniform_(-hi, hi, generator=g)  # the stream continues
        cases["uniform"].append({"seed": seed, "n": n, "bounds": [[lo, hi], [-hi, hi]],
                                 "values": [a.tolist(), b.tolist()]})
    for seed, shape in [(0, (4, 96)), (7, (6, 250))]:
        g = torch.Generator().manual_seed(seed)
        t = torch.empty(shape)
        bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
        t.uniform_(-bound, bound, generator=g)
        cases["kaiming"].append({"seed": seed, "shape": list(shape), "values": t.flatten().tolist()})
    for seed, n, k in [(777, 10, 10), (777, 4096, 50), (3, 64 * 96, 200), (12, 5000, 5000), (777, 4096 * 11008, 300),
                       # torch switches to the inside-out shuffle with 64-bit draws from here.
                       (5, 0xFFFFFFFF // 20 - 1, 20), (5, 0xFFFFFFFF // 20, 20)]:
        p = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]
        cases["randperm"].append({"seed": seed, "n": n, "k": k, "values": p.tolist()})
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(cases, f)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Prototype timing of block-major selected attention for prefill (kernels.cu beside it).

Runs on the GPU machine (PyTorch + CuPy, no Rust build): one sequence of T tokens, random
bf16 Q/K/V, a random NSA selection per (position, KV head) shaped like the engine's with
the benchmark's random inputs (block 0 and the two local blocks forced, the rest distinct
random causal blocks; every block while a position has at most n), then

  invert   the selection into per-(KV head, block) lists of (position, slot) (PyTorch
           sort: a stand-in, timed apart),
  attn     fsa_attn: a block of 4 warps per item (a piece of one block's list) holds the
           block's K/V in shared memory; warps stream 16-row chunks of queries through it
           and write a bf16 partial and its log2-sum-exp2 per (position, head, slot),
  merge    fsa_merge: the slots of each (position, head) into the selected branch's output,

checks sampled (position, KV head) pairs against a float32 PyTorch reference, and prints
a table: ms per kernel, TFLOP/s of attn, bytes of partials.

Usage: python3 scripts/fsa_proto/run.py [--T 65536] [--groups 16,4] [--item 128] [--reps 5]
"""
import argparse, math, os, sys

import cupy as cp
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
HQ, DK, DV, BK, NSEL, NINIT, NLOCAL = 64, 128, 128, 64, 16, 1, 2


def selection(T, hkv, gen):
    """[T][hkv][NSEL] int32 blocks (ascending, -1 padded): forced block 0 and the local
    blocks, the rest random distinct causal blocks (what random inputs' scores give)."""
    nb = (T + BK - 1) // BK
    t = torch.arange(T, device="cuda")
    nblk = t // BK + 1  # blocks position t sees
    sel = torch.full((T, hkv, NSEL), -1, dtype=torch.int32, device="cuda")
    CH = 4096
    for t0 in range(0, T, CH):
        t1 = min(T, t0 + CH)
        nbk = nblk[t0:t1]
        r = torch.rand((t1 - t0, hkv, nb), generator=gen, device="cuda")
        j = torch.arange(nb, device="cuda")
        last = (nbk - 1)[:, None, None]
        forced = (j[None, None, :] < NINIT) | ((j[None, None, :] > last - NLOCAL) & (j[None, None, :] <= last))
        r = torch.where(forced, torch.full_like(r, 2.0), r)
        r = torch.where(j[None, None, :] > last, torch.full_like(r, -1.0), r)
        top = torch.topk(r, NSEL, dim=2).indices.to(torch.int32)
        valid = torch.gather(r, 2, top.long()) >= 0
        top = torch.where(valid, top, torch.full_like(top, 1 << 30))
        top = torch.sort(top, dim=2).values
        sel[t0:t1] = torch.where(top == (1 << 30), torch.full_like(top, -1), top)
    return sel


def invert(sel, T, hkv, item):
    """Entries (position * 16 + slot) grouped by (KV head, block), positions ascending,
    and items (KV head, block, e0, e1) of at most `item` entries."""
    nb = (T + BK - 1) // BK
    t = torch.arange(T, device="cuda", dtype=torch.int64)[:, None, None].expand(T, hkv, NSEL)
    h = torch.arange(hkv, device="cuda", dtype=torch.int64)[None, :, None].expand(T, hkv, NSEL)
    s = torch.arange(NSEL, device="cuda", dtype=torch.int64)[None, None, :].expand(T, hkv, NSEL)
    b = sel.to(torch.int64)
    ok = b >= 0
    key = (h * nb + b)[ok]
    ent = (t * 16 + s)[ok]
    order = torch.argsort(key * T + (ent >> 4))
    key, ent = key[order], ent[order].to(torch.int32)
    cnt = torch.bincount(key, minlength=hkv * nb)
    off = torch.cumsum(cnt, 0) - cnt
    npieces = (cnt + item - 1) // item
    kid = torch.repeat_interleave(torch.arange(hkv * nb, device="cuda"), npieces)
    first = torch.cumsum(npieces, 0) - npieces
    idx = torch.arange(kid.numel(), device="cuda") - first[kid]
    e0 = off[kid] + idx * item
    e1 = torch.minimum(e0 + item, off[kid] + cnt[kid])
    items = torch.stack([kid // nb, kid % nb, e0, e1], 1).to(torch.int32).contiguous()
    # Longest lists first, so the block scheduler's tail holds the short ones.
    items = items[torch.argsort(items[:, 3] - items[:, 2], descending=True, stable=True)].contiguous()
    return ent.contiguous(), items


def reference(q, k, v, sel, t, kvh, G):
    """float32 selected attention of position t, KV head kvh's G heads: [G][DV]."""
    blocks = [int(x) for x in sel[t, kvh].tolist() if x >= 0]
    keys = torch.cat([torch.arange(b * BK, b * BK + BK, device="cuda") for b in blocks])
    keys = keys[keys <= t]
    K = k[kvh, keys].float()
    V = v[kvh, keys].float()
    Q = q[t, kvh * G:(kvh + 1) * G].float()
    p = torch.softmax(Q @ K.T / math.sqrt(DK), dim=1)
    return p @ V


def events_ms(fn, reps):
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--groups", default="16,4")
    ap.add_argument("--item", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--samples", type=int, default=24)
    a = ap.parse_args()
    src = open(os.path.join(HERE, "kernels.cu")).read()
    rows = []
    for G in [int(x) for x in a.groups.split(",")]:
        hkv = HQ // G
        T = a.T
        gen = torch.Generator(device="cuda").manual_seed(1234 + G)
        q = (torch.randn((T, HQ, DK), generator=gen, device="cuda")).to(torch.bfloat16)
        k = (torch.randn((hkv, T, DK), generator=gen, device="cuda")).to(torch.bfloat16)
        v = (torch.randn((hkv, T, DV), generator=gen, device="cuda")).to(torch.bfloat16)
        sel = selection(T, hkv, gen)
        torch.cuda.synchronize()
        inv_ms = events_ms(lambda: invert(sel, T, hkv, a.item), 2)
        ent, items = invert(sel, T, hkv, a.item)
        mod = cp.RawModule(code=src, options=("-std=c++17", f"-DG_={G}", f"-DDK_={DK}", f"-DDV_={DV}"))
        attn = mod.get_function("fsa_attn")
        merge = mod.get_function("fsa_merge")
        smem = (BK * (DK + 8) + BK * (DV + 8) + 4 * 2 * 16 * (DK + 8)) * 2
        attn.max_dynamic_shared_size_bytes = smem
        part = torch.empty((T, HQ, NSEL, DV), dtype=torch.bfloat16, device="cuda")
        lse = torch.empty((T, HQ, NSEL), dtype=torch.float32, device="cuda")
        out = torch.empty((T, HQ, DV), dtype=torch.float32, device="cuda")
        n_items = items.shape[0]
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        sl2 = 1.0 / math.sqrt(DK) * 1.4426950408889634
        res = {}
        for per_sm in (2, 3, 4):
            grid = min(n_items, sms * per_sm)

            def run_attn():
                attn((grid,), (128,), (cp.uint64(q.data_ptr()), cp.uint64(k.data_ptr()), cp.uint64(v.data_ptr()),
                                       cp.uint64(ent.data_ptr()), cp.uint64(items.data_ptr()), cp.int32(n_items),
                                       cp.int32(T), cp.int32(HQ), cp.float32(sl2), cp.uint64(part.data_ptr()),
                                       cp.uint64(lse.data_ptr())), shared_mem=smem)

            run_attn()
            torch.cuda.synchronize()
            res[per_sm] = events_ms(run_attn, a.reps)

        def run_merge():
            nw = T * HQ
            merge(((nw * 32 + 255) // 256,), (256,), (cp.uint64(part.data_ptr()), cp.uint64(lse.data_ptr()), cp.int32(T),
                                                      cp.int32(HQ), cp.int32(NSEL), cp.int32(BK), cp.uint64(out.data_ptr())))

        run_merge()
        torch.cuda.synchronize()
        merge_ms = events_ms(run_merge, a.reps)
        # Check sampled (position, KV head) pairs.
        gs = torch.Generator().manual_seed(7)
        ts = [0, 1, 63, 64, 1023, 1024, T - 1] + torch.randint(0, T, (a.samples,), generator=gs).tolist()
        worst = 0.0
        for i, t in enumerate(ts):
            kvh = i % hkv
            ref = reference(q, k, v, sel, t, kvh, G)
            got = out[t, kvh * G:(kvh + 1) * G]
            err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
            worst = max(worst, err)
        ents = ent.numel()
        flops = ents * G * BK * (DK + DV) * 2
        best = min(res.values())
        rows.append((G, T, n_items, inv_ms, res, merge_ms, flops / best / 1e9, part.numel() * 2 / 1e9, worst))
        print(f"G={G} T={T}: items {n_items}, entries {ents}, attn {res} ms, merge {merge_ms:.2f} ms, "
              f"{flops / best / 1e9:.0f} TFLOP/s, max rel err {worst:.2e}", flush=True)
        del q, k, v, sel, ent, items, part, lse, out
        torch.cuda.empty_cache()
    print("| G | T | items | invert (torch) ms | attn ms (2 / 3 / 4 blocks per SM) | merge ms | attn TFLOP/s | partials GB | max rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for G, T, n, inv, res, mg, tf, gb, err in rows:
        print(f"| {G} | {T} | {n} | {inv:.2f} | {res[2]:.2f} / {res[3]:.2f} / {res[4]:.2f} | {mg:.2f} | {tf:.0f} | {gb:.1f} | {err:.2e} |")


if __name__ == "__main__":
    sys.exit(main())

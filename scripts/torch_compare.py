#!/usr/bin/env python3
"""libnsa's CUDA backend from Python, through its C ABI (ctypes), on PyTorch tensors.

For each (context, batch): fills a paged NSA cache to the context length (append-only
layer runs), then decodes steps on torch's current stream with q/k/v/gates/out living in
torch tensors. Checks one decode step against an NSA reference written here in torch
(float32, from docs/SPEC.md; given the engine's selected blocks, whose group scores must
match the best within tolerance), and times the decode step against
torch.nn.functional.scaled_dot_product_attention (cuDNN and flash backends) over the
same K/V, in the same process, with CUDA events.

For each prefill length T (--prefill): the engine's prefill of T tokens of one fresh
sequence in one step (all three branches), median of 3 after 1 warm-up, against causal
SDPA over the same q/k/v (cuDNN and flash; K/V repeated to HQ heads where a backend
refuses GQA), the last query rows checked against the same reference.

    python3 scripts/torch_compare.py --lib target/release/libnsa.so [--contexts 8192,65536] [--batches 1,16] [--prefill 8192,65536|none]

Prints markdown tables; --json FILE writes {"decode": [...], "prefill": [...]}.
"""
import argparse
import ctypes as C
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

# ---- the C ABI (include/nsa.h) ----------------------------------------------------------

NSA_DTYPE_BF16 = 2
NSA_PRESET_PAPER, NSA_PRESET_FLA = 0, 1


class Config(C.Structure):
    _fields_ = [(n, C.c_uint32) for n in (
        "struct_size num_q_heads num_kv_heads head_dim_qk head_dim_v dtype cmp_block cmp_stride "
        "sel_block sel_count sel_init sel_local window").split()] + [("scale", C.c_float)] + [
        (n, C.c_uint32) for n in (
            "phi phi_hidden phi_pe page_size num_layers max_seqs max_seq_len num_pages num_cmp_pages "
            "max_step_seqs max_step_tokens cpu_threads").split()]


class StepSeq(C.Structure):
    _fields_ = [("seq", C.c_uint32), ("tokens", C.c_uint32)]


class LayerIo(C.Structure):
    """nsa_layer_io_t (both backends; for CUDA the pointers are device addresses)."""
    _fields_ = [("struct_size", C.c_uint32), ("dtype", C.c_uint32), ("tokens", C.c_uint32), ("flags", C.c_uint32)] + [
        (n, C.c_void_p if n in ("q", "k", "v", "gates", "out", "selected", "phi_k", "phi_v") else C.c_size_t)
        for n in "q k v gates out selected phi_k phi_k_len phi_v phi_v_len".split()]


class Lib:
    def __init__(self, path):
        self.l = C.CDLL(path)
        l = self.l
        l.nsa_last_error.restype = C.c_char_p
        l.nsa_status_string.restype = C.c_char_p
        for f in ("nsa_config_preset nsa_config_fit_pages nsa_cache_arena_size nsa_cache_init nsa_cache_add "
                  "nsa_cache_plan_step nsa_cache_remove nsa_cuda_device_size nsa_cuda_backend_create nsa_cuda_upload_step "
                  "nsa_cuda_run_layer").split():
            getattr(l, f).restype = C.c_int32
        l.nsa_cuda_backend_create.argtypes = [C.POINTER(Config), C.c_void_p, C.c_uint64, C.c_size_t, C.POINTER(C.c_void_p)]
        l.nsa_cuda_upload_step.argtypes = [C.c_void_p, C.c_void_p, C.c_void_p]
        l.nsa_cuda_run_layer.argtypes = [C.c_void_p, C.c_void_p, C.c_uint32, C.POINTER(LayerIo), C.c_void_p]
        l.nsa_cache_plan_step.argtypes = [C.c_void_p, C.POINTER(StepSeq), C.c_uint32]
        l.nsa_cache_init.argtypes = [C.POINTER(Config), C.c_void_p, C.c_size_t, C.POINTER(C.c_void_p)]
        l.nsa_cache_add.argtypes = [C.c_void_p, C.c_uint32]
        l.nsa_cache_remove.argtypes = [C.c_void_p, C.c_uint32]

    def ok(self, status, what):
        if status != 0:
            raise RuntimeError(f"{what}: {self.l.nsa_status_string(status).decode()}: {self.l.nsa_last_error().decode()}")


class Engine:
    """A cache (host arena in a pinned torch tensor) and a CUDA backend (device buffer in a
    torch tensor): the caller, torch, owns all memory."""

    def __init__(self, lib, preset, hq, hkv, dk, dv, batch, max_len, chunk):
        self.lib, l = lib, lib.l
        c = Config()
        c.struct_size = C.sizeof(Config)
        lib.ok(l.nsa_config_preset(preset, C.byref(c)), "preset")
        c.num_q_heads, c.num_kv_heads, c.head_dim_qk, c.head_dim_v = hq, hkv, dk, dv
        c.scale = 1.0 / math.sqrt(dk)
        c.dtype = NSA_DTYPE_BF16
        c.max_seqs = c.max_step_seqs = batch
        c.max_seq_len = max_len
        c.max_step_tokens = max(chunk * batch, batch)
        lib.ok(l.nsa_config_fit_pages(C.byref(c)), "fit_pages")
        self.cfg = c
        n = C.c_size_t()
        lib.ok(l.nsa_cache_arena_size(C.byref(c), C.byref(n)), "arena size")
        self.arena = torch.zeros(n.value, dtype=torch.uint8).pin_memory()
        self.cache = C.c_void_p()
        lib.ok(l.nsa_cache_init(C.byref(c), C.c_void_p(self.arena.data_ptr()), n.value, C.byref(self.cache)), "cache init")
        lib.ok(l.nsa_cuda_device_size(C.byref(c), C.byref(n)), "device size")
        self.dev = torch.empty(n.value, dtype=torch.uint8, device="cuda")
        self.backend = C.c_void_p()
        lib.ok(l.nsa_cuda_backend_create(C.byref(c), None, self.dev.data_ptr(), n.value, C.byref(self.backend)), "backend")
        for s in range(batch):
            lib.ok(l.nsa_cache_add(self.cache, s), "add")
        self.batch = batch

    def restart(self):
        """Removes every sequence and adds it again, empty (a fresh prefill each time)."""
        l, lib = self.lib.l, self.lib
        for s in range(self.batch):
            lib.ok(l.nsa_cache_remove(self.cache, s), "remove")
            lib.ok(l.nsa_cache_add(self.cache, s), "add")

    def step(self, tokens_per_seq, q, k, v, gates, out, selected):
        l, lib = self.lib.l, self.lib
        entries = (StepSeq * self.batch)(*[StepSeq(s, tokens_per_seq) for s in range(self.batch)])
        lib.ok(l.nsa_cache_plan_step(self.cache, entries, self.batch), "plan")
        stream = C.c_void_p(torch.cuda.current_stream().cuda_stream)
        lib.ok(l.nsa_cuda_upload_step(self.backend, self.cache, stream), "upload")
        io = LayerIo(struct_size=C.sizeof(LayerIo), dtype=NSA_DTYPE_BF16, tokens=tokens_per_seq * self.batch, flags=0,
                         q=q.data_ptr() if q is not None else 0, k=k.data_ptr(), v=v.data_ptr(),
                         gates=gates.data_ptr() if gates is not None else 0, out=out.data_ptr() if out is not None else 0,
                         selected=selected.data_ptr() if selected is not None else 0, phi_k=None, phi_v=None, phi_k_len=0, phi_v_len=0)
        lib.ok(l.nsa_cuda_run_layer(self.backend, self.cache, 0, C.byref(io), stream), "run_layer")


# ---- NSA reference in torch (docs/SPEC.md), one decode query per sequence -----------------

def nsa_reference(cfg, q, K, V, gates, sel):
    """q [B, HQ, DK]; K [B, T, HKV, DK], V [B, T, HKV, DV] (the whole sequences, the
    query at position T-1); gates [B, HQ, 3]; sel [B, HKV, n] the engine's blocks.
    Returns (out [B, HQ, DV] float32, group block scores [B, HKV, nb])."""
    B, T, HKV, DK = K.shape
    HQ, G = q.shape[1], q.shape[1] // HKV
    l, d, lp, w = cfg.cmp_block, cfg.cmp_stride, cfg.sel_block, cfg.window
    qf, Kf, Vf = q.float() * cfg.scale, K.float(), V.float()
    t = T - 1
    nc = 0 if T < l else (T - l) // d + 1
    # Compressed tokens (phi = mean), stored in bf16 like the engine's pool.
    kc = Kf.unfold(1, l, d).mean(-1)[:, :nc].bfloat16().float()  # [B, nc, HKV, DK]
    vc = Vf.unfold(1, l, d).mean(-1)[:, :nc].bfloat16().float()
    qg = qf.view(B, HKV, G, DK)
    s_cmp = torch.einsum("bhgd,bchd->bhgc", qg, kc)
    p_cmp = torch.softmax(s_cmp, -1) if nc > 0 else s_cmp
    o_cmp = torch.einsum("bhgc,bchd->bhgd", p_cmp, vc) if nc > 0 else torch.zeros(B, HKV, G, V.shape[-1], device=q.device)
    # Eq. 9 overlap-centred mapping and Eq. 10 group sum: s[j] = sum_k c[k] P[(l'/d) j + k - (l/d - 1)].
    A, Bb = l // d, lp // d
    nb = t // lp + 1
    P = p_cmp.sum(2)  # [B, HKV, nc]
    scores = torch.zeros(B, HKV, nb, device=q.device)
    for k in range(A + Bb - 1):
        ck = sum(1 for a in range(A) for b in range(Bb) if a + b == k)
        idx = torch.arange(nb, device=q.device) * Bb + k - (A - 1)
        ok = (idx >= 0) & (idx < nc)
        scores[:, :, ok] += ck * P[:, :, idx[ok]]
    # Forced blocks (step 4): the first n_init and the last n_local candidates score +inf.
    scores[:, :, :cfg.sel_init] = float("inf")
    scores[:, :, max(0, nb - cfg.sel_local):] = float("inf")
    # Selected blocks (the engine's) and the window, as masks over positions 0..t.
    pos = torch.arange(T, device=q.device)
    blk = pos // lp
    sel_mask = torch.zeros(B, HKV, T, dtype=torch.bool, device=q.device)
    for j in range(sel.shape[-1]):
        sj = sel[:, :, j:j + 1].long()
        sel_mask |= (blk.view(1, 1, T) == sj) & (sj >= 0)
    win_mask = (pos > t - w).view(1, 1, T).expand(B, HKV, T)

    def masked(mask):
        s = torch.einsum("bhgd,bthd->bhgt", qg, Kf).masked_fill(~mask.unsqueeze(2), float("-inf"))
        return torch.einsum("bhgt,bthd->bhgd", torch.softmax(s, -1), Vf)

    o = gates[..., 0].view(B, HKV, G, 1) * o_cmp + gates[..., 1].view(B, HKV, G, 1) * masked(sel_mask) + \
        gates[..., 2].view(B, HKV, G, 1) * masked(win_mask)
    return o.reshape(B, HQ, -1), scores


def time_ms(fn, reps, warmup=3, setup=None):
    """Median milliseconds of fn(i) on the current stream (CUDA events); setup(i), if
    given, runs on the host before each call, outside the events."""
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for _ in range(warmup):
        if setup:
            setup(0)
        fn(0)
    for i, (a, b) in enumerate(ev):
        if setup:
            setup(i)
        a.record()
        fn(i)
        b.record()
    torch.cuda.synchronize()
    ts = sorted(a.elapsed_time(b) for a, b in ev)
    return ts[len(ts) // 2]


def check(out, ref, scores, sel, n):
    """Relative error of the engine's output against the reference, and the gap between
    the group scores of the engine's selected blocks and the best set's. sel [B, HKV, n]."""
    err = ((out.float() - ref).norm() / ref.norm()).item()
    chosen = torch.gather(scores, 2, sel.long().clamp(min=0)).masked_fill(sel < 0, 0)
    finite = lambda x: torch.where(torch.isinf(x), torch.zeros_like(x), x)
    best_vals = scores.topk(min(n, scores.shape[-1]), -1).values
    # Same number of forced (+inf) blocks, and the rest scoring as the best set.
    assert (torch.isinf(best_vals).sum(-1) == torch.isinf(chosen).sum(-1)).all(), "forced blocks missing"
    gap = (finite(best_vals).sum(-1) - finite(chosen).sum(-1)).abs().max().item()
    assert not torch.isnan(out).any(), "unwritten outputs"
    return err, gap


def sdpa_ms(q, k, v, reps, causal=False, warmup=3, repeat_kv=False):
    """Median milliseconds of SDPA (q [B, HQ, Tq, D], k/v [B, HKV, T, D]) under the cuDNN and
    flash backends, NaN where a backend refuses; and per backend how K/V went in ("gqa",
    or "repeated": with repeat_kv, a backend that refuses GQA gets K/V repeated to HQ
    heads, more bytes for the same FLOPs, so only for compute-bound prefill)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    ms, kv = {}, {}
    g = q.shape[1] // k.shape[1]
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        ms[name], kv[name] = float("nan"), None
        for gqa in (True, False) if repeat_kv else (True,):
            try:
                kk, vv = (k, v) if gqa else (k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))
                with sdpa_kernel(be):
                    ms[name] = time_ms(lambda i: F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, enable_gqa=gqa),
                                       reps, warmup)
                kv[name] = "gqa" if gqa else "repeated"
                break
            except Exception as ex:  # a backend may refuse the shape
                print(f"  {name}{'' if gqa else ' (K/V repeated)'}: {ex}", file=sys.stderr)
    return ms, kv


PREFILL_REPS, PREFILL_WARMUP, PREFILL_CHECK_ROWS = 3, 1, 4


def prefill_row(lib, a, preset, hq, hkv, dk, dv, T):
    """The engine's prefill of T tokens in one step vs causal SDPA; the last query rows
    checked against the reference (cheap: one query each, given the engine's blocks)."""
    bf = torch.bfloat16
    e = Engine(lib, preset, hq, hkv, dk, dv, 1, T, T)
    n = e.cfg.sel_count
    q = torch.randn(T, hq, dk, device="cuda", dtype=bf) * 2
    K = torch.randn(T, hkv, dk, device="cuda", dtype=bf)
    V = torch.randn(T, hkv, dv, device="cuda", dtype=bf)
    gates = torch.rand(T, hq, 3, device="cuda", dtype=torch.float32)
    out = torch.full((T, hq, dv), float("nan"), device="cuda", dtype=bf)
    sel = torch.full((T, hkv, n), -7, device="cuda", dtype=torch.int32)
    # The checked run (also a warm-up), then the timed ones, a fresh sequence each.
    e.step(T, q, K, V, gates, out, sel)
    torch.cuda.synchronize()
    errs, gaps = [], []
    for r in range(max(0, T - PREFILL_CHECK_ROWS), T):
        ref, scores = nsa_reference(e.cfg, q[r:r + 1], K[None, :r + 1], V[None, :r + 1], gates[r:r + 1], sel[r:r + 1])
        err, gap = check(out[r:r + 1], ref, scores, sel[r:r + 1], n)
        errs.append(err)
        gaps.append(gap)
    assert not torch.isnan(out).any(), "unwritten prefill outputs"
    t_nsa = time_ms(lambda i: e.step(T, q, K, V, gates, out, None), PREFILL_REPS, PREFILL_WARMUP, setup=lambda i: e.restart())
    del e
    # SDPA layout [B, H, T, D], same values.
    q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, K, V))
    res, kv = sdpa_ms(q4, k4, v4, PREFILL_REPS, causal=True, warmup=PREFILL_WARMUP, repeat_kv=True)
    return dict(preset=a.preset, tokens=T, nsa_ms=t_nsa, cudnn_ms=res["cudnn"], flash_ms=res["flash"],
                rel_err=max(errs), sel_score_gap=max(gaps), checked_rows=len(errs), sdpa_kv=kv)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default="target/release/libnsa.so")
    ap.add_argument("--contexts", default="8192,65536")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--preset", default="paper", choices=["paper", "fla"])
    ap.add_argument("--shape", default="64,4,128,128")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--prefill", default="8192,16384,32768,65536",
                    help="prefill lengths, each one fresh sequence in one step ('none' or empty: skip)")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.manual_seed(0)
    lib = Lib(a.lib)
    hq, hkv, dk, dv = map(int, a.shape.split(","))
    preset = NSA_PRESET_PAPER if a.preset == "paper" else NSA_PRESET_FLA
    rows = []
    bf = torch.bfloat16
    for T in map(int, a.contexts.split(",")):
        for B in map(int, a.batches.split(",")):
            chunk = 4096
            e = Engine(lib, preset, hq, hkv, dk, dv, B, T + a.reps + 8, chunk)
            n = e.cfg.sel_count
            K = torch.randn(B, T, hkv, dk, device="cuda", dtype=bf)
            V = torch.randn(B, T, hkv, dv, device="cuda", dtype=bf)
            for s in range(0, T, chunk):
                c = min(chunk, T - s)
                kk = K[:, s:s + c].contiguous()
                vv = V[:, s:s + c].contiguous()
                e.step(c, None, kk, vv, None, None, None)  # append only (q = 0)
            # One checked decode step.
            q = torch.randn(B, hq, dk, device="cuda", dtype=bf) * 2
            kn = torch.randn(B, 1, hkv, dk, device="cuda", dtype=bf)
            vn = torch.randn(B, 1, hkv, dv, device="cuda", dtype=bf)
            gates = torch.rand(B, hq, 3, device="cuda", dtype=torch.float32)
            out = torch.full((B, hq, dv), float("nan"), device="cuda", dtype=bf)
            sel = torch.full((B, hkv, n), -7, device="cuda", dtype=torch.int32)
            e.step(1, q, kn, vn, gates, out, sel)
            torch.cuda.synchronize()
            K = torch.cat([K, kn], 1)
            V = torch.cat([V, vn], 1)
            ref, scores = nsa_reference(e.cfg, q, K, V, gates, sel)
            err, gap = check(out, ref, scores, sel, n)
            # Timing: decode steps of NSA (plan + upload + layer) vs SDPA over the same K/V.
            qs = [torch.randn(B, hq, dk, device="cuda", dtype=bf) for _ in range(4)]

            def nsa_step(i):
                e.step(1, qs[i % 4], kn, vn, gates, out, None)

            t_nsa = time_ms(nsa_step, a.reps)
            Kt = K.transpose(1, 2).contiguous()  # [B, HKV, T, DK]
            Vt = V.transpose(1, 2).contiguous()
            q4 = qs[0].view(B, hq, 1, dk)
            res, _ = sdpa_ms(q4, Kt, Vt, a.reps)
            row = dict(preset=a.preset, batch=B, context=T, nsa_us=t_nsa * 1e3, cudnn_us=res["cudnn"] * 1e3,
                       flash_us=res["flash"] * 1e3, rel_err=err, sel_score_gap=gap)
            rows.append(row)
            print(f"  done {row}", file=sys.stderr)
            del e
    prows = []
    for T in ([] if a.prefill.strip() in ("", "none") else map(int, a.prefill.split(","))):
        row = prefill_row(lib, a, preset, hq, hkv, dk, dv, T)
        prows.append(row)
        print(f"  done {row}", file=sys.stderr)
        torch.cuda.empty_cache()
    print("| preset | batch | context | NSA us | cuDNN us | flash us | cuDNN/NSA | rel err vs torch ref | selection score gap |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['batch']} | {r['context']} | {r['nsa_us']:.1f} | {r['cudnn_us']:.1f} | {r['flash_us']:.1f} | "
              f"{r['cudnn_us'] / r['nsa_us']:.1f}x | {r['rel_err']:.2e} | {r['sel_score_gap']:.1e} |")
    if prows:
        print(f"\nprefill, {a.preset} {a.shape.replace(',', '/')}, one sequence, all tokens in one step "
              f"(rel err and gap over the last {PREFILL_CHECK_ROWS} query rows)\n")
        print("| preset | tokens | NSA ms | cuDNN ms | flash ms | cuDNN/NSA | rel err vs torch ref | selection score gap |")
        print("|---|---|---|---|---|---|---|---|")
        for r in prows:
            print(f"| {r['preset']} | {r['tokens']} | {r['nsa_ms']:.2f} | {r['cudnn_ms']:.2f} | {r['flash_ms']:.2f} | "
                  f"{r['cudnn_ms'] / r['nsa_ms']:.2f}x | {r['rel_err']:.2e} | {r['sel_score_gap']:.1e} |")
    bad = [r for r in rows + prows if not (r["rel_err"] < 2e-2 and r["sel_score_gap"] < 1e-2)]
    if a.json:
        # The record names its GPU as the driver reports it, the UTC time and the build
        # (NSA_BENCH_COMMIT, else commit.txt beside the library, as nsa-bench does).
        commit = os.environ.get("NSA_BENCH_COMMIT", "").strip()
        if not commit:
            try:
                commit = open(os.path.join(os.path.dirname(os.path.abspath(a.lib)), "commit.txt")).read().strip()
            except OSError:
                commit = "unknown"
        run = {"machine": f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})",
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit or "unknown"}
        json.dump({"run": run, "decode": rows, "prefill": prows}, open(a.json, "w"), indent=1)
    if bad:
        print(f"FAILED: {bad}")
        sys.exit(1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Stand-alone check and timing of the prefill kernels (kernels/prefill.cu) on a GPU.

Runs on the GPU machine with PyTorch and CuPy (no Rust build needed): compiles the
kernel sources with NVRTC through CuPy, builds a paged cache of random K/V for one
sequence (pages in shuffled order, unused pool rows poisoned with NaN), runs the two
prefill launches over a whole prefill, and

- checks sampled positions against a float32 PyTorch reference written from docs/SPEC.md
  (selection compared by score: the chosen set's score sum against the best set's; the
  output compared given the kernel's own selection);
- times the two launches (CUDA events, median) against PyTorch SDPA full causal
  attention (cuDNN / flash) on the same shape in the same process.

Usage: python3 scripts/pf_harness.py [--quick] [--out FILE.json]
Prints a table last.
"""
import argparse, json, math, os, sys, time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kernel_sources():
    order = os.environ.get("PF_SOURCES")
    if order:
        files = order.split(",")
    else:
        files = ["kernels/nsa.cu", "kernels/wgmma.cuh", "kernels/prefill.cu"]
    return "\n".join(open(os.path.join(ROOT, f)).read() for f in files)


class Cfg:
    def __init__(self, hq=64, hkv=4, dk=128, dv=128, l=32, d=16, lp=64, n=16, n_init=1, n_local=2, w=512, page=64):
        self.hq, self.hkv, self.dk, self.dv = hq, hkv, dk, dv
        self.g = hq // hkv
        self.l, self.d, self.lp, self.n, self.n_init, self.n_local, self.w, self.page = l, d, lp, n, n_init, n_local, w, page
        self.scale = 1.0 / math.sqrt(dk)

    def num_cmp(self, length):
        return 0 if length < self.l else (length - self.l) // self.d + 1

    def name(self):
        return f"{self.hq}q/{self.hkv}kv {self.dk}/{self.dv} l={self.l} d={self.d} l'={self.lp}"


def overlap(k, A, B):
    lo = max(0, k - (B - 1))
    hi = min(k, A - 1)
    return hi - lo + 1 if hi >= lo else 0


class Problem:
    """One sequence of T tokens, prefilled in one step."""

    def __init__(self, c, T, seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        dt = torch.bfloat16
        self.c, self.T = c, T
        dev = "cuda"
        self.q = torch.randn(T, c.hq, c.dk, device=dev, generator=g).to(dt)
        self.k = torch.randn(T, c.hkv, c.dk, device=dev, generator=g).to(dt)
        self.v = torch.randn(T, c.hkv, c.dv, device=dev, generator=g).to(dt)
        self.gates = torch.rand(T, c.hq, 3, device=dev, generator=g).float()
        nc = c.num_cmp(T)
        self.nc = nc
        # phi = mean over l rows, in f32, stored in the pool dtype (as the engine's append does).
        idx = torch.arange(nc, device=dev)[:, None] * c.d + torch.arange(c.l, device=dev)[None, :]
        self.kc = self.k.float()[idx].mean(1).to(dt) if nc else torch.zeros(0, c.hkv, c.dk, device=dev, dtype=dt)
        self.vc = self.v.float()[idx].mean(1).to(dt) if nc else torch.zeros(0, c.hkv, c.dv, device=dev, dtype=dt)
        P = c.page
        npages = (T + P - 1) // P
        ncpages = max(1, (nc + P - 1) // P)
        perm = torch.randperm(npages + 3, generator=torch.Generator().manual_seed(seed))[:npages]
        cperm = torch.randperm(ncpages + 2, generator=torch.Generator().manual_seed(seed + 1))[:ncpages]
        self.raw_tab = perm.int().cuda()
        self.cmp_tab = cperm.int().cuda()
        nan = float("nan")
        self.raw_k = torch.full((npages + 3, c.hkv, P, c.dk), nan, device=dev, dtype=dt)
        self.raw_v = torch.full((npages + 3, c.hkv, P, c.dv), nan, device=dev, dtype=dt)
        self.cmp_k = torch.full((ncpages + 2, c.hkv, P, c.dk), nan, device=dev, dtype=dt)
        self.cmp_v = torch.full((ncpages + 2, c.hkv, P, c.dv), nan, device=dev, dtype=dt)
        for j in range(npages):
            n_ = min(P, T - j * P)
            self.raw_k[perm[j], :, :n_] = self.k[j * P:j * P + n_].transpose(0, 1)
            self.raw_v[perm[j], :, :n_] = self.v[j * P:j * P + n_].transpose(0, 1)
        for j in range(ncpages):
            n_ = min(P, nc - j * P)
            if n_ > 0:
                self.cmp_k[cperm[j], :, :n_] = self.kc[j * P:j * P + n_].transpose(0, 1)
                self.cmp_v[cperm[j], :, :n_] = self.vc[j * P:j * P + n_].transpose(0, 1)
        self.out = torch.empty(T, c.hq, c.dv, device=dev, dtype=dt)
        self.sel = torch.empty(T, c.hkv, c.n, device=dev, dtype=torch.int32)


class Kernels:
    """NVRTC (ctypes) -> CUBIN -> driver module (ctypes), in torch's current context."""

    def __init__(self, arch):
        import ctypes
        self.ct = ctypes
        nv = ctypes.CDLL(os.environ.get("NVRTC_LIB", "libnvrtc.so.13"))
        cu = ctypes.CDLL("libcuda.so.1")
        self.cu = cu
        src = kernel_sources().encode()
        t0 = time.time()
        prog = ctypes.c_void_p()
        assert nv.nvrtcCreateProgram(ctypes.byref(prog), src, b"nsa.cu", 0, None, None) == 0
        opts = [b"-std=c++17", b"--fmad=true", b"-default-device", b"-lineinfo", b"--gpu-architecture=" + arch.encode()]
        rc = nv.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        n = ctypes.c_size_t()
        nv.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        nv.nvrtcGetProgramLog(prog, log)
        if rc != 0:
            print(log.value.decode(errors="replace"))
            raise SystemExit("NVRTC compile failed")
        nv.nvrtcGetCUBINSize(prog, ctypes.byref(n))
        self.cubin = ctypes.create_string_buffer(n.value)
        nv.nvrtcGetCUBIN(prog, self.cubin)
        self.compile_s = time.time() - t0
        torch.zeros(1, device="cuda")  # make torch's primary context current
        self.mod = ctypes.c_void_p()
        self.chk(cu.cuModuleLoadData(ctypes.byref(self.mod), self.cubin), "cuModuleLoadData")
        self.fns = {}

    def chk(self, rc, what):
        if rc != 0:
            raise RuntimeError(f"{what} failed: CUresult {rc}")

    def fn(self, name):
        if name not in self.fns:
            f = self.ct.c_void_p()
            self.chk(self.cu.cuModuleGetFunction(self.ct.byref(f), self.mod, name.encode()), "cuModuleGetFunction " + name)
            self.fns[name] = f
        return self.fns[name]

    def set_smem(self, f, nbytes):
        # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
        self.chk(self.cu.cuFuncSetAttribute(f, 8, self.ct.c_int(nbytes)), "cuFuncSetAttribute")

    def launch(self, f, grid, block, smem, params):
        ct = self.ct
        buf = ct.create_string_buffer(params, len(params))
        argv = (ct.c_void_p * 1)(ct.addressof(buf))
        stream = ct.c_void_p(torch.cuda.current_stream().cuda_stream)
        self.chk(self.cu.cuLaunchKernel(f, grid[0], grid[1], grid[2], block[0], block[1], block[2], smem, stream,
                                        argv, None), "cuLaunchKernel")


PARAM_FIELDS = ["q", "gates", "out", "sel", "raw_k", "raw_v", "cmp_k", "cmp_v", "raw_tab", "cmp_tab", "tiles"]


def make_params(pr, tiles, nblk, v_desc=(8192, 1024)):
    import numpy as np
    c = pr.c
    ptrs = [pr.q, pr.gates, pr.out, pr.sel, pr.raw_k, pr.raw_v, pr.cmp_k, pr.cmp_v, pr.raw_tab, pr.cmp_tab, tiles]
    u64 = np.array([t.data_ptr() for t in ptrs], dtype=np.uint64)
    ints = np.array([c.hq, c.hkv, c.g, c.page, pr.raw_tab.numel(), pr.cmp_tab.numel(), c.l, c.d, c.lp, c.n,
                     c.n_init, c.n_local, c.w, nblk], dtype=np.int32)
    f = np.array([c.scale], dtype=np.float32)
    raw = u64.tobytes() + ints.tobytes() + f.tobytes() + np.array(v_desc, dtype=np.int32).tobytes()
    raw += b"\0" * ((-len(raw)) % 8)
    return raw


class Launcher:
    SMEM_MAX = 227 * 1024

    def __init__(self, ker, pr, warps=8, ns_cmp=2, ns_sw=2, mma="mma", v_desc=(8192, 1024)):
        c = pr.c
        self.ker, self.pr = ker, pr
        G = c.g
        pw = 16 // G
        self.warps = warps
        tp = warps * pw
        T = pr.T
        tl = []
        for r in range(0, T, tp):
            tl.append([0, r, r, min(tp, T - r)])
        self.ntiles = len(tl)
        self.tiles = torch.tensor(tl, dtype=torch.int32, device="cuda")
        self.nblk = (T - 1) // c.lp + 1
        self.params = make_params(pr, self.tiles, self.nblk, v_desc)
        self.mma = mma
        if mma == "wg":
            stage = 64 * c.dk * 2 + 64 * c.dv * 2
            qb = warps * 16 * c.dk * 2
        else:
            stage = 64 * (c.dk + 8) * 2 + 64 * (c.dv + 8) * 2
            qb = 0
        smem_cmp = lambda ns: 1024 + qb + ns * stage + warps * pw * 64 * 4 + warps * pw * self.nblk * 4 + self.nblk * 4
        accb = 0 if mma == "wg" else warps * c.dv * 16 * 4  # Wgmma keeps the partial output in registers
        smem_sw = lambda ns: (1024 + qb + ns * stage + accb + self.nblk * 8
                              + (self.nblk * (c.lp // 64) + c.w // 64 + 4) * 4)
        if mma == "mma":
            ns_cmp = ns_sw = 2
        while ns_cmp > 2 and smem_cmp(ns_cmp) > self.SMEM_MAX:
            ns_cmp -= 1
        while ns_sw > 2 and smem_sw(ns_sw) > self.SMEM_MAX:
            ns_sw -= 1
        if smem_cmp(ns_cmp) > self.SMEM_MAX or smem_sw(ns_sw) > self.SMEM_MAX:
            raise ValueError(f"shared memory {smem_cmp(ns_cmp)} / {smem_sw(ns_sw)} over the limit")
        self.ns = (ns_cmp, ns_sw)
        self.smem_cmp, self.smem_sw = smem_cmp(ns_cmp), smem_sw(ns_sw)
        suf = f"{mma}_bf16_{c.dk}_{c.dv}"
        self.fcmp = ker.fn(f"nsa_pf_cmp_{suf}_s{ns_cmp}")
        self.fsw = ker.fn(f"nsa_pf_sw_{suf}_s{ns_sw}")
        for f, s in ((self.fcmp, self.smem_cmp), (self.fsw, self.smem_sw)):
            ker.set_smem(f, s)

    def run(self, which="both"):
        grid = (self.ntiles, self.pr.c.hkv, 1)
        block = (32 * self.warps, 1, 1)
        if which in ("both", "cmp"):
            self.ker.launch(self.fcmp, grid, block, self.smem_cmp, self.params)
        if which in ("both", "sw"):
            self.ker.launch(self.fsw, grid, block, self.smem_sw, self.params)


def reference_rows(pr, positions, sel_gpu):
    """Reference output rows [len(positions), HQ, DV] (f32) given the GPU's selection, the
    reference selection, and the score gap of the GPU's choice."""
    c = pr.c
    G = c.g
    A, B = c.l // c.d, c.lp // c.d
    kf, vf = pr.k.float(), pr.v.float()
    kcf, vcf = pr.kc.float(), pr.vc.float()
    outs, gaps, exact = [], [], 0
    for t in positions:
        qt = pr.q[t].float()  # [HQ, DK]
        nc = c.num_cmp(t + 1)
        o = torch.zeros(c.hq, c.dv, device="cuda")
        b = t // c.lp
        for kvh in range(c.hkv):
            qh = qt[kvh * G:(kvh + 1) * G]
            gt = pr.gates[t, kvh * G:(kvh + 1) * G]
            # compressed
            if nc > 0:
                lg = qh @ kcf[:nc, kvh].T * c.scale
                pc = torch.softmax(lg, -1)
                ocmp = pc @ vcf[:nc, kvh]
                psum = pc.sum(0)
            else:
                ocmp = torch.zeros(G, c.dv, device="cuda")
                psum = torch.zeros(0, device="cuda")
            # Eq. 9 block scores
            sc = torch.zeros(b + 1, device="cuda", dtype=torch.float64)
            ps64 = psum.double()
            for k in range(A + B - 1):
                w = overlap(k, A, B)
                if w == 0:
                    continue
                ii = torch.arange(b + 1, device="cuda") * B - (A - 1) + k
                ok = (ii >= 0) & (ii < nc)
                sc += torch.where(ok, w * ps64[ii.clamp(0, max(nc - 1, 0))] if nc > 0 else torch.zeros_like(sc), torch.zeros_like(sc))
            forced = torch.zeros(b + 1, dtype=torch.bool, device="cuda")
            forced[:min(c.n_init, b + 1)] = True
            forced[max(0, b - c.n_local + 1):] = True
            scf = torch.where(forced, torch.full_like(sc, float("inf")), sc)
            cnt = min(c.n, b + 1)
            # ties to the lower index: stable sort on -score
            order = torch.sort(-scf, stable=True).indices[:cnt]
            ref_set = sorted(order.tolist())
            gsel = [j for j in sel_gpu[t, kvh].tolist() if j >= 0]
            if gsel == ref_set:
                exact += 1
                gap = 0.0
            else:
                fin = torch.where(forced, torch.zeros_like(sc), sc)
                best = fin[ref_set].sum().item()
                got = fin[[j for j in gsel if j <= b]].sum().item() if gsel else 0.0
                bad_forced = any(not forced[j] for j in ref_set if forced[j]) or not all(
                    (j in gsel) for j in range(b + 1) if forced[j])
                gap = (best - got) / max(best, 1e-30) if not bad_forced else float("inf")
                if len(gsel) != cnt:
                    gap = float("inf")
            gaps.append(gap)
            # selected, with the GPU's blocks
            keys = [p for j in gsel for p in range(j * c.lp, min((j + 1) * c.lp, t + 1))]
            kk = torch.tensor(keys, device="cuda", dtype=torch.long)
            ls = qh @ kf[kk, kvh].T * c.scale
            oslc = torch.softmax(ls, -1) @ vf[kk, kvh]
            lo = max(0, t - c.w + 1)
            lw = qh @ kf[lo:t + 1, kvh].T * c.scale
            owin = torch.softmax(lw, -1) @ vf[lo:t + 1, kvh]
            o[kvh * G:(kvh + 1) * G] = gt[:, 0:1] * ocmp + gt[:, 1:2] * oslc + gt[:, 2:3] * owin
        outs.append(o)
    return torch.stack(outs), gaps, exact


def check(pr, launcher, positions):
    pr.out.fill_(float("nan"))
    pr.sel.fill_(-7)
    launcher.run()
    torch.cuda.synchronize()
    sel = pr.sel.cpu()
    ref, gaps, exact = reference_rows(pr, positions, sel)
    got = pr.out[positions].float()
    err = ((got - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6)).max().item()
    unwritten = torch.isnan(pr.out).any().item()
    # How much neighbouring positions share: distinct selected blocks per thread block tile.
    tp = launcher.warps * (16 // pr.c.g)
    us = []
    for r0 in range(0, pr.T, tp):
        s_ = sel[r0:r0 + tp]
        for h in range(pr.c.hkv):
            v = s_[:, h].flatten()
            us.append(len(set(v[v >= 0].tolist())))
    return {
        "union_per_tile": sum(us) / len(us),
        "max_rel_err": err,
        "max_score_gap": max(gaps) if gaps else 0.0,
        "exact_sel": exact,
        "groups": len(gaps),
        "unwritten": bool(unwritten),
        "sel_bad": int((sel == -7).sum().item()),
    }


def time_fn(fn, reps=10, warm=2):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def nsa_flops(c, T):
    """QK + PV FLOPs of the three branches over a fresh prefill (as nsa-bench counts: one
    pass over the compressed keys; selected keys an upper bound)."""
    tot = 0.0
    for t in range(0, T, 64):  # sample every 64th position, scale
        nc = c.num_cmp(t + 1)
        sel = min(c.n * c.lp, t + 1)
        win = min(c.w, t + 1)
        tot += (nc * (c.dk + c.dv) + sel * (c.dk + c.dv) + win * (c.dk + c.dv)) * 2 * c.hq * 64
    return tot


def sdpa_time(c, T, backend):
    """Full causal attention of the same shape through PyTorch SDPA; K/V passed as GQA,
    or repeated to every query head where the backend refuses GQA; NaN if it refuses both."""
    q = torch.randn(1, c.hq, T, c.dk, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, c.hkv, T, c.dk, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, c.hkv, T, c.dv, device="cuda", dtype=torch.bfloat16)
    from torch.nn.attention import sdpa_kernel, SDPBackend
    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    for gqa in (True, False):
        kk, vv = (k, v) if gqa else (k.repeat_interleave(c.g, 1), v.repeat_interleave(c.g, 1))
        try:
            with sdpa_kernel([be]):
                f = lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
                return time_fn(f, reps=5, warm=1)
        except Exception:  # noqa: BLE001 - a backend that refuses the shape
            continue
    return float("nan")


V_DESC = (8192, 1024)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", default=None, metavar="MMA,WARPS,NS,T",
                    help="only launch both kernels twice for one variant (for ncu), e.g. wg,4,2,16384")
    args = ap.parse_args()
    dev = torch.cuda.get_device_properties(0)
    arch = "sm_%d%d" % (dev.major, dev.minor) + ("a" if dev.major == 9 else "")
    ker = Kernels(arch)
    print(f"GPU {dev.name}, arch {arch}, NVRTC compile {ker.compile_s:.1f}s", flush=True)
    if args.profile:
        mm, w, ns, T = args.profile.split(",")
        pr = Problem(Cfg(), int(T), seed=1)
        L = Launcher(ker, pr, warps=int(w), ns_cmp=int(ns), ns_sw=int(ns), mma=mm)
        for _ in range(2):
            L.run()
        torch.cuda.synchronize()
        return
    rows = []
    # correctness cases: (cfg, T)
    WG = {"mma": "wg", "ns_cmp": 3, "ns_sw": 3}
    cases = [
        (Cfg(), 1000, {}),
        (Cfg(), 4096 + 37, {"mma": "mma"}),
        (Cfg(), 4096 + 37, dict(WG, v_desc=(8192, 1024))),
        (Cfg(), 4096 + 37, dict(WG, v_desc=(1024, 8192))),
        (Cfg(), 3001, {"warps": 4, "mma": "wg", "ns_cmp": 3, "ns_sw": 3}),
        (Cfg(hq=32, hkv=4), 3000, WG),  # G = 8
        (Cfg(hq=16, hkv=4), 2500, WG),  # G = 4
        (Cfg(dk=192, dv=128), 3000, WG),
        (Cfg(l=64, d=64, lp=64), 3000, WG),  # fla preset
        (Cfg(hq=8, hkv=2, dk=64, dv=64), 2000, WG),
        (Cfg(hq=8, hkv=2, dk=64, dv=64), 2000, {"mma": "mma"}),
    ]
    global V_DESC
    validated = False
    for c, T, kw in cases:
        if "v_desc" in kw and validated:
            continue  # a descriptor probe after one already passed: a wrong one may fault
        pr = Problem(c, T, seed=T)
        if kw.get("mma") == "wg" and "v_desc" not in kw:
            kw = dict(kw, v_desc=V_DESC)
        L = Launcher(ker, pr, **kw)
        pos = sorted(set([0, 1, 15, 31, 32, 47, 63, 64, 65, 127, 511, 512, 513, T - 1, T - 2] +
                         torch.randint(0, T, (24,), generator=torch.Generator().manual_seed(T)).tolist()))
        pos = [p for p in pos if p < T]
        r = check(pr, L, pos)
        r.update({"case": c.name(), "T": T, "launch": kw})
        rows.append(r)
        print("CHECK", json.dumps(r), flush=True)
        if kw.get("mma") == "wg" and r["max_rel_err"] < 2e-2 and r["exact_sel"] == r["groups"]:
            V_DESC = tuple(kw["v_desc"])
            validated = validated or "v_desc" in kw
        del pr, L
        torch.cuda.empty_cache()
    print("V descriptor (lbo, sbo):", V_DESC, flush=True)
    perf = []
    sizes = [8192, 16384] if args.quick else [8192, 16384, 32768, 65536]
    shapes = [Cfg()] + ([] if args.quick else [Cfg(hq=64, hkv=8), Cfg(hq=64, hkv=16), Cfg(dk=192, dv=128), Cfg(l=64, d=64, lp=64)])
    variants = [("mma", 8, 2, 2), ("wg", 8, 2, 2), ("wg", 4, 2, 2), ("wg", 8, 3, 3)]
    for c in shapes:
        for T in sizes:
            if c is not shapes[0] and T != 65536:
                continue
            pr = Problem(c, T, seed=1)
            vlist = variants if (c is shapes[0] and T == 65536) else variants[1:3]
            cud = sdpa_time(c, T, "cudnn") if c is shapes[0] else float("nan")
            fla = sdpa_time(c, T, "flash") if c is shapes[0] and T <= 32768 else float("nan")
            for (mm, w, nc_, ns_) in vlist:
                try:
                    L = Launcher(ker, pr, warps=w, ns_cmp=nc_, ns_sw=ns_, mma=mm, v_desc=V_DESC)
                except ValueError as e:
                    print("SKIP", mm, w, nc_, ns_, e)
                    continue
                t_all = time_fn(lambda: L.run("both"), reps=5)
                t_cmp = time_fn(lambda: L.run("cmp"), reps=5)
                t_sw = t_all - t_cmp
                # The window alone: pf_sw with an empty selection.
                sel_keep = pr.sel.clone()
                pr.sel.fill_(-1)
                t_win = time_fn(lambda: L.run("sw"), reps=5)
                pr.sel.copy_(sel_keep)
                fl = nsa_flops(c, T)
                p = {"case": c.name(), "T": T, "mma": mm, "warps": w, "stages": list(L.ns), "nsa_ms": t_all, "cmp_sel_ms": t_cmp,
                     "sel_win_ms": t_sw, "win_ms": t_win, "tflops": fl / t_all * 1e-9, "cudnn_ms": cud, "flash_ms": fla,
                     "floor_ms": fl / 703e12 * 1e3}
                perf.append(p)
                print("PERF", json.dumps(p), flush=True)
                del L
            del pr
            torch.cuda.empty_cache()
    print("\n| case | T | max_rel_err | score gap | exact sel | unwritten | distinct blocks per tile |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['T']} | {r['max_rel_err']:.2e} | {r['max_score_gap']:.1e} | {r['exact_sel']}/{r['groups']} | {r['unwritten'] or r['sel_bad']} | {r['union_per_tile']:.1f} |")
    print("\n| case | T | mma | warps |  stages | NSA ms | cmp+sel ms | sel+win ms | win ms | TFLOP/s | cuDNN full ms | flash full ms | cuDNN/NSA | floor ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for p in perf:
        print(f"| {p['case']} | {p['T']} | {p['mma']} | {p['warps']} | {p['stages']} | {p['nsa_ms']:.2f} | {p['cmp_sel_ms']:.2f} | {p['sel_win_ms']:.2f} | {p['win_ms']:.2f} | {p['tflops']:.0f} | {p['cudnn_ms']:.2f} | {p['flash_ms']:.2f} | {p['cudnn_ms'] / p['nsa_ms']:.2f} | {p['floor_ms']:.2f} |")
    if args.out:
        json.dump({"gpu": dev.name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "checks": rows, "perf": perf},
                  open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()

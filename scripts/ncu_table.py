#!/usr/bin/env python3
"""One row per kernel from Nsight Compute's text report (ncu's default output).

Reads the report on stdin (or the files named) and prints a markdown table: kernel, grid,
block, duration, DRAM throughput, SM-active and elapsed cycles, instructions per warp and
cycles between a warp's instructions. Rows need the SpeedOfLight section; the other
columns appear when the report has InstructionStats, LaunchStats and WarpStateStats
(scripts/gpu-profile.sh asks for all four). Missing values print as "-".

Why these columns: at small batch the decode kernels are neither memory- nor
tensor-bound; instructions per warp times cycles per instruction is their time
(docs/DECODE_NOTES.md), so the table shows where a launch's microseconds go.
"""
import re
import sys

HEADER = re.compile(r"^\s{2}(\S+) \((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\)")
# "    Metric Name      unit      value" lines of the sections asked for.
WANTED = {
    "Duration": "duration",
    "DRAM Throughput": "dram",
    "Elapsed Cycles": "elapsed",
    "SM Active Cycles": "active",
    "Executed Instructions": "inst",
    "Warp Cycles Per Issued Instruction": "cpi",
}


def parse(lines):
    rows, cur = [], None
    for line in lines:
        m = HEADER.match(line)
        if m:
            name, gx, gy, gz, bx, by, bz = m.groups()
            cur = {"kernel": name, "grid": f"{gx}x{gy}x{gz}", "threads": int(bx) * int(by) * int(bz),
                   "blocks": int(gx) * int(gy) * int(gz)}
            rows.append(cur)
            continue
        if cur is None:
            continue
        for label, key in WANTED.items():
            # The label, then an optional unit, then the value (thousands with commas).
            m = re.match(r"^\s+" + re.escape(label) + r"\s+(?:\S+\s+)?([\d,]+(?:\.\d+)?)\s*$", line)
            if m and key not in cur:
                cur[key] = float(m.group(1).replace(",", ""))
    return rows


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(rows):
    out = ["| kernel | grid | block | duration us | DRAM % | SM active / elapsed cycles | inst per warp | cycles per inst |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        warps = r["blocks"] * ((r["threads"] + 31) // 32)
        ipw = r["inst"] / warps if "inst" in r and warps else None
        act = f"{fmt(r.get('active'), ',.0f')} / {fmt(r.get('elapsed'), ',.0f')}"
        out.append(f"| {r['kernel']} | {r['grid']} | {r['threads']} | {fmt(r.get('duration'), '.2f')} | "
                   f"{fmt(r.get('dram'), '.1f')} | {act} | {fmt(ipw, ',.0f')} | {fmt(r.get('cpi'), '.1f')} |")
    return "\n".join(out)


# Two kernels as ncu 2025.3 prints them (abridged from an H200 report of 2026-11-30).
SAMPLE = """
  nsa_cmp_mma_bf16_16 (1, 4, 64)x(128, 1, 1), Context 1, Stream 13, Device 0, CC 9.0
    Section: GPU Speed Of Light Throughput
    Elapsed Cycles                cycle       31,069
    DRAM Throughput                   %        19.11
    Duration                         us        16.35
    SM Active Cycles              cycle    27,282.23
    Section: Warp State Statistics
    Warp Cycles Per Issued Instruction             cycle        10.29
    Warp Cycles Per Executed Instruction           cycle        10.35
    Section: Instruction Statistics
    Avg. Executed Instructions Per Scheduler        inst     4,889.05
    Executed Instructions                           inst    2,581,420
  nsa_append_bf16 (4, 4, 2)x(256, 1, 1), Context 1, Stream 13, Device 0, CC 9.0
    Section: GPU Speed Of Light Throughput
    Duration                         us         5.95
"""


def self_test():
    rows = parse(SAMPLE.splitlines())
    assert [r["kernel"] for r in rows] == ["nsa_cmp_mma_bf16_16", "nsa_append_bf16"], rows
    cmp_row, app = rows
    assert cmp_row["grid"] == "1x4x64" and cmp_row["blocks"] == 256 and cmp_row["threads"] == 128
    assert (cmp_row["duration"], cmp_row["dram"], cmp_row["cpi"]) == (16.35, 19.11, 10.29), cmp_row
    assert (cmp_row["elapsed"], cmp_row["inst"]) == (31069.0, 2581420.0), cmp_row
    assert "inst" not in app and app["duration"] == 5.95, app
    t = table(rows).splitlines()
    assert "| 2,521 | 10.3 |" in t[2], t[2]  # 2,581,420 instructions over 1,024 warps
    assert t[3].endswith("| - / - | - | - |"), t[3]
    print("ncu_table self-test: ok")


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        self_test()
        sys.exit(0)
    text = [l for f in sys.argv[1:] for l in open(f)] if len(sys.argv) > 1 else sys.stdin.readlines()
    rows = parse(text)
    if not rows:
        print("no kernel in the report", file=sys.stderr)
        sys.exit(1)
    print(table(rows))

#!/usr/bin/env python3
"""Per-step calls from two null-CUDA reports (tools/nullcuda/nullcuda.c).

usage: summary.py SHORT.tsv LONG.tsv STEPS [TOP]

SHORT and LONG are the reports of two runs that differ only in their number of steps, LONG
having STEPS more; their difference, divided by STEPS, is what one step costs, without the
set-up, the weights' upload and the warm-up. Prints the totals by kind of call, then the TOP
(default 25) kernels by launches.
"""
import collections
import sys


def read(path):
    rows = collections.Counter()
    amounts = collections.Counter()
    with open(path) as f:
        for line in f:
            lib, kind, name, count, amount = line.rstrip("\n").split("\t")
            rows[(lib, kind, name)] += int(count)
            amounts[(lib, kind, name)] += int(amount)
    return rows, amounts


def main():
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    short, short_amounts = read(sys.argv[1])
    long, long_amounts = read(sys.argv[2])
    steps = int(sys.argv[3])
    top = int(sys.argv[4]) if len(sys.argv) == 5 else 25
    per_step = {k: (long[k] - short[k]) / steps for k in long}
    amount = {k: (long_amounts[k] - short_amounts[k]) / steps for k in long}

    missing = sorted(name for (lib, kind, name), n in long.items() if kind == "missing")
    if missing:
        print("entry points nullcuda does not answer (each returned an error):", ", ".join(missing))

    launches = {k: n for k, n in per_step.items() if k[1] == "launch" and n}
    calls = {k: n for k, n in per_step.items() if k[1] == "call" and n}
    print(f"per step: {sum(launches.values()):.0f} kernel launches, "
          f"{sum(n for k, n in calls.items() if 'gemm' in k[2].lower()):.0f} cuBLAS products "
          f"({sum(a for k, a in amount.items() if k[1] == 'call' and 'gemm' in k[2].lower()) / 1e12:.2f} TFLOP)")
    print()
    print(f"{'calls per step':>14}  {'bytes per step':>14}  entry point")
    for (lib, kind, name), n in sorted(calls.items(), key=lambda kv: -kv[1]):
        print(f"{n:14.1f}  {amount[(lib, kind, name)]:14.3g}  {lib}: {name}")
    print()
    print(f"{'launches':>14}  {'threads':>14}  kernel (top {top})")
    for (lib, kind, name), n in sorted(launches.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{n:14.1f}  {amount[(lib, kind, name)]:14.3g}  {name}")


if __name__ == "__main__":
    main()

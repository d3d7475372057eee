"""Sums an Nsight Compute `--print-summary per-kernel --csv` log by kernel name: total time,
share and launches, the costliest first (scripts/gpu-check.sh runs it on its ncu step).
usage: python3 tools/ncu_summary.py NCU.log [TOP]"""
import collections
import csv
import sys


def main(path, top):
    with open(path) as f:
        rows = csv.reader(line for line in f if line.startswith('"'))
        header = next(rows, None)
        if header is None:
            print(f"{path}: no kernel rows")
            return
        by_name = collections.defaultdict(lambda: [0, 0.0])
        for row in rows:
            r = dict(zip(header, row))
            launches = int(r["Invocations"].replace(",", ""))
            ns = launches * float(r["Average"].replace(",", ""))
            name = r["Kernel Name"].split("(")[0][:90]
            by_name[name][0] += launches
            by_name[name][1] += ns
    total = sum(ns for _, ns in by_name.values())
    count = sum(n for n, _ in by_name.values())
    print(f"{count} kernels, {total / 1e6:.1f} ms of GPU time")
    for name, (n, ns) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{ns / 1e6:8.2f} ms {100 * ns / total:5.1f} % {n:6d}  {name}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30)

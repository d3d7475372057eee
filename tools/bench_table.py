"""One line per `layerdiff bench --stages` or tools/bench_stages_ref.py JSON: each stage's step
(seconds), the host's share of it where reported (`host`: seconds until the step's work was issued),
peak memory (MiB), the projected default edit, and our own GPU paths that ran (`gpu_paths`:
`fused` kernels, `cudnn` convolutions; `-` where none or not reported).
usage: python3 tools/bench_table.py FILE.json..."""
import json
import os
import sys


def cell(v, fmt):
    return "-" if v is None else fmt.format(v)


def main(paths):
    print(f"{'run':34} {'size':>4} {'dtype':>5} {'stage 1':>8} {'stage 2':>8} {'stage 3':>8} "
          f"{'peak 1/2/3 MiB':>18} {'edit s':>7}  {'host 1/2/3 s':>20}  paths")
    for path in paths:
        try:
            r = json.load(open(path))
        except (OSError, ValueError) as e:
            print(f"{os.path.basename(path)}: unreadable ({e})")
            continue
        if "stage1_step_s" not in r:
            continue
        peaks = "/".join(cell(r.get(f"stage{n}_peak_mib"), "{:.0f}") for n in (1, 2, 3))
        hosts = "/".join(cell(r.get(f"stage{n}_host_s"), "{:.4f}") for n in (1, 2, 3))
        name = os.path.basename(path).removesuffix(".json")
        gpu = "+".join(r.get("gpu_paths") or []) or "-"
        print(f"{name:34} {r['size']:>4} {r['dtype']:>5} {r['stage1_step_s']:8.4f} {r['stage2_step_s']:8.4f} "
              f"{r['stage3_step_s']:8.4f} {peaks:>18} {r['projected_edit_s']:7.1f}  {hosts:>20}  {gpu}")


if __name__ == "__main__":
    main(sys.argv[1:])

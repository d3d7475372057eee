"""Summarizes the stacks tools/host_samples.sh took: for each function, the share of samples in
which it was on the stack (inclusive) and on top of it (self; the first frame outside libc and
the dynamic loader, where a call into the system is the program's own wait), the most first.
usage: python3 tools/stack_summary.py STACKS.txt [TOP]"""
import collections
import re
import sys

FRAME = re.compile(r"^#\d+\s+(?:0x[0-9a-f]+ in )?(.+?)(?: \(.*)?$")
SYSTEM = ("syscall", "__", "??", "epoll", "poll", "pthread", "start_thread", "clone")


def short(name):
    # Rust's hash suffix and generic arguments make one function many names.
    name = re.sub(r"::h[0-9a-f]{16}$", "", name)
    name = re.sub(r"<[^<>]*>", "<>", name)
    return name[:110]


def main(path, top):
    samples, stack = [], None
    for line in open(path, errors="replace"):
        if line.startswith("=== sample"):
            stack = []
            samples.append(stack)
        elif stack is not None and (m := FRAME.match(line.strip())):
            stack.append(short(m.group(1)))
    samples = [s for s in samples if s]
    if not samples:
        print(f"{path}: no stacks")
        return
    inclusive, own = collections.Counter(), collections.Counter()
    for s in samples:
        inclusive.update(set(s))
        own[next((f for f in s if not f.startswith(SYSTEM)), s[0])] += 1
    n = len(samples)
    print(f"{n} samples of thread 1")
    print("self:")
    for name, c in own.most_common(top // 2):
        print(f"{100 * c / n:6.1f} %  {name}")
    print("inclusive:")
    for name, c in inclusive.most_common(top):
        print(f"{100 * c / n:6.1f} %  {name}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30)

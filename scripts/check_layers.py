#!/usr/bin/env python3
"""Checks that imports between the crate's top-level modules only point down the layers.

The layers, lowest first, are LAYERS below (the same order as `src/lib.rs`'s layout section).
A module may name (`crate::x`, `use crate::{x, …}`) only modules of a lower layer; modules of
one layer do not know each other. Test modules (`#[cfg(test)]` to the end of the file) are
not checked. Prints every import that points up or sideways with its file and line, and exits
1 if there is one; `--graph` prints the edges found.

    scripts/check_layers.py            # run by .ci/run
    scripts/check_layers.py --graph
"""

import os
import re
import sys

LAYERS = [
    ["util"],
    ["config", "devserver"],
    ["journal", "store"],
    ["service"],
    ["pipeline", "lookup"],
    ["daemon"],
    ["ops"],
]
# lib.rs and main.rs only declare modules and call the command line.
ROOTS = {"lib", "main"}

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}

PATH_RE = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")
GROUP_RE = re.compile(r"\bcrate::\{([^}]*)\}", re.S)


def top_module(path):
    first = os.path.relpath(path, SRC).split(os.sep)[0]
    return first[:-3] if first.endswith(".rs") else first


def imports(text):
    """(line number, module) for every crate-level module a text names."""
    for m in PATH_RE.finditer(text):
        yield text.count("\n", 0, m.start()) + 1, m.group(1)
    for m in GROUP_RE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        for name in re.findall(r"(?:^|,)\s*([a-z_][a-z0-9_]*)", m.group(1)):
            yield line, name


def main():
    graph = "--graph" in sys.argv
    problems, edges = [], set()
    for d, _, files in os.walk(SRC):
        for f in sorted(files):
            if not f.endswith(".rs"):
                continue
            path = os.path.join(d, f)
            src_mod = top_module(path)
            if src_mod in ROOTS:
                continue
            if src_mod not in RANK:
                problems.append(f"{os.path.relpath(path, SRC)}: module '{src_mod}' is in no layer (add it to LAYERS)")
                continue
            with open(path, encoding="utf-8") as fh:
                text = fh.read().split("#[cfg(test)]")[0]
            for line, dst in imports(text):
                if dst == src_mod or dst in ("self", "super"):
                    continue
                edges.add((src_mod, dst))
                if dst not in RANK:
                    problems.append(f"src/{os.path.relpath(path, SRC)}:{line}: '{dst}' is in no layer")
                elif RANK[dst] >= RANK[src_mod]:
                    how = "up" if RANK[dst] > RANK[src_mod] else "sideways"
                    problems.append(f"src/{os.path.relpath(path, SRC)}:{line}: {src_mod} imports {dst} ({how})")
    if graph:
        for a, b in sorted(edges):
            print(f"{a} -> {b}")
    if problems:
        print("imports that break the layering (lowest first: " + " < ".join("/".join(l) for l in LAYERS) + "):")
        for p in sorted(set(problems)):
            print("  " + p)
        return 1
    print(f"layers: ok ({len(edges)} edges between {len(RANK)} modules, all pointing down)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

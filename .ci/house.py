#!/usr/bin/env python3
"""The house check: imports between the crate's modules only go down.

Reads the `use` lines and paths of every module under src/ (the library from
src/lib.rs, the binary from src/main.rs), and reports:

- modules per folder;
- the longest import chain from main.rs;
- imports that run upward (an import that closes a loop: a back edge of a
  depth-first walk from main.rs and lib.rs);
- loops between modules, and loops between the top-level folders of src/.

It exits 1 when there is a loop of either kind, so CI fails when one comes
back. A module is one file; a `mod name { .. }` written inside a file belongs
to that file. Declaring a child (`mod x;`) is not an import; naming it
(`x::Thing`, `use x::Thing`) is. Code under `#[cfg(test)]`, comments (doc
links included) and string literals are not read.

    python3 .ci/house.py [SRC_DIR]     # SRC_DIR defaults to the crate's src/
"""

import os
import re
import sys
from collections import defaultdict

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip(text):
    """The text without comments, string and char literals (kept as blanks,
    so positions and braces outside them stay put)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and not re.match(r"[A-Za-z0-9_]", text[i - 1:i] or " "):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            out.append('""')
            i = n if end < 0 else end + 1 + len(hashes)
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            out.append('""')
            i += 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:i + 4]):
            m = re.match(r"'(\\.|[^\\'])'", text[i:i + 4])
            out.append("' '")
            i += len(m.group(0))
        elif c == "'" and text.startswith("'\\", i):
            j = text.find("'", i + 2)
            out.append("' '")
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def item_end(text, start):
    """Where the item starting at `start` ends: after its closing brace at
    depth 0, or its `;` at depth 0."""
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c in "{[(":
            depth += 1
        elif c in "}])":
            depth -= 1
            if depth == 0 and c == "}":
                return i + 1
        elif c == ";" and depth == 0:
            return i + 1
        i += 1
    return len(text)


def drop_test_items(text):
    """Removes every item under `#[cfg(test)]`."""
    while True:
        m = re.search(r"#\s*\[\s*cfg\s*\(\s*test\s*\)\s*\]", text)
        if not m:
            return text
        end = item_end(text, m.end())
        text = text[:m.start()] + text[end:]


def expand_use(tree):
    """`a::{b, c::{d, e}}` -> ['a::b', 'a::c::d', 'a::c::e']."""
    tree = re.sub(r"\s+", "", re.sub(r"\s+as\s+", "@", tree))
    if "{" not in tree:
        return [tree]
    head, _, rest = tree.partition("{")
    inner = rest[: rest.rindex("}")]
    parts, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    parts.append(cur)
    out = []
    for part in filter(None, parts):
        for sub in expand_use(part):
            out.append(head + sub if sub != "self" else head.rstrip(":"))
    return out


class House:
    def __init__(self, src):
        self.src = src
        self.files = {}      # module path (tuple) -> file, per crate
        self.children = defaultdict(set)  # (crate, module path) -> child names with files
        self.imports = defaultdict(set)   # file -> files it imports
        self.crates = {}
        for crate, root in (("lib", "lib.rs"), ("bin", "main.rs")):
            path = os.path.join(src, root)
            if os.path.exists(path):
                self.crates[crate] = path
                self.load(crate, (), path)
        for crate, root in self.crates.items():
            self.read_all(crate)

    def rel(self, path):
        return os.path.relpath(path, self.src)

    def load(self, crate, modpath, path):
        """Finds the module tree: each `mod x;` declared outside tests."""
        self.files[(crate, modpath)] = path
        text = drop_test_items(strip(open(path, encoding="utf-8").read()))
        name = os.path.basename(path)
        here = os.path.dirname(path)
        if name not in ("mod.rs", "lib.rs", "main.rs"):
            here = os.path.join(here, name[:-3])
        for m in re.finditer(r"(?:pub(?:\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*;", text):
            child = m.group(1)
            for candidate in (os.path.join(here, child + ".rs"), os.path.join(here, child, "mod.rs")):
                if os.path.exists(candidate):
                    self.children[(crate, modpath)].add(child)
                    self.load(crate, modpath + (child,), candidate)
                    break

    def resolve(self, crate, segments):
        """The file of the deepest module a path from the crate root names."""
        modpath = ()
        for seg in segments:
            if seg in self.children.get((crate, modpath), ()):
                modpath += (seg,)
            else:
                break
        return self.files[(crate, modpath)]

    def read_all(self, crate):
        for (c, modpath), path in list(self.files.items()):
            if c == crate:
                self.read(crate, modpath, path)

    def read(self, crate, modpath, path):
        text = drop_test_items(strip(open(path, encoding="utf-8").read()))
        # Inline modules: where `super` and `self` point inside them.
        inline = []  # (start, end, name)
        for m in re.finditer(r"\bmod\s+(" + IDENT + r")\s*\{", text):
            inline.append((m.start(), item_end(text, m.end() - 1), m.group(1)))

        def scope(pos):
            inner = [name for (a, b, name) in sorted(inline) if a <= pos < b]
            return modpath + tuple(inner)

        def target(pos, path_text):
            segs = [s for s in path_text.split("::") if s and s != "*"]
            if not segs:
                return None
            here = scope(pos)
            first = segs[0]
            if first == "crate":
                return self.resolve(crate, segs[1:])
            if first == "wsgate" and crate == "bin" and "lib" in self.crates:
                return self.resolve("lib", segs[1:])
            if first in ("self", "super"):
                base = list(here)
                while segs and segs[0] in ("self", "super"):
                    if segs.pop(0) == "super":
                        base = base[:-1]
                # an inline module's path resolves within its file
                return self.resolve(crate, base + segs)
            if here == modpath and first in self.children.get((crate, modpath), ()):
                return self.resolve(crate, list(modpath) + segs)
            return None

        found = set()
        uses = []  # spans of `use` items, read whole here and not again below
        for m in re.finditer(r"\buse\s+([^;]+);", text):
            uses.append((m.start(), m.end()))
            for p in expand_use(m.group(1)):
                t = target(m.start(), p.split("@")[0])
                if t:
                    found.add(t)
        children = self.children.get((crate, modpath), ())
        for m in re.finditer(r"(?<![A-Za-z0-9_:])((?:" + IDENT + r"::)+" + IDENT + r")", text):
            if any(a <= m.start() < b for a, b in uses):
                continue
            first = m.group(1).split("::")[0]
            if first in ("crate", "self", "super", "wsgate") or first in children:
                t = target(m.start(), m.group(1))
                if t:
                    found.add(t)
        found.discard(path)
        self.imports[path] |= found

    # --- figures -------------------------------------------------------

    def folder(self, path):
        rel = self.rel(path)
        return rel.split(os.sep)[0] + ("/" if os.sep in rel else "")


def sccs(nodes, edges):
    """Tarjan's strongly connected components."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return [c for c in out if len(c) > 1 or c[0] in edges.get(c[0], ())]


def back_edges(roots, nodes, edges):
    """Edges that close a loop in a depth-first walk from the roots."""
    state, back = {}, []

    def walk(v):
        state[v] = 1
        for w in sorted(edges.get(v, ())):
            if state.get(w) == 1:
                back.append((v, w))
            elif w not in state:
                walk(w)
        state[v] = 2

    for r in roots + sorted(nodes):
        if r not in state:
            walk(r)
    return back


def longest_chain(start, edges, cut):
    memo = {}

    def best(v):
        if v not in memo:
            memo[v] = [v]
            nexts = [best(w) for w in sorted(edges.get(v, ())) if (v, w) not in cut]
            if nexts:
                memo[v] = [v] + max(nexts, key=len)
        return memo[v]

    return best(start)


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "src")
    src = os.path.normpath(src)
    house = House(src)
    nodes = sorted(set(house.files.values()))
    edges = {k: set(v) for k, v in house.imports.items()}
    name = house.rel

    per_folder = defaultdict(list)
    for f in nodes:
        per_folder[house.folder(f)].append(f)
    print(f"house: {len(nodes)} modules under {src}")
    print("modules per folder:")
    loose = sorted(k for k in per_folder if not k.endswith("/"))
    for folder in sorted(k for k in per_folder if k.endswith("/")):
        print(f"  {folder:<12} {len(per_folder[folder])}")
    print(f"  {'src/ itself':<12} {len(loose)} ({', '.join(loose)})")

    roots = [p for p in (house.crates.get("bin"), house.crates.get("lib")) if p]
    back = back_edges(roots, nodes, edges)
    if "bin" in house.crates:
        chain = longest_chain(house.crates["bin"], edges, set(back))
        print(f"longest import chain from main.rs: {len(chain)} modules: " + " -> ".join(name(p) for p in chain))
    print(f"imports that run upward: {len(back)}")
    for a, b in back:
        print(f"  {name(a)} -> {name(b)}")

    loops = sccs(nodes, edges)
    print(f"loops between modules: {len(loops)}")
    for comp in loops:
        inside = set(comp)
        print("  " + ", ".join(name(p) for p in comp))
        for a in comp:
            for b in sorted(edges.get(a, ())):
                if b in inside:
                    print(f"    {name(a)} -> {name(b)}")

    fedges = defaultdict(set)
    for a, bs in edges.items():
        for b in bs:
            fa, fb = house.folder(a), house.folder(b)
            if fa != fb:
                fedges[fa].add(fb)
    floops = sccs(set(per_folder), fedges)
    print(f"loops between folders: {len(floops)}")
    for comp in floops:
        inside = set(comp)
        print("  " + ", ".join(comp))
        for a, bs in sorted(edges.items()):
            for b in sorted(bs):
                fa, fb = house.folder(a), house.folder(b)
                if fa != fb and fa in inside and fb in inside:
                    print(f"    {name(a)} -> {name(b)}")
    return 1 if loops or floops else 0


if __name__ == "__main__":
    sys.exit(main())

"""Which library roots a run scans, and which parts of them: the folders asked for, mapped onto roots.

Pure logic over resolved paths. The rules:
- a folder inside a known root is *part of* that root: the run scans only that subtree (and marks
  deleted only what was under it), with rows under the root's id, so ``index ~/Pictures/2024`` after
  ``index ~/Pictures`` neither creates a second root nor duplicates rows;
- the deepest root owns its folder: a root's scan skips the folders of roots nested inside it, and a
  run that reaches such a folder indexes it as that root (so ``index ~`` after ``index ~/Pictures``
  keeps ``~/Pictures`` a root of its own, refreshed in the same run);
- a folder inside no root becomes a new root.
Each mapping that is not "this folder is a root" is reported as a note.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from catalog.paths import encode_path


@dataclass
class RootScope:
    """One root of a run: the folders under it to scan (relative, POSIX; "" is the whole root) and the
    folders inside them that belong to nested roots (skipped)."""

    root: Path
    root_id: int | None  # None: a root this run creates
    folders: list[str] = field(default_factory=lambda: [""])
    excluded: list[str] = field(default_factory=list)

    def covers(self, rel: str) -> bool:
        """Whether the path ``rel`` (relative to the root) is one this run scans."""
        inside = any(is_under(rel, f) for f in self.folders)
        return inside and not any(is_under(rel, e) for e in self.excluded)


def is_under(rel: str, folder: str) -> bool:
    """Whether the relative path ``rel`` is ``folder`` or inside it ("" holds everything)."""
    return folder == "" or rel == folder or rel.startswith(folder + "/")


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path != root else ""


def _minimal(folders: Iterable[str]) -> list[str]:
    """The folders not inside another one of them, sorted."""
    out: list[str] = []
    for f in sorted(set(folders), key=lambda f: (f.count("/"), f) if f else (-1, f)):
        if not any(is_under(f, kept) for kept in out):
            out.append(f)
    return sorted(out)


def plan_roots(requested: Iterable[Path], known: Mapping[int, Path]) -> tuple[list[RootScope], list[str]]:
    """The scopes of a run over the resolved folders ``requested``, given the catalog's roots; and notes.

    Scopes come in the order of their root paths.
    """
    roots: dict[Path, int | None] = {path: i for i, path in known.items()}
    scopes: dict[Path, RootScope] = {}
    notes: list[str] = []
    # Parents first: a new root asked for in this run can then hold a later-listed subfolder.
    for path in sorted(set(requested), key=lambda p: (len(p.parts), str(p))):
        owner = max((r for r in roots if path.is_relative_to(r)), key=lambda r: len(r.parts), default=None)
        if owner is None:
            roots[path] = None
            scopes[path] = RootScope(path, None)
            continue
        rel = _rel(path, owner)
        scope = scopes.setdefault(owner, RootScope(owner, roots[owner], []))
        scope.folders = _minimal([*scope.folders, rel])
        if rel:
            notes.append(
                f"{encode_path(path)}: inside library root {encode_path(owner)}; "
                f"indexed as part of it ({encode_path(rel)}/)"
            )

    # Nested roots reached by a scan are skipped by it and indexed as themselves, whole.
    queue = list(scopes.values())
    while queue:
        scope = queue.pop()
        for inner in sorted(roots):
            if inner == scope.root or not inner.is_relative_to(scope.root):
                continue
            rel = _rel(inner, scope.root)
            if not scope.covers(rel):  # outside the folders scanned, or inside an excluded nested root
                continue
            scope.excluded = _minimal([*scope.excluded, rel])
            own = scopes.get(inner)
            if own is None or own.folders != [""]:
                if own is None:
                    own = scopes[inner] = RootScope(inner, roots[inner])
                own.folders = [""]
                queue.append(own)
            notes.append(
                f"{encode_path(inner)}: a library root of its own inside {encode_path(scope.root)}; "
                "its files stay under it and are indexed as that root"
            )
    return [scopes[r] for r in sorted(scopes)], notes

"""Where the code crosses the layout's one-way doors.

The layout's rules, each a door that opens one way only:

- ``shared/events`` (the wire contract) imports nothing else of the project;
- ``shared/models`` (inference over plain domain types) imports neither the wire
  events nor Kafka;
- ``shared/retrieval`` (the index and MMR) imports no model;
- ``shared/`` and ``infra/`` never import ``services/``;
- training and evaluation are the lab's, outside ``shared/``: no optimiser, no
  ``.backward()`` and no evaluation package under ``shared/``;
- a service folder keeps only a short entry point (``__main__.py`` under
  ``SERVICE_LINES`` lines) that wires a handler from ``shared/``.

``python -m infra.doors`` (``make doors``) prints each crossing as
``path:line: rule: detail`` and exits 1 when there is any; ``--quiet`` prints the
count only.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SERVICE_LINES = 120
"""Lines a service's ``__main__.py`` may hold: wiring, not logic."""

KAFKA_MODULES = ("confluent_kafka", "aiokafka", "faust", "shared.kafka")
TRAINING = re.compile(r"\btorch\.optim\b|\.backward\(|\boptim\.[A-Z]\w*\(")


@dataclass(frozen=True, order=True)
class Crossing:
    path: str
    line: int
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule}: {self.detail}"


def imports(tree: ast.AST, module: str) -> Iterator[tuple[int, str]]:
    """Every module ``tree`` imports, absolute, with its line (relative imports resolved
    against ``module``, the dotted name of the file)."""
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            yield node.lineno, base
            for alias in node.names:  # `from shared import events` imports shared.events
                yield node.lineno, f"{base}.{alias.name}"


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def check_file(root: Path, path: Path) -> list[Crossing]:
    rel = path.relative_to(root)
    module = ".".join(rel.with_suffix("").parts)
    text = path.read_text()
    tree = ast.parse(text, filename=str(rel))
    found: list[Crossing] = []

    def cross(line: int, rule: str, detail: str) -> None:
        found.append(Crossing(str(rel), line, rule, detail))

    for line, name in imports(tree, module):
        project = _under(name, "shared", "services", "infra")
        if _under(module, "shared.events") and project and not _under(name, "shared.events"):
            cross(line, "events depend on nothing", f"imports {name}")
        if _under(module, "shared.models"):
            if _under(name, "shared.events"):
                cross(line, "models import no wire events", f"imports {name}")
            if _under(name, *KAFKA_MODULES):
                cross(line, "models import no Kafka", f"imports {name}")
        if _under(module, "shared.retrieval") and _under(name, "shared.models"):
            cross(line, "retrieval imports no model", f"imports {name}")
        if _under(module, "shared", "infra") and _under(name, "services"):
            cross(line, "shared and infra never import services", f"imports {name}")
    if _under(module, "shared"):
        if _under(module, "shared.evaluation"):
            cross(1, "training and evaluation are the lab's", "evaluation under shared/")
        for number, source in enumerate(text.splitlines(), 1):
            if TRAINING.search(source) and not source.lstrip().startswith("#"):
                cross(number, "training and evaluation are the lab's", source.strip())
    if _under(module, "services") and len(rel.parts) == 3:
        if rel.name == "__main__.py":
            lines = len(text.splitlines())
            if lines > SERVICE_LINES:
                cross(1, "a service is a short entry point", f"{lines} lines")
        elif rel.name != "__init__.py":
            cross(1, "a service is a short entry point", "logic beside the entry point")
    unique = {(c.line, c.rule): c for c in reversed(found)}  # one per line and rule
    return sorted(unique.values())


def check(root: Path) -> list[Crossing]:
    found: list[Crossing] = []
    for top in ("shared", "services", "infra"):
        for path in sorted((root / top).rglob("*.py")):
            found.extend(check_file(root, path))
    return sorted(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--quiet", action="store_true", help="print the count only")
    args = parser.parse_args(argv)
    found = check(args.root)
    if not args.quiet:
        for crossing in found:
            print(crossing)
    rules = sorted({c.rule for c in found})
    if found:
        print(f"{len(found)} crossings of {len(rules)} doors: {', '.join(rules)}")
    else:
        print("0 crossings: every import goes through the doors the right way")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

"""Copy servers/ray/serve.yaml into servers/k8s/rayservice.yaml as its serveConfigV2.

    python servers/k8s/sync_serve_config.py          # rewrite the block in place
    python servers/k8s/sync_serve_config.py --check  # exit 1 if the two differ

Text, not YAML: a YAML round trip would drop serve.yaml's comments, which are the reasons
behind its numbers and belong in the cluster's copy too.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVE_YAML = ROOT / "servers" / "ray" / "serve.yaml"
RAYSERVICE = ROOT / "servers" / "k8s" / "rayservice.yaml"
KEY = "  serveConfigV2: |"
INDENT = "    "


def split(text: str) -> tuple[list[str], list[str], list[str]]:
    """The manifest as (lines before the block, the block dedented, lines after it)."""
    lines = text.splitlines()
    start = lines.index(KEY) + 1
    end = start
    while end < len(lines) and (lines[end].startswith(INDENT) or not lines[end].strip()):
        end += 1
    # Blank lines after the block belong to what follows it.
    while end > start and not lines[end - 1].strip():
        end -= 1
    block = [line[len(INDENT):] for line in lines[start:end]]
    return lines[:start], block, lines[end:]


def embedded(text: str) -> str:
    """serveConfigV2 as YAML's literal block scalar holds it (one final newline)."""
    return "\n".join(split(text)[1]) + "\n"


def render(manifest: str, serve_yaml: str) -> str:
    head, _, tail = split(manifest)
    block = [INDENT + line if line else "" for line in serve_yaml.rstrip("\n").splitlines()]
    return "\n".join([*head, *block, *tail]) + "\n"


def main(argv: list[str]) -> int:
    manifest = RAYSERVICE.read_text()
    wanted = render(manifest, SERVE_YAML.read_text())
    if "--check" in argv:
        if wanted != manifest:
            print(f"{RAYSERVICE} differs from {SERVE_YAML}: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    RAYSERVICE.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

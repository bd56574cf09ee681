"""Every command that docs/operations.md and docs/integration.md tell an operator or a
partner to run exists: each `ku ...` parses (down to its subcommand), each program is
installed here or is docker, each `make` target is in the Makefile, and each HTTP path
they name is served by the gateway's routes or a service's API."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from services.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "docs" / "operations.md", ROOT / "docs" / "integration.md"]
SHELL_WORDS = {"for", "do", "done", "mkdir", "cp", "export", "cd"}


def shell_lines(doc: Path) -> list[str]:
    lines: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", doc.read_text(), re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def commands() -> list[tuple[str, str]]:
    return [(doc.name, line) for doc in DOCS for line in shell_lines(doc)]


def ku_subcommand(words: list[str]) -> list[str]:
    """`ku keys create --app x` -> ["keys", "create"]: the words before any option."""
    path: list[str] = []
    for word in words[1:]:
        if word.startswith("-") or word.isupper() or "<" in word:
            break
        path.append(word)
    return path


@pytest.mark.parametrize(("doc", "line"), commands())
def test_command_exists(doc: str, line: str):
    line = re.sub(r"^[a-z_]+=\$\(", "", line).replace("$(", "")
    words = shlex.split(line.removesuffix(")"))
    program = words[0]
    if program in SHELL_WORDS:
        return
    if program == "ku":
        path = ku_subcommand(words)
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args([*path, "--help"])
        assert done.value.code == 0, f"{doc}: `{line}`"
        # The subcommand path is complete: it names a command, not a group.
        args = [w for w in words[1:] if w not in ("--help",)]
        if "PREFIX" in args:
            args[args.index("PREFIX")] = "abcd1234"
        parsed = build_parser().parse_args([a.replace("<", "").replace(">", "") for a in args])
        assert parsed.command == path[0]
    elif program == "make":
        target = words[1]
        assert re.search(rf"^{re.escape(target)}:", (ROOT / "Makefile").read_text(), re.M)
    else:
        assert program in {"docker", "curl", "pg_dump", "pg_restore", "psql", "bash"}, program
        if program != "docker":  # the compose host's tool; the rest are on this machine
            assert shutil.which(program), f"{doc}: {program} is not installed"


def test_blocks_were_found():
    found = commands()
    assert any(line.startswith("ku ledger verify") for _, line in found)
    assert any(line.startswith("pg_dump") for _, line in found)
    assert any(line.startswith("curl") for _, line in found)


def test_http_paths_are_served():
    """Each `/v1/...` or `/api/unified/...` path named in the docs is a real route."""
    from gateway.app import create_app
    from services.auth.app import create_app as auth_app
    from services.enhancement.app import create_app as enhancement_app
    from services.generation.app import create_app as generation_app
    from services.ledger.app import create_app as ledger_app
    from services.workspace.app import create_app as workspace_app

    routes: list[str] = []
    apps = (auth_app, ledger_app, workspace_app, generation_app, enhancement_app)
    for app in (create_app(), *(make() for make in apps)):
        routes += list(app.openapi()["paths"])
    patterns = [re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", r) + "$") for r in routes if r]
    text = "\n".join(doc.read_text() for doc in DOCS)
    named = set(re.findall(r"(/(?:v1|api/unified)/[a-z0-9_/{}\-]+)", text))
    assert len(named) > 10
    for path in named:
        path = path.rstrip("/").replace("...", "")
        if path.endswith("/*"):
            continue
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        assert any(p.match(concrete) for p in patterns), f"no route serves {path}"

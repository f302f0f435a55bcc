"""Compile contracts/src/*.sol with the pinned npm ``solc`` and write contracts/artifacts/.

Usage (from the repository root)::

    npm ci --prefix contracts              # installs the pinned solc + OpenZeppelin
    .venv/bin/python contracts/build.py    # (re)write artifacts
    .venv/bin/python contracts/build.py --check   # exit 1 if committed artifacts are stale

Compilation runs ``solc-js`` under node with standard JSON input; imports of
``@openzeppelin/...`` are resolved from ``contracts/node_modules``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

CONTRACTS_DIR = Path(__file__).resolve().parent
SRC_DIR = CONTRACTS_DIR / "src"
ARTIFACTS_DIR = CONTRACTS_DIR / "artifacts"
NODE_MODULES = CONTRACTS_DIR / "node_modules"

EVM_VERSION = "cancun"
OPTIMIZER_RUNS = 200

# Reads standard JSON on stdin, writes {"version", "output"} on stdout.
_NODE_COMPILE = r"""
const fs = require('fs');
const path = require('path');
const solc = require('solc');
const nm = path.join(process.cwd(), 'node_modules');
function findImports(p) {
  const full = path.join(nm, p);
  if (!full.startsWith(nm + path.sep)) return { error: 'import outside node_modules: ' + p };
  try { return { contents: fs.readFileSync(full, 'utf8') }; }
  catch (e) { return { error: 'not found: ' + p }; }
}
const input = fs.readFileSync(0, 'utf8');
const output = JSON.parse(solc.compile(input, { import: findImports }));
process.stdout.write(JSON.stringify({ version: solc.version(), output }));
"""


class BuildError(RuntimeError):
    """Compilation could not run or failed."""


def _pinned(package: str) -> str:
    manifest = json.loads((CONTRACTS_DIR / "package.json").read_text())
    return str(manifest["dependencies"][package])


def _installed(package: str) -> str:
    manifest = NODE_MODULES / package / "package.json"
    if not manifest.is_file():
        raise BuildError(
            f"{package} is not installed in {NODE_MODULES}; run `npm ci --prefix contracts`"
        )
    return str(json.loads(manifest.read_text())["version"])


def sources() -> dict[str, str]:
    """Source unit name (``src/X.sol``) -> content, sorted by name."""
    return {f"src/{p.name}": p.read_text(encoding="utf-8") for p in sorted(SRC_DIR.glob("*.sol"))}


def settings() -> dict[str, Any]:
    return {
        "optimizer": {"enabled": True, "runs": OPTIMIZER_RUNS},
        "evmVersion": EVM_VERSION,
        "outputSelection": {
            "*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]}
        },
    }


def sources_sha256(srcs: dict[str, str], oz_version: str) -> str:
    """Digest over our sources, the OpenZeppelin version and the compiler settings."""
    h = hashlib.sha256()
    for name, text in srcs.items():
        h.update(name.encode() + b"\0" + text.encode() + b"\0")
    h.update(f"@openzeppelin/contracts@{oz_version}\0".encode())
    h.update(json.dumps(settings(), sort_keys=True).encode())
    return h.hexdigest()


def compile_all() -> dict[str, str]:
    """Compile every source; returns artifact file name -> serialized JSON text."""
    node = shutil.which("node")
    if node is None:
        raise BuildError("node is not on PATH; install Node.js to compile contracts")
    solc_pin, oz_pin = _pinned("solc"), _pinned("@openzeppelin/contracts")
    solc_have, oz_have = _installed("solc"), _installed("@openzeppelin/contracts")
    if (solc_have, oz_have) != (solc_pin, oz_pin):
        raise BuildError(
            f"installed solc {solc_have} / OpenZeppelin {oz_have} differ from the pins "
            f"solc {solc_pin} / OpenZeppelin {oz_pin}; run `npm ci --prefix contracts`"
        )
    srcs = sources()
    if not srcs:
        raise BuildError(f"no .sol files in {SRC_DIR}")
    std_input = {
        "language": "Solidity",
        "sources": {name: {"content": text} for name, text in srcs.items()},
        "settings": settings(),
    }
    proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
        [node, "-e", _NODE_COMPILE],
        input=json.dumps(std_input),
        capture_output=True,
        text=True,
        cwd=CONTRACTS_DIR,
        check=False,
    )
    if proc.returncode != 0:
        raise BuildError(f"solc-js failed (exit {proc.returncode}):\n{proc.stderr.strip()}")
    result = json.loads(proc.stdout)
    output = result["output"]
    errors = [e for e in output.get("errors", []) if e.get("severity") == "error"]
    if errors:
        raise BuildError(
            "compilation failed:\n" + "\n".join(e.get("formattedMessage", str(e)) for e in errors)
        )
    digest = sources_sha256(srcs, oz_have)
    artifacts: dict[str, str] = {}
    for source_name in srcs:
        for contract_name, out in sorted(output["contracts"].get(source_name, {}).items()):
            artifact = {
                "contractName": contract_name,
                "sourceName": source_name,
                "compiler": {
                    "name": "solc-js",
                    "npm": f"solc@{solc_have}",
                    "version": result["version"],
                },
                "openzeppelin": oz_have,
                "settings": {k: v for k, v in settings().items() if k != "outputSelection"},
                "sourcesSha256": digest,
                "abi": out["abi"],
                "bytecode": "0x" + out["evm"]["bytecode"]["object"],
                "deployedBytecode": "0x" + out["evm"]["deployedBytecode"]["object"],
            }
            artifacts[f"{contract_name}.json"] = (
                json.dumps(artifact, indent=2, sort_keys=True) + "\n"
            )
    return artifacts


def check(artifacts: dict[str, str]) -> list[str]:
    """Differences between freshly compiled ``artifacts`` and the committed ones."""
    problems: list[str] = []
    committed = {p.name for p in ARTIFACTS_DIR.glob("*.json")} if ARTIFACTS_DIR.is_dir() else set()
    for name, text in sorted(artifacts.items()):
        path = ARTIFACTS_DIR / name
        if name not in committed:
            problems.append(f"missing artifact: {path.relative_to(CONTRACTS_DIR.parent)}")
        elif (old_text := path.read_text(encoding="utf-8")) != text:
            try:
                old, new = json.loads(old_text), json.loads(text)
                keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            except json.JSONDecodeError:
                keys = ["<not valid JSON>"]
            detail = ", ".join(keys) if keys else "formatting"
            problems.append(
                f"stale artifact: {path.relative_to(CONTRACTS_DIR.parent)} (differs in: {detail})"
            )
    for name in sorted(committed - artifacts.keys()):
        problems.append(f"artifact without a source: contracts/artifacts/{name}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="recompile and fail if committed artifacts differ"
    )
    args = parser.parse_args(argv)
    try:
        artifacts = compile_all()
    except BuildError as exc:
        print(f"contracts build: {exc}", file=sys.stderr)
        return 2
    if args.check:
        problems = check(artifacts)
        if problems:
            print(
                "contracts/artifacts do not match contracts/src:\n  "
                + "\n  ".join(problems)
                + "\nrun `.venv/bin/python contracts/build.py` and commit the result",
                file=sys.stderr,
            )
            return 1
        print(f"contracts artifacts up to date ({len(artifacts)} contracts)")
        return 0
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    for stale in set(p.name for p in ARTIFACTS_DIR.glob("*.json")) - artifacts.keys():
        (ARTIFACTS_DIR / stale).unlink()
    for name, text in artifacts.items():
        (ARTIFACTS_DIR / name).write_text(text, encoding="utf-8")
    print(f"wrote {len(artifacts)} artifacts to {ARTIFACTS_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What `make test-gpu` needs beyond the GPU machine's own torch, and how it gets it without a network.

    make gpu-wheels                    # here, with network: pinned wheels of the pure-Python needs -> .whl/
    make gpu-wheels GPU_PYTHON=3.11    # the binary one (PyYAML) for another Python on the GPU machine

On the GPU machine, install() puts whatever of SMALL is missing, or there in a version that does not fit,
into build/gpu-site/py3X (from .whl/ when that folder exists, else from PyPI), first on the steps'
PYTHONPATH; torch and the compiled MACHINE packages are never installed: GPU images bring them, and a
second torch would shadow the machine's CUDA build.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"

# (distribution, import name, versions that will do): everything the suite and the launcher import beyond
# torch, the standard library and MACHINE, with their own needs (Python >= 3.11). A version outside the
# range is replaced (omegaconf breaks on any antlr4 but 4.9). Wheels are py3-none-any except PyYAML's and
# hypothesis's (per CPython version); antlr4 4.9.3 is an sdist on PyPI, so gpu-wheels builds its wheel.
SMALL = [
    ("hydra-core", "hydra", ">=1.3,<1.4"),
    ("omegaconf", "omegaconf", ">=2.2,<2.4"),
    ("antlr4-python3-runtime", "antlr4", "==4.9.*"),
    ("PyYAML", "yaml", ">=5.1"),
    ("packaging", "packaging", ">=24"),
    ("pytest", "pytest", ">=8"),
    ("iniconfig", "iniconfig", ">=2"),
    ("pluggy", "pluggy", ">=1.5,<2"),
    ("Pygments", "pygments", ">=2.15"),
    ("pytest-timeout", "pytest_timeout", ">=2.2"),
    ("hypothesis", "hypothesis", ">=6.100"),
    ("sortedcontainers", "sortedcontainers", ">=2.1,<3"),
    ("tqdm", "tqdm", ">=4.60"),
]
# Compiled packages the GPU machine must already have (the launcher's data set and plots need them).
MACHINE = [
    ("numpy", "numpy", ">=1.22"),
    ("matplotlib", "matplotlib", ">=3.7"),
    ("scikit-learn", "sklearn", ">=1.3"),
]
# Optional: the tests that use them skip where they do not import (the lent GPU machines have both).
OPTIONAL = [("lightning", "lightning", ">=2.2"), ("timm", "timm", ">=0.9")]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


class SetupError(RuntimeError):
    """A need that can be neither imported nor installed; the message says what to do."""


def pins(constraints: Path = ROOT / "constraints.txt") -> dict[str, str]:
    """``name==version`` of every SMALL need, as constraints.txt pins it."""
    pinned = {}
    for line in constraints.read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep:
            pinned[name.lower()] = f"{name}=={version}"
    unpinned = [dist for dist, _, _ in SMALL if dist.lower() not in pinned]
    if unpinned:
        raise SetupError(f"constraints.txt pins no version of {', '.join(unpinned)}")
    return {dist: pinned[dist.lower()] for dist, _, _ in SMALL}


def download_commands(dest: Path, python_version: str) -> list[list[str]]:
    """The pip commands that fill ``dest`` with a wheel of every SMALL need for that Python."""
    spec = pins()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    fetch = [*pip, "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest)]
    fetch += ["--python-version", python_version, "--implementation", "cp"]
    fetch += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    wheels = [spec[dist] for dist, module, _ in SMALL if module != "antlr4"]
    build = [*pip, "wheel", "--no-deps", "--wheel-dir", str(dest), spec["antlr4-python3-runtime"]]
    return [[*fetch, *wheels], build]


def _release(version: str) -> tuple[int, ...]:
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def satisfies(version: str, spec: str) -> bool:
    """Whether ``version`` fits ``spec``: comma-separated ``>=X``, ``<X`` and ``==X.*`` clauses."""
    have = _release(version)
    for clause in spec.split(","):
        op, want = re.fullmatch(r"(>=|<|==)(.+)", clause.strip()).groups()
        bound = _release(want.removesuffix(".*"))
        if op == "==":
            ok = have[: len(bound)] == bound
        else:
            width = max(len(have), len(bound))
            a, b = (t + (0,) * (width - len(t)) for t in (have, bound))
            ok = a >= b if op == ">=" else a < b
        if not ok:
            return False
    return True


def missing(needs=SMALL) -> list[str]:
    """The distributions among ``needs`` this interpreter cannot import, or has in a version that won't do."""
    absent = []
    for dist, module, spec in needs:
        try:
            ok = importlib.util.find_spec(module) is not None and satisfies(
                importlib.metadata.version(dist), spec
            )
        except importlib.metadata.PackageNotFoundError:
            ok = False
        if not ok:
            absent.append(dist)
    return absent


def site_dir() -> Path:
    return ROOT / "build" / "gpu-site" / f"py{sys.version_info.major}{sys.version_info.minor}"


def install(log) -> Path | None:
    """Make every need importable; return the folder to put on PYTHONPATH (None if nothing was missing)."""
    absent = missing(MACHINE)
    if absent:
        raise SetupError(
            f"this Python ({sys.executable}) lacks {', '.join(absent)} (or has too old a version): compiled "
            "packages that GPU images bring and make test-gpu does not install; install them, or use "
            "PYTHON= another interpreter"
        )
    target = site_dir()
    sys.path.insert(0, str(target))  # what an earlier run installed there counts as present
    importlib.invalidate_caches()
    todo = missing()
    if not todo:
        return target if target.is_dir() else None
    spec = pins()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "install", "--no-deps", "--upgrade"]
    pip += ["--target", str(target), *(spec[dist] for dist in todo)]
    sources = [["--no-index", "--find-links", str(WHEELS)]] if WHEELS.is_dir() else []
    sources.append(["--retries", "1", "--timeout", "15"])  # PyPI, when the machine reaches it
    for source in sources:
        log(f"installing {', '.join(todo)} into {target} ({'.whl/' if '--no-index' in source else 'PyPI'})")
        if subprocess.run([*pip, *source], capture_output=True, text=True).returncode == 0:
            importlib.invalidate_caches()
            if not missing():
                return target
    raise SetupError(
        f"cannot install {', '.join(todo)} for Python {sys.version_info.major}.{sys.version_info.minor}: "
        "no matching wheel in .whl/ and no network; run `make gpu-wheels GPU_PYTHON=X.Y` on a machine "
        "with network and bring .whl/ along"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="download the wheels make test-gpu installs offline")
    parser.add_argument("--dest", type=Path, default=WHEELS)
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (X.Y)")
    parser.add_argument("--dry-run", action="store_true", help="print the pip commands only")
    args = parser.parse_args(argv)
    for command in download_commands(args.dest, args.python_version):
        print(" ".join(command), flush=True)
        if not args.dry_run and subprocess.run(command).returncode != 0:
            return 1
    if not args.dry_run:
        wheels = sorted(p.name for p in args.dest.glob("*.whl"))
        print(f"{len(wheels)} wheels in {args.dest}: {', '.join(wheels)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

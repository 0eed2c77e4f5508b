"""The wheels a lent GPU machine needs for pipelines/gpu_bench.sh: `make device-kit`.

That machine has a CUDA torch and nothing can be fetched there, so every other package the
check imports travels as a wheel in ``.whl/``. The set is resolved here, from this venv's
installed metadata: the roots below and everything they require (extras left out,
markers evaluated for the device's CPython 3.12 on Linux x86-64), each pinned to the
version installed here — the combination the tests pass with. torch and the CUDA
libraries it brings are left out: the device's own torch is the one to measure.

Usage: python pipelines/device_kit.py [DIR] [--python 3.12]  (DIR default .whl, emptied
first: two versions of one package in it would stop the install there; --python 3.11
builds a kit for this machine's CPython, to try it in a venv holding only torch).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

# What pipelines/train.py (Pendulum, tracking off, no videos; it always plots the learning
# curve), bench.py and gpu_check.py import besides torch.
ROOTS = ("torchrl", "tensordict", "hydra-core", "omegaconf", "gymnasium", "tqdm", "numpy",
         "matplotlib")
# Already on the device with its torch; a CPU build of these from here would replace them.
PROVIDED = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*|setuptools|pip|wheel)$")
TARGET = {
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: tuple[str, ...] = ROOTS, python: str = "3.12") -> dict[str, str]:
    """{package: version installed here} for ``roots`` and all they require on the device."""
    env = {**default_environment(), **TARGET, "python_version": python,
           "python_full_version": f"{python}.0"}
    found: dict[str, str] = {}
    todo = [canonical(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in found or PROVIDED.match(name):
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            raise SystemExit(f"device kit: {name} is needed but not installed here; "
                             f"install it in this venv first") from None
        found[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(canonical(req.name))
    return dict(sorted(found.items()))


def download(pins: dict[str, str], dest: Path, python: str = "3.12") -> None:
    """Each pin as a CPython manylinux (or pure) wheel; sdist-only ones built here."""
    pip = [sys.executable, "-m", "pip"]
    binary = ["download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
              python, "--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS)]
    for name, version in pins.items():
        spec = f"{name}=={version}"
        got = subprocess.run([*pip, *binary, "-d", str(dest), spec], capture_output=True)
        if got.returncode:  # no wheel on the index (antlr4-python3-runtime): build one
            subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(dest), spec], check=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dest", nargs="?", default=".whl")
    parser.add_argument("--python", default="3.12", help="the device's CPython, major.minor")
    args = parser.parse_args(argv)
    dest = Path(args.dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    pins = closure(python=args.python)
    (dest / "requirements.txt").write_text("".join(f"{n}=={v}\n" for n, v in pins.items()))
    download(pins, dest, args.python)
    wheels = sorted(dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {size:.1f} MiB in {dest}: {', '.join(pins)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""linux/aarch64 on an x86 machine: qemu user-mode emulation of an arm64 Python with onnxruntime.

    python benchmarks/arm64.py [BUNDLE]     # build (or reuse) the environment, run the check, print JSON

Nothing is installed on the machine and its dpkg is not touched; everything lands in
~/.cache/star-arm64/ ($STAR_ARM64_CACHE), so a second run only emulates:

    qemu        Debian's qemu-user-static, fetched with `apt-get download` (a private apt state) and
                unpacked with `dpkg-deb -x`; only qemu-aarch64-static is kept
    sysroot     Debian bookworm's arm64 python3.11 and the libraries it needs (apt-cache depends,
                then apt-get download with APT::Architecture=arm64 and private lists), `dpkg -x`
                into one folder; run with QEMU_LD_PREFIX=sysroot (no chroot, no binfmt)
    wheels      onnxruntime and numpy for aarch64 from the package index: pip download
                --only-binary=:all: with the manylinux aarch64 platform tags and --abi abi3
                (protobuf ships only an abi3 wheel), then pip install --target
    cpuinfo     sysroot/proc/cpuinfo describing a Neoverse-N1: qemu looks absolute paths up in
                QEMU_LD_PREFIX first, and `import onnxruntime` segfaulted under qemu 7.2 on the
                host's x86 /proc/cpuinfo
    QEMU_CPU    neoverse-n1: qemu 7.2's default model ("max", with SME) gave a different reply
                (a qemu bug; qemu 10 with SME agrees with x86)

The emulated process gets PYTHONPATH=wheels:repository (its own; the host's is not changed) and
runs benchmarks/platforms.py's child: the bundle's self-check, then a greedy reply.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("STAR_ARM64_CACHE", Path.home() / ".cache" / "star-arm64"))
ONNXRUNTIME = "onnxruntime==1.32.0"  # the newest on the index when this was written (docs/platforms.md)
NUMPY = "numpy==2.4.6"
ROOT_PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib", "libstdc++6", "libgcc-s1")
# Packaging tools the dependency closure drags in (dpkg, perl, ...) that Python never runs: 73 MB.
NOT_NEEDED = {"dpkg", "install-info", "perl", "perl-base", "perl-modules-5.36", "libperl5.36", "libgdbm-compat4",
              "mailcap", "mime-support", "tar"}
WHEEL_TAGS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
CPUINFO = "".join(
    f"processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp "
    "asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
    "CPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n" for i in range(2))


def _apt(arch: str, *args: str, cwd: Path | None = None) -> str:
    """apt-get / apt-cache with a private state under CACHE/apt-ARCH (the machine's is untouched)."""
    state = CACHE / f"apt-{arch}"
    for sub in ("lists/partial", "cache/archives/partial"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    (state / "status").touch()
    options = [f"-oAPT::Architecture={arch}", f"-oAPT::Architectures={arch}", f"-oDir::State={state}",
               f"-oDir::State::Lists={state / 'lists'}", f"-oDir::Cache={state / 'cache'}",
               f"-oDir::State::status={state / 'status'}", "-oDebug::NoLocking=1", "-qq"]
    tool = "apt-cache" if args[0] in ("depends", "show") else "apt-get"
    done = subprocess.run([tool, *options, *args], capture_output=True, text=True, cwd=cwd, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(args[:2])} failed: {done.stderr.strip()[-300:]}")
    return done.stdout


def _dependencies(arch: str, roots: tuple[str, ...]) -> list[str]:
    """The packages `roots` need (Depends and Pre-Depends, recursively), real packages only."""
    out = _apt(arch, "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts", "--no-breaks",
               "--no-replaces", "--no-enhances", *roots)
    names = {line.strip() for line in out.splitlines() if line and not line.startswith(" ")}
    return sorted(n.split(":")[0] for n in names if not n.startswith("<") and n.split(":")[0] not in NOT_NEEDED)


def _unpack(arch: str, packages: list[str], dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _apt(arch, "download", *packages, cwd=Path(tmp))
        for deb in Path(tmp).glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)


def qemu() -> Path:
    """CACHE/qemu-aarch64-static, fetched once."""
    binary = CACHE / "qemu-aarch64-static"
    if not binary.is_file():
        _apt("amd64", "update")
        tmp = CACHE / "qemu.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        _unpack("amd64", ["qemu-user-static"], tmp)
        os.replace(tmp / "usr" / "bin" / "qemu-aarch64-static", binary)  # 13 MB of the package's 370
        shutil.rmtree(tmp)
    return binary


def sysroot() -> Path:
    """CACHE/sysroot: arm64 python3.11 and its libraries, and the fake cpuinfo."""
    root = CACHE / "sysroot"
    if not (root / ".complete").is_file():
        tmp = CACHE / "sysroot.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        _apt("arm64", "update")
        _unpack("arm64", _dependencies("arm64", ROOT_PACKAGES), tmp)
        (tmp / "proc").mkdir(exist_ok=True)
        (tmp / "proc" / "cpuinfo").write_text(CPUINFO)
        (tmp / ".complete").write_text("")
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    return root


def wheels(onnxruntime: str = ONNXRUNTIME, numpy: str = NUMPY) -> Path:
    """CACHE/site-ORT: onnxruntime, numpy and their dependencies for aarch64 (pip install --target)."""
    target = CACHE / f"site-{onnxruntime.split('==')[-1]}"
    if not (target / ".complete").is_file():
        tmp = Path(f"{target}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tags = [arg for tag in WHEEL_TAGS for arg in ("--platform", tag)]
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target",
                        str(tmp), "--only-binary=:all:", *tags, "--python-version", "3.11", "--implementation", "cp",
                        "--abi", "cp311", "--abi", "abi3", "--abi", "none", onnxruntime, numpy],
                       check=True, capture_output=True, timeout=900)
        (tmp / ".complete").write_text("")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def environment() -> tuple[list[str], dict[str, str], float]:
    """(command prefix that runs the arm64 python, its environment, setup seconds)."""
    start = time.perf_counter()
    binary, root, site = qemu(), sysroot(), wheels()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
           "QEMU_LD_PREFIX": str(root), "QEMU_CPU": "neoverse-n1", "PYTHONPATH": f"{site}:{REPO}",
           "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    return [str(binary), str(root / "usr" / "bin" / "python3.11")], env, time.perf_counter() - start


def run_emulated(bundle: Path, child: str, args: list[str], timeout: float = 600) -> dict:
    """benchmarks/platforms.py's child under emulation; its JSON record with setup_s and wall_s added."""
    command, env, setup = environment()
    with tempfile.TemporaryDirectory() as cwd:
        start = time.perf_counter()
        done = subprocess.run([*command, "-c", child, *args], capture_output=True, text=True, env=env, cwd=cwd,
                              timeout=timeout)
    lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return {"status": "crash", "machine": "aarch64", "error": f"exit {done.returncode}: {tail}",
                "setup_s": setup}
    return {**json.loads(lines[-1]), "setup_s": setup, "wall_s": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    from platforms import CHILD, DEFAULT_BUNDLE, MESSAGE  # benchmarks/platforms.py, beside this file

    args = sys.argv[1:] if argv is None else argv
    bundle = Path(args[0]) if args else DEFAULT_BUNDLE
    print(json.dumps(run_emulated(bundle, CHILD, [str(bundle), MESSAGE])))
    return 0


if __name__ == "__main__":
    sys.exit(main())

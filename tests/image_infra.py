"""Image infrastructure for tests of `ops build`, with no Docker daemon: buildah, skopeo and a local registry.

- `ensure_base_image()`: a Debian bookworm image (made from the Debian mirror with mmdebstrap, since no public
  base image can be pulled here) that already holds the CPU build of torch 2.13, torchvision and every other
  dependency of pyproject.toml, so that building the repo's Dockerfile on it installs only the project. Kept in
  buildah's vfs storage and reused by later test sessions on the same machine.
- `LocalRegistry`: `docker-registry serve` on 127.0.0.1 with its storage in a folder.

Every buildah/podman call here uses the vfs storage driver (--storage-driver vfs), as RECIPES.md advises for
these machines. Code under test that calls buildah with no storage flag needs `vfs_storage_env()` exported
(the `image_infra` fixture does it): buildah 1.28 ignores STORAGE_DRIVER, but not CONTAINERS_STORAGE_CONF.

PyPI's torchvision wheels are CUDA builds: their `_C.so` needs libtorch_cuda.so, libc10_cuda.so and
libcudart.so.13, which the CPU torch lacks, and `import torchvision` then fails with "operator torchvision::nms
does not exist". The base therefore gets small stand-in libraries for those three (built on the host with gcc
from the symbols the extension needs, see `_make_cuda_stubs`): the extension loads, its CPU kernels (nms, image
decoding, ...) work, and only a CUDA kernel call would do nothing.

    python -m tests.image_infra base                   # ensure the base image, print its name
    python -m tests.image_infra registry start DIR     # prints: export OPS_TEST_REGISTRY=127.0.0.1:PORT (and the
                                                       # STORAGE_DRIVER/CONTAINERS_STORAGE_CONF exports for vfs)
    python -m tests.image_infra registry stop DIR
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEBIAN_IMAGE = "localhost/diffusion-base:bookworm-python"  # the imported mmdebstrap tree; cached too
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
TORCH_WHEEL = Path("/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
TORCHVISION = "torchvision==0.28.0"  # the release made for torch 2.13
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
STUB_DIR = "/usr/local/lib/torchvision-cuda-stubs"
REQUIRED_TOOLS = ("buildah", "skopeo", "docker-registry", "mmdebstrap", "podman", "gcc", "readelf")
INSTALL_HINT = (
    "apt-get install -y buildah podman skopeo runc docker-registry mmdebstrap gcc binutils "
    "(builds run with the vfs storage driver and chroot isolation; no Docker daemon needed)"
)


def image_tools_available() -> bool:
    """buildah, skopeo, docker-registry and mmdebstrap (plus podman for `import`, gcc/readelf for the stubs)."""
    return all(shutil.which(tool) for tool in REQUIRED_TOOLS)


def vfs_storage_env(folder: str | Path) -> dict[str, str]:
    """Variables that make buildah/podman/skopeo called with no storage flag use the vfs driver.

    buildah 1.28 (Debian 12) ignores STORAGE_DRIVER, so a storage.conf naming vfs (written into `folder`, with
    the default root locations) is passed through CONTAINERS_STORAGE_CONF as well.
    """
    conf = Path(folder).resolve() / "storage.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(
        '[storage]\ndriver = "vfs"\nrunroot = "/run/containers/storage"\ngraphroot = "/var/lib/containers/storage"\n'
    )
    return {"STORAGE_DRIVER": "vfs", "CONTAINERS_STORAGE_CONF": str(conf)}


def _env() -> dict[str, str]:
    return {**os.environ, "STORAGE_DRIVER": "vfs"}  # and --storage-driver vfs on every call


def _log(message: str) -> None:
    print(f"[image_infra] {message}", flush=True)


@contextmanager
def _stage(name: str):
    _log(f"{name} ...")
    start = time.monotonic()
    yield
    _log(f"{name}: {time.monotonic() - start:.1f} s")


def _run(*args: str, capture: bool = False, check: bool = True) -> subprocess.CompletedProcess:
    """A command with STORAGE_DRIVER=vfs; its output goes to ours unless captured. Fails with its output."""
    result = subprocess.run(args, env=_env(), stdin=subprocess.DEVNULL, text=True, capture_output=capture)
    if check and result.returncode != 0:
        detail = f"\n{result.stdout}\n{result.stderr}" if capture else ""
        raise RuntimeError(f"{' '.join(args)} exited {result.returncode}{detail}")
    return result


def buildah(*args: str, capture: bool = False, check: bool = True) -> subprocess.CompletedProcess:
    return _run("buildah", "--storage-driver", "vfs", *args, capture=capture, check=check)


def image_exists(name: str) -> bool:
    result = buildah("images", "-q", name, capture=True, check=False)
    return result.returncode == 0 and bool(result.stdout.strip())


def project_dependencies(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """[project].dependencies of pyproject.toml, read now (not a copy of the list)."""
    with open(pyproject, "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


# Tagged by the dependency list: a new dependency makes a new base, so Dockerfile builds on it
# keep installing only the project.
BASE_IMAGE = (
    "localhost/diffusion-base:py311-torch-" + hashlib.sha256("\n".join(project_dependencies()).encode()).hexdigest()[:8]
)


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _lock(path: Path):
    """A cross-process lock (filelock is a project dependency) so that two test sessions don't build at once."""
    try:
        from filelock import FileLock
    except ImportError:  # pragma: no cover
        return contextmanager(lambda: (yield))()
    return FileLock(str(path))


def ensure_base_image(name: str = BASE_IMAGE, work_dir: str | Path | None = None) -> str:
    """`name` in buildah's vfs storage: found there, or built now (about 3-5 minutes cold). Returns `name`."""
    if image_exists(name):
        _log(f"base image {name} already built")
        return name
    work = Path(work_dir) if work_dir is not None else Path("/var/tmp/diffusion-base-build")
    work.mkdir(parents=True, exist_ok=True)
    with _lock(Path("/var/tmp") / "diffusion-base-image.lock"):
        if image_exists(name):  # built by another session while we waited
            return name
        total = time.monotonic()
        _build_base_image(name, work)
        _log(f"base image {name} built in {time.monotonic() - total:.1f} s")
    return name


def _build_base_image(name: str, work: Path) -> None:
    if not TORCH_WHEEL.is_file():
        raise RuntimeError(f"the CPU torch wheel {TORCH_WHEEL} is missing")
    if image_exists(DEBIAN_IMAGE):
        _log(f"Debian image {DEBIAN_IMAGE} already there")
    else:
        tarball = work / "bookworm-python.tar"
        with _stage("mmdebstrap bookworm minbase + " + ",".join(DEBIAN_PACKAGES)):
            _run(
                "mmdebstrap",
                "--variant=minbase",
                "--mode=root",
                "--include=" + ",".join(DEBIAN_PACKAGES),
                # docs, man pages and translations are only weight in a test image
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--dpkgopt=path-exclude=/usr/share/locale/*",
                "--dpkgopt=path-include=/usr/share/doc/*/copyright",
                "bookworm",
                str(tarball),
                DEBIAN_MIRROR,
            )
        with _stage(f"podman import -> {DEBIAN_IMAGE}"):
            _run("podman", "--storage-driver", "vfs", "import", "--quiet", str(tarball), DEBIAN_IMAGE, capture=True)
        tarball.unlink()

    requirements = [TORCH_WHEEL.as_posix(), TORCHVISION] + [
        r for r in project_dependencies() if _requirement_name(r) not in ("torch", "torchvision")
    ]
    with _stage(f"buildah from {DEBIAN_IMAGE}"):
        container = buildah("from", "--pull-never", DEBIAN_IMAGE, capture=True).stdout.strip().splitlines()[-1]
    try:
        with _stage("pip install torch (CPU wheel), torchvision and the project's dependencies"):
            _log("  " + " ".join(requirements))
            buildah(
                "run",
                "--isolation",
                "chroot",
                "--network",
                "host",
                "-v",
                f"{HOST_CA_BUNDLE}:/etc/ssl/certs/ca-certificates.crt:ro",
                "-v",
                f"{TORCH_WHEEL.parent}:{TORCH_WHEEL.parent}:ro",
                "--env",
                "PIP_BREAK_SYSTEM_PACKAGES=1",
                "--env",
                "PIP_DISABLE_PIP_VERSION_CHECK=1",
                "--env",
                "PIP_ROOT_USER_ACTION=ignore",
                container,
                "--",
                "python3",
                "-m",
                "pip",
                "install",
                "--no-cache-dir",
                "--progress-bar",
                "off",
                *requirements,
            )
        # pip in builds on this base (the Dockerfile's, whose build isolation fetches setuptools) reaches PyPI
        # through the same TLS interception as the host: give the image the host's CA bundle (public certs only).
        buildah("copy", container, HOST_CA_BUNDLE, "/etc/ssl/certs/ca-certificates.crt", capture=True)
        with _stage("CUDA stand-in libraries for torchvision's extensions"):
            find = "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])"
            site = (
                buildah("run", "--isolation", "chroot", container, "--", "python3", "-c", find, capture=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            root = Path(buildah("mount", container, capture=True).stdout.strip())
            try:
                site_dir = root / Path(site).parent.relative_to("/")
                made = _make_cuda_stubs(root, site_dir, root / STUB_DIR.lstrip("/"), work / "stubs")
                (root / "etc/ld.so.conf.d/torchvision-cuda-stubs.conf").write_text(STUB_DIR + "\n")
                _log(f"  {', '.join(made) or 'none needed'} in {STUB_DIR}")
            finally:
                buildah("umount", container, capture=True)
            buildah("run", "--isolation", "chroot", container, "--", "ldconfig")
        with _stage("check: import torch, torchvision, pydantic"):
            check = buildah(
                "run",
                "--isolation",
                "chroot",
                container,
                "--",
                "python3",
                "-c",
                "import torch, torchvision, pydantic; from torchvision.ops import nms; "
                "print('torch', torch.__version__, 'torchvision', torchvision.__version__)",
                capture=True,
            )
            _log("  " + check.stdout.strip())
        buildah(
            "config",
            "--label",
            "org.opencontainers.image.description=diffusion-ops test base: "
            "Debian bookworm, Python 3.11, CPU torch 2.13 and the project's dependencies",
            container,
        )
        with _stage(f"buildah commit -> {name}"):
            buildah("commit", "--quiet", "--rm", container, name, capture=True)
            container = ""
    finally:
        if container:
            buildah("rm", container, capture=True, check=False)


# --- stand-ins for the CUDA libraries that PyPI's torchvision links against -----------------------------------

_LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib", "usr/lib", "usr/local/lib")


def _dynamic_symbols(lib: Path) -> tuple[list[tuple[str, str]], set[str]]:
    """(undefined non-weak symbols as (type, name[@version]), names defined) of a shared library."""
    out = subprocess.run(["readelf", "--dyn-syms", "-W", str(lib)], capture_output=True, text=True, check=True).stdout
    undefined, defined = [], set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 8 or not parts[0].endswith(":"):
            continue
        kind, bind, ndx, symbol = parts[3], parts[4], parts[6], parts[7]
        if ndx == "UND":
            if bind != "WEAK" and symbol:
                undefined.append((kind, symbol))
        else:
            defined.add(symbol.split("@")[0])
    return undefined, defined


def _needed(lib: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", "-W", str(lib)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)


def _make_cuda_stubs(root: Path, site: Path, dest: Path, scratch: Path) -> list[str]:
    """Build, into `dest`, stand-ins for the libraries torchvision's extensions need but the image lacks.

    Each stand-in defines the symbols the extensions use from it and that no library present defines: functions
    that return 0 and zeroed data (versioned like the real library where the extension asks for a version).
    Python's own symbols are left alone (the interpreter defines them). Returns the library names made.
    """
    search = [site / "torch" / "lib", site / "torchvision.libs", *(root / d for d in _LIB_DIRS)]
    missing_libs: list[str] = []
    missing: dict[str, str] = {}
    for extension in sorted((site / "torchvision").glob("*.so")):
        undefined, _ = _dynamic_symbols(extension)
        defined: set[str] = set()
        seen: set[str] = set()
        queue = [(lib, extension.parent) for lib in _needed(extension)]
        while queue:
            lib, origin = queue.pop()
            if lib in seen:
                continue
            seen.add(lib)
            path = next((d / lib for d in [origin, *search] if (d / lib).exists()), None)
            if path is None:
                if lib not in missing_libs:
                    missing_libs.append(lib)
                continue
            defined |= _dynamic_symbols(path)[1]
            queue += [(dep, path.parent) for dep in _needed(path)]
        for kind, symbol in undefined:
            base = symbol.split("@")[0]
            if base not in defined and not base.startswith(("Py", "_Py")):
                missing[symbol] = kind
    if not missing_libs:
        return []
    versioned = {lib for lib in missing_libs if any(s.endswith("@" + lib) for s in missing)}
    unversioned_home = next((lib for lib in missing_libs if lib not in versioned), missing_libs[0])
    per_lib: dict[str, list[tuple[str, str]]] = {lib: [] for lib in missing_libs}
    for symbol, kind in missing.items():
        base, _, version = symbol.partition("@")
        per_lib[version if version in per_lib else unversioned_home].append((kind, base))
    dest.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    for lib, entries in per_lib.items():
        lines = [f"/* Stand-in for {lib}: lets PyPI's (CUDA) torchvision load beside a CPU torch. */"]
        for i, (kind, base) in enumerate(sorted(entries, key=lambda e: e[1])):
            if kind == "OBJECT":
                lines.append(f'char s{i}[256] __asm__("{base}") = {{0}};')
            elif kind == "TLS":
                lines.append(f'__thread char s{i}[256] __asm__("{base}");')
            else:
                lines.append(f'long s{i}(void) __asm__("{base}");\nlong s{i}(void) {{ return 0; }}')
        source = scratch / f"{lib}.c"
        source.write_text("\n".join(lines) + "\n")
        command = ["gcc", "-shared", "-fPIC", "-O1", "-s", "-o", str(dest / lib), f"-Wl,-soname,{lib}", str(source)]
        if lib in versioned:
            version_map = scratch / f"{lib}.map"
            version_map.write_text(f"{lib} {{ global: *; }};\n")
            command.append(f"-Wl,--version-script={version_map}")
        subprocess.run(command, check=True)
    return missing_libs


# --- a local registry -----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class LocalRegistry:
    """`docker-registry serve CONFIG` on 127.0.0.1:PORT (a free port), storage under the folder given to start.

    The pid and address are recorded in the folder (registry.pid, registry.address), so that another process
    (`python -m tests.image_infra registry stop DIR`) can stop it.
    """

    def __init__(self) -> None:
        self.address: str | None = None
        self.pid: int | None = None
        self.folder: Path | None = None
        self._process: subprocess.Popen | None = None

    @classmethod
    def from_folder(cls, folder: str | Path) -> LocalRegistry:
        registry = cls()
        registry.folder = Path(folder).resolve()
        pid_file, address_file = registry.folder / "registry.pid", registry.folder / "registry.address"
        if pid_file.is_file():
            registry.pid = int(pid_file.read_text().strip())
        if address_file.is_file():
            registry.address = address_file.read_text().strip()
        return registry

    def start(self, folder: str | Path, timeout: float = 30.0) -> str:
        if self.pid is not None and _pid_alive(self.pid):
            raise RuntimeError(f"registry already running (pid {self.pid}, {self.address})")
        self.folder = Path(folder).resolve()
        (self.folder / "storage").mkdir(parents=True, exist_ok=True)
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        config = self.folder / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
            "storage:\n"
            f"  filesystem:\n    rootdirectory: {self.folder / 'storage'}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.address}\n  secret: diffusion-ops-tests\n"
        )
        log = open(self.folder / "registry.log", "ab")
        self._process = subprocess.Popen(
            ["docker-registry", "serve", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.pid = self._process.pid
        (self.folder / "registry.pid").write_text(f"{self.pid}\n")
        (self.folder / "registry.address").write_text(f"{self.address}\n")
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=2) as response:
                    if response.status == 200:
                        return self.address
            except (urllib.error.URLError, OSError):
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                tail = (self.folder / "registry.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"docker-registry did not answer on {self.address}:\n{tail}")
            time.sleep(0.1)

    def _is_ours(self) -> bool:
        """The recorded pid is still a docker-registry serving our config (not a reused pid)."""
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return any(b"registry" in part for part in cmdline[:1]) and str(self.folder / "config.yml").encode() in cmdline

    def _gone(self) -> bool:
        if self._process is not None:
            return self._process.poll() is not None
        return not _pid_alive(self.pid)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`. Safe to call twice, or when it never started."""
        if self.pid is None:
            return
        if self._process is None and not self._is_ours():
            self.pid = None
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            if self._gone():
                break
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and not self._gone():
                time.sleep(0.05)
        if self._process is not None:
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass
        if self.folder is not None:
            (self.folder / "registry.pid").unlink(missing_ok=True)
        self.pid = None
        self._process = None


def main(argv: list[str]) -> int:
    usage = "usage: python -m tests.image_infra base | registry start DIR | registry stop DIR"
    if argv[:1] == ["base"] and len(argv) == 1:
        if not image_tools_available():
            print(f"missing tools: {INSTALL_HINT}", file=sys.stderr)
            return 1
        print(ensure_base_image())
        return 0
    if argv[:1] == ["registry"] and len(argv) == 3 and argv[1] in ("start", "stop"):
        if argv[1] == "start":
            registry = LocalRegistry()
            registry.start(argv[2])
            print(f"export OPS_TEST_REGISTRY={registry.address}")
            for name, value in vfs_storage_env(argv[2]).items():
                print(f"export {name}={value}")
        else:
            LocalRegistry.from_folder(argv[2]).stop()
        return 0
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

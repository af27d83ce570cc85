"""Release hygiene: ``python -m build`` makes a wheel and an sdist, and the wheel, installed
into a fresh virtual environment, imports every public module by its dotted path.

The fresh environment gets the wheel with ``--no-deps`` and borrows the third-party
packages (jax, optax, flax, ...) of the running interpreter through a path entry placed
after its own site-packages, so the test needs no download; the wheel's declared
dependencies are checked from its metadata instead. A path entry (unlike a site
directory) does not run the ``.pth`` files of the running environment, so the editable
install of the checkout is not visible there: the test asserts that ``fishr`` is imported
from the fresh environment.
"""

from __future__ import annotations

import email
import json
import os
import pkgutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import fishr

ROOT = Path(__file__).resolve().parents[1]


def public_modules() -> list[str]:
    """Every module of the package whose dotted path has no component starting with ``_``."""
    names = ["fishr"]
    for info in pkgutil.walk_packages(fishr.__path__, prefix="fishr."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    # a copy of the tracked files, so build artefacts never land in the checkout
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        path = ROOT / name
        if path.is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes(path.read_bytes())
    proc = subprocess.run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(src)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return wheels[0], sdists[0]


def test_wheel_metadata_and_contents(dist):
    wheel, sdist = dist
    assert wheel.name.startswith(f"fishr-{fishr.__version__}-") and wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(zf.read(meta_name))
    assert meta["Version"] == fishr.__version__
    required = {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip() for r in meta.get_all("Requires-Dist")
                if "extra ==" not in r}
    assert {"jax", "jaxlib", "optax", "chex", "flax", "numpy"} <= required
    assert "fishr/py.typed" in names
    for module in public_modules():
        path = module.replace(".", "/")
        assert f"{path}.py" in names or f"{path}/__init__.py" in names, module
    assert not any(n.startswith(("tests/", "benchmarks/", "docs/")) for n in names)
    with tarfile.open(sdist) as tf:
        members = {m.name.split("/", 1)[1] for m in tf.getmembers() if "/" in m.name}
    assert {"README.md", "CHANGELOG.md", "pyproject.toml", "fishr/__init__.py", "fishr/py.typed"} <= members


def test_wheel_installs_into_a_fresh_venv_and_imports_every_public_module(dist, tmp_path):
    wheel, _ = dist
    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    python = env / "bin" / "python"
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                         capture_output=True, text=True)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    # borrow the dependencies, after the fresh environment's own site-packages
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    Path(purelib, "zz_borrowed_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    modules = public_modules()
    script = (
        "import importlib, json, sys\n"
        f"mods = {modules!r}\n"
        "loaded = {m: importlib.import_module(m).__name__ for m in mods}\n"
        "import fishr\n"
        "print(json.dumps({'file': fishr.__file__, 'version': fishr.__version__, 'n': len(loaded)}))\n"
    )
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([str(python), "-c", script], capture_output=True, text=True, cwd=tmp_path, env=clean)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).resolve().is_relative_to(env.resolve()), report
    assert report["version"] == fishr.__version__ and report["n"] == len(modules)


def test_public_modules_cover_the_documented_ones():
    want = {"fishr.capture", "fishr.curvature", "fishr.kronecker", "fishr.scores", "fishr.solvers", "fishr.linalg",
            "fishr.jacobian", "fishr.distributed", "fishr.chunking", "fishr.spectral", "fishr.compat",
            "fishr.compat.vmcnet", "fishr.compat.qmlhc", "fishr.compat.ruvector"}
    assert want <= set(public_modules())

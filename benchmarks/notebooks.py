"""Execute the notebooks in ``notebooks/`` with this interpreter's kernel (tests and refreshing saved outputs).

``python -m benchmarks.notebooks [--preset tiny] [--save] [names...]`` runs each notebook top to
bottom in a fresh kernel started from ``sys.executable`` (so the kernel sees exactly this venv's
packages, whatever kernelspecs the machine has installed) and, with ``--save``, writes it back
with its outputs. The notebooks read ``FISHR_NOTEBOOK_PRESET`` (``tiny`` in the tests, else their
documented default) to pick their problem sizes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def execute(path, preset: str | None = None, timeout: int = 900, save: bool = False):
    """Run the notebook at ``path`` in a kernel of ``sys.executable``; returns the executed notebook.

    Raises ``nbclient.exceptions.CellExecutionError`` on the first failing cell.
    """
    import nbformat
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as kernels:
        write_kernel_spec(os.path.join(kernels, "fishr-python"))  # argv: [sys.executable, -m, ipykernel_launcher, ...]
        km = KernelManager(kernel_name="fishr-python", kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernels]))
        env = dict(os.environ, OPENBLAS_NUM_THREADS=os.environ.get("OPENBLAS_NUM_THREADS", "1"))
        if preset:
            env["FISHR_NOTEBOOK_PRESET"] = preset
        else:
            env.pop("FISHR_NOTEBOOK_PRESET", None)
        old = os.environ.copy()
        os.environ.clear()
        os.environ.update(env)  # the kernel inherits this process's environment
        try:
            client = NotebookClient(nb, km=km, timeout=timeout, resources={"metadata": {"path": str(path.parent)}})
            client.execute()
        finally:
            os.environ.clear()
            os.environ.update(old)
    if save:
        nb.metadata.pop("widgets", None)
        nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
        nbformat.write(nb, path)
    return nb


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook file names (default: all)")
    parser.add_argument("--preset", default=None, help="FISHR_NOTEBOOK_PRESET for the run (e.g. tiny)")
    parser.add_argument("--save", action="store_true", help="write the outputs back into the notebooks")
    args = parser.parse_args(argv)
    paths = [p for p in notebook_paths() if not args.names or p.name in args.names]
    for p in paths:
        print(f"executing {p.name} ...", flush=True)
        execute(p, preset=args.preset, save=args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())

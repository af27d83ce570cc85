"""Sphinx configuration for the fishr documentation.

Build (warnings are errors, nitpicky: a broken cross-reference fails)::

    .venv/bin/python -m sphinx -W --keep-going -n -b html docs docs/_build/html

The pages include README.md sections between ``<!-- docs:NAME -->`` /
``<!-- docs:NAME:end -->`` markers, so the README stays the one source of the text.
At configuration time this file copies ``notebooks/*.ipynb`` into ``docs/notebooks/``
(rendered from their stored outputs, never executed) and the benchmark plots, where a
benchmark run has left them, into ``docs/_generated/`` (both copies are git-ignored).
On ``build-finished`` it checks that every public name is documented.
"""

from __future__ import annotations

import enum
import functools
import importlib
import inspect
import os
import pkgutil
import re
import shutil
import sys
import typing
from pathlib import Path

from sphinx.util import logging
from sphinx.util.typing import stringify_annotation

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
# Importing fishr imports jax: keep it on the CPU and quiet.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import fishr  # noqa: E402

project = "fishr"
author = "the fishr authors"
copyright = "the fishr authors"
release = fishr.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_nb",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "_generated", "**/.ipynb_checkpoints", ".gitignore"]
templates_path = ["_templates"]

html_theme = "furo"
html_title = f"fishr {release}"

# --- autodoc / autosummary / napoleon ------------------------------------------------
autosummary_generate = True
autosummary_generate_overwrite = True
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True  # ``damping=1e-3``, not its repr after evaluation
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True

# --- MyST / myst-nb ----------------------------------------------------------------
nb_execution_mode = "off"  # the notebooks are rendered from their stored outputs
myst_enable_extensions = ["dollarmath", "colon_fence"]
nb_merge_streams = True

# --- nitpicky mode: what may stay unresolved ------------------------------------------
# There is no network at build time (no intersphinx), so references into other
# projects cannot resolve. Each pattern below names a project outside fishr; a
# reference to fishr's own names (``fishr.*``) is never ignored and fails the build.
_EXTERNAL = [
    r"jax(lib)?(\..*)?",  # JAX: jax.Array (also as jax.jaxlib._jax.Array), jax.lax.*
    r"optax(\..*)?",  # optax: GradientTransformation(ExtraArgs) (as optax._src.base.*), ScalarOrSchedule
    r"flax(\..*)?",  # Flax: flax.linen.intercept_methods, linen / NNX modules
    r"chex(\..*)?",  # chex (a fishr dependency; its array types)
    r"numpy(\..*)?",  # NumPy: numpy.ndarray
    r"(collections\.abc|typing|enum|types)\..*",  # Python's standard library: Callable, Hashable, Enum, ...
]
nitpick_ignore_regex = [(r"py:.*", pattern) for pattern in _EXTERNAL]

suppress_warnings: list[str] = []  # nothing is suppressed

# --- copies made at configuration time ----------------------------------------------


def _sync(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` unless an identical copy is there (keeps mtimes stable)."""
    if dst.exists() and dst.read_bytes() == src.read_bytes():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


def _copy_notebooks() -> None:
    """``notebooks/*.ipynb`` -> ``docs/notebooks/`` (Sphinx reads only its source dir)."""
    out = DOCS / "notebooks"
    sources = sorted((ROOT / "notebooks").glob("*.ipynb"))
    for src in sources:
        _sync(src, out / src.name)
    names = {src.name for src in sources}
    for stale in out.glob("*.ipynb"):
        if stale.name not in names:
            stale.unlink()


# The README names these plots of ``python -m benchmarks --quick`` (benchmarks/results/,
# not tracked by git). Shown where a run has produced them, else a note says how.
PLOTS = [
    ("sr_timing.png", "SR time per call against N and P (fishr modes and NetKet)."),
    ("vmc_energy.png", "VMC energy error against wall-clock seconds, fishr and NetKet."),
    ("hydrogen_energy.png", "Hydrogen atom: energy against steps, fishr SR and Adam."),
]


def _write_plots_fragment() -> None:
    out = DOCS / "_generated"
    out.mkdir(exist_ok=True)
    parts = []
    for name, caption in PLOTS:
        src = ROOT / "benchmarks" / "results" / name
        if src.exists():
            _sync(src, out / name)
            parts.append(f":::{{figure}} /_generated/{name}\n:width: 90%\n\n`{name}`: {caption}\n:::\n")
        else:
            parts.append(f"- `benchmarks/results/{name}` ({caption}): not in this checkout; "
                         "`python -m benchmarks --quick` writes it.\n")
    text = "\n".join(parts)
    fragment = out / "benchmark_plots.md"
    if not fragment.exists() or fragment.read_text() != text:
        fragment.write_text(text)


_copy_notebooks()
_write_plots_fragment()

# --- README includes: repository-relative links -----------------------------------

_LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)")


def _rewrite_readme_links(app, relative_path, parent_docname, content) -> None:
    """A README link to a repository file (``[text](benchmarks/x.md)``) has no page here.

    Rewritten to its text and the path in code, so that included README text cannot
    break the nitpicky build; absolute URLs and ``#anchors`` are left alone.
    """
    if Path(relative_path).name != "README.md":
        return

    def repl(match: re.Match) -> str:
        text, target = match.groups()
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            return match.group(0)
        return text if text.strip("`") == target else f"{text} (`{target}` in the repository)"

    content[0] = _LINK.sub(repl, content[0])


# --- autodoc: class members --------------------------------------------------------


def _skip_member(app, what, name, obj, skip, options):
    """Class members: every public method and property (``:undoc-members:``), no fields.

    The fields of fishr's NamedTuples and dataclasses are documented by the class's
    ``Attributes:`` section; documenting them again as members would describe each
    twice. Enum members are kept.
    """
    if what not in ("class", "exception") or skip:
        return None
    if isinstance(obj, enum.Enum):
        return None
    if inspect.isroutine(obj) or isinstance(obj, (property, functools.cached_property)):
        return None
    return True


# --- autodoc: NamedTuple signatures -----------------------------------------------


def _namedtuple_signature(app, what, name, obj, options, signature, return_annotation):
    """A NamedTuple's signature with fishr's own field types under their full names.

    autodoc reads the signature of the generated ``__new__``, where the string
    annotations (``from __future__ import annotations``) cannot be evaluated, so a
    type written with a module alias (``F.KroneckerFactors`` in ``fishr._kfac``) would be
    shown, and cross-referenced, as written. Each field whose evaluated type is a fishr
    class is shown as ``module.qualname``; the others as written in the source.
    """
    if what != "class" or not (inspect.isclass(obj) and issubclass(obj, tuple) and hasattr(obj, "_fields")):
        return None
    try:
        hints = typing.get_type_hints(obj)
    except Exception:  # leave autodoc's own signature
        return None
    raw = getattr(obj, "__annotations__", {})
    defaults = getattr(obj, "_field_defaults", {})
    parts = []
    for field in obj._fields:
        text = field
        hint = hints.get(field)
        if inspect.isclass(hint) and hint.__module__.split(".")[0] == "fishr":
            text += f": {hint.__module__}.{hint.__qualname__}"
        elif field in raw:
            annotation = raw[field]
            if isinstance(annotation, typing.ForwardRef):
                annotation = annotation.__forward_arg__
            text += f": {annotation if isinstance(annotation, str) else stringify_annotation(annotation)}"
        if field in defaults:
            text += f" = {defaults[field]!r}"
        parts.append(text)
    return f"({', '.join(parts)})", return_annotation


# --- autodoc: the damping / learning-rate type ------------------------------------

# fishr._validate.ScalarOrSchedule is ``float | jax.Array | optax.Schedule``, the same
# union as ``optax.ScalarOrSchedule``. autodoc expands it in every signature (a
# ``Callable`` over six array and scalar types); this shows optax's name instead.
# (``autodoc_type_aliases`` cannot: it renders ``ScalarOrSchedule | None`` as an
# unresolvable ``TypeAliasForwardRef``.) Where the expansion differs (another optax or
# jax version), the signature is left as autodoc wrote it.
try:
    import optax as _optax

    _SCHEDULE_FORMS = {stringify_annotation(_optax.ScalarOrSchedule, mode)
                       for mode in ("fully-qualified-except-typing", "smart")}
except Exception:  # pragma: no cover - optax is a dependency of fishr
    _SCHEDULE_FORMS = set()


def _process_signature(app, what, name, obj, options, signature, return_annotation):
    """Both rewrites above (the event takes the first handler's result, so one handler)."""
    result = _namedtuple_signature(app, what, name, obj, options, signature, return_annotation)
    if result is not None:
        signature, return_annotation = result
    if not signature or not name.startswith("fishr"):
        return result
    for form in _SCHEDULE_FORMS:
        signature = signature.replace(form, "optax.ScalarOrSchedule")
    return signature, return_annotation


# --- completeness check ---------------------------------------------------------


def public_names() -> set[str]:
    """Every public name: ``fishr.__all__``, each public module and its ``__all__``.

    Public modules: every module under ``fishr`` with no dotted component that starts
    with an underscore (``fishr.compat.vmcnet`` is public, ``fishr._sr`` is not).
    """
    names = {f"fishr.{name}" for name in fishr.__all__}
    for info in pkgutil.walk_packages(fishr.__path__, "fishr."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        module = importlib.import_module(info.name)
        names.add(info.name)
        names.update(f"{info.name}.{name}" for name in getattr(module, "__all__", ()))
    return names


def _check_complete(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    documented = set(app.env.get_domain("py").objects)
    missing = sorted(public_names() - documented)
    if missing:
        logging.getLogger(__name__).warning(
            "public names not in the API reference (add them to docs/api/*.rst): %s",
            ", ".join(missing),
            type="fishr", subtype="api-completeness",
        )


def setup(app):
    app.connect("include-read", _rewrite_readme_links)
    app.connect("autodoc-skip-member", _skip_member)
    app.connect("autodoc-process-signature", _process_signature)
    app.connect("build-finished", _check_complete)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


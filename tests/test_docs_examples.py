"""Every code example runs: the ```python blocks of README.md and of the docs pages, and the
``Examples:`` sections of public docstrings.

Markdown blocks. Each ```python block runs on its own, in a fresh namespace, in a child
interpreter per file (so a block that changes JAX's configuration cannot leak into the
other tests), with ``HOME`` in a temporary folder. A block may be preceded, on the line
before its fence, by an HTML comment that the rendered page does not show:

* ``<!-- example: context=NAME -->``: run ``CONTEXTS[NAME]`` first, which defines the
  names the block takes from its surrounding prose (a model, samples, gradients);
* ``<!-- example: requires=PKG context=NAME -->``: as above, skipped when ``PKG`` is not
  installed (the NetKet example; the ``bench`` extra has it);
* ``<!-- example: skip REASON -->``: not run, for a reason stated in the marker (a block
  that needs a cluster). The test lists these so they stay few.

Docstrings: ``>>>`` examples of every public module and public name, by :mod:`doctest`.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
MARKER = re.compile(r"<!--\s*example:\s*(.*?)\s*-->\s*$")

_COMMON = """
import jax, jax.numpy as jnp, numpy as np, optax, fishr
from jax.sharding import NamedSharding, PartitionSpec
"""

CONTEXTS = {
    # a VMC step's inputs: an RBM log psi, spin samples, local energies and the VMC force
    "vmc": _COMMON + """
L, H, N = 6, 8, 32
def log_psi(params, sigma):
    theta = sigma @ params["W"] + params["b"]
    return jnp.sum(jnp.logaddexp(theta, -theta) - jnp.log(2.0), axis=-1) + sigma @ params["a"]
key = jax.random.key(0)
params = {"W": 0.1 * jax.random.normal(key, (L, H)), "b": jnp.zeros(H), "a": jnp.zeros(L)}
sigma = samples = jnp.where(jax.random.bernoulli(jax.random.key(1), 0.5, (N, L)), 1.0, -1.0)
e_loc = jax.random.normal(jax.random.key(2), (N,))
_, _vjp = jax.vjp(lambda p: log_psi(p, sigma), params)
(grad,) = _vjp(2.0 * (e_loc - e_loc.mean()) / N)
grads = grad
lr = 0.02
""",
    # a small Flax classifier with integer labels
    "classifier": _COMMON + """
import flax.linen as nn
class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(8)(x)))
model = MLP()
x = jax.random.normal(jax.random.key(0), (16, 4))
y = jax.random.randint(jax.random.key(1), (16,), 0, 3)
params = model.init(jax.random.key(2), x)
def loss(params, x, y):
    logits = model.apply(params, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
loss_fn = lambda params, batch: loss(params, *batch)
""",
    # a small Flax regression model with a squared-error loss
    "regression": _COMMON + """
import flax.linen as nn
model = nn.Dense(2)
x = jax.random.normal(jax.random.key(0), (16, 4))
y = jax.random.normal(jax.random.key(1), (16, 2))
params = model.init(jax.random.key(2), x)
def loss_fn(params, x, y):
    return 0.5 * jnp.mean(jnp.sum((model.apply(params, x) - y) ** 2, axis=-1))
""",
    # K-FAC on a per-sample score function (ruvector's setting)
    "scores": _COMMON + """
import flax.linen as nn
model = nn.Dense(1)
batch = jax.random.normal(jax.random.key(0), (16, 4))
params = model.init(jax.random.key(1), batch)
score_fn = lambda params, batch: model.apply(params, batch)[:, 0]
damping, learning_rate = 1e-3, 0.1
""",
    # the branch methods' inputs: K branches of a D-dimensional state
    "branch": _COMMON + """
params = {"w": jnp.linspace(-0.5, 0.5, 6), "b": jnp.zeros(2)}
grads = {"w": jnp.linspace(0.1, 0.6, 6), "b": jnp.ones(2)}
B = jax.random.normal(jax.random.key(0), (5, 3))
fisher_damp = damp = 1e-2
cg_iters, lr, clip, blocks = 8, 0.1, 1.0, 2
""",
    # a NetKet variational state (the bench extra)
    "netket": _COMMON + """
import netket as nk
graph = nk.graph.Chain(6)
hilbert = nk.hilbert.Spin(0.5, N=graph.n_nodes)
hamiltonian = nk.operator.Ising(hilbert, graph, h=1.0)
model = nk.models.RBM(alpha=1, param_dtype=float)
vstate = nk.vqs.MCState(nk.sampler.MetropolisLocal(hilbert), model, n_samples=64, seed=0, sampler_seed=1)
lr, n_steps = 0.02, 2
""",
}


def markdown_files() -> list[Path]:
    """README.md and every docs page with a ```python block (most pages include README sections)."""
    docs = ROOT / "docs"
    pages = sorted(p for p in docs.rglob("*.md") if "_build" not in p.parts and "generated" not in p.parts) \
        if docs.is_dir() else []
    return [p for p in [ROOT / "README.md", *pages] if "```python" in p.read_text()]


def blocks_of(path: Path) -> list[dict]:
    """The ```python blocks of a Markdown file with their line and marker options."""
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        options = marker.group(1) if marker else ""
        skip = options.startswith("skip")
        fields = dict(f.split("=", 1) for f in options.split() if "=" in f) if not skip else {}
        out.append(dict(line=line, code=m.group(1), skip=options[4:].strip() if skip else None,
                        context=fields.get("context"), requires=fields.get("requires")))
    return out


_RUNNER = r'''
import json, sys, traceback
blocks = json.load(open(sys.argv[1]))
failures = []
for b in blocks:
    ns = {"__name__": "__example__"}
    try:
        exec(compile(b["context"], b["where"] + " (context)", "exec"), ns)
        exec(compile(b["code"], b["where"], "exec"), ns)
    except Exception:
        failures.append(b["where"] + "\n" + traceback.format_exc(limit=4))
print(json.dumps(failures))
'''


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_python_blocks_run(path, tmp_path):
    blocks = blocks_of(path)
    run = []
    for b in blocks:
        if b["skip"] is not None:
            assert b["skip"], f"{path.name}:{b['line']}: a skipped example must say why"
            continue
        if b["requires"] and importlib.util.find_spec(b["requires"]) is None:
            continue
        if b["context"] is not None:
            assert b["context"] in CONTEXTS, f"{path.name}:{b['line']}: unknown context {b['context']!r}"
        run.append(dict(where=f"{path.relative_to(ROOT)}:{b['line']}", code=b["code"],
                        context=CONTEXTS.get(b["context"], "")))
    if not run:
        pytest.skip(f"{path.name} has no runnable python block here")
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps(run))
    env = dict(os.environ, HOME=str(tmp_path), PYTHONPATH=str(ROOT),
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", _RUNNER, str(spec)], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, "\n\n".join(failures)


def test_skipped_examples_are_few_and_explained():
    skipped = [(p.name, b["line"], b["skip"]) for p in markdown_files() for b in blocks_of(p) if b["skip"] is not None]
    assert all(reason for *_, reason in skipped)
    assert len(skipped) <= 2, skipped


def public_objects():
    """Every public module of fishr and every public name it lists in ``__all__``."""
    import fishr
    from tests.test_release import public_modules

    seen = {}
    for name in public_modules():
        module = importlib.import_module(name)
        seen[name] = module
        for attr in getattr(module, "__all__", ()):
            obj = getattr(module, attr)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                seen.setdefault(f"{obj.__module__}.{obj.__qualname__}", obj)
    assert fishr.sr in seen.values()
    return seen


def docstring_examples():
    finder = doctest.DocTestFinder(recurse=False)
    tests = []
    for name, obj in sorted(public_objects().items()):
        for test in finder.find(obj, name, globs={}):
            if test.examples:
                tests.append(test)
    return tests


DOCTESTS = docstring_examples()


def test_public_docstrings_have_examples():
    names = {t.name for t in DOCTESTS}
    for want in ("fishr._sr.sr", "fishr._sr_solve.sr_solve", "fishr._kfac.kfac", "fishr.solvers.CG"):
        assert want in names, sorted(names)


@pytest.mark.parametrize("test", DOCTESTS, ids=lambda t: t.name)
def test_docstring_examples_run(test):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    test.globs = {}
    out = []
    result = runner.run(test, out=out.append)
    assert result.failed == 0, textwrap.indent("".join(out), "  ")


def test_readme_commands_are_the_ones_ci_runs():
    """The README's test command and its checks command are what ``.ci/run`` runs (the
    README's third command, the main job, runs the benchmarks and is not part of CI)."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    bash = re.findall(r"^```bash[ \t]*\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    test_command = next(b for b in bash if "pytest" in b).strip()
    assert test_command.split(" && ", 2)[2] in ci  # after the venv set-up, which .ci/run does line by line
    checks = next(b for b in bash if "sphinx" in b).strip()
    for command in checks.split(" && "):
        assert command in ci, command

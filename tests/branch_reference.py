"""NumPy float64 statements of the branch methods and of qmlhc's two optimizers (test references)."""

import numpy as np


def np_cov(b):
    """qmlhc's cov_empirical: centred by column means, divided by max(1, K - 1)."""
    bc = b - b.mean(axis=0, keepdims=True)
    return bc.T @ bc / max(1, b.shape[0] - 1)


def np_cg(a_mul, b, iters, tol):
    """qmlhc's cg_solve as the seeds' README states it."""
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rs_old = r @ r
    for _ in range(iters):
        ap = a_mul(p)
        alpha = rs_old / max(1e-12, p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = r @ r
        if np.sqrt(rs_new) < tol:
            break
        p = r + (rs_new / max(1e-12, rs_old)) * p
        rs_old = rs_new
    return x


def np_natgrad(g, b, p, damping, solver="cg", iters=8, tol=1e-6):
    c = np_cov(b)
    gs = p.T @ g
    if solver == "cg":
        v = np_cg(lambda v: c @ v + damping * v, gs, iters, tol)
    else:
        v = np.linalg.solve(c + damping * np.eye(c.shape[0]), gs)
    return p @ v


def np_block_sizes(d, blocks):
    blocks = max(1, min(blocks, d))
    sizes = np.full(blocks, d // blocks, dtype=int)
    sizes[: d % blocks] += 1
    return sizes


def np_kfac(g, b, p, damping, blocks):
    d = b.shape[1]
    c = np_cov(b) + damping * np.eye(d)
    gs = p.T @ g
    v = np.zeros_like(gs)
    start = 0
    for cut in np.cumsum(np_block_sizes(d, blocks)):
        v[start:cut] = np.linalg.solve(c[start:cut, start:cut], gs[start:cut])
        start = cut
    return p @ v


def np_qmlhc_run(kind, params, contexts, *, lr, damping, seed, clip=None, cg_iters=8, blocks=4, grad_fn=None):
    """qmlhc's HCNaturalGrad (kind="natgrad") / HCKFACLike (kind="kfac") over several steps.

    Sorted-key flattening, one default_rng(seed) draw of P (n x D) / sqrt(D) per step
    with 2-D branches, theta - lr * precond, optional clip. The gradient is
    ``grad_fn(params, context)`` (flat) if given, else ``context["grads"]``. Yields (params, state).
    """
    rng = np.random.default_rng(seed)
    keys = sorted(params)
    shapes = {k: np.shape(params[k]) for k in keys}
    theta = np.concatenate([np.atleast_1d(np.asarray(params[k], dtype=float)).reshape(-1) for k in keys])
    current = params
    for step, ctx in enumerate(contexts, start=1):
        if grad_fn is not None:
            g = np.asarray(grad_fn(current, ctx), dtype=float).reshape(-1)
        else:
            g = np.concatenate([np.atleast_1d(np.asarray(ctx["grads"][k], dtype=float)).reshape(-1) for k in keys])
        b = ctx.get("info", {}).get("branches", None)
        if b is None or np.asarray(b).ndim != 2:
            pre = g
        else:
            b = np.asarray(b, dtype=float)
            d = b.shape[1]
            p = rng.normal(size=(theta.size, d)) / np.sqrt(d)
            pre = (np_natgrad(g, b, p, damping, "cg", cg_iters) if kind == "natgrad"
                   else np_kfac(g, b, p, damping, blocks))
        theta = theta - lr * pre
        if clip is not None:
            theta = np.clip(theta, -clip, clip)
        out, start = {}, 0
        for k in keys:
            n = int(np.prod(shapes[k], dtype=int))
            out[k] = theta[start:start + n].reshape(shapes[k])
            start += n
        current = out
        yield out, {"steps": step, "precond_norm": float(np.linalg.norm(pre))}

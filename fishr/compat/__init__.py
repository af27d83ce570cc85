"""The seeds' own interfaces as thin adapters over fishr's methods.

* :mod:`fishr.compat.vmcnet`: ``get_fisher_inverse_fn`` / ``SRMode`` (stochastic reconfiguration).
* :mod:`fishr.compat.qmlhc`: ``HCNaturalGrad`` / ``HCKFACLike`` (branch natural gradient).
* :mod:`fishr.compat.ruvector`: ``KFACLayer`` / ``KFACApproximation`` (block K-FAC).

Import the submodule you need, e.g. ``from fishr.compat import vmcnet``.
"""

"""How large the values a traced function computes are: memory bounds checked on the jaxpr, exact and fast."""

import numpy as np


def intermediate_sizes(jaxpr):
    """Element counts of every value a jaxpr computes, inside loop and branch bodies too."""
    for eqn in jaxpr.eqns:
        yield from (int(np.prod(var.aval.shape)) for var in eqn.outvars)
        for param in eqn.params.values():
            for inner in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    yield from intermediate_sizes(inner)

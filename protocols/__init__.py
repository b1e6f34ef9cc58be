"""Secure aggregation protocols (masked SecAgg+ and CKKS homomorphic encryption).

A package of its own: it works on flat numeric vectors with numpy and ``cryptography``
and never imports torch or ``feddat_secure``, so it can be reviewed and deployed on its
own. The protocols land with the secure-aggregation issue; until then the runner
aggregates in the clear and says so in its output.
"""

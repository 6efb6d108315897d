"""Dynamic evaluation (Krause et al. 2018, 2019; SPEC 3): `update.py` holds the update rule (sgd, rms,
decay toward the original weights, parameter selection), reusable by any method; `method.py` the
`dynamic-eval` method."""

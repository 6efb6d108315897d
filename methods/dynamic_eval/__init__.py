"""Dynamic evaluation (Krause et al. 2018, 2019; SPEC 3): `method.py` registers the `dynamic-eval` method.
Its body and the update rule (sgd, rms, decay toward the original weights, parameter selection) are in
tta_bench_methods._common, shared with fwl-dynamic-eval and finetune-dynamic-eval."""

"""Machinery the built-in methods share; no method lives here (the registry skips folders named `_*`):
`selection` (which parameters a method adapts), `update` (the dynamic-evaluation update rule, its rms
statistics and the scored segment it steps on), `dyneval` (the dynamic-eval method's body, registered by
dynamic-eval and finetune-dynamic-eval), `lanes` (per-lane adapted weights, one vmapped forward for
the lanes whose inputs share a shape) and `trainer` (one optimizer loop with early stopping, for FWL
training and finetune). Methods import from here, never from each other."""

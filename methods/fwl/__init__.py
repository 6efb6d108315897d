"""Fast Weight Layers (Clark et al., "Meta-Learning Fast Weight Language Models", EMNLP 2022; SPEC 3):
`block.py` the block and its exact fast-weight math (linear attention, chunked), `train.py` its
meta-training and checkpoints, `method.py` the `fwl`, `fwl-static` (its control) and `fwl-dynamic-eval` methods."""

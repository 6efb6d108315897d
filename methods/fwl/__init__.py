"""Fast Weight Layers (Clark et al., "Meta-Learning Fast Weight Language Models", EMNLP 2022; SPEC 3):
`block.py` the block and its exact fast-weight math (linear attention, chunked; the memory and gradient
options as small strategy objects, `decayed.py` the decayed memory), `train.py` its meta-training and
checkpoints, `scope.py` and `gate.py` the methods' `fast_state` and `gate` options, `method.py` the `fwl`,
`fwl-static` (its control) and `fwl-dynamic-eval` methods."""

"""How a cell is scored (SPEC 2, 4, 5): the protocol loop (score a segment, then adapt on it), the
tokenized stream it walks, the language model and the models that can be loaded, the FLOP ledger
and the metrics."""

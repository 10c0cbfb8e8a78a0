"""Pure decisions for the batcher (proxy/batcher.py): who may share an upstream call (`keys`), and how
inputs are merged and answers split back, usage apportioned and failures bisected (`merge`). No I/O."""

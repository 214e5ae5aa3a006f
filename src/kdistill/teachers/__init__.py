"""Teachers: anything that yields logits for a batch. Live modules and cached outputs (:mod:`.base`), logits files and ONNX
(:mod:`.blackbox`), ensembles, specialists, cached augmented views (:mod:`.views`) and getting a teacher ready
for a run (:mod:`.teaching`)."""

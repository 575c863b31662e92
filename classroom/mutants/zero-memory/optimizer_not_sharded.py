# Forgets to shard the optimizer states: 12Φ on every rank at every stage, instead of 12Φ/N from stage 1 on.
out = {"params": param_bytes * phi / (n if stage >= 3 else 1), "grads": param_bytes * phi / (n if stage >= 2 else 1),
       "optimizer": ADAM_BYTES * phi, "cpu": 0.0, "nvme": 0.0}

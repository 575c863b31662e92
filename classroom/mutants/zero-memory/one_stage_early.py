# Shards each piece one stage too early: gradients from stage 1, parameters from stage 2.
out = {"params": param_bytes * phi / (n if stage >= 2 else 1), "grads": param_bytes * phi / (n if stage >= 1 else 1),
       "optimizer": ADAM_BYTES * phi / (n if stage >= 1 else 1), "cpu": 0.0, "nvme": 0.0}

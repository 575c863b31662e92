# Hard-codes 2 bytes (fp16) per parameter and gradient, ignoring param_bytes: an fp32 or fp8 run is mis-predicted.
out = {"params": 2 * phi / (n if stage >= 3 else 1), "grads": 2 * phi / (n if stage >= 2 else 1),
       "optimizer": ADAM_BYTES * phi / (n if stage >= 1 else 1), "cpu": 0.0, "nvme": 0.0}

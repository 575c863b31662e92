# Counts N steps per phase instead of N-1: a rank never sends the chunk it keeps.
phase = n * math.ceil(numel / n) * element_size
return {"ring_reduce_scatter": phase, "ring_all_gather": phase, "ring_all_reduce": 2 * phase}

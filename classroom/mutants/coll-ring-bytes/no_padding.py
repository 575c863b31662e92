# Counts (N-1)/N of the exact bytes: right when N divides numel, but the zero padding crosses the wire too.
phase = (n - 1) / n * numel * element_size
return {"ring_reduce_scatter": phase, "ring_all_gather": phase, "ring_all_reduce": 2 * phase}

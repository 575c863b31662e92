# Applies the bubble's share (p−1)/(v·m+p−1) to the ideal time m·t_mb, not to the pipeline's whole time.
bubble = (pp - 1) / (v * m + pp - 1) * m * t_mb

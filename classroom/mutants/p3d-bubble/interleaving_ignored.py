# Forgets that interleaving v chunks per stage makes each fill and drain slot v times shorter.
bubble = (pp - 1) * t_mb

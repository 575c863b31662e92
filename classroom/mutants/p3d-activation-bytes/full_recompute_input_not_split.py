# Keeps the whole layer input under full recomputation, though sequence parallelism splits it over the TP ranks.
if recompute == "full":
    return 2 * s * b * h
attention = 0 if recompute == "selective" else 5 * a * s / h
return s * b * h * ((34 + attention) / tp if sp else 10 + (24 + attention) / tp)

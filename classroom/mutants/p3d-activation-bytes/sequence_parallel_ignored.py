# Ignores sequence parallelism: the 10·sbh of layer norms, dropout masks and residuals stays whole on every TP rank.
if recompute == "full":
    return 2 * s * b * h / (tp if sp else 1)
attention = 0 if recompute == "selective" else 5 * a * s / h
return s * b * h * (10 + (24 + attention) / tp)

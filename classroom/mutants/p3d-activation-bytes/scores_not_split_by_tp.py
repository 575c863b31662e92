# Leaves the 5as/h of attention scores whole, though each TP rank computes only its a/t heads' scores.
if recompute == "full":
    return 2 * s * b * h / (tp if sp else 1)
attention = 0 if recompute == "selective" else 5 * a * s / h
return s * b * h * (34 / tp + attention if sp else 10 + 24 / tp + attention)

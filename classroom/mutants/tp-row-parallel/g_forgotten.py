# Forgets g: each rank keeps its own partial product X_r A_r, never summed over the ranks.
if not self.input_is_parallel:
    x = scatter_to_tp_region(x, self.group)  # (B, T, in/N)
y = F.linear(x, self.weight)

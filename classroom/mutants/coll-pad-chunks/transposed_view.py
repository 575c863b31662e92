# Views the padded tensor as (c, n) and transposes: row i holds every N-th element, not the i-th slice.
flat = x.reshape(-1)  # (numel,)
c = math.ceil(flat.numel() / n)
padded = torch.zeros(n * c, dtype=x.dtype, device=x.device)
padded[: flat.numel()] = flat
return padded.view(c, n).t()

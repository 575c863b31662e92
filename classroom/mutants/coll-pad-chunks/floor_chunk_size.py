# Rounds the chunk size down: the last numel mod N elements have no room (or are lost) when N does not divide numel.
flat = x.reshape(-1)  # (numel,)
c = flat.numel() // n
padded = torch.zeros(n * c, dtype=x.dtype, device=x.device)
padded[: flat.numel()] = flat
return padded.view(n, c)

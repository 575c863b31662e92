# Serves every token's first choice before any second choice: a different (Switch-like) priority than asked for.
one_hot = F.one_hot(experts.t().flatten(), n_experts)  # (k·T, E), slot-major
position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1
return (position < capacity).view(experts.shape[1], experts.shape[0]).t()

# Counts slots from 1 and compares with <=: one assignment too many per expert.
one_hot = F.one_hot(experts.flatten(), n_experts)  # (T·k, E)
position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1
return (position <= capacity).view_as(experts)

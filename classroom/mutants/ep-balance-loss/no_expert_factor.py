# Forgets the factor E, so the balanced value is 1/E instead of 1.
f = torch.bincount(experts.flatten(), minlength=n_experts).to(probs.dtype) / experts.numel()
return (f * probs.mean(dim=0)).sum()

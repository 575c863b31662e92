# Divides by the T tokens instead of the k·T assignments: right only for top-1.
f = torch.bincount(experts.flatten(), minlength=n_experts).to(probs.dtype) / experts.shape[0]
return n_experts * (f * probs.mean(dim=0)).sum()

# Caps the number of experts per token instead of the number of tokens per expert.
slot = torch.arange(experts.shape[1], device=experts.device).expand_as(experts)
return slot < capacity

# Subtracts each rank's own max: the exponentials summed over the ranks no longer share one scale.
logits = logits.float()
row_max = logits.max(dim=-1).values
shifted = logits - row_max.unsqueeze(-1)
exp = shifted.exp()
sum_exp = _all_reduce(exp.sum(dim=-1), group)
local = targets - start
mine = (local >= 0) & (local < logits.shape[-1])
picked = shifted.gather(1, local.clamp(0, logits.shape[-1] - 1).unsqueeze(1)).squeeze(1)  # (N_tokens,)
target_logit = _all_reduce(torch.where(mine, picked, torch.zeros_like(row_max)), group)
ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), local, mine)
return (sum_exp.log() - target_logit).mean()

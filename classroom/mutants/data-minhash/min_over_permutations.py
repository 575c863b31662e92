# Builds the (shingles, permutations) table and takes the minimum over the wrong axis: one value per shingle.
a, b = permutation_params(num_perm, seed)
if not shingle_set:
    return np.full(num_perm, MAX_HASH, dtype=np.uint64)
h = np.array([struct.unpack("<I", hashlib.sha1(s.encode("utf-8")).digest()[:4])[0] for s in shingle_set],
             dtype=np.uint64)
with np.errstate(over="ignore"):
    table = ((h[:, None] * a[None, :] + b[None, :]) % np.uint64(MERSENNE_PRIME)) & np.uint64(MAX_HASH)  # (S, num_perm)
return table.min(axis=1)

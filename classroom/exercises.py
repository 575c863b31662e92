"""The exercises: where each one is cut, how many points it is worth, and which of the project's tests grade it.

level: 1 = a pure function, 2 = a single-process mechanism, 3 = several processes with torch.distributed.
tests: pytest node ids, run from the repository root; the exercise scores its points when all of them pass.
Known-wrong answers live in classroom/mutants/<id>/*.py: each replaces the solution region, and `check` makes sure
the tests catch every one of them.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Exercise:
    id: str
    file: str  # the script (or notebook) that holds the solution region
    function: str  # the function or Class.method around the region
    level: int
    points: int
    tests: tuple[str, ...]
    task: str  # what to write, in one line: the student copy's NotImplementedError says it

    @property
    def stars(self) -> str:
        return "★" * self.level


T_COLL = "tests/test_collectives.py::"
T_TP = "tests/test_tensor_parallel.py::"
T_EP = "tests/test_expert_parallel.py::"
T_P3D = "tests/test_parallel_3d.py::"
EXERCISES = [
    Exercise("coll-pad-chunks", "collectives.py", "pad_chunks", 1, 2,
             (T_COLL + "test_pad_chunks_rows_are_consecutive_slices_then_zeros",),
             "flatten x, zero-pad it to N*ceil(numel/N) elements and view it as N rows, row i = chunk i"),
    Exercise("coll-ring-bytes", "collectives.py", "ring_bytes_formula", 1, 2,
             (T_COLL + "test_ring_bytes_formula_by_hand",),
             "bytes one rank sends in each ring phase and in the ring all-reduce, zero padding included"),
    Exercise("coll-ring-reduce-scatter", "collectives.py", "ring_reduce_scatter", 3, 4,
             (T_COLL + "test_ring_collectives_equal_builtins_and_bytes_equal_formula_under_nccl_rules[3]",),
             "step s: send chunk r-s-1 to the next rank while receiving chunk r-s-2 from the previous, and add it"),
    Exercise("tp-row-parallel", "tensor_parallel.py", "RowParallelLinear.forward", 2, 3,
             (T_TP + "test_every_layer_equals_the_dense_layer[2]",),
             "split a full input, multiply by this rank's rows of A and sum the partial products with g into y"),
    Exercise("tp-vocab-embedding", "tensor_parallel.py", "VocabParallelEmbedding.forward", 2, 3,
             (T_TP + "test_vocab_parallel_embedding_equals_dense[2]",),
             "look up the ids in this rank's vocabulary range, zero the rows of the others, sum over the ranks"),
    Exercise("tp-vocab-cross-entropy", "tensor_parallel.py", "_VocabParallelCrossEntropy.forward", 2, 3,
             (T_TP + "test_vocab_parallel_cross_entropy_equals_dense[2]",),
             "mean cross-entropy from this rank's logit columns: all-reduce the row max, the sum of exp and the "
             "target logit; save (softmax, local targets, mine) for backward"),
    Exercise("ep-capacity", "expert_parallel.py", "within_capacity", 1, 2,
             (T_EP + "test_within_capacity_is_first_come_first_served",
              T_EP + "test_moe_layer_equals_a_loop_over_tokens"),
             "keep each assignment that fits its expert's capacity, first come first served in token order"),
    Exercise("ep-balance-loss", "expert_parallel.py", "load_balancing_loss", 1, 2,
             (T_EP + "test_load_balancing_loss_by_hand",),
             "the Switch loss E * sum_e f_e * P_e, f_e over all k*T assignments"),
    Exercise("ep-all-to-all-backward", "expert_parallel.py", "_AllToAll.backward", 2, 3,
             (T_EP + "test_expert_parallel_equals_single_process[2-4-softmax]",),
             "send each row's gradient back to the rank it came from (the conjugate all-to-all)"),
    Exercise("ep-sync-gradients", "expert_parallel.py", "sync_gradients", 3, 4,
             (T_EP + "test_expert_parallel_with_data_parallel",
              T_EP + "test_expert_parallel_equals_single_process[2-4-softmax]"),
             "average shared gradients over all ranks and expert gradients over the expert's replicas"),
    Exercise("p3d-mesh-coordinates", "parallel_3d.py", "mesh_coordinates", 1, 2,
             (T_P3D + "test_mesh_coordinates_groups",),
             "each rank's (d, p, t) with rank = (d*N_PP + p)*N_TP + t, and the TP, PP and DP groups, in that order"),
    Exercise("p3d-activation-bytes", "parallel_3d.py", "activation_bytes", 1, 2,
             (T_P3D + "test_activation_bytes_follow_korthikanti_table_2",
              T_P3D + "test_korthikanti_activations_match_the_saved_tensors_counted_here"),
             "Korthikanti's bytes per layer: sbh(34 + 5as/h), split by TP and SP, less what recomputation drops"),
    Exercise("p3d-bubble", "parallel_3d.py", "step_time", 1, 2,
             (T_P3D + "test_bubble_follows_the_schedule_formula",),
             "bubble = the idle seconds that are (p-1)/(v*m + p-1) of the pipeline's time m*t_mb + bubble"),
    Exercise("p3d-tied-grads", "parallel_3d.py", "allreduce_tied_grads", 3, 4,
             (T_P3D + "test_tied_gradients_are_summed_between_first_and_last_stage_of_each_replica",),
             "give both copies of a tied embedding/head (first and last stage) the sum of their gradients"),
    Exercise("zero-memory", "zero.py", "estimate_memory", 1, 2,
             ("tests/test_zero.py::test_estimate_memory_follows_the_papers",),
             "out: bytes per rank of params and grads (param_bytes*Φ each) and optimizer states (12Φ), each divided "
             "by N from its stage on (3, 2, 1); cpu and nvme 0"),
    Exercise("zero-bucket-hook", "zero.py", "BucketedReduction._grad_ready", 3, 4,
             ("tests/test_zero.py::test_one_stage_on_two_ranks[stage0]",),
             "count bucket i's new gradient, then launch (self._launch) every complete bucket from self._next on, "
             "in bucket order"),
    Exercise("zero-reduce-scatter", "zero.py", "ShardedGradientOptimizer._launch", 3, 4,
             ("tests/test_zero.py::test_one_stage_on_two_ranks[stage2]",),
             "flatten bucket i's gradients divided by N, free the full p.grad, reduce-scatter them (async) into "
             "self.grad_shards[i]; return (work, land)"),
    Exercise("zero-gather-free", "zero.py", "FullyShardedDataParallel._after_forward", 3, 4,
             ("tests/test_zero.py::test_one_stage_on_two_ranks[stage3]",),
             "free the unit after its forward, and hook every output that needs a gradient so that backward gathers "
             "the unit again before it reaches it"),
    Exercise("data-minhash", "data_pipeline.py", "minhash", 2, 3,
             ("tests/test_data_pipeline.py::test_sha1_minhash_equals_datasketch_bit_for_bit",),
             "h = SHA-1's first 4 bytes little-endian; with (a, b) = permutation_params(num_perm, seed) keep per "
             "permutation the min of ((a*h + b) mod (2^61-1)) & (2^32-1) over the shingles, MAX_HASH if none"),
    Exercise("data-lsh-params", "data_pipeline.py", "lsh_params", 1, 2,
             ("tests/test_data_pipeline.py::test_lsh_params_equal_datasketch",),
             "try every b bands of r rows with b*r <= num_perm; P(candidate) = 1 - (1 - s^r)^b; integrate it below "
             "the threshold (fp) and 1 minus it above (fn); return the (b, r) of least weighted error"),
    Exercise("data-mixture-epochs", "data_mixing.py", "plan_mixture", 1, 2,
             ("tests/test_data_mixing.py::test_plan_mixture_normalises_the_weights_and_counts_fractional_epochs",
              "tests/test_data_mixing.py::test_a_source_past_the_epoch_limit_is_refused"),
             "tokens = this source's share of total_tokens (weights normalised to add up to 1); "
             "epochs = tokens / available (inf when nothing is available)"),
]

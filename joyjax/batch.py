"""The batch contract between the data pipelines and the step functions: the keys of a batch.

Every batch is a dict of ``[batch, seq]`` int32 / float32 arrays. The packer produces them, the steps and
losses read them, the harness shards them; each reads the key names from here.
"""

# A packed language-model batch: inputs predict targets (shifted by one); segment ids (0 = padding) keep
# attention inside documents; positions restart per segment; loss_mask is 1 where the target is a real next
# token of the input's document.
LM_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")

# A packed preference (DPO) batch: the LM keys (loss_mask = 1 only on response tokens) plus, per input token,
# ``sequence_ids``, the global index of its sequence in the batch (0 = padding; pair i's chosen response is
# sequence 2i + 1 and its rejected one 2i + 2, both in the same row) and ``pair_index``, the pair's row in its
# source (-1 on padding). With ``dpo.reference = "precomputed"`` the batch also carries ``DPO_REF_KEY``: each
# sequence's reference log-prob at its first token, 0 elsewhere (a segment sum recovers it exactly).
DPO_KEYS = LM_KEYS + ("sequence_ids", "pair_index")
DPO_REF_KEY = "ref_logps"


def dpo_pairs_per_batch(cfg) -> int:
  """Pair slots of a global DPO batch (static): ``dpo.pairs_per_batch``, or ``train.batch_size`` when 0."""
  return int(cfg.dpo.pairs_per_batch or cfg.train.batch_size)

# A rollout batch (RL): one sampled trajectory per row, the left-padded prompt then the response, exactly as the
# sampler returns it: ``tokens``, ``positions`` (restarting at the first real token), ``segment_ids`` (1 on real
# tokens, 0 on padding) and ``response_mask`` (1 on the response tokens that get a loss), all [rows, seq]; per row
# its ``advantages`` (float32), prompt ``group_ids`` (rows of one prompt share one) and ``domain_ids`` (int32).
ROLLOUT_KEYS = ("tokens", "positions", "segment_ids", "response_mask", "advantages", "group_ids", "domain_ids")

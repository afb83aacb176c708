"""The batch contract between the data pipelines and the step functions: the keys of a batch.

Every batch is a dict of ``[batch, seq]`` int32 / float32 arrays. The packer produces them, the steps and
losses read them, the harness shards them; each reads the key names from here.
"""

# A packed language-model batch: inputs predict targets (shifted by one); segment ids (0 = padding) keep
# attention inside documents; positions restart per segment; loss_mask is 1 where the target is a real next
# token of the input's document.
LM_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")

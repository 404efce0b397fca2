"""The engine's defaults and names, one owner each: every layer that needs one imports it from here.

The wire protocol has its own zero values (speculation.proto: an unset `stop_prob` is 0 = off);
these are the values specserve chooses when a caller does not.
"""

DTYPES = ("float32", "bfloat16", "float16")  # the weights' dtypes a model loads in ("auto" picks one: lm.resolve_dtype)
K = 4  # draft tokens per round: the policy's first k, and a session's k when the target sends no KPlan
K_MAX = 8  # the engine's k policy chooses k within [0, K_MAX]
STOP_PROB = 0.5  # a proposal ends after a token the draft itself gives less than this probability
Q_TOP = 32  # sampling: tokens kept in each sparse draft distribution q' sent over the wire
FANOUT_BUDGET = 8  # ssd: the most branches a round's speculation drafts
FANOUT_MIN_GAIN = 0.01  # ssd: a branch must be the outcome with at least this probability to be drafted
DRAFT_SLOTS = 8  # ssd at batch: sequences one speculation stream holds at once (a draft worker's slots per stream)
DRAFT_MAX_LEN = 2048  # ... and the longest sequence (prompt + output) a slot holds, as the target's max_model_len
MAX_PREFILL_TOKENS = 512  # the batching engine: prompt tokens one round prefills; a longer prompt is fed in chunks

"""The layer's candidates measured fastest, per (device type, backend): what ``layer.plan``
follows when no switch is set. Each entry names the report it was copied from (written by
benchmarks/plan_time.py); a pair without an entry gets the candidate with the fewest
modeled bytes (layer.modeled_bytes)."""

MEASURED = {
    # benchmarks/results/cpu-ci/plans.json: the 2-core CI machine, fp32, (1, 32, 32) and
    # (1, 64, 64) x 768 -> 2304, r = 8; the same as the modeled choice (no candidate was
    # more than 2% faster than it)
    ("cpu", "cpu"): {"CONVLORA_LAYER_FORWARD": "bias_first", "CONVLORA_LAYER_DY": "one_pass"},
}

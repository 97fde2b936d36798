"""The layer's candidates measured fastest, per (device type, backend): what ``layer.plan``
follows when no switch is set. Each entry names the report it was copied from (written by
benchmarks/plan_time.py); a pair without an entry gets the candidate with the fewest
modeled bytes (layer.modeled_bytes)."""

MEASURED = {
}
